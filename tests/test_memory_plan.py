"""
The memory plan (plan.py): the bytes its fake-tensor trace sees for parameters, gradients and
AdamW states equal counts made here by hand; the fake trace's peak equals the same step run on
real CPU tensors; `--plan true` prints the table and its plan_<mode>_peak_gib lines without
training; the presets of the paper's sizes fit the GPUs they name; and (CUDA only) the estimate
is within 15% of what a real GPU step allocates.
"""
import math
import re
from functools import partial

import pytest
import torch

from machinery import plan
import train
from machinery.checkpoint import load_gpt, save_checkpoint
from machinery.common import ConfigError
from machinery.config import resolve_loss
from machinery.lora import apply_lora
from model import GPT, GPTConfig
from conftest import free_port, ROOT, run_cli

SHAPES = ROOT / "presets" / "shapes"
GPT2 = GPTConfig(block_size=64, vocab_size=300, n_layer=3, n_head=2, n_embd=32)
QWEN = GPTConfig(model_type="qwen2", block_size=64, vocab_size=300, n_layer=3, n_head=4,
                 n_kv_head=2, n_embd=32, n_inner=40, bias=False)


def losses(cfg):
    return dict(sft=train.sft_loss, po=partial(train.preference_loss, objective=resolve_loss(cfg)))


def by_hand(config, mode, gpus):
    """(params, grads, AdamW) bytes on one GPU, counted from a real model: float32; FSDP pads
    each tensor's rows to a multiple of N and keeps 1/N; AdamW: 2 tensors + a step per tensor."""
    model = GPT(config)
    if mode == "lora":
        apply_lora(model, 4, 8)
    n = gpus if mode.startswith("fsdp") else 1
    shard = [(-(-p.size(0) // n)) * p[0].numel() * 4 for p in model.parameters()]
    trainable = [s for s, p in zip(shard, model.parameters()) if p.requires_grad]
    return sum(shard), sum(trainable), 2 * sum(trainable) + 4 * len(trainable)


@pytest.mark.parametrize("config", [GPT2, QWEN], ids=["gpt2", "qwen2"])
@pytest.mark.parametrize("mode", ["full", "full_checkpointed", "lora", "fsdp4"])
def test_traced_parameter_gradient_and_optimizer_bytes_are_the_exact_counts(config, mode):
    cfg = train.Config()
    for stage in ("sft", "po"):
        r = plan.trace(config, mode, stage, 4, 24, losses(cfg), gpus=4, lora=(4, "attn,mlp"))
        assert (r["params"], r["grads"], r["optimizer"]) == r["exact"] == by_hand(config, mode, 4)
        assert r["activations"] > 0 and r["peak"] >= sum(r["exact"])


@pytest.mark.slow
def test_checkpointing_sharding_and_lora_shrink_what_they_should():
    cfg = train.Config(loss="dpo")
    config = GPTConfig(block_size=128, vocab_size=300, n_layer=6, n_head=2, n_embd=64)
    full, ckpt, lora, fsdp = (plan.trace(config, m, "po", 8, 128, losses(cfg), gpus=4,
                                         lora=(4, "attn,mlp"))
                              for m in ("full", "full_checkpointed", "lora", "fsdp4"))
    assert ckpt["activations"] < 0.7 * full["activations"]  # only block inputs kept
    assert lora["grads"] + lora["optimizer"] < 0.1 * (full["grads"] + full["optimizer"])
    assert fsdp["params"] < 0.3 * full["params"] and fsdp["peak"] < ckpt["peak"]


def test_the_fake_trace_is_the_real_cpu_step():
    """The same step on real CPU tensors, followed by the same tracker: the same peak (the fake
    tensors change nothing in what is allocated when)."""
    cfg = train.Config()
    config = GPT2
    fake = plan.trace(config, "full_checkpointed", "po", 4, 24, losses(cfg))
    torch.manual_seed(0)
    model = GPT(config)
    model.activation_checkpointing = True
    optimizer = model.configure_optimizers(0.1, 1e-5, (0.9, 0.95), "cpu")
    tracker = plan.PeakTracker()
    tracker.track_external(model, optimizer)
    with tracker, torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = train.preference_loss(model.train(), plan.fake_batch(config, 4, 24),
                                        resolve_loss(cfg))
        loss.backward()
    real = tracker.bytes("peak")["Total"]
    # fake: the forward/backward peak plus the optimizer's states (allocated at the first step)
    assert fake["peak"] - fake["optimizer"] == pytest.approx(real, rel=0.02)


@pytest.mark.slow
def test_plan_prints_its_table_and_lines_and_does_no_work(tmp_path):
    out = tmp_path / "run"
    p = run_cli(["train.py", "--preset", "smoke", "--out_dir", out, "--plan", "true",
                 "--plan_gpus", "2", "--gpu_gib", "24"], timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| stage | mode | params | grads | AdamW | activations | peak | fits |" in p.stdout
    lines = dict(re.findall(r"^plan_(\w+)_peak_gib: ([\d.]+)$", p.stdout, re.M))
    assert list(lines) == ["full", "full_checkpointed", "lora", "fsdp2"]
    assert all(0 < float(v) < 1 for v in lines.values())
    assert not out.exists()  # no run folder: nothing was trained


@pytest.mark.slow
def test_the_plan_under_torchrun_is_printed_once(tmp_path):
    """Each process of a torchrun job printed its own copy of the table."""
    p = run_cli(["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                 f"--master_port={free_port()}", "train.py", "--preset", "smoke", "--out_dir",
                 tmp_path / "run", "--plan", "true", "--gpu_gib", "24"], timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("| stage | mode |") == 1 and p.stdout.count("plan_full_peak_gib") == 1


@pytest.mark.parametrize("layers", [2, 6])
def test_the_plan_counts_parameters_from_the_config_alone(layers, monkeypatch, capsys):
    """--plan true built the real model to count its parameters when it had <= 4 layers (5.1 GB
    for a Gemma-sized vocabulary) and gave no count above that: it counts on the meta device,
    at every size, and no model with real weights is ever built."""
    from torch._subclasses.fake_tensor import is_fake
    built = []

    def gpt(config):
        model = GPT(config)
        built.append(any(p.device.type != "meta" and not is_fake(p) for p in model.parameters()))
        return model
    monkeypatch.setattr(plan, "GPT", gpt)
    monkeypatch.setattr(plan, "run_stages", lambda cfg: [])  # (the traces: tested above)
    cfg = train.Config(n_layer=layers, n_embd=64, n_head=2)
    plan.print_plan(cfg, losses(cfg))
    n = sum(p.numel() for p in GPT(plan.model_config(cfg)).parameters())
    assert f"{layers} layers, n_embd 64, {n / 1e6:.1f}M parameters)" in capsys.readouterr().out
    assert built and not any(built)


@pytest.mark.parametrize("flag, value, said", [
    ("max_len", 50000, "exceeds the model's context of 32768 tokens"),
    ("max_new_tokens", 32768, "leaves no room for a prompt in the model's context of 32768")])
def test_the_plan_names_a_length_beyond_the_models_context(flag, value, said, monkeypatch):
    """A --max_len past a loaded model's context reached the trace ("sequence length 50000
    exceeds block_size 32768", naming no flag; on a GPU every run checks its plan first, so
    the run's own line never came), and a --max_new_tokens filling it was planned as if it
    fitted. The plan refuses both as the run does, before any trace."""
    def trace(*args, **kwargs):
        raise AssertionError("traced")
    monkeypatch.setattr(plan, "trace", trace)
    cfg = train.Config(init_from=str(SHAPES / "qwen25_05b"), gpu_gib=80, **{flag: value})
    for check in (plan.print_plan, plan.check_fits):
        with pytest.raises(ConfigError, match=rf"^--{flag} {value} {said}"):
            check(cfg, losses(cfg))


def test_a_checkpoint_of_another_model_version_is_named_by_the_plan_as_by_the_run(tmp_path):
    """A checkpoint whose config has a field this model.py does not know: loading it named the
    file, but --plan true raised TypeError from GPTConfig (a stack trace). Both name it now."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, GPT(GPT2), tokenizer="byte")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["attn_logit_cap"] = 30.0  # a field of some other version
    torch.save(ckpt, path)
    said = rf"^{re.escape(str(path))}: checkpoint config has fields GPTConfig does not know"
    with pytest.raises(ValueError, match=said):
        plan.model_config(train.Config(init_from=str(path), block_size=64, max_len=64,
                                              max_new_tokens=16))
    with pytest.raises(ValueError, match=said):
        load_gpt(path)


@pytest.mark.slow
@pytest.mark.parametrize("preset, shape, mode", [("llama3_8b_lora", "llama3_8b", "lora"),
                                                 ("qwen3_8b_fsdp8", "qwen3_8b", "fsdp8")])
def test_the_presets_of_the_papers_sizes_fit_their_gpus(preset, shape, mode):
    """Each preset as a run would start it (its hub model replaced by that model's config.json,
    which is all a plan reads): valid, and every stage's plan fits an 80 GB GPU with 10% spare."""
    cfg = train.parse(train.Config, ["--preset", preset, "--init_from", str(SHAPES / shape),
                                     "--gpu_gib", "80"], presets=True)
    train.validate(cfg)
    plan_, _ = train.variants(cfg)
    assert plan.run_mode(cfg, cfg.plan_gpus) == mode and plan_
    config = plan.model_config(cfg)
    assert 8.0e9 < sum(p.numel() for p in _fake(config).parameters()) < 8.3e9
    for stage in plan.run_stages(cfg):
        r = plan.stage_plan(cfg, config, mode, stage, losses(cfg))
        assert r["peak"] / plan.GiB <= plan.HEADROOM * 80, (stage, r["peak"] / plan.GiB)
        if stage in ("sft", "po"):
            assert (r["params"], r["grads"], r["optimizer"]) == r["exact"]


def _fake(config):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        return GPT(config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_plan_is_within_15_percent_of_a_real_gpu_step():
    """Qwen2.5-0.5B's shape, the preference step of its preset's micro-batch (8 pairs x 512
    tokens), bf16 autocast, activation checkpointing, fused AdamW, two steps: the allocator's
    peak against the plan's (which leaves out the CUDA context and workspaces: they are not
    allocations)."""
    cfg = train.Config(loss="adpo", family="adaptive", size=256, beta=0.1)
    config = GPTConfig(**plan.config_kwargs(SHAPES / "qwen25_05b"))
    estimate = plan.trace(config, "full_checkpointed", "po", 16, 512, losses(cfg))["peak"]
    model = GPT(config).cuda()
    model.activation_checkpointing = True
    optimizer = model.configure_optimizers(0.1, 1e-6, (0.9, 0.95), "cuda")
    batch = {k: v.cuda() if torch.is_tensor(v) else v
             for k, v in plan.fake_batch(config, 16, 512).items()}
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = train.preference_loss(model.train(), batch, resolve_loss(cfg))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    real = torch.cuda.max_memory_allocated()
    print(f"\nplan {estimate / plan.GiB:.2f} GiB, real {real / plan.GiB:.2f} GiB")
    assert math.isclose(estimate, real, rel_tol=0.15)
