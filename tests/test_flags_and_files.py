"""The plumbing every script shares (common.py): flags, setup, seeds, files, the error wrapper."""
import json
import os
import re
import signal
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch

from machinery import common
from machinery.common import ConfigError, parse


@dataclass
class Toy:
    name: str = "x"
    steps: int = 3
    lr: float = 0.1
    fast: bool = False


def test_parse_layers_defaults_base_preset_and_flags(tmp_path):
    assert parse(Toy, []) == Toy()
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"_comment": "ignored", "steps": 5, "lr": 0.5}))
    cfg = parse(Toy, ["--preset", str(preset), "--lr=0.25", "--fast"],
                base={"steps": 4, "name": "base", "not_a_field": 1}, presets=True)
    assert cfg == Toy(name="base", steps=5, lr=0.25, fast=True)  # flags > preset > base > defaults
    assert parse(Toy, ["--fast", "false", "--steps", "7"]) == Toy(steps=7, fast=False)
    assert parse(Toy, ["--fast", "--steps", "7"]) == Toy(steps=7, fast=True)  # a bare bool flag


@pytest.mark.parametrize("argv, message", [
    (["--bogus", "1"], "unknown flag --bogus (expected one of the fields of Toy)"),
    (["--steps", "2.5"], "--steps expects int, got '2.5'"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr"], "--lr needs a value"),
    (["--fast", "maybe"], "--fast expects bool, got 'maybe'"),
    (["oops"], "unexpected argument 'oops': flags are --key value"),
    (["--preset", "p"], "unknown flag --preset"),  # only where presets are allowed
])
def test_parse_errors_name_the_flag(argv, message):
    with pytest.raises(ConfigError) as e:
        parse(Toy, argv)
    assert message in str(e.value)


def test_a_path_starting_with_a_tilde_is_home_in_flags_and_presets(tmp_path, monkeypatch):
    """`--out_dir=~/x` reaches the program unexpanded (the shell expands ~ only at a word's
    start); it means the same folder as `--out_dir ~/x`, not a folder named ~ here."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse(Toy, ["--name=~/x"]).name == str(tmp_path / "x")
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"name": "~/y"}))
    assert parse(Toy, ["--preset", str(preset)], presets=True).name == str(tmp_path / "y")
    assert parse(Toy, ["--name", "a~b"]).name == "a~b"


@pytest.mark.parametrize("value, message", [
    (True, "--steps expects int, got True"),        # a bool is no int ...
    (1, "--fast expects bool, got 1"),              # ... nor an int a bool
    ("0.5", "--lr expects float, got '0.5'"),       # a JSON string is no number
    (2.5, "--steps expects int, got 2.5"),
    (7, "--name expects str, got 7"),
])
def test_a_preset_value_is_read_as_what_it_is(tmp_path, value, message):
    key = message.split()[0].removeprefix("--")
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({key: value}))
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(Toy, ["--preset", str(preset)], presets=True)
    assert parse(Toy, [], base={"lr": 1}).lr == 1.0  # an int where a float goes is that float


def test_presets_are_checked(tmp_path):
    (tmp_path / "bad.json").write_text('{"steps": 1,}')
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "typo.json").write_text('{"stepz": 1}')
    for name, message in (("bad", "not valid JSON"), ("list", "expected a JSON object"),
                          ("typo", "unknown key 'stepz'"), ("none", "no such preset file")):
        with pytest.raises(ConfigError, match=message):
            parse(Toy, ["--preset", str(tmp_path / f"{name}.json")], presets=True)


def test_setup_on_cpu():
    run = common.setup("cpu")
    assert (run.device, run.device_type, run.dtype, run.rank, run.world) == ("cpu", "cpu",
                                                                           "float32", 0, 1)
    assert isinstance(run.ctx, nullcontext) and run.master
    assert common.setup("cpu", "bfloat16").dtype == "bfloat16"
    with pytest.raises(ConfigError, match="--device 'tpu'"):
        common.setup("tpu")
    with pytest.raises(ConfigError, match="--dtype 'half'"):
        common.setup("cpu", "half")


@pytest.mark.slow
def test_seeds_are_pure_functions_of_their_parts():
    code = "from machinery import common; print(common.seed_for(1337, 'po', 12, 1))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                           env=dict(os.environ, PYTHONHASHSEED=h)).stdout for h in ("1", "2")}
    assert seen == {f"{common.seed_for(1337, 'po', 12, 1)}\n"}  # str hashing is salted; this is not
    assert common.seed_for(1337, "po", 12, 1) != common.seed_for(1337, "po", 12, 0)
    assert 0 <= common.seed_for("anything") < 2 ** 31


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "sub" / "f.json"
    common.write_json(path, {"a": 1})
    assert common.read_json(path) == {"a": 1}

    def broken(f):
        f.write(b'{"a": ')
        raise OSError("No space left on device")
    with pytest.raises(OSError, match="No space"):
        common.atomic_write(path, broken)
    assert common.read_json(path) == {"a": 1}
    assert os.listdir(path.parent) == ["f.json"]  # no temp file left behind


@pytest.mark.slow
def test_ctrl_c_during_a_torch_save_waits_for_the_file(tmp_path):
    """A SIGINT that lands inside torch.save's zip writer (here: raised from one of its writes)
    used to come out as a RuntimeError from C++; the write now finishes, then Ctrl-C is raised."""
    path = tmp_path / "state.pt"

    def save_hit_by_ctrl_c(f):
        real_write, calls = f.write, [0]

        def write(data):
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), signal.SIGINT)  # delivered at once, to this main thread
            return real_write(data)
        f.write = write
        torch.save({"w": torch.arange(1000.0)}, f)
    # Python's own Ctrl-C handler, as in a terminal (a shell's background job starts without it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            common.atomic_write(path, save_hit_by_ctrl_c)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(1000.0))


def test_reading_broken_files_names_them(tmp_path):
    (tmp_path / "a.json").write_text('{"a": ')
    with pytest.raises(ValueError, match=r"a\.json: not valid JSON"):
        common.read_json(tmp_path / "a.json")
    (tmp_path / "b.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"b\.jsonl: could not read it as jsonl \(line 2: "
                                         r"invalid JSON"):
        common.read_jsonl(tmp_path / "b.jsonl")
    log = tmp_path / "log.jsonl"
    for step in (1, 2):
        common.append_jsonl(log, {"step": step})
    with open(log, "a") as f:
        f.write('{"step": 3, "lo')  # a kill while appending
    assert common.read_jsonl(log, torn_tail=True) == [{"step": 1}, {"step": 2}]


def test_a_run_folder_belongs_to_one_config(tmp_path, capsys):
    out = str(tmp_path / "run")
    common.claim_run_folder(out, {"lr": 0.1, "device": "cpu"}, free=("device",))
    assert common.read_json(os.path.join(out, "config.json")) == {"lr": 0.1, "device": "cpu"}
    os.makedirs(os.path.join(out, "sft"))  # the run computed something (see test_first_hour.py)
    common.claim_run_folder(out, {"lr": 0.1, "device": "cuda"}, free=("device",))  # a resume
    assert "resuming the run in" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"holds a run with a different config \(lr: 0.1 -> 0.2\)"):
        common.claim_run_folder(out, {"lr": 0.2, "device": "cpu"}, free=("device",))
    # a flag added since the run began: at its default the run is the same, at another value not
    common.claim_run_folder(out, {"lr": 0.1, "device": "cpu", "new": 1}, free=("device",),
                            defaults={"new": 1})
    with pytest.raises(ConfigError, match=r"different config \(new: 1 -> 2\)"):
        common.claim_run_folder(out, {"lr": 0.1, "device": "cpu", "new": 2}, free=("device",),
                                defaults={"new": 1})
    with pytest.raises(ConfigError, match=r"different config \(new: None -> 1\)"):
        common.claim_run_folder(out, {"lr": 0.1, "device": "cpu", "new": 1}, free=("device",))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        common.claim_run_folder(str(tmp_path / "file"), {})


def test_every_process_refused_a_locked_folder_is_told_its_owner(tmp_path):
    """The owner's pid survives the tries of the refused processes (filelock may truncate the
    lock file itself on each try)."""
    out = str(tmp_path / "run")
    common.lock_run_folder(out)
    code = f"from machinery import common; common.cli(lambda: common.lock_run_folder({out!r}))"
    for _ in range(2):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=common.ROOT, timeout=120)
        assert p.returncode == 1 and p.stderr == (f"error: {out} is in use by another run (pid "
                                                  f"{os.getpid()}): wait for it to end, or use "
                                                  f"another --out_dir\n"), p.stderr
    common.lock_run_folder(out)  # this process holds it already: no error

def test_cli_turns_bad_input_into_one_line(capsys):
    def main():
        raise ValueError("data.jsonl row 3: field 'chosen' is empty\n  (expected a string)")
    with pytest.raises(SystemExit) as e:
        common.cli(main)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: data.jsonl row 3: field 'chosen' is empty (expected a string)\n"
