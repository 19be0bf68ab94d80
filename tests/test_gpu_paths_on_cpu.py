"""
The CUDA-bound paths, exercised on the CPU: torch.compile with its default backend (inductor) on
the SFT and preference training steps and on the KV-cache decode step, with the compilations
counted by dynamo's counters and no graph break; and `bash scripts/gpu_check.sh --dry-run`, the
one GPU command at CPU size. The same paths on a GPU are the tests marked `cuda` (skipped here).
bf16 autocast end to end on the CPU is in test_resume_and_bad_input.py (next to the exact-resume helpers).
"""
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from torch._dynamo.utils import counters

import train
from conftest import ROOT, cli_env, tiny
from model import GPT, GPTConfig

pytestmark = pytest.mark.slow  # each compiles graphs with a C++ compiler: tens of seconds


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters emptied before and after: the counts are this test's own."""
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    counters.clear()


def test_the_training_steps_compile_once_per_bucketed_shape(tmp_path, monkeypatch, fresh_dynamo):
    """train.py --compile true: the SFT and the preference steps (model(idx, targets) under
    torch.compile, inductor) compile at most one graph per bucketed batch shape the run feeds them
    (lengths padded to multiples of 64: train.bucket), and break no graph."""
    shapes = {"sft": [], "po": []}

    def recording(stage, loss_fn):
        def wrapped(model, batch, *args, **kwargs):
            if batch["input_ids"] is None:  # train.check_loss_at_start: no model, no step
                return loss_fn(model, batch, *args, **kwargs)
            shapes[stage].append(tuple(batch["input_ids"].shape))  # (rows, padded length)
            return loss_fn(model, batch, *args, **kwargs)
        return wrapped
    monkeypatch.setattr(train, "sft_loss", recording("sft", train.sft_loss))
    monkeypatch.setattr(train, "preference_loss", recording("po", train.preference_loss))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train.main(tiny(tmp_path / "run", compile="true", sft_steps=6, po_epochs=2,
                                  n_test=4, dropout=0.0))
    finally:
        torch.set_num_threads(threads)
    seen = set(shapes["sft"]) | set(shapes["po"])
    assert shapes["sft"] and shapes["po"], shapes
    assert all(length % 64 == 0 for _, length in seen), seen  # bucketed
    graphs = fresh_dynamo["stats"]["unique_graphs"]
    assert not fresh_dynamo["graph_break"], dict(fresh_dynamo["graph_break"])
    assert 1 <= graphs <= len(seen), (graphs, seen)  # never a second graph for one shape
    assert math.isfinite(summary["po"]["train"]["loss"])


def test_the_decode_step_compiles_once_per_cache_bucket_and_decodes_the_same(fresh_dynamo):
    """generate(compile=True): GPT.decode_step under torch.compile (inductor, fullgraph: a graph
    break would raise) on the static cache. Three prompt batches, two of them of the same batch
    size and cache bucket (64 columns), the third longer (128): two graphs, and the tokens eager
    decoding gives, greedy and sampled."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=61, n_layer=1, n_head=2, n_embd=32)).eval()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    runs = [(prompts, 12), ([p + [3] * 5 for p in prompts], 20), ([[7] * 40] * 5, 40)]
    for kw in (dict(temperature=0), dict(temperature=0.8, seed=4, eos_token_id=5)):
        for batch, n in runs:
            assert model.generate(batch, n, compile=True, **kw) == model.generate(batch, n, **kw)
    assert fresh_dynamo["stats"]["unique_graphs"] == 2  # (5 rows, 64 columns), (5, 128)
    assert not fresh_dynamo["graph_break"]


def test_the_gpu_command_runs_every_step_at_cpu_size(tmp_path):
    """bash scripts/gpu_check.sh --dry-run: every step of the GPU session (install check, the GPU
    tests, bench.py on each model shape, the Qwen2.5-0.5B-shaped preference step, the shortened
    arith_gpu sweep and its projection) at CPU size, each step's numbers in one results file. A
    step that fails is recorded and the others still run."""
    results = tmp_path / "results.md"
    t0 = time.time()
    p = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(results)],
                       capture_output=True, text=True, cwd=ROOT, env=cli_env(PYTHON=sys.executable),
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = results.read_text()
    steps = re.findall(r"^## (\S+): (ok|FAILED|TIMED OUT|SKIPPED)", text, flags=re.M)
    names = [name for name, _ in steps]
    assert names == ["environment", "install", "gpu-tests", "bench-gpt2", "sampling-gpt2",
                     "bench-gpt2-medium", "sampling-gpt2-medium", "bench-qwen2.5-0.5b",
                     "sampling-qwen2.5-0.5b", "qwen-preference-step", "arith-gpu-sweep"], text
    # on a CPU the install check may find the bench-only peers missing; all else must run
    assert all(status == "ok" for name, status in steps if name != "install"), text
    for number in ("sampling_speedup_vs_hf_generate:", "compiled_sampling_speedup_vs_hf_generate:",
                   "pref_step_tokens_per_s:", "logps_peak_memory_ratio_vs_naive:",
                   "projected_full_sweep_s:", "torch "):
        assert number in text, (number, text)
    assert time.time() - t0 < 900


@pytest.mark.cuda
def test_cuda_graphs_decode_the_tokens_eager_decoding_gives():
    """On a GPU: generate(compile=True) replays CUDA graphs (mode reduce-overhead) over the static
    cache under bf16 autocast, and gives the tokens eager decoding gives (greedy, on peaked logits:
    no near-ties for kernel-level rounding to flip). Prints both speeds (pytest -s)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=8192, n_layer=4, n_head=4,
                          n_embd=256)).cuda().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked logits
    prompts = [[(7 * i + j) % 8000 + 1 for j in range(8 + i % 24)] for i in range(64)]
    seconds = {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for name, kw in (("eager", {}), ("cuda graphs", dict(compile=True))):
            model.generate(prompts, 128, temperature=0, **kw)  # warm-up (and compile)
            torch.cuda.synchronize()
            t0 = time.time()
            out = model.generate(prompts, 128, temperature=0, **kw)
            torch.cuda.synchronize()
            seconds[name] = time.time() - t0
            if name == "eager":
                want = out
    assert out == want
    print(f"\ndecode, 64 rows x 128 tokens: eager {64 * 128 / seconds['eager']:,.0f} tokens/s, "
          f"CUDA graphs {64 * 128 / seconds['cuda graphs']:,.0f} tokens/s")


@pytest.mark.cuda
def test_cuda_sampling_follows_the_softmax_and_the_static_cache_matches():
    """On a GPU: inverse-CDF sampling from 20,000 rows (cumsum and searchsorted on the device)
    follows the softmax, and the static cache samples what the dynamic one does."""
    logits = torch.tensor([1.5, -0.3, 0.8, 2.2, -1.7, 0.1, 0.9, -0.6], device="cuda")
    uniform = torch.rand(20000, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    tokens = GPT._sample(logits.repeat(20000, 1), 0.7, None, None, uniform).cpu()
    freq = torch.bincount(tokens, minlength=8).double() / 20000
    torch.testing.assert_close(freq, (logits.cpu().double() / 0.7).softmax(-1), atol=0.01,
                               rtol=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=101, n_layer=2, n_head=2,
                          n_embd=32)).cuda().eval()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11]]
    kw = dict(temperature=0.9, seed=3, eos_token_id=7)
    assert model.generate(prompts, 20, static_cache=True, **kw) == model.generate(prompts, 20,
                                                                                  **kw)


def test_cuda_tests_are_collected_under_their_marker():
    """`pytest -m cuda` (what gpu_check.sh runs) selects the GPU-only tests of every file."""
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda",
                        "tests"],
                       capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=300)
    collected = [line for line in p.stdout.splitlines() if "::" in line]
    files = {line.split("::")[0] for line in collected}
    want = {"tests/test_gpt2_vs_transformers.py", "tests/test_llama_qwen_vs_transformers.py", "tests/test_gpu_paths_on_cpu.py"}
    assert want <= files, p.stdout
    assert os.path.exists(ROOT / "scripts" / "gpu_check.sh")
