"""
Tests for model.py: GPT-2 equivalence with Hugging Face transformers (the independent reference,
a test-only dependency), KV-cache generation against full recomputation, chunked token
log-probabilities, atomic checkpoints, loading errors, sampling, and (on CUDA only) mixed precision.
"""

import fnmatch
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

# before anything imports huggingface_hub: tests never touch the network
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

from machinery.checkpoint import load_checkpoint, load_gpt, save_checkpoint
from machinery.common import peak_flops, setup
import model as model_module
from model import GPT, GPTConfig, KVCache

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# two random GPT-2 shapes (HF config names)
SHAPES = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=64),
    "small": dict(n_layer=3, n_head=4, n_embd=64, vocab_size=131, n_positions=48),
}


def randomize_(module, std, seed):
    """Every parameter random, biases and LayerNorms included,
    so a weight that is not loaded shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_gpt(seed=0, std=0.2, **kw):
    cfg = dict(block_size=64, vocab_size=61, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return randomize_(GPT(GPTConfig(**cfg)), std, seed).eval()


@pytest.fixture(scope="module", params=sorted(SHAPES))
def hf_folders(request, tmp_path_factory):
    """(HF model, folder saved by save_pretrained, folder in the hub gpt2 layout)
    for one random shape."""
    transformers = pytest.importorskip("transformers")
    shape = SHAPES[request.param]
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.GPT2LMHeadModel(cfg)
    randomize_(hf, 0.2, seed=1).eval()
    assert hf.transformer.h[0].attn.c_attn.bias.abs().max() > 0.1  # a random, non-zero bias to load
    root = tmp_path_factory.mktemp(request.param)
    st = root / "safetensors"
    # model.safetensors, keys prefixed with "transformer.", no lm_head (tied)
    hf.save_pretrained(st)
    hub = root / "hub"
    hf.config.save_pretrained(hub)
    # the hub gpt2* layout: no "transformer." prefix, HF's causal-mask buffers present,
    # no lm_head.weight
    n = shape["n_positions"]
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()
          if k != "lm_head.weight"}
    for i in range(shape["n_layer"]):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, hub / "pytorch_model.bin")
    assert not (hub / "model.safetensors").exists()
    return hf, st, hub


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


# -----------------------------------------------------------------------------
# 1. loading GPT-2 weights gives the same function as transformers


@pytest.mark.parametrize("layout", ["safetensors", "hub"])
def test_from_pretrained_matches_transformers(hf_folders, layout):
    hf, st, hub = hf_folders
    model = load_gpt(st if layout == "safetensors" else hub).eval()
    cfg = hf.config
    assert model.config.vocab_size == cfg.vocab_size  # never padded
    assert model.config.block_size == cfg.n_positions
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.bias,
                               hf.transformer.h[0].attn.c_attn.bias, rtol=0, atol=0)
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.n_positions),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)
    assert ours.shape == (3, cfg.n_positions, cfg.vocab_size)
    assert (ours - hf_logits(hf, idx)).abs().max() < 1e-4


def fake_hub(folder, calls, cache):
    """A snapshot_download stand-in: a fresh folder holding the files of `folder` that match the
    patterns asked for (as the hub client gives only those)."""
    def snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, tuple(allow_patterns)))
        out = os.path.join(cache, str(len(calls)))
        os.makedirs(out)
        for name in os.listdir(folder):
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                shutil.copy(os.path.join(folder, name), out)
        return out
    return snapshot_download


def test_a_gpt2_name_comes_from_the_hub_and_falls_back_to_bin(hf_folders, monkeypatch, tmp_path):
    hf, _, hub = hf_folders  # the hub layout: pytorch_model.bin, no safetensors
    calls = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_hub(hub, calls, tmp_path))
    model = load_gpt("gpt2", dropout=0.1)
    assert calls == [("gpt2", ("config.json", "model.safetensors")),
                     ("gpt2", ("config.json", "pytorch_model.bin"))]
    assert model.config.dropout == 0.1
    idx = torch.randint(0, hf.config.vocab_size, (2, 17))
    model.eval()
    with torch.no_grad():
        assert (model(idx) - hf_logits(hf, idx)).abs().max() < 1e-4


def test_generate_matches_transformers_greedy(hf_folders):
    hf, st, _ = hf_folders
    model = load_gpt(st)
    prompt = [5, 17, 3, 42, 8]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                      attention_mask=torch.ones(1, 5, dtype=torch.long))[0, len(prompt):].tolist()
    assert model.generate([prompt], 12, temperature=0) == [ref]


# -----------------------------------------------------------------------------
# 2. KV-cache generation == greedy decoding by full recomputation


def greedy_by_recompute(model, prompt, n, eos=None):
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([ids],
                                         device=model.lm_head.weight.device))[0, -1].argmax())
            out.append(tok)
            ids.append(tok)
            if tok == eos:
                break
    return out


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def test_kv_cache_greedy_equals_full_recompute():
    model = tiny_gpt()
    n = 12
    got = model.generate(PROMPTS, n, temperature=0)
    want = [greedy_by_recompute(model, p, n) for p in PROMPTS]
    assert got == want
    assert len({tuple(w) for w in want}) > 1  # the rows really differ


def test_eos_stops_one_row_while_others_continue():
    model = tiny_gpt()
    n = 12
    free = [greedy_by_recompute(model, p, n) for p in PROMPTS]
    # an EOS that some row emits before its last step while another row never emits it
    eos = next(t for row in free for t in row[:n - 1] if any(t not in other for other in free))
    got = model.generate(PROMPTS, n, temperature=0, eos_token_id=eos)
    want = [row[:row.index(eos) + 1] if eos in row else row for row in free]
    assert got == want
    assert any(len(r) < n and r[-1] == eos for r in got)  # stopped early, EOS kept
    assert any(len(r) == n and eos not in r for r in got)  # others ran to the end
    assert got == [greedy_by_recompute(model, p, n, eos=eos) for p in PROMPTS]


def test_generate_restores_mode_and_validates():
    model = tiny_gpt(dropout=0.5).train()
    assert model.generate([[1, 2]], 0) == [[]]
    model.generate([[1, 2]], 3, temperature=0)
    assert model.training
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate([[1], []], 3)
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        model.generate([[1] * 60], 5)
    with pytest.raises(ValueError, match="token id outside"):
        model.generate([[1, 61]], 2)


# -----------------------------------------------------------------------------
# 3. forward / loss / token_logps


def naive_logps(model, idx, targets):
    logp = F.log_softmax(model(idx).float(), dim=-1)  # (B, T, V): what token_logps avoids building
    return (logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            .masked_fill(targets < 0, 0.0))


def test_forward_with_targets_gives_log_probs_and_ignores_negative_targets():
    model = tiny_gpt()
    idx = torch.randint(0, 61, (2, 9))
    targets = torch.randint(0, 61, (2, 9))
    targets[0, :3], targets[1, 5] = -1, -100
    logits = model(idx)
    assert logits.shape == (2, 9, 61)
    logps = model(idx, targets)  # (B, T) float32
    assert logps.shape == (2, 9) and logps.dtype == torch.float32
    keep = targets >= 0
    assert (logps[~keep] == 0).all()
    ref = F.cross_entropy(logits[keep], targets[keep])  # torch's own: the mean NLL of the kept
    torch.testing.assert_close(-logps[keep].mean(), ref)
    with pytest.raises(ValueError, match="sequence length 65 exceeds block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 100, None])
def test_token_logps_matches_naive_values_and_grads(chunk_size):
    model = tiny_gpt(std=0.1).train()  # dropout is 0: train mode must not change the numbers
    g = torch.Generator().manual_seed(chunk_size or 0)
    idx = torch.randint(0, 61, (3, 13), generator=g)
    targets = torch.randint(0, 61, (3, 13), generator=g)
    targets[0, :4], targets[2, -1] = -1, -100
    weights = torch.randn(3, 13, generator=g)

    lp = model(idx, targets, chunk_size=chunk_size)
    assert lp.dtype == torch.float32 and lp.shape == (3, 13)
    assert (lp[targets < 0] == 0).all()
    (lp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = naive_logps(model, idx, targets)
    (ref * weights).sum().backward()

    assert (lp - ref).abs().max() < 1e-5
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def saved_bytes(fn):
    """Bytes of tensors autograd keeps for backward while running fn()."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_token_logps_keeps_no_full_vocab_tensor_for_backward():
    model = tiny_gpt(vocab_size=1000, std=0.05)
    idx = torch.randint(0, 1000, (2, 64))
    full = 2 * 64 * 1000 * 4  # one float32 (B, T, V) tensor
    # what the transformer itself keeps, same for both
    body = saved_bytes(lambda: model._hidden(idx))
    naive = saved_bytes(lambda: naive_logps(model, idx, idx)) - body
    ours = saved_bytes(lambda: model(idx, idx, chunk_size=16)) - body
    assert naive >= 2 * full  # logits and log-softmax, both (B, T, V)
    assert ours < full / 10   # only the chunks' inputs: hidden states (B, T, C) and targets


@pytest.mark.slow
def test_forward_compiles_without_graph_breaks():
    model = tiny_gpt(std=0.1).train()
    # fullgraph: any graph break fails
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    idx = torch.randint(0, 61, (2, 16))
    torch.testing.assert_close(compiled(idx), model(idx))  # logits
    # log-probs: the chunks and their checkpointing compile into the same graph
    targets = idx.masked_fill(idx % 7 == 0, -1)
    logps = compiled(idx, targets, chunk_size=5)
    logps.sum().backward()
    torch.testing.assert_close(logps, model(idx, targets, chunk_size=5))


# -----------------------------------------------------------------------------
# 4. checkpoints


def test_checkpoint_round_trip(tmp_path):
    model = tiny_gpt()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    (-model(torch.randint(0, 61, (2, 8)), torch.randint(0, 61, (2, 8))).mean()).backward()
    opt.step()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, torch.compile(model), opt, step=7, train_config={"beta": 0.1})
    ckpt = load_checkpoint(path)
    assert (ckpt["format"] == "nanoadpo" and ckpt["step"] == 7
            and ckpt["train_config"] == {"beta": 0.1})
    assert not any("_orig_mod" in k for k in ckpt["model"])
    assert ckpt["config"] == dict(block_size=64, vocab_size=61, n_layer=2, n_head=2, n_embd=32,
                                  dropout=0.0, bias=True)

    idx = torch.randint(0, 61, (2, 20))
    for source in (path, tmp_path):  # the file, or a folder holding ckpt.pt
        loaded = load_gpt(source).eval()
        with torch.no_grad():
            assert torch.equal(loaded(idx), model(idx))
    opt2 = loaded.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    opt2.load_state_dict(ckpt["optimizer"])
    for p, p2 in zip(model.parameters(), loaded.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key])


def test_checkpoint_without_optimizer_and_reserved_keys(tmp_path):
    model = tiny_gpt()
    save_checkpoint(tmp_path / "sub" / "a.pt", model)
    assert "optimizer" not in load_checkpoint(tmp_path / "sub" / "a.pt")
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "b.pt", model, config="oops")


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old, new = tiny_gpt(seed=0), tiny_gpt(seed=1)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, old)
    before = path.read_bytes()

    def half_written_save(obj, f, *a, **kw):  # dies half way through writing
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", half_written_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, new)
    monkeypatch.undo()

    def failing_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, new)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp file left behind
    assert torch.equal(load_checkpoint(path)["model"]["lm_head.weight"], old.lm_head.weight)


@pytest.mark.slow
def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, tiny_gpt(seed=0))
    before = path.read_bytes()
    # a process killed while writing: no cleanup code runs at all
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {REPO!r})
        import model
        from machinery import checkpoint
        def dying_save(obj, f, *a, **kw):
            f.write(b"PK partial bytes"); f.flush(); os._exit(9)
        torch.save = dying_save
        checkpoint.save_checkpoint({str(path)!r}, model.GPT(model.GPTConfig(block_size=8, vocab_size=11,
                              n_layer=1, n_head=1, n_embd=8)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert path.read_bytes() == before
    assert load_checkpoint(path)["format"] == "nanoadpo"
    leftovers = [p for p in tmp_path.iterdir() if p.name != "ckpt.pt"]
    # ignored by loaders, overwritten never
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp")
    load_gpt(tmp_path)  # a folder with ckpt.pt and a stale temp file still loads


def test_corrupt_checkpoints_give_clear_errors(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, tiny_gpt())
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.pt: not a readable checkpoint"):
        load_checkpoint(truncated)
    with pytest.raises(ValueError, match=r"truncated\.pt: not a readable checkpoint"):
        load_gpt(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"hello")
    with pytest.raises(ValueError, match=r"garbage\.pt: not a readable checkpoint"):
        load_checkpoint(garbage)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match=r"other\.pt: not a nanoADPO checkpoint"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")


# -----------------------------------------------------------------------------
# 5. CUDA mixed precision (skipped without a GPU)


@pytest.mark.cuda
def test_cuda_autocast_fused_adamw_and_logps():
    torch.manual_seed(0)
    model = tiny_gpt(std=0.05, vocab_size=8192, block_size=256, n_embd=128, n_head=4).cuda().train()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda")
    assert opt.defaults["fused"]
    run = setup("cuda")  # the one device/precision setup of train.py, eval.py and bench.py
    dtype = getattr(torch, run.dtype)
    assert dtype in (torch.bfloat16, torch.float16)
    idx = torch.randint(0, 8192, (4, 256), device="cuda")
    with run.ctx:
        logits = model(idx)
        loss = -model(idx, idx).mean()
    assert logits.dtype == dtype and loss.dtype == torch.float32
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())

    with torch.no_grad():
        exact = model(idx, idx)
        with run.ctx:
            mixed = model(idx, idx)
    assert mixed.dtype == torch.float32
    assert (mixed - exact).abs().max() < 0.1

    def peak(fn):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with run.ctx:
            out = fn()
        out.sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    naive = peak(lambda: naive_logps(model, idx, idx))
    ours = peak(lambda: model(idx, idx, chunk_size=32))
    assert ours < naive

    gen_model = tiny_gpt().cuda()  # peaked logits: no near-ties for kernel-level rounding to flip
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    assert (gen_model.generate(prompts, 10, temperature=0)
            == [greedy_by_recompute(gen_model, p, 10) for p in prompts])
    mfu = model.estimate_mfu(1e5, peak_flops())
    assert mfu is None or 0 < mfu < 1


def test_mfu_helpers_never_invent_a_peak():
    model = tiny_gpt()
    assert model.estimate_mfu(1000, peak_flops("cpu")) is None
    assert peak_flops("cpu") is None
    assert (model.estimate_mfu(1000, 1e12)
            == pytest.approx(model.flops_per_token() * 1000 / 1e12))


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
    ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA B200", 2250e12), ("Some Future GPU", None)])
def test_the_peak_is_the_dense_bf16_figure_of_the_gpu_by_name(monkeypatch, name, peak):
    """Dense bf16 (the datasheets' sparse figures are twice these), the most specific name first;
    an unknown GPU has no peak rather than a guessed one."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops("cuda:0") == peak


QWEN25_05B = dict(model_type="qwen2", block_size=32768, vocab_size=151936, n_layer=24, n_head=14,
                  n_kv_head=2, n_embd=896, n_inner=4864, norm_eps=1e-6, rope_theta=1e6,
                  bias=False, tie_embeddings=True)


def counted_flops(model, idx, targets=None):
    """FLOPs torch.utils.flop_counter counts in one training forward+backward -> {op: FLOPs}."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        out = model(idx) if targets is None else model(idx, targets)
        out.float().sum().backward()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.slow  # ~10 s: the real shapes, traced op by op
@pytest.mark.parametrize("config", [{}, QWEN25_05B], ids=["gpt2-124M", "qwen2.5-0.5B"])
def test_flops_per_token_is_what_a_flop_counter_counts(config):
    """GPT-2 124M and Qwen2.5-0.5B at their real shapes (on the meta device: shapes, no data),
    through the real forward+backward of the log-probs: FlopCounterMode counts exactly
    flops_per_token (6N + 12·L·H·Q·T, the LM head included) per token, plus the LM head that the
    chunked log-probs recompute in backward, which MFU leaves out. Attention here is SDPA's math
    path: its matmuls are the bmm."""
    B, T = 2, 256
    with torch.device("meta"):
        model = GPT(GPTConfig(**config))
        idx = torch.zeros(B, T, dtype=torch.long)
    cfg = model.config
    recomputed_lm_head = 2 * cfg.n_embd * cfg.vocab_size  # one more forward matmul per token
    flops = counted_flops(model, idx, idx)
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T
    assert flops["aten.bmm"] == attention * B * T  # QKᵀ and AV, forward and backward
    assert sum(flops.values()) == (model.flops_per_token(T) + recomputed_lm_head) * B * T
    # the logits alone, nothing recomputed: exactly the formula
    assert sum(counted_flops(model, idx).values()) == model.flops_per_token(T) * B * T
    # N: the matrices, the tied (V, C) LM head once; GPT-2's position table is only looked up
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    lookups = 0 if cfg.llama else cfg.block_size * cfg.n_embd
    assert model.flops_per_token(T) == 6 * (matrices - lookups) + attention


def test_flash_attention_backward_recomputes_the_scores_and_mfu_leaves_them_out():
    """On real tensors (CPU: the fused flash-attention kernel, as on CUDA) the counter also counts
    the scores QKᵀ that flash attention recomputes in backward: 2·L·H·Q·T more per token."""
    from torch.utils.flop_counter import flop_registry
    if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
        pytest.skip("this torch's FlopCounterMode counts no CPU flash attention (2.15's does)")
    model = GPT(GPTConfig(block_size=64, vocab_size=101, n_layer=2, n_head=2, n_embd=32))
    cfg, (B, T) = model.config, (2, 64)
    idx = torch.randint(0, 101, (B, T))
    flops = counted_flops(model, idx)
    recomputed_scores = 2 * cfg.n_layer * cfg.n_head * cfg.head_size * T
    assert sum(flops.values()) == (model.flops_per_token(T) + recomputed_scores) * B * T
    assert any("flash_attention" in op for op in flops), flops


# -----------------------------------------------------------------------------
# 6. loading errors


def test_unknown_name_fails_before_touching_the_hub(monkeypatch):
    def no_network(*a, **kw):
        raise AssertionError("the hub was contacted")
    monkeypatch.setattr("huggingface_hub.snapshot_download", no_network)
    with pytest.raises(ValueError,
                       match=r"unknown model 'gpt3': expected one of gpt2, gpt2-medium"):
        load_gpt("gpt3")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_gpt(os.path.join("does", "not", "exist.pt"))


@pytest.mark.parametrize("name", ["gpt2-medium", "openai-community/gpt2", "Qwen/Qwen3-0.6B"])
def test_unreachable_hub_says_how_to_load_a_local_folder(monkeypatch, tmp_path, name):
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # real client, empty cache, offline
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConnectionError,
                       match=f"'{name}' is no local folder, and the Hugging Face hub cannot be "
                             f"reached.*pass its local folder instead"):
        load_gpt(name)


def test_folder_without_weights_or_config(tmp_path, hf_folders):
    _, st, _ = hf_folders
    shutil.copy(st / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError,
                       match="no model weights found; expected model.safetensors"):
        load_gpt(tmp_path)
    (tmp_path / "config.json").unlink()
    shutil.copy(st / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_gpt(tmp_path)


@pytest.mark.parametrize("key,value", [
    ("activation_function", "relu"), ("scale_attn_by_inverse_layer_idx", True), ("n_inner", 100),
    ("reorder_and_upcast_attn", True), ("add_cross_attention", True), ("layer_norm_epsilon", 1e-6),
    ("tie_word_embeddings", False), ("scale_attn_weights", False), ("model_type", "gpt_neo"),
])
def test_config_it_cannot_represent(tmp_path, hf_folders, key, value):
    _, st, _ = hf_folders
    shutil.copy(st / "model.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((st / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"config\.json: {key}=.* cannot be represented"):
        load_gpt(tmp_path)


def test_state_dict_key_and_shape_errors(tmp_path, hf_folders):
    _, _, hub = hf_folders
    shutil.copy(hub / "config.json", tmp_path / "config.json")
    sd = torch.load(hub / "pytorch_model.bin", weights_only=True)
    bad = dict(sd)
    del bad["h.1.mlp.c_fc.bias"]
    torch.save(bad, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError,
                       match=r"pytorch_model\.bin: missing key transformer\.h\.1\.mlp\.c_fc\.bias"):
        load_gpt(tmp_path)
    bad = dict(sd, **{"h.0.attn.q_attn.weight": torch.zeros(2)})
    torch.save(bad, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"unexpected key transformer\.h\.0\.attn\.q_attn\.weight"):
        load_gpt(tmp_path)
    bad = dict(sd, **{"wpe.weight": sd["wpe.weight"][:, :-1]})
    torch.save(bad, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"transformer\.wpe\.weight has shape"):
        load_gpt(tmp_path)
    with pytest.raises(ValueError, match="cannot override"):
        load_gpt(hub, n_layer=3)


def test_block_size_override_crops(hf_folders):
    hf, st, _ = hf_folders
    model = load_gpt(st, block_size=16).eval()
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape[0] == 16
    idx = torch.randint(0, hf.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert (model(idx) - hf_logits(hf, idx)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="exceeds the checkpoint"):
        load_gpt(st, block_size=4096)


# -----------------------------------------------------------------------------
# 7. sampling


def test_seeded_sampling_is_reproducible_and_filters_match_greedy():
    model = tiny_gpt(std=0.1)
    a = model.generate(PROMPTS, 10, temperature=1.0, seed=123)
    assert a == model.generate(PROMPTS, 10, temperature=1.0, seed=123)
    assert a != model.generate(PROMPTS, 10, temperature=1.0, seed=124)
    greedy = model.generate(PROMPTS, 10, temperature=0)
    assert a != greedy
    assert model.generate(PROMPTS, 10, top_k=1, seed=5) == greedy
    assert model.generate(PROMPTS, 10, top_p=1e-6, seed=5) == greedy


def test_top_k_and_top_p_sample_only_from_their_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)

    def support(**kw):
        uniform = torch.rand(len(logits), generator=g)
        return set(GPT._sample(logits, 1.0, kw.get("top_k"), kw.get("top_p"), uniform).tolist())
    assert support() == {0, 1, 2, 3}
    assert support(top_k=2) == {0, 1}
    assert support(top_p=0.75) == {0, 1}
    assert support(top_p=0.9) == {0, 1, 2}
    assert support(top_p=0.4) == {0}


def sampling_distribution(logits, temperature, top_k=None, top_p=None):
    """The distribution a sampler must draw from, written from the definitions one token at a time
    (the reference for the sampler's frequencies): softmax(logits / T) over the top_k largest
    logits (ties kept), then over the smallest set of the most probable that holds top_p."""
    z = [float(x) / temperature for x in logits]
    keep = set(range(len(z)))
    if top_k is not None:
        kth = sorted(z, reverse=True)[top_k - 1]
        keep = {i for i in keep if z[i] >= kth}
    if top_p is not None:
        total = sum(math.exp(z[i]) for i in keep)
        nucleus, mass = set(), 0.0
        for i in sorted(keep, key=lambda i: -z[i]):
            if mass >= top_p:  # the tokens above already hold top_p
                break
            nucleus.add(i)
            mass += math.exp(z[i]) / total
        keep = nucleus
    total = sum(math.exp(z[i]) for i in keep)
    return [math.exp(z[i]) / total if i in keep else 0.0 for i in range(len(z))]


def chi_square_p_value(tokens, probs):
    """Pearson's chi-square test of sampled token ids against the probabilities `probs`: the
    p-value (the chance of a worse fit if the sampler is right). Bins expected to hold fewer than
    5 draws are pooled; a draw where the probability is 0 fails at once."""
    n, counts = len(tokens), torch.bincount(torch.as_tensor(tokens), minlength=len(probs))
    assert all(counts[i] == 0 for i, p in enumerate(probs) if p == 0), "drew an excluded token"
    expected = torch.tensor(probs, dtype=torch.float64) * n
    big = expected >= 5
    observed = torch.cat([counts[big].double(), counts[~big & (expected > 0)].sum()[None].double()])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    observed, expected = observed[expected > 0], expected[expected > 0]
    stat = ((observed - expected) ** 2 / expected).sum()
    df = torch.tensor(len(expected) - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))  # the chi-square survival function


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, None, None), (0.5, None, None), (2.0, None, None), (1.0, 3, None), (1.0, None, 0.8),
    (0.7, 5, 0.9)])
def test_the_sampler_draws_from_the_tempered_filtered_softmax(temperature, top_k, top_p):
    """Inverse-CDF sampling (one uniform per row) against the definition, on 8 tokens: 20,000
    rows of the same logits, frequencies by a chi-square test."""
    logits = torch.tensor([1.5, -0.3, 0.8, 2.2, -1.7, 0.1, 0.9, -0.6])
    n = 20000
    uniform = torch.rand(n, generator=torch.Generator().manual_seed(7))
    tokens = GPT._sample(logits.repeat(n, 1), temperature, top_k, top_p, uniform)
    want = sampling_distribution(logits, temperature, top_k, top_p)
    assert chi_square_p_value(tokens, want) > 1e-3
    # the test can fail: the same draws against the softmax without temperature or filters
    if (temperature, top_k, top_p) != (1.0, None, None):
        assert chi_square_p_value(tokens, sampling_distribution(logits, 1.0)) < 1e-6


def test_generate_samples_from_the_models_own_distribution():
    """Through generate, prefill and all: one new token for 4,000 copies of a prompt (one uniform
    per row) follows softmax(logits / T) of that prompt's last position."""
    model = tiny_gpt(std=0.4)  # logits spread over a few units: 50 of the 61 tokens are drawn
    prompt, n, temperature = [3, 14, 15, 9], 4000, 0.8
    tokens = [row[0] for row in model.generate([prompt] * n, 1, temperature=temperature, seed=3)]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1]
    assert chi_square_p_value(tokens, sampling_distribution(logits, temperature)) > 1e-3
    # and it tells 0.8 from a temperature 25 % off
    assert chi_square_p_value(tokens, sampling_distribution(logits, 1.0)) < 1e-6


def llama_gpt(seed=0, std=0.2):
    """A tiny Qwen2-style GPT: rotary positions, grouped-query attention, q/k/v biases."""
    cfg = GPTConfig(model_type="qwen2", block_size=64, vocab_size=61, n_layer=2, n_head=4,
                    n_kv_head=2, n_embd=32, n_inner=48, bias=False)
    return randomize_(GPT(cfg), std, seed).eval()


@pytest.mark.parametrize("make", [tiny_gpt, llama_gpt], ids=["gpt2", "qwen2"])
def test_a_rows_samples_depend_on_the_seed_alone_and_the_static_cache_gives_the_same(make):
    """A row's draws are one uniform per (prompt, step) of the seeded generator: it samples the same
    tokens whether the other rows stop early (EOS) or not, and with the static cache (fixed
    batch, a 64-column cache written at tensor positions: what CUDA graphs replay)."""
    model = make(std=0.1)
    n = 12
    free = model.generate(PROMPTS, n, temperature=0.9, seed=11)
    # an EOS that some row emits early while another never does
    eos = next(t for row in free for t in row[:n - 2] if any(t not in other for other in free))
    stopped = model.generate(PROMPTS, n, temperature=0.9, seed=11, eos_token_id=eos)
    assert stopped == [row[:row.index(eos) + 1] if eos in row else row for row in free]
    assert any(len(r) < n for r in stopped) and any(len(r) == n for r in stopped)
    for kw in (dict(temperature=0.9, seed=11), dict(temperature=0.9, seed=11, eos_token_id=eos),
               dict(temperature=0), dict(temperature=0.7, top_k=5, top_p=0.9, seed=2)):
        assert model.generate(PROMPTS, n, static_cache=True, **kw) == model.generate(PROMPTS, n,
                                                                                     **kw), kw


def test_the_static_cache_has_a_few_lengths_and_writes_at_tensor_positions():
    """generate(static_cache=True)'s cache: block_size-capped multiples of 64 columns, a 0-d
    position tensor, update returning every column (the mask hides those not written)."""
    cache = KVCache(2, 64, static=True)
    k = torch.randn(3, 2, 5, 4)
    full_k, full_v = cache.update(0, k, -k)
    assert full_k.shape == (3, 2, 64, 4) and torch.equal(full_k[:, :, :5], k)
    assert torch.equal(full_v[:, :, :5], -k) and not full_k[:, :, 5:].any()
    cache.pos += 5
    cache.update(0, k[:, :, :1], k[:, :, :1])
    assert torch.equal(full_k[:, :, 5], k[:, :, 0]) and cache.pos.dim() == 0  # written in place
    seen = []
    model = tiny_gpt(block_size=100)

    class Recording(KVCache):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            seen.append(self.max_len)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_module, "KVCache", Recording)
        model.generate([[1] * 30], 20, static_cache=True)   # 50 -> 64 columns
        model.generate([[1] * 30], 40, static_cache=True)   # 70 -> 128, capped at 100
        model.generate([[1] * 30], 40)                      # the dynamic cache: exactly 70
    assert seen == [64, 100, 70]


def test_non_finite_logits_are_a_clear_error():
    model = tiny_gpt()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="logits are not finite"):
        model.generate(PROMPTS, 4, temperature=1.0, seed=0)
