"""
GPT-2 in one file, for preference optimisation.

Read top to bottom: config, the three modules of a transformer block, the GPT itself (forward,
per-token log-probabilities, generation with a KV cache, optimizer and FLOP helpers), loading GPT-2
weights from the Hugging Face hub or a local folder, and our own single-file checkpoints.

Module names mirror the GPT-2 checkpoint keys (transformer.wte, transformer.h.0.attn.c_attn, ...)
so that loading pretrained weights is a copy by name. `transformers` is never imported here;
it is only the independent reference the tests compare against.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import atomic_write

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

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by "
                             f"n_head ({self.n_head})")


class KVCache:
    """Keys and values of every layer, preallocated once for the whole generation.

    k[layer], v[layer]: (B, n_head, max_len, head_dim). `pos` counts the filled columns;
    a forward pass writes its T new columns at [pos, pos+T) in every layer,
    then the model advances `pos` by T."""

    def __init__(self, n_layer, max_len):
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.max_len, self.pos = max_len, 0

    def update(self, layer, k, v):  # k, v: (B, nh, T, hs) for the new tokens
        if self.k[layer] is None:
            # allocated on first use so it takes the dtype the model really computes in
            # (bf16 under autocast)
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nh, self.max_len, hs)
            self.v[layer] = v.new_zeros(B, nh, self.max_len, hs)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, pos+T, hs)

    def keep(self, rows):  # drop finished rows from the batch so they cost nothing from now on
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        # q, k, v in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.layer_idx = config.n_head, config.dropout, layer_idx

    def forward(self, x, attn_mask=None, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)                      # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is None:
            # training / scoring: plain causal attention, flash kernel on CUDA
            y = F.scaled_dot_product_attention(q, k, v,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)
        else:
            # generation: attend to everything cached so far;
            # the explicit mask hides the left padding
            k, v = kv_cache.update(self.layer_idx, k, v)             # (B, nh, pos+T, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
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


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache)  # pre-norm residual stream
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
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2: one (V, C) matrix
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
        """Parameter count; the tied wte/lm_head counts once,
        position embeddings are left out by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def _hidden(self, idx, pos=None, attn_mask=None, kv_cache=None):
        """Final hidden states (B, T, C) after ln_f.
        Generation passes per-row positions, mask and cache."""
        B, T = idx.size()
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx)
                                  + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask, kv_cache)
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
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, seq_len or cfg.block_size
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
        """Load 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' from the Hugging Face hub,
        a local HF folder (config.json + model.safetensors or pytorch_model.bin), or one of our
        checkpoints (a file, or a folder holding ckpt.pt).
        overrides: dropout=..., block_size=... (smaller than the checkpoint's: cropped)."""
        unknown = set(overrides) - {"dropout", "block_size"}
        if unknown:
            raise ValueError(f"from_pretrained: cannot override {sorted(unknown)}; "
                             f"only dropout and block_size")
        src = os.fspath(name_or_path)
        if os.path.isfile(src) or os.path.isfile(os.path.join(src, "ckpt.pt")):
            path = src if os.path.isfile(src) else os.path.join(src, "ckpt.pt")
            ckpt = load_checkpoint(path)
            names = {f.name for f in fields(GPTConfig)}
            if not isinstance(ckpt["config"], dict) or set(ckpt["config"]) - names:
                raise ValueError(f"{path}: checkpoint config has fields GPTConfig does not know: "
                                 f"{ckpt['config']}")
            config, state, source = GPTConfig(**ckpt["config"]), ckpt["model"], path
        elif os.path.isdir(src):
            config_path, weight_paths = os.path.join(src, "config.json"), _local_weight_files(src)
            if not os.path.isfile(config_path):
                raise FileNotFoundError(f"{src}: folder has no config.json "
                                        f"(expected a Hugging Face GPT-2 folder "
                                        f"or a folder holding our ckpt.pt)")
            source = weight_paths[0] if len(weight_paths) == 1 else src
            config, state = _config_from_hf(config_path), _hf_state_dict(weight_paths)
        elif src in HUB_MODELS or src.removeprefix("openai-community/") in HUB_MODELS:
            # checked against the list first: no stray calls
            config_path, weight_path = _download_from_hub(src)
            config, state, source = (_config_from_hf(config_path), _hf_state_dict([weight_path]),
                                     weight_path)
        elif os.sep in src or src.endswith((".pt", ".bin", ".safetensors")):
            raise FileNotFoundError(f"{src}: no such file or folder")
        else:
            raise ValueError(f"unknown model {src!r}: expected one of {', '.join(HUB_MODELS)}, "
                             f"a local Hugging Face folder (config.json + model.safetensors), "
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
        return model


def _local_weight_files(folder):
    """The weight file(s) of an HF folder: model.safetensors, its shards, or pytorch_model.bin."""
    single, index = (os.path.join(folder, "model.safetensors"),
                     os.path.join(folder, "model.safetensors.index.json"))
    if os.path.isfile(single):
        return [single]
    # save_pretrained shards big models; the index maps each key to a shard
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
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
    """GPTConfig from an HF GPT-2 config.json;
    refuse anything this model would silently compute differently."""
    with open(config_path) as f:
        cfg = json.load(f)

    def refuse(key, expected):
        raise ValueError(f"{config_path}: {key}={cfg.get(key)!r} cannot be represented "
                         f"by this GPT-2 (expected {expected})")

    for key in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):
        if not isinstance(cfg.get(key), int):
            refuse(key, "an integer")
    if cfg.get("model_type", "gpt2") != "gpt2":
        refuse("model_type", "'gpt2'")
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


def _hf_state_dict(paths):
    """An HF GPT-2 state dict renamed to our keys. Hub gpt2* files lack the 'transformer.' prefix,
    carry the causal-mask buffers h.N.attn.bias / h.N.attn.masked_bias, and have no lm_head.weight
    (it is tied)."""
    raw = {}
    for path in paths:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            part = load_file(path)
        else:
            part = torch.load(path, map_location="cpu", weights_only=True)
        raw.update({k: (v, path) for k, v in part.items()})
    state, source = {}, {}
    for k, (v, path) in raw.items():
        # leading dot: ".attn.c_attn.bias" is a real weight
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        k = k if k == "lm_head.weight" or k.startswith("transformer.") else "transformer." + k
        if k.endswith(CONV1D_WEIGHTS):
            v = v.t()  # Conv1D (in, out) -> Linear (out, in)
        state[k], source[k] = v, path
    wte = state.get("transformer.wte.weight")
    if ("lm_head.weight" in state and wte is not None
            and not torch.equal(state["lm_head.weight"], wte)):
        raise ValueError(f"{source['lm_head.weight']}: lm_head.weight differs from "
                         f"transformer.wte.weight, but this GPT ties them")
    if wte is not None:
        state["lm_head.weight"] = wte
    return state


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
    ckpt = {"format": "nanoadpo", "config": asdict(raw.config), "model": state}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    ckpt.update(extra)
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by save_checkpoint ->
    dict(format, config, model, optimizer?, **extra)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location,
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
