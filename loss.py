"""
Preference losses: DPO and Autoregressive DPO (ADPO), their token-weighted forms cDPO and cADPO,
and the DPO family a researcher compares them with (IPO, SimPO and TRL's loss types), each of the
pairwise ones at every granularity; and two that keep the preferred answer likely, DPO-Positive
and a term for any loss after Stable Preference Optimization (reconstructed: spo_loss says how).

Read this file next to "Autoregressive Direct Preference Optimization" (Oi, Ukai, Kaneko, Okazaki,
Inoue, ICML 2026, arXiv 2602.09533). The whole paper, as code, is one move: DPO sums the log-ratios
*inside* the log-sigmoid, ADPO sums log-sigmoids of segment comparisons *outside* it. `pairwise`
below makes the same move for any loss of a pair's summed log-ratios (hinge, IPO, robust, ...).

Notation (paper) -> code
    x, y^w, y^l          prompt, chosen (preferred) and rejected response
    log πθ(y_t|x,y_<t)   policy_{chosen,rejected}_logps[b, t]     (B, T),
                                                                  from model(idx, targets)
    log πref(y_t|...)    reference_{chosen,rejected}_logps[b, t]  (B, T),
                                                                  from the frozen reference model
    ρ_t(y)               log πθ − log πref of token t             _log_ratios(...),
                                                                  0 off the response
    h(y)                 Σ_t ρ_t, the summed log-ratio            TRL's chosen/rejected_logratios
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

Try your own variant: write one function taking the same six tensors (or, for a loss of the
summed log-ratios, one of (h_w, h_l) under @pairwise) and add it to LOSSES at the bottom;
`python train.py --loss NAME` then uses it, filling its extra keyword parameters
(beta, size, gamma, ...) from the config keys of the same name. (What --loss may name, terms
joined by + and NAME:FAMILY:SIZE, is parsed in machinery/config.py.)
"""

import functools
import inspect
import math

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


def _rewards(beta, policy_chosen_logps, policy_rejected_logps,
             reference_chosen_logps, reference_rejected_logps, chosen_mask, rejected_mask):
    """The logged rewards β Σ_t ρ_t of the chosen and the rejected responses, (B,) each, out of
    the graph: the rewards a loss reports beside its value."""
    chosen = _log_ratios(policy_chosen_logps, reference_chosen_logps, chosen_mask).sum(-1)
    rejected = _log_ratios(policy_rejected_logps, reference_rejected_logps, rejected_mask).sum(-1)
    return beta * chosen.detach(), beta * rejected.detach()


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
    if n_seg == 1:  # one segment holds every token: the plain sum, so that adaptive m = 1 is
        # the response-level loss bit for bit (scatter_add would add in another order)
        S_w, S_l = rho_w.sum(-1, keepdim=True), rho_l.sum(-1, keepdim=True)   # (B, 1)
    else:
        S_w = rho_w.new_zeros(B, n_seg).scatter_add(1, ids_w, rho_w)           # (B, n_seg)
        S_l = rho_l.new_zeros(B, n_seg).scatter_add(1, ids_l, rho_l)           # (B, n_seg)
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
    h_w = _log_ratios(policy_chosen_logps, reference_chosen_logps, chosen_mask).sum(-1)  # (B,)
    h_l = _log_ratios(policy_rejected_logps, reference_rejected_logps, rejected_mask).sum(-1)
    losses = -F.logsigmoid(beta * (h_w - h_l))  # (the form of adpo_loss's, m = 1: same bits)
    return losses, beta * h_w.detach(), beta * h_l.detach()


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
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps,
                              chosen_mask, rejected_mask))


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
    equations; cadpo_loss with m = 1 computes the same, bit for bit). cDPO's public code
    instead applies the log-sigmoid at every token position and averages: adpo_loss(family=
    "static", size=1, segment_mean=True) with zero padding and the weights; train.py reaches it
    with --loss cadpo --family static --size 1 --segment_mean true --eos_pad false.
    With all weights 1 this is DPO exactly. Rewards stay unweighted (β Σ_t ρ_t).
    """
    _validate(beta, policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps,
              chosen_mask, rejected_mask, None, rejected_weights)
    h_w = _log_ratios(policy_chosen_logps, reference_chosen_logps, chosen_mask).sum(-1)  # (B,)
    weighted = _log_ratios(policy_rejected_logps, reference_rejected_logps,
                           rejected_mask, rejected_weights).sum(-1)                   # (B,)
    losses = -F.logsigmoid(beta * (h_w - weighted))
    h_l = _log_ratios(policy_rejected_logps, reference_rejected_logps, rejected_mask).sum(-1)
    return losses, beta * h_w.detach(), beta * h_l.detach()


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


# -----------------------------------------------------------------------------
# the DPO family at every granularity: ADPO's move, for any loss of the summed log-ratios

# the signature @pairwise gives its losses, which train.py's loss_options reads: the six tensors,
# then the keyword parameters of ℓ (beta, label_smoothing, ...), then family and size
_KW = inspect.Parameter.KEYWORD_ONLY
_SIX = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for name in _TENSOR_NAMES[:6]]
_GRANULARITY = [inspect.Parameter("family", _KW, default=None),
                inspect.Parameter("size", _KW, default=1)]


def _require(ok, message):
    if not ok:
        raise ValueError(message)


def pairwise(compare):
    """ADPO's move for any loss ℓ of a pair's summed log-ratios h = Σ_t ρ_t: the six-tensor loss

        family=None (default)   L = ℓ( h(y^w), h(y^l) )                  the whole responses
        family, size            L = Σ_{i=1}^{T'} ℓ( S^w(i), S^l(i) )     ADPO's segments

    compare(h_w, h_l, beta, ...) is ℓ on (B, n) summed log-ratios (n = 1 for whole responses,
    n_seg for segments); its keyword parameters become the loss's, beside family and size,
    which are adpo_loss's (static windows of k tokens, or adaptive m segments; the static
    family's EOS padding is the batch builder's, see eos_padded). adaptive m = 1 is the
    response-level loss bit for bit.
    decision: outside DPO the segment form is an extension the paper does not derive: it makes
    ADPO's one move (the sum over segments outside the per-comparison loss) with another ℓ;
    the rewards stay β·h of the whole responses.
    Inputs (B, T), returns (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    beta_default = inspect.signature(compare).parameters["beta"].default

    def loss(policy_chosen_logps, policy_rejected_logps,
             reference_chosen_logps, reference_rejected_logps,
             chosen_mask, rejected_mask, *, family=None, size=1, **options):
        beta = options.get("beta", beta_default)
        _validate(beta, policy_chosen_logps, policy_rejected_logps,
                  reference_chosen_logps, reference_rejected_logps, chosen_mask, rejected_mask)
        rho_w = _log_ratios(policy_chosen_logps, reference_chosen_logps, chosen_mask)   # (B, T)
        rho_l = _log_ratios(policy_rejected_logps, reference_rejected_logps, rejected_mask)
        if family is None:  # the whole responses: one comparison per pair
            h_w, h_l = rho_w.sum(-1, keepdim=True), rho_l.sum(-1, keepdim=True)        # (B, 1)
            valid = torch.ones_like(h_w, dtype=torch.bool)
        else:               # ADPO's segments, T' of them compared
            h_w, h_l, valid = _segment_sums(rho_w, rho_l, chosen_mask, rejected_mask,
                                            family, size)                              # (B, n)
        losses = torch.where(valid, compare(h_w, h_l, **options), 0.0).sum(-1)         # (B,)
        return losses, beta * rho_w.sum(-1).detach(), beta * rho_l.sum(-1).detach()

    functools.update_wrapper(loss, compare)
    own = list(inspect.signature(compare).parameters.values())[2:]  # beta, its hyperparameters
    loss.__signature__ = inspect.Signature(
        _SIX + [p.replace(kind=_KW) for p in own] + _GRANULARITY)
    return loss


@pairwise
def ipo_loss(h_w, h_l, beta=0.1):
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17; TRL "ipo"), a squared loss on the same
    margin, with β as IPO's τ:

        ℓ = ( h^w − h^l − 1/(2β) )²

    decision: the sums h, as Eq. 17 prints them and as every loss here takes them. TRL first
    divides each h by its response's token count (its code says the IPO authors ran it so); that
    form is this loss on the log-ratios ρ_t / |y| (how the tests check it against TRL).
    """
    return (h_w - h_l - 1 / (2 * beta)) ** 2


@pairwise
def hinge_loss(h_w, h_l, beta=0.1):
    """SLiC's hinge loss (Zhao et al. 2023, "SLiC-HF", arXiv 2305.10425; TRL "hinge") on the
    log-ratios, 1/β the margin (SLiC itself compares log πθ without a reference):

        ℓ = max(0, 1 − β (h^w − h^l))
    """
    return F.relu(1 - beta * (h_w - h_l))


@pairwise
def robust_loss(h_w, h_l, beta=0.1, label_smoothing=0.0):
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv 2403.00409; TRL "robust"):
    DPO made unbiased for preference labels flipped with probability ε = label_smoothing,

        ℓ = [ −(1 − ε) log σ(β(h^w − h^l)) + ε log σ(−β(h^w − h^l)) ] / (1 − 2ε),   0 ≤ ε < ½

    ε = 0 is DPO (the paper's typical ε is 0.1).
    """
    _require(0 <= label_smoothing < 0.5,
             f"robust: label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    x = beta * (h_w - h_l)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


@pairwise
def exo_pair_loss(h_w, h_l, beta=0.1, label_smoothing=1e-3):
    """EXO (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    arXiv 2402.00856, Eq. 16 with K = 2; TRL "exo_pair"): the KL divergence from the policy's
    preference q = σ(±β(h^w − h^l)) to the labels smoothed by ε = label_smoothing > 0,

        ℓ = q_w (log q_w − log(1 − ε)) + q_l (log q_l − log ε)

    Policy == reference: ½ log(1 / (4ε(1 − ε))) per comparison (EXO's ε is 1e-3).
    """
    _require(0 < label_smoothing < 0.5,
             f"exo_pair: label_smoothing must be in (0, 0.5), got {label_smoothing!r} "
             f"(EXO's ε; the paper uses 1e-3)")
    x = beta * (h_w - h_l)
    chosen = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-label_smoothing))
    return chosen + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(label_smoothing))


@pairwise
def nca_pair_loss(h_w, h_l, beta=0.1):
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", arXiv 2402.05369; TRL "nca_pair"): each response's own reward βh classified against
    the reference, the chosen one as data, so that its likelihood rises in absolute terms:

        ℓ = − log σ(β h^w) − ½ log σ(−β h^w) − ½ log σ(−β h^l)
    """
    return (-F.logsigmoid(beta * h_w) - 0.5 * F.logsigmoid(-beta * h_w)
            - 0.5 * F.logsigmoid(-beta * h_l))


@pairwise
def sppo_hard_loss(h_w, h_l, beta=0.1):
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization", arXiv
    2405.00675, Eq. 4.7 with P = 1 for the winner and 0 for the loser; TRL "sppo_hard"): each
    summed log-ratio regressed onto ±1/(2β) on its own,

        ℓ = ( h^w − 1/(2β) )² + ( h^l + 1/(2β) )²
    """
    return (h_w - 1 / (2 * beta)) ** 2 + (h_l + 1 / (2 * beta)) ** 2


@pairwise
def apo_zero_loss(h_w, h_l, beta=0.1):
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", arXiv 2408.06266, Eq. 7; TRL "apo_zero"): the chosen likelihood up and the
    rejected one down, each anchored at the reference (chosen outputs better than the model's):

        ℓ = 1 − σ(β h^w) + σ(β h^l)
    """
    return 1 - torch.sigmoid(beta * h_w) + torch.sigmoid(beta * h_l)


@pairwise
def apo_down_loss(h_w, h_l, beta=0.1):
    """APO-down (the same paper, Eq. 8; TRL "apo_down"): both likelihoods down, the rejected one
    more (chosen outputs worse than the model's own):

        ℓ = σ(β h^w) + 1 − σ(β (h^w − h^l))
    """
    return torch.sigmoid(beta * h_w) + 1 - torch.sigmoid(beta * (h_w - h_l))


@pairwise
def discopop_loss(h_w, h_l, beta=0.1, discopop_tau=0.05):
    """DiscoPOP (Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for
    Large Language Models", arXiv 2406.08414, Eq. 5, its log-ratio modulated loss; TRL
    "discopop"): with x = β(h^w − h^l), the logistic and the exponential loss blended by σ(x/τ),

        ℓ = (1 − σ(x/τ)) · (− log σ(x)) + σ(x/τ) · e^{−x},     τ = discopop_tau

    decision: σ(x/τ)·e^{−x} is computed as exp(log σ(x/τ) − x): the same number, and 0 where
    TRL's product is ∞·0 = NaN (a very negative x).
    """
    _require(discopop_tau > 0, f"discopop: discopop_tau must be > 0, got {discopop_tau!r}")
    x = beta * (h_w - h_l)
    logistic = -F.logsigmoid(x) * (1 - torch.sigmoid(x / discopop_tau))
    return logistic + torch.exp(F.logsigmoid(x / discopop_tau) - x)


@pairwise
def dpop_loss(h_w, h_l, beta=0.1, dpop_lambda=50.0):
    """DPO-Positive (Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation
    with DPO-Positive", arXiv 2402.13228, Eq. 3 with the brackets of its July 2024 revision): DPO
    whose margin loses λ times how much less likely the policy makes the preferred response than
    the reference did,

        ℓ = − log σ( β [ h^w − h^l − λ · max(0, −h^w) ] ),      λ = dpop_lambda ≥ 0

    max(0, −h^w) = max(0, log πref(y^w)/πθ(y^w)) is 0 while the policy keeps y^w at least as
    likely as the reference, so DPOP is DPO there; λ = 0 is DPO everywhere. λ = 50, the paper's
    (as its implementers quote it); its authors later found results insensitive to λ in [5, 500].
    decision: at a granularity the penalty is per segment, max(0, −S^w(i)) inside segment i's
    log-sigmoid: each segment of y^w is kept from falling below the reference. The paper's
    failure is local (after the one token where a low-edit-distance pair differs, the preferred
    tokens lose probability), and the sum of the whole response can hide it.
    """
    _require(dpop_lambda >= 0, f"dpop: dpop_lambda must be >= 0, got {dpop_lambda!r}")
    return -F.logsigmoid(beta * (h_w - h_l - dpop_lambda * F.relu(-h_w)))


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


# -----------------------------------------------------------------------------
# response-level only: losses that are not functions of the summed log-ratios alone


def sigmoid_norm_loss(policy_chosen_logps, policy_rejected_logps,
                      reference_chosen_logps, reference_rejected_logps,
                      chosen_mask, rejected_mask, beta=0.1):
    """Length-normalised DPO (TRL "sigmoid_norm"; the DPO of Tülu 3, Lambert et al. 2024,
    arXiv 2411.15124): DPO on the mean log-ratio per token,

        L = − log σ( β h(y^w)/|y^w| − β h(y^l)/|y^l| )

    No granularity: a per-token average and a split into segments are two answers to the same
    length question. Returns (losses, chosen_rewards, rejected_rewards), each (B,), rewards
    β Σ_t ρ_t. An empty response raises.
    """
    _validate(beta, policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps, chosen_mask, rejected_mask)
    rho_w = _float(policy_chosen_logps) - _float(reference_chosen_logps)               # (B, T)
    rho_l = _float(policy_rejected_logps) - _float(reference_rejected_logps)
    mean_w = _mean_logps(rho_w, chosen_mask, "sigmoid_norm_loss", "chosen_mask")        # (B,)
    mean_l = _mean_logps(rho_l, rejected_mask, "sigmoid_norm_loss", "rejected_mask")
    losses = -F.logsigmoid(beta * (mean_w - mean_l))
    chosen = beta * torch.where(chosen_mask, rho_w, 0.0).sum(-1)
    rejected = beta * torch.where(rejected_mask, rho_l, 0.0).sum(-1)
    return losses, chosen.detach(), rejected.detach()


def bco_pair_loss(policy_chosen_logps, policy_rejected_logps,
                  reference_chosen_logps, reference_rejected_logps,
                  chosen_mask, rejected_mask, beta=0.1, delta=0.0):
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", arXiv 2404.04656; TRL "bco_pair"): a binary classifier whose logit is the reward
    βh shifted by δ, the chosen response the positive class and the rejected one the negative,

        L = − log σ( β h(y^w) − δ ) − log σ( −(β h(y^l) − δ) )

    δ (delta) is BCO's reward shift, the running mean of the rewards trained on so far: state
    that lives across steps, so the caller holds it and passes it in (train.py's RewardMean);
    nothing is hidden in here. TRL 1.16 drops the shift (δ = 0, the default here).
    No granularity: δ is a mean of whole-response rewards. Returns (losses, chosen_rewards,
    rejected_rewards), each (B,).
    """
    _validate(beta, policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps, chosen_mask, rejected_mask)
    chosen = beta * _log_ratios(policy_chosen_logps, reference_chosen_logps,
                                chosen_mask).sum(-1)                                  # (B,)
    rejected = beta * _log_ratios(policy_rejected_logps, reference_rejected_logps,
                                  rejected_mask).sum(-1)                              # (B,)
    losses = -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))
    return losses, chosen.detach(), rejected.detach()


def sft_loss(policy_chosen_logps, policy_rejected_logps,
             reference_chosen_logps, reference_rejected_logps,
             chosen_mask, rejected_mask, beta=0.1):
    """The SFT term of a combination (TRL "sft"): the chosen response's mean NLL per token,
    chosen_nll. RPO is dpo+sft (Pang et al. 2024, "Iterative Reasoning Preference Optimization",
    arXiv 2404.19733), MPO is 0.8·dpo + 0.2·bco_pair + sft (Wang et al. 2024, arXiv 2411.10442).

        L = −(1/|y^w|) Σ_t log πθ(y^w_t)

    decision: a mean per pair, so that the caller's mean over pairs holds for every term; TRL's is
    one token mean over the whole batch (the same number when the chosen responses have equal
    lengths). No granularity. β only scales the logged rewards β Σ_t ρ_t.
    """
    _validate(beta, policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps, chosen_mask, rejected_mask)
    losses = -_mean_logps(policy_chosen_logps, chosen_mask, "sft_loss", "chosen_mask")
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps,
                              chosen_mask, rejected_mask))


def spo_loss(policy_chosen_logps, policy_rejected_logps,
             reference_chosen_logps, reference_rejected_logps,
             chosen_mask, rejected_mask, beta=0.1):
    """Stable Preference Optimization's penalty as a term of any loss (Jian, Yang, Ouyang, Ye
    2025, arXiv 2507.07723): simpo+spo, adpo+spo, dpo+spo, and dpo+2spo in --compare.
    RECONSTRUCTED from the paper's abstract and structure: its own equation is in no text we
    have. The NLL of the preferred response in excess of the reference's, where there is any:

        L = max(0, NLL_θ(y^w) − NLL_ref(y^w)) = max(0, −Σ_t ρ_t(y^w))

    The bilevel problem puts preference optimisation above and SFT below; the SFT model (the
    reference) solves the lower level, so its value-function penalty λ·[L_SFT(θ) − min L_SFT]
    is, per pair, this excess. 0 with a zero gradient while the policy keeps y^w at least as
    likely as the reference; below it, a push of λ however large the margin. λ is the term's
    weight (--loss_weights; dpo+2spo is λ = 2): the one way a term is scaled.
    decision: the NLL summed over tokens, log πθ(y^w), the abstract's "absolute probability",
    not a per-token mean: the same zero set, but every token of a fallen y^w is pushed with λ,
    on the scale of DPO's β·σ(·), where the mean's push would shrink as 1/|y^w|.
    If the paper's regulariser differs (a mean, a margin, a square, the penalty inside the
    log-sigmoid as in dpop_loss), this function changes; the term and its weight stay.
    No granularity. β only scales the logged rewards β Σ_t ρ_t.
    """
    _validate(beta, policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps, chosen_mask, rejected_mask)
    h_w = _log_ratios(policy_chosen_logps, reference_chosen_logps, chosen_mask).sum(-1)  # (B,)
    losses = F.relu(-h_w)  # (relu's gradient at 0 is 0: none while y^w is as likely as before)
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps,
                              chosen_mask, rejected_mask))


# -----------------------------------------------------------------------------
# length desensitisation and pair weights: the caller applies them around any loss


def ld_desensitised(policy_chosen_logps, policy_rejected_logps,
                    reference_chosen_logps, reference_rejected_logps,
                    chosen_mask, rejected_mask, ld_alpha=1.0):
    """LD-DPO (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization", arXiv
    2409.06411; TRL ld_alpha): the six inputs, the log-probs of every token past the first
    l = min(T^w, T^l) of its response (policy and reference alike) multiplied by α, so that
    every loss of the log-ratios sees

        log π(y) = Σ_{t ≤ l} log π(y_t) + α Σ_{t > l} log π(y_t),       and ρ_t likewise

    α = 1 changes nothing, α = 0 drops the longer response's excess. The static family's EOS
    padding gives both responses one length: α then changes nothing either.
    """
    _require(0 <= ld_alpha <= 1, f"ld_alpha must be in [0, 1], got {ld_alpha!r}")
    shared = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1))[:, None]         # (B, 1) l
    tail_w = chosen_mask & (chosen_mask.long().cumsum(-1) > shared)                      # (B, T)
    tail_l = rejected_mask & (rejected_mask.long().cumsum(-1) > shared)
    logps = (policy_chosen_logps, policy_rejected_logps,
             reference_chosen_logps, reference_rejected_logps)
    tails = (tail_w, tail_l, tail_w, tail_l)
    scaled = [torch.where(tail, ld_alpha * _float(x), x) for x, tail in zip(logps, tails)]
    return (*scaled, chosen_mask, rejected_mask)


@torch.no_grad()
def wpo_weights(policy_chosen_logps, policy_rejected_logps, chosen_mask, rejected_mask):
    """WPO's pair weights (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization", arXiv 2406.11827; TRL use_weighting): how likely the current policy is to
    produce the pair, each response's probability normalised by its length, detached, (B,):

        w = exp( (1/|y^w|) Σ_t log πθ(y^w_t) ) · exp( (1/|y^l|) Σ_t log πθ(y^l_t) )

    The caller multiplies the per-pair loss of every term by w. decision: without WPO's weight
    alignment (TRL subtracts log Σ_v πθ(v)² at each token, which needs the whole distribution over
    the vocabulary; model(idx, targets) returns the log-probs of the targets only). TRL's code
    with that term set to 0 computes exactly this.
    """
    mean_w = _mean_logps(policy_chosen_logps, chosen_mask, "wpo_weights", "chosen_mask")
    mean_l = _mean_logps(policy_rejected_logps, rejected_mask, "wpo_weights", "rejected_mask")
    return torch.exp(mean_w + mean_l)


def chosen_nll(policy_chosen_logps, chosen_mask):
    """Mean negative log-likelihood per token of the chosen response, (B,):
    −(1/|y^w|) Σ_t log πθ(y^w_t).

    The SFT term train.py adds with weight λ: DPO-style losses can push the chosen log-prob down
    as long as the margin grows; this term keeps the preferred output's absolute probability rising
    (always, where spo_loss and dpop_loss act only once it falls below the reference's).
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
    logps/chosen_vs_ref                mean Σ_t ρ_t(y^w): how far the policy moved the preferred
                                       response's log-likelihood from the reference's; below 0,
                                       y^w became less likely (what dpop and spo act on)
    logps/chosen_vs_ref_per_token      the same per token, mean (1/|y^w|) Σ_t ρ_t(y^w)
    segments/win_rate                  per pair, the fraction of its T' compared ADPO segments
                                       (family, size) where S^w > S^l; then the mean over pairs

    Every number is a mean over pairs, so that a batch split into parts (micro-batches, ranks)
    gives the same numbers as a whole: the means of the parts weighted by their pair counts.
    Ties count as wrong (strict >, as TRL counts them), so at step 0 (policy == reference, every
    ρ is exactly 0) accuracy and win rate are 0, the margin and chosen_vs_ref are 0 and the loss
    is ln 2 (DPO) or T'·ln 2 (ADPO) per pair: expected, not a bug. Observed in training: exactly
    so on a CPU in float32 without dropout; under bf16/fp16 autocast, on a GPU or with dropout,
    the policy's forward and the precomputed reference differ by float noise (margins ~1e-7),
    which tips some ties either way: step 1 may log an accuracy of 0.1-0.25 with margins near 0.
    No tolerance is applied (decision: the metric stays TRL's).
    """
    _validate(beta, policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps,
              chosen_mask, rejected_mask)
    rho_w = _log_ratios(policy_chosen_logps, reference_chosen_logps, chosen_mask)      # (B, T)
    rho_l = _log_ratios(policy_rejected_logps, reference_rejected_logps, rejected_mask)
    chosen, rejected = beta * rho_w.sum(-1), beta * rho_l.sum(-1)                        # (B,)
    length_w = chosen_mask.sum(-1).clamp(min=1)                                          # (B,)
    S_w, S_l, valid = _segment_sums(rho_w, rho_l, chosen_mask, rejected_mask, family, size)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracy": (chosen > rejected).float().mean(),
        "rewards/margin": (chosen - rejected).mean(),
        "logps/chosen": torch.where(chosen_mask, _float(policy_chosen_logps), 0.0).sum(-1).mean(),
        "logps/rejected":
            torch.where(rejected_mask, _float(policy_rejected_logps), 0.0).sum(-1).mean(),
        "logps/chosen_vs_ref": rho_w.sum(-1).mean(),
        "logps/chosen_vs_ref_per_token": (rho_w.sum(-1) / length_w).mean(),
        "segments/win_rate": (((S_w > S_l) & valid).sum(-1) / valid.sum(-1).clamp(min=1)).mean(),
    }


# train.py --loss NAME looks the loss up here; add your own variant with one line.
LOSSES = {"dpo": dpo_loss, "adpo": adpo_loss, "ipo": ipo_loss, "simpo": simpo_loss,
          "cdpo": cdpo_loss, "cadpo": cadpo_loss,
          # TRL's loss types under TRL's names (its "sigmoid" is dpo)
          "hinge": hinge_loss, "robust": robust_loss, "exo_pair": exo_pair_loss,
          "nca_pair": nca_pair_loss, "bco_pair": bco_pair_loss, "sppo_hard": sppo_hard_loss,
          "apo_zero": apo_zero_loss, "apo_down": apo_down_loss, "discopop": discopop_loss,
          "sigmoid_norm": sigmoid_norm_loss, "sft": sft_loss,
          # keeping the preferred answer likely: DPO-Positive, and SPO's penalty as a term
          "dpop": dpop_loss, "spo": spo_loss}
# the losses that take cDPO's contrastive token weights (train.py computes them first)
WEIGHTED = ("cdpo", "cadpo")
# the losses whose name alone takes --family/--size: ADPO's segments
SEGMENTED = ("adpo", "cadpo")
# the losses without a granularity, and why (every other one takes family and size)
NO_GRANULARITY = {
    "dpo": "DPO at a granularity is ADPO: adpo:FAMILY:SIZE",
    "cdpo": "cDPO at a granularity is cADPO: cadpo:FAMILY:SIZE",
    "simpo": "reference-free and length-averaged, not a function of the summed log-ratios",
    "sigmoid_norm": "length-averaged, not a function of the summed log-ratios",
    "bco_pair": "its shift δ is a running mean of whole-response rewards",
    "sft": "the chosen response's NLL compares nothing",
    "spo": "a penalty on the chosen response's whole NLL, the bilevel problem's SFT level",
}
# the losses of the policy's log-probs alone: LD-DPO's desensitisation leaves them as they are
REFERENCE_FREE = ("simpo", "sft")

