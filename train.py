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
import sys
import time
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
from loss import LOSSES, chosen_nll, preference_metrics
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
    n_embd: int = 128
    block_size: int = 256
    dropout: float = 0.0
    # task
    task: str = "arith"         # arith | gsm8k | a local file / hub id with question/answer columns
    task_seed: int = 0          # the embedded task's generator seed (fixed across --seed, so runs share data)
    arith_steps: int = 2        # arith difficulty: steps per problem, operand range, operations
    arith_max_number: int = 50
    arith_ops: str = "+-"
    n_train: int = 4000         # training questions (0 = all)
    n_test: int = 500           # test questions for accuracy (0 = all)
    max_len: int = 256          # prompt + response tokens (prompt cut first, keeping its end)
    # SFT
    sft_steps: int = 1000
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    # pairs
    pairs_source: str = "sample"  # sample (on-policy from the SFT model) | offline (arith task) | pair dataset
    n_pair_questions: int = 1000  # training questions to sample on (0 = all)
    n_samples: int = 8            # samples per question
    temperature: float = 1.0
    top_k: int = 0                # 0 = off
    max_new_tokens: int = 96
    val_frac: float = 0.1         # pairs held out for reward accuracy
    # preference optimisation
    loss: str = "adpo"          # any key of loss.LOSSES
    beta: float = 0.1
    family: str = "static"      # ADPO granularity family: static (window k) | adaptive (m segments)
    size: int = 1               # k or m; static k=1 is the paper's token-level ADPO (Table 1)
    gamma: float = 0.5          # SimPO margin
    eos_pad: bool = True        # pad the shorter response of a pair with EOS (the paper's static-family padding)
    nll_weight: float = 0.0     # λ of an SFT term on the chosen response
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


RUN_ONLY = {"stop_after", "compare", "seeds", "device", "log_every", "ckpt_every"}  # may change between resumes
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
        return typ(value)
    except (TypeError, ValueError):
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
        with open(path) as f:
            try:
                overrides = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"preset {path}: not valid JSON ({e})") from None
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
         f"--grad_accum ({cfg.grad_accum}) must divide the batch sizes")


# -----------------------------------------------------------------------------
# run-wide state: device, precision, data-parallel ranks, printing, atomic json


def setup(cfg):
    global RANK, WORLD, MASTER
    RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    MASTER = RANK == 0
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if WORLD > 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device.startswith("cuda"):
            device = f"cuda:{local}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
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


def all_mean(values):
    """Average a dict of floats over ranks."""
    if WORLD == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / WORLD).tolist()))


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


def train_loop(name, cfg, model, *, n_rows, batch_size, total_steps, lr, compute_loss, make_batch, run, tokens_of):
    """Optimise `model` for `total_steps` steps and return the metrics of the last logging window.

    compute_loss(score, batch) -> (scalar loss, dict of float metrics); make_batch(indices) -> batch dict.
    The data order is a function of (seed, epoch) alone and the training state (weights, optimizer, RNGs, step)
    is saved every cfg.ckpt_every steps to DIR/<name>/state.pt, so a killed run resumes on the same trajectory.
    """
    device, device_type, dtype, ctx = run["device"], run["device_type"], run["dtype"], run["ctx"]
    stage_dir = os.path.join(cfg.out_dir, name)
    state_path, metrics_path = os.path.join(stage_dir, "state.pt"), os.path.join(stage_dir, "metrics.jsonl")
    optimizer = model.configure_optimizers(cfg.weight_decay, lr, (0.9, 0.95), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    step = 0
    if os.path.exists(state_path):
        state = load_checkpoint(state_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step = state["step"]
        print0(f"[{name}] resuming at step {step}/{total_steps} from {state_path}")
    if MASTER:  # metrics logged after the checkpoint we resume from are about to be recomputed
        lines = read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
        write_jsonl([m for m in lines if m["step"] <= step], metrics_path)
    fwd = Scorer(model)
    if WORLD > 1:
        fwd = DDP(model, device_ids=[torch.device(device).index] if device_type == "cuda" else None)
    if cfg.compile:
        fwd = torch.compile(fwd)
    per_rank = batch_size // WORLD
    if per_rank * WORLD != batch_size:
        raise ConfigError(f"{name} batch size {batch_size} is not divisible by the {WORLD} processes")
    micro = per_rank // cfg.grad_accum
    epoch_batches = {}

    def batch_indices(step):  # the global batch of `step`: deterministic from (seed, epoch)
        per_epoch = math.ceil(n_rows / batch_size)
        epoch, k = divmod(step, per_epoch)
        if epoch not in epoch_batches:
            order = length_grouped_batches(run["lengths"], batch_size, seed=cfg.seed + epoch)
            epoch_batches.clear()
            epoch_batches[epoch] = order
        return epoch_batches[epoch][k]

    model.train()
    window, t0, last = [], time.time(), {}
    bar = tqdm(total=total_steps, initial=step, desc=name, disable=not MASTER, leave=False)
    while step < total_steps:
        lr_now = cosine_lr(step, total_steps, lr, cfg.warmup_frac)
        for g in optimizer.param_groups:
            g["lr"] = lr_now
        idx = batch_indices(step)[RANK::WORLD]  # this rank's share of the global batch
        metrics_acc, n_tokens = {}, 0
        for a in range(cfg.grad_accum):
            part = idx[a * micro:(a + 1) * micro] if micro * cfg.grad_accum == len(idx) else idx[a::cfg.grad_accum]
            if not part:
                continue
            batch = {k: v.to(device, non_blocking=True) for k, v in make_batch(part).items()}
            n_tokens += tokens_of(batch)
            sync = a == cfg.grad_accum - 1
            with (nullcontext() if sync or WORLD == 1 else fwd.no_sync()), ctx:
                loss, metrics = compute_loss(fwd, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"[{name}] non-finite loss {loss.item()} at step {step}: lower the learning rate "
                    f"(--{'sft' if name == 'sft' else 'po'}_lr) or use --dtype bfloat16/float32; the last good "
                    f"training state is {state_path if os.path.exists(state_path) else 'the start of the stage'}")
            scaler.scale(loss / cfg.grad_accum).backward()
            for k, v in metrics.items():
                metrics_acc[k] = metrics_acc.get(k, 0.0) + float(v) / cfg.grad_accum
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        if gnorm is not None and not torch.isfinite(gnorm) and dtype != "float16":
            raise FloatingPointError(f"[{name}] non-finite gradient norm at step {step}: lower the learning rate "
                                     f"or check the data; the last good training state is kept at {state_path}")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        metrics_acc = all_mean(metrics_acc)
        window.append((metrics_acc, n_tokens * WORLD))
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
        if step % cfg.ckpt_every == 0 and step < total_steps and MASTER:
            save_checkpoint(state_path, model, optimizer, step=step, scaler=scaler.state_dict(), rng=rng_state())
        barrier()
    bar.close()
    model.eval()
    return last


# -----------------------------------------------------------------------------
# stage 1: supervised fine-tuning on worked solutions


def build_model(cfg, tok, device):
    if cfg.init_from == "scratch":
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=tok.n_vocab, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout))
    else:
        model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
    if tok.n_vocab > model.config.vocab_size:
        raise ConfigError(f"tokenizer '{tok.name}' has {tok.n_vocab} tokens but the model from --init_from "
                          f"{cfg.init_from} has a vocabulary of {model.config.vocab_size}: use --tokenizer gpt2")
    if cfg.max_len > model.config.block_size:
        raise ConfigError(f"--max_len {cfg.max_len} exceeds the model's context of {model.config.block_size}")
    return model.to(device)


def evaluate(cfg, model, tok, test, run, path):
    """Greedy accuracy (+maj@k) on the test split, split over ranks; writes records + metrics to `path`."""
    if os.path.exists(path):
        return read_json(path)["metrics"]
    shard = test[RANK::WORLD]
    metrics, records = accuracy(model, tok, shard, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                                maj_k=cfg.maj_k, temperature=0.7, seed=cfg.seed, ctx=run["ctx"], progress=MASTER)
    if WORLD > 1:
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
        metrics = {"accuracy": sum(r["correct"] for r in records) / len(records), "n": len(records),
                   "correct": sum(r["correct"] for r in records)}
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
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, tok, run["device"])
        rows, stats = encode_sft(train, tok, max_len=cfg.max_len)
        print0(f"[sft] {len(rows)} examples ({stats}) | {model.num_params() / 1e6:.2f}M parameters")
        run["lengths"] = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows]

        def compute_loss(score, batch):  # mean NLL of the response tokens (+EOS); the prompt is not trained
            logps, mask = score(batch["input_ids"], batch["targets"]), batch["loss_mask"]  # (B, T)
            loss = -(logps * mask).sum() / mask.sum()
            return loss, {"loss": loss.item()}

        first = None
        if cfg.sft_steps:
            with torch.no_grad(), run["ctx"]:
                model.eval()
                probe = {k: v.to(run["device"]) for k, v in sft_batch(rows[:64], tok.eot_token).items()}
                first = compute_loss(Scorer(model), probe)[0].item()
        last = train_loop("sft", cfg, model, n_rows=len(rows), batch_size=cfg.sft_batch_size, total_steps=cfg.sft_steps,
                          lr=cfg.sft_lr, compute_loss=compute_loss, make_batch=lambda ix: sft_batch([rows[i] for i in ix], tok.eot_token),
                          run=run, tokens_of=lambda b: b["input_ids"].numel())
        if cfg.sft_steps:
            with torch.no_grad(), run["ctx"]:
                last["final_probe_loss"] = compute_loss(Scorer(model), probe)[0].item()
            last["initial_probe_loss"] = first
        if MASTER:
            save_checkpoint(ckpt, model, tokenizer=tok.name, train_metrics=last)
            state = os.path.join(cfg.out_dir, "sft", "state.pt")
            if os.path.exists(state):
                os.remove(state)
        barrier()
    metrics = evaluate(cfg, model, tok, test, run, os.path.join(cfg.out_dir, "sft", "eval.json"))
    train_metrics = load_checkpoint(ckpt).get("train_metrics", {})
    print0(f"[sft] test accuracy {100 * metrics['accuracy']:.1f}% ({metrics['correct']}/{metrics['n']})")
    return model, {"train": train_metrics, "test": metrics}


# -----------------------------------------------------------------------------
# stage 2: preference pairs (on-policy samples graded against the gold answer, cDPO's recipe)


def choose_pair(question, samples, gold):
    """chosen = a sample with the most frequent correct answer, rejected = one with the most frequent wrong one."""
    right = [s for s in samples if is_correct(s, gold)]
    wrong = [s for s in samples if not is_correct(s, gold)]
    if not right or not wrong:
        return None
    def most_frequent(group):
        answers = [extract_answer(s) for s in group]
        counts = {a: answers.count(a) for a in answers}
        best = max(counts.values())
        return next(s for s, a in zip(group, answers) if counts[a] == best)
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
            print0(f"[pairs] sampled {min(c + chunk, len(questions))}/{len(questions)} questions") if MASTER else None
        barrier()
        records = [r for c in chunks for r in read_jsonl(os.path.join(pdir, f"samples_{c:06d}.jsonl"))]
        pairs, no_right, no_wrong, n_right = [], 0, 0, 0
        for r in records:
            graded = [is_correct(s, r["answer"]) for s in r["samples"]]
            n_right += sum(graded)
            no_right += not any(graded)
            no_wrong += all(graded)
            chosen_rejected = choose_pair(r["question"], r["samples"], r["answer"])
            if chosen_rejected:
                pairs.append(dict(prompt=r["prompt"], chosen=chosen_rejected[0], rejected=chosen_rejected[1],
                                  answer=r["answer"]))
        stats.update(questions=len(records), samples=len(records) * cfg.n_samples,
                     sample_accuracy=n_right / max(1, len(records) * cfg.n_samples),
                     skipped_no_correct=no_right, skipped_no_wrong=no_wrong)
    elif cfg.pairs_source == "offline":
        if cfg.task != "arith":
            raise ConfigError("--pairs_source offline needs --task arith (it corrupts the task's own solutions)")
        pairs = make_arith_pairs(train[:cfg.n_pair_questions or None], seed=cfg.seed)
    else:
        pairs = load_pairs(cfg.pairs_source, split="train")
    rng = random.Random(cfg.seed)
    rng.shuffle(pairs)
    n_val = int(round(cfg.val_frac * len(pairs)))
    val, train_pairs = pairs[:n_val], pairs[n_val:]
    stats.update(pairs=len(pairs), train_pairs=len(train_pairs), val_pairs=len(val))
    if MASTER:
        write_jsonl(train_pairs, os.path.join(pdir, "train.jsonl"))
        write_jsonl(val, os.path.join(pdir, "val.jsonl"))
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
        raise RuntimeError("no preference pairs to train on: the SFT model's samples were all right or all wrong "
                           "(see pairs/stats.json); sample more (--n_samples, --n_pair_questions) or use --pairs_source offline")
    rows, rstats = encode_pairs(train_pairs, tok, max_len=cfg.max_len)
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
    before = preference_eval(ref["val"], ref["val"], beta=cfg.beta, family=cfg.family, size=cfg.size) if val_rows else {}
    loss_fn = LOSSES[cfg.loss]
    hyper = {p: getattr(cfg, p) for p in list(inspect.signature(loss_fn).parameters)[6:] if hasattr(cfg, p)}
    print0(f"[po] {len(rows)} train pairs, {len(val_rows)} val pairs ({rstats}) | loss {cfg.loss} {hyper}"
           f" | at step 0 the policy is the reference: loss = T'·ln2 per pair, reward accuracy 0 (ties)")

    if os.path.exists(ckpt):
        print0(f"[po] done before: loading {ckpt}")
        policy = GPT.from_pretrained(ckpt).to(run["device"])
    else:
        policy = GPT.from_pretrained(os.path.join(cfg.out_dir, "sft", "ckpt.pt"), dropout=cfg.dropout).to(run["device"])
        run["lengths"] = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]

        def make_batch(ix):
            batch = preference_batch([rows[i] for i in ix], tok.eot_token, eos_pad=eos_pad)
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
            losses = loss_fn(**six, **hyper)[0]
            loss = losses.mean()
            if cfg.nll_weight:
                loss = loss + cfg.nll_weight * chosen_nll(logps[:B], mask[:B]).mean()
            with torch.no_grad():
                m = preference_metrics(**{k: v.detach() for k, v in six.items()}, beta=cfg.beta, family=cfg.family, size=cfg.size)
            return loss, {"loss": loss.item(), **{k: float(v) for k, v in m.items()}}

        steps = max(1, math.ceil(cfg.po_epochs * len(rows) / cfg.po_batch_size))
        last = train_loop(os.path.relpath(po_dir, cfg.out_dir), cfg, policy, n_rows=len(rows), batch_size=min(cfg.po_batch_size, len(rows) - len(rows) % WORLD),
                          total_steps=steps, lr=cfg.po_lr, compute_loss=compute_loss, make_batch=make_batch, run=run,
                          tokens_of=lambda b: b["input_ids"].numel())
        kw = dict(batch_size=cfg.po_batch_size, eos_pad=eos_pad, device=run["device"], ctx=run["ctx"], progress=False)
        last["train_pairs"] = preference_eval(pair_logps(policy, rows, tok.eot_token, **kw), ref["train"], beta=cfg.beta,
                                              family=cfg.family, size=cfg.size)
        last["val_pairs"] = (preference_eval(pair_logps(policy, val_rows, tok.eot_token, **kw), ref["val"], beta=cfg.beta,
                                             family=cfg.family, size=cfg.size) if val_rows else {})
        if MASTER:
            save_checkpoint(ckpt, policy, tokenizer=tok.name, train_metrics=last)
            state = os.path.join(po_dir, "state.pt")
            if os.path.exists(state):
                os.remove(state)
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


def plot_curves(out_dir, names=("sft", "po")):
    """training curves to DIR/curves.png (only when matplotlib is installed: an optional dependency)"""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    validate(variant)
    return variant


def compare(cfg, tok, sft_model, train_pairs, val_pairs, test, run, summary):
    """Paper Table 3 in miniature: every variant x seed from the same SFT checkpoint and the same pairs."""
    variants = [parse_variant(v, cfg) for v in cfg.compare.split(",") if v.strip()]
    seeds = [_convert("seeds", int, s) for s in cfg.seeds.split(",") if s.strip()]
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
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            labels = list(results)
            means = [100 * np.mean([r["test"]["accuracy"] for r in results[k]]) for k in labels]
            stds = [100 * np.std([r["test"]["accuracy"] for r in results[k]]) for k in labels]
            fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 3.5))
            ax.bar(labels, means, yerr=stds, capsize=4)
            ax.axhline(100 * sft_acc, color="gray", ls="--", label="SFT")
            ax.set_ylabel("test accuracy %")
            ax.legend()
            plt.xticks(rotation=30, ha="right")
            fig.tight_layout()
            fig.savefig(os.path.join(cfg.out_dir, "compare.png"), dpi=100)
            plt.close(fig)
        except ImportError:
            pass
    print0("\n" + table)
    return results


# -----------------------------------------------------------------------------


def check_resume(cfg):
    """Re-running a command on its run folder resumes it; a different config on the same folder is refused."""
    path = os.path.join(cfg.out_dir, "config.json")
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY}
    if os.path.exists(path):
        saved = {k: v for k, v in read_json(path).items() if k not in RUN_ONLY}
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"{cfg.out_dir} holds a run with a different config ({shown}); "
                              f"use another --out_dir, or the same flags to resume it")
        print0(f"resuming the run in {cfg.out_dir}")
    elif MASTER:
        write_json(path, dataclasses.asdict(cfg))


def main(argv=None):
    t_start = time.time()
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    device, device_type, dtype, ctx = setup(cfg)
    run = dict(device=device, device_type=device_type, dtype=dtype, ctx=ctx)
    if MASTER:
        os.makedirs(cfg.out_dir, exist_ok=True)
    barrier()
    check_resume(cfg)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tok = get_tokenizer(cfg.tokenizer if cfg.tokenizer != "auto" else ("byte" if cfg.init_from == "scratch" else "gpt2"))
    knobs = dict(steps=(cfg.arith_steps, cfg.arith_steps), max_number=cfg.arith_max_number, ops=cfg.arith_ops) \
        if cfg.task == "arith" else {}
    train = load_task(cfg.task, "train", n=cfg.n_train or None, seed=cfg.task_seed, **knobs)
    test = load_task(cfg.task, "test", n=cfg.n_test or None, seed=cfg.task_seed, **knobs)
    print0(f"device {device} | dtype {dtype} | task {cfg.task}: {len(train)} train / {len(test)} test questions"
           f" | tokenizer {tok.name} | world size {WORLD}")

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
    except (ValueError, FileNotFoundError, ConnectionError, FloatingPointError) as e:  # bad input: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
