"""
Benchmark nanoADPO against its peers, on the same random weights, in one run:

  1. preference step  policy forward+backward on chosen+rejected, loss, AdamW step; reference
                      log-probs precomputed on both sides. This project (train.py's step) vs TRL's
                      DPOTrainer.
  2. sampling         the pairs stage's workload: n samples of each of many ragged prompts, at its
                      temperature, each row stopping at its EOS: model.generate (KV cache; with
                      --compile also its compiled static-cache decode step) vs Hugging Face
                      generate, and vs this project without the KV cache.
  3. log-probs        peak memory of model(idx, targets) forward+backward vs the naive full float32
                      log-softmax.

    python scripts/bench.py --device cpu --quick    # a tiny GPT and a tiny Llama, ~3 min on a 2-core CPU
    python scripts/bench.py --device cuda           # GPT-2 124M and gpt2-medium shapes, bf16, torch.compile
    python scripts/bench.py --device cuda --quick --models qwen2.5-0.5b   # one shape (bench_tools.py's)

Every flag is a field of `BenchConfig` below. The peers are bench-only dependencies (pip install
-r requirements-bench.txt; without trl its columns read n/a). No downloads: a random transformers
model (GPT-2, Llama or Qwen2) saved to a temporary folder is loaded by both sides: identical
weights (bench_tools.py, with the clock and the memory readings).

Every measurement runs in a fresh subprocess, one at a time, so that its peak memory is its own. On
CUDA peak memory is torch.cuda.max_memory_allocated. On CPU it is read from the process's resident
set: the children that measure memory run with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB, so
every tensor of that size has its own mapping, returned to the system when freed, and the resident
set follows the live tensors; the Linux high-water mark (VmHWM) is reset just before the measured
region. A training peak is then the weights + optimizer state plus the rise of the resident set
during the timed epochs (what max_memory_allocated counts on CUDA), a log-prob peak the rise above
the model and inputs already held.

The markdown table is followed by machine-readable `name: value` lines; a speedup > 1 is faster
than the peer, a memory ratio < 1 less memory.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repository (train.py, ...), and bench_tools

import train  # noqa: E402
from bench_tools import (MODEL_SHAPES, clock, make_pairs, mem, pair_tokens, random_prompts,
                         reset_peak, save_random_model, state_bytes, sync, training_peak)
from machinery.checkpoint import load_gpt
from machinery.config import resolve_loss
from machinery.common import cli, markdown_table, need, parse, peak_flops, setup
from data import length_grouped_batches, row_lengths
from eval import pair_logps
from model import GPT, KVCache
RESULT = "BENCH_RESULT "  # a child's last stdout line: this prefix, then its measurements as JSON


@dataclass
class BenchConfig:
    device: str = "auto"     # auto (cuda when available, else cpu) | cpu | cuda
    quick: bool = False      # fewer steps and smaller shapes (CPU: ~1.5 min on 2 cores)
    compile: str = "auto"    # torch.compile our preference step and decode step: auto (on for
                             # cuda) | true | false
    parts: str = "pref,sampling,logps"  # a comma-separated subset of pref,sampling,logps
    models: str = ""         # comma-separated shapes (bench_tools.MODEL_SHAPES) for every part;
                             # empty: the device's own
    threads: int = 0         # CPU threads per measurement; 0: 1 with --quick or --toy on CPU (so
                             # that a busy shared machine does not stall every op), else torch's
    toy: bool = False        # toy shapes and vocab, for the test suite
    inprocess: bool = False  # every measurement in this process (faster start-up, memory not
                             # isolated; for the tests)
    child: str = ""          # internal: the measurement (a key of CHILDREN) a child process runs,
    spec: str = ""           # and its settings as JSON (see run_child)

# -----------------------------------------------------------------------------
# what to run: shapes and sizes per device and mode

def settings(device, quick, toy=False):
    """Everything a run measures. Lengths are (low, high) token counts, drawn uniformly per row.
    The preference step trains `epochs` + 1 epochs of `steps` steps over the same pairs: the first
    warms up (and compiles), the best of the others counts; sampling takes the best of `reps` runs
    after a warm-up, at the pairs stage's temperature, EOS likely enough (eos_rate per step) that
    rows stop at ragged lengths, about new_tokens / 2 on average."""
    temperature = train.Config.temperature
    if toy:  # the test suite's: tiny shapes and vocab, seconds per part
        return dict(vocab=512, pref_models=["toy"], pairs_per_step=2, steps=2, epochs=1,
                    prompt=(4, 8), response=(4, 12), logps_model="toy", logps_rows=4,
                    logps_len=64, sample_models=["toy", "llama-toy"], sample_prompts=2,
                    n_samples=2, sample_prompt=(4, 8), new_tokens=8, reps=1,
                    temperature=temperature, eos_rate=0.25)
    if device == "cpu":  # the vocab stays 50257, so the log-prob memory has GPT-2's proportions
        s = dict(vocab=50257, pref_models=["tiny"], pairs_per_step=4, steps=2, epochs=2,
                 prompt=(8, 24), response=(8, 40), logps_model="tiny", logps_rows=8,
                 logps_len=256, sample_models=["tiny", "llama-tiny"], sample_prompts=16,
                 n_samples=4, sample_prompt=(32, 96), new_tokens=96, reps=2)
        if not quick:
            s.update(pref_models=["small"], pairs_per_step=8, steps=4, epochs=3,
                     prompt=(16, 64), response=(16, 128),
                     logps_model="small", logps_rows=16, logps_len=512,
                     sample_models=["small", "llama-small"], sample_prompts=32, n_samples=4,
                     sample_prompt=(32, 128), new_tokens=128, reps=3)
    else:  # CUDA: ~512-token sequences, 8 pairs (16 rows) per step, 64 sampled rows
        s = dict(vocab=50257, pref_models=["gpt2", "gpt2-medium"], pairs_per_step=8, steps=8,
                 epochs=3, prompt=(128, 255), response=(192, 255), logps_model="gpt2",
                 logps_rows=16, logps_len=512, sample_models=["gpt2"], sample_prompts=16,
                 n_samples=4, sample_prompt=(32, 128), new_tokens=256, reps=3)
        if quick:  # every row pads to 512 tokens: one compiled shape
            s.update(steps=4, epochs=1, prompt=(224, 255), response=(224, 255), new_tokens=128,
                     reps=2)
    return dict(s, temperature=temperature, eos_rate=2 / s["new_tokens"])


LR, BETA, WEIGHT_DECAY = 1e-4, 0.1, 0.1  # train.py's PO defaults, but beta 0.1 (common for LLMs)
BETAS, GRAD_CLIP = (0.9, 0.95), 1.0

# -----------------------------------------------------------------------------
# 1. the preference step


def compiled_graphs():
    """Graphs torch.compile has compiled so far in this process (0 without it)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def child_pref_ours(s):
    """train.py's preference step (train.preference_loss): reference log-probs computed once,
    chosen+rejected stacked in one (2B, T) forward, ADPO (static k=1) loss, backward, clipping,
    AdamW (fused on CUDA), length-grouped batches."""
    run = setup(s["device"])  # bf16 autocast and TF32 on CUDA, float32 on CPU
    device = run.device
    model = load_gpt(s["ckpt"]).to(device)
    rows, eos, B = make_pairs(s), s["vocab"] - 1, s["pairs_per_step"]
    max_len = max(row_lengths(rows))
    cfg = train.Config(loss="adpo", family="static", size=1, beta=BETA, compile=s["compile"],
                       max_len=max_len)  # eos_pad (default): EOS-pad the shorter response
    ref = pair_logps(model, rows, eos, batch_size=B, eos_pad=True, device=device, ctx=run.ctx,
                     progress=False)  # [(chosen (Tw,), rejected (Tl,))] per pair
    model.train()
    optimizer = model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, run.device_type)
    score = model  # score(idx, targets) -> (2B, T) float32 log-probs, as in train.py
    objective = resolve_loss(cfg)  # --loss resolved once, as in train.py
    if s["compile"]:  # one graph per padded length: pair_batch pads to multiples of 64
        score = torch.compile(model, dynamic=False)

    def step(ix):
        batch = train.pair_batch([rows[i] for i in ix], [ref[i] for i in ix], eos,
                                 objective.eos_pad, **train.bucket(cfg))
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}  # (2B, T) tensors, and n = B pairs
        with run.ctx:
            loss, metrics = train.preference_loss(score, batch, objective)  # sums over B pairs
        (loss / batch["n"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logged = {k: float(v) / batch["n"] for k, v in metrics.items()}  # read back, as train.py
        return batch["input_ids"].numel(), logged                          # logs every step

    # one epoch over the pairs to warm up (and compile every padded length), then the same epoch
    # timed, best of `epochs`
    batches = length_grouped_batches(row_lengths(rows), B, seed=0)
    for ix in batches:
        step(ix)
    graphs = compiled_graphs()
    at_start = mem(device)
    reset_peak(device)
    seconds = []
    for _ in range(s["epochs"]):
        t0 = clock()
        padded = sum(step(ix)[0] for ix in batches)
        sync(device)
        seconds.append(clock() - t0)
    peak = training_peak(device, at_start, state_bytes(model, optimizer))
    return dict(seconds=min(seconds), tokens=pair_tokens(rows), padded_tokens=padded,
                steps=len(batches), peak_bytes=peak, graphs=graphs,
                graphs_compiled_timed=compiled_graphs() - graphs,
                flops_per_token=model.flops_per_token(max_len),
                peak_flops=peak_flops(device) if device == "cuda" else None)


def word_tokenizer(vocab):
    """A GPT-2-sized tokenizer that needs no files: token i is the word 't<i>', and the last id is
    <|endoftext|>. The text 't5 t17 t3' tokenizes to exactly [5, 17, 3], so TRL sees the very token
    ids this project trains on."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {f"t{i}": i for i in range(vocab - 1)}
    words["<|endoftext|>"] = vocab - 1
    tok = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def trl_config(s, output_dir):
    """TRL's DPOConfig for the same step: batch, lengths, optimizer, lr, clipping, precision;
    reference log-probs precomputed (no reference forward in the step); no gradient checkpointing
    (neither side recomputes the transformer); no logging, evaluation or saving."""
    import dataclasses
    from trl import DPOConfig
    cuda = s["device"] == "cuda"
    rows = make_pairs(s)
    # transformers 5 renamed gradient_checkpointing
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in names
                     else "gradient_checkpointing")
    return DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=s["pairs_per_step"],
        gradient_accumulation_steps=1, max_length=max(row_lengths(rows)),
        precompute_ref_log_probs=True, precompute_ref_batch_size=s["pairs_per_step"], beta=BETA,
        loss_type=["sigmoid"], learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        max_grad_norm=GRAD_CLIP, optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=cuda, tf32=True if cuda else None, use_cpu=not cuda,
        max_steps=(1 + s["epochs"]) * s["steps"], logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0,
        **{checkpointing: False})  # TRL's default is on


def child_pref_trl(s):
    """TRL's DPOTrainer.train() on the same pairs, batch size and weights: a warm-up epoch, then
    the best of `epochs` timed epochs."""
    device = s["device"]
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOTrainer
    rows, tok = make_pairs(s), word_tokenizer(s["vocab"])
    words = lambda ids: " ".join(f"t{i}" for i in ids)
    data = Dataset.from_list([dict(prompt=words(r["prompt_ids"]),
                                   chosen=" " + words(r["chosen_ids"][:-1]),  # TRL adds EOS
                                   rejected=" " + words(r["rejected_ids"][:-1]))
                              for r in rows])
    model = AutoModelForCausalLM.from_pretrained(s["ckpt"])
    per_epoch = s["steps"]

    class Clock(TrainerCallback):  # epoch times from step end to step end, after the warm-up epoch
        def __init__(self):
            self.seconds = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % per_epoch:
                return
            sync(device)
            if state.global_step == per_epoch:
                self.state = state_bytes(kwargs["model"], kwargs["optimizer"])
                self.at_start = mem(device)
                reset_peak(device)
            else:
                self.seconds.append(clock() - self.t0)
            if state.global_step == (1 + s["epochs"]) * per_epoch:
                self.peak = training_peak(device, self.at_start, self.state)
            self.t0 = clock()

    epochs = Clock()
    trainer = DPOTrainer(model=model, args=trl_config(s, os.path.join(s["workdir"], "trl")),
                         train_dataset=data, processing_class=tok, callbacks=[epochs])
    prepared = trainer.train_dataset  # same token ids as ours, or the comparison is off
    for r, p, c, j in zip(rows, prepared["prompt_ids"], prepared["chosen_ids"],
                          prepared["rejected_ids"]):
        if (list(p), list(c), list(j)) != (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]):
            raise RuntimeError("TRL tokenized the pairs differently from the token ids this "
                               "project trains on")
    if len(prepared) != len(rows) or "ref_chosen_logps" not in prepared.column_names:
        raise RuntimeError("TRL dropped pairs or did not precompute the reference log-probs")
    trainer.train()
    if len(epochs.seconds) != s["epochs"]:
        raise RuntimeError(f"TRL ran {len(epochs.seconds)} timed epochs, expected {s['epochs']}")
    return dict(seconds=min(epochs.seconds), tokens=pair_tokens(rows), steps=per_epoch,
                peak_bytes=epochs.peak)

# -----------------------------------------------------------------------------
# 2. sampling


def until_eos(row, eos):
    """A generated row up to and including its first EOS (HF generate pads the rest)."""
    return row[:row.index(eos) + 1] if eos in row else row


@torch.no_grad()
def generate_no_cache(model, prompts, max_new_tokens, temperature, eos, seed):
    """model.generate without its KV cache: every new token re-runs the transformer over the whole
    sequence (left-padded, same positions and padding mask, same sampler and uniforms), keeping
    only the last position's logits; a row that emitted its EOS leaves the batch, as in
    generate."""
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    P = max(len(p) for p in prompts)
    idx = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts], dtype=torch.long,
                       device=device)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)
    rows, out = list(range(len(prompts))), [[] for _ in prompts]  # rows[j]: batch row j's prompt
    for _ in range(max_new_tokens):
        L = idx.size(1)
        cols = torch.arange(L, device=device)
        key_ok = cols[None, :] >= pad[:, None]                                   # (b, L)
        pos = (cols[None, :] - pad[:, None]).clamp(min=0)                        # (b, L)
        eye = torch.eye(L, dtype=torch.bool, device=device)                      # (L, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()        # (L, L)
        mask = (causal & (key_ok[:, None, :] | eye))[:, None]                    # (b, 1, L, L)
        cache = KVCache(model.config.n_layer, L)  # scratch space for this one pass, thrown away
        h = model._hidden(idx, pos=pos, attn_mask=mask, kv_cache=cache)
        uniform = torch.rand(len(prompts), generator=generator, device=device)[rows]  # (b,)
        tok = GPT._sample(model.lm_head(h[:, -1]), temperature, None, None, uniform)
        live = [j for j, t in enumerate(tok.tolist()) if t != eos]
        for i, t in zip(rows, tok.tolist()):
            out[i].append(t)
        if not live:
            break
        rows = [rows[j] for j in live]
        keep = torch.tensor(live, device=device)
        idx, pad = torch.cat([idx, tok[:, None]], dim=1)[keep], pad[keep]
    return out


def child_sampling(s):
    """tokens/s of each sampler on the same weights, prompts and settings: n samples of every
    prompt at the pairs stage's temperature, no top-k/top-p (its defaults), each row stopping at
    its EOS; tokens/s counts every new token up to it. Ours: generate (KV cache), with compile
    also generate(compile=True); HF generate; with no_cache, ours without the KV cache."""
    from transformers import AutoModelForCausalLM
    device, N, T, eos = s["device"], s["new_tokens"], s["temperature"], s["vocab"] - 1
    ctx = setup(device).ctx
    ours = load_gpt(s["ckpt"]).to(device).eval()
    hf = AutoModelForCausalLM.from_pretrained(s["ckpt"]).to(device).eval()
    prompts = random_prompts(s)
    P = max(len(p) for p in prompts)
    hf_ids = torch.tensor([[eos] * (P - len(p)) + p for p in prompts], device=device)  # left pad
    hf_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)

    def run_hf(n):
        out = hf.generate(input_ids=hf_ids, attention_mask=hf_mask, do_sample=True,
                          max_new_tokens=n, temperature=T, top_k=0, top_p=1.0,
                          pad_token_id=eos, eos_token_id=eos)
        return [until_eos(row, eos) for row in out[:, P:].tolist()]

    samplers = {"ours": lambda n: ours.generate(prompts, n, temperature=T, eos_token_id=eos,
                                                seed=0),
                "hf": run_hf}
    if s["compile"]:
        samplers["ours_compiled"] = lambda n: ours.generate(prompts, n, temperature=T,
                                                            eos_token_id=eos, seed=0, compile=True)
    if s["no_cache"]:
        samplers["no_cache"] = lambda n: generate_no_cache(ours, prompts, n, T, eos, seed=0)
    result = {}
    for name, fn in samplers.items():
        torch.manual_seed(0)  # HF generate draws from the global generator
        runs = []
        with ctx:
            fn(N if name == "ours_compiled" else min(N, 4))  # warm-up (and the compiled graph)
            for _ in range(1 if name == "no_cache" else s["reps"]):  # no cache: slow, timed once
                sync(device)
                t0 = clock()
                out = fn(N)
                sync(device)
                runs.append((clock() - t0, sum(map(len, out)), out))
        seconds, tokens, out = min(runs, key=lambda r: r[0] / r[1])  # the best tokens/s
        if not all(o and eos not in o[:-1] and (len(o) == N or o[-1] == eos) for o in out):
            raise RuntimeError(f"{name}: a row neither ran to {N} tokens nor stopped at its EOS")
        result[name] = dict(seconds=seconds, tokens=tokens,
                            stopped=sum(o[-1] == eos for o in out) / len(out))
    result["hf_attention"] = hf.config._attn_implementation
    return result

# -----------------------------------------------------------------------------
# 3. log-prob memory


def child_logps(s):
    """Peak memory (above the model and inputs already in memory) and time of one forward+backward
    of the per-token log-probs of (rows, len) random tokens: model(idx, targets), or the naive full
    log-softmax."""
    device = s["device"]
    ctx = setup(device).ctx
    model = load_gpt(s["ckpt"]).to(device)
    g = torch.Generator().manual_seed(5)
    shape = (s["logps_rows"], s["logps_len"])
    idx = torch.randint(0, s["vocab"], shape, generator=g).to(device)      # (rows, len)
    targets = torch.randint(0, s["vocab"], shape, generator=g).to(device)  # (rows, len)

    def run(idx, targets):
        with ctx:
            if s["method"] == "chunked":
                logps = model(idx, targets)  # (rows, len) float32, chunked over positions
            else:
                logps = (F.log_softmax(model(idx).float(), dim=-1)  # (rows, len, vocab) float32
                         .gather(-1, targets[..., None]).squeeze(-1))
        logps.sum().backward()
        model.zero_grad(set_to_none=True)

    # a tiny call first: one-time library set-up is not the method's memory
    run(idx[:1, :8], targets[:1, :8])
    base = mem(device)
    reset_peak(device)
    t0 = clock()
    run(idx, targets)  # the first full-size call, in a fresh process: the one whose memory counts
    sync(device)
    return dict(peak_bytes=mem(device, peak=True) - base, seconds=clock() - t0)


CHILDREN = {"pref_ours": child_pref_ours, "pref_trl": child_pref_trl, "sampling": child_sampling,
            "logps": child_logps}

# -----------------------------------------------------------------------------
# the parent: run every measurement in its own process, then print the report


class ChildFailed(ValueError):  # a ValueError, so that cli() reports it as one `error:` line
    pass


def run_child(kind, spec, label):
    """One measurement in a fresh interpreter (`python scripts/bench.py --child KIND --spec JSON`); its
    result dict."""
    t0 = time.time()
    print(f"[bench] {label} ...", end="", file=sys.stderr, flush=True)
    if spec["inprocess"]:  # the tests' shortcut: no interpreter start-up, memory not isolated
        result = CHILDREN[kind](spec)
        print(f" {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
        return result
    env = dict(os.environ, TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=os.path.join(spec["workdir"], "datasets"))
    if spec["device"] == "cpu" and kind != "sampling":
        # glibc: every allocation >= 128 KiB gets its own mapping, returned on free, so the
        # resident set follows the live tensors (see mem). Not for sampling, which is timed
        # alone: a fresh mapping for every step's (rows, vocab) tensors costs it ~40 %.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    command = [sys.executable, os.path.join(HERE, "bench.py"),
               "--child", kind, "--spec", json.dumps(spec)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE)
    print(f" {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        err = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if l.strip()]
        last = next((l for l in reversed(err) if not l.startswith(" ")),
                    err[-1] if err else "no output")
        raise ChildFailed(f"{label} failed (exit {proc.returncode}): {last.strip()[:300]}")
    return json.loads(lines[-1][len(RESULT):])


def run_as_child(cfg):
    """The child's side of run_child: one measurement, its result as the last stdout line."""
    need(cfg.child in CHILDREN, f"--child {cfg.child!r}: expected one of {', '.join(CHILDREN)}")
    spec = json.loads(cfg.spec)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    print(RESULT + json.dumps(CHILDREN[cfg.child](spec)), flush=True)


def version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def fmt(x, digits=1, unit=""):
    return "n/a" if x is None else f"{x:,.{digits}f}{unit}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def describe(s, m):
    shape = MODEL_SHAPES[m]
    kv = f", {shape['n_kv_head']} k/v heads" if "n_kv_head" in shape else ""
    return (f"{m} ({shape['family']}: n_layer {shape['n_layer']}, n_head {shape['n_head']}{kv}, "
            f"n_embd {shape['n_embd']}, vocab {shape.get('vocab', s['vocab'])}, "
            f"{s['n_params'][m] / 1e6:.1f}M params, random weights)")


def suffix(s, m, part):
    """The machine-readable names' suffix: none for a part's first shape, _<shape> after it."""
    return "" if m == s[part][0] else "_" + m.replace("-", "_").replace(".", "_")


def describe_pref(s):
    """What the preference-step rows measure, on both sides."""
    cuda = s["device"] == "cuda"
    pairs = make_pairs(s)
    print(f"preference step: {len(pairs)} pairs, {s['pairs_per_step']} pairs/step "
          f"({2 * s['pairs_per_step']} rows: chosen+rejected), {s['steps']} steps/epoch, prompt "
          f"{s['prompt'][0]}-{s['prompt'][1]} + response {s['response'][0]}-{s['response'][1]} "
          f"tokens + EOS (longest row {max(row_lengths(pairs))}); 1 warm-up epoch, then the best "
          f"of {s['epochs']} timed epochs; tokens/s = the same non-pad tokens on both sides "
          f"(prompt+chosen + prompt+rejected of every pair) / seconds per epoch")
    # (train.pair_batch pads to multiples of 64 under torch.compile: train.bucket)
    compiled = ", torch.compile with lengths padded to multiples of 64" if s["compile"] else ""
    print(f"  nanoADPO: train.py's step: precomputed reference log-probs, one (2B, T) "
          f"model(idx, targets) forward, ADPO static k=1 loss, clip {GRAD_CLIP}, "
          f"AdamW{' fused' if cuda else ''}, length-grouped batches{compiled}")
    print(f"  TRL: DPOTrainer.train(), sigmoid DPO loss, precompute_ref_log_probs=True (no "
          f"reference forward in the step), optim={'adamw_torch_fused' if cuda else 'adamw_torch'}"
          f", bf16={cuda}, {'tf32 on, ' if cuda else ''}gradient checkpointing off, max_grad_norm "
          f"{GRAD_CLIP}, lr {LR} constant, weight decay {WEIGHT_DECAY}, betas {BETAS}, max_length "
          f"= longest row, its default random sampler, no torch.compile")
    if cuda:
        print("  MFU: model FLOPs per token (model.flops_per_token: 6N + 12·L·H·Q·T, N the matmul "
              "weights, T = longest row) x non-pad tokens/s / the GPU's dense bf16 peak")
    print("  peak memory: " + ("torch.cuda.max_memory_allocated over the timed epochs" if cuda else
                               "weights + optimizer state + the resident set's rise during the "
                               "timed epochs"))


def measure_pref(s, m):
    """Ours and TRL's preference step on model shape m -> (ours, trl or None)."""
    spec = dict(s, ckpt=s["ckpts"][m])
    ours = run_child("pref_ours", spec, f"preference step, nanoADPO ({m})")
    trl, why = None, None
    if version("trl") is None:
        why = "trl is not installed (pip install -r requirements-bench.txt)"
    else:
        try:
            trl = run_child("pref_trl", spec, f"preference step, TRL DPOTrainer ({m})")
        except ChildFailed as e:
            why = str(e)
    if why:
        print(f"  TRL columns n/a: {why}")
    if s["compile"]:
        print(f"  torch.compile: {ours['graphs']} graphs compiled in the warm-up epoch, "
              f"{ours['graphs_compiled_timed']} during the timed epochs")
    return ours, trl


def bench_pref(s):
    """Preference step, per model shape: ours vs TRL. -> (table rows, machine-readable values)"""
    describe_pref(s)
    rows, values = [], {}
    pct = lambda x: None if x is None else 100 * x
    for m in s["pref_models"]:
        print(f"  model: {describe(s, m)}")
        ours, trl = measure_pref(s, m)
        tps = ours["tokens"] / ours["seconds"]
        trl_tps = trl["tokens"] / trl["seconds"] if trl else None
        fpt, peak = ours["flops_per_token"], ours["peak_flops"]
        mfu = lambda t: None if t is None or not peak else fpt * t / peak
        mib = ours["peak_bytes"] / 2 ** 20
        trl_mib = trl["peak_bytes"] / 2 ** 20 if trl else None
        rows += [[f"preference step tokens/s ({m})", fmt(tps, 0), fmt(trl_tps, 0),
                  fmt(ratio(tps, trl_tps), 2, "x")],
                 [f"preference step MFU ({m})", fmt(pct(mfu(tps)), 1, "%"),
                  fmt(pct(mfu(trl_tps)), 1, "%"), fmt(ratio(mfu(tps), mfu(trl_tps)), 2, "x")],
                 [f"preference step peak memory, MiB ({m})", fmt(mib), fmt(trl_mib),
                  fmt(ratio(mib, trl_mib), 2, "x")]]
        end = suffix(s, m, "pref_models")  # the first shape: the plain names
        values.update({f"pref_step_speedup_vs_trl{end}": ratio(tps, trl_tps),
                       f"pref_step_memory_ratio_vs_trl{end}": ratio(mib, trl_mib),
                       f"pref_step_pad_fraction{end}": 1 - ours["tokens"] / ours["padded_tokens"]})
        for name, mine, theirs in (("tokens_per_s", tps, trl_tps), ("mfu", mfu(tps), mfu(trl_tps)),
                                   ("peak_memory_mib", mib, trl_mib)):
            values[f"pref_step_{name}{end}"] = mine
            values[f"trl_pref_step_{name}{end}"] = theirs
    return rows, values


def bench_sampling(s):
    """Sampling, per model shape: model.generate vs HF generate (and its compiled decode step with
    --compile), vs ours without KV cache on the first shape. -> (table rows, values)"""
    n_rows = s["sample_prompts"] * s["n_samples"]
    print(f"sampling: {s['sample_prompts']} prompts x {s['n_samples']} samples = {n_rows} rows, "
          f"prompts of {s['sample_prompt'][0]}-{s['sample_prompt'][1]} tokens (left-padded), up "
          f"to {s['new_tokens']} new tokens per row, each row stopping at its EOS (made likely: "
          f"{s['eos_rate']:.3f} a step), temperature {s['temperature']}, no top-k/top-p; best "
          f"tokens/s of {s['reps']} runs after a warm-up; tokens/s = new tokens (EOS included) / s")
    rows, values = [], {}
    for m in s["sample_models"]:
        print(f"  model: {describe(s, m)}")
        first = m == s["sample_models"][0]
        r = run_child("sampling", dict(s, ckpt=s["ckpts"][m], no_cache=first), f"sampling ({m})")
        attention = r.pop("hf_attention")
        stopped = ", ".join(f"{k} {100 * v['stopped']:.0f}%" for k, v in r.items())
        print(f"  HF generate: {attention} attention, its default dynamic KV cache, "
              f"the same weights in float32 under the same autocast as nanoADPO's generate; rows "
              f"stopped by EOS: {stopped}")
        tps = {k: v["tokens"] / v["seconds"] for k, v in r.items()}
        end = suffix(s, m, "sample_models")
        peers = [("hf", "HF generate", "hf_generate")]
        if first:
            peers.append(("no_cache", "nanoADPO without KV cache", "no_kv_cache"))
        for key, label, name in peers:
            rows.append([f"sampling tokens/s vs {label} ({m})", fmt(tps["ours"], 0),
                         fmt(tps[key], 0), fmt(ratio(tps["ours"], tps[key]), 2, "x")])
            values[f"sampling_speedup_vs_{name}{end}"] = ratio(tps["ours"], tps[key])
            values[f"{name}_tokens_per_s{end}"] = tps[key]
        values[f"sampling_tokens_per_s{end}"] = tps["ours"]
        if "ours_compiled" in tps:
            rows.append([f"sampling tokens/s, compiled decode step vs HF generate ({m})",
                         fmt(tps["ours_compiled"], 0), fmt(tps["hf"], 0),
                         fmt(ratio(tps["ours_compiled"], tps["hf"]), 2, "x")])
            values[f"compiled_sampling_speedup_vs_hf_generate{end}"] = ratio(tps["ours_compiled"],
                                                                             tps["hf"])
            values[f"compiled_sampling_tokens_per_s{end}"] = tps["ours_compiled"]
    return rows, values


def bench_logps(s):
    """Log-prob memory: model(idx, targets) vs the naive log-softmax. -> (table rows, values)"""
    m = s["logps_model"]
    print(f"log-probs: one forward+backward of the per-token log-probs of {s['logps_rows']} x "
          f"{s['logps_len']} tokens; nanoADPO = model(idx, targets) (chunked, checkpointed), naive "
          f"= log_softmax(model(idx).float()).gather; peak memory above the model and inputs "
          f"already held")
    print(f"  model: {describe(s, m)}")
    r = {meth: run_child("logps", dict(s, ckpt=s["ckpts"][m], method=meth),
                         f"log-probs, {meth} ({m})")
         for meth in ("chunked", "naive")}
    mib = {k: v["peak_bytes"] / 2 ** 20 for k, v in r.items()}
    ms = {k: 1000 * v["seconds"] for k, v in r.items()}
    rows = [[f"log-probs fwd+bwd peak memory, MiB ({m})", fmt(mib["chunked"]),
             fmt(mib["naive"]), fmt(ratio(mib["chunked"], mib["naive"]), 2, "x")],
            [f"log-probs fwd+bwd time, ms ({m})", fmt(ms["chunked"]), fmt(ms["naive"]),
             fmt(ratio(ms["naive"], ms["chunked"]), 2, "x")]]
    return rows, {"logps_peak_memory_ratio_vs_naive": ratio(mib["chunked"], mib["naive"]),
                  "logps_speedup_vs_naive": ratio(ms["naive"], ms["chunked"]),
                  "logps_peak_memory_mib": mib["chunked"],
                  "naive_logps_peak_memory_mib": mib["naive"]}


PARTS = {"pref": bench_pref, "sampling": bench_sampling, "logps": bench_logps}

# -----------------------------------------------------------------------------
# the command line: flags -> settings, the header, every part, the report


def parse_flags(argv):
    """BenchConfig from the flags, and the parts to run; a bad value is one line naming its flag."""
    cfg = parse(BenchConfig, argv)
    need(cfg.device in ("auto", "cpu", "cuda"),
         f"--device {cfg.device!r}: expected auto, cpu or cuda")
    cfg.compile = cfg.compile.lower()
    need(cfg.compile in ("auto", "true", "false"),
         f"--compile {cfg.compile!r}: expected auto, true or false")
    need(cfg.threads >= 0, f"--threads must be >= 0 (0: the default), got {cfg.threads}")
    parts = [x.strip() for x in cfg.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    need(parts and not unknown, f"--parts {cfg.parts!r}: unknown {unknown or 'none given'}; "
                                f"expected a comma-separated subset of {','.join(PARTS)}")
    shapes = [x.strip() for x in cfg.models.split(",") if x.strip()]
    need(all(m in MODEL_SHAPES for m in shapes),
         f"--models {cfg.models!r}: expected a comma-separated subset of {','.join(MODEL_SHAPES)}")
    return cfg, parts


def plan(cfg, device):
    """settings() for this device and mode, with the flags every measurement needs."""
    s = settings(device, cfg.quick, cfg.toy)
    threads = cfg.threads
    if not threads and device == "cpu" and (cfg.quick or cfg.toy):
        threads = 1  # two threads on two cores stall on every op as soon as anything else runs
    compile_step = device == "cuda" if cfg.compile == "auto" else cfg.compile == "true"
    s.update(device=device, compile=compile_step, threads=threads, inprocess=cfg.inprocess)
    shapes = [x.strip() for x in cfg.models.split(",") if x.strip()]
    if shapes:  # --models: these shapes for every part
        s.update(pref_models=shapes, sample_models=shapes, logps_model=shapes[0])
    return s


def print_header(cfg, run, s):
    """The machine, precision, mode and library versions the numbers belong to."""
    cuda = run.device_type == "cuda"
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    hw = torch.cuda.get_device_name() if cuda else f"{cpu}, {torch.get_num_threads()} torch threads"
    precision = {"bfloat16": "bf16 autocast", "float16": "fp16 autocast"}.get(run.dtype, "float32")
    mode = "toy" if cfg.toy else "quick" if cfg.quick else "full"
    print(f"device: {run.device_type} ({hw}) | precision: {precision} | torch.compile (nanoADPO "
          f"step): {'on' if s['compile'] else 'off'} | mode: {mode}")
    if not cuda:
        print("timing: " + ("process CPU seconds (one thread: other processes cannot inflate it)"
                            if torch.get_num_threads() == 1 else "wall-clock seconds"))
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {version('transformers') or 'not installed'}, "
          f"trl {version('trl') or 'not installed'}")


def measure(s, parts):
    """Every part's table rows and values, on random checkpoints saved to a temporary folder."""
    rows, values = [], {}
    with tempfile.TemporaryDirectory(prefix="nanoadpo-bench-") as work:
        s["workdir"], s["ckpts"], s["n_params"] = work, {}, {}
        needed = {"pref": s["pref_models"], "sampling": s["sample_models"],
                  "logps": [s["logps_model"]]}
        for m in dict.fromkeys(m for part in parts for m in needed[part]):
            s["ckpts"][m] = os.path.join(work, m)
            s["n_params"][m] = save_random_model(s["ckpts"][m], m, s)
        for part in parts:
            part_rows, part_values = PARTS[part](s)
            rows += part_rows
            values.update(part_values)
    return rows, values


def report(rows, values):
    """The markdown table, then one machine-readable `name: value` line per value."""
    print()
    print(markdown_table(["metric", "nanoADPO", "peer", "ratio"], rows))
    print("\nratio = nanoADPO / peer for memory (< 1: less memory), peer time / nanoADPO time for "
          "speed (> 1: faster). Peers: TRL DPOTrainer; HF generate, then nanoADPO without its KV "
          "cache; the naive log-softmax.\n")
    for k, v in values.items():
        print(f"{k}: {'n/a' if v is None else f'{v:.4g}'}")


def main(argv=None):
    cfg, parts = parse_flags(sys.argv[1:] if argv is None else argv)
    if cfg.child:  # one measurement, in its own process (see run_child)
        return run_as_child(cfg)
    run = setup(cfg.device)  # auto -> cuda or cpu; --device cuda without a GPU: one line
    s = plan(cfg, run.device_type)
    threads_before = torch.get_num_threads()
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    t_start = time.time()
    try:
        print_header(cfg, run, s)
        rows, values = measure(s, parts)
    finally:
        torch.set_num_threads(threads_before)
    values["bench_wall_s"] = time.time() - t_start
    report(rows, values)


if __name__ == "__main__":
    cli(main)
