"""
LoRA (Hu et al. 2021, arXiv 2106.09685): trainable low-rank adapters beside the frozen weights of a
model.GPT, written out as nanoGPT would.

    apply_lora(model, rank=16, alpha=32)   # every attention and MLP projection; the rest frozen
    lora_settings(model)                   # dict(rank, alpha, targets, dropout, base_digest?)
    base_digest(model)                     # a fingerprint of the frozen weights, to pin them
    model.merged_state_dict()              # W + (α/r)·B·A folded in: what an export writes

The reference of the preference stage stays the frozen base: its per-token log-probs are computed
once before the adapters train (train.py), as without LoRA. checkpoint.py saves the adapters, the
name of their base and its digest; hf.py merges them for a plain export or writes them in PEFT's
format.
"""
import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# decision: targets are named as PEFT names them, by the Hugging Face module names (q_proj, ...,
# down_proj; GPT-2's c_attn, attn.c_proj, c_fc, mlp.c_proj), so `--lora_targets q_proj,v_proj`
# means here what it means there. Our fused projections stack several of theirs on the output
# dimension (c_attn: q, k, v; the SwiGLU's c_fc: gate, up). Each stacked projection gets its own
# A_i (r, in) and B_i (rows_i, r), as PEFT gives each of its modules, so the fused update is the
# block matrix [B_q A_q; B_k A_k; B_v A_v] and cutting it at the same rows gives PEFT's adapters
# exactly. (Hugging Face's GPT-2 has a fused c_attn too: one adapter there, as in PEFT.)


def lora_parts(config):
    """{our projection inside each block: [(target name, its rows of the output)]}: what a LoRA
    target can name, and how our fused projections stack them."""
    C = config.n_embd
    if not config.llama:
        return {"attn.c_attn": [("c_attn", 3 * C)], "attn.c_proj": [("attn.c_proj", C)],
                "mlp.c_fc": [("c_fc", 4 * C)], "mlp.c_proj": [("mlp.c_proj", C)]}
    q, kv = config.n_head * config.head_size, config.kv_heads * config.head_size
    return {"attn.c_attn": [("q_proj", q), ("k_proj", kv), ("v_proj", kv)],
            "attn.c_proj": [("o_proj", C)],
            "mlp.c_fc": [("gate_proj", config.inner), ("up_proj", config.inner)],
            "mlp.c_proj": [("down_proj", C)]}


def lora_targets(config, targets):
    """'attn,mlp' (the default: every projection of attention and MLP), or names such as
    'q_proj,v_proj' -> the target names, in the model's order. An unknown name: ValueError."""
    parts = lora_parts(config)
    groups = {g: [n for path, ps in parts.items() if path.startswith(g + ".") for n, _ in ps]
              for g in ("attn", "mlp")}
    names = groups["attn"] + groups["mlp"]
    chosen = set()
    for t in (t.strip() for t in targets.split(",")):
        if t not in names and t not in groups:
            raise ValueError(f"--lora_targets: {t!r} is not a projection of this "
                             f"{config.model_type} model (expected attn, mlp or some of "
                             f"{', '.join(names)})")
        chosen.update(groups.get(t, [t]))
    return [n for n in names if n in chosen]


class LoRALinear(nn.Module):
    """A frozen nn.Linear (its own weight and bias tensors, under the same names) plus a trainable
    low-rank update of some of the projections it stacks:

        y = x Wᵀ + b + (α/r) · [B_1 A_1 x ; B_2 A_2 x ; ...]      A_i (r, in), B_i (rows_i, r)

    with 0 for a part no target names. B = 0 at init (A as nn.Linear's, PEFT's), so the adapted
    model starts equal to its base. Dropout (PEFT's lora_dropout) acts on the update's input."""

    def __init__(self, linear, parts, rank, alpha, dropout=0.0, generator=None, base_digest=None):
        super().__init__()
        self.register_parameter("weight", linear.weight)  # the base's tensors, frozen
        self.register_parameter("bias", linear.bias)
        self.parts = parts  # [(target name, rows, adapted?)] in the order of the output rows
        self.rank, self.alpha = rank, alpha
        self.base_digest = base_digest  # (base_digest() of the model the adapters sit on)
        self.adapted_rows = [rows for _, rows, on in parts if on]
        w = linear.weight
        self.lora_A = nn.Parameter(torch.empty(len(self.adapted_rows) * rank, w.size(1),
                                               device=w.device))  # (k·r, in): A_1 .. A_k stacked
        self.lora_B = nn.Parameter(torch.zeros(sum(self.adapted_rows), rank, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.lora_dropout = nn.Dropout(dropout)

    def deltas(self, a, up):
        """The k updates, with zeros for the parts left out, stacked on the last dimension.
        a: A_i's outputs (.., k·r), up(a_i, B_i) -> (.., rows_i)."""
        updates = iter(up(ai, bi) for ai, bi in zip(a.split(self.rank, dim=-1),
                                                     self.lora_B.split(self.adapted_rows)))
        parts = [next(updates) if on else a.new_zeros(*a.shape[:-1], rows)
                 for _, rows, on in self.parts]
        return torch.cat(parts, dim=-1)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)                         # (B, T, out)
        a = F.linear(self.lora_dropout(x), self.lora_A)                 # (B, T, k·r): every A_i x
        return y + (self.alpha / self.rank) * self.deltas(a, F.linear)  # + (α/r) [B_i A_i x]

    def merged_weight(self):  # (out, in): W + (α/r) [B_1 A_1; ...]
        a = self.lora_A.t()                                             # (in, k·r)
        delta = self.deltas(a, lambda ai, bi: ai @ bi.t())              # (in, out)
        return self.weight + (self.alpha / self.rank) * delta.t()

    def adapters(self):  # [(target name, A_i (r, in), B_i (rows_i, r))] of the adapted parts
        names = [name for name, _, on in self.parts if on]
        return list(zip(names, self.lora_A.split(self.rank), self.lora_B.split(self.adapted_rows)))


def apply_lora(model, rank, alpha, targets="attn,mlp", dropout=0.0, seed=0, base_digest=None):
    """Freeze every weight of `model` and put LoRA adapters on the projections `targets` names
    (lora_targets), in every block; in place, returns the model. A is drawn from `seed`.
    base_digest: base_digest(model) before the adapters, kept in lora_settings (checkpoints
    record it, and refuse any other base)."""
    if lora_settings(model) is not None:
        raise ValueError("apply_lora: the model has LoRA adapters already")
    names = lora_targets(model.config, targets)
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.transformer.h:
        for path, parts in lora_parts(model.config).items():
            marked = [(name, rows, name in names) for name, rows in parts]
            if any(on for _, _, on in marked):
                parent, leaf = path.split(".")
                linear = getattr(getattr(block, parent), leaf)
                setattr(getattr(block, parent), leaf,
                        LoRALinear(linear, marked, rank, alpha, dropout, generator, base_digest))
    return model


def base_digest(model, values=1024):
    """A fingerprint of a model's weights (the adapters' aside): the sha256 of every tensor's
    name, shape and `values` of its elements at evenly spaced places. decision: a sample, not
    every byte, so that checking a base costs nothing next to loading it (an 8B model's 32 GB
    would take longer to hash than to read); two different bases (another model, another random
    init, another fine-tune) differ nearly everywhere, so in the sample too."""
    h = hashlib.sha256()
    for name, w in sorted(model.state_dict().items()):
        if ".lora_" in name:
            continue
        flat = w.detach().reshape(-1)
        at = torch.linspace(0, flat.numel() - 1, min(values, flat.numel()), dtype=torch.float64)
        h.update(f"{name} {tuple(w.shape)}".encode())
        h.update(flat[at.long()].float().cpu().numpy().tobytes())
    return h.hexdigest()


def lora_settings(model):
    """The adapters' settings read off the model -> dict(rank, alpha, targets, dropout, and
    base_digest where apply_lora was given it), or None for a model without LoRA."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not mods:
        return None
    targets = dict.fromkeys(name for m in mods for name, _, on in m.parts if on)
    settings = dict(rank=mods[0].rank, alpha=mods[0].alpha, targets=",".join(targets),
                    dropout=mods[0].lora_dropout.p)
    if mods[0].base_digest is not None:
        settings["base_digest"] = mods[0].base_digest
    return settings
