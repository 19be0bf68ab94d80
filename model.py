"""
GPT-2 in one file, for preference optimisation, and the small members of the Llama family
(Llama-3.x, Qwen2.5, Qwen3) as a handful of switches on the same blocks.

Read top to bottom: config, the three modules of a transformer block, the GPT itself (forward,
per-token log-probabilities, generation with a KV cache, optimizer and FLOP helpers), loading
weights from the Hugging Face hub or a local folder, writing a Hugging Face folder back, and our
own single-file checkpoints.

What the Llama family changes, each written down where it happens:
    LayerNorm -> RMSNorm                      norm()
    learned positions (wpe) -> rotary q, k    GPT._hidden, rotary(), rotate()
    GELU MLP -> SwiGLU MLP                    SwiGLU
    as many k/v heads as q heads -> fewer     CausalSelfAttention (grouped-query attention)
    biases everywhere -> none                 (Qwen2 keeps them on q, k, v; Qwen3 adds q/k RMSNorm)
    tied output layer -> tied or not          GPT.__init__

Module names mirror the GPT-2 checkpoint keys (transformer.wte, transformer.h.0.attn.c_attn, ...)
so that loading GPT-2 weights is a copy by name; Llama-family names are mapped by llama_keys().
`transformers` is never imported here; it is only the independent reference the tests compare
against.
"""

import json
import math
import os
import pickle
import re
import tempfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import atomic_write, read_json

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
    model_type: str = "gpt2"        # gpt2 | llama | qwen2 | qwen3 (Hugging Face's model_type)
    n_kv_head: int | None = None    # k/v heads for grouped-query attention (None: n_head)
    head_dim: int | None = None     # None: n_embd // n_head (Qwen3 sets its own)
    n_inner: int | None = None      # MLP width (None: GPT-2's 4 * n_embd)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0     # rotary base frequency
    rope_scaling: dict | None = None  # Llama-3.1/3.2's "llama3" frequency scaling: factor,
                                      # low/high_freq_factor, original_max_position_embeddings
    tie_embeddings: bool = True     # lm_head and wte share one (V, C) matrix

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

    @property
    def llama(self):  # RMSNorm, rotary positions, SwiGLU; GPT-2 otherwise
        return self.model_type != "gpt2"

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def head_size(self):
        return self.head_dim or self.n_embd // self.n_head

    @property
    def inner(self):
        return self.n_inner or 4 * self.n_embd


MODEL_TYPES = ("gpt2", "llama", "qwen2", "qwen3")
LLAMA_FIELDS = ("model_type", "n_kv_head", "head_dim", "n_inner", "norm_eps", "rope_theta",
                "rope_scaling", "tie_embeddings")


class KVCache:
    """Keys and values of every layer, preallocated once for the whole generation.

    k[layer], v[layer]: (B, n_kv_head, max_len, head_size), only the k/v heads (grouped-query
    attention shares them between query heads). `pos` counts the filled columns; a forward pass
    writes its T new columns at [pos, pos+T) in every layer, then the model advances `pos` by T."""

    def __init__(self, n_layer, max_len):
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.max_len, self.pos = max_len, 0

    def update(self, layer, k, v):  # k, v: (B, nkv, T, hs) for the new tokens
        if self.k[layer] is None:
            # allocated on first use so it takes the dtype the model really computes in
            # (bf16 under autocast)
            B, nkv, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nkv, self.max_len, hs)
            self.v[layer] = v.new_zeros(B, nkv, self.max_len, hs)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nkv, pos+T, hs)

    def keep(self, rows):  # drop finished rows from the batch so they cost nothing from now on
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


def norm(config, dim=None):
    """GPT-2: LayerNorm (subtract the mean, scale, shift).
    Llama: RMSNorm (divide by the root mean square, scale; no mean, no bias)."""
    dim = dim or config.n_embd
    if config.llama:
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_frequencies(config):
    """Llama's rotary inverse frequencies theta^(-2i/hs), (head_size/2,) float32. Llama-3.1/3.2
    ("llama3" scaling) stretch them for long contexts: wavelengths beyond the original context
    are divided by `factor`, short ones kept, those between blended (as transformers does)."""
    hs = config.head_size
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float) / hs)
    s = config.rope_scaling
    if s is None:
        return inv_freq
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


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        nh, nkv, hs = config.n_head, config.kv_heads, config.head_size
        # q, k, v in one matmul. Llama: grouped-query attention, fewer k/v heads (nkv) than query
        # heads, each k/v head shared by nh // nkv query heads. Qwen2 keeps biases on q, k, v.
        qkv_bias = config.bias or config.model_type == "qwen2"
        self.c_attn = nn.Linear(config.n_embd, (nh + 2 * nkv) * hs, bias=qkv_bias)
        self.c_proj = nn.Linear(nh * hs, config.n_embd, bias=config.bias)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:  # Qwen3: an RMSNorm over each head's q and k, before the rotation
            self.q_norm = norm(config, hs)
            self.k_norm = norm(config, hs)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_kv_head, self.head_size = nh, nkv, hs
        self.dropout, self.layer_idx = config.dropout, layer_idx

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
            # (so q·k depends on the distance between the tokens)
            q, k = rotate(q, *rope), rotate(k, *rope)
        gqa = nkv != nh  # SDPA lets each k/v head serve its group of query heads
        if kv_cache is None:
            # training / scoring: plain causal attention, flash kernel on CUDA
            y = F.scaled_dot_product_attention(q, k, v,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True, enable_gqa=gqa)
        else:
            # generation: attend to everything cached so far;
            # the explicit mask hides the left padding
            k, v = kv_cache.update(self.layer_idx, k, v)             # (B, nkv, pos+T, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
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
    gate and up are one matmul here (c_fc, 2 * n_inner wide)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.inner, bias=False)
        self.c_proj = nn.Linear(config.inner, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # 2 x (B, T, n_inner)
        return self.dropout(self.c_proj(F.silu(gate) * up))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = norm(config)
        self.mlp = SwiGLU(config) if config.llama else MLP(config)

    def forward(self, x, rope=None, attn_mask=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), rope, attn_mask, kv_cache)  # pre-norm residual stream
        x = x + self.mlp(self.ln_2(x))
        return x


# also accepted as "openai-community/<name>"
HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# GPT-2 checkpoints store these four weights as Conv1D (in, out); nn.Linear wants (out, in).
# Biases are 1D.
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight",
                  ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# default token_logps chunk: ~32M float32 logits (128 MiB) alive at a time
LOGPS_CHUNK_ELEMS = 2 ** 25


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.llama:  # no position table: the rotation angles are computed from positions
            self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        else:
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # as in GPT-2 (and the small Llamas/Qwens): one (V, C) matrix
            self.transformer.wte.weight = self.lm_head.weight
        # recompute each block's activations in backward instead of keeping them (set by train.py)
        self.activation_checkpointing = False
        self.tokenizer_source = None  # where from_pretrained found the tokenizer (save_pretrained)
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
        rope = None
        if self.config.llama:  # Llama: every layer rotates q and k by position-dependent angles
            rope = rotary(self.inv_freq, pos)  # cos, sin: (1 or B, 1, T, hs) float32
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

    def forward(self, idx, targets=None):
        """idx (B, T) -> logits (B, T, V) for every position;
        with targets (B, T) -> (logits, mean CE loss).
        A negative target id (-1, or HF's -100) is ignored by the loss."""
        logits = self.lm_head(self._hidden(idx))  # (B, T, V)
        if targets is None:
            return logits
        # clamp maps every negative id to -1 without a data-dependent branch
        # (keeps torch.compile happy)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                               targets.reshape(-1).clamp(min=-1),
                               ignore_index=-1)
        return logits, loss

    def token_logps(self, idx, targets, chunk_size=None):
        """log p(targets[b, t] | idx[b, :t+1]) as a (B, T) float32 tensor, differentiable.

        The full float32 log-softmax (B, T, V) is never built: the transformer runs once, then
        lm_head + logsumexp run over chunks of positions, each chunk upcast to float32 on its own.
        With gradients on, each chunk is checkpointed, so backward recomputes one chunk's logits
        at a time instead of keeping them all alive.
        Negative target ids are "ignored": they give 0 (and no gradient)."""
        if targets.shape != idx.shape:
            raise ValueError(f"token_logps: targets shape {tuple(targets.shape)} "
                             f"!= idx shape {tuple(idx.shape)}")
        h = self._hidden(idx)                    # (B, T, C)
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
                 eos_token_id=None, seed=None):
        """Continue every prompt (a list of token-id lists, lengths may differ)
        by up to max_new_tokens.

        Returns one list of NEW token ids per prompt. A row stops after emitting eos_token_id
        (kept in its output) while the others go on. temperature=0 is greedy; top_k / top_p
        restrict sampling; a seed makes sampling reproducible. Prompts are left-padded and
        decoded together with a preallocated KV cache."""
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
        was_training = self.training
        self.eval()  # no dropout while decoding; the caller's mode is restored below
        try:
            return self._generate(prompts, P, max_new_tokens, temperature, top_k, top_p,
                                  eos_token_id, seed)
        finally:
            self.train(was_training)

    def _generate(self, prompts, P, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed):
        device = self.lm_head.weight.device
        B, L = len(prompts), P + max_new_tokens  # L: cache length
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
        cache = KVCache(self.config.n_layer, L)
        h = self._hidden(idx, pos=pos, attn_mask=mask, kv_cache=cache)  # prefill: (B, P, C)
        logits = self.lm_head(h[:, -1])                         # (B, V) next-token logits
        rows = list(range(B))  # rows[j]: which prompt batch row j still decodes
        for step in range(max_new_tokens):
            tok = self._sample(logits, temperature, top_k, top_p, generator)  # (b,)
            done = []
            for j, t in enumerate(tok.tolist()):
                out[rows[j]].append(t)
                done.append(t == eos_token_id)
            if step == max_new_tokens - 1 or all(done):
                break
            if any(done):  # shrink the batch: finished rows cost nothing from here on
                keep = [j for j, d in enumerate(done) if not d]
                rows = [rows[j] for j in keep]
                keep = torch.tensor(keep, device=device)
                cache.keep(keep)
                tok, pad, key_ok = tok[keep], pad[keep], key_ok[keep]
            col = P + step  # cache column of the token fed now
            mask = key_ok[:, None, None, :col + 1]  # (b, 1, 1, col+1)
            h = self._hidden(tok[:, None], pos=(col - pad)[:, None], attn_mask=mask,
                             kv_cache=cache)  # (b, 1, C)
            logits = self.lm_head(h[:, -1])  # (b, V)
        return out

    @staticmethod
    def _sample(logits, temperature, top_k, top_p, generator):  # logits (b, V) -> token ids (b,)
        logits = logits.float()
        if temperature == 0:
            return logits.argmax(dim=-1)
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
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)

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
        """Training FLOPs per token (forward + backward), PaLM appendix B as in nanoGPT:
        6N + 12*L*H*Q*T."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_size, seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_sec, device=None, peak_flops=None, seq_len=None):
        """Model FLOPs utilisation: achieved FLOP/s over the device's dense bf16 peak.
        The peak comes from peak_flops, else from the actual GPU's name;
        None if unknown (e.g. CPU)."""
        peak = peak_flops if peak_flops is not None else _device_peak_flops(device)
        if peak is None:
            return None
        return self.flops_per_token(seq_len) * tokens_per_sec / peak

    # -------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(cls, name_or_path, **overrides):
        """Load 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl', or the hub id of a Llama, Qwen2
        or Qwen3 checkpoint (e.g. 'Qwen/Qwen2.5-0.5B-Instruct'), from the Hugging Face hub; a local
        HF folder (config.json + model.safetensors, its shards, or pytorch_model.bin); or one of
        our checkpoints (a file, or a folder holding ckpt.pt).
        overrides: dropout=..., block_size=... (smaller than the checkpoint's: cropped).
        model.tokenizer_source remembers where the tokenizer lives, for save_pretrained."""
        unknown = set(overrides) - {"dropout", "block_size"}
        if unknown:
            raise ValueError(f"from_pretrained: cannot override {sorted(unknown)}; "
                             f"only dropout and block_size")
        src = os.fspath(name_or_path)
        tokenizer = src  # an HF folder or hub repo holds its own tokenizer
        if os.path.isfile(src) or os.path.isfile(os.path.join(src, "ckpt.pt")):
            path = src if os.path.isfile(src) else os.path.join(src, "ckpt.pt")
            ckpt = load_checkpoint(path)
            names = {f.name for f in fields(GPTConfig)}
            if not isinstance(ckpt["config"], dict) or set(ckpt["config"]) - names:
                raise ValueError(f"{path}: checkpoint config has fields GPTConfig does not know: "
                                 f"{ckpt['config']}")
            config, state, source = GPTConfig(**ckpt["config"]), ckpt["model"], path
            tokenizer = ckpt.get("tokenizer")  # train.py records it: gpt2, byte, folder, hub id
        elif os.path.isdir(src):
            config, state, source = _load_hf_folder(src)
            tokenizer = os.path.abspath(src)
        elif src in HUB_MODELS or src.removeprefix("openai-community/") in HUB_MODELS:
            # checked against the list first: no stray calls
            config_path, weight_path = _download_from_hub(src)
            config = _config_from_hf(config_path)
            state, source = _hf_state_dict([weight_path], config, weight_path), weight_path
        elif is_hub_id(src):
            config, state, source = _load_hf_folder(hub_download(src, HF_MODEL_FILES))
        elif os.sep in src or src.endswith((".pt", ".bin", ".safetensors")):
            raise FileNotFoundError(f"{src}: no such file or folder")
        else:
            raise ValueError(f"unknown model {src!r}: expected one of {', '.join(HUB_MODELS)}, "
                             f"a hub id like Qwen/Qwen2.5-0.5B-Instruct, a local Hugging Face "
                             f"folder (config.json + model.safetensors), "
                             f"or a nanoADPO checkpoint file")
        block_size = overrides.get("block_size", config.block_size)
        if block_size > config.block_size:
            raise ValueError(f"from_pretrained: block_size={block_size} exceeds the checkpoint's "
                             f"{config.block_size}")
        config.dropout = overrides.get("dropout", config.dropout)
        model = cls(config)
        _copy_weights(model, state, source)
        if block_size < config.block_size:
            model.crop_block_size(block_size)
        model.tokenizer_source = tokenizer
        return model

    def save_pretrained(self, folder, tokenizer=None, dtype=None, max_shard_size="5GB"):
        """Write a Hugging Face folder that transformers, vLLM or lm-evaluation-harness load:
        config.json, model.safetensors (shards and an index past max_shard_size), and the
        tokenizer files of `tokenizer` (an HF folder or hub id, or 'none'; default: where this
        model came from; our byte tokenizer has none). dtype: e.g. torch.bfloat16 (default: the
        weights' own). Every file appears whole (temp file + rename); config.json comes last."""
        from huggingface_hub import save_torch_state_dict
        state = hf_state_dict(self, dtype)
        tokenizer = self.tokenizer_source if tokenizer is None else tokenizer
        extra = tokenizer_files(tokenizer)  # {file name: path}, fetched before anything is written
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmp:
            save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
            written = os.listdir(tmp)
            for name in os.listdir(folder):  # the weights of an earlier export would mix in
                if name.startswith(("model", "pytorch_model")) and name.endswith(WEIGHT_SUFFIXES) \
                        and name not in written:
                    os.remove(os.path.join(folder, name))
            for name in written:
                os.replace(os.path.join(tmp, name), os.path.join(folder, name))
        for name, path in extra.items():
            with open(path, "rb") as f:
                content = f.read()
            atomic_write(os.path.join(folder, name), lambda f: f.write(content))
        dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
        # the special token ids, as the source's generation config has them (transformers'
        # defaults, e.g. Llama's eos 2, would be wrong)
        generation = extra.get("generation_config.json")
        generation = read_json(generation) if generation else {}
        ids = {k: generation.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        config = json.dumps(dict(hf_config(self.config, dtype_name), **ids), indent=2).encode()
        atomic_write(os.path.join(folder, "config.json"), lambda f: f.write(config))
        return folder


# -----------------------------------------------------------------------------
# Hugging Face folders and the hub

# what we fetch from a hub repo: the config, safetensors weights and tokenizer files, nothing else
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja", "chat_template.json", "generation_config.json")
HF_MODEL_FILES = ("config.json", "model*.safetensors", "model.safetensors.index.json",
                  *HF_TOKENIZER_FILES)
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


def is_hub_id(name):
    """'Qwen/Qwen2.5-0.5B-Instruct' is; a path that exists, or ends like a weights file, is not."""
    return (HUB_ID_RE.fullmatch(name) is not None and not os.path.exists(name)
            and not name.endswith((".pt", ".bin", ".safetensors", ".json")))


def hub_download(repo_id, patterns):
    """The local folder holding a hub repo's files that match `patterns`, fetched once by
    huggingface_hub and cached the usual way (offline, it answers from the cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError
    try:
        return snapshot_download(repo_id, allow_patterns=list(patterns))
    except RepositoryNotFoundError:  # also a gated repo (Llama) without an accepted license
        raise FileNotFoundError(f"{repo_id!r}: no such local folder, and no hub repo the hub "
                                f"lets us read (gated models such as Llama need their license "
                                f"accepted on the hub and `hf auth login`)") from None
    except Exception as e:  # connection, timeout, offline mode: the hub client raises many kinds
        raise ConnectionError(f"{repo_id!r} is no local folder, and the Hugging Face hub cannot "
                              f"be reached to get it (offline, or not cached); download it where "
                              f"there is a connection and pass its local folder instead "
                              f"[{type(e).__name__}]") from None


def tokenizer_files(source):
    """{file name: local path} of the tokenizer files (and generation_config.json) of an HF
    folder or hub repo; GPT-2's for 'gpt2'; none for 'none', our byte tokenizer, or no source."""
    if source in (None, "none", "byte"):
        return {}
    if source.removeprefix("openai-community/") in HUB_MODELS:
        source = "openai-community/gpt2"  # every GPT-2 size shares this tokenizer
    if not os.path.isdir(source) and not is_hub_id(source):
        raise FileNotFoundError(f"{source}: the tokenizer folder this model came from is gone; "
                                f"pass save_pretrained(..., tokenizer='its/folder' or 'none')")
    folder = source if os.path.isdir(source) else hub_download(source, HF_TOKENIZER_FILES)
    return {name: os.path.join(folder, name) for name in HF_TOKENIZER_FILES
            if os.path.isfile(os.path.join(folder, name))}


def _load_hf_folder(folder):
    """(GPTConfig, our state dict, source for messages) from a Hugging Face folder."""
    config_path, weight_paths = os.path.join(folder, "config.json"), _local_weight_files(folder)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder}: folder has no config.json "
                                f"(expected a Hugging Face model folder "
                                f"or a folder holding our ckpt.pt)")
    source = weight_paths[0] if len(weight_paths) == 1 else folder
    config = _config_from_hf(config_path)
    return config, _hf_state_dict(weight_paths, config, source), source


def _local_weight_files(folder):
    """The weight file(s) of an HF folder: model.safetensors, its shards, or pytorch_model.bin."""
    single, index = (os.path.join(folder, "model.safetensors"),
                     os.path.join(folder, "model.safetensors.index.json"))
    if os.path.isfile(single):
        return [single]
    # save_pretrained shards big models; the index maps each key to a shard
    if os.path.isfile(index):
        saved = read_json(index)
        weight_map = saved.get("weight_map") if isinstance(saved, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map (expected the index save_pretrained writes: "
                             f"{{\"weight_map\": {{key: shard file}}}})")
        return [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return [os.path.join(folder, "pytorch_model.bin")]
    raise FileNotFoundError(f"{folder}: no model weights found; "
                            f"expected model.safetensors or pytorch_model.bin (or our ckpt.pt)")


def _download_from_hub(name):
    """(config.json, weights) paths for a GPT-2 from the hub,
    cached the usual way by huggingface_hub."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    offline_hint = (f"cannot reach the Hugging Face hub to get {name!r} (offline, or not cached); "
                    f"download it where there is a connection and pass the local folder instead: "
                    f"GPT.from_pretrained('path/to/{name}')")
    try:
        config_path = hf_hub_download(name, "config.json")
    except Exception as e:  # connection, timeout, offline mode: the hub client raises many kinds
        raise ConnectionError(f"{offline_hint} [{type(e).__name__}]") from None
    error = None
    for filename in ("model.safetensors", "pytorch_model.bin"):  # older repos only have the .bin
        try:
            return config_path, hf_hub_download(name, filename)
        except Exception as e:
            if not (isinstance(e, EntryNotFoundError)
                    and not isinstance(e, LocalEntryNotFoundError)):
                # not "absent from the repo" but a failed fetch; the other file may still be cached
                error = e
    if error is not None:
        raise ConnectionError(f"{offline_hint} [{type(error).__name__}]") from None
    raise FileNotFoundError(f"hub repo {name!r} has neither model.safetensors "
                            f"nor pytorch_model.bin")


def _config_from_hf(config_path):
    """GPTConfig from an HF config.json (GPT-2 here, the Llama family in _llama_config);
    refuse anything this model would silently compute differently."""
    cfg = read_json(config_path)  # a broken file names itself
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_path}: expected a JSON object (a Hugging Face config)")
    if cfg.get("model_type") in MODEL_TYPES[1:]:
        return _llama_config(cfg, config_path)

    def refuse(key, expected):
        raise ValueError(f"{config_path}: {key}={cfg.get(key)!r} cannot be represented "
                         f"by this GPT-2 (expected {expected})")

    if cfg.get("model_type", "gpt2") != "gpt2":
        refuse("model_type", f"one of {', '.join(MODEL_TYPES)}")
    for key in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):
        if not isinstance(cfg.get(key), int):
            refuse(key, "an integer")
    # same tanh GELU
    if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        refuse("activation_function", "'gelu_new'")
    if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]):
        refuse("n_inner", f"null or 4*n_embd = {4 * cfg['n_embd']}")
    if not math.isclose(cfg.get("layer_norm_epsilon", 1e-5), 1e-5, rel_tol=1e-6):
        refuse("layer_norm_epsilon", "1e-05")
    for key, default in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("reorder_and_upcast_attn", False), ("add_cross_attention", False),
                         ("tie_word_embeddings", True)):
        if cfg.get(key, default) != default:
            refuse(key, default)
    if cfg["n_embd"] % cfg["n_head"] != 0:
        refuse("n_embd", f"a multiple of n_head={cfg['n_head']}")
    # HF's attn/embd/resid_pdrop (0.1) are for pretraining;
    # fine-tuning here runs without dropout by default
    return GPTConfig(block_size=cfg["n_positions"], vocab_size=cfg["vocab_size"],
                     n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                     dropout=0.0, bias=True)


LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _llama_config(cfg, config_path):
    """GPTConfig from a Llama / Qwen2 / Qwen3 config.json in either layout: the hub's (rope_theta,
    rope_scaling at the top level) or the one transformers 5 writes (rope_parameters)."""
    def refuse(key, expected):
        raise ValueError(f"{config_path}: {key}={cfg.get(key)!r} cannot be represented "
                         f"by this {cfg['model_type']} model (expected {expected})")

    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings"):
        if not isinstance(cfg.get(key), int):
            refuse(key, "an integer")
    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "'silu' (SwiGLU)")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):  # (Qwen2's q/k/v biases are
        if cfg.get(key, False):                                        # part of its model_type)
            refuse(key, "false")
    if any(kind != "full_attention" for kind in cfg.get("layer_types") or ()):
        refuse("layer_types", "full_attention in every layer")
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or 0
    if not isinstance(kv_heads, int) or kv_heads < 0 or (kv_heads and heads % kv_heads):
        refuse("num_key_value_heads", f"an integer that divides num_attention_heads={heads}")
    if cfg.get("head_dim") is None and cfg["hidden_size"] % heads:
        refuse("hidden_size", f"a multiple of num_attention_heads={heads}, or a head_dim")
    if cfg.get("rope_parameters") is not None:  # transformers 5
        key, rope = "rope_parameters", cfg["rope_parameters"]
    else:  # the hub's files
        key, rope = "rope_scaling", dict(cfg.get("rope_scaling") or {})
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        refuse(key, "no scaling, or rope_type 'llama3'")
    if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse("partial_rotary_factor", "1.0")
    scaling = {k: rope.get(k) for k in LLAMA3_ROPE} if kind == "llama3" else None
    if scaling and not all(isinstance(v, (int, float)) for v in scaling.values()):
        refuse(key, f"numbers for {', '.join(LLAMA3_ROPE)}")
    return GPTConfig(model_type=cfg["model_type"], block_size=cfg["max_position_embeddings"],
                     vocab_size=cfg["vocab_size"], n_layer=cfg["num_hidden_layers"],
                     n_head=heads, n_embd=cfg["hidden_size"], dropout=0.0, bias=False,
                     n_kv_head=kv_heads or None, head_dim=cfg.get("head_dim"),
                     n_inner=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                     rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=scaling,
                     tie_embeddings=cfg.get("tie_word_embeddings", False))


def llama_keys(config):
    """[(our key, [(Hugging Face key, its shape), ...])] of a Llama-family model. Several of theirs
    stack into one of ours along the output dimension: q, k, v -> c_attn; gate, up -> c_fc."""
    C, V, hs, I = config.n_embd, config.vocab_size, config.head_size, config.inner
    q, kv = config.n_head * hs, config.kv_heads * hs
    keys = [("transformer.wte.weight", [("model.embed_tokens.weight", (V, C))])]
    for i in range(config.n_layer):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        keys.append((ours + "ln_1.weight", [(hf + "input_layernorm.weight", (C,))]))
        keys.append((ours + "attn.c_attn.weight", [(hf + "self_attn.q_proj.weight", (q, C)),
                                                   (hf + "self_attn.k_proj.weight", (kv, C)),
                                                   (hf + "self_attn.v_proj.weight", (kv, C))]))
        if config.model_type == "qwen2":
            keys.append((ours + "attn.c_attn.bias", [(hf + "self_attn.q_proj.bias", (q,)),
                                                     (hf + "self_attn.k_proj.bias", (kv,)),
                                                     (hf + "self_attn.v_proj.bias", (kv,))]))
        if config.model_type == "qwen3":
            keys.append((ours + "attn.q_norm.weight", [(hf + "self_attn.q_norm.weight", (hs,))]))
            keys.append((ours + "attn.k_norm.weight", [(hf + "self_attn.k_norm.weight", (hs,))]))
        keys.append((ours + "attn.c_proj.weight", [(hf + "self_attn.o_proj.weight", (C, q))]))
        keys.append((ours + "ln_2.weight", [(hf + "post_attention_layernorm.weight", (C,))]))
        keys.append((ours + "mlp.c_fc.weight", [(hf + "mlp.gate_proj.weight", (I, C)),
                                                (hf + "mlp.up_proj.weight", (I, C))]))
        keys.append((ours + "mlp.c_proj.weight", [(hf + "mlp.down_proj.weight", (C, I))]))
    keys.append(("transformer.ln_f.weight", [("model.norm.weight", (C,))]))
    if not config.tie_embeddings:
        keys.append(("lm_head.weight", [("lm_head.weight", (V, C))]))
    return keys


def _read_weights(paths):
    """{key: (tensor, file)} from safetensors or pytorch_model.bin files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    raw = {}
    for path in paths:
        try:
            if path.endswith(".safetensors"):
                part = load_file(path)
            else:
                part = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file (named by the folder's index)") from None
        except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
            raise ValueError(f"{path}: not a readable weight file (truncated or corrupt? "
                             f"{reason})") from None
        raw.update({k: (v, path) for k, v in part.items()})
    return raw


def _hf_state_dict(paths, config, source):
    """The weights of an HF folder renamed to our keys (the Llama family: _llama_state_dict).
    Hub gpt2* files lack the 'transformer.' prefix, carry the causal-mask buffers h.N.attn.bias /
    h.N.attn.masked_bias, and have no lm_head.weight (it is tied)."""
    raw = _read_weights(paths)
    if config.llama:
        return _llama_state_dict(raw, config, source)
    state, files = {}, {}
    for k, (v, path) in raw.items():
        # leading dot: ".attn.c_attn.bias" is a real weight
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        k = k if k == "lm_head.weight" or k.startswith("transformer.") else "transformer." + k
        if k.endswith(CONV1D_WEIGHTS):
            v = v.t()  # Conv1D (in, out) -> Linear (out, in)
        state[k], files[k] = v, path
    wte = state.get("transformer.wte.weight")
    if ("lm_head.weight" in state and wte is not None
            and not torch.equal(state["lm_head.weight"], wte)):
        raise ValueError(f"{files['lm_head.weight']}: lm_head.weight differs from "
                         f"transformer.wte.weight, but this GPT ties them")
    if wte is not None:
        state["lm_head.weight"] = wte
    return state


def _llama_state_dict(raw, config, source):
    """A Llama-family state dict in our keys; every key of theirs checked for presence and shape,
    so a bad file is named with the key of theirs that is wrong."""
    state, used = {}, set()
    for ours, theirs in llama_keys(config):
        parts = []
        for key, shape in theirs:
            if key not in raw:
                raise ValueError(f"{source}: missing key {key}")
            tensor, path = raw[key]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, "
                                 f"expected {shape}")
            parts.append(tensor)
            used.add(key)
        state[ours] = torch.cat(parts) if len(parts) > 1 else parts[0]
    wte = state["transformer.wte.weight"]
    if config.tie_embeddings:
        if "lm_head.weight" in raw and not torch.equal(raw["lm_head.weight"][0], wte):
            raise ValueError(f"{raw['lm_head.weight'][1]}: lm_head.weight differs from "
                             f"model.embed_tokens.weight, but tie_word_embeddings is true")
        used.add("lm_head.weight")
        state["lm_head.weight"] = wte
    # older Llama files carry the rotary frequencies as a buffer; we compute them
    unexpected = [k for k in raw if k not in used and not k.endswith(".rotary_emb.inv_freq")]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{raw[unexpected[0]][1]}: unexpected key {unexpected[0]}{more}")
    return state


def hf_state_dict(model, dtype=None):
    """The model's weights under Hugging Face's names and layouts (the inverse of loading), in
    `dtype` (default: the weights' own); a tied lm_head is left out, as transformers saves it."""
    ours = {k.replace("_orig_mod.", ""): v.detach() for k, v in model.state_dict().items()}
    config = model.config
    if config.llama:
        state = {}
        for key, theirs in llama_keys(config):
            parts = ours[key].split([shape[0] for _, shape in theirs])  # un-stack q/k/v, gate/up
            if len(parts) > 1:  # (copies: safetensors refuses tensors that share memory)
                parts = [part.clone() for part in parts]
            state.update({name: part for (name, _), part in zip(theirs, parts)})
    elif not config.bias:
        raise ValueError("save_pretrained: a GPT-2 built with bias=False has no Hugging Face "
                         "equivalent (GPT-2 has biases in every layer)")
    else:
        state = {k: v.t() if k.endswith(CONV1D_WEIGHTS) else v  # Linear -> Conv1D (in, out)
                 for k, v in ours.items() if k != "lm_head.weight"}
    return {k: v.to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}


HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_config(config, dtype_name):
    """config.json for transformers, in the hub's layout (transformers 4 and 5 both read it)."""
    c = config
    out = dict(architectures=[HF_ARCHITECTURES[c.model_type]], model_type=c.model_type,
               vocab_size=c.vocab_size, tie_word_embeddings=c.tie_embeddings,
               torch_dtype=dtype_name)
    if not c.llama:
        return dict(out, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                    n_head=c.n_head, n_inner=None, activation_function="gelu_new",
                    layer_norm_epsilon=c.norm_eps, resid_pdrop=c.dropout, embd_pdrop=c.dropout,
                    attn_pdrop=c.dropout)
    rope_scaling = dict(rope_type="llama3", **c.rope_scaling) if c.rope_scaling else None
    out.update(hidden_size=c.n_embd, intermediate_size=c.inner, num_hidden_layers=c.n_layer,
               num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
               head_dim=c.head_size, hidden_act="silu", max_position_embeddings=c.block_size,
               rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, rope_scaling=rope_scaling,
               attention_dropout=c.dropout)
    if c.model_type != "qwen2":  # (Qwen2's q/k/v biases come with its model_type)
        out.update(attention_bias=False)
    if c.model_type == "llama":
        out.update(mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
    return out


def _copy_weights(model, state, source):
    """Copy `state` into `model` by name; every key must match in name and shape."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(f"{source}: {what} key {keys[0]}{more}")
    with torch.no_grad():
        for k, w in ours.items():
            if state[k].shape != w.shape:
                raise ValueError(f"{source}: {k} has shape {tuple(state[k].shape)}, "
                                 f"expected {tuple(w.shape)}")
            w.copy_(state[k])


# -----------------------------------------------------------------------------
# our checkpoints: one file, written atomically


def save_checkpoint(path, model, optimizer=None, **extra):
    """torch.save {'format': 'nanoadpo', 'config', 'model', 'optimizer'?, **extra} to `path`,
    atomically (common.atomic_write: an interrupted save leaves the previous checkpoint intact).
    Keep extras to tensors and plain Python values (load_checkpoint reads weights_only)."""
    path = os.fspath(path)
    clash = {"format", "config", "model", "optimizer"} & set(extra)
    if clash:
        raise ValueError(f"save_checkpoint: extra keys {sorted(clash)} are reserved")
    raw = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}
    ckpt = {"format": "nanoadpo", "config": _config_dict(raw.config), "model": state}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    ckpt.update(extra)
    atomic_write(path, lambda f: torch.save(ckpt, f))


def _config_dict(config):
    """The config as a checkpoint stores it: the fields the Llama family added only where they
    differ from their defaults, so a GPT-2 checkpoint is exactly what it was before them."""
    defaults = {f.name: f.default for f in fields(GPTConfig)}
    return {k: v for k, v in asdict(config).items()
            if k not in LLAMA_FIELDS or v != defaults[k]}


def load_checkpoint(path, map_location="cpu", mmap=False):
    """Read a checkpoint written by save_checkpoint ->
    dict(format, config, model, optimizer?, **extra). mmap=True maps the tensors lazily instead of
    reading them (cheap when only the extras are wanted)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, mmap=mmap,
                          weights_only=True)  # never runs pickled code
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not a readable checkpoint (truncated, corrupt, or holding "
                         f"objects other than tensors and plain Python values): "
                         f"{type(e).__name__}: {reason}") from None
    if (not isinstance(ckpt, dict) or ckpt.get("format") != "nanoadpo"
            or "config" not in ckpt or "model" not in ckpt):
        raise ValueError(f"{path}: not a nanoADPO checkpoint "
                         f"(expected a dict with format='nanoadpo', config and model); "
                         f"for Hugging Face weights pass their folder to GPT.from_pretrained")
    return ckpt


# -----------------------------------------------------------------------------
# hardware peaks (for MFU)

# dense (no sparsity) bf16 tensor-core peak FLOP/s by GPU name; fp16 for V100, which has no bf16.
# More specific names first: "H100 PCIe" must win over "H100".
GPU_PEAK_FLOPS = (
    ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h100", 989e12), ("gh200", 989e12),
    ("h200", 989e12), ("a100", 312e12), ("a10g", 125e12), ("l40s", 362e12), ("l4", 121e12),
    ("rtx 4090", 165e12), ("rtx 3090", 71e12), ("v100", 125e12),
)


def peak_flops(device=None):
    """Dense bf16 peak FLOP/s of a CUDA device (default: the current one) looked up by name;
    None if unknown."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((flops for key, flops in GPU_PEAK_FLOPS if key in name), None)


_device_peak_flops = peak_flops  # estimate_mfu's `peak_flops` argument shadows the function's name
