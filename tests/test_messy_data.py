"""Messy data and a flaky machine: what used to break silently, with a stack trace, or with a vague
message. Each test is one such case (the one-line errors of bad flags and files are in
test_resume_and_bad_input.py's catalogue). Runs are tiny (conftest.tiny) and use one thread."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from machinery import common
import data
import train
from conftest import check_one_line_error, cli_env, ROOT, run_cli, tiny, visible_lines

pytestmark = [pytest.mark.slow,  # end to end: whole pipelines and processes
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A whole tiny run with the task's offline pairs (quick, and pairs are sure to exist)."""
    out = tmp_path_factory.mktemp("offline") / "run"
    train.main(tiny(out, pairs_source="offline", n_pair_questions=12))
    return out


def copy_run(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".lock"))
    return out


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -----------------------------------------------------------------------------
# silent: wrong or lost data, exit 0


def test_a_single_task_file_never_tests_on_training_questions(tmp_path):
    """--task FILE (the README's local-data example) used to test on its first training rows."""
    rows = [{"question": f"Tom has {i} pens and buys 1. How many?", "answer": f"#### {i + 1}"}
            for i in range(150)]
    task = jsonl(tmp_path / "task.jsonl", rows)
    summary = train.main(tiny(tmp_path / "run", task=task, n_train=0, n_test=0, sft_steps=1,
                              stop_after="sft"))
    tested = {r["question"] for r in json.loads(
        (tmp_path / "run" / "sft" / "eval.json").read_text())["records"]}
    trained = {ex["question"] for ex in data.load_task(str(task), "train")}
    assert summary["sft"]["test"]["n"] == len(tested) > 0
    assert not tested & trained and len(tested | trained) == 150


def test_a_test_question_that_is_also_a_training_question_is_refused(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    rows = [{"question": f"q{i}: 1+{i}?", "answer": f"#### {i + 1}"} for i in range(20)]
    jsonl(folder / "train.jsonl", rows)
    jsonl(folder / "test.jsonl", rows[15:] + [{"question": "new: 2+2?", "answer": "#### 4"}])
    with pytest.raises(ValueError, match=r"5 of the 6 test questions are also training questions"):
        train.main(tiny(tmp_path / "run", task=folder, n_train=0, n_test=0))


def test_duplicate_pairs_are_counted_once_and_held_out_prompts_are_never_trained_on(tmp_path):
    pairs = [{"prompt": f"Q{i % 7}", "chosen": f"good {i}", "rejected": f"bad {i}"}
             for i in range(40)]
    source = jsonl(tmp_path / "pairs.jsonl", pairs + pairs[:10])  # 10 exact duplicates
    train.main(tiny(tmp_path / "run", pairs_source=source, val_frac=0.3, stop_after="pairs"))
    folder = tmp_path / "run" / "pairs"
    stats = json.loads((folder / "stats.json").read_text())
    kept = [common.read_jsonl(folder / f) for f in ("train.jsonl", "val.jsonl")]
    assert stats["pairs"] == 50 and stats["duplicates_removed"] == 10
    assert stats["train_pairs"] + stats["val_pairs"] == 40 == sum(map(len, kept))
    assert not {p["prompt"] for p in kept[0]} & {p["prompt"] for p in kept[1]}
    assert stats["val_pairs"] >= 0.3 * 40


def test_a_second_process_on_one_run_folder_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *tiny(out, sft_steps=400)], cwd=ROOT,
                             env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "sft" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = run_cli(["train.py", *tiny(out, sft_steps=400)])
        check_one_line_error(second.returncode, second.stderr,
                             f"{out} is in use by another run (pid {first.pid})")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    common.lock_run_folder(str(out))  # the kill released it: this process can take it


def test_pairs_edited_after_the_pairs_stage_are_refused(offline_run, tmp_path):
    out = copy_run(offline_run, tmp_path)
    shutil.rmtree(out / "po")
    lines = (out / "pairs" / "train.jsonl").read_text().splitlines(keepends=True)
    (out / "pairs" / "train.jsonl").write_text("".join(lines[:-2]))  # shortened
    with pytest.raises(ValueError, match=r"pairs/train.jsonl is not the file the pairs stage "
                                         r"wrote \(its stats.json says \d+ pairs\): delete"):
        train.main(tiny(out, pairs_source="offline", n_pair_questions=12))


def test_a_val_frac_that_leaves_nothing_to_train_on_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--val_frac 0.9 holds out all 3 pairs: none is left"):
        train.main(tiny(tmp_path / "run", pairs_source="offline", n_pair_questions=3,
                        val_frac=0.9))


def test_prompts_cut_to_fit_the_context_are_counted_when_sampling(tmp_path):
    """max_new_tokens 100 of a 128-token context leaves 28 tokens: every prompt is cut."""
    summary = train.main(tiny(tmp_path / "run", max_new_tokens=100, n_pair_questions=8,
                              stop_after="pairs"))
    assert summary["pairs"]["prompts_cut"] == summary["pairs"]["questions"] == 8
    assert summary["sft"]["test"]["prompts_cut"] == summary["sft"]["test"]["n"]


# -----------------------------------------------------------------------------
# stack traces and vague messages


def test_ctrl_c_is_one_line_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    # a shell's background job (`cmd &`) starts with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as a terminal would
    proc = subprocess.Popen([sys.executable, "train.py", *tiny(out, sft_steps=300)], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "sft" / "state.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert visible_lines(err) == ["interrupted: what was saved is intact; the same command "
                                  "resumes the run"], err
    p = run_cli(["train.py", *tiny(out, sft_steps=300, stop_after="sft")])
    assert p.returncode == 0 and "[sft] resuming at step" in p.stdout, p.stderr[-2000:]


@pytest.mark.parametrize("name", ["sft/eval.json", "pairs/stats.json", "po/reference_logps.pt"])
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_run_file_is_named_with_the_way_out(offline_run, tmp_path, name, damage):
    out = copy_run(offline_run, tmp_path)
    if name.startswith("po/"):  # the preference stage has to run again to read it
        for f in ("eval.json", "ckpt.pt"):
            os.remove(out / "po" / f)
    blob = (out / name).read_bytes()
    (out / name).write_bytes(blob[:len(blob) // 2] if damage == "truncated" else b"")
    with pytest.raises(ValueError) as e:
        train.main(tiny(out, pairs_source="offline", n_pair_questions=12))
    assert str(e.value).startswith(f"{out / name}: damaged (")
    assert str(e.value).endswith("delete it and re-run the same command to recompute it")
    os.remove(out / name)  # ... and that way out works
    train.main(tiny(out, pairs_source="offline", n_pair_questions=12))


def test_a_damaged_summary_is_simply_written_again(offline_run, tmp_path):
    out = copy_run(offline_run, tmp_path)
    (out / "summary.json").write_text('{"sft": ')
    summary = train.main(tiny(out, pairs_source="offline", n_pair_questions=12))
    assert json.loads((out / "summary.json").read_text()) == summary


# -----------------------------------------------------------------------------
# files left broken by a kill


KILL_WHILE_WRITING = """
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
from machinery import common

target, write = sys.argv[1], common.atomic_write


def killed_halfway(path, fn):  # SIGKILL with half of `target`'s temp file on disk
    if not str(path).endswith(target):
        return write(path, fn)
    folder, name = os.path.split(os.path.abspath(path))
    with open(os.path.join(folder, f".{{name}}.deadbeef.tmp"), "wb") as f:
        f.write(b"half")
    os.kill(os.getpid(), signal.SIGKILL)


common.atomic_write = killed_halfway
sys.argv = [os.path.join({root!r}, "train.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("target", ["sft/state.pt", "curves.png"])
def test_a_kill_while_writing_leaves_no_broken_file_behind(tmp_path, target):
    """A kill mid-save leaves a temp file (never a half `target`); the next run removes it."""
    script = tmp_path / "kill.py"
    script.write_text(KILL_WHILE_WRITING.format(root=str(ROOT)))
    out = tmp_path / "run"
    flags = tiny(out, pairs_source="offline", n_pair_questions=12)
    p = run_cli([script, target, *flags])
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not (out / target).exists()
    assert list(out.rglob("*.tmp"))
    train.main(flags)
    assert not list(out.rglob("*.tmp"))
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
