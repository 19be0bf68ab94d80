"""
Benchmark nanoADPO against its peers, on the same random GPT-2 weights, in one run:

  1. preference step    policy forward+backward on chosen+rejected, loss, AdamW step; reference log-probs
                        precomputed on both sides. This project (train.py's step) vs TRL's DPOTrainer.
  2. sampling           n samples for many ragged prompts (the pairs stage's workload): model.generate (KV cache)
                        vs Hugging Face generate, and vs this project without the KV cache.
  3. log-probs          peak memory of model.token_logps forward+backward vs the naive full float32 log-softmax.

    python bench.py --device cpu --quick     # small shapes, about 1.5 min on a 2-core CPU
    python bench.py --device cuda            # GPT-2 124M and gpt2-medium shapes, bf16, torch.compile

The peers are bench-only dependencies: pip install -r requirements-bench.txt. Without trl the preference-step
peer columns read n/a and the rest still runs. No downloads: a randomly initialised transformers GPT2LMHeadModel
is saved to a temporary folder and loaded by both sides, so both compute with identical weights.

Every measurement runs in a fresh subprocess, one at a time, so that its peak memory is its own. On CUDA peak
memory is torch.cuda.max_memory_allocated. On CPU it is read from the process's resident set: the children run with
glibc's MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB, so every tensor of that size has its own mapping, returned to the
system when freed, and the resident set follows the live tensors; the Linux high-water mark (VmHWM) is reset just
before the measured region. A training peak is then the weights + optimizer state plus the rise of the resident set
during the timed epochs (what max_memory_allocated counts on CUDA), a log-prob peak the rise above the model and
inputs already held.

The printed markdown table is followed by machine-readable `name: value` lines; a speedup > 1 means faster than the
peer, a memory ratio < 1 means less memory than the peer.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata

import torch
import torch.nn.functional as F

from data import length_grouped_batches, preference_batch, row_lengths
from eval import markdown_table, pair_logps
from loss import adpo_loss, preference_metrics
from model import GPT, KVCache, autocast_context, peak_flops

HERE = os.path.dirname(os.path.abspath(__file__))
RESULT = "BENCH_RESULT "  # a child's last stdout line: this prefix, then its measurements as JSON

# -----------------------------------------------------------------------------
# what to run: shapes and sizes per device and mode

GPT2_SHAPES = {  # name -> (n_layer, n_head, n_embd); the vocab stays GPT-2's 50257: it is what makes logits costly
    "toy": (1, 2, 32),
    "tiny": (2, 4, 128),
    "small": (4, 4, 256),
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
}


def settings(device, quick, toy=False):
    """Everything a run measures. Lengths are (low, high) token counts, drawn uniformly per row. The preference
    step trains `epochs` + 1 epochs of `steps` steps over the same pairs: the first warms up (and compiles), the
    best of the others counts; sampling takes the best of `reps` runs after a warm-up."""
    if toy:  # the test suite's: tiny shapes and vocab, seconds per part
        return dict(vocab=512, models=["toy"], pairs_per_step=2, steps=2, epochs=1, prompt=(4, 8), response=(4, 12),
                    logps_model="toy", logps_rows=4, logps_len=64,
                    sample_model="toy", sample_prompts=2, n_samples=2, sample_prompt=(4, 8), new_tokens=8, reps=1)
    if device == "cpu":  # the vocab stays 50257, so the log-prob memory has GPT-2's proportions
        s = dict(vocab=50257, models=["tiny"], pairs_per_step=4, steps=2, epochs=2, prompt=(8, 24), response=(8, 40),
                 logps_model="tiny", logps_rows=8, logps_len=256,
                 sample_model="tiny", sample_prompts=4, n_samples=4, sample_prompt=(32, 96), new_tokens=32, reps=2)
        if not quick:
            s.update(models=["small"], pairs_per_step=8, steps=4, prompt=(16, 64), response=(16, 128),
                     logps_model="small", logps_rows=16, logps_len=512, sample_model="small", sample_prompts=8,
                     n_samples=8, sample_prompt=(32, 128), new_tokens=64, reps=3, epochs=3)
        return s
    # CUDA: ~512-token sequences, 8 pairs (16 rows) per step, 64 sampled rows
    s = dict(vocab=50257, models=["gpt2", "gpt2-medium"], pairs_per_step=8, steps=8, epochs=3, prompt=(128, 255),
             response=(192, 255), logps_model="gpt2", logps_rows=16, logps_len=512,
             sample_model="gpt2", sample_prompts=16, n_samples=4, sample_prompt=(32, 128), new_tokens=256, reps=3)
    if quick:
        s.update(steps=4, epochs=2, new_tokens=128, reps=2)
    return s


BLOCK_SIZE = 1024  # GPT-2's context
LR, BETA, WEIGHT_DECAY, BETAS, GRAD_CLIP = 1e-4, 0.1, 0.1, (0.9, 0.95), 1.0  # train.py's PO defaults
PAD_TO = 64  # CUDA + torch.compile: batch lengths rounded up to multiples of this, so only a few shapes compile

# -----------------------------------------------------------------------------
# memory: the same three calls on both devices


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _proc_bytes(field):
    """/proc/self/status's VmRSS or VmHWM in bytes; without /proc (not Linux) the never-reset high-water mark."""
    try:
        return 1024 * _status_kib(field)
    except (OSError, KeyError):
        import resource
        return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def mem_now(device):
    """Bytes in use now: allocated tensors on CUDA, the resident set on CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return _proc_bytes("VmRSS")


def reset_peak(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 to clear_refs resets this process's VmHWM to its current resident set
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak then counts from process start; each measurement has its own process anyway


def mem_peak(device):
    """Peak bytes since reset_peak."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _proc_bytes("VmHWM")


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def clock():
    """Seconds for timing. On CPU with one thread: this process's CPU time (user + system), which other processes
    on a shared machine cannot inflate by taking the core away; otherwise wall time."""
    if torch.get_num_threads() == 1 and not torch.cuda.is_initialized():
        return time.process_time()
    return time.perf_counter()


def state_bytes(model, optimizer):
    """Bytes of the tensors a training run holds between steps: the weights (tied ones once) and the optimizer
    state. Gradients are freed after every step on both sides (zero_grad(set_to_none=True))."""
    params = {id(p): p for p in model.parameters()}.values()
    state = getattr(optimizer, "optimizer", optimizer).state.values()  # unwrap accelerate's AcceleratedOptimizer
    return (sum(p.numel() * p.element_size() for p in params) +
            sum(t.numel() * t.element_size() for st in state for t in st.values() if torch.is_tensor(t)))


def training_peak(device, at_start, state):
    """Peak memory of a timed training epoch: on CUDA every allocated tensor (max_memory_allocated); on CPU the
    weights + optimizer state plus the resident set's rise above its level at the start of the epoch."""
    return mem_peak(device) if device == "cuda" else state + mem_peak(device) - at_start

# -----------------------------------------------------------------------------
# the shared inputs: random token pairs, a random GPT-2 checkpoint


def make_pairs(s):
    """n random preference pairs as encode_pairs rows (responses end with EOS = vocab-1, which never occurs
    inside them). Deterministic, so every process rebuilds exactly the same pairs."""
    g = torch.Generator().manual_seed(1234)
    V, eos = s["vocab"], s["vocab"] - 1
    draw = lambda lohi: int(torch.randint(lohi[0], lohi[1] + 1, (1,), generator=g))
    ids = lambda n: torch.randint(0, eos, (n,), generator=g).tolist()
    return [dict(prompt_ids=ids(draw(s["prompt"])), chosen_ids=ids(draw(s["response"])) + [eos],
                 rejected_ids=ids(draw(s["response"])) + [eos]) for _ in range(s["pairs_per_step"] * s["steps"])]


def pair_tokens(rows):
    """Non-pad tokens of a pass over the pairs, counted the same way for both sides: prompt+chosen+prompt+rejected."""
    return sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)


def save_random_gpt2(folder, shape, vocab):
    """A randomly initialised transformers GPT2LMHeadModel, saved as an ordinary HF folder."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.disable_progress_bar()
    n_layer, n_head, n_embd = GPT2_SHAPES[shape]
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=BLOCK_SIZE, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                     bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())

# -----------------------------------------------------------------------------
# 1. the preference step


class Scorer(torch.nn.Module):  # as in train.py: token_logps as a forward, so torch.compile wraps what the loss calls
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        return self.model.token_logps(idx, targets)


def compiled_graphs():
    """Graphs torch.compile has compiled so far in this process (0 without it)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def child_pref_ours(s):
    """train.py's preference step: reference log-probs computed once, chosen+rejected stacked in one (2B, T)
    forward, ADPO (static k=1) loss, backward, clipping, AdamW (fused on CUDA), length-grouped batches."""
    device = s["device"]
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = autocast_context(device)  # bf16 on CUDA, float32 on CPU
    model = GPT.from_pretrained(s["ckpt"]).to(device)
    rows, eos, B = make_pairs(s), s["vocab"] - 1, s["pairs_per_step"]
    ref = pair_logps(model, rows, eos, batch_size=B, eos_pad=True, device=device, ctx=ctx, progress=False)
    model.train()
    optimizer = model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, device)
    score = Scorer(model)
    if s["compile"]:
        score = torch.compile(score, dynamic=False)  # one graph per padded length: PAD_TO keeps them few
    pad_to = PAD_TO if s["compile"] else None
    max_len = max(row_lengths(rows))

    def step(ix):
        batch = preference_batch([rows[i] for i in ix], eos, eos_pad=True, pad_to=pad_to, max_len=max_len)
        mask = batch["loss_mask"]
        reference = torch.zeros(mask.shape)
        reference[mask] = torch.cat([ref[i][0] for i in ix] + [ref[i][1] for i in ix])
        batch["reference_logps"] = reference
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        n = len(ix)
        with ctx:
            logps = score(batch["input_ids"], batch["targets"])  # (2B, T): chosen rows, then rejected rows
            mask, reference = batch["loss_mask"], batch["reference_logps"]
            six = dict(policy_chosen_logps=logps[:n], policy_rejected_logps=logps[n:],
                       reference_chosen_logps=reference[:n], reference_rejected_logps=reference[n:],
                       chosen_mask=mask[:n], rejected_mask=mask[n:])
            loss = adpo_loss(**six, beta=BETA, family="static", size=1)[0].mean()
            with torch.no_grad():
                metrics = preference_metrics(**{k: v.detach() for k, v in six.items()}, beta=BETA)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), {k: float(v) for k, v in metrics.items()}, batch["input_ids"].numel()

    # one epoch over the pairs to warm up (and compile every padded length), then the same epoch timed, best of
    batches = length_grouped_batches(row_lengths(rows), B, seed=0)
    for ix in batches:
        step(ix)
    graphs = compiled_graphs()
    at_start = mem_now(device)
    reset_peak(device)
    seconds = []
    for _ in range(s["epochs"]):
        t0 = clock()
        padded = sum(step(ix)[2] for ix in batches)
        sync(device)
        seconds.append(clock() - t0)
    peak = training_peak(device, at_start, state_bytes(model, optimizer))
    return dict(seconds=min(seconds), tokens=pair_tokens(rows), padded_tokens=padded, steps=len(batches),
                peak_bytes=peak, graphs=graphs, graphs_compiled_timed=compiled_graphs() - graphs,
                flops_per_token=model.flops_per_token(max_len),
                peak_flops=peak_flops(device) if device == "cuda" else None)


def word_tokenizer(vocab):
    """A GPT-2-sized tokenizer that needs no files: token i is the word 't<i>', and the last id is <|endoftext|>.
    The text 't5 t17 t3' tokenizes to exactly [5, 17, 3], so TRL sees the very token ids this project trains on."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {f"t{i}": i for i in range(vocab - 1)}
    words["<|endoftext|>"] = vocab - 1
    tok = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def trl_config(s, output_dir):
    """TRL's DPOConfig for the same step: batch, lengths, optimizer, lr, clipping, precision; reference log-probs
    precomputed (no reference forward in the step); no gradient checkpointing (neither side recomputes the
    transformer); no logging, evaluation or saving."""
    import dataclasses
    from trl import DPOConfig
    cuda = s["device"] == "cuda"
    rows = make_pairs(s)
    names = {f.name for f in dataclasses.fields(DPOConfig)}  # transformers 5 renamed gradient_checkpointing
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=s["pairs_per_step"], gradient_accumulation_steps=1,
        max_length=max(row_lengths(rows)), precompute_ref_log_probs=True,
        precompute_ref_batch_size=s["pairs_per_step"], beta=BETA, loss_type=["sigmoid"], learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0],
        adam_beta2=BETAS[1], max_grad_norm=GRAD_CLIP, optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=cuda, tf32=True if cuda else None, use_cpu=not cuda, max_steps=(1 + s["epochs"]) * s["steps"],
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, **{checkpointing: False})  # TRL's default is on


def child_pref_trl(s):
    """TRL's DPOTrainer.train() on the same pairs, batch size and weights: a warm-up epoch, then the best of
    `epochs` timed epochs."""
    device = s["device"]
    from datasets import Dataset
    from transformers import GPT2LMHeadModel, TrainerCallback
    from trl import DPOTrainer
    rows, tok = make_pairs(s), word_tokenizer(s["vocab"])
    words = lambda ids: " ".join(f"t{i}" for i in ids)
    data = Dataset.from_list([dict(prompt=words(r["prompt_ids"]), chosen=" " + words(r["chosen_ids"][:-1]),
                                   rejected=" " + words(r["rejected_ids"][:-1])) for r in rows])  # TRL adds EOS
    model = GPT2LMHeadModel.from_pretrained(s["ckpt"])
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
                self.at_start = mem_now(device)
                reset_peak(device)
            else:
                self.seconds.append(clock() - self.t0)
            if state.global_step == (1 + s["epochs"]) * per_epoch:
                self.peak = training_peak(device, self.at_start, self.state)
            self.t0 = clock()

    epochs = Clock()
    trainer = DPOTrainer(model=model, args=trl_config(s, os.path.join(s["workdir"], "trl")), train_dataset=data,
                         processing_class=tok, callbacks=[epochs])
    prepared = trainer.train_dataset  # same token ids as ours, or the comparison is off
    for r, p, c, j in zip(rows, prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"]):
        if (list(p), list(c), list(j)) != (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]):
            raise RuntimeError("TRL tokenized the pairs differently from the token ids this project trains on")
    if len(prepared) != len(rows) or "ref_chosen_logps" not in prepared.column_names:
        raise RuntimeError("TRL dropped pairs or did not precompute the reference log-probs")
    trainer.train()
    if len(epochs.seconds) != s["epochs"]:
        raise RuntimeError(f"TRL ran {len(epochs.seconds)} timed epochs, expected {s['epochs']}")
    return dict(seconds=min(epochs.seconds), tokens=pair_tokens(rows), steps=per_epoch, peak_bytes=epochs.peak)

# -----------------------------------------------------------------------------
# 2. sampling


def random_prompts(s):
    g = torch.Generator().manual_seed(99)
    lo, hi = s["sample_prompt"]
    lengths = torch.randint(lo, hi + 1, (s["sample_prompts"],), generator=g).tolist()
    prompts = [torch.randint(0, s["vocab"] - 1, (n,), generator=g).tolist() for n in lengths]
    return [p for p in prompts for _ in range(s["n_samples"])]  # n samples of every prompt, as eval.complete does


@torch.no_grad()
def generate_no_cache(model, prompts, max_new_tokens, seed=None):
    """model.generate without its KV cache: every new token re-runs the transformer over the whole sequence
    (left-padded, same positions and padding mask, same sampler), keeping only the last position's logits."""
    device = model.lm_head.weight.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    P = max(len(p) for p in prompts)
    idx = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)
    for _ in range(max_new_tokens):
        L = idx.size(1)
        cols = torch.arange(L, device=device)
        key_ok = cols[None, :] >= pad[:, None]                                   # (B, L)
        pos = (cols[None, :] - pad[:, None]).clamp(min=0)                        # (B, L)
        eye = torch.eye(L, dtype=torch.bool, device=device)
        mask = (torch.ones(L, L, dtype=torch.bool, device=device).tril() & (key_ok[:, None, :] | eye))[:, None]
        cache = KVCache(model.config.n_layer, L)  # scratch space for this one pass, thrown away after it
        h = model._hidden(idx, pos=pos, attn_mask=mask, kv_cache=cache)
        tok = GPT._sample(model.lm_head(h[:, -1]), 1.0, None, None, generator)
        idx = torch.cat([idx, tok[:, None]], dim=1)
    return [row[P:] for row in idx.tolist()]


def child_sampling(s):
    """tokens/s of three samplers on the same weights, prompts and settings (temperature 1, no top-k: the pairs
    stage's defaults). No EOS stops a row, so every sampler generates exactly new_tokens per row."""
    from transformers import GPT2LMHeadModel
    device, N = s["device"], s["new_tokens"]
    ctx = autocast_context(device)
    ours = GPT.from_pretrained(s["ckpt"]).to(device).eval()
    hf = GPT2LMHeadModel.from_pretrained(s["ckpt"]).to(device).eval()
    hf.generation_config.eos_token_id = None  # never stop early: identical work for every sampler
    eos = s["vocab"] - 1
    prompts = random_prompts(s)
    P = max(len(p) for p in prompts)
    hf_ids = torch.tensor([[eos] * (P - len(p)) + p for p in prompts], device=device)  # left padding
    hf_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)

    def run_ours(n):
        return ours.generate(prompts, n, temperature=1.0, eos_token_id=None, seed=0)

    def run_no_cache(n):
        return generate_no_cache(ours, prompts, n, seed=0)

    def run_hf(n):
        out = hf.generate(input_ids=hf_ids, attention_mask=hf_mask, do_sample=True, max_new_tokens=n,
                          temperature=1.0, top_k=0, top_p=1.0, pad_token_id=eos, eos_token_id=None)
        return out[:, P:].tolist()

    result = {}
    for name, fn in (("ours", run_ours), ("hf", run_hf), ("no_cache", run_no_cache)):
        with ctx:
            fn(min(N, 4))  # warm-up
            best = float("inf")
            for _ in range(s["reps"] if name != "no_cache" else 1):  # no cache: slow, and timed once
                sync(device)
                t0 = clock()
                out = fn(N)
                sync(device)
                best = min(best, clock() - t0)
        tokens = sum(len(o) for o in out)
        if tokens != len(prompts) * N:
            raise RuntimeError(f"{name} generated {tokens} tokens, expected {len(prompts)} x {N}")
        result[name] = dict(seconds=best, tokens=tokens)
    result["hf_attention"] = hf.config._attn_implementation
    return result

# -----------------------------------------------------------------------------
# 3. log-prob memory


def child_logps(s):
    """Peak memory (above the model and inputs already in memory) and time of one forward+backward of the
    per-token log-probs of (rows, len) random tokens: model.token_logps, or the naive full log-softmax."""
    device = s["device"]
    ctx = autocast_context(device)
    model = GPT.from_pretrained(s["ckpt"]).to(device)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, s["vocab"], (s["logps_rows"], s["logps_len"]), generator=g).to(device)
    targets = torch.randint(0, s["vocab"], (s["logps_rows"], s["logps_len"]), generator=g).to(device)

    def run(idx, targets):
        with ctx:
            if s["method"] == "token_logps":
                logps = model.token_logps(idx, targets)
            else:
                logps = F.log_softmax(model(idx).float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        logps.sum().backward()
        model.zero_grad(set_to_none=True)

    run(idx[:1, :8], targets[:1, :8])  # a tiny call first: one-time library set-up is not the method's memory
    base = mem_now(device)
    reset_peak(device)
    t0 = clock()
    run(idx, targets)  # the first full-size call, in a fresh process, is the one whose memory counts
    sync(device)
    return dict(peak_bytes=mem_peak(device) - base, seconds=clock() - t0)


CHILDREN = {"pref_ours": child_pref_ours, "pref_trl": child_pref_trl, "sampling": child_sampling,
            "logps": child_logps}

# -----------------------------------------------------------------------------
# the parent: run every measurement in its own process, then print the report


class ChildFailed(RuntimeError):
    pass


def run_child(kind, spec, label):
    """One measurement in a fresh interpreter (`python bench.py --_child KIND SPEC`); its result dict."""
    t0 = time.time()
    print(f"[bench] {label} ...", end="", file=sys.stderr, flush=True)
    if spec["inprocess"]:  # the test suite's shortcut: no interpreter start-up, but memory numbers are not isolated
        result = CHILDREN[kind](spec)
        print(f" {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
        return result
    env = dict(os.environ, TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=os.path.join(spec["workdir"], "datasets"))
    if spec["device"] == "cpu":  # glibc: every allocation >= 128 KiB gets its own mapping, returned on free, so the
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # resident set follows the live tensors (see mem_now)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--_child", kind, json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=HERE)
    print(f" {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        err = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if l.strip()]
        last = next((l for l in reversed(err) if not l.startswith(" ")), err[-1] if err else "no output")
        raise ChildFailed(f"{label} failed (exit {proc.returncode}): {last.strip()[:300]}")
    return json.loads(lines[-1][len(RESULT):])


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
    n_layer, n_head, n_embd = GPT2_SHAPES[m]
    return (f"{m} (n_layer {n_layer}, n_head {n_head}, n_embd {n_embd}, vocab {s['vocab']}, "
            f"{s['n_params'][m] / 1e6:.1f}M params, random weights)")


def bench_pref(s):
    """Preference step, per model shape: ours vs TRL. -> (table rows, machine-readable values)"""
    cuda = s["device"] == "cuda"
    pairs = make_pairs(s)
    print(f"preference step: {len(pairs)} pairs, {s['pairs_per_step']} pairs/step ({2 * s['pairs_per_step']} rows: "
          f"chosen+rejected), {s['steps']} steps/epoch, prompt {s['prompt'][0]}-{s['prompt'][1]} + response "
          f"{s['response'][0]}-{s['response'][1]} tokens + EOS (longest row {max(row_lengths(pairs))}); 1 warm-up "
          f"epoch, then the best of {s['epochs']} timed epochs; tokens/s = the same non-pad tokens on both sides "
          f"(prompt+chosen + prompt+rejected of every pair) / seconds per epoch")
    print(f"  nanoADPO: train.py's step: precomputed reference log-probs, one (2B, T) token_logps forward, ADPO "
          f"static k=1 loss, clip {GRAD_CLIP}, AdamW{' fused' if cuda else ''}, length-grouped batches"
          + (f", torch.compile with lengths padded to multiples of {PAD_TO}" if s["compile"] else ""))
    print(f"  TRL: DPOTrainer.train(), sigmoid DPO loss, precompute_ref_log_probs=True (no reference forward in the "
          f"step), optim={'adamw_torch_fused' if cuda else 'adamw_torch'}, bf16={cuda}, {'tf32 on, ' if cuda else ''}"
          f"gradient checkpointing off, max_grad_norm {GRAD_CLIP}, lr {LR} constant, weight decay {WEIGHT_DECAY}, "
          f"betas {BETAS}, max_length = longest row, its default random sampler, no torch.compile")
    if cuda:
        print("  MFU: model FLOPs per token (6N + 12·L·H·Q·T, T = longest row) x non-pad tokens/s / the GPU's "
              "dense bf16 peak")
    print("  peak memory: " + ("torch.cuda.max_memory_allocated over the timed epochs" if cuda else
                               "weights + optimizer state + the resident set's rise during the timed epochs"))
    rows, values = [], {}
    for i, m in enumerate(s["models"]):
        print(f"  model: {describe(s, m)}")
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
        tps = ours["tokens"] / ours["seconds"]
        trl_tps = trl["tokens"] / trl["seconds"] if trl else None
        fpt, peak = ours["flops_per_token"], ours["peak_flops"]
        mfu = lambda t: None if t is None or not peak else fpt * t / peak
        mib, trl_mib = ours["peak_bytes"] / 2 ** 20, trl["peak_bytes"] / 2 ** 20 if trl else None
        pct = lambda x: None if x is None else 100 * x
        rows += [[f"preference step tokens/s ({m})", fmt(tps, 0), fmt(trl_tps, 0), fmt(ratio(tps, trl_tps), 2, "x")],
                 [f"preference step MFU ({m})", fmt(pct(mfu(tps)), 1, "%"), fmt(pct(mfu(trl_tps)), 1, "%"),
                  fmt(ratio(mfu(tps), mfu(trl_tps)), 2, "x")],
                 [f"preference step peak memory, MiB ({m})", fmt(mib), fmt(trl_mib), fmt(ratio(mib, trl_mib), 2, "x")]]
        suffix = "" if i == 0 else "_" + m.replace("-", "_")  # the first shape gets the plain names
        values.update({f"pref_step_speedup_vs_trl{suffix}": ratio(tps, trl_tps),
                       f"pref_step_memory_ratio_vs_trl{suffix}": ratio(mib, trl_mib),
                       f"pref_step_tokens_per_s{suffix}": tps, f"trl_pref_step_tokens_per_s{suffix}": trl_tps,
                       f"pref_step_mfu{suffix}": mfu(tps), f"trl_pref_step_mfu{suffix}": mfu(trl_tps),
                       f"pref_step_peak_memory_mib{suffix}": mib, f"trl_pref_step_peak_memory_mib{suffix}": trl_mib,
                       f"pref_step_pad_fraction{suffix}": 1 - ours["tokens"] / ours["padded_tokens"]})
    return rows, values


def bench_sampling(s):
    """Sampling: model.generate vs HF generate vs ours without KV cache. -> (table rows, values)"""
    m = s["sample_model"]
    n_rows = s["sample_prompts"] * s["n_samples"]
    print(f"sampling: {s['sample_prompts']} prompts x {s['n_samples']} samples = {n_rows} rows, prompts of "
          f"{s['sample_prompt'][0]}-{s['sample_prompt'][1]} tokens (left-padded), {s['new_tokens']} new tokens per "
          f"row (no EOS stop), temperature 1, no top-k/top-p, best of {s['reps']} after a warm-up; tokens/s = new "
          f"tokens / s")
    print(f"  model: {describe(s, m)}")
    r = run_child("sampling", dict(s, ckpt=s["ckpts"][m]), f"sampling ({m})")
    print(f"  HF generate: {r.pop('hf_attention')} attention, its default dynamic KV cache, the same weights in "
          f"float32 under the same autocast as nanoADPO's generate")
    tps = {k: v["tokens"] / v["seconds"] for k, v in r.items()}
    rows = [[f"sampling tokens/s vs HF generate ({m})", fmt(tps["ours"], 0), fmt(tps["hf"], 0),
             fmt(ratio(tps["ours"], tps["hf"]), 2, "x")],
            [f"sampling tokens/s vs nanoADPO without KV cache ({m})", fmt(tps["ours"], 0), fmt(tps["no_cache"], 0),
             fmt(ratio(tps["ours"], tps["no_cache"]), 2, "x")]]
    return rows, {"sampling_speedup_vs_hf_generate": ratio(tps["ours"], tps["hf"]),
                  "sampling_speedup_vs_no_kv_cache": ratio(tps["ours"], tps["no_cache"]),
                  "sampling_tokens_per_s": tps["ours"], "hf_generate_tokens_per_s": tps["hf"],
                  "no_kv_cache_tokens_per_s": tps["no_cache"]}


def bench_logps(s):
    """Log-prob memory: token_logps vs the naive full log-softmax. -> (table rows, values)"""
    m = s["logps_model"]
    print(f"log-probs: one forward+backward of the per-token log-probs of {s['logps_rows']} x {s['logps_len']} "
          f"tokens; nanoADPO = model.token_logps (chunked, checkpointed), naive = log_softmax(model(idx).float())"
          f".gather; peak memory above the model and inputs already held")
    print(f"  model: {describe(s, m)}")
    r = {meth: run_child("logps", dict(s, ckpt=s["ckpts"][m], method=meth), f"log-probs, {meth} ({m})")
         for meth in ("token_logps", "naive")}
    mib = {k: v["peak_bytes"] / 2 ** 20 for k, v in r.items()}
    ms = {k: 1000 * v["seconds"] for k, v in r.items()}
    rows = [[f"log-probs fwd+bwd peak memory, MiB ({m})", fmt(mib["token_logps"]), fmt(mib["naive"]),
             fmt(ratio(mib["token_logps"], mib["naive"]), 2, "x")],
            [f"log-probs fwd+bwd time, ms ({m})", fmt(ms["token_logps"]), fmt(ms["naive"]),
             fmt(ratio(ms["naive"], ms["token_logps"]), 2, "x")]]
    return rows, {"logps_peak_memory_ratio_vs_naive": ratio(mib["token_logps"], mib["naive"]),
                  "logps_speedup_vs_naive": ratio(ms["naive"], ms["token_logps"]),
                  "logps_peak_memory_mib": mib["token_logps"], "naive_logps_peak_memory_mib": mib["naive"]}


PARTS = {"pref": bench_pref, "sampling": bench_sampling, "logps": bench_logps}


def main(argv=None):
    p = argparse.ArgumentParser(description="nanoADPO vs TRL DPOTrainer, HF generate and the naive log-softmax")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer steps and smaller shapes (CPU: ~1.5 min on 2 cores)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our preference step (default: on for cuda, off for cpu)")
    p.add_argument("--parts", default="pref,sampling,logps", help="comma-separated subset of pref,sampling,logps")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per measurement (default: 1 with --quick, "
                   "so that a busy shared machine does not stall every op; else torch's default)")
    p.add_argument("--toy", action="store_true", help="toy shapes and vocab, for the test suite")
    p.add_argument("--inprocess", action="store_true",
                   help="run every measurement in this process (faster start-up, memory not isolated; for tests)")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child:  # one measurement, in its own process
        kind, spec = args._child[0], json.loads(args._child[1])
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        print(RESULT + json.dumps(CHILDREN[kind](spec)), flush=True)
        return

    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if set(parts) - set(PARTS):
        p.error(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; choose from {', '.join(PARTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch")
    if args.threads is None and args.device == "cpu" and (args.quick or args.toy):
        args.threads = 1  # two threads on two cores stall on every op as soon as anything else runs
    s = settings(args.device, args.quick, args.toy)
    s.update(device=args.device, compile=args.device == "cuda" if args.compile is None else args.compile,
             threads=args.threads, inprocess=args.inprocess)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()

    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    hw = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu}, {torch.get_num_threads()} torch threads"
    mode = "toy" if args.toy else "quick" if args.quick else "full"
    print(f"device: {args.device} ({hw}) | precision: {'bf16 autocast' if args.device == 'cuda' else 'float32'} | "
          f"torch.compile (nanoADPO step): {'on' if s['compile'] else 'off'} | mode: {mode}")
    if args.device == "cpu":
        print("timing: " + ("process CPU seconds (one thread: other processes cannot inflate it)"
                            if torch.get_num_threads() == 1 else "wall-clock seconds"))
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
          f"{version('transformers') or 'not installed'}, trl {version('trl') or 'not installed'}")

    rows, values = [], {}
    try:
        with tempfile.TemporaryDirectory(prefix="nanoadpo-bench-") as work:
            s["workdir"], s["ckpts"], s["n_params"] = work, {}, {}
            needed = {"pref": s["models"], "sampling": [s["sample_model"]], "logps": [s["logps_model"]]}
            for m in dict.fromkeys(m for part in parts for m in needed[part]):
                s["ckpts"][m] = os.path.join(work, m)
                s["n_params"][m] = save_random_gpt2(s["ckpts"][m], m, s["vocab"])
            for part in parts:
                part_rows, part_values = PARTS[part](s)
                rows += part_rows
                values.update(part_values)
    finally:
        torch.set_num_threads(threads_before)

    print()
    print(markdown_table(["metric", "nanoADPO", "peer", "ratio"], rows))
    print("\nratio = nanoADPO / peer for memory (< 1: less memory), peer time / nanoADPO time for speed (> 1: faster). "
          "Peers: TRL DPOTrainer; HF generate, then nanoADPO without its KV cache; the naive log-softmax.\n")
    values["bench_wall_s"] = time.time() - t_start
    for k, v in values.items():
        print(f"{k}: {'n/a' if v is None else f'{v:.4g}'}")


if __name__ == "__main__":
    try:
        main()
    except ChildFailed as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(1)
