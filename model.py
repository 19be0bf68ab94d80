"""
GPT-2 in one file, for preference optimisation, and the small members of the Llama family
(Llama-3.x, Qwen2.5, Qwen3, DeepSeek-Math) and Gemma-3 as a handful of switches on the same blocks.

Read top to bottom: config, the three modules of a transformer block, the GPT itself: forward
(logits, or the per-token log-probabilities every loss uses), generation with a KV cache, and the
optimizer and FLOP helpers. Loading and saving live elsewhere: our checkpoints and load_model in
checkpoint.py, Hugging Face's names and files in hf.py.

    logits = model(idx)            # (B, T, V)
    logps = model(idx, targets)    # (B, T) float32: log p(targets[:, t] | idx[:, :t+1])

What the Llama family changes, each written down where it happens:
    LayerNorm -> RMSNorm                      norm()
    learned positions (wpe) -> rotary q, k    GPT._hidden, rotary(), rotate()
    GELU MLP -> SwiGLU MLP                    SwiGLU
    as many k/v heads as q heads -> fewer     CausalSelfAttention (grouped-query attention)
    biases everywhere -> none                 (Qwen2 keeps them on q, k, v; Qwen3 adds q/k RMSNorm)
    tied output layer -> tied or not          GPT.__init__

What Gemma-3 (text) changes on top of the Llama family:
    RMSNorm's gain w -> (1 + w), in float32   GemmaRMSNorm
    a norm after each sublayer too            Block (post_ln_1, post_ln_2)
    SwiGLU -> GeGLU (tanh GELU)               SwiGLU
    embeddings scaled by sqrt(n_embd)         GPT._hidden
    q/k RMSNorm; scores scaled by             CausalSelfAttention
      1/sqrt(query_pre_attn_scalar)
    local layers: a sliding window of keys    CausalSelfAttention, window_mask()
    and a rotary base of their own            GPT._hidden, rope_frequencies()
    logits soft-capped (if the config says)   CappedLinear

Module names mirror the GPT-2 checkpoint keys (transformer.wte, transformer.h.0.attn.c_attn, ...)
so that loading GPT-2 weights is a copy by name; Llama-family names are mapped in hf.py.
"""

import functools
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# config and model


@dataclass
class GPTConfig:
    block_size: int = 1024   # longest sequence the position embeddings cover (GPT-2's n_positions)
    vocab_size: int = 50257  # GPT-2's exact vocab: never padded, so hub weights copy 1:1
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0     # 0 for fine-tuning: DPO compares the policy with a frozen reference,
                             # noise hurts
    bias: bool = True        # GPT-2 has biases in every Linear and LayerNorm
    # The Llama family. The defaults are GPT-2's, so a GPT-2 config (and every checkpoint written
    # before these fields existed) reads as it always did.
    model_type: str = "gpt2"        # gpt2 | llama | qwen2 | qwen3 | gemma3_text (HF's model_type)
    n_kv_head: int | None = None    # k/v heads for grouped-query attention (None: n_head)
    head_dim: int | None = None     # None: n_embd // n_head (Qwen3 sets its own)
    n_inner: int | None = None      # MLP width (None: GPT-2's 4 * n_embd)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0     # rotary base frequency
    rope_scaling: dict | None = None  # Llama-3.1/3.2's "llama3" frequency scaling: factor,
                                      # low/high_freq_factor, original_max_position_embeddings
    tie_embeddings: bool = True     # lm_head and wte share one (V, C) matrix
    # Gemma-3 (model_type gemma3_text), on top of the Llama fields. rope_theta and rope_scaling
    # are its global layers' ({"rope_type": "linear", "factor": f} in the larger Gemma-3s).
    layer_types: list | None = None  # per layer "sliding_attention" (local) | "full_attention"
    sliding_window: int | None = None  # a local layer's query sees itself and the window-1 before
    rope_local_theta: float | None = None  # the local layers' rotary base
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(it) (None: 1/sqrt(hs))
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"GPTConfig: model_type {self.model_type!r} is not one of "
                             f"{', '.join(MODEL_TYPES)}")
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by "
                             f"n_head ({self.n_head})")
        if self.n_head % self.kv_heads != 0:
            raise ValueError(f"GPTConfig: n_head ({self.n_head}) must be a multiple of "
                             f"n_kv_head ({self.n_kv_head})")
        kinds = self.layer_types
        if kinds is not None and (len(kinds) != self.n_layer or set(kinds) - set(LAYER_TYPES)):
            raise ValueError(f"GPTConfig: layer_types must name one of {', '.join(LAYER_TYPES)} "
                             f"for each of the {self.n_layer} layers, got {kinds}")
        if self.local_layers and not ((self.sliding_window or 0) >= 1 and self.rope_local_theta):
            raise ValueError(f"GPTConfig: local (sliding_attention) layers need a sliding_window "
                             f">= 1 and a rope_local_theta, got {self.sliding_window} and "
                             f"{self.rope_local_theta}")

    @property
    def llama(self):  # RMSNorm, rotary positions, SwiGLU; GPT-2 otherwise
        return self.model_type != "gpt2"

    @property
    def gemma(self):  # Gemma-3's switches, on top of the Llama family's
        return self.model_type == "gemma3_text"

    @property
    def local_layers(self):  # whether some layers are local (sliding-window) ones: Gemma-3
        return "sliding_attention" in (self.layer_types or ())

    def layer_type(self, i):  # "sliding_attention" (a local layer) or "full_attention"
        return self.layer_types[i] if self.layer_types else "full_attention"

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def head_size(self):
        return self.head_dim or self.n_embd // self.n_head

    @property
    def inner(self):
        return self.n_inner or 4 * self.n_embd


MODEL_TYPES = ("gpt2", "llama", "qwen2", "qwen3", "gemma3_text")
LAYER_TYPES = ("full_attention", "sliding_attention")
LLAMA_FIELDS = ("model_type", "n_kv_head", "head_dim", "n_inner", "norm_eps", "rope_theta",
                "rope_scaling", "tie_embeddings", "layer_types", "sliding_window",
                "rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping")


class KVCache:
    """Keys and values of every layer, preallocated once for the whole generation.

    k[layer], v[layer]: (B, n_kv_head, max_len, head_size), only the k/v heads (grouped-query
    attention shares them between query heads). `pos` counts the filled columns; a forward pass
    writes its T new columns at [pos, pos+T) in every layer, then the model advances `pos` by T.

    static=True is the layout torch.compile and CUDA graphs need, one graph for every decoding
    step: `pos` is a 0-d tensor on the device, the new columns are written with index_copy_ at
    tensor positions, and update returns the whole buffers (B, nkv, max_len, hs), whose columns
    not yet written the caller's attn_mask hides. The buffers never move (marked static for
    dynamo), so a CUDA graph recorded on them replays on them."""

    def __init__(self, n_layer, max_len, static=False, device=None):
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.max_len, self.static = max_len, static
        self.pos = 0
        if static:
            self.pos = torch.zeros((), dtype=torch.long, device=device)
            torch._dynamo.mark_static_address(self.pos)  # the compiled step advances it in place

    def update(self, layer, k, v):  # k, v: (B, nkv, T, hs) for the new tokens
        if self.k[layer] is None:
            # allocated on first use so it takes the dtype the model really computes in
            # (bf16 under autocast)
            B, nkv, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nkv, self.max_len, hs)
            self.v[layer] = v.new_zeros(B, nkv, self.max_len, hs)
            if self.static:
                torch._dynamo.mark_static_address(self.k[layer])
                torch._dynamo.mark_static_address(self.v[layer])
        if self.static:
            cols = self.pos + torch.arange(k.size(2), device=k.device)  # (T,) tensor columns
            self.k[layer].index_copy_(2, cols, k)
            self.v[layer].index_copy_(2, cols, v)
            return self.k[layer], self.v[layer]  # (B, nkv, max_len, hs)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nkv, pos+T, hs)

    def keep(self, rows):  # drop finished rows from the batch so they cost nothing from now on
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


class GemmaRMSNorm(nn.RMSNorm):
    """Gemma's RMSNorm: the stored gain w scales by (1 + w), so w = 0 (its init) is the identity;
    computed in float32 and cast back, as Gemma's own code does."""

    def reset_parameters(self):
        nn.init.zeros_(self.weight)

    def forward(self, x):
        y = F.rms_norm(x.float(), self.normalized_shape, eps=self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def norm(config, dim=None):
    """GPT-2: LayerNorm (subtract the mean, scale, shift).
    Llama: RMSNorm (divide by the root mean square, scale; no mean, no bias). Gemma: (1 + w)."""
    dim = dim or config.n_embd
    if config.gemma:
        return GemmaRMSNorm(dim, eps=config.norm_eps)
    if config.llama:
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_frequencies(config, local=False):
    """Llama's rotary inverse frequencies theta^(-2i/hs), (head_size/2,) float32. Llama-3.1/3.2
    ("llama3" scaling) stretch them for long contexts: wavelengths beyond the original context
    are divided by `factor`, short ones kept, those between blended (as transformers does).
    Gemma-3: local=True gives its local layers' (their own base, never scaled); the larger
    Gemma-3s scale the global ones "linear"ly: every frequency divided by `factor`."""
    hs = config.head_size
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / theta ** (torch.arange(0, hs, 2, dtype=torch.float) / hs)
    s = None if local else config.rope_scaling
    if s is None:
        return inv_freq
    if s.get("rope_type") == "linear":
        return inv_freq / s["factor"]
    context, factor = s["original_max_position_embeddings"], s["factor"]
    wavelen = 2 * math.pi / inv_freq
    # 0 at the long-wavelength end of the blend, 1 at the short one
    smooth = ((context / wavelen - s["low_freq_factor"])
              / (s["high_freq_factor"] - s["low_freq_factor"]))
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > context / s["low_freq_factor"], inv_freq / factor, blended)
    return torch.where(wavelen < context / s["high_freq_factor"], inv_freq, scaled)


def rotary(inv_freq, pos):
    """cos and sin of every (position, frequency) angle: pos (T,) or per-row (B, T) ->
    2 x (1 or B, 1, T, hs) float32, broadcast over the heads."""
    angles = pos[..., None].float() * inv_freq                # (..., T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)               # (..., T, hs): HF's halves layout
    angles = angles.view(-1, 1, *angles.shape[-2:])            # (1 or B, 1, T, hs)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """x (B, nh, T, hs) with each pair of dims (i, i + hs/2) turned by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (bf16 under autocast, as in transformers)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def window_mask(q_cols, k_cols, window):
    """Gemma-3's local attention as a mask: (Tq, Tk) True where key column k_cols[j] is at most
    window-1 columns before query column q_cols[i] (and not after it). Over the KV cache's
    columns it is exact under left padding too: a row's pads shift its queries and keys alike."""
    distance = q_cols[:, None] - k_cols[None, :]   # (Tq, Tk)
    return (distance >= 0) & (distance < window)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        nh, nkv, hs = config.n_head, config.kv_heads, config.head_size
        # q, k, v in one matmul. Llama: grouped-query attention, fewer k/v heads (nkv) than query
        # heads, each k/v head shared by nh // nkv query heads. Qwen2 keeps biases on q, k, v.
        qkv_bias = config.bias or config.model_type == "qwen2"
        self.c_attn = nn.Linear(config.n_embd, (nh + 2 * nkv) * hs, bias=qkv_bias)
        self.c_proj = nn.Linear(nh * hs, config.n_embd, bias=config.bias)
        self.qk_norm = config.model_type in ("qwen3", "gemma3_text")
        if self.qk_norm:  # Qwen3, Gemma-3: an RMSNorm over each head's q and k, before the rotation
            self.q_norm = norm(config, hs)
            self.k_norm = norm(config, hs)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_kv_head, self.head_size = nh, nkv, hs
        self.dropout, self.layer_idx = config.dropout, layer_idx
        # Gemma-3: scores scaled by 1/sqrt(query_pre_attn_scalar) (None: SDPA's 1/sqrt(hs))
        self.scale = None
        if config.query_pre_attn_scalar:
            self.scale = config.query_pre_attn_scalar ** -0.5
        # Gemma-3's local layers see only the last `window` keys (None: all of them)
        self.layer_type = config.layer_type(layer_idx)
        self.window = config.sliding_window if self.layer_type == "sliding_attention" else None

    def forward(self, x, rope=None, attn_mask=None, kv_cache=None):
        B, T, C = x.size()
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)   # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            # Llama: the position enters here, as a rotation of q and k
            # (so q·k depends on the distance between the tokens); this layer's kind's angles
            q, k = rotate(q, *rope[self.layer_type]), rotate(k, *rope[self.layer_type])
        gqa = nkv != nh  # SDPA lets each k/v head serve its group of query heads
        if kv_cache is None:
            # training / scoring: plain causal attention, flash kernel on CUDA; a local layer
            # longer than its window: the banded causal mask (exact, without the flash kernel)
            band = None
            if self.window is not None and T > self.window:
                cols = torch.arange(T, device=x.device)
                band = window_mask(cols, cols, self.window)           # (T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=band,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=band is None, scale=self.scale,
                                               enable_gqa=gqa)
        else:
            # generation: attend to everything cached so far;
            # the explicit mask hides the left padding
            first = kv_cache.pos  # the cache column of the first new token
            k, v = kv_cache.update(self.layer_idx, k, v)             # (B, nkv, pos+T, hs)
            if self.window is not None:  # a local layer: the window over the cache's columns
                band = window_mask(first + torch.arange(T, device=x.device),
                                   torch.arange(k.size(2), device=x.device), self.window)
                attn_mask = band if attn_mask is None else attn_mask & band  # (B, 1, T, pos+T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale,
                                               enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new" is the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)), no biases, n_inner wide. Where GPT-2 passes
    one projection through GELU, a second projection multiplies it (a gated linear unit).
    gate and up are one matmul here (c_fc, 2 * n_inner wide). Gemma-3: GeGLU, the
    tanh-approximated GELU in place of SiLU (its gelu_pytorch_tanh)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.inner, bias=False)
        self.c_proj = nn.Linear(config.inner, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.act = partial(F.gelu, approximate="tanh") if config.gemma else F.silu

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # 2 x (B, T, n_inner)
        return self.dropout(self.c_proj(self.act(gate) * up))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = norm(config)
        self.mlp = SwiGLU(config) if config.llama else MLP(config)
        # Gemma-3 also normalises each sublayer's output before it joins the residual stream
        self.post_ln_1 = norm(config) if config.gemma else nn.Identity()
        self.post_ln_2 = norm(config) if config.gemma else nn.Identity()

    def forward(self, x, rope=None, attn_mask=None, kv_cache=None):
        # pre-norm residual stream
        x = x + self.post_ln_1(self.attn(self.ln_1(x), rope, attn_mask, kv_cache))
        x = x + self.post_ln_2(self.mlp(self.ln_2(x)))
        return x


class CappedLinear(nn.Linear):
    """Gemma's output layer where the config sets final_logit_softcapping: the logits squashed
    smoothly into (-cap, cap), cap * tanh(logits / cap)."""

    def __init__(self, in_features, out_features, cap):
        super().__init__(in_features, out_features, bias=False)
        self.cap = cap

    def forward(self, x):
        return self.cap * torch.tanh(super().forward(x) / self.cap)


# default log-prob chunk: ~32M float32 logits (128 MiB) alive at a time
LOGPS_CHUNK_ELEMS = 2 ** 25
# the static cache's length is a multiple of this (capped at block_size)
STATIC_CACHE_BUCKET = 64


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.llama:  # no position table: the rotation angles are computed from positions
            self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
            if config.local_layers:  # Gemma-3's local layers
                self.register_buffer("inv_freq_local", rope_frequencies(config, local=True),
                                     persistent=False)
        else:
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.final_logit_softcapping:
            self.lm_head = CappedLinear(config.n_embd, config.vocab_size,
                                        config.final_logit_softcapping)
        if config.tie_embeddings:  # as in GPT-2 (and the small Llamas/Qwens): one (V, C) matrix
            self.transformer.wte.weight = self.lm_head.weight
        # recompute each block's activations in backward instead of keeping them (set by train.py)
        self.activation_checkpointing = False
        # init like GPT-2 / nanoGPT (only matters when training from scratch; loading overwrites it)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            # residual projections: scaled so the stream's variance stays ~1
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameter count; a tied wte/lm_head counts once. By default the tables that are only
        looked up (no matmul) are left out: GPT-2's positions, and an untied wte."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.llama:
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def _hidden(self, idx, pos=None, attn_mask=None, kv_cache=None):
        """Final hidden states (B, T, C) after ln_f.
        Generation passes per-row positions, mask and cache."""
        B, T = idx.size()
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.gemma:  # Gemma: embeddings times sqrt(n_embd), rounded to their dtype
            x = x * torch.tensor(self.config.n_embd ** 0.5, dtype=x.dtype)
        rope = None
        if self.config.llama:  # Llama: every layer rotates q and k by position-dependent angles
            # cos, sin: (1 or B, 1, T, hs) float32, for each kind of layer (Gemma-3's local
            # layers rotate with a base of their own)
            rope = {"full_attention": rotary(self.inv_freq, pos)}
            if self.config.local_layers:
                rope["sliding_attention"] = rotary(self.inv_freq_local, pos)
        else:  # GPT-2: a learned vector per position, added once
            x = x + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # keep only the block's input; backward recomputes its activations
                x = checkpoint(block, x, rope, attn_mask, kv_cache, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx, targets=None, chunk_size=None):
        """idx (B, T) -> logits (B, T, V) for every position. With targets (B, T), the thing every
        loss here wants instead: log p(targets[b, t] | idx[b, :t+1]) as a (B, T) float32 tensor,
        differentiable (nanochat's `-model(x, y, loss_reduction='none')`).

        The full float32 log-softmax (B, T, V) is never built: the transformer runs once, then
        lm_head + logsumexp run over chunks of positions, each chunk upcast to float32 on its own.
        With gradients on, each chunk is checkpointed, so backward recomputes one chunk's logits
        at a time instead of keeping them all alive.
        Negative target ids are "ignored": they give 0 (and no gradient)."""
        h = self._hidden(idx)                    # (B, T, C)
        if targets is None:
            return self.lm_head(h)               # (B, T, V)
        if targets.shape != idx.shape:
            raise ValueError(f"GPT.forward: targets shape {tuple(targets.shape)} "
                             f"!= idx shape {tuple(idx.shape)}")
        B, T, _ = h.shape
        ignored = targets < 0                    # (B, T)
        safe = targets.clamp(min=0)              # gather needs a valid id;
                                                 # those positions are zeroed below
        if chunk_size is None:
            chunk_size = max(1, LOGPS_CHUNK_ELEMS // (B * self.config.vocab_size))
        recompute = torch.is_grad_enabled() and h.requires_grad
        chunks = []
        for s in range(0, T, chunk_size):
            hc, tc = h[:, s:s + chunk_size], safe[:, s:s + chunk_size]  # (B, c, C), (B, c)
            if recompute:
                chunks.append(checkpoint(self._chunk_logps, hc, tc, use_reentrant=False))
            else:
                chunks.append(self._chunk_logps(hc, tc))
        return torch.cat(chunks, dim=1).masked_fill(ignored, 0.0)  # (B, T) float32

    def _chunk_logps(self, h, targets):  # h (B, c, C), targets (B, c) -> (B, c) float32
        logits = self.lm_head(h).float()  # (B, c, V): the only float32 logits alive at a time
        return (logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                - torch.logsumexp(logits, dim=-1))

    # -------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 eos_token_id=None, seed=None, static_cache=False, compile=False):
        """Continue every prompt (a list of token-id lists, lengths may differ)
        by up to max_new_tokens.

        Returns one list of NEW token ids per prompt. A row stops after emitting eos_token_id
        (kept in its output) while the others go on. temperature=0 is greedy; top_k / top_p
        restrict sampling; a seed makes sampling reproducible. Prompts are left-padded and
        decoded together with a preallocated KV cache.

        static_cache: fixed shapes, what CUDA graphs need (the batch keeps its finished rows, the
        cache has one of a few lengths and is written at tensor positions); the same tokens.
        compile: the decoding step through torch.compile (CUDA graphs on CUDA:
        mode="reduce-overhead"), on the static cache."""
        V, block_size = self.config.vocab_size, self.config.block_size
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise ValueError("generate: prompts must be a non-empty list of token-id lists")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"generate: prompt {i} is empty; "
                                 f"every prompt needs at least one token")
            if min(p) < 0 or max(p) >= V:
                raise ValueError(f"generate: prompt {i} has a token id outside [0, {V})")
        P = max(len(p) for p in prompts)
        if P + max_new_tokens > block_size:
            raise ValueError(f"generate: longest prompt ({P} tokens) + max_new_tokens "
                             f"({max_new_tokens}) exceeds block_size {block_size}; "
                             f"shorten the prompt (keep its end) or ask for fewer tokens")
        if (temperature < 0 or (top_k is not None and top_k < 1)
                or (top_p is not None and not 0 < top_p <= 1)):
            raise ValueError(f"generate: need temperature >= 0, top_k >= 1, 0 < top_p <= 1 "
                             f"(got {temperature}, {top_k}, {top_p})")
        decode = GPT.decode_step
        if compile:  # (compiling the growing dynamic cache would recompile at every step)
            static_cache = True
            decode = compiled_decode_step(self.lm_head.weight.device.type)
        was_training = self.training
        self.eval()  # no dropout while decoding; the caller's mode is restored below
        try:
            return self._generate(prompts, P, max_new_tokens, temperature, top_k, top_p,
                                  eos_token_id, seed, static_cache, decode)
        finally:
            self.train(was_training)

    def _generate(self, prompts, P, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed,
                  static, decode):
        device = self.lm_head.weight.device
        B, L = len(prompts), P + max_new_tokens  # L: cache length
        if static:  # a few cache lengths, not one per longest prompt: each is a graph of its own
            buckets = math.ceil(L / STATIC_CACHE_BUCKET)
            L = min(self.config.block_size, buckets * STATIC_CACHE_BUCKET)
        out = [[] for _ in range(B)]
        if max_new_tokens <= 0:
            return out
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        # left-pad so every prompt ends at column P-1
        # and the next token lands in the same column for all rows
        idx = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts],
                           dtype=torch.long, device=device)
        pad = torch.tensor([P - len(p) for p in prompts], device=device)  # (B,) pads on the left
                                                                          # of each row
        cols = torch.arange(L, device=device)
        key_ok = cols[None, :] >= pad[:, None]                 # (B, L): False on a row's pads
        pos = (cols[None, :P] - pad[:, None]).clamp(min=0)     # (B, P): each row's positions
                                                               # start at 0
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        # a pad query may see itself: an all-masked softmax row is NaN,
        # and NaN would leak into the cache
        eye = torch.eye(P, dtype=torch.bool, device=device)
        mask = (causal & (key_ok[:, None, :P] | eye))[:, None]  # (B, 1, P, P) broadcast over heads
        if static:  # the static cache returns all L columns: those not written yet are hidden
            mask = F.pad(mask, (0, L - P), value=False)         # (B, 1, P, L)
        cache = KVCache(self.config.n_layer, L, static=static, device=device)
        h = self._hidden(idx, pos=pos, attn_mask=mask, kv_cache=cache)  # prefill: (B, P, C)
        logits = self.lm_head(h[:, -1])                         # (B, V) next-token logits
        rows = list(range(B))  # rows[j]: which prompt batch row j decodes
        index = torch.arange(B, device=device)  # the same, as a tensor
        done = [False] * B     # per prompt: its EOS is out
        for step in range(max_new_tokens):
            uniform = None
            if temperature > 0:
                # one uniform per prompt and step, drawn for all B prompts: a row's sample is the
                # same whichever other rows have stopped, with or without the static cache
                uniform = torch.rand(B, generator=generator, device=device)[index]  # (b,)
            tok = self._sample(logits, temperature, top_k, top_p, uniform)  # (b,)
            for i, t in zip(rows, tok.tolist()):
                if not done[i]:  # (static: a finished row decodes on, its tokens unread)
                    out[i].append(t)
                    done[i] = t == eos_token_id
            if step == max_new_tokens - 1 or all(done):
                break
            if not static and any(done[i] for i in rows):
                # shrink the batch: finished rows cost nothing from here on
                keep = [j for j, i in enumerate(rows) if not done[i]]
                rows = [rows[j] for j in keep]
                keep = torch.tensor(keep, device=device)
                cache.keep(keep)
                tok, pad, key_ok, index = tok[keep], pad[keep], key_ok[keep], index[keep]
            col = P + step  # cache column of the token fed now
            width = L if static else col + 1  # the columns the cache returns
            mask = (key_ok & (cols <= col))[:, None, None, :width]  # (b, 1, 1, width)
            if static:  # a new step for CUDA graphs: last step's logits were read
                torch.compiler.cudagraph_mark_step_begin()
            logits = decode(self, tok[:, None], (col - pad)[:, None], mask, cache)  # (b, V)
        return out

    def decode_step(self, tok, pos, mask, cache):
        """One decoding step, the unit torch.compile compiles: new tokens tok (b, 1) at positions
        pos (b, 1), attending to the cache columns mask (b, 1, 1, L) allows -> the next-token
        logits (b, V)."""
        h = self._hidden(tok, pos=pos, attn_mask=mask, kv_cache=cache)  # (b, 1, C)
        return self.lm_head(h[:, -1])

    @staticmethod
    def _sample(logits, temperature, top_k, top_p, uniform):
        """Next tokens (b,) from logits (b, V), with one uniform in [0, 1) per row (b,).

        Inverse-CDF sampling: a row's token is the first whose cumulative probability exceeds its
        uniform. decision: one uniform per row, not torch.multinomial, which draws an exponential
        for every vocabulary entry (most of a CPU decoding step at GPT-2's vocabulary). The
        cumulative sum is float32: a token's probability is resolved to about 6e-8 of the row's
        mass (bf16 logits round it far more), and a token of probability 0 is never drawn."""
        logits = logits.float()
        if temperature == 0:
            return logits.argmax(dim=-1)
        if temperature != 1:
            logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (b, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            # nucleus: keep the smallest set of top tokens whose probability reaches top_p
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # mass strictly above this token already suffices
            drop = probs.cumsum(dim=-1) - probs >= top_p
            # the top token always survives
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (b, V)
        total = cdf[:, -1:]                          # (b, 1): 1 up to rounding
        if not torch.isfinite(total).all():
            raise ValueError("generate: the model's logits are not finite (NaN or inf): its "
                             "weights are broken")
        # u < total strictly, so the token found has cdf[i] > u >= cdf[i-1]: a nonzero probability
        u = torch.minimum(uniform[:, None] * total, total.nextafter(torch.zeros_like(total)))
        return torch.searchsorted(cdf, u, right=True).squeeze(-1)

    # -------------------------------------------------------------------------
    # training helpers

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. 1024 -> 256) to save memory;
        keeps the first block_size positions."""
        if block_size > self.config.block_size:
            raise ValueError(f"crop_block_size: {block_size} is larger than the current "
                             f"{self.config.block_size}")
        self.config.block_size = block_size
        if not self.config.llama:  # (rotary positions have no table to cut)
            self.transformer.wpe.weight = nn.Parameter(
                self.transformer.wpe.weight[:block_size].detach().clone())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay only on 2D tensors (matmuls, embeddings),
        never on biases or LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 fused=(device_type == "cuda"))

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward) in sequences of seq_len tokens, PaLM's
        (appendix B) 6N + 12·L·H·Q·T as in nanoGPT, with N the weights of the matmuls: every
        Linear, so the LM head once, tied or not; no biases, norms or embedding lookups.
        decision: model FLOPs, as MFU defines them: recomputation is not counted (flash
        attention's scores recomputed in backward, the chunked log-probs' LM head recomputed in
        backward, activation checkpointing); a causal attention counts all T² scores, as
        torch.utils.flop_counter does."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_size, seq_len or cfg.block_size
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul_weights + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_sec, peak_flops, seq_len=None):
        """Model FLOPs utilisation: achieved FLOP/s over the device's dense bf16 peak
        (common.peak_flops); None when the peak is unknown (e.g. on a CPU)."""
        if peak_flops is None:
            return None
        return self.flops_per_token(seq_len) * tokens_per_sec / peak_flops

    def merged_state_dict(self):
        """state_dict() with every LoRA adapter (lora.py) folded into its weight, W + (α/r)·B·A,
        and no lora_* keys: the keys and shapes of a plain GPT, what an export writes. Without
        LoRA, state_dict()."""
        state = {k: v for k, v in self.state_dict().items() if ".lora_" not in k}
        with torch.no_grad():
            for name, module in self.named_modules():
                if hasattr(module, "merged_weight"):  # a lora.LoRALinear
                    state[f"{name}.weight"] = module.merged_weight()
        return state


@functools.cache
def compiled_decode_step(device_type):
    """GPT.decode_step through torch.compile, once per process and device type: one graph per
    (batch, cache length), no graph break (fullgraph), static shapes. On CUDA mode
    "reduce-overhead" replays each graph as a CUDA graph (one launch for the whole step)."""
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(GPT.decode_step, mode=mode, fullgraph=True, dynamic=False)
