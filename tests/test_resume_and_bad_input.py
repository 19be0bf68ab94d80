"""
Reliability of train.py / eval.py: exact resume after a kill anywhere, determinism, numerics
(non-finite losses and gradients, fp16 loss scaling, float32 sums), a catalogue of bad inputs that
must fail fast with one-line errors, and data-parallel training (2 CPU processes over gloo)
against one process.

Every run here is tiny (a 1-layer GPT, 120 SFT steps, a few pairs) and uses one thread per process:
on a small shared CPU, tiny ops are much faster that way, and a run in this process and a run in a
subprocess then compute bit for bit the same numbers, so they can be compared with ==.
"""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import data
from machinery import report
import train
from machinery.common import read_jsonl
from machinery.checkpoint import save_checkpoint
from machinery.hf import save_pretrained
from model import GPT, GPTConfig
from conftest import (check_one_line_error, cli_env, die_at, Died, free_port, ROOT,
                      run_cli, tiny, UNTIMED, visible_lines)

pytestmark = pytest.mark.slow  # end to end: whole pipelines and processes

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread (see the module docstring), and no training-curve plot (matplotlib is slow and
    plots nothing these tests check) for the runs made in this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "plot_curves", lambda *a, **k: None)
        yield
    torch.set_num_threads(threads)


def snapshot(out):
    """Everything a run's results consist of, as JSON text (exact floats; NaN == NaN),
    wall-clock fields left out."""
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    snap = {"summary": {k: summary[k] for k in ("sft", "pairs", "po")},
            "config": {k: v for k, v in summary["config"].items() if k != "out_dir"}}
    for stage in ("sft", "po"):
        snap[f"{stage}/metrics.jsonl"] = [{k: v for k, v in r.items() if k not in UNTIMED}
                                          for r in read_jsonl(out / stage / "metrics.jsonl")]
        snap[f"{stage}/eval.json"] = json.loads((out / stage / "eval.json").read_text())
    for f in sorted(os.listdir(out / "pairs")):
        if f.endswith(".jsonl"):
            snap[f"pairs/{f}"] = read_jsonl(out / "pairs" / f)
    snap["pairs/stats.json"] = json.loads((out / "pairs" / "stats.json").read_text())
    return {k: json.dumps(v, sort_keys=True) for k, v in snap.items()}


def assert_same_run(a, b):
    """Run folders a and b hold bit-identical results:
    files, metrics, weights, cached reference log-probs."""
    sa, sb = snapshot(a), snapshot(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k] == sb[k], f"{k} differs"
    for stage in ("sft", "po"):
        wa, wb = (torch.load(Path(d) / stage / "ckpt.pt", weights_only=True)["model"]
                  for d in (a, b))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{stage} weights differ"
        assert not (Path(b) / stage / "state.pt").exists(), f"{stage}/state.pt left behind"
    ra, rb = (torch.load(Path(d) / "po" / "reference_logps.pt", weights_only=True) for d in (a, b))
    for split in ("train", "val"):
        assert len(ra[split]) == len(rb[split])
        assert all(torch.equal(x, y) for p, q in zip(ra[split], rb[split]) for x, y in zip(p, q))


# a tiny SFT model of 120 steps (not conftest's 12) finishes some of its answers with an EOS:
# on-policy pairs need that, as a sample cut at --max_new_tokens is neither chosen nor rejected
SAMPLED = dict(sft_steps=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (in this process), the yardstick of the resume tests."""
    out = tmp_path_factory.mktemp("reference")
    train.main(tiny(out, **SAMPLED))
    # with fewer PO steps, the PO kill points would be moot
    assert po_steps(out) >= 3, "the tiny run should sample a few pairs"
    return out


def po_steps(out):
    """The PO stage's step count: it depends on how many pairs the SFT model's samples gave."""
    return read_jsonl(Path(out) / "po" / "metrics.jsonl")[-1]["step"]


# -----------------------------------------------------------------------------
# determinism and exact resume


def test_the_same_command_twice_gives_identical_results(reference, tmp_path):
    train.main(tiny(tmp_path, **SAMPLED))
    assert_same_run(reference, tmp_path)


# each chain kills one run folder at these points in turn (every re-run resumes, then dies at the
# next point), then runs it to the end. SFT checkpoints at 2, 4, ..., 118 (never at its last
# step, 120); PO (po:last is its last step) every 2 steps. sft:3 dies one step after a
# checkpoint, sft:120 at the very end before ckpt.pt; po:1 before any PO checkpoint; the pairs:
# points after a chunk of samples (0, 4, 8, 12) or the pair files.
CHAINS = {
    "A": ["sft:3", "sft:7", "sft:done", "pairs:4", "po:ref", "po:3"],
    "B": ["sft:1", "sft:6", "sft:120", "pairs:0", "pairs:12", "pairs:written", "po:1", "po:last",
          "po:done"],
}


@pytest.mark.parametrize("chain", CHAINS)
def test_resume_after_dying_anywhere_is_bit_identical(reference, tmp_path, chain):
    for point in [p.replace("last", str(po_steps(reference))) for p in CHAINS[chain]]:
        with pytest.MonkeyPatch.context() as mp, pytest.raises(Died):  # proves it got to `point`
            die_at(mp, point)
            train.main(tiny(tmp_path, **SAMPLED))
    train.main(tiny(tmp_path, **SAMPLED))
    assert_same_run(reference, tmp_path)


KILLER = """
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
from machinery import checkpoint

save = checkpoint.save_checkpoint


def save_then_die(path, *args, **kwargs):  # SIGKILL right after PO's first training state
    save(path, *args, **kwargs)
    if str(path).endswith(os.path.join("po", "state.pt")):
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint.save_checkpoint = save_then_die  # before train.py runs `from checkpoint import ...`
sys.argv = [os.path.join({root!r}, "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_mid_po_then_the_same_command_resumes_exactly(reference, tmp_path):
    """A real SIGKILL of the command-line process mid-PO (the kill sent from a test-side patch,
    right after the first PO training state is saved); the same command resumes it exactly."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=str(ROOT)))
    out = tmp_path / "run"
    p = run_cli([script, *tiny(out, **SAMPLED)])
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (out / "po" / "state.pt").exists() and not (out / "po" / "ckpt.pt").exists()
    p = run_cli(["train.py", *tiny(out, **SAMPLED)])
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"[po] resuming at step 2/{po_steps(reference)}" in p.stdout
    assert_same_run(reference, out)


def test_sigkill_at_a_random_moment_then_resume_is_exact(reference, tmp_path):
    """A real SIGKILL at a random moment of training
    (logged, so a failure can be replayed by hand)."""
    delay = random.Random().uniform(0.0, 2.5)
    proc = subprocess.Popen([sys.executable, "train.py", *tiny(tmp_path, **SAMPLED)], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while (not (tmp_path / "sft" / "metrics.jsonl").exists() and proc.poll() is None
               and time.time() < deadline):
            time.sleep(0.02)  # wait for training to start (imports take most of the first seconds)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        code = proc.wait(timeout=60)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*') if p.is_file())
    print(f"SIGKILL {delay:.2f} s after SFT started; exit status {code}; left: {left}")
    train.main(tiny(tmp_path, **SAMPLED))  # the same command (the CLI resume is tested above)
    assert_same_run(reference, tmp_path)


def test_sigterm_then_the_same_command_resumes_exactly(reference, tmp_path):
    """A real SIGTERM (what `kill PID`, a job scheduler or torchrun sends) once the first SFT
    training state is on disk: the process ends at once, and the same command resumes exactly."""
    proc = subprocess.Popen([sys.executable, "train.py", *tiny(tmp_path, **SAMPLED)], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "sft" / "state.pt").exists() and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # by its own pid
    finally:
        code = proc.wait(timeout=60)
    assert code == -signal.SIGTERM
    train.main(tiny(tmp_path, **SAMPLED))
    assert_same_run(reference, tmp_path)


def test_a_torn_metrics_line_is_dropped_on_resume(reference, tmp_path):
    """A kill while appending to metrics.jsonl leaves half a line;
    the resumed run must not choke."""
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Died):
        die_at(mp, "sft:7")
        train.main(tiny(tmp_path, **SAMPLED))
    with open(tmp_path / "sft" / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 2.')
    train.main(tiny(tmp_path, **SAMPLED))
    assert_same_run(reference, tmp_path)


# -----------------------------------------------------------------------------
# numerics

NAN_INJECTOR = """
import os, runpy, sys
import torch
sys.path.insert(0, {root!r})
import model

mode, at = sys.argv[1], int(sys.argv[2])
forward, calls = model.GPT.forward, [0]


# identity forward, NaN backward: a finite loss with a broken gradient
class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def broken(self, idx, targets=None, chunk_size=None):
    out = forward(self, idx, targets, chunk_size)
    if targets is not None and torch.is_grad_enabled():  # training forwards (one per step here)
        calls[0] += 1
        if calls[0] == at:
            out = out * float("nan") if mode == "loss" else NanGrad.apply(out)
    return out


model.GPT.forward = broken
sys.argv = [os.path.join({root!r}, "train.py")] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


LR = "the learning rate is probably too high (lower --sft_lr"
FIRST = "before any update, so no learning rate is to blame: the starting model overflows"


@pytest.mark.parametrize("mode, at, message, cause, kept", [
    ("loss", 5, "non-finite loss (nan) at step 5/12", LR,
     "the last good training state (step 4) is kept in {state}"),
    ("grad", 1, "non-finite gradient norm (nan) with a finite loss at step 1/12", FIRST,
     "no training state was saved yet (one is saved every --ckpt_every 2 steps)"),
], ids=["loss", "grad"])
def test_non_finite_numbers_stop_the_run_with_one_line_and_keep_the_last_good_state(
        tmp_path, mode, at, message, cause, kept):
    """The numbers of step 1 come from the starting weights: no learning rate is blamed there."""
    script = tmp_path / "inject.py"
    script.write_text(NAN_INJECTOR.format(root=str(ROOT)))
    out, state = tmp_path / "run", tmp_path / "run" / "sft" / "state.pt"
    p = run_cli([script, mode, at, *tiny(out, dropout=0.0)])  # SFT step `at` turns NaN
    assert p.returncode == 1
    lines = visible_lines(p.stderr)
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"error: [sft] {message}: {cause}"), lines
    assert kept.format(state=state) in lines[0], lines
    assert not (out / "sft" / "ckpt.pt").exists()
    # the last good state is intact: it resumes
    # (the NaN came from the injector, not from the weights)
    if at > 2:
        saved = torch.load(state, weights_only=True)
        assert saved["step"] == 4 and all(torch.isfinite(v).all() for v in saved["model"].values())
    else:
        assert not state.exists()


def test_fp16_scales_the_loss_and_losses_are_float32_sums(tmp_path, monkeypatch):
    """fp16 autocast trains through a GradScaler; bf16 and fp16 alike hand it a float32 loss
    (log-probs are float32)."""
    seen = []

    class Recording(torch.amp.GradScaler):
        def scale(self, outputs):
            seen.append((self.is_enabled(), outputs.dtype, bool(torch.isfinite(outputs))))
            return super().scale(outputs)

    monkeypatch.setattr(torch.amp, "GradScaler", Recording)
    for dtype, scaled in (("float16", True), ("bfloat16", False)):
        seen.clear()
        summary = train.main(tiny(tmp_path / dtype, dtype=dtype, sft_steps=4, n_test=2,
                                  stop_after="sft"))
        assert len(seen) == 4 and all(s == (scaled, torch.float32, True) for s in seen), seen
        assert summary["dtype"] == dtype and math.isfinite(summary["sft"]["train"]["loss"])


def test_bf16_autocast_on_cpu_every_stage_finite_resumable_float32_sums(tmp_path, monkeypatch):
    """--dtype bfloat16 on the CPU (CPU autocast): every stage runs with bf16 matmuls, hands
    float32 log-probs and float32 loss sums to the optimizer, writes finite numbers, and a run
    killed in SFT, in the pairs stage and in PO resumes bit for bit to the uninterrupted run."""
    seen = []

    def recording(loss_fn):
        def wrapped(model, batch, *args, **kwargs):
            if batch["input_ids"] is None:  # train.check_loss_at_start: no model, no step
                return loss_fn(model, batch, *args, **kwargs)
            logps = model(batch["input_ids"], batch["targets"])  # what the loss is built on
            loss, metrics = loss_fn(model, batch, *args, **kwargs)
            seen.append((logps.dtype, loss.dtype, torch.is_autocast_enabled("cpu"),
                         bool(torch.isfinite(loss))))
            return loss, metrics
        return wrapped
    monkeypatch.setattr(train, "sft_loss", recording(train.sft_loss))
    monkeypatch.setattr(train, "preference_loss", recording(train.preference_loss))
    flags = dict(dtype="bfloat16", dropout=0.0, **SAMPLED)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    summary = train.main(tiny(whole, **flags))
    assert summary["dtype"] == "bfloat16" and {"sft", "pairs", "po"} <= summary.keys()
    assert seen and set(seen) == {(torch.float32, torch.float32, True, True)}, set(seen)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the matmuls really are bf16
        model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
        assert model(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.bfloat16
    for stage in ("sft", "po"):
        for record in read_jsonl(whole / stage / "metrics.jsonl"):
            assert all(math.isfinite(v) for k, v in record.items()
                       if isinstance(v, float) and k not in UNTIMED), record
    reference = torch.load(whole / "po" / "reference_logps.pt", weights_only=True)
    assert {t.dtype for pair in reference["train"] for t in pair} == {torch.float32}
    for point in ("sft:5", "pairs:4", "po:3"):
        with pytest.MonkeyPatch.context() as mp, pytest.raises(Died):
            die_at(mp, point)
            train.main(tiny(resumed, **flags))
    train.main(tiny(resumed, **flags))
    assert_same_run(whole, resumed)


def test_fp16_overflow_at_every_loss_scale_stops_the_run(tmp_path, monkeypatch):
    """Under fp16 an inf gradient only makes GradScaler skip the step and halve its scale; when
    even a scale below 1 overflows, the gradients are broken, not the scale: the run stops (here
    from a scale of 4: after 3 skips)."""
    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    class SmallScale(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, init_scale=4.0, **kwargs)

    forward = GPT.forward

    def overflowing(self, idx, targets=None, chunk_size=None):
        out = forward(self, idx, targets, chunk_size)
        return InfGrad.apply(out) if targets is not None and torch.is_grad_enabled() else out

    monkeypatch.setattr(torch.amp, "GradScaler", SmallScale)
    monkeypatch.setattr(GPT, "forward", overflowing)
    with pytest.raises(FloatingPointError,
                       match=r"^\[sft\] fp16 gradients overflow at every loss scale .* "
                             r"at step 3/12: use --dtype bfloat16 or float32, or lower --sft_lr; "
                             r"the last good"):
        train.main(tiny(tmp_path, dtype="float16", dropout=0.0))


# -----------------------------------------------------------------------------
# bad inputs: each fails fast (before any training)
# with one line on stderr naming the problem and the fix


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bad (and a few good) files the catalogue points at."""
    d = tmp_path_factory.mktemp("inputs")

    def jsonl(name, rows):
        (d / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                      for r in rows))

    jsonl("no_answer_column.jsonl", [{"question": "1+1?"}])
    jsonl("no_final_answer.jsonl", [{"question": "1+1?", "answer": "It is 2."}])
    (d / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9?", "answer": "#### 1"}\n')
    (d / "empty.jsonl").write_text("")
    (d / "task.txt").write_text("question,answer\n")
    jsonl("pairs_int_field.jsonl", [{"prompt": "Q", "chosen": 5, "rejected": "b"}])
    jsonl("pairs_corrupt_line.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"},
                                       '{"prompt": "Q", "chosen": oops',
                                       {"prompt": "Q", "chosen": "a", "rejected": "c"}])
    jsonl("pairs_no_rejected.jsonl", [{"prompt": "Q", "chosen": "a"}])
    (d / "preset_bad.json").write_text('{"beta": 0.1,}')
    (d / "preset_list.json").write_text('["beta", 0.1]')
    (d / "preset_unknown_key.json").write_text('{"betta": 0.1}')
    (d / "preset_bool_layers.json").write_text('{"n_layer": true}')
    (d / "preset_string_beta.json").write_text('{"beta": "0.5"}')
    (d / "preset_float_steps.json").write_text('{"sft_steps": 2.5}')
    torch.manual_seed(0)
    ok = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(d / "ok.pt", ok, tokenizer="byte")
    save_checkpoint(d / "vocab100.pt",
                    GPT(GPTConfig(block_size=64, vocab_size=100, n_layer=1, n_head=2, n_embd=16)))
    blob = (d / "ok.pt").read_bytes()
    (d / "truncated.pt").write_bytes(blob[:len(blob) // 2])
    torch.save({"weights": torch.zeros(3)}, d / "foreign.pt")
    (d / "hf_no_weights").mkdir()
    (d / "hf_no_weights" / "config.json").write_text(
        json.dumps(dict(vocab_size=257, n_positions=64, n_layer=1, n_head=2, n_embd=16)))
    (d / "empty_folder").mkdir()
    (d / "a_file").write_text("not a folder")
    (d / "bad_run").mkdir()
    (d / "bad_run" / "config.json").write_text("{not json")
    # issue 12's cases
    jsonl("pairs_Prompt.jsonl", [{"Prompt": "Q", "chosen": "a", "rejected": "b"}])
    jsonl("task_Question.jsonl", [{"Question": "1+1?", "answer": "#### 2"}])
    jsonl("pairs_identical.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "a"}])
    jsonl("pairs_trailing.json", [{"prompt": "Q", "chosen": "a", "rejected": "b"},
                                  '{"prompt": "Q", "chosen": "a", "rejected": "c"} x'])
    (d / "orphan_run").mkdir()  # stage folders whose config.json was deleted
    (d / "orphan_run" / "sft").mkdir()
    for name in ("hf_truncated", "hf_bin_truncated", "hf_no_weight_map", "hf_bad_config"):
        save_pretrained(ok, d / name, tokenizer="none")
    st = (d / "hf_truncated" / "model.safetensors").read_bytes()
    (d / "hf_truncated" / "model.safetensors").write_bytes(st[:len(st) // 2])
    os.remove(d / "hf_bin_truncated" / "model.safetensors")
    torch.save({"transformer.wte.weight": torch.zeros(257, 16)}, d / "pt.bin")
    (d / "hf_bin_truncated" / "pytorch_model.bin").write_bytes((d / "pt.bin").read_bytes()[:100])
    os.remove(d / "hf_no_weight_map" / "model.safetensors")
    (d / "hf_no_weight_map" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    (d / "hf_bad_config" / "config.json").write_text('{"n_layer": 1,')
    # issue 23's cases: config.json values as what they are, tokenizer files never defaulted,
    # a Python-level bug in a chat template, a JSON array for a line, an empty training split
    qwen = GPT(GPTConfig(model_type="qwen2", block_size=64, vocab_size=50304, n_layer=1, n_head=2,
                         n_embd=16, n_inner=24, bias=False))
    save_pretrained(qwen, d / "qwen_no_tokenizer", tokenizer="none")  # as large as GPT-2's
    for name, key, value in (("hf_zero_heads", "num_attention_heads", 0),
                             ("hf_bool_layers", "num_hidden_layers", True)):
        save_pretrained(qwen, d / name, tokenizer="none")
        config = json.loads((d / name / "config.json").read_text())
        (d / name / "config.json").write_text(json.dumps({**config, key: value}))
    from tiny_hf import train_tokenizer
    vocab = len(train_tokenizer("qwen2.5", d / "tokenizer", vocab_size=300))
    save_pretrained(GPT(GPTConfig(model_type="qwen2", block_size=64, vocab_size=vocab, n_layer=1,
                                  n_head=2, n_embd=16, n_inner=24, bias=False)),
                    d / "hf_bad_template", tokenizer=str(d / "tokenizer"))
    (d / "hf_bad_template" / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] / 2 }}{% endfor %}")  # str / int: a TypeError
    jsonl("pairs_array_line.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"},
                                     '["Q", "a", "c"]'])
    tested = [q for q in (f"What is {i} + 1?" for i in range(200)) if data._is_test_question(q)]
    jsonl("only_test.jsonl", [{"question": q, "answer": "#### 1"} for q in tested[:3]])
    return d


T, E = "train.py", "eval.py"
# (id, script, arguments ({d}: the folder of bad files; train.py also gets a fresh --out_dir),
#  what stderr must say)
CATALOGUE = [
    # the command line
    ("wrong-type", T, ["--n_layer", "2.5"], "--n_layer expects int, got '2.5'"),
    ("empty-value", T, ["--beta="], "--beta expects float, got ''"),
    ("empty-string", T, ["--task", ""], "--task is empty (expected e.g. 'arith')"),
    ("negative-beta", T, ["--beta", "-0.5"], "--beta must be > 0, got -0.5"),
    ("infinite-lr", T, ["--po_lr", "inf"], "--po_lr must be a finite number, got inf"),
    ("m-below-1", T, ["--family", "adaptive", "--size", "0"],
     "--size (k or m) must be >= 1, got 0"),
    ("negative-seed", T, ["--seed", "-1"], "--seed must be >= 0, got -1"),
    ("positional", T, ["oops"], "unexpected argument 'oops': flags are --key value"),
    ("unknown-flag", T, ["--bogus", "1"], "unknown flag --bogus"),
    ("typo-flag", T, ["--po-lr", "1e-4"], "unknown flag --po-lr (expected one of the fields of "
                                          "Config): did you mean --po_lr"),
    ("eval-typo-flag", E, ["--ckpt", "x", "--n-test", "5"], "did you mean --n_test?"),
    ("no-value", T, ["--beta"], "--beta needs a value"),
    ("not-a-float", T, ["--beta", "abc"], "--beta expects float, got 'abc'"),
    ("not-a-bool", T, ["--compile", "maybe"], "--compile expects bool, got 'maybe'"),
    ("unknown-loss", T, ["--loss", "nope"], "--loss 'nope': expected one of"),
    ("unknown-family", T, ["--family", "dynamic"], "--family must be static or adaptive"),
    ("no-such-preset", T, ["--preset", "no_such_preset"],
     "--preset no_such_preset: no such preset file"),
    ("grad-accum", T, ["--grad_accum", "3", "--sft_batch_size", "8", "--po_batch_size", "4"],
     "--grad_accum (3) must divide --sft_batch_size (8), --po_batch_size (4) and "
     "--cdpo_batch_size (32)"),
    ("max-len-over-context", T, ["--max_len", "512", "--block_size", "128"],
     "--max_len 512 exceeds the model's context (--block_size 128)"),
    ("prompt-cannot-fit", T, ["--max_new_tokens", "128", "--block_size", "128", "--max_len", "128"],
     "--max_new_tokens 128 leaves no room for a prompt in the model's context "
     "(expected < --block_size 128)"),
    ("bad-device", T, ["--device", "tpu"],
     "--device 'tpu': expected auto, cpu, cuda, cuda:N or mps"),
    ("compare-bad-variant", T, ["--compare", "dpo,adpo:diagonal:4"],
     "--compare: bad variant 'adpo:diagonal:4': "
     "--family must be static or adaptive, got 'diagonal'"),
    ("compare-unknown-loss", T, ["--compare", "dpo,kto"],
     "--compare: bad variant 'kto': --loss 'kto': expected one of dpo, adpo, ipo"),
    ("compare-bad-setting", T, ["--compare", "dpo,robust@n_test=5"],
     "--compare: bad variant 'robust@n_test=5': expected @KEY=VALUE with KEY one of beta"),
    ("loss-unknown-term", T, ["--loss", "dpo+kto"],
     "--loss 'dpo+kto': expected one of dpo, adpo"),
    ("loss-no-granularity", T, ["--loss", "bco_pair:static:4"],
     "--loss 'bco_pair:static:4': bco_pair has no granularity (its shift δ is a running mean"),
    ("loss-weights-count", T, ["--loss", "dpo+sft", "--loss_weights", "0.5"],
     "--loss_weights '0.5': 1 weights for the 2 terms of --loss 'dpo+sft' (expected one each)"),
    ("loss-inline-weight", T, ["--loss", "dpo+0.5sft"],
     "--loss 'dpo+0.5sft': give the weights with --loss_weights"),
    ("exo-needs-epsilon", T, ["--loss", "exo_pair"],
     "--loss exo_pair needs --label_smoothing > 0"),
    ("compare-bad-seed", T, ["--compare", "dpo", "--seeds", "0,one"],
     "--seeds expects int, got 'one'"),
    ("compare-seed-twice", T, ["--compare", "dpo,ipo", "--seeds", "0,1,0"],
     "--seeds '0,1,0': seed 0 named twice"),
    ("offline-pairs-need-arith", T,
     ["--pairs_source", "offline", "--task", "{d}/no_final_answer.jsonl"],
     "--pairs_source offline needs --task arith"),
    ("preset-invalid-json", T, ["--preset", "{d}/preset_bad.json"],
     "preset_bad.json: not valid JSON"),
    ("preset-not-an-object", T, ["--preset", "{d}/preset_list.json"],
     "expected a JSON object of Config fields, got list"),
    ("preset-unknown-key", T, ["--preset", "{d}/preset_unknown_key.json"], "unknown key 'betta'"),
    ("preset-bool-is-no-int", T, ["--preset", "{d}/preset_bool_layers.json"],
     "--n_layer expects int, got True"),
    ("preset-string-is-no-float", T, ["--preset", "{d}/preset_string_beta.json"],
     "--beta expects float, got '0.5'"),
    ("preset-fraction-is-no-int", T, ["--preset", "{d}/preset_float_steps.json"],
     "--sft_steps expects int, got 2.5"),
    ("out-dir-is-a-file", T, ["--out_dir", "{d}/a_file"],
     "a_file is a file (expected a run folder"),
    ("corrupt-run-config", T, ["--out_dir", "{d}/bad_run"],
     "bad_run/config.json: not a readable run config"),
    # data files
    ("task-file-missing", T, ["--task", "{d}/nope.jsonl"], "nope.jsonl: no such file"),
    ("task-missing-column", T, ["--task", "{d}/no_answer_column.jsonl"],
     "missing column(s) 'answer' (found: 'question')"),
    ("task-no-final-answer", T, ["--task", "{d}/no_final_answer.jsonl"],
     "row 0: field 'answer' has no '#### <number>' final answer line"),
    ("task-not-utf8", T, ["--task", "{d}/latin1.jsonl"],
     "latin1.jsonl: not valid UTF-8 (bad byte near offset 17)"),
    ("task-empty-file", T, ["--task", "{d}/empty.jsonl"], "empty.jsonl: file is empty"),
    ("task-unknown-type", T, ["--task", "{d}/task.txt"], "unsupported file type '.txt'"),
    ("pairs-non-string", T, ["--pairs_source", "{d}/pairs_int_field.jsonl"],
     "pairs_int_field.jsonl row 0: field 'chosen' is an int (expected a non-empty string)"),
    ("pairs-corrupt-line", T, ["--pairs_source", "{d}/pairs_corrupt_line.jsonl"],
     "pairs_corrupt_line.jsonl: could not read it as jsonl "
     "(line 2: invalid JSON, Expecting value;"),
    ("pairs-missing-column", T, ["--pairs_source", "{d}/pairs_no_rejected.jsonl"],
     "missing column(s) 'rejected'"),
    # checkpoints and model names
    ("truncated-checkpoint", T, ["--init_from", "{d}/truncated.pt"],
     "truncated.pt: not a readable checkpoint"),
    ("foreign-checkpoint", T, ["--init_from", "{d}/foreign.pt"],
     "foreign.pt: not a nanoADPO checkpoint"),
    ("folder-without-weights", T, ["--init_from", "{d}/hf_no_weights", "--tokenizer", "byte"],
     "hf_no_weights: no model weights found"),
    ("empty-folder", T, ["--init_from", "{d}/empty_folder", "--tokenizer", "byte"],
     "empty_folder: no model weights found; "
     "expected model.safetensors or pytorch_model.bin (or our ckpt.pt)"),
    ("unknown-model-name", T, ["--init_from", "gpt5", "--tokenizer", "byte"],
     "unknown model 'gpt5': expected one of gpt2"),
    ("vocab-mismatch", T, ["--init_from", "{d}/vocab100.pt", "--tokenizer", "byte"],
     "tokenizer 'byte' has 257 tokens but the model from "),
    ("vocab-mismatch-names-the-file", T, ["--init_from", "{d}/vocab100.pt", "--tokenizer", "byte"],
     "vocab100.pt has a vocabulary of 100: pass the tokenizer the model was trained with"),
    ("loaded-context-too-short", T, ["--init_from", "{d}/ok.pt", "--max_len", "128"],
     "--max_len 128 exceeds the model's context of 64 tokens"),
    # LoRA, FSDP, the memory plan
    ("lora-negative-rank", T, ["--lora_rank", "-1"], "--lora_rank must be >= 0, got -1"),
    ("lora-unknown-target", T, ["--lora_rank", "4", "--lora_targets", "q_proj"],
     "--lora_targets: 'q_proj' is not a projection of this gpt2 model (expected attn, mlp or "
     "some of c_attn, attn.c_proj, c_fc, mlp.c_proj)"),
    ("fsdp-without-torchrun", T, ["--fsdp", "true"],
     "--fsdp true shards over torchrun's processes in bf16 or float32"),
    ("plan-does-not-fit", T, ["--gpu_gib", "0.0001"],
     "GiB per GPU in mode full, more than 90% of the GPU's 0.0001 GiB: lower --sft_batch_size"),
    # eval.py
    ("eval-no-ckpt", E, [],
     "--ckpt is required (our ckpt.pt, a GPT-2 name or a Hugging Face folder)"),
    ("eval-wrong-type", E, ["--ckpt", "{d}/ok.pt", "--n_test", "many"],
     "--n_test expects int, got 'many'"),
    ("eval-truncated-checkpoint", E, ["--ckpt", "{d}/truncated.pt"],
     "truncated.pt: not a readable checkpoint"),
    ("eval-beta", E, ["--ckpt", "{d}/ok.pt", "--beta", "0"], "--beta must be > 0, got 0.0"),
    ("eval-corrupt-pairs", E, ["--ckpt", "{d}/ok.pt", "--pairs", "{d}/pairs_corrupt_line.jsonl"],
     "pairs_corrupt_line.jsonl: could not read it as jsonl "
     "(line 2: invalid JSON, Expecting value;"),
    ("eval-pairs-non-string", E,
     ["--ckpt", "{d}/ok.pt", "--task", "none", "--pairs", "{d}/pairs_int_field.jsonl"],
     "pairs_int_field.jsonl row 0: field 'chosen' is an int (expected a non-empty string)"),
    ("eval-vocab-mismatch", E, ["--ckpt", "{d}/vocab100.pt", "--tokenizer", "byte"],
     "tokenizer 'byte' has 257 tokens but"),
    ("eval-prompt-cannot-fit", E,
     ["--ckpt", "{d}/ok.pt", "--max_new_tokens", "64", "--n_test", "2"],
     "max_new_tokens=64 leaves no room for a prompt in the model's context of 64 tokens"),
    # issue 12: columns are matched exactly; eval.py reads and checks data as train.py does;
    # files are named with their line; a run folder without its config is not reused
    ("pairs-near-miss-column", T, ["--pairs_source", "{d}/pairs_Prompt.jsonl"],
     "pairs_Prompt.jsonl: column 'Prompt' is not 'prompt' (columns are matched exactly"),
    ("task-near-miss-column", T, ["--task", "{d}/task_Question.jsonl"],
     "task_Question.jsonl: column 'Question' is not 'question'"),
    ("eval-identical-pair", E,
     ["--ckpt", "{d}/ok.pt", "--task", "none", "--pairs", "{d}/pairs_identical.jsonl"],
     "pairs_identical.jsonl row 0: chosen and rejected are identical"),
    ("eval-non-finite", E, ["--ckpt", "{d}/ok.pt", "--beta", "nan"],
     "--beta must be a finite number, got nan"),
    ("pairs-trailing-data", T, ["--pairs_source", "{d}/pairs_trailing.json"],
     "pairs_trailing.json: could not read it as json (line 2: invalid JSON, Extra data"),
    ("hf-truncated-safetensors", T, ["--init_from", "{d}/hf_truncated", "--tokenizer", "byte"],
     "hf_truncated/model.safetensors: not a readable weight file (truncated or corrupt?"),
    ("hf-truncated-bin", T, ["--init_from", "{d}/hf_bin_truncated", "--tokenizer", "byte"],
     "hf_bin_truncated/pytorch_model.bin: not a readable weight file (truncated or corrupt?"),
    ("hf-index-without-weight-map", T,
     ["--init_from", "{d}/hf_no_weight_map", "--tokenizer", "byte"],
     "hf_no_weight_map/model.safetensors.index.json: no weight_map"),
    ("hf-config-not-json", T, ["--init_from", "{d}/hf_bad_config", "--tokenizer", "byte"],
     "hf_bad_config/config.json: not valid JSON"),
    ("eval-hf-truncated", E, ["--ckpt", "{d}/hf_truncated", "--tokenizer", "byte"],
     "hf_truncated/model.safetensors: not a readable weight file"),
    ("config-deleted", T, ["--out_dir", "{d}/orphan_run", "--loss", "dpo"],
     "orphan_run holds files but no config.json (sft): nothing says which config made them"),
    # issue 23: values read as what they are, nothing silently defaulted, checks before work
    ("hf-zero-heads", T, ["--init_from", "{d}/hf_zero_heads", "--tokenizer", "byte"],
     "hf_zero_heads/config.json: num_attention_heads=0 cannot be represented by this qwen2 "
     "model (expected an integer >= 1)"),
    ("hf-bool-layers", T, ["--init_from", "{d}/hf_bool_layers", "--tokenizer", "byte"],
     "hf_bool_layers/config.json: num_hidden_layers=True cannot be represented"),
    ("hf-no-tokenizer", T, ["--init_from", "{d}/qwen_no_tokenizer"],
     "qwen_no_tokenizer: no tokenizer.json, and a qwen2 model's ids are not GPT-2's"),
    ("eval-hf-no-tokenizer", E, ["--ckpt", "{d}/qwen_no_tokenizer"],
     "qwen_no_tokenizer: no tokenizer.json, and a qwen2 model's ids are not GPT-2's"),
    ("chat-template-python-bug", E, ["--ckpt", "{d}/hf_bad_template"],
     "hf_bad_template: the chat template failed: TypeError: unsupported operand type(s)"),
    ("pairs-json-array-line", T, ["--pairs_source", "{d}/pairs_array_line.jsonl"],
     "pairs_array_line.jsonl: could not read it as jsonl (line 2: a JSON array; expected one "
     "JSON object per line)"),
    ("eval-pairs-json-array-line", E,
     ["--ckpt", "{d}/ok.pt", "--task", "none", "--pairs", "{d}/pairs_array_line.jsonl"],
     "pairs_array_line.jsonl: could not read it as jsonl (line 2: a JSON array"),
    ("ipo-beta-overflows", T, ["--loss", "ipo", "--beta", "1e-20"],
     "--loss ipo --beta 1e-20: the loss is inf at step 0 already, where the policy is the "
     "reference: out of float32's range (expected a larger --beta)"),
    ("compare-ipo-beta-overflows", T, ["--compare", "dpo,ipo", "--beta", "1e-20"],
     "--compare: bad variant 'ipo': --loss ipo --beta 1e-20: the loss is inf at step 0"),
    ("simpo-gamma-overflows", T, ["--loss", "simpo", "--gamma", "1e39"],
     "--loss simpo --gamma 1e+39: the loss is inf at step 0 already"),
    ("task-no-training-questions", T, ["--task", "{d}/only_test.jsonl"],
     "only_test.jsonl: no training questions"),
    # issue 35: a command that would do nothing says so; a bad value is named before any work
    ("eval-nothing-to-evaluate", E, ["--ckpt", "{d}/ok.pt", "--task", "none"],
     "--task none and no --pairs: nothing to evaluate (expected a task to score, --pairs FILE, "
     "or both)"),
    ("max-len-one", T, ["--max_len", "1"],
     "--max_len must be >= 2 (a prompt token and a response token; the prompt is cut to half "
     "of it), got 1"),
    ("one-sample-per-question", T, ["--n_samples", "1"],  # (it trained SFT and sampled first)
     "--n_samples 1 makes no pairs: a pair is a right and a wrong sample of one question "
     "(expected >= 2 with --pairs_source sample)"),
]
if not torch.cuda.is_available():
    CATALOGUE.append(("no-cuda", T, ["--device", "cuda"],
                      "--device cuda: this machine has no CUDA GPU"))


# The catalogue runs through the command-line entry points (the `if __name__ == "__main__"` block,
# real argv) in ONE fresh interpreter that captures file descriptor 2 per case: as many separate
# processes would spend minutes on `import torch` alone. A few rows also run as processes of their
# own (test_bad_input_in_a_process_of_its_own).
CLI_DRIVER = """
import json, os, runpy, sys, tempfile, time, traceback
cases, results, results_path = json.load(open(sys.argv[1])), [], sys.argv[2]
for script, argv in cases:
    t0, code = time.time(), 0
    with tempfile.TemporaryFile() as err:
        sys.stdout.flush(); sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            # as `python script`
            sys.argv, sys.path[0] = [script, *argv], os.path.dirname(os.path.abspath(script))
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:  # what the interpreter does with an uncaught SystemExit
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()  # what the interpreter does with any other uncaught exception
            code = 1
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        results.append(dict(code=code, stderr=err.read().decode(errors="replace"),
                            seconds=time.time() - t0))
json.dump(results, open(results_path, "w"))
"""


def catalogue_argv(case, files, runs):
    name, script, args, _ = case
    out = runs / name
    argv = [a.format(d=files) for a in args]
    if script == T and "--out_dir" not in argv:
        argv = ["--out_dir", str(out), *argv]
    return argv, out


@pytest.fixture(scope="module")
def catalogue_results(files, tmp_path_factory):
    d = tmp_path_factory.mktemp("catalogue")
    (d / "driver.py").write_text(CLI_DRIVER)
    argvs = [catalogue_argv(case, files, d / "runs") for case in CATALOGUE]
    (d / "cases.json").write_text(json.dumps([[case[1], argv]
                                              for case, (argv, _) in zip(CATALOGUE, argvs)]))
    p = run_cli([d / "driver.py", d / "cases.json", d / "results.json"], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((d / "results.json").read_text())
    return {case[0]: (r, out) for case, r, (_, out) in zip(CATALOGUE, results, argvs)}


@pytest.mark.parametrize("name, script, args, message", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_fails_fast_with_one_clear_line(catalogue_results, name, script, args, message):
    r, out = catalogue_results[name]
    check_one_line_error(r["code"], r["stderr"], message)
    assert not (out / "sft" / "metrics.jsonl").exists(), "it trained before failing"


@pytest.mark.parametrize("name", ["pairs-corrupt-line", "eval-no-ckpt"])
def test_bad_input_in_a_process_of_its_own(files, tmp_path, name):
    case = next(c for c in CATALOGUE if c[0] == name)
    argv, out = catalogue_argv(case, files, tmp_path)
    p = run_cli([case[1], *argv], timeout=120)
    check_one_line_error(p.returncode, p.stderr, case[3])
    assert p.returncode == 1


def test_a_bad_flag_claims_no_run_folder(catalogue_results):
    _, out = catalogue_results["max-len-one"]
    assert not out.exists()


def test_a_stray_rank_in_the_environment_is_named_before_any_work(files, tmp_path):
    """RANK=1 left over from a torchrun shell: without it, rank 1 of a world of one would train
    writing nothing, then fail on a checkpoint that rank 0 never wrote."""
    out = tmp_path / "run"
    p = run_cli(["train.py", "--out_dir", out, "--loss", "dpo"], timeout=120, RANK="1")
    check_one_line_error(p.returncode, p.stderr, "the environment has RANK=1 and WORLD_SIZE=1: "
                         "expected RANK < WORLD_SIZE, as torchrun sets them")
    assert not out.exists()


def test_the_catalogue_is_long_enough():
    assert len(CATALOGUE) >= 20


def test_a_prompt_longer_than_the_context_is_cut_and_counted_not_lost(tmp_path, capsys):
    """A prompt longer than max_len is cut keeping its end (and longer than the context, at
    generation), and the run says so: no row disappears or is cut without being counted."""
    task = tmp_path / "long"
    task.mkdir()
    long_q = "Tom has 3 pens. " * 40 + "How many does he have?"
    for split, names in (("train", ("Tom", "Ann")), ("test", ("Sam", "Mia"))):
        questions = (long_q.replace("Tom", names[0]), f"{names[1]} has 2 pens. How many?")
        (task / f"{split}.jsonl").write_text("".join(
            json.dumps({"question": q, "answer": "He has 3.\n#### 3"}) + "\n" for q in questions))
    summary = train.main(tiny(tmp_path / "run", task=task, n_train=0, n_test=0, sft_steps=1,
                              sft_batch_size=2, stop_after="sft"))
    # both evaluated, the long one from the end of its prompt, and counted
    assert summary["sft"]["test"]["n"] == 2 and summary["sft"]["test"]["prompts_cut"] == 1
    records = json.loads((tmp_path / "run" / "sft" / "eval.json").read_text())["records"]
    assert [r["prompt_cut"] for r in records] == [True, False]
    out = capsys.readouterr().out
    assert ("[sft] 2 examples ({'rows': 2, 'kept': 2, 'truncated': 1, 'prompt_truncated': 1, "
            "'response_truncated': 0, 'dropped': 0})") in out
    assert "warning: sft data: 1 of 2 rows truncated to max_len=128" in out
    assert "warning: 1 of 2 test prompts do not fit the model's context" in out


# -----------------------------------------------------------------------------
# several processes: DDP over gloo, 2 CPU processes == 1 process with the same global batch


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed/gloo unavailable")
def test_two_processes_train_like_one(tmp_path):
    """Same global batches, split over 2 ranks and 2 micro-batches each (grad_accum 2), with short
    last batches (a rank then computes a stand-in row of weight 0). The loss is a sum over the
    global batch divided by its global count (tokens for SFT, pairs for PO), so the two runs differ
    only by float rounding; Adam amplifies that a little in near-zero-gradient weights.

    Continuous quantities are compared tightly: weights within 5e-4 (a per-rank mean instead gives
    ~3e-2), losses and log-probs within a relative 1e-5 (the per-rank mean: ~4e-4), log-ratios
    (rewards, margins, chosen vs reference: near 0, differences of two rounded log-probs) within
    1e-4 absolute, as in test_fsdp_vs_one_process.py. Discrete ones (reward accuracy, segment win rate, test accuracy) count comparisons
    that float rounding can flip: chosen and rejected often share their first tokens, whose
    log-ratios are equal in exact arithmetic, and at step 1 every comparison is such a near-tie.
    They are computed by the same reduction as the continuous ones, and are compared loosely:
    within one flipped pair per logged step, two flipped pairs or questions in the evaluations."""
    flags = dict(dropout=0.0, pairs_source="offline", n_pair_questions=13, po_batch_size=4,
                 grad_accum=2, po_epochs=2, n_test=9)
    one = train.main(tiny(tmp_path / "one", **flags))
    cmd = ["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={free_port()}", "train.py", *tiny(tmp_path / "two", **flags)]
    p = run_cli(cmd, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "world size 2" in p.stdout
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for stage in ("sft", "po"):
        a, b = (torch.load(tmp_path / d / stage / "ckpt.pt", weights_only=True)["model"]
                for d in ("one", "two"))
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 5e-4, f"{stage} weights differ by {worst}"

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    def same(a, b, where, flips):
        """Continuous: tight. A discrete rate: at most `flips` apart; a count: at most 2."""
        if where[-1].endswith(("accuracy", "win_rate")):
            assert abs(a - b) <= flips + 1e-9, (where, a, b)
        elif where[-1] == "correct":
            assert abs(a - b) <= 2, (where, a, b)
        elif where[-1].startswith(("rewards/", "logps/chosen_vs_ref")):  # log-ratios: the
            # difference of two log-probs of ~-100, each rounded in float32 (~1e-5): absolute
            assert a == pytest.approx(b, abs=1e-4), (where, a, b)
        elif isinstance(a, float):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (where, a, b)
        else:
            assert a == b, where

    fa, fb = (dict(flat({k: run[k] for k in ("sft", "pairs", "po")})) for run in (one, two))
    assert fa.keys() == fb.keys()
    step_flip = 1 / 2  # one pair of a step's batch: 10 train pairs in batches of 4, 4 and 2
    for k in fa:
        if ".test." in k:
            flips = 2 / flags["n_test"]
        elif k.startswith("po.pairs.train."):
            flips = 2 / one["pairs"]["train_pairs"]
        elif k.startswith("po.pairs.val"):
            flips = 2 / one["pairs"]["val_pairs"]
        else:
            flips = step_flip
        same(fa[k], fb[k], k.split("."), flips)
    # rank-0 wrote every file once; the records of the test split are in the test split's order
    ra = json.loads((tmp_path / "one" / "po" / "eval.json").read_text())["records"]
    rb = json.loads((tmp_path / "two" / "po" / "eval.json").read_text())["records"]
    assert [r["question"] for r in ra] == [r["question"] for r in rb]
    assert read_jsonl(tmp_path / "one" / "pairs" / "train.jsonl") == \
        read_jsonl(tmp_path / "two" / "pairs" / "train.jsonl")
    for stage in ("sft", "po"):  # every step: metrics reduced over the ranks, as one process does
        logs = [read_jsonl(tmp_path / d / stage / "metrics.jsonl") for d in ("one", "two")]
        assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]]
        for ra, rb in zip(*logs):
            for k in ra.keys() - {"step", "lr", *UNTIMED}:
                same(ra[k], rb[k], (stage, ra["step"], k), step_flip)
