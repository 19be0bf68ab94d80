"""
FSDP2 (`--fsdp true`, parallel.py) on 2 gloo processes on the CPU against 1 process: the same
weights and metrics after SFT and preference steps (full fine-tuning, and LoRA), a kill + resume
that ends identical to the uninterrupted sharded run, and sampling and evaluation that give the
1-process completions. (PyTorch's own FSDP2 tests run on CPU/gloo too; on a CPU the shards are
float32: the bf16 gathers of a GPU are not exercised here.)
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from machinery.common import read_jsonl
from conftest import cli_env, free_port, ROOT, tiny, UNTIMED

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo")]

# dropout 0: a rank draws its own dropout masks, so 1 and 2 processes would differ by design
FLAGS = dict(dropout=0.0, pairs_source="offline", n_pair_questions=9, po_batch_size=4,
             grad_accum=2, po_epochs=2, n_test=6, sft_steps=6, ckpt_every=2)


def torchrun(script="train.py"):
    return ["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            f"--master_port={free_port()}", script]


def run(args, fails=False, timeout=300):
    """A command in a session of its own: on a timeout (a hang: a collective one rank never
    joined) the whole group goes, torchrun's workers included, and the test fails."""
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=cli_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {args}\n{out[-2000:]}{err[-2000:]}")
    assert (proc.returncode != 0) == fails, out[-3000:] + err[-3000:]
    return SimpleNamespace(stdout=out, stderr=err)


def weights(out, stage):
    return torch.load(out / stage / "ckpt.pt", weights_only=True)["model"]


def metrics(out, stage):
    return [{k: v for k, v in r.items() if k not in UNTIMED}
            for r in read_jsonl(out / stage / "metrics.jsonl")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run in 1 process and sharded over 2, full fine-tuning and LoRA."""
    d = tmp_path_factory.mktemp("fsdp")
    for name, extra in (("full", {}), ("lora", dict(lora_rank=4, lora_alpha=8, sft_lr=3e-2))):
        run(["train.py", *tiny(d / f"{name}_one", **FLAGS, **extra)])
        p = run([*torchrun(), *tiny(d / f"{name}_two", **FLAGS, **extra, fsdp="true")])
        assert "world size 2" in p.stdout
    return d


@pytest.mark.parametrize("name", ["full", "lora"])
def test_two_sharded_processes_train_like_one(runs, name):
    """Weights within 5e-4 (float rounding, amplified a little by Adam), every logged loss within
    a relative 1e-5 (rewards, margins: 1e-4 absolute); the discrete rates (accuracy, win rate: near-ties that rounding can flip)
    within one pair of a step's batch; test accuracy within one question."""
    one, two = runs / f"{name}_one", runs / f"{name}_two"
    for stage in ("sft", "po"):
        a, b = weights(one, stage), weights(two, stage)
        assert a.keys() == b.keys()
        assert name == "full" or all(".lora_" in k for k in a)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 5e-4, f"{stage} weights differ by {worst}"
        ma, mb = metrics(one, stage), metrics(two, stage)
        assert [r["step"] for r in ma] == [r["step"] for r in mb]
        for ra, rb in zip(ma, mb):
            for k in ra:
                if k.endswith(("accuracy", "win_rate")):
                    assert abs(ra[k] - rb[k]) <= 0.5 + 1e-9, (stage, ra["step"], k)
                else:  # rewards and margins: differences of log-probs of ~-100 (abs 1e-4)
                    assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-4), (stage, k)
        ea, eb = (json.loads((d / stage / "eval.json").read_text())["metrics"] for d in (one, two))
        assert abs(ea["correct"] - eb["correct"]) <= 1 and ea["n"] == eb["n"] == FLAGS["n_test"]
    assert max((weights(two, "po")[k] - weights(two, "sft")[k]).abs().max().item()
               for k in weights(two, "sft")) > 1e-3  # it trained


KILLER = """
import os, runpy, signal, sys, time
sys.path.insert(0, {root!r})
from machinery import checkpoint

save = checkpoint.save_checkpoint


def save_then_die(path, *args, **kwargs):  # SIGKILL after PO's first training state
    save(path, *args, **kwargs)
    if str(path).endswith(os.path.join("po", "state.pt")) and os.environ["RANK"] in {ranks!r}:
        os.kill(os.getpid(), signal.SIGKILL)
    if str(path).endswith(os.path.join("po", "state.pt")) and os.environ["RANK"] in {sleepers!r}:
        time.sleep(120)  # in Python, not in a collective: torchrun's SIGTERM comes first


checkpoint.save_checkpoint = save_then_die
sys.argv = [os.path.join({root!r}, "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_killed_sharded_run_resumes_to_the_uninterrupted_result(runs, tmp_path):
    """torchrun killed (SIGKILL, both ranks) right after PO's first training state, then the same
    command: bit-identical to the uninterrupted sharded run (the same 2 ranks reduce the same
    numbers in the same order)."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=str(ROOT), ranks=("0", "1"), sleepers=()))
    out = tmp_path / "run"
    run([*torchrun(str(script)), *tiny(out, **FLAGS, fsdp="true")], fails=True)
    assert (out / "po" / "state.pt").exists() and not (out / "po" / "ckpt.pt").exists()
    p = run([*torchrun(), *tiny(out, **FLAGS, fsdp="true")])
    assert "[po] resuming at step 2/" in p.stdout
    ref = runs / "full_two"
    for stage in ("sft", "po"):
        a, b = weights(ref, stage), weights(out, stage)
        assert all(torch.equal(a[k], b[k]) for k in a), stage
        assert metrics(ref, stage) == metrics(out, stage)
        assert (ref / stage / "eval.json").read_text() == (out / stage / "eval.json").read_text()
    assert not (out / "po" / "state.pt").exists()


@pytest.mark.parametrize("heard", ["the collective's error", "torchrun's SIGTERM"])
def test_a_sharded_process_killed_is_one_line_from_the_other(tmp_path, heard):
    """One rank SIGKILLed (what the out-of-memory killer sends) right after PO's first training
    state: the other printed gloo's 62-line "Connection reset by peer" traceback and no `error:`
    line. It now says in one line that another process died, and how to go on; nothing is lost.
    Which it hears first is a race (torch 2.10's torchrun often stopped it before its collective
    failed), so each is forced here: torchrun looks late, or the survivor is not in a collective."""
    script = tmp_path / "killer.py"
    asleep = ("0",) if heard == "torchrun's SIGTERM" else ()
    script.write_text(KILLER.format(root=str(ROOT), ranks=("1",), sleepers=asleep))
    out = tmp_path / "run"
    launch = torchrun(str(script))
    if not asleep:
        launch.insert(1 + launch.index("torch.distributed.run"), "--monitor_interval=10")
    p = run([*launch, *tiny(out, **FLAGS, fsdp="true")], fails=True)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another process of this torchrun job" in errors[0], p.stderr
    assert ("torchrun stopped this process" in errors[0]) == bool(asleep), p.stderr
    assert "the same command resumes the run" in errors[0], p.stderr
    assert p.stderr.count("Traceback") == 1 and "ChildFailedError" in p.stderr  # torchrun's own
    assert "by peer" not in p.stderr, p.stderr
    assert (out / "po" / "state.pt").exists() and not (out / "po" / "ckpt.pt").exists()


def test_sharded_sampling_and_evaluation_give_the_one_process_completions(runs, tmp_path):
    """The 1-process run's SFT model, sampled (pairs stage) and evaluated again by 1 process and
    by 2 sharded ones: the same greedy completions and the same samples, file for file."""
    flags = dict(FLAGS, pairs_source="sample", n_pair_questions=8, n_samples=3)
    for name in ("one", "two"):
        out = tmp_path / name
        (out / "sft").mkdir(parents=True)
        shutil.copy(runs / "full_one" / "sft" / "ckpt.pt", out / "sft" / "ckpt.pt")
        config = json.loads((runs / "full_one" / "config.json").read_text())
        config.update(out_dir=str(out), pairs_source="sample", n_pair_questions=8, n_samples=3,
                      fsdp=name == "two")
        (out / "config.json").write_text(json.dumps(config))
        launch = torchrun() if name == "two" else ["train.py"]
        run([*launch, *tiny(out, **flags, fsdp=str(name == "two"), stop_after="pairs")])
    one, two = tmp_path / "one", tmp_path / "two"
    ra, rb = (json.loads((d / "sft" / "eval.json").read_text())["records"] for d in (one, two))
    assert [r["completion"] for r in ra] == [r["completion"] for r in rb]
    files = sorted(f.name for f in (one / "pairs").iterdir() if f.name.startswith("samples_"))
    assert files and files == sorted(f.name for f in (two / "pairs").iterdir()
                                     if f.name.startswith("samples_"))
    for f in files:
        assert read_jsonl(one / "pairs" / f) == read_jsonl(two / "pairs" / f), f
