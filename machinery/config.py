"""
Every flag of train.py (Config: Settings, the settings a model is scored with, and the rest)
and the checks made on them before any work: one line naming the flag for every value a run cannot
use. --loss is resolved here too, once, into the Objective that train.py's step reads and the
comparison harness (compare.py) labels.
"""
import inspect
import re
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

from loss import LOSSES, NO_GRANULARITY, REFERENCE_FREE, SEGMENTED, WEIGHTED
from machinery import tracking
from machinery.common import ConfigError, convert, need

# -----------------------------------------------------------------------------
# the settings a model is scored with: train.py's Config extends them, eval.py's EvalConfig too


@dataclass
class Settings:
    # run
    seed: int = 1337            # data order, dropout and sampling (the task itself: task_seed)
    device: str = "auto"        # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"         # auto (bf16 on CUDA, fp16 on old GPUs, fp32 on CPU) | float32 | ...
    fsdp: bool = False          # under torchrun, shard the weights (training: and grads, AdamW
                                # states) over the ranks (FSDP2) instead of copying them (DDP)
    # tokenizer
    tokenizer: str = "auto"     # auto (byte for scratch, an HF model's, else gpt2) | byte | gpt2
    chat_template: str = "auto"  # auto (an HF model's prompts through its chat template) | none
    # task
    task: str = "arith"         # arith | gsm8k | a local file / hub id with question/answer columns
    task_seed: int = 0          # the embedded task's generator seed (fixed across --seed)
    arith_steps: int = 2        # arith difficulty: steps per problem, operand range, operations
    arith_max_steps: int = 0    # with it, each problem has arith_steps..arith_max_steps steps
                                # (0: arith_steps exactly): one task of short and long answers
    arith_max_number: int = 10
    arith_ops: str = "+-"
    n_train: int = 4000         # training questions (0 = all)
    n_test: int = 3000          # test questions for accuracy (0 = all): enough for a paired CI of
                                # about ±1.7 points on the gain over SFT
    max_len: int = 256          # prompt + response tokens (prompt cut first, keeping its end)
    # generation and evaluation
    max_new_tokens: int = 96
    eval_batch_size: int = 128
    maj_k: int = 1              # maj@k on the test split as well as greedy accuracy (1 = off)
    # the preference loss (and its metrics: β, family, size; loss, family and eos_pad decide the
    # paper's EOS padding of the static family)
    loss: str = "adpo"          # any key of loss.LOSSES, or terms joined by + (train.py --loss)
    beta: float = 0.5           # (0.1 is common for LLMs; 0.5 kept this tiny model's accuracy)
    family: str = "static"      # ADPO granularity family: static (window k) | adaptive (m segments)
    size: int = 1               # k or m; static k=1 is the paper's token-level ADPO (Table 1)
    eos_pad: bool = True        # pad the shorter response of a pair with EOS (static family, paper)


def settings_of(cfg):
    """The Settings a checkpoint records it was trained with (train.py saves them in every
    ckpt.pt: a --compare variant's loss, family, size and seed are its own, not the run's), so
    that eval.py scores it with them. Device and dtype are left out: they change nothing it is."""
    return {f.name: getattr(cfg, f.name) for f in fields(Settings)
            if f.name not in ("device", "dtype")}


@dataclass
class Config(Settings):
    """Every flag of train.py. The settings a model is scored with (seed, device, dtype, tokenizer,
    the task, generation, the loss and its granularity) are Settings, shared with eval.py."""
    # run
    out_dir: str = "out/default"
    compile: bool = False       # torch.compile the training forward
    stop_after: str = "po"      # sft | pairs | po: the stages up to this one (re-run to continue)
    # model
    init_from: str = "scratch"  # scratch | gpt2 | gpt2-medium | -large | -xl | HF folder | ckpt.pt
                                # | a hub id: Qwen/Qwen2.5-0.5B-Instruct, meta-llama/Llama-3.2-1B...
    activation_checkpointing: bool = False  # recompute activations in backward: less memory
    lora_rank: int = 0          # LoRA: train rank-r adapters, the weights frozen (0 = off: all)
    lora_alpha: float = 16.0    # the adapters' update is scaled by lora_alpha / lora_rank
    lora_targets: str = "attn,mlp"  # attn, mlp, or projections by HF name: q_proj,v_proj,...
    lora_dropout: float = 0.0   # dropout on the adapters' input (PEFT's lora_dropout)
    plan: bool = False          # print the memory plan (plan.py) per stage and GPU; no training
    plan_gpus: int = 8          # the N of the plan's fsdp<N> mode
    gpu_gib: float = 0.0        # the GPU memory the plan checks against (0: this run's GPU, or 80)
    n_layer: int = 4            # scratch only
    n_head: int = 4
    n_embd: int = 96
    block_size: int = 256
    dropout: float = 0.0
    # SFT
    sft_steps: int = 1000
    sft_batch_size: int = 32
    sft_lr: float = 1e-2
    # pairs
    pairs_source: str = "sample"  # sample (on-policy: the SFT model) | offline (arith) | a dataset
    n_pair_questions: int = 0     # training questions to sample on (0 = all)
    n_samples: int = 4            # samples per question
    temperature: float = 0.5      # (below 1: rejected samples near the model's greedy mistakes)
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # nucleus sampling: the smallest set of top tokens holding top_p
                                  # of the probability (1 = off)
    val_frac: float = 0.1         # pairs held out for reward accuracy
    # preference optimisation (the loss, beta, family, size, eos_pad: Settings)
    gamma: float = 0.5          # SimPO margin
    nll_weight: float = 0.0     # λ of an SFT term on the chosen response (0 = pure ADPO)
    segment_mean: bool = False  # ADPO: mean over the T' segments instead of the paper's sum
    loss_weights: str = ""      # one weight per term of --loss, e.g. 1,0.5 for dpo+sft ("" = 1s)
    label_smoothing: float = 0.0  # robust: the rate ε of flipped labels; exo_pair: its ε (> 0)
    discopop_tau: float = 0.05  # DiscoPOP's τ
    dpop_lambda: float = 50.0   # DPO-Positive's λ (Smaug, arXiv 2402.13228; 0 = DPO)
    ld_alpha: float = 1.0       # LD-DPO's α on the tokens past the shorter response (1 = off)
    use_weighting: bool = False  # WPO's pair weights on every term of the loss
    po_epochs: float = 2.0
    po_batch_size: int = 16     # pairs per optimizer step
    po_lr: float = 1e-4
    # cDPO / cADPO: the positive and negative models of the contrastive token weights
    cdpo_steps: int = 100
    cdpo_batch_size: int = 32
    cdpo_lr: float = 1e-3
    # optimisation (every stage)
    grad_accum: int = 1
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    # logging / checkpoints
    log_every: int = 10         # print a step's metrics every log_every steps (metrics.jsonl: all)
    ckpt_every: int = 100       # training-state checkpoint interval (steps), to resume mid-stage
    report_to: str = "none"     # none | tensorboard | wandb | trackio: metrics.jsonl's numbers
                                # and each stage's evaluation, also sent there (pip install it)
    # comparison harness (see the module docstring)
    compare: str = ""           # variants, e.g. dpo,adpo:static:4,adpo:adaptive:256,ipo,simpo
    seeds: str = "0"            # every variant runs once per seed (of the preference stage)
    pipeline_seeds: str = ""    # e.g. 0,1,2: the whole pipeline (SFT, pairs, every variant) once
                                # per seed, each in DIR/seed_<s>/, pooled in DIR/compare.md
    baseline: str = "dpo"       # the variant the others are compared with (paired, per question)


# flags that may change between the runs of one folder: they change nothing a stage computes
RUN_ONLY = ("out_dir", "stop_after", "compare", "seeds", "pipeline_seeds", "baseline", "device",
            "log_every",
            "ckpt_every", "activation_checkpointing", "report_to", "plan", "plan_gpus",
            "gpu_gib")
STAGES = ("sft", "pairs", "po")


def validate_settings(cfg):
    """The Settings (train.py's Config and eval.py's EvalConfig alike): one line naming the flag
    for every value a model cannot be trained or scored with; checked before any work."""
    need(not re.search(r"(^|\+)\s*[\d.]", cfg.loss),  # 0.5sft: --compare's spelling
         f"--loss {cfg.loss!r}: give the weights with --loss_weights "
         f"(e.g. --loss dpo+sft --loss_weights 1,0.5)")
    try:
        parse_loss(cfg.loss)
    except ValueError as e:
        raise ConfigError(f"--loss {cfg.loss!r}: {e} (add yours to LOSSES in loss.py)") from None
    need(cfg.beta > 0, f"--beta must be > 0, got {cfg.beta}")
    need(cfg.size >= 1, f"--size (k or m) must be >= 1, got {cfg.size}")
    need(cfg.family in ("static", "adaptive"),
         f"--family must be static or adaptive, got {cfg.family!r}")
    need(cfg.tokenizer in ("auto", "byte", "gpt2"),
         f"--tokenizer {cfg.tokenizer!r}: expected auto, byte or gpt2")
    need(cfg.chat_template in ("auto", "none"),
         f"--chat_template {cfg.chat_template!r}: expected auto or none")
    for k in ("eval_batch_size", "max_new_tokens", "maj_k"):
        need(getattr(cfg, k) >= 1, f"--{k} must be >= 1, got {getattr(cfg, k)}")
    need(cfg.max_len >= 2, f"--max_len must be >= 2 (a prompt token and a response token; "
                           f"the prompt is cut to half of it), got {cfg.max_len}")
    for k in ("n_train", "n_test", "seed", "task_seed"):
        need(getattr(cfg, k) >= 0, f"--{k} must be >= 0, got {getattr(cfg, k)}")
    for k in ("task", "arith_ops"):
        need(getattr(cfg, k).strip() != "",
             f"--{k} is empty (expected e.g. {getattr(Settings, k)!r})")


def validate(cfg):
    """Config: its Settings (validate_settings), then the flags of training, each a one-line
    error naming the flag; checked before any work."""
    validate_settings(cfg)
    validate_loss(cfg)
    need(cfg.stop_after in STAGES, f"--stop_after must be one of {STAGES}, got {cfg.stop_after!r}")
    need(cfg.report_to in tracking.REPORT_TO,
         f"--report_to {cfg.report_to!r}: expected one of {', '.join(tracking.REPORT_TO)}")
    for k in ("sft_batch_size", "po_batch_size", "cdpo_batch_size", "cdpo_steps", "grad_accum",
              "n_samples", "plan_gpus", "log_every", "ckpt_every", "n_layer", "n_head",
              "n_embd", "block_size"):
        need(getattr(cfg, k) >= 1, f"--{k} must be >= 1, got {getattr(cfg, k)}")
    for k in ("sft_steps", "n_pair_questions", "top_k", "weight_decay", "grad_clip",
              "nll_weight", "lora_rank", "gpu_gib"):
        need(getattr(cfg, k) >= 0, f"--{k} must be >= 0, got {getattr(cfg, k)}")
    for k in ("sft_lr", "po_lr", "cdpo_lr", "temperature", "po_epochs", "lora_alpha"):
        need(getattr(cfg, k) > 0, f"--{k} must be > 0, got {getattr(cfg, k)}")
    need(cfg.arith_max_steps == 0 or cfg.arith_max_steps >= cfg.arith_steps,
         f"--arith_max_steps {cfg.arith_max_steps}: expected 0 (off) or at least --arith_steps "
         f"({cfg.arith_steps})")
    need(0 <= cfg.val_frac < 1, f"--val_frac must be in [0, 1), got {cfg.val_frac}")
    need(0 < cfg.top_p <= 1, f"--top_p must be in (0, 1], got {cfg.top_p}")
    need(0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}")
    need(0 <= cfg.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    need(0 <= cfg.warmup_frac <= 1, f"--warmup_frac must be in [0, 1], got {cfg.warmup_frac}")
    need(cfg.n_embd % cfg.n_head == 0,
         f"--n_embd ({cfg.n_embd}) must be a multiple of --n_head ({cfg.n_head})")
    need(all(b % cfg.grad_accum == 0
             for b in (cfg.sft_batch_size, cfg.po_batch_size, cfg.cdpo_batch_size)),
         f"--grad_accum ({cfg.grad_accum}) must divide --sft_batch_size ({cfg.sft_batch_size}), "
         f"--po_batch_size ({cfg.po_batch_size}) and --cdpo_batch_size ({cfg.cdpo_batch_size})")
    for k in ("out_dir", "init_from", "pairs_source"):
        need(getattr(cfg, k).strip() != "",
             f"--{k} is empty (expected e.g. {getattr(Config, k)!r})")
    need(cfg.n_samples >= 2 or cfg.pairs_source != "sample" or cfg.stop_after == "sft",
         f"--n_samples {cfg.n_samples} makes no pairs: a pair is a right and a wrong sample of "
         f"one question (expected >= 2 with --pairs_source sample)")
    need(cfg.pairs_source != "offline" or cfg.task == "arith",
         "--pairs_source offline needs --task arith (it corrupts the task's own solutions)")
    if cfg.init_from == "scratch":  # (a loaded model's context is checked in build_model)
        need(cfg.max_len <= cfg.block_size, f"--max_len {cfg.max_len} exceeds the model's "
                                            f"context (--block_size {cfg.block_size})")
        need(cfg.max_new_tokens < cfg.block_size,
             f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's "
             f"context (expected < --block_size {cfg.block_size})")


def check_context(cfg, context):
    """--max_len and --max_new_tokens against the context of the model a run loads (a model
    from scratch: --block_size, checked in validate), once its config is read: by
    train.build_model, and by the memory plan before it traces anything."""
    need(cfg.max_len <= context,
         f"--max_len {cfg.max_len} exceeds the model's context of {context} tokens")
    need(cfg.max_new_tokens < context,
         f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's "
         f"context of {context} tokens (expected < {context})")


# -----------------------------------------------------------------------------
# the loss spec: what --loss names (terms joined by +, each NAME or NAME:FAMILY:SIZE), over the
# losses loss.py registers


def parse_loss(spec):
    """A loss spec, what --loss names -> [(name, family, size)], one per term: terms joined by +,
    each NAME or NAME:FAMILY:SIZE; family and size are None where a term names no granularity.
    'dpo+sft' -> [('dpo', None, None), ('sft', None, None)], 'hinge:adaptive:16' ->
    [('hinge', 'adaptive', 16)]. A bad spec is a ValueError of one line."""
    terms = []
    for term in spec.split("+"):
        name, *granularity = term.strip().split(":")
        need(name in LOSSES, f"expected one of {', '.join(LOSSES)}, or terms of them joined "
                             f"by + (e.g. dpo+sft): {name!r} is none of them")
        if not granularity:
            terms.append((name, None, None))
            continue
        need(name not in NO_GRANULARITY,
             f"{name} has no granularity ({NO_GRANULARITY.get(name)})")
        family, size = (granularity + [""])[:2]
        need(len(granularity) == 2 and family in ("static", "adaptive")
             and size.isdigit() and int(size) >= 1,
             f"{term.strip()!r}: expected NAME:FAMILY:SIZE, FAMILY static or adaptive and "
             f"SIZE an integer >= 1 (e.g. hinge:adaptive:16)")
        terms.append((name, family, int(size)))
    return terms


def granularities(spec, family=None, size=None):
    """The (family, size) each term of spec compares at, or None (the whole responses): the
    term's own, else family and size (--family/--size) for a bare adpo or cadpo."""
    return [(f, s) if f else (family, size) if name in SEGMENTED else None
            for name, f, s in parse_loss(spec)]


def eos_padded(loss, family, eos_pad=True):
    """Whether the pairs of this loss spec are EOS-padded: the paper pads the shorter response of
    a pair with EOS tokens (y_pad in Figure 1) for the static family only, so when a term of the
    spec compares at the static family (adpo with --family static, or any NAME:static:K);
    --eos_pad false turns it off. The batch builder does the padding
    (data.preference_batch(eos_pad=True)); every term then scores those tokens like any other."""
    return eos_pad and any(g and g[0] == "static" for g in granularities(loss, family))


def metric_granularity(loss, family, size):
    """Where segments/win_rate is measured: at the granularity of the first term of the spec that
    has one (hinge:adaptive:16 -> adaptive 16), else at --family/--size."""
    return next((g for g in granularities(loss, family, size) if g), (family, size))


def validate_loss(cfg):
    """The weights of --loss's terms (--loss itself: validate_settings) and the hyperparameters
    of its terms, each a one-line error naming the flag."""
    terms = parse_loss(cfg.loss)
    weights = [w.strip() for w in cfg.loss_weights.split(",")] if cfg.loss_weights else []
    need(not weights or len(weights) == len(terms),
         f"--loss_weights {cfg.loss_weights!r}: {len(weights)} weights for the {len(terms)} "
         f"terms of --loss {cfg.loss!r} (expected one each)")
    for w in weights:
        need(convert("loss_weights", float, w, text=True) >= 0, f"--loss_weights: {w} is negative")
    names = [name for name, _, _ in terms]
    need(0 <= cfg.label_smoothing < 0.5,
         f"--label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    need("exo_pair" not in names or cfg.label_smoothing > 0,
         "--loss exo_pair needs --label_smoothing > 0 (EXO's ε; its paper uses 1e-3)")
    need(cfg.discopop_tau > 0, f"--discopop_tau must be > 0, got {cfg.discopop_tau}")
    need(cfg.dpop_lambda >= 0, f"--dpop_lambda must be >= 0, got {cfg.dpop_lambda}")
    need(0 <= cfg.ld_alpha <= 1, f"--ld_alpha must be in [0, 1], got {cfg.ld_alpha}")


def loss_options(cfg, name, family=None, size=None):
    """A loss's keyword parameters (beta, gamma, label_smoothing, ...) from the config's keys of
    the same name; family and size: the term's own (hinge:adaptive:16), else --family/--size for
    a bare adpo or cadpo, else none (the loss of the whole responses)."""
    names = list(inspect.signature(LOSSES[name]).parameters)[6:]  # after the six tensors
    options = {k: getattr(cfg, k) for k in names
               if hasattr(cfg, k) and not k.endswith("weights") and k not in ("family", "size")}
    if family is not None:
        options.update(family=family, size=size)
    elif name in SEGMENTED:
        options.update(family=cfg.family, size=cfg.size)
    return options


class Term(NamedTuple):
    """One term of --loss, resolved: weight · fn(six tensors, **options, **batch[from_batch])."""
    name: str           # its key in loss.LOSSES
    fn: Callable        # LOSSES[name]
    weight: float       # from --loss_weights (1 without)
    options: dict       # its keyword arguments: beta, family, size, label_smoothing, ...
    grain: tuple        # (family, size) it compares at, or None: the whole responses
    from_batch: tuple   # what the step's batch hands it: cDPO's rejected_weights, BCO's delta
    desensitised: bool  # LD-DPO applies to it (a loss of log-ratios, --ld_alpha < 1)


class Objective(NamedTuple):
    """What a preference step optimises, resolved once from the config (the step reads it on
    every micro-batch; nothing parses --loss there)."""
    terms: tuple         # the terms of --loss, each a Term
    nll_weight: float    # λ of the chosen response's NLL added to them (0: none)
    ld_alpha: float      # LD-DPO's α (1: off)
    use_weighting: bool  # WPO's pair weights on every term
    beta: float          # the β of the logged rewards
    metric_grain: tuple  # (family, size) where segments/win_rate is measured
    eos_pad: bool        # the pairs are EOS-padded (the paper's static family)

    def uses(self, *names):
        """Whether a term of --loss is one of these losses."""
        return any(term.name in names for term in self.terms)


def resolve_loss(cfg):
    """cfg's --loss, --loss_weights and the settings of its terms, resolved once: an Objective."""
    parsed = parse_loss(cfg.loss)
    weights = [float(w) for w in cfg.loss_weights.split(",")] if cfg.loss_weights else []
    grains = granularities(cfg.loss, cfg.family, cfg.size)
    terms = []
    for (name, family, size), weight, grain in zip(parsed, weights or [1.0] * len(parsed),
                                                   grains):
        from_batch = ("rejected_weights",) if name in WEIGHTED else ()
        from_batch += ("delta",) if name == "bco_pair" else ()
        terms.append(Term(name, LOSSES[name], weight, loss_options(cfg, name, family, size),
                          grain, from_batch, cfg.ld_alpha != 1 and name not in REFERENCE_FREE))
    return Objective(tuple(terms), cfg.nll_weight, cfg.ld_alpha, cfg.use_weighting, cfg.beta,
                     metric_granularity(cfg.loss, cfg.family, cfg.size),
                     eos_padded(cfg.loss, cfg.family, cfg.eos_pad))
