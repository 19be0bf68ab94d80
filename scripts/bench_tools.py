"""
What every measurement of bench.py shares: the clock and the memory readings (the same calls on
CPU and CUDA), the random inputs (preference pairs, ragged prompts) and the random Hugging Face
checkpoints that this project and its peers both load, so that both sides run identical weights.

No downloads: a randomly initialised transformers model of the shape asked for (GPT-2, Llama or
Qwen2) is saved to a folder with save_pretrained.
"""
import time

import torch

BLOCK_SIZE = 1024  # the context of every random checkpoint (GPT-2's)

# name -> the shape of a random checkpoint: its family, n_layer, n_head, n_embd, and for the Llama
# family the k/v heads, the MLP width and rope_theta. The vocab is the run's (GPT-2's 50257: it is
# what makes the logits costly) unless the shape has its own.
MODEL_SHAPES = {
    "toy": dict(family="gpt2", n_layer=1, n_head=2, n_embd=32),
    "llama-toy": dict(family="llama", n_layer=1, n_head=2, n_kv_head=1, n_embd=32, n_inner=64),
    "tiny": dict(family="gpt2", n_layer=2, n_head=4, n_embd=128),
    "llama-tiny": dict(family="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=128,
                       n_inner=352),
    "small": dict(family="gpt2", n_layer=4, n_head=4, n_embd=256),
    "llama-small": dict(family="llama", n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                        n_inner=704),
    "gpt2": dict(family="gpt2", n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(family="gpt2", n_layer=24, n_head=16, n_embd=1024),
    "qwen2.5-0.5b": dict(family="qwen2", n_layer=24, n_head=14, n_kv_head=2, n_embd=896,
                         n_inner=4864, vocab=151936, rope_theta=1e6),
}

# -----------------------------------------------------------------------------
# time and memory: the same calls on both devices


def _proc_bytes(field):
    """/proc/self/status's VmRSS or VmHWM in bytes; without /proc (not Linux) the never-reset
    high-water mark."""
    try:
        with open("/proc/self/status") as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        import resource
        return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def mem(device, peak=False):
    """Bytes in use now, or with peak=True the most since reset_peak: allocated tensors on CUDA,
    the resident set on CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
    return _proc_bytes("VmHWM" if peak else "VmRSS")


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


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def clock():
    """Seconds for timing. On CPU with one thread: this process's CPU time (user + system), which
    other processes on a shared machine cannot inflate by taking the core away; otherwise wall
    time."""
    if torch.get_num_threads() == 1 and not torch.cuda.is_initialized():
        return time.process_time()
    return time.perf_counter()


def state_bytes(model, optimizer):
    """Bytes of the tensors a training run holds between steps: the weights (tied ones once) and
    the optimizer state. Gradients are freed after every step on both sides
    (zero_grad(set_to_none=True))."""
    params = {id(p): p for p in model.parameters()}.values()
    # getattr: unwrap accelerate's AcceleratedOptimizer
    state = getattr(optimizer, "optimizer", optimizer).state.values()
    return (sum(p.numel() * p.element_size() for p in params)
            + sum(t.numel() * t.element_size() for st in state for t in st.values()
                  if torch.is_tensor(t)))


def training_peak(device, at_start, state):
    """Peak memory of a timed training epoch: on CUDA every allocated tensor
    (max_memory_allocated); on CPU the weights + optimizer state plus the resident set's rise above
    its level at the start of the epoch."""
    return mem(device, peak=True) if device == "cuda" else state + mem(device, peak=True) - at_start

# -----------------------------------------------------------------------------
# the shared inputs: random token pairs and prompts, random checkpoints


def make_pairs(s):
    """n random preference pairs as encode_pairs rows (responses end with EOS = vocab-1, which
    never occurs inside them). Deterministic, so every process rebuilds exactly the same pairs."""
    g = torch.Generator().manual_seed(1234)
    eos = s["vocab"] - 1
    draw = lambda lohi: int(torch.randint(lohi[0], lohi[1] + 1, (1,), generator=g))
    ids = lambda n: torch.randint(0, eos, (n,), generator=g).tolist()
    return [dict(prompt_ids=ids(draw(s["prompt"])),
                 chosen_ids=ids(draw(s["response"])) + [eos],
                 rejected_ids=ids(draw(s["response"])) + [eos])
            for _ in range(s["pairs_per_step"] * s["steps"])]


def pair_tokens(rows):
    """Non-pad tokens of a pass over the pairs, counted the same way for both sides:
    prompt+chosen+prompt+rejected."""
    return sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
               for r in rows)


def random_prompts(s):
    """sample_prompts random prompts of sample_prompt (low, high) tokens, each repeated n_samples
    times, as eval.complete batches them (never EOS = vocab-1)."""
    g = torch.Generator().manual_seed(99)
    lo, hi = s["sample_prompt"]
    lengths = torch.randint(lo, hi + 1, (s["sample_prompts"],), generator=g).tolist()
    prompts = [torch.randint(0, s["vocab"] - 1, (n,), generator=g).tolist() for n in lengths]
    return [p for p in prompts for _ in range(s["n_samples"])]


def hf_model(shape, vocab):
    """A random-init transformers causal LM of MODEL_SHAPES[shape] (float32; tied embeddings as in
    GPT-2 and the small Llamas/Qwens; EOS = vocab-1)."""
    import transformers
    m = MODEL_SHAPES[shape]
    vocab = m.get("vocab", vocab)
    ids = dict(bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    torch.manual_seed(0)
    if m["family"] == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab, n_positions=BLOCK_SIZE, n_layer=m["n_layer"], n_head=m["n_head"],
            n_embd=m["n_embd"], **ids))
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
    config, model = classes[m["family"]]
    return model(config(
        vocab_size=vocab, hidden_size=m["n_embd"], intermediate_size=m["n_inner"],
        num_hidden_layers=m["n_layer"], num_attention_heads=m["n_head"],
        num_key_value_heads=m["n_kv_head"], max_position_embeddings=BLOCK_SIZE,
        rope_theta=m.get("rope_theta", 10000.0), tie_word_embeddings=True, **ids))


@torch.no_grad()
def make_eos_likely(model, eos, rate, temperature):
    """Random weights give every token about 1/V: a sampled row would never stop. So that rows
    stop at ragged lengths, as a trained model's do, every input embedding is shifted along one
    fixed unit direction u (the final hidden states then carry u) and EOS's output row gains β·u,
    with β set by bisection so that EOS has probability `rate` at temperature `temperature` on
    average over random contexts. Tied output rows gain u too: the same shift of every logit, so
    the other tokens' probabilities keep their ratios."""
    g = torch.Generator().manual_seed(7)
    inputs = model.get_input_embeddings().weight   # (V, C)
    outputs = model.get_output_embeddings().weight  # (V, C), the same tensor when tied
    u = torch.randn(inputs.size(1), generator=g)
    u /= u.norm()
    inputs += u  # |u| = 1, several times a random row's norm (0.02·sqrt(C))
    idx = torch.randint(0, eos, (2, 32), generator=g)
    logits = model(idx).logits.float().flatten(0, 1)               # (N, V)
    outputs[eos] += u
    along = model(idx).logits.float().flatten(0, 1)[:, eos] - logits[:, eos]  # (N,): h·u
    outputs[eos] -= u
    others = torch.cat([logits[:, :eos], logits[:, eos + 1:]], dim=1) / temperature
    rest = torch.logsumexp(others, dim=-1)                           # (N,)

    def p_eos(beta):  # EOS's mean probability with β·u on its output row
        return torch.sigmoid((logits[:, eos] + beta * along) / temperature - rest).mean()
    lo, hi = 0.0, 1.0
    while p_eos(hi) < rate:
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_eos(mid) < rate else (lo, mid)
    outputs[eos] += hi * u


def save_random_model(folder, shape, s):
    """A random transformers model of the shape, EOS made likely (make_eos_likely, at the run's
    eos_rate and temperature), saved as an ordinary Hugging Face folder -> its parameter count."""
    from transformers.utils import logging
    logging.disable_progress_bar()
    model = hf_model(shape, s["vocab"]).eval()
    make_eos_likely(model, s["vocab"] - 1, s["eos_rate"], s["temperature"])
    model.save_pretrained(folder)  # (transformers' own)
    return sum(p.numel() for p in model.parameters())
