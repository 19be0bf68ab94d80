"""
Preference losses: DPO and Autoregressive DPO (ADPO), their token-weighted forms cDPO and cADPO,
with IPO and SimPO beside them for comparison.

Read this file next to "Autoregressive Direct Preference Optimization" (Oi, Ukai, Kaneko, Okazaki,
Inoue, ICML 2026, arXiv 2602.09533). The whole paper, as code, is one move: DPO sums the log-ratios
*inside* the log-sigmoid, ADPO sums log-sigmoids of segment comparisons *outside* it.

Notation (paper) -> code
    x, y^w, y^l          prompt, chosen (preferred) and rejected response
    log πθ(y_t|x,y_<t)   policy_{chosen,rejected}_logps[b, t]     (B, T),
                                                                  e.g. from model.token_logps
    log πref(y_t|...)    reference_{chosen,rejected}_logps[b, t]  (B, T),
                                                                  from the frozen reference model
    ρ_t(y)               log πθ − log πref of token t             _log_ratios(...),
                                                                  0 off the response
    T = μ(y)             token length of a response               mask.sum(-1)
    z_1 … z_T'           contiguous segments of a response        _segment_ids(mask, family, size)
    S(i)                 Σ_{t ∈ z_i} ρ_t, segment i only          _segment_sums(...), (B, n_seg)
    T' = μ'(y)           feedback length: segments compared       valid.sum(-1),
                                                                  valid from _segment_sums
    β                    inverse temperature                      beta

Batch convention: every input is (B, T), right padded. mask[b, t] is True where column t scores
a response token (its EOS included); the response may start at a different column in every row,
and chosen and rejected have their own masks and lengths. Columns off the mask are never read,
so any value there is harmless.

Every loss returns (losses, chosen_rewards, rejected_rewards), each (B,): the loss of each pair
(the caller takes the mean over pairs; decision: no length normalisation, as the paper shows a
plain sum) and the implicit rewards β·Σ_t ρ_t (detached) for logging. Sums are taken in float32
(float64 inputs stay float64).

Try your own variant: write one function taking the same six tensors and add it to LOSSES at the
bottom; `python train.py --loss NAME` then uses it, filling its extra keyword parameters
(beta, size, gamma, ...) from the config keys of the same name.
"""

import torch
import torch.nn.functional as F

_TENSOR_NAMES = ("policy_chosen_logps", "policy_rejected_logps",
                 "reference_chosen_logps", "reference_rejected_logps",
                 "chosen_mask", "rejected_mask", "chosen_weights", "rejected_weights")


def _validate(beta, *tensors):
    """Clear one-line errors for the usual mistakes: beta <= 0,
    inputs that do not share one (B, T) shape."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    shape = tensors[0].shape
    for name, x in zip(_TENSOR_NAMES, tensors):
        if x is None:
            continue
        if x.dim() != 2:
            raise ValueError(f"{name} must be (B, T), got shape {tuple(x.shape)}")
        if x.shape != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but policy_chosen_logps has "
                             f"{tuple(shape)}; all inputs must share one (B, T)")
        if name.endswith("mask") and x.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor (True on response tokens), "
                             f"got {x.dtype}")


def _float(x):
    """bf16/fp16 -> float32, so that long sums keep their precision;
    float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _log_ratios(policy_logps, reference_logps, mask, weights=None):
    """ρ_t = log πθ(y_t|x,y_<t) − log πref(y_t|x,y_<t), times w_t if given,
    and 0 off the mask: (B, T)."""
    rho = _float(policy_logps) - _float(reference_logps)
    if weights is not None:
        rho = rho * _float(weights)
    # where, not *, so that inf/nan in padding columns cannot leak in
    return torch.where(mask, rho, 0.0)


def _mean_logps(logps, mask, caller, mask_name):
    """(1/|y|) Σ_t log πθ(y_t) per row, (B,);
    a row with no response token is an error, not 0/0 = NaN."""
    lengths = mask.sum(-1)                                                                  # (B,)
    if (lengths == 0).any():
        rows = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(f"{caller}: {mask_name} has no response token in rows {rows}; "
                         f"drop such pairs when building the batch")
    return torch.where(mask, _float(logps), 0.0).sum(-1) / lengths


def _segment_ids(mask, family, size):
    """The segment z_i (0-based i) of every response token, (B, T) long;
    0 off the mask (where ρ is 0).

    t = position within the response = (cumulative count of mask) − 1,
    so each row may start anywhere.
      static, k = size:    i = ⌊t / k⌋             windows of k tokens,
                                                   the last one holds the remainder
      adaptive, m = size:  i = ⌈(t+1)·m / T⌉ − 1
                           i.e. segment i = [⌊i·T/m⌋, ⌊(i+1)·T/m⌋):
                           the extra tokens go to the LAST segments
                           (Figure 1: 9 tokens, m=4 -> 2,2,2,3; not numpy.array_split)
    """
    if family not in ("static", "adaptive"):
        raise ValueError(f"family must be 'static' or 'adaptive', got {family!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an integer >= 1 (window k or segment count m), "
                         f"got {size!r}")
    t = mask.long().cumsum(dim=-1) - 1                   # (B, T)
    if family == "static":
        seg = t // size
    else:
        T = mask.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1) each row's own length
        seg = ((t + 1) * size + T - 1) // T - 1          # ⌈(t+1)·m/T⌉ − 1, in exact integers
    return torch.where(mask, seg, 0)


def feedback_length(chosen_mask, rejected_mask, family, size):
    """T' = μ'(y), the number of segments compared for each pair, (B,) long:
    static ⌈max(T^w, T^l)/k⌉, adaptive m (whatever the lengths; empty segments count)."""
    if family == "static":
        # ⌈max(T^w,T^l)/k⌉
        return -(-torch.maximum(chosen_mask.sum(-1), rejected_mask.sum(-1)) // size)
    return torch.full((chosen_mask.size(0),), size, device=chosen_mask.device)          # m


def _segment_sums(rho_w, rho_l, chosen_mask, rejected_mask, family, size):
    """Segment sums S^w(i), S^l(i), each (B, n_seg), and valid (B, n_seg):
    True for the T' compared segments.

    static:   T' = ⌈max(T^w, T^l)/k⌉ for both sides of a pair;
              past the end of the shorter response S = 0.
    adaptive: T' = m, each response split on its own;
              segments left empty when T < m have S = 0 (decision).
    A valid segment with S^w = S^l = 0 still counts: it adds log σ(0) = −ln 2 to the loss,
    like in the paper.
    Memory is (B, n_seg), never (B, T, n_seg), so m = 256 is cheap.
    """
    B, T = chosen_mask.shape
    ids_w = _segment_ids(chosen_mask, family, size)
    ids_l = _segment_ids(rejected_mask, family, size)
    # ⌈T/k⌉ windows fit any row
    n_seg = -(-T // size) if family == "static" else size
    n_valid = feedback_length(chosen_mask, rejected_mask, family, size)        # (B,) T'
    S_w = rho_w.new_zeros(B, n_seg).scatter_add(1, ids_w, rho_w)               # (B, n_seg)
    S_l = rho_l.new_zeros(B, n_seg).scatter_add(1, ids_l, rho_l)               # (B, n_seg)
    valid = torch.arange(n_seg, device=chosen_mask.device) < n_valid[:, None]  # (B, n_seg)
    return S_w, S_l, valid


def dpo_loss(policy_chosen_logps, policy_rejected_logps,
             reference_chosen_logps, reference_rejected_logps,
             chosen_mask, rejected_mask, beta=0.1):
    """DPO (Rafailov et al. 2023; ADPO paper, Table 1 row 1):
    the whole response is one unit of feedback, μ' ≡ 1.

        L = − log σ( β Σ_t ρ_t(y^w) − β Σ_t ρ_t(y^l) )

    Inputs (B, T), returns (losses, chosen_rewards, rejected_rewards), each (B,).
    Policy == reference: ln 2.
    """
    _validate(beta, policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps,
              chosen_mask, rejected_mask)
    chosen = beta * _log_ratios(policy_chosen_logps, reference_chosen_logps,
                                chosen_mask).sum(-1)                                  # (B,)
    rejected = beta * _log_ratios(policy_rejected_logps, reference_rejected_logps,
                                  rejected_mask).sum(-1)                              # (B,)
    losses = -F.logsigmoid(chosen - rejected)
    return losses, chosen.detach(), rejected.detach()


def adpo_loss(policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps,
              chosen_mask, rejected_mask, beta=0.1, family="static", size=1, segment_mean=False,
              chosen_weights=None, rejected_weights=None):
    """ADPO (Table 1 row 2; the granularity families of Figure 1):
    one Bradley–Terry comparison per segment, the sum moved outside the log-sigmoid:

        L = − Σ_{i=1}^{T'} log σ( β S^w(i) − β S^l(i) ),     S(i) = Σ_{t ∈ z_i} w_t ρ_t

    family="static", size=k: windows of k tokens from the start of each response, the last one
        holding the remainder; T' = ⌈max(T^w, T^l)/k⌉. size=1 is the token-level ADPO of Table 1
        (Table 3, static k=1). Past the end of the shorter response ρ = 0
        ("zero padding", decision). The paper instead pads the shorter response with EOS tokens
        (y_pad in Figure 1): that is done when building the batch (append the EOS tokens to the
        shorter response and mark them in its mask, data.py's preference_batch(eos_pad=True)),
        and this function then scores them like any other token.
    family="adaptive", size=m: each response is split on its own into m segments as evenly as
        possible, the extra tokens in the last segments (boundaries ⌊i·T/m⌋, Figure 1);
        segment i of y^w is compared with segment i of y^l; T' = m. size=1 is DPO exactly;
        the headline ADPO of Table 2 is m=256 (Table 3).
    segment_mean: the mean over the T' segments instead of the sum (decision: the paper shows the
        sum, the default). cDPO's public code computes its loss this way at the token level.
    chosen_weights, rejected_weights: optional (B, T) per-token weights w_t inside the segment sums,
        for cADPO (see cadpo_loss). Rewards stay unweighted (β Σ_t ρ_t).

    Inputs (B, T), returns (losses, chosen_rewards, rejected_rewards), each (B,).
    Policy == reference: T'·ln 2.
    """
    _validate(beta, policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps,
              chosen_mask, rejected_mask, chosen_weights, rejected_weights)
    rho_w = _log_ratios(policy_chosen_logps, reference_chosen_logps,
                        chosen_mask, chosen_weights)                                  # (B, T)
    rho_l = _log_ratios(policy_rejected_logps, reference_rejected_logps,
                        rejected_mask, rejected_weights)
    S_w, S_l, valid = _segment_sums(rho_w, rho_l, chosen_mask, rejected_mask,
                                    family, size)                                     # (B, n_seg)
    losses = -(F.logsigmoid(beta * (S_w - S_l)) * valid).sum(-1)                      # (B,)
    if segment_mean:
        losses = losses / valid.sum(-1).clamp(min=1)                                  # / T'
    chosen = beta * _log_ratios(policy_chosen_logps, reference_chosen_logps,
                                chosen_mask).sum(-1)
    rejected = beta * _log_ratios(policy_rejected_logps, reference_rejected_logps,
                                  rejected_mask).sum(-1)
    return losses, chosen.detach(), rejected.detach()


def cdpo_loss(policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps,
              chosen_mask, rejected_mask, beta=0.1, rejected_weights=None):
    """cDPO ("Critical Tokens Matter", Lin et al., arXiv 2411.19943; the ADPO paper's Table 2):
    DPO whose rejected log-ratios are weighted by how "critical" each token is,

        L = − log σ( β Σ_t ρ_t(y^w) − β Σ_t w_t ρ_t(y^l) ),   w_t = 1 − p_t

    with p_t = softmax(2·z⁺_t − z⁻_t)[y_t] from two fine-tuned copies of the model, on correct
    (z⁺) and on incorrect (z⁻) samples: contrastive_weights below. A token the "negative" model
    prefers much more than the "positive" one has p_t ≈ 0, so w_t ≈ 1: pushed down at full weight.

    decision: this is ADPO with adaptive m = 1 and the weights (the form of the paper's
    equations; cadpo_loss with m = 1 computes the same up to float rounding). cDPO's public code
    instead applies the log-sigmoid at every token position and averages: adpo_loss(family=
    "static", size=1, segment_mean=True) with zero padding and the weights; train.py reaches it
    with --loss cadpo --family static --size 1 --segment_mean true --eos_pad false.
    With all weights 1 this is DPO exactly. Rewards stay unweighted (β Σ_t ρ_t).
    """
    _validate(beta, policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps,
              chosen_mask, rejected_mask, None, rejected_weights)
    chosen = beta * _log_ratios(policy_chosen_logps, reference_chosen_logps,
                                chosen_mask).sum(-1)                                  # (B,)
    weighted = beta * _log_ratios(policy_rejected_logps, reference_rejected_logps,
                                  rejected_mask, rejected_weights).sum(-1)            # (B,)
    losses = -F.logsigmoid(chosen - weighted)
    rejected = beta * _log_ratios(policy_rejected_logps, reference_rejected_logps,
                                  rejected_mask).sum(-1)
    return losses, chosen.detach(), rejected.detach()


def cadpo_loss(policy_chosen_logps, policy_rejected_logps,
               reference_chosen_logps, reference_rejected_logps,
               chosen_mask, rejected_mask, beta=0.1, family="adaptive", size=256,
               segment_mean=False, rejected_weights=None):
    """cADPO (Table 2): ADPO with cDPO's token weights inside each segment sum,

        L = − Σ_{i=1}^{T'} log σ( β S^w(i) − β S^l(i) ),   S^l(i) = Σ_{t ∈ z_i} w_t ρ_t(y^l)

    decision: the paper does not print its formula; the weights multiply the log-ratios inside
    the segment sums, with the granularity machinery of adpo_loss (the paper's headline row is
    adaptive m = 256, the defaults here). cDPO is this with adaptive m = 1. With all weights 1
    this is ADPO exactly.
    """
    return adpo_loss(policy_chosen_logps, policy_rejected_logps,
                     reference_chosen_logps, reference_rejected_logps,
                     chosen_mask, rejected_mask, beta=beta, family=family, size=size,
                     segment_mean=segment_mean, rejected_weights=rejected_weights)


def contrastive_weights(positive_logits, negative_logits, targets):
    """cDPO's token weights by contrastive estimation: w_t = 1 − softmax(2·z⁺ − z⁻)[y_t], where
    z⁺, z⁻ are the logits of the positive and the negative model at the position that predicts
    token y_t. Logits (B, T, V), targets (B, T) -> weights (B, T) in [0, 1] (float32)."""
    scores = torch.log_softmax(2 * positive_logits.float() - negative_logits.float(), dim=-1)
    p = scores.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).exp()  # (B, T)
    return 1 - p


def ipo_loss(policy_chosen_logps, policy_rejected_logps,
             reference_chosen_logps, reference_rejected_logps,
             chosen_mask, rejected_mask, beta=0.1):
    """IPO (Azar et al. 2023, arXiv 2310.12036), a squared loss on the same margin,
    with β as IPO's τ:

        L = ( h − 1/(2β) )²,     h = Σ_t ρ_t(y^w) − Σ_t ρ_t(y^l)

    Inputs (B, T), returns (losses, chosen_rewards, rejected_rewards), each (B,);
    rewards are β Σ_t ρ_t.
    """
    _validate(beta, policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps,
              chosen_mask, rejected_mask)
    chosen = _log_ratios(policy_chosen_logps, reference_chosen_logps,
                         chosen_mask).sum(-1)                                         # (B,)
    rejected = _log_ratios(policy_rejected_logps, reference_rejected_logps,
                           rejected_mask).sum(-1)                                     # (B,)
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return losses, beta * chosen.detach(), beta * rejected.detach()


def simpo_loss(policy_chosen_logps, policy_rejected_logps,
               reference_chosen_logps, reference_rejected_logps,
               chosen_mask, rejected_mask, beta=2.0, gamma=0.5):
    """SimPO (Meng et al. 2024, arXiv 2405.14734), reference-free:
    length-averaged log-probs and a margin γ.

        L = − log σ( β/|y^w| Σ_t log πθ(y^w_t) − β/|y^l| Σ_t log πθ(y^l_t) − γ )

    The reference arguments are accepted (same call as every loss) and ignored.
    Returns (losses, chosen_rewards, rejected_rewards), each (B,), with SimPO's own rewards
    β/|y|·Σ_t log πθ. An empty response raises.
    """
    _validate(beta, policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps,
              chosen_mask, rejected_mask)
    chosen = beta * _mean_logps(policy_chosen_logps, chosen_mask,
                                "simpo_loss", "chosen_mask")                          # (B,)
    rejected = beta * _mean_logps(policy_rejected_logps, rejected_mask,
                                  "simpo_loss", "rejected_mask")                      # (B,)
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses, chosen.detach(), rejected.detach()


def chosen_nll(policy_chosen_logps, chosen_mask):
    """Mean negative log-likelihood per token of the chosen response, (B,):
    −(1/|y^w|) Σ_t log πθ(y^w_t).

    The SFT term train.py adds with weight λ: DPO-style losses can push the chosen log-prob down
    as long as the margin grows; this term keeps the preferred output's absolute probability rising
    (the simplest form of "stable preference optimisation", Jian et al. 2025, arXiv 2507.07723).
    """
    return -_mean_logps(policy_chosen_logps, chosen_mask, "chosen_nll", "chosen_mask")


@torch.no_grad()
def preference_metrics(policy_chosen_logps, policy_rejected_logps,
                       reference_chosen_logps, reference_rejected_logps,
                       chosen_mask, rejected_mask, beta=0.1, family="static", size=1):
    """The numbers every DPO user reads, as 0-dim tensors averaged over the B pairs:

    rewards/chosen, rewards/rejected   mean implicit reward β Σ_t ρ_t of each side
    rewards/accuracy                   fraction of pairs with chosen reward > rejected reward
                                       (strictly)
    rewards/margin                     mean of chosen − rejected reward
    logps/chosen, logps/rejected       mean summed policy log-prob Σ_t log πθ(y_t)
    segments/win_rate                  per pair, the fraction of its T' compared ADPO segments
                                       (family, size) where S^w > S^l; then the mean over pairs

    Every number is a mean over pairs, so that a batch split into parts (micro-batches, ranks)
    gives the same numbers as a whole: the means of the parts weighted by their pair counts.
    Ties count as wrong (strict >, as TRL counts them), so at step 0 (policy == reference, every
    ρ is exactly 0) accuracy and win rate are 0, the margin is 0 and the loss is ln 2 (DPO) or
    T'·ln 2 (ADPO) per pair: expected, not a bug. Observed in training: exactly so on a CPU in
    float32 without dropout; under bf16/fp16 autocast, on a GPU or with dropout, the policy's
    forward and the precomputed reference differ by float noise (margins ~1e-7), which tips some
    ties either way: step 1 may log an accuracy of 0.1-0.25 with margins near 0. No tolerance is
    applied (decision: the metric stays TRL's).
    """
    _validate(beta, policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps,
              chosen_mask, rejected_mask)
    rho_w = _log_ratios(policy_chosen_logps, reference_chosen_logps, chosen_mask)      # (B, T)
    rho_l = _log_ratios(policy_rejected_logps, reference_rejected_logps, rejected_mask)
    chosen, rejected = beta * rho_w.sum(-1), beta * rho_l.sum(-1)                        # (B,)
    S_w, S_l, valid = _segment_sums(rho_w, rho_l, chosen_mask, rejected_mask, family, size)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracy": (chosen > rejected).float().mean(),
        "rewards/margin": (chosen - rejected).mean(),
        "logps/chosen": torch.where(chosen_mask, _float(policy_chosen_logps), 0.0).sum(-1).mean(),
        "logps/rejected":
            torch.where(rejected_mask, _float(policy_rejected_logps), 0.0).sum(-1).mean(),
        "segments/win_rate": (((S_w > S_l) & valid).sum(-1) / valid.sum(-1).clamp(min=1)).mean(),
    }


# train.py --loss NAME looks the loss up here; add your own variant with one line.
LOSSES = {"dpo": dpo_loss, "adpo": adpo_loss, "ipo": ipo_loss, "simpo": simpo_loss,
          "cdpo": cdpo_loss, "cadpo": cadpo_loss}
# the losses that take cDPO's contrastive token weights (train.py computes them first)
WEIGHTED = ("cdpo", "cadpo")
# the losses with a granularity (family, size): ADPO's segments
SEGMENTED = ("adpo", "cadpo")


def eos_padded(loss, family, eos_pad=True):
    """Whether the pairs of this loss are EOS-padded: the paper pads the shorter response of a pair
    with EOS tokens (y_pad in Figure 1) for the static family only, ADPO's and cADPO's (ADPO with
    token weights); --eos_pad false turns it off. The batch builder does the padding
    (data.preference_batch(eos_pad=True)); every loss then scores those tokens like any other."""
    return eos_pad and loss in SEGMENTED and family == "static"
