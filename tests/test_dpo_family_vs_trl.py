"""
Tests for the DPO family in loss.py (TRL's loss types, IPO, LD-DPO, WPO) and their segment forms:
each loss against a slow loop written from its equation (values and gradients, float64), against
TRL's own DPOTrainer code on the same per-token inputs (skipped without trl), the m = 1 identities
bit for bit, the value at policy == reference by hand, and finite numbers at the edges.
"""

import inspect
import math
import types
from collections import defaultdict

import pytest
import torch

import train
from machinery.config import parse_loss, resolve_loss
from loss import LOSSES, NO_GRANULARITY, ld_desensitised, wpo_weights
from conftest import (log_sigmoid, make_batch, pair_segments, ragged_mask, response,
                      values_and_grads)

LN2 = math.log(2.0)
# the losses of the summed log-ratios (@pairwise): a response-level form and every granularity
PAIRWISE = ["ipo", "hinge", "robust", "exo_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down",
            "discopop"]
# the hyperparameters the tests give them (away from their identities: robust ε = 0 is DPO)
OPTIONS = {"robust": {"label_smoothing": 0.1}, "exo_pair": {"label_smoothing": 0.05},
           "discopop": {"discopop_tau": 0.05}}
GRAINS = [(None, None), ("static", 1), ("static", 3), ("adaptive", 3), ("adaptive", 40)]


def grain(family, size):
    return {} if family is None else {"family": family, "size": size}


# -----------------------------------------------------------------------------
# the slow reference: the per-comparison loss of each paper, written again on 0-dim tensors


def slow_compare(name, s_w, s_l, beta, label_smoothing=None, discopop_tau=None):
    """ℓ of one comparison (summed log-ratios s_w, s_l of a response or of a segment)."""
    x = beta * (s_w - s_l)
    eps = label_smoothing
    if name == "ipo":
        return (s_w - s_l - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return torch.clamp(1 - x, min=0.0)
    if name == "robust":  # the unbiased estimator of rDPO's Eq. (5)
        return ((1 - eps) * -log_sigmoid(x) - eps * -log_sigmoid(-x)) / (1 - 2 * eps)
    if name == "exo_pair":  # KL(q || p_ε) over {chosen, rejected}
        q = torch.sigmoid(x)
        return q * torch.log(q / (1 - eps)) + (1 - q) * torch.log((1 - q) / eps)
    if name == "nca_pair":
        return (-log_sigmoid(beta * s_w) - 0.5 * log_sigmoid(-beta * s_w)
                - 0.5 * log_sigmoid(-beta * s_l))
    if name == "sppo_hard":
        return (s_w - 0.5 / beta) ** 2 + (s_l + 0.5 / beta) ** 2
    if name == "apo_zero":
        return 1 - torch.sigmoid(beta * s_w) + torch.sigmoid(beta * s_l)
    if name == "apo_down":
        return torch.sigmoid(beta * s_w) + 1 - torch.sigmoid(x)
    if name == "discopop":
        m = torch.sigmoid(x / discopop_tau)
        return (1 - m) * -log_sigmoid(x) + m * torch.exp(-x)
    raise KeyError(name)


def slow_family_loss(name, batch, beta, family=None, size=None, **options):
    """One pair at a time: whole responses, or their segments as Python lists (conftest.split),
    the per-comparison losses summed over the compared segments."""
    zero = torch.zeros((), dtype=torch.float64)
    out = []
    for segments in pair_segments(batch, family, size):
        out.append(sum(slow_compare(name, sum(zw, zero), sum(zl, zero), beta, **options)
                       for zw, zl in segments))
    return torch.stack(out)


def slow_response_loss(name, batch, beta, delta=0.0):
    """The losses without a granularity, one pair at a time."""
    pc, pr = batch["policy_chosen_logps"], batch["policy_rejected_logps"]
    rc, rr = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    cm, rm = batch["chosen_mask"], batch["rejected_mask"]
    out = []
    for b in range(cm.shape[0]):
        rw, rl = response(pc, rc, cm, b), response(pr, rr, rm, b)
        if name == "sigmoid_norm":
            out.append(-log_sigmoid(beta * sum(rw) / len(rw) - beta * sum(rl) / len(rl)))
        elif name == "bco_pair":
            out.append(-log_sigmoid(beta * sum(rw) - delta) - log_sigmoid(delta - beta * sum(rl)))
        elif name == "sft":
            chosen = [pc[b, t] for t in range(cm.shape[1]) if cm[b, t]]
            out.append(-sum(chosen) / len(chosen))
    return torch.stack(out)


@pytest.mark.parametrize("family,size", GRAINS)
@pytest.mark.parametrize("name", PAIRWISE)
def test_each_loss_matches_its_equation_at_every_granularity(name, family, size):
    batch = make_batch(seed=21)
    fast = values_and_grads(
        lambda: LOSSES[name](**batch, beta=0.3, **OPTIONS.get(name, {}), **grain(family, size))[0],
        batch)
    slow = values_and_grads(
        lambda: slow_family_loss(name, batch, 0.3, family, size, **OPTIONS.get(name, {})), batch)
    assert fast[0].dtype == torch.float64
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-9, atol=1e-10)
    assert fast[1].abs().sum() > 0 and fast[2].abs().sum() > 0  # (not trivially zero)


@pytest.mark.parametrize("name,options", [("sigmoid_norm", {}), ("bco_pair", {}),
                                          ("bco_pair", {"delta": 0.4}), ("sft", {})])
def test_the_response_level_losses_match_their_equations(name, options):
    batch = make_batch(seed=22)
    fast = values_and_grads(lambda: LOSSES[name](**batch, beta=0.3, **options)[0], batch)
    slow = values_and_grads(lambda: slow_response_loss(name, batch, 0.3, **options), batch)
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", [*PAIRWISE, "sigmoid_norm", "bco_pair", "sft"])
def test_gradcheck(name):
    g = torch.Generator().manual_seed(23)
    cm = ragged_mask(2, 6, [4, 1], [1, 0])
    rm = ragged_mask(2, 6, [3, 5], [0, 1])
    ref_w = -torch.rand(2, 6, generator=g, dtype=torch.float64)
    ref_l = -torch.rand(2, 6, generator=g, dtype=torch.float64)
    extra = {"family": "adaptive", "size": 3} if name in PAIRWISE else {}

    def f(pc, pr):
        return LOSSES[name](pc, pr, ref_w, ref_l, cm, rm, beta=0.7, **OPTIONS.get(name, {}),
                            **extra)[0]

    pc = (-torch.rand(2, 6, generator=g, dtype=torch.float64)).requires_grad_()
    pr = (-torch.rand(2, 6, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(f, (pc, pr))


# -----------------------------------------------------------------------------
# identities


@pytest.mark.parametrize("name", PAIRWISE)
def test_adaptive_m1_is_the_response_level_loss_bit_for_bit(name):
    batch = make_batch(seed=24)
    options = OPTIONS.get(name, {})
    whole = values_and_grads(lambda: LOSSES[name](**batch, **options)[0], batch)
    m1 = values_and_grads(lambda: LOSSES[name](**batch, family="adaptive", size=1, **options)[0],
                          batch)
    for a, b in zip(whole, m1):
        assert torch.equal(a, b)
    # and a window wider than the batch is one segment too
    wide = LOSSES[name](**batch, family="static", size=1000, **options)[0]
    torch.testing.assert_close(wide, whole[0], rtol=0, atol=0)


def test_adpo_and_cadpo_at_m1_are_dpo_and_cdpo_bit_for_bit():
    batch = make_batch(seed=25)
    weights = torch.rand(batch["chosen_mask"].shape, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))
    pairs = [(lambda: LOSSES["adpo"](**batch, family="adaptive", size=1)[0],
              lambda: LOSSES["dpo"](**batch)[0]),
             (lambda: LOSSES["cadpo"](**batch, size=1, rejected_weights=weights)[0],
              lambda: LOSSES["cdpo"](**batch, rejected_weights=weights)[0])]
    for segmented, whole in pairs:
        for a, b in zip(values_and_grads(segmented, batch), values_and_grads(whole, batch)):
            assert torch.equal(a, b)


def at_step_zero(name, beta, label_smoothing=None, discopop_tau=None):
    """ℓ(0, 0), by hand."""
    return {"ipo": 1 / (4 * beta ** 2), "hinge": 1.0, "robust": LN2,
            "exo_pair": None if label_smoothing is None else
            0.5 * math.log(1 / (4 * label_smoothing * (1 - label_smoothing))),
            "nca_pair": 2 * LN2, "sppo_hard": 1 / (2 * beta ** 2), "apo_zero": 1.0,
            "apo_down": 1.0, "discopop": (LN2 + 1) / 2}[name]


@pytest.mark.parametrize("family,size", [(None, None), ("static", 2), ("adaptive", 5)])
@pytest.mark.parametrize("name", PAIRWISE)
def test_policy_equals_reference_gives_T_prime_times_the_loss_at_zero(name, family, size):
    batch = make_batch(seed=27)
    batch["policy_chosen_logps"] = batch["reference_chosen_logps"].clone()
    batch["policy_rejected_logps"] = batch["reference_rejected_logps"].clone()
    len_w, len_l = batch["chosen_mask"].sum(-1).tolist(), batch["rejected_mask"].sum(-1).tolist()
    if family is None:
        t_prime = [1] * len(len_w)
    elif family == "static":
        t_prime = [math.ceil(max(a, b) / size) for a, b in zip(len_w, len_l)]
    else:
        t_prime = [size] * len(len_w)
    options = OPTIONS.get(name, {})
    losses = LOSSES[name](**batch, beta=0.4, **options, **grain(family, size))[0]
    expected = torch.tensor(t_prime, dtype=torch.float64) * at_step_zero(name, 0.4, **options)
    torch.testing.assert_close(losses, expected)


def test_robust_at_zero_smoothing_is_dpo_and_ld_alpha_one_changes_nothing():
    batch = make_batch(seed=28)
    for family, size in [(None, None), ("adaptive", 4)]:
        robust = LOSSES["robust"](**batch, beta=0.3, label_smoothing=0.0, **grain(family, size))
        dpo = (LOSSES["dpo"](**batch, beta=0.3) if family is None else
               LOSSES["adpo"](**batch, beta=0.3, family=family, size=size))
        for a, b in zip(robust, dpo):
            torch.testing.assert_close(a, b)
    same = ld_desensitised(*(batch[k] for k in list(batch)[:6]), ld_alpha=1.0)
    assert all(torch.equal(a, b) for a, b in zip(same, batch.values()))


# -----------------------------------------------------------------------------
# LD-DPO and WPO, from their equations


def test_ld_desensitised_scales_the_tokens_past_the_shorter_response():
    batch = make_batch(seed=29)
    alpha = 0.3
    out = ld_desensitised(*batch.values(), ld_alpha=alpha)
    cm, rm = batch["chosen_mask"], batch["rejected_mask"]
    for b in range(cm.shape[0]):
        shared = min(int(cm[b].sum()), int(rm[b].sum()))
        for i, (key, mask) in enumerate(zip(list(batch)[:4], [cm, rm, cm, rm])):
            cols = mask[b].nonzero().flatten().tolist()
            for n, t in enumerate(cols):  # n: the token's position in its response
                want = batch[key][b, t] * (1.0 if n < shared else alpha)
                assert out[i][b, t].item() == pytest.approx(want.item(), rel=1e-12)


def test_wpo_weights_are_the_products_of_length_normalised_probabilities():
    batch = make_batch(seed=30)
    w = wpo_weights(batch["policy_chosen_logps"], batch["policy_rejected_logps"],
                    batch["chosen_mask"], batch["rejected_mask"])
    assert not w.requires_grad
    pc, pr = batch["policy_chosen_logps"], batch["policy_rejected_logps"]
    cm, rm = batch["chosen_mask"], batch["rejected_mask"]
    for b in range(cm.shape[0]):
        mean_w = pc[b][cm[b]].mean().item()
        mean_l = pr[b][rm[b]].mean().item()
        assert w[b].item() == pytest.approx(math.exp(mean_w) * math.exp(mean_l), rel=1e-12)


# -----------------------------------------------------------------------------
# the edges: one-token responses, m larger than T, an empty response, inf/nan in the padding


def edge_batch(dtype=torch.float64):
    B, T = 5, 10
    cm = ragged_mask(B, T, [1, 1, 3, 6, 2], [0, 9, 2, 4, 0])  # one-token responses, one at the end
    rm = ragged_mask(B, T, [1, 5, 1, 1, 0], [3, 0, 9, 0, 0])  # ... and one empty rejected response
    g = torch.Generator().manual_seed(31)
    logps = [-torch.rand(B, T, generator=g, dtype=dtype) * 3 for _ in range(4)]
    for x, m in zip(logps, [cm, rm, cm, rm]):
        x[~m] = math.nan
    logps[0][~cm] = math.inf
    return dict(policy_chosen_logps=logps[0].requires_grad_(),
                policy_rejected_logps=logps[1].requires_grad_(),
                reference_chosen_logps=logps[2], reference_rejected_logps=logps[3],
                chosen_mask=cm, rejected_mask=rm)


@pytest.mark.parametrize("family,size", [(None, None), ("static", 1), ("static", 50),
                                         ("adaptive", 4), ("adaptive", 50)])
@pytest.mark.parametrize("name", [*PAIRWISE, "adpo", "cadpo"])
def test_every_granularity_is_finite_at_the_edges(name, family, size):
    if family is None and name in ("adpo", "cadpo"):
        family, size = "adaptive", 1
    batch = edge_batch()
    losses, chosen, rejected = LOSSES[name](**batch, **OPTIONS.get(name, {}),
                                            **grain(family, size))
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen).all()
    for key, mask in (("policy_chosen_logps", "chosen_mask"),
                      ("policy_rejected_logps", "rejected_mask")):
        grad = batch[key].grad
        assert torch.isfinite(grad).all()
        assert (grad[~batch[mask]] == 0).all()  # the padding is never read


@pytest.mark.parametrize("name", [*PAIRWISE, "bco_pair", "sigmoid_norm", "sft"])
def test_huge_log_ratios_stay_finite(name):
    batch = make_batch(seed=32, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    for k in ("policy_chosen_logps", "policy_rejected_logps"):
        sign = torch.randint(0, 2, batch[k].shape, generator=g) * 2 - 1
        batch[k] = (1e4 * sign).float().requires_grad_()
    extra = {"family": "adaptive", "size": 3} if name in PAIRWISE else {}
    losses = LOSSES[name](**batch, **OPTIONS.get(name, {}), **extra)[0]
    losses.sum().backward()
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all(), losses
    for k in ("policy_chosen_logps", "policy_rejected_logps"):
        assert batch[k].grad is None or torch.isfinite(batch[k].grad).all()  # (sft: None)


# -----------------------------------------------------------------------------
# refusals, in one line


def test_every_loss_has_a_granularity_or_says_why_not():
    for name, fn in LOSSES.items():
        has = "family" in inspect.signature(fn).parameters
        assert has != (name in NO_GRANULARITY), name


@pytest.mark.parametrize("spec,match", [
    ("bco_pair:static:4", r"bco_pair has no granularity \(its shift δ is a running mean"),
    ("dpo:adaptive:16", r"DPO at a granularity is ADPO: adpo:FAMILY:SIZE"),
    ("simpo:static:2", r"simpo has no granularity"),
    ("hinge:adaptive", r"'hinge:adaptive': expected NAME:FAMILY:SIZE"),
    ("hinge:diagonal:4", r"FAMILY static or adaptive"),
    ("ipo:static:0", r"SIZE an integer >= 1"),
    ("dpo+kto", r"'kto' is none of them"),
])
def test_bad_specs_are_refused_in_one_line(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_loss(spec)
    assert "\n" not in str(e.value)


def test_specs_parse():
    assert parse_loss("dpo+sft") == [("dpo", None, None), ("sft", None, None)]
    assert parse_loss(" hinge:adaptive:16 + sft ") == [("hinge", "adaptive", 16),
                                                      ("sft", None, None)]
    assert parse_loss("adpo") == [("adpo", None, None)]


@pytest.mark.parametrize("name,options,match", [
    ("robust", {"label_smoothing": 0.5}, r"robust: label_smoothing must be in \[0, 0.5\)"),
    ("exo_pair", {"label_smoothing": 0.0}, r"exo_pair: label_smoothing must be in \(0, 0.5\)"),
    ("discopop", {"discopop_tau": 0.0}, r"discopop: discopop_tau must be > 0"),
    ("hinge", {"beta": 0.0}, r"beta must be > 0"),
    ("hinge", {"family": "dynamic"}, r"family must be 'static' or 'adaptive'"),
])
def test_bad_hyperparameters_name_themselves(name, options, match):
    with pytest.raises(ValueError, match=match):
        LOSSES[name](**make_batch(), **options)


# -----------------------------------------------------------------------------
# TRL's own code on the same per-token inputs (its DPOTrainer's loss, called with tensors)


class TRLAccelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


class TRLStubModel(torch.nn.Module):
    """What TRL's loss reads of a model's output: per-token log-probs of the labels (0 where a
    label is ignored, as TRL's fused LM head gives them) and a few logging-only tensors."""
    is_gradient_checkpointing = False

    def __init__(self, logps, mask):
        super().__init__()
        self.logps, self.mask = logps, mask

    def forward(self, **kwargs):
        zeros = torch.zeros_like(self.logps)
        return types.SimpleNamespace(log_probs=self.logps * self.mask, entropy=zeros,
                                     mean_logits=zeros, is_top1=zeros.bool(),
                                     log_sum_sq_probs=zeros)  # WPO's alignment term: 0


def trl_loss(batch, loss_types, loss_weights=None, beta=0.3, label_smoothing=0.0,
             discopop_tau=0.05, ld_alpha=None, use_weighting=False):
    """TRL's DPOTrainer._compute_loss on a trl_batch: a trainer shell holding only the attributes
    its loss reads (no model, no download), the policy and the reference stub models."""
    from trl import DPOTrainer
    trainer = object.__new__(DPOTrainer)
    shift = batch["completion_mask"][:, 1:]
    attributes = dict(
        accelerator=TRLAccelerator(), model=TRLStubModel(batch["policy"], shift).train(),
        ref_model=TRLStubModel(batch["reference"], shift), loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta, ld_alpha=ld_alpha,
        label_smoothing=label_smoothing, use_weighting=use_weighting,
        f_divergence_type="reverse_kl", precompute_ref_logps=False, aux_loss_enabled=False,
        args=types.SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    for k, v in attributes.items():
        setattr(trainer, k, v)
    inputs = dict(input_ids=torch.zeros_like(batch["completion_mask"]),
                  attention_mask=torch.ones_like(batch["completion_mask"]),
                  completion_mask=batch["completion_mask"])
    return trainer._compute_loss(trainer.model, inputs, return_outputs=False)


def trl_batch(seed=0, equal_chosen=False):
    """4 pairs in TRL's layout: completion_mask (2B, T) after a prompt of 1-3 tokens; per-token
    log-probs (2B, T-1) lined up with completion_mask[:, 1:] (TRL's shift); and the same tensors
    as our six inputs (chosen rows [0, B), rejected rows [B, 2B))."""
    B, T = 4, 12
    prompts = [1, 2, 3, 1, 2, 1, 3, 2]
    lengths = [5, 5, 5, 5] if equal_chosen else [5, 1, 9, 3]
    lengths += [7, 4, 2, 8]
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for r, (p, n) in enumerate(zip(prompts, lengths)):
        completion[r, p:p + n] = 1
    g = torch.Generator().manual_seed(seed)
    policy = (-2 * torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64)).requires_grad_()
    reference = -2 * torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64)
    mask = completion[:, 1:].bool()
    six = (policy[:B], policy[B:], reference[:B], reference[B:], mask[:B], mask[B:])
    return dict(completion_mask=completion, policy=policy, reference=reference, mask=mask,
                six=six, B=B)


def grads_of(loss, batch):
    batch["policy"].grad = None
    loss.backward()
    return loss.detach(), batch["policy"].grad.clone()


def assert_same(ours, theirs):
    # (1e-6: TRL holds exo_pair's ε in a float32 tensor, float64 everywhere else)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
    assert ours[1].abs().sum() > 0


TRL_NAMES = {"sigmoid": "dpo"}  # TRL's loss_type -> ours (the rest: the same name)


@pytest.mark.parametrize("loss_type,options", [
    ("sigmoid", {}), ("hinge", {}), ("robust", {"label_smoothing": 0.1}),
    ("exo_pair", {"label_smoothing": 1e-3}), ("exo_pair", {"label_smoothing": 0.2}),
    ("nca_pair", {}), ("bco_pair", {}), ("sppo_hard", {}), ("apo_zero", {}), ("apo_down", {}),
    ("discopop", {"discopop_tau": 0.05}), ("discopop", {"discopop_tau": 0.5}),
    ("sigmoid_norm", {}),
])
def test_each_loss_equals_trls(loss_type, options):
    pytest.importorskip("trl")
    batch = trl_batch(seed=1)
    name = TRL_NAMES.get(loss_type, loss_type)
    ours = grads_of(LOSSES[name](*batch["six"], beta=0.3, **options)[0].mean(), batch)
    theirs = grads_of(trl_loss(batch, [loss_type], beta=0.3, **options), batch)
    assert_same(ours, theirs)


def test_ipo_is_trls_on_log_ratios_divided_by_the_length():
    """TRL's IPO averages the log-ratios over each response's tokens (our ipo sums, as the paper's
    Eq. 17): ours on log-probs divided by |y| is TRL's exactly."""
    pytest.importorskip("trl")
    batch = trl_batch(seed=2)
    pc, pr, rc, rr, cm, rm = batch["six"]
    per_w, per_l = 1 / cm.sum(-1, keepdim=True), 1 / rm.sum(-1, keepdim=True)  # (B, 1) 1/|y|
    ours = grads_of(LOSSES["ipo"](pc * per_w, pr * per_l, rc * per_w, rr * per_l, cm, rm,
                                  beta=0.3)[0].mean(), batch)
    assert_same(ours, grads_of(trl_loss(batch, ["ipo"], beta=0.3), batch))
    summed = LOSSES["ipo"](*batch["six"], beta=0.3)[0].mean()
    assert not torch.allclose(summed, ours[0])  # (the two conventions do differ)


def step_loss(batch, **config):
    """train.preference_loss (the step train.py runs) on a trl_batch, as a mean over the pairs
    (train() divides the summed loss by the pair count)."""
    cfg = train.Config(beta=0.3, **config)
    policy = batch["policy"]
    step = dict(input_ids=torch.zeros(policy.shape, dtype=torch.long),
                targets=torch.zeros(policy.shape, dtype=torch.long),
                loss_mask=batch["mask"], reference_logps=batch["reference"])
    loss, _ = train.preference_loss(lambda idx, targets: policy, step, resolve_loss(cfg))
    return loss / batch["B"]


@pytest.mark.parametrize("loss,weights,trl_types,trl_weights", [
    ("dpo+sft", "", ["sigmoid", "sft"], [1.0, 1.0]),                                # RPO
    ("dpo+sft", "1,0.5", ["sigmoid", "sft"], [1.0, 0.5]),
    ("dpo+bco_pair+sft", "0.8,0.2,1", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
    ("hinge+nca_pair", "0.3,2", ["hinge", "nca_pair"], [0.3, 2.0]),
])
def test_weighted_combinations_equal_trls(loss, weights, trl_types, trl_weights):
    """Each term a mean over pairs, then weighted: TRL's combination. (TRL's sft is one token mean
    over the batch, ours a mean per pair: the same with chosen responses of one length.)"""
    pytest.importorskip("trl")
    batch = trl_batch(seed=3, equal_chosen=True)
    ours = grads_of(step_loss(batch, loss=loss, loss_weights=weights), batch)
    assert_same(ours, grads_of(trl_loss(batch, trl_types, trl_weights), batch))


@pytest.mark.parametrize("loss,trl_type", [("dpo", "sigmoid"), ("hinge", "hinge"),
                                           ("apo_down", "apo_down")])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_ld_alpha_equals_trls(loss, trl_type, alpha):
    pytest.importorskip("trl")
    batch = trl_batch(seed=4)
    ours = grads_of(step_loss(batch, loss=loss, ld_alpha=alpha), batch)
    assert_same(ours, grads_of(trl_loss(batch, [trl_type], ld_alpha=alpha), batch))
    assert not torch.allclose(ours[0], step_loss(batch, loss=loss).detach())


@pytest.mark.parametrize("loss,trl_types", [("dpo", ["sigmoid"]), ("robust", ["robust"])])
def test_wpo_weighting_equals_trls_without_its_alignment_term(loss, trl_types):
    pytest.importorskip("trl")
    batch = trl_batch(seed=5)
    ours = grads_of(step_loss(batch, loss=loss, use_weighting=True, label_smoothing=0.1), batch)
    theirs = grads_of(trl_loss(batch, trl_types, use_weighting=True, label_smoothing=0.1), batch)
    assert_same(ours, theirs)
