"""
Tests for loss.py: every loss against a slow reference written straight from the paper's equations
(plain Python loops over pairs and segments), the identities of the paper (arXiv 2602.09533),
numerical safety, clear errors for bad hyper-parameters, and the logged metrics on a
hand-computed example.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from loss import (LOSSES, _segment_ids, adpo_loss, chosen_nll, dpo_loss, preference_metrics,
                  simpo_loss)
from conftest import log_sigmoid, make_batch, ragged_mask, response, split

LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------
# random ragged batches

def masked_log_ratios(batch, side):
    rho = batch[f"policy_{side}_logps"] - batch[f"reference_{side}_logps"]
    return torch.where(batch[f"{side}_mask"], rho, 0.0)


def make_weights(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, T = batch["chosen_mask"].shape
    return (torch.rand(B, T, generator=g, dtype=torch.float64),
            torch.rand(B, T, generator=g, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# the slow reference: one pair at a time, segments as explicit Python lists

def slow_loss(name, batch, beta, family=None, size=None, gamma=None,
              chosen_weights=None, rejected_weights=None):
    pc, pr = batch["policy_chosen_logps"], batch["policy_rejected_logps"]
    rc, rr = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    cm, rm = batch["chosen_mask"], batch["rejected_mask"]
    out = []
    for b in range(cm.shape[0]):
        if name == "simpo":
            lw = [pc[b, t] for t in range(cm.shape[1]) if cm[b, t]]
            ll = [pr[b, t] for t in range(rm.shape[1]) if rm[b, t]]
            out.append(-log_sigmoid(beta / len(lw) * sum(lw) - beta / len(ll) * sum(ll) - gamma))
            continue
        rw, rl = response(pc, rc, cm, b, chosen_weights), response(pr, rr, rm, b, rejected_weights)
        if name == "dpo":
            out.append(-log_sigmoid(beta * sum(rw) - beta * sum(rl)))
        elif name == "ipo":
            out.append((sum(rw) - sum(rl) - 1 / (2 * beta)) ** 2)
        else:
            longest = max(len(rw), len(rl))
            segs_w, segs_l = split(rw, family, size, longest), split(rl, family, size, longest)
            assert len(segs_w) == len(segs_l)
            out.append(-sum(log_sigmoid(beta * (sum(zw, torch.zeros((), dtype=torch.float64))
                                                - sum(zl, torch.zeros((), dtype=torch.float64))))
                            for zw, zl in zip(segs_w, segs_l)))
    return torch.stack(out)


CASES = ([("dpo", {}), ("ipo", {}), ("simpo", {"gamma": 0.5})]
         + [("adpo", {"family": "static", "size": k}) for k in (1, 2, 3, 5, 100)]
         + [("adpo", {"family": "adaptive", "size": m}) for m in (1, 2, 3, 7, 40)])


def values_and_grads(fn, batch):
    pc, pr = batch["policy_chosen_logps"], batch["policy_rejected_logps"]
    pc.grad = pr.grad = None
    losses = fn()
    losses.sum().backward()
    return losses.detach(), pc.grad.clone(), pr.grad.clone()


@pytest.mark.parametrize("name,params,weighted", [(n, p, False) for n, p in CASES]
                         + [(n, p, True) for n, p in CASES if n == "adpo"])
def test_matches_slow_reference(name, params, weighted):
    batch = make_batch(seed=2)
    beta = 2.0 if name == "simpo" else 0.3
    weights = make_weights(batch) if weighted else (None, None)
    extra = dict(chosen_weights=weights[0], rejected_weights=weights[1]) if weighted else {}
    fast = values_and_grads(lambda: LOSSES[name](**batch, beta=beta, **params, **extra)[0], batch)
    slow = values_and_grads(lambda: slow_loss(name, batch, beta, **params,
                                              chosen_weights=weights[0],
                                              rejected_weights=weights[1]), batch)
    assert fast[0].dtype == torch.float64
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-6, atol=1e-6)
    # the grads compared are not trivially zero
    assert fast[1].abs().sum() > 0 and fast[2].abs().sum() > 0


@pytest.mark.parametrize("m,lengths,expected", [
    (2, [5, 9, 7], [[2, 3], [4, 5], [3, 4]]),                           # Figure 1, m = 2
    (4, [5, 9, 7], [[1, 1, 1, 2], [2, 2, 2, 3], [1, 2, 2, 2]]),         # Figure 1, m = 4
    (4, [2, 0], [[0, 1, 0, 1], [0, 0, 0, 0]]),                          # T < m: empty segments,
                                                                        # no crash on T = 0
])
def test_adaptive_split_figure1(m, lengths, expected):
    starts = [3, 0, 1][:len(lengths)]
    mask = ragged_mask(len(lengths), 14, lengths, starts)
    ids = _segment_ids(mask, "adaptive", m)
    for b, sizes in enumerate(expected):
        assert torch.bincount(ids[b][mask[b]], minlength=m).tolist() == sizes
        assert ids[b][mask[b]].tolist() == sorted(ids[b][mask[b]].tolist())  # contiguous, in order


def test_static_split():
    mask = ragged_mask(2, 12, [9, 3], [2, 0])
    ids = _segment_ids(mask, "static", 4)
    assert ids[0][mask[0]].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2]     # 9 tokens, k = 4 -> 4, 4, 1
    assert ids[1][mask[1]].tolist() == [0, 0, 0]


# --------------------------------------------------------------------------------------------------
# identities of the paper

def test_adaptive_m1_is_dpo():
    batch = make_batch(seed=3)
    a = adpo_loss(**batch, beta=0.5, family="adaptive", size=1)
    d = dpo_loss(**batch, beta=0.5)
    for x, y in zip(a, d):
        assert torch.equal(x, y)  # bit for bit (test_dpo_family_vs_trl.py: the gradients too)


def test_static_k1_is_token_level_formula():
    """Table 1 row 2: −Σ_i log σ(β ρ_i(y^w) − β ρ_i(y^l)),
    i over max(T^w, T^l) with ρ = 0 past the end."""
    batch = make_batch(seed=4)
    cm, rm = batch["chosen_mask"], batch["rejected_mask"]
    B, T = cm.shape
    rho_w, rho_l = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):  # left-align each response: column i is token i of the response
        rho_w[b, :cm[b].sum()] = (batch["policy_chosen_logps"]
                                  - batch["reference_chosen_logps"])[b][cm[b]]
        rho_l[b, :rm[b].sum()] = (batch["policy_rejected_logps"]
                                  - batch["reference_rejected_logps"])[b][rm[b]]
    positions = torch.arange(T) < torch.maximum(cm.sum(-1), rm.sum(-1))[:, None]
    expected = -(F.logsigmoid(0.7 * rho_w - 0.7 * rho_l) * positions).sum(-1)
    torch.testing.assert_close(adpo_loss(**batch, beta=0.7, family="static", size=1)[0], expected)


def test_static_large_window_is_dpo():
    # unequal lengths: with zero padding one window holds both whole responses
    batch = make_batch(seed=5)
    for k in (13, 24, 1000):
        torch.testing.assert_close(adpo_loss(**batch, family="static", size=k)[0],
                                   dpo_loss(**batch)[0])
    k = 12  # one response of 13 tokens needs two windows: no longer DPO
    assert not torch.allclose(adpo_loss(**batch, family="static", size=k)[0], dpo_loss(**batch)[0])


@pytest.mark.parametrize("family,size", [("static", 1), ("static", 2), ("static", 5),
                                         ("adaptive", 1), ("adaptive", 3), ("adaptive", 40)])
def test_policy_equals_reference_gives_T_prime_ln2(family, size):
    batch = make_batch(seed=6)
    batch["policy_chosen_logps"] = batch["reference_chosen_logps"].clone()
    batch["policy_rejected_logps"] = batch["reference_rejected_logps"].clone()
    len_w, len_l = batch["chosen_mask"].sum(-1).tolist(), batch["rejected_mask"].sum(-1).tolist()
    if family == "static":
        t_prime = [math.ceil(max(a, b) / size) for a, b in zip(len_w, len_l)]
    else:
        t_prime = [size] * len(len_w)
    losses = adpo_loss(**batch, family=family, size=size)[0]
    torch.testing.assert_close(losses, torch.tensor(t_prime, dtype=torch.float64) * LN2)
    torch.testing.assert_close(dpo_loss(**batch)[0], torch.full((6,), LN2, dtype=torch.float64))


@pytest.mark.parametrize("name,params", CASES)
def test_padding_columns_and_offsets_change_nothing(name, params):
    batch = make_batch(seed=7)
    before = LOSSES[name](**batch, **params)
    # 5 more columns, off every mask, holding inf / nan / huge garbage
    padded = {k: torch.cat([v.detach(),
                            torch.full((6, 5), True if v.dtype == torch.bool else math.nan,
                                       dtype=v.dtype)], dim=1)
              for k, v in batch.items()}
    padded["chosen_mask"][:, -5:] = padded["rejected_mask"][:, -5:] = False
    padded["policy_chosen_logps"][:, -5:] = math.inf
    padded["reference_rejected_logps"][:, -5:] = -1e30
    padded["policy_chosen_logps"].requires_grad_()
    after = LOSSES[name](**padded, **params)
    for x, y in zip(before, after):
        torch.testing.assert_close(x, y)
    after[0].sum().backward()
    assert torch.isfinite(padded["policy_chosen_logps"].grad).all()
    assert (padded["policy_chosen_logps"].grad[:, -5:] == 0).all()
    # move every row's chosen response 5 columns right, and row 0's rejected response too
    shifted = {k: v.detach().clone() for k, v in padded.items()}
    for k in ("policy_chosen_logps", "reference_chosen_logps", "chosen_mask"):
        shifted[k] = padded[k].detach().roll(5, dims=1)
    for k in ("policy_rejected_logps", "reference_rejected_logps", "rejected_mask"):
        shifted[k][0] = padded[k][0].detach().roll(5)
    for x, y in zip(before, LOSSES[name](**shifted, **params)):
        torch.testing.assert_close(x, y)


def test_cdpo_is_adaptive_m1_with_weights():
    """cDPO: −log σ(β Σ ρ(y^w) − β Σ (1 − p_t) ρ(y^l)), chosen weights 1."""
    batch = make_batch(seed=8)
    p = make_weights(batch)[1]
    rho_w = masked_log_ratios(batch, "chosen")
    rho_l = masked_log_ratios(batch, "rejected")
    expected = -F.logsigmoid(0.1 * rho_w.sum(-1) - 0.1 * ((1 - p) * rho_l).sum(-1))
    got = adpo_loss(**batch, family="adaptive", size=1, rejected_weights=1 - p)[0]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("family,size", [("static", 1), ("static", 3), ("adaptive", 4)])
def test_weights_of_ones_change_nothing(family, size):
    batch = make_batch(seed=9)
    ones = torch.ones_like(batch["reference_chosen_logps"])
    plain = adpo_loss(**batch, family=family, size=size)
    weighted = adpo_loss(**batch, family=family, size=size,
                         chosen_weights=ones, rejected_weights=ones)
    for x, y in zip(plain, weighted):
        torch.testing.assert_close(x, y)
    halves = adpo_loss(**batch, family=family, size=size, rejected_weights=ones / 2)[0]
    assert not torch.allclose(halves, plain[0])


def test_rewards_are_detached_beta_sums():
    batch = make_batch(seed=10)
    for name, params in CASES:
        if name == "simpo":
            continue
        _, chosen, rejected = LOSSES[name](**batch, beta=0.25, **params)
        assert not chosen.requires_grad and not rejected.requires_grad
        rho_w = masked_log_ratios(batch, "chosen")
        torch.testing.assert_close(chosen, 0.25 * rho_w.sum(-1).detach())


# --------------------------------------------------------------------------------------------------
# numerical safety

@pytest.mark.parametrize("name,params", CASES)
def test_huge_log_ratios_stay_finite(name, params):
    batch = make_batch(seed=11, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    for k in ("policy_chosen_logps", "policy_rejected_logps"):
        sign = torch.randint(0, 2, batch[k].shape, generator=g) * 2 - 1
        batch[k] = (1e4 * sign).float().requires_grad_()
    losses = LOSSES[name](**batch, **params)[0]
    losses.sum().backward()
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    for k in ("policy_chosen_logps", "policy_rejected_logps"):
        assert torch.isfinite(batch[k].grad).all()


@pytest.mark.parametrize("name,params", [("dpo", {}), ("adpo", {"family": "adaptive", "size": 3}),
                                         ("simpo", {}), ("ipo", {})])
def test_bf16_inputs_give_float32_losses(name, params):
    batch = make_batch(seed=12, dtype=torch.float32, garbage=0.0)
    half = {k: v.detach().bfloat16() if v.is_floating_point() else v for k, v in batch.items()}
    # same numbers, float32
    exact = {k: v.float() if v.is_floating_point() else v for k, v in half.items()}
    got, want = LOSSES[name](**half, **params)[0], LOSSES[name](**exact, **params)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, LOSSES[name](**batch, **params)[0], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name,params", [("dpo", {}), ("ipo", {}), ("simpo", {}),
                                         ("adpo", {"family": "static", "size": 2}),
                                         ("adpo", {"family": "adaptive", "size": 3})])
def test_gradcheck(name, params):
    g = torch.Generator().manual_seed(13)
    cm = ragged_mask(2, 6, [4, 2], [1, 0])
    rm = ragged_mask(2, 6, [3, 5], [0, 1])
    ref_w = -torch.rand(2, 6, generator=g, dtype=torch.float64)
    ref_l = -torch.rand(2, 6, generator=g, dtype=torch.float64)
    weights = torch.rand(2, 6, generator=g, dtype=torch.float64)
    extra = {"rejected_weights": weights} if name == "adpo" else {}

    def f(pc, pr):
        return LOSSES[name](policy_chosen_logps=pc, policy_rejected_logps=pr,
                            reference_chosen_logps=ref_w, reference_rejected_logps=ref_l,
                            chosen_mask=cm, rejected_mask=rm, **params, **extra)[0]

    pc = -torch.rand(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    pr = -torch.rand(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (pc, pr))


# --------------------------------------------------------------------------------------------------
# clear errors

@pytest.mark.parametrize("kwargs,match", [
    ({"beta": 0.0}, "beta must be > 0"),
    ({"beta": -1.0}, "beta must be > 0"),
    ({"size": 0}, "size must be an integer >= 1"),
    ({"size": 2.5}, "size must be an integer >= 1"),
    ({"family": "dynamic"}, "family must be 'static' or 'adaptive'"),
])
def test_bad_hyper_parameters(kwargs, match):
    batch = make_batch()
    with pytest.raises(ValueError, match=match):
        adpo_loss(**batch, **kwargs)
    with pytest.raises(ValueError, match=match):
        preference_metrics(**batch, **kwargs)


def test_bad_shapes_name_the_argument():
    batch = make_batch()
    bad = dict(batch, reference_rejected_logps=batch["reference_rejected_logps"][:, :-1])
    for fn in LOSSES.values():
        with pytest.raises(ValueError, match=r"reference_rejected_logps has shape \(6, 23\)"):
            fn(**bad)
    with pytest.raises(ValueError, match="rejected_weights has shape"):
        adpo_loss(**batch, rejected_weights=torch.ones(6, 3))
    with pytest.raises(ValueError, match=r"policy_chosen_logps must be \(B, T\)"):
        dpo_loss(**dict(batch, policy_chosen_logps=batch["policy_chosen_logps"].sum(-1)))
    with pytest.raises(ValueError, match="chosen_mask must be a bool tensor"):
        dpo_loss(**dict(batch, chosen_mask=batch["chosen_mask"].float()))
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(**batch, beta=0)


def test_empty_response_is_an_error_for_length_normalised_losses():
    batch = make_batch()
    batch["rejected_mask"][2] = False
    with pytest.raises(ValueError,
                       match=r"simpo_loss: rejected_mask has no response token in rows \[2\]"):
        simpo_loss(**batch)
    # sums are fine: S = 0
    assert torch.isfinite(adpo_loss(**batch, family="adaptive", size=4)[0]).all()
    batch["chosen_mask"][0] = False
    with pytest.raises(ValueError,
                       match=r"chosen_nll: chosen_mask has no response token in rows \[0\]"):
        chosen_nll(batch["policy_chosen_logps"], batch["chosen_mask"])


def test_chosen_nll():
    logps = torch.tensor([[-1.0, -2.0, 9.0], [9.0, -0.5, -1.5]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    torch.testing.assert_close(chosen_nll(logps, mask), torch.tensor([1.5, 1.0]))


# --------------------------------------------------------------------------------------------------
# metrics

def small_example():
    x = 7.0  # off-mask garbage
    T, F_ = True, False
    return dict(
        # ρ_w: [.5, .5], [-1, 0]
        policy_chosen_logps=torch.tensor([[-1.0, -2.0, x], [x, -3.0, -1.0]]),
        reference_chosen_logps=torch.tensor([[-1.5, -2.5, x], [x, -2.0, -1.0]]),
        # ρ_l: [0, -.5, 0], [.25]
        policy_rejected_logps=torch.tensor([[-1.0, -1.0, -1.0], [-2.0, x, x]]),
        reference_rejected_logps=torch.tensor([[-1.0, -0.5, -1.0], [-2.25, x, x]]),
        chosen_mask=torch.tensor([[T, T, F_], [F_, T, T]]),
        rejected_mask=torch.tensor([[T, T, T], [T, F_, F_]]),
    )


def test_metrics_by_hand():
    # β = 0.5: rewards chosen (0.5, -0.5), rejected (-0.25, 0.125)
    # summed policy logps: chosen (-3, -4), rejected (-3, -2)
    m = preference_metrics(**small_example(), beta=0.5, family="static", size=1)
    expected = {"rewards/chosen": 0.0, "rewards/rejected": -0.0625, "rewards/accuracy": 0.5,
                "rewards/margin": 0.0625, "logps/chosen": -3.5, "logps/rejected": -2.5,
                # Σ_t ρ_t(y^w): (1, -1), per token (.5, -.5)
                "logps/chosen_vs_ref": 0.0, "logps/chosen_vs_ref_per_token": 0.0,
                # token level: pair 0 (.5 > 0, .5 > -.5, 0 > 0) -> 2 of 3;
                #              pair 1 (-1 > .25, 0 > 0) -> 0 of 2; mean over the pairs
                "segments/win_rate": (2 / 3 + 0 / 2) / 2}
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert m[k].dim() == 0 and m[k].is_floating_point()
        assert m[k].item() == pytest.approx(v), k
    # adaptive m = 2: pair 0 S^w (.5, .5) vs S^l (0, -.5) -> 2 wins;
    #                 pair 1 S^w (-1, 0) vs S^l (0, .25) -> 0
    m = preference_metrics(**small_example(), beta=0.5, family="adaptive", size=2)
    assert m["segments/win_rate"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("family, size", [("static", 1), ("static", 3), ("adaptive", 4)])
def test_metrics_of_a_batch_are_the_pair_weighted_means_of_its_parts(family, size):
    """What lets train.py split a batch over micro-batches and ranks and still log the metrics of
    the whole: every metric is a mean over pairs."""
    batch = make_batch(seed=15)
    whole = preference_metrics(**batch, beta=0.3, family=family, size=size)
    B = batch["chosen_mask"].size(0)
    parts = [{k: v[rows] for k, v in batch.items()} for rows in (slice(0, 1), slice(1, B))]
    sizes = (1, B - 1)
    for k, v in whole.items():
        pooled = sum(n * preference_metrics(**p, beta=0.3, family=family, size=size)[k]
                     for n, p in zip(sizes, parts)) / B
        assert v.item() == pytest.approx(pooled.item(), abs=1e-6), k


def test_metrics_at_step_zero():
    batch = make_batch(seed=14)
    batch["policy_chosen_logps"] = batch["reference_chosen_logps"].clone()
    batch["policy_rejected_logps"] = batch["reference_rejected_logps"].clone()
    m = preference_metrics(**batch, family="adaptive", size=4)
    assert m["rewards/accuracy"].item() == 0.0      # all ties, and ties count as wrong
    assert m["rewards/margin"].item() == 0.0
    assert m["segments/win_rate"].item() == 0.0


@pytest.mark.cuda
def test_cuda_matches_cpu():
    batch = {k: v.detach() for k, v in make_batch(seed=15, dtype=torch.float32).items()}
    for name, params in CASES:
        cpu = LOSSES[name](**batch, **params)
        gpu = LOSSES[name](**{k: v.cuda() for k, v in batch.items()}, **params)
        for x, y in zip(cpu, gpu):
            torch.testing.assert_close(x, y.cpu(), rtol=1e-5, atol=1e-5)
    m = preference_metrics(**{k: v.cuda() for k, v in batch.items()}, family="adaptive", size=4)
    assert all(v.device.type == "cuda" for v in m.values())
