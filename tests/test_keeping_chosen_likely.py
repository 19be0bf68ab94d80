"""
Tests for the two losses that keep the preferred answer likely, DPO-Positive (dpop) and the
Stable Preference Optimization term (spo, a reconstruction), and for the metric every preference
run logs beside them (logps/chosen_vs_ref): each loss against a slow loop written from its
equation (values and gradients, float64), their identities (λ = 0 is the base loss; nothing
changes while the policy keeps y^w at least as likely as the reference), spo composed with other
losses through the step, one-line errors for a bad λ, and the --compare spellings.
"""
import dataclasses
import math

import pytest
import torch

import train
from conftest import (check_one_line_error, log_sigmoid, make_batch, pair_segments, ragged_mask,
                      run_cli, values_and_grads)
from loss import LOSSES, preference_metrics
from machinery import compare
from machinery.common import ConfigError
from machinery.config import parse_loss, resolve_loss, validate

LN2 = math.log(2.0)
GRAINS = [(None, None), ("static", 1), ("static", 3), ("adaptive", 3), ("adaptive", 40)]
ZERO = torch.zeros((), dtype=torch.float64)


def grain(family, size):
    return {} if family is None else {"family": family, "size": size}


def six(batch):
    return [batch[k] for k in ("policy_chosen_logps", "policy_rejected_logps",
                               "reference_chosen_logps", "reference_rejected_logps",
                               "chosen_mask", "rejected_mask")]


def keeping_y_w_likely(batch, seed=0):
    """The batch with the policy's chosen log-probs at or above the reference's, token by token
    (some exactly equal, as at step 0): Σ_t ρ_t(y^w) >= 0 in every pair and every segment."""
    g = torch.Generator().manual_seed(seed)
    lift = torch.rand(batch["chosen_mask"].shape, generator=g, dtype=torch.float64)
    lift[:, ::3] = 0.0
    pc = batch["reference_chosen_logps"] + lift
    return dict(batch, policy_chosen_logps=pc.detach().requires_grad_())


# -----------------------------------------------------------------------------
# the slow references: one pair at a time, segments as Python lists (conftest.split)


def slow_dpop(batch, beta, dpop_lambda, family=None, size=None):
    """Σ over the compared segments (or the whole responses) of
    −log σ(β [S^w − S^l − λ·max(0, −S^w)])."""
    out = []
    for segments in pair_segments(batch, family, size):
        total = ZERO
        for zw, zl in segments:
            s_w, s_l = sum(zw, ZERO), sum(zl, ZERO)
            penalty = torch.clamp(-s_w, min=0.0)  # max(0, log πref(y^w)/πθ(y^w))
            total = total - log_sigmoid(beta * (s_w - s_l - dpop_lambda * penalty))
        out.append(total)
    return torch.stack(out)


def slow_spo(batch):
    """max(0, NLL_θ(y^w) − NLL_ref(y^w)), the NLLs summed over the response's tokens."""
    pc, rc, cm = batch["policy_chosen_logps"], batch["reference_chosen_logps"], batch["chosen_mask"]
    out = []
    for b in range(cm.shape[0]):
        nll_policy = -sum(pc[b, t] for t in range(cm.shape[1]) if cm[b, t])
        nll_reference = -sum(rc[b, t] for t in range(cm.shape[1]) if cm[b, t])
        out.append(torch.clamp(nll_policy - nll_reference, min=0.0))
    return torch.stack(out)


# -----------------------------------------------------------------------------
# each loss against its equation


@pytest.mark.parametrize("family,size", GRAINS)
@pytest.mark.parametrize("dpop_lambda", [5.0, 50.0])
def test_dpop_matches_its_equation_at_every_granularity(dpop_lambda, family, size):
    batch = make_batch(seed=60)
    fast = values_and_grads(lambda: LOSSES["dpop"](**batch, beta=0.3, dpop_lambda=dpop_lambda,
                                                   **grain(family, size))[0], batch)
    slow = values_and_grads(lambda: slow_dpop(batch, 0.3, dpop_lambda, family, size), batch)
    assert fast[0].dtype == torch.float64
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-9, atol=1e-10)
    # the batch exercises the penalty: some pairs' y^w below the reference, some above
    rho_w = batch["policy_chosen_logps"] - batch["reference_chosen_logps"]
    h_w = torch.where(batch["chosen_mask"], rho_w, 0.0).sum(-1)                     # (B,)
    assert (h_w < 0).any() and (h_w > 0).any()


def test_spo_matches_its_equation():
    batch = make_batch(seed=61)
    fast = values_and_grads(lambda: LOSSES["spo"](**batch, beta=0.3)[0], batch)
    slow = values_and_grads(lambda: slow_spo(batch), batch)
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-9, atol=1e-10)
    assert (fast[0] > 0).any() and (fast[0] == 0).any()  # (both sides of the max)
    assert (fast[2] == 0).all()  # the rejected response is not read


def test_spo_pushes_every_token_of_a_fallen_y_w_back_up_with_weight_one():
    """d/d log πθ(y^w_t) of max(0, −Σ_t ρ_t) is −1 on each token of a pair whose y^w fell below
    the reference, 0 elsewhere: λ (the term's weight) per token, whatever the length."""
    batch = make_batch(seed=62)
    losses, grad_w, _ = values_and_grads(lambda: LOSSES["spo"](**batch)[0], batch)
    fell = losses > 0                                                      # (B,)
    want = torch.where(batch["chosen_mask"] & fell[:, None], -1.0, 0.0).double()
    assert torch.equal(grad_w, want)


@pytest.mark.parametrize("name,options", [("dpop", {"family": "adaptive", "size": 3}),
                                          ("dpop", {}), ("spo", {})])
def test_gradcheck(name, options):
    g = torch.Generator().manual_seed(63)
    cm = ragged_mask(2, 6, [4, 1], [1, 0])
    rm = ragged_mask(2, 6, [3, 5], [0, 1])
    ref_w = -torch.rand(2, 6, generator=g, dtype=torch.float64)
    ref_l = -torch.rand(2, 6, generator=g, dtype=torch.float64)
    extra = {"dpop_lambda": 3.0} if name == "dpop" else {}

    def f(pc, pr):
        return LOSSES[name](pc, pr, ref_w, ref_l, cm, rm, beta=0.7, **extra, **options)[0]

    pc = (-torch.rand(2, 6, generator=g, dtype=torch.float64)).requires_grad_()
    pr = (-torch.rand(2, 6, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(f, (pc, pr))


@pytest.mark.parametrize("name,options", [("dpop", {}), ("dpop", {"family": "static", "size": 2}),
                                          ("spo", {})])
def test_huge_log_ratios_and_inf_or_nan_in_the_padding_stay_out(name, options):
    batch = make_batch(seed=71, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    for key, mask, pad in (("policy_chosen_logps", "chosen_mask", math.inf),
                           ("policy_rejected_logps", "rejected_mask", math.nan)):
        sign = torch.randint(0, 2, batch[key].shape, generator=g) * 2 - 1
        huge = (1e4 * sign).float()
        batch[key] = torch.where(batch[mask], huge, pad).requires_grad_()
    losses = LOSSES[name](**batch, **options)[0]
    losses.sum().backward()
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all(), losses
    for key, mask in (("policy_chosen_logps", "chosen_mask"),
                      ("policy_rejected_logps", "rejected_mask")):
        grad = batch[key].grad
        assert grad is None or (torch.isfinite(grad).all() and (grad[~batch[mask]] == 0).all())


# -----------------------------------------------------------------------------
# identities


def test_dpop_at_lambda_zero_is_dpo_bit_for_bit_and_adpo_at_every_granularity():
    batch = make_batch(seed=64)
    dpop = values_and_grads(lambda: LOSSES["dpop"](**batch, beta=0.3, dpop_lambda=0.0)[0], batch)
    dpo = values_and_grads(lambda: LOSSES["dpo"](**batch, beta=0.3)[0], batch)
    for a, b in zip(dpop, dpo):
        assert torch.equal(a, b)
    for family, size in GRAINS[1:]:
        dpop = values_and_grads(lambda: LOSSES["dpop"](**batch, beta=0.3, dpop_lambda=0.0,
                                                       family=family, size=size)[0], batch)
        adpo = values_and_grads(lambda: LOSSES["adpo"](**batch, beta=0.3, family=family,
                                                       size=size)[0], batch)
        for a, b in zip(dpop, adpo):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_dpop_at_adaptive_m1_is_dpop_of_the_whole_responses_bit_for_bit():
    batch = make_batch(seed=65)
    whole = values_and_grads(lambda: LOSSES["dpop"](**batch)[0], batch)
    m1 = values_and_grads(lambda: LOSSES["dpop"](**batch, family="adaptive", size=1)[0], batch)
    for a, b in zip(whole, m1):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family,size", GRAINS)
def test_dpop_is_its_base_loss_while_the_policy_keeps_y_w_at_least_as_likely(family, size):
    batch = keeping_y_w_likely(make_batch(seed=66))
    base = "dpo" if family is None else "adpo"
    dpop = values_and_grads(lambda: LOSSES["dpop"](**batch, beta=0.3, dpop_lambda=50.0,
                                                   **grain(family, size))[0], batch)
    want = values_and_grads(lambda: LOSSES[base](**batch, beta=0.3, **grain(family, size))[0],
                            batch)
    for a, b in zip(dpop, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_spo_is_zero_with_a_zero_gradient_while_the_policy_keeps_y_w_at_least_as_likely():
    batch = keeping_y_w_likely(make_batch(seed=67))
    losses, grad_w, grad_l = values_and_grads(lambda: LOSSES["spo"](**batch)[0], batch)
    assert torch.equal(losses, torch.zeros(6, dtype=torch.float64))
    assert (grad_w == 0).all() and (grad_l == 0).all()


def test_at_step_zero_dpop_is_t_prime_ln2_and_spo_is_zero_without_a_gradient():
    batch = make_batch(seed=68)
    batch["policy_chosen_logps"] = batch["reference_chosen_logps"].clone().requires_grad_()
    batch["policy_rejected_logps"] = batch["reference_rejected_logps"].clone().requires_grad_()
    losses = LOSSES["dpop"](**batch, family="adaptive", size=5)[0]
    torch.testing.assert_close(losses, torch.full((6,), 5 * LN2, dtype=torch.float64))
    losses, grad_w, _ = values_and_grads(lambda: LOSSES["spo"](**batch)[0], batch)
    assert (losses == 0).all() and (grad_w == 0).all()


# -----------------------------------------------------------------------------
# through the step: options from the config, spo added to any loss


def step_batch(batch):
    """make_batch's six tensors as train.preference_loss's (2B, T) batch, and a 'model' that
    returns the policy's log-probs."""
    pc, pr, rc, rr, cm, rm = six(batch)
    policy = torch.cat([pc, pr])  # (2B, T): chosen rows, then rejected rows
    step = dict(input_ids=torch.zeros(policy.shape, dtype=torch.long),
                targets=torch.zeros(policy.shape, dtype=torch.long),
                loss_mask=torch.cat([cm, rm]), reference_logps=torch.cat([rc, rr]))
    return step, (lambda idx, targets: policy)


@pytest.mark.parametrize("spec,weights,base", [
    ("simpo+spo", "1,2", lambda s: LOSSES["simpo"](*s, beta=2.0, gamma=0.5)[0]),
    ("dpo+spo", "", lambda s: LOSSES["dpo"](*s, beta=0.3)[0]),
    ("adpo+spo", "1,0.5", lambda s: LOSSES["adpo"](*s, beta=0.3, family="static", size=1)[0]),
    ("dpop:adaptive:3+spo", "1,3",
     lambda s: LOSSES["dpop"](*s, beta=0.3, dpop_lambda=50.0, family="adaptive", size=3)[0]),
])
def test_spo_adds_its_weighted_penalty_to_any_loss_through_the_step(spec, weights, base):
    batch = make_batch(seed=69)
    beta = 2.0 if spec.startswith("simpo") else 0.3
    cfg = train.Config(loss=spec, loss_weights=weights, beta=beta)
    validate(cfg)
    lam = float(weights.split(",")[1]) if weights else 1.0
    step, model = step_batch(batch)
    pc = batch["policy_chosen_logps"]
    got, metrics = train.preference_loss(model, step, resolve_loss(cfg))
    grad = torch.autograd.grad(got, pc)[0]
    want = base(six(batch)).sum() + lam * slow_spo(batch).sum()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, torch.autograd.grad(want, pc)[0])
    assert slow_spo(batch).sum() > 0  # (the penalty is active somewhere in this batch)
    assert "logps/chosen_vs_ref" in metrics


def test_dpop_takes_its_lambda_from_the_config():
    term, = resolve_loss(train.Config(loss="dpop", beta=0.3)).terms
    assert term.options == {"beta": 0.3, "dpop_lambda": 50.0} and term.grain is None
    term, = resolve_loss(train.Config(loss="dpop:static:4", dpop_lambda=5.0)).terms
    assert term.options == {"beta": 0.5, "dpop_lambda": 5.0, "family": "static", "size": 4}
    term, = resolve_loss(train.Config(loss="spo")).terms
    assert term.options == {"beta": 0.5} and term.weight == 1.0


# -----------------------------------------------------------------------------
# a bad λ: one line naming the flag


def test_a_negative_dpop_lambda_is_one_line_naming_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"--dpop_lambda must be >= 0, got -1.0"):
        train.main(["--loss", "dpop", "--dpop_lambda", "-1", "--out_dir", str(tmp_path / "r")])
    with pytest.raises(ConfigError, match=r"--compare: bad variant 'dpop@dpop_lambda=-5'.*"
                                          r"--dpop_lambda must be >= 0"):
        compare.parse_variant("dpop@dpop_lambda=-5", train.Config())
    with pytest.raises(ValueError, match=r"dpop: dpop_lambda must be >= 0, got -0.5"):
        LOSSES["dpop"](**make_batch(), dpop_lambda=-0.5)
    p = run_cli(["train.py", "--loss", "dpop", "--dpop_lambda", "-1",
                 "--out_dir", tmp_path / "cli"])
    check_one_line_error(p.returncode, p.stderr, "--dpop_lambda must be >= 0, got -1.0")
    assert not (tmp_path / "cli").exists()  # refused before any work


def test_a_negative_spo_weight_is_one_line_naming_the_flag():
    with pytest.raises(ConfigError, match=r"--loss_weights: -2 is negative"):
        validate(train.Config(loss="dpo+spo", loss_weights="1,-2"))
    with pytest.raises(ValueError, match=r"spo has no granularity \(a penalty on the chosen"):
        parse_loss("dpo+spo:static:4")


# -----------------------------------------------------------------------------
# --compare


@pytest.mark.parametrize("spec,label,folder", [
    ("dpop", "DPOP", "dpop_s0"),
    ("dpop@dpop_lambda=5", "DPOP dpop_lambda=5.0", "dpop@dpop_lambda=5.0_s0"),
    ("dpop:adaptive:16", "DPOP adaptive m=16", "dpop_adaptive_16_s0"),
    ("dpo+spo", "DPO + SPO", "dpo+spo_s0"),
    ("dpo+2spo", "DPO + 2·SPO", "dpo+2spo_s0"),
    ("simpo+spo", "SimPO + SPO", "simpo+spo_s0"),
    ("adpo+0.5spo", "ADPO static k=1 + 0.5·SPO", "adpo_static_1+0.5spo_s0"),
])
def test_variants_parse_label_and_file_themselves(spec, label, folder, tmp_path):
    cfg = train.Config(out_dir=str(tmp_path))
    variant = dataclasses.replace(compare.parse_variant(spec, cfg), seed=0)
    assert compare.variant_label(variant, cfg) == label
    assert compare.variant_folder(variant, cfg) == str(tmp_path / "compare" / folder)


def test_the_comparison_of_dpo_dpop_and_dpo_plus_spo_plans_three_runs():
    cfg = train.Config(compare="dpo+spo,dpop,dpo", seeds="0,1")
    plan, baseline = compare.variants(cfg)
    assert [label for label, _, _ in plan[::2]] == ["DPO", "DPOP", "DPO + SPO"]
    assert baseline == "DPO"
    v = compare.parse_variant("dpo+2spo", cfg)
    assert (v.loss, v.loss_weights) == ("dpo+spo", "1,2")
    assert compare.parse_variant("dpop@dpop_lambda=5", cfg).dpop_lambda == 5.0


# -----------------------------------------------------------------------------
# the metric: how the preferred response's likelihood moved from the reference's


def test_chosen_vs_ref_by_hand():
    T, F_ = True, False
    x = 1e3  # off the masks: never read
    m = preference_metrics(
        # ρ_w: [-.5, -.5, +.25] (sum -.75, per token -.25), [+1] (sum 1, per token 1)
        policy_chosen_logps=torch.tensor([[-1.5, -2.5, -0.75, x], [x, x, x, -1.0]]),
        reference_chosen_logps=torch.tensor([[-1.0, -2.0, -1.0, x], [x, x, x, -2.0]]),
        policy_rejected_logps=torch.tensor([[-1.0, x, x, x], [-1.0, -1.0, x, x]]),
        reference_rejected_logps=torch.tensor([[-3.0, x, x, x], [-0.5, -0.5, x, x]]),
        chosen_mask=torch.tensor([[T, T, T, F_], [F_, F_, F_, T]]),
        rejected_mask=torch.tensor([[T, F_, F_, F_], [T, T, F_, F_]]), beta=0.5)
    assert m["logps/chosen_vs_ref"].item() == pytest.approx((-0.75 + 1.0) / 2)
    assert m["logps/chosen_vs_ref_per_token"].item() == pytest.approx((-0.25 + 1.0) / 2)
    assert m["logps/chosen_vs_ref"].dim() == 0
    # it is the chosen reward without its β
    assert m["logps/chosen_vs_ref"].item() == pytest.approx(m["rewards/chosen"].item() / 0.5)


def test_chosen_vs_ref_is_zero_at_step_zero_and_logged_by_every_step():
    batch = make_batch(seed=70)
    batch["policy_chosen_logps"] = batch["reference_chosen_logps"].clone()
    batch["policy_rejected_logps"] = batch["reference_rejected_logps"].clone()
    m = preference_metrics(**batch)
    assert m["logps/chosen_vs_ref"].item() == 0.0
    assert m["logps/chosen_vs_ref_per_token"].item() == 0.0
    step, model = step_batch(batch)
    _, logged = train.preference_loss(model, step, resolve_loss(train.Config(loss="adpo")))
    assert logged["logps/chosen_vs_ref"].item() == 0.0  # (the step logs sums over its pairs)
