"""
The main job: SFT, then on-policy preference pairs, then preference optimisation (ADPO by default), then eval.

    python train.py                                      # embedded default: tiny GPT from scratch, CPU, <10 min
    python train.py --preset smoke --out_dir out/smoke   # every stage in seconds (what the tests run)
    python train.py --loss dpo --out_dir out/dpo         # another loss: dpo | adpo | ipo | simpo
    python train.py --family adaptive --size 256         # ADPO's headline granularity (paper Table 2)
    python train.py --family static --size 4             # static windows of 4 tokens (paper Table 3)
    python train.py --preset gpt2_gsm8k                  # GPT-2 124M on GSM8K, one GPU
    python train.py --stop_after sft                     # run the stages up to SFT; re-run to continue
    python train.py --compare dpo,adpo,adpo:static:4,adpo:adaptive:16,ipo,simpo --seeds 0,1,2
                                                         # paper Table 3 in miniature: same SFT, same pairs
    torchrun --nproc_per_node=2 train.py ...             # data parallel over 2 GPUs (or CPU processes)

Every flag is a field of `Config` below (`--key value`); `--preset NAME` loads presets/NAME.json first and the
flags you give override it. A run folder holds everything a stage produced, and re-running the same command on
it resumes where it stopped (mid-stage too: training state, optimizer and RNGs are checkpointed).

    DIR/config.json          the resolved config
    DIR/sft/ckpt.pt          SFT model (the reference for the preference stage), sft/eval.json, sft/metrics.jsonl
    DIR/pairs/train.jsonl    preference pairs (+ val.jsonl held out, stats.json, samples.jsonl)
    DIR/po/ckpt.pt           the preference-optimised model, po/eval.json, po/metrics.jsonl
    DIR/summary.json         config + the final metrics of every stage
"""
import dataclasses
import inspect
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import (encode_pairs, encode_sft, extract_answer, get_tokenizer, is_correct, length_grouped_batches,
                  load_pairs, load_task, make_arith_pairs, preference_batch, read_jsonl, sft_batch, write_jsonl)
from eval import accuracy, complete, markdown_table, mean_std, pair_logps, preference_eval
from loss import LOSSES, chosen_nll, feedback_length, preference_metrics
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint


@dataclass
class Config:
    # run
    out_dir: str = "out/default"
    seed: int = 1337
    device: str = "auto"        # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"         # auto (bf16 on CUDA if supported, else fp16; fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False       # torch.compile the training forward
    stop_after: str = "po"      # sft | pairs | po: run the stages up to this one (re-run to continue)
    # model
    init_from: str = "scratch"  # scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | HF folder | our ckpt.pt
    tokenizer: str = "auto"     # auto (byte for scratch, gpt2 otherwise) | byte | gpt2
    n_layer: int = 4            # scratch only
    n_head: int = 4
    n_embd: int = 96
    block_size: int = 256
    dropout: float = 0.0
    # task
    task: str = "arith"         # arith | gsm8k | a local file / hub id with question/answer columns
    task_seed: int = 0          # the embedded task's generator seed (fixed across --seed, so runs share data)
    arith_steps: int = 2        # arith difficulty: steps per problem, operand range, operations
    arith_max_number: int = 10
    arith_ops: str = "+-"
    n_train: int = 4000         # training questions (0 = all)
    n_test: int = 500           # test questions for accuracy (0 = all)
    max_len: int = 256          # prompt + response tokens (prompt cut first, keeping its end)
    # SFT
    sft_steps: int = 1000
    sft_batch_size: int = 32
    sft_lr: float = 1e-2
    # pairs
    pairs_source: str = "sample"  # sample (on-policy from the SFT model) | offline (arith task) | pair dataset
    n_pair_questions: int = 1000  # training questions to sample on (0 = all)
    n_samples: int = 4            # samples per question
    temperature: float = 1.0
    top_k: int = 0                # 0 = off
    max_new_tokens: int = 96
    val_frac: float = 0.1         # pairs held out for reward accuracy
    # preference optimisation
    loss: str = "adpo"          # any key of loss.LOSSES
    beta: float = 0.5           # (0.1 is common for LLMs; 0.5 kept this tiny model's accuracy, see README)
    family: str = "static"      # ADPO granularity family: static (window k) | adaptive (m segments)
    size: int = 1               # k or m; static k=1 is the paper's token-level ADPO (Table 1)
    gamma: float = 0.5          # SimPO margin
    eos_pad: bool = True        # pad the shorter response of a pair with EOS (the paper's static-family padding)
    nll_weight: float = 0.0     # λ of an SFT term on the chosen response (0 = pure ADPO)
    po_epochs: float = 2.0
    po_batch_size: int = 16     # pairs per optimizer step
    po_lr: float = 1e-4
    # optimisation (both stages)
    grad_accum: int = 1
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    # eval / logging / checkpoints
    eval_batch_size: int = 128
    maj_k: int = 1              # maj@k on the test split as well as greedy accuracy (1 = off)
    log_every: int = 10
    ckpt_every: int = 100       # training-state checkpoint interval (steps), for resuming mid-stage
    # comparison harness (see module docstring)
    compare: str = ""
    seeds: str = "0"


RUN_ONLY = {"out_dir", "stop_after", "compare", "seeds", "device", "log_every", "ckpt_every"}  # may change between resumes
STAGES = ("sft", "pairs", "po")


# -----------------------------------------------------------------------------
# config: presets/NAME.json, then --key value flags; clear errors for unknown flags and bad values


class ConfigError(ValueError):
    pass


def _convert(name, typ, value):
    try:
        if typ is bool:
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int and isinstance(value, float) and not value.is_integer():  # a preset's 2.5 is no int
            raise ValueError
        return typ(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"--{name} expects {typ.__name__}, got {value!r}") from None


def parse_config(argv):
    types = {f.name: f.type if isinstance(f.type, type) else eval(f.type) for f in fields(Config)}
    flags, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: flags are --key value (see Config in train.py)")
        key, _, value = arg[2:].partition("=")
        if not _:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        flags[key], i = value, i + 1
    overrides = {}
    if "preset" in flags:
        name = flags.pop("preset")
        path = name if name.endswith(".json") else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                "presets", f"{name}.json")
        if not os.path.isfile(path):
            raise ConfigError(f"--preset {name}: no such preset file {path}")
        with open(path, encoding="utf-8") as f:
            try:
                overrides = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"preset {path}: not valid JSON ({e})") from None
        if not isinstance(overrides, dict):
            raise ConfigError(f"preset {path}: expected a JSON object of Config fields, got {type(overrides).__name__}")
        overrides = {k: v for k, v in overrides.items() if not k.startswith("_")}  # "_comment" keys
        for k in overrides:
            if k not in types:
                raise ConfigError(f"preset {path}: unknown key {k!r} (expected a field of Config in train.py)")
    for k, v in flags.items():
        if k not in types:
            raise ConfigError(f"unknown flag --{k} (expected one of the fields of Config in train.py)")
        overrides[k] = v
    cfg = Config(**{k: _convert(k, types[k], v) for k, v in overrides.items()})
    validate(cfg)
    if cfg.compare:  # checked here, not in validate (parse_variant validates each variant): fail before any training
        compare_plan(cfg)
    return cfg


def validate(cfg):
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)
    need(cfg.loss in LOSSES, f"--loss {cfg.loss!r}: expected one of {sorted(LOSSES)} (add yours to LOSSES in loss.py)")
    need(cfg.beta > 0, f"--beta must be > 0, got {cfg.beta}")
    need(cfg.size >= 1, f"--size (k or m) must be >= 1, got {cfg.size}")
    need(cfg.family in ("static", "adaptive"), f"--family must be static or adaptive, got {cfg.family!r}")
    need(cfg.stop_after in STAGES, f"--stop_after must be one of {STAGES}, got {cfg.stop_after!r}")
    need(cfg.dtype in ("auto", "float32", "bfloat16", "float16"), f"--dtype {cfg.dtype!r}: expected auto, float32, bfloat16 or float16")
    need(cfg.tokenizer in ("auto", "byte", "gpt2"), f"--tokenizer {cfg.tokenizer!r}: expected auto, byte or gpt2")
    for k in ("sft_batch_size", "po_batch_size", "grad_accum", "eval_batch_size", "n_samples", "max_new_tokens",
              "max_len", "log_every", "ckpt_every", "maj_k", "n_layer", "n_head", "n_embd", "block_size"):
        need(getattr(cfg, k) >= 1, f"--{k} must be >= 1, got {getattr(cfg, k)}")
    for k in ("sft_steps", "n_train", "n_test", "n_pair_questions", "top_k"):
        need(getattr(cfg, k) >= 0, f"--{k} must be >= 0, got {getattr(cfg, k)}")
    for k in ("sft_lr", "po_lr", "temperature", "po_epochs"):
        need(getattr(cfg, k) > 0, f"--{k} must be > 0, got {getattr(cfg, k)}")
    need(0 <= cfg.val_frac < 1, f"--val_frac must be in [0, 1), got {cfg.val_frac}")
    need(0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}")
    need(cfg.n_embd % cfg.n_head == 0, f"--n_embd ({cfg.n_embd}) must be a multiple of --n_head ({cfg.n_head})")
    need(cfg.po_batch_size % cfg.grad_accum == 0 and cfg.sft_batch_size % cfg.grad_accum == 0,
         f"--grad_accum ({cfg.grad_accum}) must divide --sft_batch_size ({cfg.sft_batch_size}) and "
         f"--po_batch_size ({cfg.po_batch_size})")
    for f in fields(Config):
        value = getattr(cfg, f.name)
        if isinstance(value, float):
            need(math.isfinite(value), f"--{f.name} must be a finite number, got {value}")
        if f.name in ("out_dir", "init_from", "task", "pairs_source", "arith_ops"):
            need(value.strip() != "", f"--{f.name} is empty (expected e.g. {f.default!r})")
    for k in ("seed", "task_seed", "weight_decay", "grad_clip", "nll_weight"):
        need(getattr(cfg, k) >= 0, f"--{k} must be >= 0, got {getattr(cfg, k)}")
    need(0 <= cfg.warmup_frac <= 1, f"--warmup_frac must be in [0, 1], got {cfg.warmup_frac}")
    need(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device) is not None,
         f"--device {cfg.device!r}: expected auto, cpu, cuda, cuda:N or mps")
    need(cfg.pairs_source != "offline" or cfg.task == "arith",
         "--pairs_source offline needs --task arith (it corrupts the task's own solutions)")
    if cfg.init_from == "scratch":  # (a loaded model's context is checked when it is loaded, in build_model)
        need(cfg.max_len <= cfg.block_size, f"--max_len {cfg.max_len} exceeds the model's context "
                                            f"(--block_size {cfg.block_size})")
        need(cfg.max_new_tokens < cfg.block_size, f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt "
                                                  f"in the model's context (expected < --block_size {cfg.block_size})")


# -----------------------------------------------------------------------------
# run-wide state: device, precision, data-parallel ranks, printing, atomic json


def setup(cfg):
    global RANK, WORLD, MASTER, COMM_DEVICE
    RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    MASTER = RANK == 0
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no CUDA GPU that torch can use (expected --device auto or cpu)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available here (expected --device auto or cpu)")
    if WORLD > 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device.startswith("cuda"):
            device = f"cuda:{local}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    COMM_DEVICE = device if WORLD > 1 and device.startswith("cuda") else "cpu"  # NCCL reduces CUDA tensors only
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device_type == "cuda" else "float32"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    return device, device_type, dtype, ctx


def print0(*args, **kwargs):
    if MASTER:
        print(*args, **kwargs, flush=True)


def write_json(path, obj):
    """Atomic: a crash never leaves a half-written file behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def barrier():
    if WORLD > 1:
        dist.barrier()


def all_sum(values):
    """Sum a list of floats over ranks (float64; every rank must call it with the same length)."""
    if WORLD == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=COMM_DEVICE)
    dist.all_reduce(t)
    return t.tolist()


def crash_point(where):
    """Tests of exact resume: NANOADPO_DIE_AT=<where> (e.g. sft:7, pairs:0, po:ref, po:done) ends the process here
    as abruptly as SIGKILL (no cleanup, exit status 137); re-running the command must then resume exactly."""
    if os.environ.get("NANOADPO_DIE_AT") == where:
        os._exit(137)


# -----------------------------------------------------------------------------
# the training loop shared by SFT and preference optimisation


def cosine_lr(step, total, peak, warmup_frac):
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def rng_state():
    """Every RNG a step can touch, as plain values and tensors (checkpoints load with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def map_tensors(obj, fn, kind=torch.Tensor):
    """obj with fn applied to every `kind` inside its (nested) dicts, lists and tuples."""
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn, kind) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn, kind) for v in obj)
    return obj


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Scorer(torch.nn.Module):
    """model.token_logps as a module's forward, so DDP and torch.compile wrap exactly what the losses call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        return self.model.token_logps(idx, targets)


def read_metrics(path):
    """The records of a metrics.jsonl; a torn last line (the run was killed while appending it) is dropped."""
    records = []
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return records


def train_loop(name, cfg, model, *, n_rows, batch_size, total_steps, lr, compute_loss, make_batch, run, tokens_of,
               units_of):
    """Optimise `model` for `total_steps` steps and return the metrics of the last logging window.

    make_batch(indices) -> batch dict; units_of(batch) -> how many units (tokens, pairs) the loss averages over;
    compute_loss(score, batch) -> (loss SUMMED over the batch's units, {metric: (sum, count)}). A step's loss is the
    sum over the whole global batch divided by its global unit count, so splitting the batch over processes (DDP)
    or micro-batches (grad_accum) computes the same step; a logged metric is its global sum over its global count.
    The data order is a function of (seed, epoch) alone, and the training state (weights, optimizer, scaler, every
    rank's RNGs, step, the open logging window) is saved every cfg.ckpt_every steps to DIR/<name>/state.pt, so a
    killed run resumes on exactly the same trajectory and logs exactly the same numbers.
    """
    device, device_type, dtype, ctx = run["device"], run["device_type"], run["dtype"], run["ctx"]
    stage_dir = os.path.join(cfg.out_dir, name)
    state_path, metrics_path = os.path.join(stage_dir, "state.pt"), os.path.join(stage_dir, "metrics.jsonl")
    optimizer = model.configure_optimizers(cfg.weight_decay, lr, (0.9, 0.95), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))  # fp16 gradients need loss scaling
    step, window, window_time, saved_at = 0, [], 0.0, None
    if os.path.exists(state_path):
        state = load_checkpoint(state_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_ranks")
        set_rng_state(ranks[RANK] if ranks and len(ranks) == WORLD else state["rng"])
        step = saved_at = state["step"]
        window, window_time = list(state.get("window", [])), state.get("window_time", 0.0)
        print0(f"[{name}] resuming at step {step}/{total_steps} from {state_path}")
    if MASTER:  # lines logged after the checkpoint we resume from are about to be recomputed
        write_jsonl([m for m in read_metrics(metrics_path) if m["step"] <= step], metrics_path)
    fwd = ddp = Scorer(model)
    if WORLD > 1:
        fwd = ddp = DDP(fwd, device_ids=[torch.device(device).index] if device_type == "cuda" else None)
    if cfg.compile:
        fwd = torch.compile(fwd)
    epoch_batches = {}

    def batch_indices(step):  # the global batch of `step`: deterministic from (seed, epoch)
        per_epoch = math.ceil(n_rows / batch_size)
        epoch, k = divmod(step, per_epoch)
        if epoch not in epoch_batches:
            order = length_grouped_batches(run["lengths"], batch_size, seed=cfg.seed + epoch)
            epoch_batches.clear()
            epoch_batches[epoch] = order
        return epoch_batches[epoch][k]

    def micro_batches(step):
        """This rank's cfg.grad_accum micro-batches of the global batch of `step` (contiguous slices of its share,
        so each stays length-grouped), with weights: 1, or 0 for a stand-in. Under DDP every rank must run as many
        backward passes as the others (each is a collective), so an empty slice (a short last batch of an epoch)
        becomes a stand-in row that counts for nothing."""
        batch = batch_indices(step)
        mine, k = batch[RANK::WORLD], cfg.grad_accum
        parts = [mine[len(mine) * a // k:len(mine) * (a + 1) // k] for a in range(k)]
        if WORLD == 1:
            return [(p, 1.0) for p in parts if p]
        return [(p, 1.0) if p else (batch[:1], 0.0) for p in parts]

    def stop(what, cause):  # the same verdict on every rank (it is made from reduced numbers): no rank hangs
        kept = (f"the last good training state (step {saved_at}) is kept in {state_path}" if saved_at is not None
                else f"no training state was saved yet (one is saved every --ckpt_every {cfg.ckpt_every} steps)")
        bar.close()  # clears the progress bar's line, so the error starts a line of its own
        raise FloatingPointError(f"[{name}] {what} at step {step + 1}/{total_steps}: {cause}; {kept}")

    lr_flag = "--sft_lr" if name == "sft" else "--po_lr"
    fp16_hint = ", or fp16 overflowed (use --dtype bfloat16 or float32)" if dtype == "float16" else ""
    model.train()
    t0, last = time.time() - window_time, {}
    bar = tqdm(total=total_steps, initial=step, desc=name, disable=not MASTER, leave=False)
    while step < total_steps:
        lr_now = cosine_lr(step, total_steps, lr, cfg.warmup_frac)
        for g in optimizer.param_groups:
            g["lr"] = lr_now
        batches = [({k: v.to(device, non_blocking=True) for k, v in make_batch(part).items()}, w)
                   for part, w in micro_batches(step)]
        units = all_sum([sum(w * units_of(b) for b, w in batches)])[0]  # of the global batch, over all ranks
        sums, n_tokens = {}, 0.0
        for a, (batch, w) in enumerate(batches):
            with (nullcontext() if a == len(batches) - 1 or WORLD == 1 else ddp.no_sync()), ctx:
                loss, metrics = compute_loss(fwd, batch)
            # DDP averages the ranks' gradients, hence the factor WORLD: the result is the gradient of the global mean
            scaler.scale(loss * (w * WORLD / max(units, 1))).backward()
            n_tokens += w * tokens_of(batch)
            for k, (s, c) in metrics.items():
                acc = sums.setdefault(k, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + w * s, acc[1] + w * c
        totals = all_sum([n_tokens] + [v for acc in sums.values() for v in acc])
        n_tokens = totals[0]
        step_metrics = {k: totals[1 + 2 * i] / totals[2 + 2 * i] if totals[2 + 2 * i] else 0.0
                        for i, k in enumerate(sums)}
        if not math.isfinite(step_metrics["loss"]):
            stop(f"non-finite loss ({step_metrics['loss']})",
                 f"the learning rate is probably too high (lower {lr_flag}){fp16_hint}, or a batch holds broken data")
        scaler.unscale_(optimizer)
        # the norm is computed even without clipping (max_norm=inf scales by exactly 1), so that a non-finite gradient
        # never reaches the optimizer; under fp16 an overflow now and then is expected and GradScaler skips that step
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not torch.isfinite(gnorm) and dtype != "float16":
            stop(f"non-finite gradient norm ({gnorm.item()}) with a finite loss",
                 f"the learning rate is probably too high (lower {lr_flag}), or the model's weights overflowed")
        scaler.step(optimizer)
        scaler.update()
        if dtype == "float16" and scaler.get_scale() < 1.0:
            stop("fp16 gradients overflow at every loss scale (GradScaler's scale fell below 1)",
                 f"use --dtype bfloat16 or float32, or lower {lr_flag}")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        window.append((step_metrics, n_tokens))
        if step % cfg.log_every == 0 or step == total_steps:
            dt = time.time() - t0
            last = {k: sum(m[k] for m, _ in window) / len(window) for k in window[0][0]}
            tok_s = sum(n for _, n in window) / max(dt, 1e-9)
            mfu = model.estimate_mfu(tok_s / WORLD, device=device) if device_type == "cuda" else None
            record = {"step": step, **last, "lr": lr_now, "tokens_per_s": tok_s, "mfu": mfu}
            if MASTER:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                shown = " | ".join(f"{k.split('/')[-1] if k.startswith('rewards/') else k} {v:.4f}" for k, v in last.items())
                bar.write(f"[{name}] step {step}/{total_steps} | {shown} | lr {lr_now:.2e} | {tok_s / 1e3:.1f}k tok/s"
                          + (f" | mfu {100 * mfu:.1f}%" if mfu else ""))
            window, t0 = [], time.time()
        crash_point(f"{name}:{step}")
        if step % cfg.ckpt_every == 0 and step < total_steps:
            rngs = [rng_state()]
            if WORLD > 1:  # the ranks' dropout draws differ (their batches do): keep every rank's RNGs
                mine, rngs = rngs[0], [None] * WORLD  # sent as numpy: all_gather_object cannot unpickle CPU tensors
                dist.all_gather_object(rngs, map_tensors(mine, lambda t: t.numpy()))
                rngs = [map_tensors(r, torch.from_numpy, np.ndarray) for r in rngs]
            if MASTER:
                save_checkpoint(state_path, model, optimizer, step=step, scaler=scaler.state_dict(), rng=rngs[0],
                                window=window, window_time=time.time() - t0, **({"rng_ranks": rngs} if WORLD > 1 else {}))
            saved_at = step
        barrier()
    bar.close()
    model.eval()
    return last


# -----------------------------------------------------------------------------
# stage 1: supervised fine-tuning on worked solutions


def remove_stale_state(path):
    """A stage's training state is deleted once its ckpt.pt is written (or on resume, if a kill came in between)."""
    if MASTER and os.path.exists(path):
        os.remove(path)


def bucket(cfg):
    """Under torch.compile, round batch lengths up to a multiple of 64 so a few shapes are compiled, not one per step."""
    return dict(pad_to=64, max_len=cfg.max_len) if cfg.compile else {}


def build_model(cfg, tok, device):
    if cfg.init_from == "scratch":
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=tok.n_vocab, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout))
    else:
        model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
    if tok.n_vocab > model.config.vocab_size:
        raise ConfigError(f"tokenizer '{tok.name}' has {tok.n_vocab} tokens but the model from --init_from "
                          f"{cfg.init_from} has a vocabulary of {model.config.vocab_size}: pass the tokenizer the "
                          f"model was trained with (--tokenizer byte | gpt2)")
    if cfg.max_len > model.config.block_size:
        raise ConfigError(f"--max_len {cfg.max_len} exceeds the model's context of {model.config.block_size} tokens")
    if cfg.max_new_tokens >= model.config.block_size:
        raise ConfigError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's context "
                          f"of {model.config.block_size} tokens (expected < {model.config.block_size})")
    return model.to(device)


def evaluate(cfg, model, tok, test, run, path):
    """Greedy accuracy (+maj@k) on the test split, split over ranks; writes records + metrics to `path`."""
    if os.path.exists(path):
        return read_json(path)["metrics"]
    shard = test[RANK::WORLD]
    metrics, records = accuracy(model, tok, shard, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                                maj_k=cfg.maj_k, temperature=0.7, seed=cfg.seed, ctx=run["ctx"], progress=MASTER)
    if WORLD > 1:  # rank r evaluated test[r::WORLD]: put the records back in test order, recount as accuracy() does
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, records)
        records = [None] * len(test)
        for r, part in enumerate(gathered):
            records[r::WORLD] = part
        n_correct = sum(r["correct"] for r in records)
        metrics = {"accuracy": n_correct / max(len(records), 1), "correct": n_correct, "n": len(records)}
        if cfg.maj_k > 1:  # (each rank samples its own share, so maj@k differs from a 1-process run's by sampling)
            metrics[f"maj@{cfg.maj_k}"] = sum(r["maj"] is not None and is_correct(r["maj"], r["gold"])
                                              for r in records) / max(len(records), 1)
    if MASTER:
        write_json(path, {"metrics": metrics, "records": records})
    barrier()
    return metrics


def stage_sft(cfg, tok, train, test, run):
    ckpt = os.path.join(cfg.out_dir, "sft", "ckpt.pt")
    os.makedirs(os.path.dirname(ckpt), exist_ok=True)
    if os.path.exists(ckpt):
        print0(f"[sft] done before: loading {ckpt}")
        model = GPT.from_pretrained(ckpt).to(run["device"])
        remove_stale_state(os.path.join(cfg.out_dir, "sft", "state.pt"))
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, tok, run["device"])
        rows, stats = encode_sft(train, tok, max_len=cfg.max_len)
        print0(f"[sft] {len(rows)} examples ({stats}) | {model.num_params() / 1e6:.2f}M parameters")
        run["lengths"] = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows]

        def compute_loss(score, batch):  # NLL of the response tokens (+EOS), summed in float32; the prompt is not trained
            logps, mask = score(batch["input_ids"], batch["targets"]), batch["loss_mask"]  # (B, T) float32
            nll = -(logps * mask).sum()
            return nll, {"loss": (nll.item(), mask.sum().item())}  # train_loop divides by the global token count

        def probe_loss():  # mean NLL per token on the first 64 examples, in eval mode
            with torch.no_grad(), run["ctx"]:
                model.eval()
                s, n = compute_loss(Scorer(model), probe)[1]["loss"]
            return s / n

        first = None
        if cfg.sft_steps:  # (train_loop loads a resumed run's weights after this: `first` is always step 0's)
            probe = {k: v.to(run["device"]) for k, v in sft_batch(rows[:64], tok.eot_token).items()}
            first = probe_loss()
        last = train_loop("sft", cfg, model, n_rows=len(rows), batch_size=cfg.sft_batch_size, total_steps=cfg.sft_steps,
                          lr=cfg.sft_lr, compute_loss=compute_loss, make_batch=lambda ix: sft_batch([rows[i] for i in ix], tok.eot_token, **bucket(cfg)),
                          run=run, tokens_of=lambda b: b["input_ids"].numel(), units_of=lambda b: b["loss_mask"].sum().item())
        if cfg.sft_steps:
            last["final_probe_loss"] = probe_loss()
            last["initial_probe_loss"] = first
        if MASTER:
            save_checkpoint(ckpt, model, tokenizer=tok.name, train_metrics=last)
            crash_point("sft:done")
            remove_stale_state(os.path.join(cfg.out_dir, "sft", "state.pt"))
        barrier()
    metrics = evaluate(cfg, model, tok, test, run, os.path.join(cfg.out_dir, "sft", "eval.json"))
    train_metrics = load_checkpoint(ckpt).get("train_metrics", {})
    print0(f"[sft] test accuracy {100 * metrics['accuracy']:.1f}% ({metrics['correct']}/{metrics['n']})")
    return model, {"train": train_metrics, "test": metrics}


# -----------------------------------------------------------------------------
# stage 2: preference pairs (on-policy samples graded against the gold answer, cDPO's recipe)


def choose_pair(samples, gold):
    """chosen = a sample with the most frequent correct answer, rejected = one with the most frequent wrong one."""
    right = [s for s in samples if is_correct(s, gold)]
    wrong = [s for s in samples if not is_correct(s, gold)]
    if not right or not wrong:
        return None

    def most_frequent(group):  # the first sample whose answer is the group's most frequent one
        answers = [extract_answer(s) for s in group]
        return group[answers.index(Counter(answers).most_common(1)[0][0])]
    return most_frequent(right), most_frequent(wrong)


def stage_pairs(cfg, tok, model, train, run):
    pdir = os.path.join(cfg.out_dir, "pairs")
    os.makedirs(pdir, exist_ok=True)
    stats_path = os.path.join(pdir, "stats.json")
    if os.path.exists(stats_path):
        print0(f"[pairs] done before: {pdir}")
        return read_jsonl(os.path.join(pdir, "train.jsonl")), read_jsonl(os.path.join(pdir, "val.jsonl")), read_json(stats_path)
    stats = {"source": cfg.pairs_source}
    if cfg.pairs_source == "sample":
        questions = train[:cfg.n_pair_questions or None]
        chunk = max(1, cfg.eval_batch_size // cfg.n_samples)  # questions per batch of samples
        chunks = list(range(0, len(questions), chunk))
        for c in chunks[RANK::WORLD]:  # every chunk is a file of its own, so a killed run keeps what it sampled
            path = os.path.join(pdir, f"samples_{c:06d}.jsonl")
            if os.path.exists(path):
                continue
            part = questions[c:c + chunk]
            samples = complete(model, tok, [q["prompt"] for q in part], n=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_k=cfg.top_k or None, seed=cfg.seed * 1_000_003 + c,
                               batch_size=cfg.eval_batch_size, ctx=run["ctx"], progress=False)
            write_jsonl([dict(question=q["question"], prompt=q["prompt"], answer=q["answer"], samples=s)
                         for q, s in zip(part, samples)], path)
            crash_point(f"pairs:{c}")
            print0(f"[pairs] sampled {min(c + chunk, len(questions))}/{len(questions)} questions")
        barrier()
        records = [r for c in chunks for r in read_jsonl(os.path.join(pdir, f"samples_{c:06d}.jsonl"))]
        pairs, no_right, no_wrong, n_right, n_empty = [], 0, 0, 0, 0
        for r in records:
            usable = [s for s in r["samples"] if s.strip()]  # an empty completion (EOS at once) has no text to score
            n_empty += len(r["samples"]) - len(usable)
            graded = [is_correct(s, r["answer"]) for s in usable]
            n_right += sum(graded)
            no_right += not any(graded)
            no_wrong += bool(graded) and all(graded)
            chosen_rejected = choose_pair(usable, r["answer"])
            if chosen_rejected:
                pairs.append(dict(prompt=r["prompt"], chosen=chosen_rejected[0], rejected=chosen_rejected[1],
                                  answer=r["answer"]))
        stats.update(questions=len(records), samples=len(records) * cfg.n_samples,
                     sample_accuracy=n_right / max(1, len(records) * cfg.n_samples),
                     skipped_no_correct=no_right, skipped_no_wrong=no_wrong, empty_samples=n_empty)
    elif cfg.pairs_source == "offline":
        pairs = make_arith_pairs(train[:cfg.n_pair_questions or None], seed=cfg.seed)
    else:  # main() has read and checked the file before any training
        pairs = run.pop("pairs", None) or load_pairs(cfg.pairs_source, split="train")
    rng = random.Random(cfg.seed)
    rng.shuffle(pairs)
    n_val = int(round(cfg.val_frac * len(pairs)))
    val, train_pairs = pairs[:n_val], pairs[n_val:]
    stats.update(pairs=len(pairs), train_pairs=len(train_pairs), val_pairs=len(val))
    barrier()  # every rank has made its "done before?" check above before rank 0 writes stats.json
    if MASTER:
        write_jsonl(train_pairs, os.path.join(pdir, "train.jsonl"))
        write_jsonl(val, os.path.join(pdir, "val.jsonl"))
        crash_point("pairs:written")
        write_json(stats_path, stats)
    barrier()
    print0(f"[pairs] {stats}")
    return train_pairs, val, stats


# -----------------------------------------------------------------------------
# stage 3: preference optimisation against the frozen SFT model


def stage_po(cfg, tok, sft_model, train_pairs, val_pairs, test, run, po_dir=None):
    po_dir = po_dir or os.path.join(cfg.out_dir, "po")
    os.makedirs(po_dir, exist_ok=True)
    ckpt = os.path.join(po_dir, "ckpt.pt")
    if not train_pairs:
        raise ValueError("no preference pairs to train on: the SFT model's samples were all right or all wrong "
                         "(see pairs/stats.json); sample more (--n_samples, --n_pair_questions) or use --pairs_source offline")
    rows, rstats = encode_pairs(train_pairs, tok, max_len=cfg.max_len)
    if not rows:
        raise ValueError(f"all {len(train_pairs)} training pairs were dropped: none has a response token within "
                         f"--max_len {cfg.max_len} ({rstats})")
    val_rows, _ = encode_pairs(val_pairs, tok, max_len=cfg.max_len) if val_pairs else ([], {})
    eos_pad = cfg.eos_pad and cfg.loss == "adpo" and cfg.family == "static"
    # the reference's per-token log-probs, computed once with the frozen SFT model and reused every epoch
    ref_path = os.path.join(po_dir, "reference_logps.pt")
    if os.path.exists(ref_path):
        ref = torch.load(ref_path)
    else:
        kw = dict(batch_size=cfg.po_batch_size, eos_pad=eos_pad, device=run["device"], ctx=run["ctx"], progress=MASTER)
        ref = {"train": pair_logps(sft_model, rows, tok.eot_token, desc="reference log-probs", **kw),
               "val": pair_logps(sft_model, val_rows, tok.eot_token, desc="reference log-probs (val)", **kw)}
        if MASTER:
            tmp = ref_path + ".tmp"
            torch.save(ref, tmp)
            os.replace(tmp, ref_path)
            crash_point("po:ref")
    before = preference_eval(ref["val"], ref["val"], beta=cfg.beta, family=cfg.family, size=cfg.size) if val_rows else {}
    loss_fn = LOSSES[cfg.loss]
    hyper = {p: getattr(cfg, p) for p in list(inspect.signature(loss_fn).parameters)[6:] if hasattr(cfg, p)}
    print0(f"[po] {len(rows)} train pairs, {len(val_rows)} val pairs ({rstats}) | loss {cfg.loss} {hyper}"
           f" | at step 0 the policy is the reference: loss = T'·ln2 per pair, reward accuracy 0 (ties)")

    if os.path.exists(ckpt):
        print0(f"[po] done before: loading {ckpt}")
        policy = GPT.from_pretrained(ckpt).to(run["device"])
        remove_stale_state(os.path.join(po_dir, "state.pt"))
    else:
        policy = GPT.from_pretrained(os.path.join(cfg.out_dir, "sft", "ckpt.pt"), dropout=cfg.dropout).to(run["device"])
        run["lengths"] = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]

        def make_batch(ix):
            batch = preference_batch([rows[i] for i in ix], tok.eot_token, eos_pad=eos_pad, **bucket(cfg))
            mask = batch["loss_mask"]
            reference = torch.zeros(mask.shape)
            reference[mask] = torch.cat([ref["train"][i][0] for i in ix] + [ref["train"][i][1] for i in ix])
            batch["reference_logps"] = reference
            return batch

        def compute_loss(score, batch):
            logps = score(batch["input_ids"], batch["targets"])  # (2B, T): chosen rows, then rejected rows
            mask, reference, B = batch["loss_mask"], batch["reference_logps"], batch["loss_mask"].size(0) // 2
            six = dict(policy_chosen_logps=logps[:B], policy_rejected_logps=logps[B:], reference_chosen_logps=reference[:B],
                       reference_rejected_logps=reference[B:], chosen_mask=mask[:B], rejected_mask=mask[B:])
            loss = loss_fn(**six, **hyper)[0].sum()  # summed over pairs: train_loop divides by the global pair count
            if cfg.nll_weight:
                loss = loss + cfg.nll_weight * chosen_nll(logps[:B], mask[:B]).sum()
            with torch.no_grad():
                m = preference_metrics(**{k: v.detach() for k, v in six.items()}, beta=cfg.beta, family=cfg.family, size=cfg.size)
            # metrics as (sum, count): means over pairs, and the win rate over the compared segments (T' per pair)
            n_seg = feedback_length(mask[:B], mask[B:], cfg.family, cfg.size).sum().item()
            sums = {k: (float(v) * B, B) for k, v in m.items()}
            sums["segments/win_rate"] = (round(float(m["segments/win_rate"]) * n_seg), n_seg)
            return loss, {"loss": (loss.item(), B), **sums}

        steps = max(1, math.ceil(cfg.po_epochs * len(rows) / cfg.po_batch_size))
        last = train_loop(os.path.relpath(po_dir, cfg.out_dir), cfg, policy, n_rows=len(rows), batch_size=min(cfg.po_batch_size, len(rows)),
                          total_steps=steps, lr=cfg.po_lr, compute_loss=compute_loss, make_batch=make_batch, run=run,
                          tokens_of=lambda b: b["input_ids"].numel(), units_of=lambda b: b["loss_mask"].size(0) // 2)
        kw = dict(batch_size=cfg.po_batch_size, eos_pad=eos_pad, device=run["device"], ctx=run["ctx"], progress=False)
        last["train_pairs"] = preference_eval(pair_logps(policy, rows, tok.eot_token, **kw), ref["train"], beta=cfg.beta,
                                              family=cfg.family, size=cfg.size)
        last["val_pairs"] = (preference_eval(pair_logps(policy, val_rows, tok.eot_token, **kw), ref["val"], beta=cfg.beta,
                                             family=cfg.family, size=cfg.size) if val_rows else {})
        if MASTER:
            save_checkpoint(ckpt, policy, tokenizer=tok.name, train_metrics=last)
            crash_point("po:done")
            remove_stale_state(os.path.join(po_dir, "state.pt"))
        barrier()
    metrics = evaluate(cfg, policy, tok, test, run, os.path.join(po_dir, "eval.json"))
    train_metrics = load_checkpoint(ckpt).get("train_metrics", {})
    print0(f"[po] test accuracy {100 * metrics['accuracy']:.1f}% ({metrics['correct']}/{metrics['n']})")
    return policy, {"train": train_metrics, "test": metrics, "val_pairs_before": before}


# -----------------------------------------------------------------------------
# reporting: the summary table, curves, and the comparison harness


def variant_label(cfg):
    if cfg.loss != "adpo":
        return cfg.loss.upper() if cfg.loss != "simpo" else "SimPO"
    return f"ADPO {cfg.family} {'k' if cfg.family == 'static' else 'm'}={cfg.size}"


def summary_table(summary):
    rows = []
    if "sft" in summary:
        rows.append(["SFT (reference)", f"{100 * summary['sft']['test']['accuracy']:.1f}%", "-", "-"])
    if "po" in summary:
        val = summary["po"]["train"].get("val_pairs") or {}
        tr = summary["po"]["train"].get("train_pairs") or {}
        rows.append([variant_label(Config(**summary["config"])), f"{100 * summary['po']['test']['accuracy']:.1f}%",
                     f"{tr.get('rewards/accuracy', float('nan')):.2f} / {val.get('rewards/accuracy', float('nan')):.2f}",
                     f"{val.get('rewards/margin', float('nan')):.3f}"])
    return markdown_table(["model", "test accuracy (greedy)", "reward acc. train / held-out pairs", "held-out margin"], rows)


def pyplot():
    """matplotlib.pyplot drawing to files only, or None: plots are optional (matplotlib is not a requirement)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(out_dir, names=("sft", "po")):
    """training curves to DIR/curves.png (only when matplotlib is installed)"""
    plt = pyplot()
    if plt is None:
        return None
    logs = {n: read_jsonl(os.path.join(out_dir, n, "metrics.jsonl")) for n in names
            if os.path.exists(os.path.join(out_dir, n, "metrics.jsonl"))}
    keys = [("sft", "loss"), ("po", "loss"), ("po", "rewards/accuracy"), ("po", "rewards/margin")]
    keys = [(n, k) for n, k in keys if logs.get(n) and k in logs[n][0]]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, (n, k) in zip(np.atleast_1d(axes), keys):
        ax.plot([m["step"] for m in logs[n]], [m[k] for m in logs[n]])
        ax.set_title(f"{n}: {k}")
        ax.set_xlabel("step")
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_variant(spec, cfg):
    """'dpo' | 'ipo' | 'simpo' | 'adpo' | 'adpo:static:4' | 'adpo:adaptive:256' -> a Config for that variant"""
    parts = spec.strip().split(":")
    if parts[0] not in LOSSES or (len(parts) not in (1, 3)) or (len(parts) == 3 and parts[0] != "adpo"):
        raise ConfigError(f"--compare: bad variant {spec!r}: expected a loss name ({', '.join(sorted(LOSSES))}) "
                          f"or adpo:<static|adaptive>:<size>")
    extra = dict(family=parts[1], size=_convert("compare size", int, parts[2])) if len(parts) == 3 else {}
    variant = dataclasses.replace(cfg, loss=parts[0], **extra)
    try:
        validate(variant)
    except ConfigError as e:
        raise ConfigError(f"--compare: bad variant {spec!r}: {e}") from None
    return variant


def compare_plan(cfg):
    """--compare and --seeds -> (a Config per variant, the seeds), or a ConfigError naming what is wrong."""
    variants = [parse_variant(v, cfg) for v in cfg.compare.split(",") if v.strip()]
    seeds = [_convert("seeds", int, s) for s in cfg.seeds.split(",") if s.strip()]
    if not variants or not seeds:
        raise ConfigError(f"--compare {cfg.compare!r} --seeds {cfg.seeds!r}: expected comma-separated variants "
                          f"(e.g. dpo,adpo:static:4) and seeds (e.g. 0,1,2)")
    return variants, seeds


def compare(cfg, tok, sft_model, train_pairs, val_pairs, test, run, summary):
    """Paper Table 3 in miniature: every variant x seed from the same SFT checkpoint and the same pairs."""
    variants, seeds = compare_plan(cfg)
    results = {}
    for v in variants:
        for seed in seeds:
            vc = dataclasses.replace(v, seed=seed)
            tag = f"{v.loss}_{v.family}_{v.size}" if v.loss == "adpo" else v.loss
            print0(f"\n[compare] {variant_label(vc)} seed {seed}")
            torch.manual_seed(seed)
            _, res = stage_po(vc, tok, sft_model, train_pairs, val_pairs, test, run,
                              po_dir=os.path.join(cfg.out_dir, "compare", f"{tag}_s{seed}"))
            results.setdefault(variant_label(vc), []).append(res)
    sft_acc = summary["sft"]["test"]["accuracy"]
    rows = [["SFT (reference)", f"{100 * sft_acc:.1f}", "-", len(test)]]
    for label, runs in results.items():
        accs = [r["test"]["accuracy"] for r in runs]
        val = [r["train"].get("val_pairs", {}).get("rewards/accuracy", float("nan")) for r in runs]
        rows.append([label, mean_std(accs), mean_std(val), len(test)])
    table = markdown_table(["method", "test accuracy % (mean ± std over seeds)", "held-out reward acc. %", "n test"], rows)
    table += f"\n\nseeds: {seeds}; same SFT checkpoint and pairs ({len(train_pairs)} train / {len(val_pairs)} held out)"
    if MASTER:
        with open(os.path.join(cfg.out_dir, "compare.md"), "w") as f:
            f.write(table + "\n")
        write_json(os.path.join(cfg.out_dir, "compare.json"),
                   {label: [r["test"]["accuracy"] for r in runs] for label, runs in results.items()})
        plt = pyplot()
        if plt is not None:
            labels = list(results)
            accs = [[100 * r["test"]["accuracy"] for r in results[k]] for k in labels]
            means = [np.mean(a) for a in accs]
            stds = [np.std(a, ddof=1) if len(a) > 1 else 0.0 for a in accs]  # sample std, as in the table
            fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 3.5))
            ax.bar(labels, means, yerr=stds, capsize=4)
            ax.axhline(100 * sft_acc, color="gray", ls="--", label="SFT")
            ax.set_ylabel("test accuracy %")
            ax.legend()
            plt.xticks(rotation=30, ha="right")
            fig.tight_layout()
            fig.savefig(os.path.join(cfg.out_dir, "compare.png"), dpi=100)
            plt.close(fig)
    print0("\n" + table)
    return results


# -----------------------------------------------------------------------------


def check_resume(cfg):
    """Re-running a command on its run folder resumes it; a different config on the same folder is refused."""
    path = os.path.join(cfg.out_dir, "config.json")
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY}
    if os.path.exists(path):
        try:
            saved = read_json(path)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not a readable run config ({e}); use another --out_dir") from None
        if not isinstance(saved, dict):
            raise ConfigError(f"{path}: not a run config (expected a JSON object); use another --out_dir")
        saved = {k: v for k, v in saved.items() if k not in RUN_ONLY}
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"{cfg.out_dir} holds a run with a different config ({shown}); "
                              f"use another --out_dir, or the same flags to resume it")
        print0(f"resuming the run in {cfg.out_dir}")
    elif MASTER:
        write_json(path, dataclasses.asdict(cfg))


def tokenizer_name(cfg):
    """--tokenizer auto: byte for a model from scratch, the one a nanoADPO checkpoint records, else gpt2."""
    if cfg.tokenizer != "auto":
        return cfg.tokenizer
    if cfg.init_from == "scratch":
        return "byte"
    path = cfg.init_from if os.path.isfile(cfg.init_from) else os.path.join(cfg.init_from, "ckpt.pt")
    return (load_checkpoint(path).get("tokenizer") if os.path.isfile(path) else None) or "gpt2"


def main(argv=None):
    t_start = time.time()
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ConfigError(f"--out_dir {cfg.out_dir} is a file (expected a run folder, new or to resume)")
    device, device_type, dtype, ctx = setup(cfg)
    run = dict(device=device, device_type=device_type, dtype=dtype, ctx=ctx)
    if MASTER:
        os.makedirs(cfg.out_dir, exist_ok=True)
    barrier()
    check_resume(cfg)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tok = get_tokenizer(tokenizer_name(cfg))
    knobs = dict(steps=(cfg.arith_steps, cfg.arith_steps), max_number=cfg.arith_max_number, ops=cfg.arith_ops) \
        if cfg.task == "arith" else {}
    train = load_task(cfg.task, "train", n=cfg.n_train or None, seed=cfg.task_seed, **knobs)
    test = load_task(cfg.task, "test", n=cfg.n_test or None, seed=cfg.task_seed, **knobs)
    print0(f"device {device} | dtype {dtype} | task {cfg.task}: {len(train)} train / {len(test)} test questions"
           f" | tokenizer {tok.name} | world size {WORLD}")
    if cfg.pairs_source not in ("sample", "offline") and cfg.stop_after != "sft" and \
            not os.path.exists(os.path.join(cfg.out_dir, "pairs", "stats.json")):
        run["pairs"] = load_pairs(cfg.pairs_source, split="train")  # a bad pair file fails now, not after SFT

    summary = {"config": dataclasses.asdict(cfg), "device": device, "dtype": dtype}
    summary_path = os.path.join(cfg.out_dir, "summary.json")
    if os.path.exists(summary_path):
        summary.update({k: v for k, v in read_json(summary_path).items() if k in STAGES})

    def save_summary():
        if MASTER:
            write_json(summary_path, summary)

    sft_model, summary["sft"] = stage_sft(cfg, tok, train, test, run)
    save_summary()
    if cfg.stop_after == "sft":
        return summary
    train_pairs, val_pairs, summary["pairs"] = stage_pairs(cfg, tok, sft_model, train, run)
    save_summary()
    if cfg.stop_after == "pairs":
        return summary
    if cfg.compare:
        summary["compare"] = {k: [r["test"]["accuracy"] for r in v] for k, v in
                              compare(cfg, tok, sft_model, train_pairs, val_pairs, test, run, summary).items()}
        save_summary()
        return summary
    torch.manual_seed(cfg.seed)
    _, summary["po"] = stage_po(cfg, tok, sft_model, train_pairs, val_pairs, test, run)
    summary["wall_time_s"] = time.time() - t_start  # of this invocation (a resumed run counts only its own part)
    save_summary()
    if MASTER:
        plot_curves(cfg.out_dir)
    print0("\n" + summary_table(summary))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:  # bad input (files, flags, numerics): one line
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
