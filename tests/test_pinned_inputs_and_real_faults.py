"""
A run pinned to what it was built from, eval.py scoring what was trained, faults tested for real.
Each test is one case that used to go wrong (silently, with a stack trace, or with a vague
message); the one-line errors of bad flags and files are rows of test_resume_and_bad_input.py's catalogue.
Faults are real: a file-size limit (`ulimit -f`: CPython ignores SIGXFSZ, so writes fail with
EFBIG, as on a full disk), real signals, real permissions, torchrun itself.
"""
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import pytest
import torch

from machinery import common
import data
import eval as evaluate
import train
from machinery.checkpoint import export, load_tokenizer, save_checkpoint
from machinery.common import ConfigError
from conftest import check_one_line_error, cli_env, die_at, Died, free_port, ROOT, run_cli, tiny
from machinery.hf import config_kwargs, hf_config, save_pretrained
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def task_rows(start, n):
    return [{"question": f"Tom has {i} pens and buys 1. How many?",
             "answer": f"He has {i}+1={i + 1}.\n#### {i + 1}"} for i in range(start, start + n)]


def qwen_tokenizer(folder):
    """A tiny Qwen2.5-style tokenizer in `folder` (trained here; transformers writes its files,
    no generation_config.json among them) -> its vocabulary size."""
    pytest.importorskip("transformers")
    from tiny_hf import train_tokenizer
    return len(train_tokenizer("qwen2.5", folder, vocab_size=400))


def tiny_qwen(vocab_size, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(model_type="qwen2", block_size=256, vocab_size=vocab_size, n_layer=1,
                         n_head=2, n_embd=32, n_inner=48, bias=False, tie_embeddings=True))


# -----------------------------------------------------------------------------
# unit cases


def test_batch_order_holds_one_epoch_and_is_the_epochs_end_to_end():
    """--sft_steps 100000000 used to build every step's batch before the first step (minutes, then
    out of memory); the order is now computed an epoch at a time, and is the same order."""
    rows = [dict(prompt_ids=[1] * (k % 7 + 1), response_ids=[2] * (k % 3 + 1)) for k in range(10)]
    order = train.BatchOrder(rows, 4, 10 ** 8, seed=3)
    lengths = data.row_lengths(rows)
    epochs = [data.length_grouped_batches(lengths, 4, seed=common.seed_for(3, e)) for e in range(4)]
    laid = [b for epoch in epochs for b in epoch]
    assert len(order) == 10 ** 8 and [order[i] for i in range(len(laid))] == laid
    per_epoch = len(epochs[0])
    last_epoch = range(10 ** 8 - 10 ** 8 % per_epoch - per_epoch, 10 ** 8 - 10 ** 8 % per_epoch)
    assert sorted(i for step in last_epoch for i in order[step]) == list(range(10))
    with pytest.raises(IndexError):
        order[10 ** 8]


LLAMA = hf_config(GPTConfig(model_type="llama", block_size=64, vocab_size=97, n_layer=1, n_head=2,
                            n_embd=16, n_inner=24, bias=False, tie_embeddings=False), "float32")
GPT2 = hf_config(GPTConfig(block_size=64, vocab_size=97, n_layer=1, n_head=2, n_embd=16),
                 "float32")


@pytest.mark.parametrize("base, key, value", [
    (LLAMA, "num_attention_heads", 0), (LLAMA, "num_hidden_layers", True),
    (LLAMA, "hidden_size", "16"), (LLAMA, "head_dim", 0), (LLAMA, "num_key_value_heads", True),
    (LLAMA, "tie_word_embeddings", "false"), (LLAMA, "rms_norm_eps", "1e-6"),
    (LLAMA, "rope_theta", True), (LLAMA, "rope_scaling", "llama3"),
    (GPT2, "n_layer", True), (GPT2, "n_head", 0), (GPT2, "layer_norm_epsilon", "1e-5"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_config_json_values_are_read_as_what_they_are(tmp_path, base, key, value):
    """`num_attention_heads: 0` used to be a ZeroDivisionError, `true` a 1, '1e-5' a TypeError,
    "false" a true: each is now refused naming the key."""
    (tmp_path / "config.json").write_text(json.dumps({**base, key: value}))
    with pytest.raises(ValueError, match=rf"config.json: {key}={value!r} cannot be represented"):
        config_kwargs(tmp_path)


def test_a_pairs_line_holding_a_json_array_is_named(tmp_path):
    path = jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"},
                                           '["Q", "a", "b"]'])
    with pytest.raises(ValueError, match=r"pairs.jsonl: could not read it as jsonl \(line 2: a "
                                         r"JSON array; expected one JSON object per line\)"):
        data.load_pairs(str(path))


def test_a_llama_folder_without_tokenizer_files_is_refused(tmp_path):
    """Its vocabulary is as large as GPT-2's, so GPT-2's ids used to pass the size check."""
    save_pretrained(tiny_qwen(50304), tmp_path / "qwen", tokenizer="none")
    with pytest.raises(FileNotFoundError, match=r"qwen: no tokenizer.json, and a qwen2 model's "
                                                r"ids are not GPT-2's"):
        load_tokenizer(tmp_path / "qwen")


def test_pinned_inputs_refuse_other_content_and_record_new_ones(tmp_path):
    out = str(tmp_path)
    common.pin_inputs(out, {"task": ("a.jsonl", "1" * 64), "init_from": ("scratch", "scratch")})
    common.pin_inputs(out, {"task": ("moved/a.jsonl", "1" * 64), "pairs_source": ("p", "2" * 64),
                            "init_from": ("gone", None)})  # None: nothing to check now
    assert common.read_json(tmp_path / "inputs.json") == {
        "task": "1" * 64, "init_from": "scratch", "pairs_source": "2" * 64}
    with pytest.raises(ConfigError, match=r"--task a.jsonl: not what this run read from it before "
                                          r"\(content 111111111111… then, 333333333333… now; see "):
        common.pin_inputs(out, {"task": ("a.jsonl", "3" * 64)})
    with pytest.raises(ConfigError, match=r"--init_from gpt2: .* \(content scratch then, gpt2 now"):
        common.pin_inputs(out, {"init_from": ("gpt2", "gpt2")})


def test_a_loss_out_of_float32_at_step_0_is_refused_before_any_work():
    """IPO's (1/(2β))² at β = 1e-20 overflowed at step 1, and the message blamed the learning
    rate; the step-0 loss is a function of β alone, so it is checked with the flags."""
    with pytest.raises(ConfigError, match=r"--loss ipo --beta 1e-20: the loss is inf at step 0 "
                                          r"already, where the policy is the reference"):
        train.check_loss_at_start(train.Config(loss="ipo", beta=1e-20))
    train.check_loss_at_start(train.Config(loss="ipo", beta=1e-3))
    with pytest.raises(ConfigError, match=r"--loss simpo --gamma 1e\+39: .* smaller --gamma"):
        train.check_loss_at_start(train.Config(loss="simpo", gamma=1e39))


@pytest.mark.slow
def test_a_checkpoint_keeps_its_tokenizer_and_its_export_its_eos(tmp_path):
    """Checkpoints recorded the absolute folder of their Hugging Face tokenizer: moved, the run
    could not go on. They now keep its files. And an export of a source without a
    generation_config.json wrote eos_token_id null (generation never stops in transformers, vLLM,
    lm-eval); the ids now come from the tokenizer."""
    folder = tmp_path / "qwen"
    vocab = qwen_tokenizer(folder)
    assert not (folder / "generation_config.json").exists()
    tok = load_tokenizer(folder)
    save_checkpoint(tmp_path / "ckpt.pt", tiny_qwen(vocab), tokenizer=tok)
    shutil.move(folder, tmp_path / "moved")
    again = load_tokenizer(tmp_path / "ckpt.pt")
    text = "<|im_start|>user\nTom has 3 pens.<|im_end|>"
    assert again.name == tok.name and again.eot_token == tok.eot_token == tok.end_of_turn_id
    assert again.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    exported = common.read_json(os.path.join(export(tmp_path / "ckpt.pt", tmp_path / "hf"),
                                             "config.json"))
    assert exported["eos_token_id"] == tok.end_of_turn_id  # <|im_end|>: what a reply ends with
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    save_checkpoint(tmp_path / "byte.pt", GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1,
                                                        n_head=2, n_embd=16)), tokenizer="byte")
    exported = common.read_json(os.path.join(export(tmp_path / "byte.pt", tmp_path / "hf_byte"),
                                             "config.json"))
    assert exported["eos_token_id"] == 256


def test_an_export_carries_the_chat_template_only_where_the_run_used_it(tmp_path):
    """The export of a run trained with --chat_template none carried the source's chat template:
    every client that loads it prompted the model in a format it never saw. It carries the
    template the run used, or none, and ends its responses where the run did."""
    vocab = qwen_tokenizer(tmp_path / "qwen")
    for setting in ("auto", "none"):
        tok = load_tokenizer(tmp_path / "qwen", chat_template=setting)
        save_checkpoint(tmp_path / f"{setting}.pt", tiny_qwen(vocab), tokenizer=tok,
                        chat_template=setting)
        folder = export(tmp_path / f"{setting}.pt", tmp_path / f"hf_{setting}")
        again = load_tokenizer(folder)  # (auto: the folder's template, if it has one)
        assert again.chat_template == tok.chat_template
        assert common.read_json(os.path.join(folder, "config.json"))["eos_token_id"] == \
            tok.eot_token
    assert tok.chat_template is None and load_tokenizer(tmp_path / "qwen").chat_template
    assert not {"chat_template.jinja", "chat_template.json"} & set(os.listdir(folder))
    assert "chat_template" not in common.read_json(os.path.join(folder, "tokenizer_config.json"))


def listing(folder):  # {file: bytes} of a folder, its subfolders' files too
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_an_export_replaces_an_earlier_export_whole(tmp_path):
    """Exporting into a folder that held another model's export left that model's tokenizer,
    chat template and generation config beside the new weights. The folder now holds exactly
    the new export; a folder holding anything else is refused, untouched."""
    vocab = qwen_tokenizer(tmp_path / "qwen")
    save_checkpoint(tmp_path / "qwen.pt", tiny_qwen(vocab), tokenizer=load_tokenizer(
        tmp_path / "qwen"))
    save_checkpoint(tmp_path / "byte.pt", GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1,
                                                        n_head=2, n_embd=16)), tokenizer="byte")
    export(tmp_path / "byte.pt", tmp_path / "fresh")
    export(tmp_path / "qwen.pt", tmp_path / "hf")
    assert {"tokenizer.json", "chat_template.jinja"} <= set(os.listdir(tmp_path / "hf"))
    export(tmp_path / "byte.pt", tmp_path / "hf")
    assert listing(tmp_path / "hf") == listing(tmp_path / "fresh")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # nothing left beside it
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    before = listing(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"hf: holds files that are not an export's \(notes.txt\)"):
        export(tmp_path / "qwen.pt", tmp_path / "hf")
    assert listing(tmp_path / "hf") == before


def test_an_export_path_starting_with_a_tilde_is_home(tmp_path, monkeypatch):
    """export(ckpt, "~/models/x"), as the README writes it, made a folder literally named "~" in
    the working folder (the flags expand ~; the Python API did not)."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    save_checkpoint(home / "byte.pt", GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1,
                                                    n_head=2, n_embd=16)), tokenizer="byte")
    export("~/byte.pt", "~/hf")
    assert (home / "hf" / "config.json").is_file() and not os.listdir(work)


@pytest.mark.slow
def test_an_export_into_a_run_folder_is_refused(tmp_path):
    """export(ckpt, run_folder) wrote the Hugging Face config.json over the run's own: the run
    could no longer resume, nor eval.py read its settings. A run folder (or a stage's) is
    refused in one line, untouched; a new folder inside it is fine."""
    out = tmp_path / "run"
    train.main(tiny(out, stop_after="sft", sft_steps=1, n_test=2))
    ckpt = out / "sft" / "ckpt.pt"
    before = listing(out)
    for folder in (out, out / "sft"):
        with pytest.raises(ValueError, match=rf"{folder}: holds files that are not an export's "
                                             r"\(.*(config.json: not a Hugging Face config|ckpt)"):
            export(ckpt, folder)
    assert listing(out) == before
    export(ckpt, out / "hf")
    assert common.read_json(out / "hf" / "config.json")["model_type"] == "gpt2"
    train.main(tiny(out, stop_after="sft", sft_steps=1, n_test=2))  # the run is still its own


# -----------------------------------------------------------------------------
# a run pinned to its inputs


@pytest.mark.slow
def test_an_edited_task_file_is_refused_on_resume_and_named_by_eval(tmp_path, capsys):
    """The --task file regenerated between SFT and a resume: pairs and PO trained on the new file
    over an SFT model of the old one, and eval.py said "settings of the run" on questions none of
    which were the run's."""
    task, out = jsonl(tmp_path / "task.jsonl", task_rows(0, 150)), tmp_path / "run"
    flags = tiny(out, task=task, n_train=0, n_test=0, sft_steps=2, stop_after="sft")
    train.main(flags)
    jsonl(task, task_rows(500, 150))  # regenerated in place
    with pytest.raises(ConfigError, match=rf"--task {task}: not what this run read from it before "
                                          r"\(content [0-9a-f]{12}… then, [0-9a-f]{12}… now"):
        train.main(tiny(out, task=task, n_train=0, n_test=0, sft_steps=2, stop_after="pairs"))
    assert not (out / "pairs").exists()
    capsys.readouterr()
    evaluate.main(["--ckpt", str(out / "sft" / "ckpt.pt")])
    printed = capsys.readouterr().out.splitlines()[0]
    assert f"NOT the run's test set: --task {task} changed since the run read it" in printed


@pytest.mark.slow
def test_a_moved_task_file_and_model_folder_keep_the_run(tmp_path, capsys):
    """The Hugging Face folder a run started from (and its task file) moved: the run could never
    go on (a "different config"; checkpoints named the old folder as their tokenizer). The same
    content at a new path is the same input; other content at the old path is refused."""
    model, task = tmp_path / "qwen", jsonl(tmp_path / "task.jsonl", task_rows(0, 120))
    pairs = jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Q{i}", "chosen": f"yes {i}",
                                              "rejected": f"no {i}"} for i in range(8)])
    vocab = qwen_tokenizer(tmp_path / "tokenizer")
    save_pretrained(tiny_qwen(vocab, seed=1), model, tokenizer=str(tmp_path / "tokenizer"))
    out = tmp_path / "run"

    def flags(moved="", **over):
        return tiny(out, init_from=tmp_path / f"{moved}qwen", task=tmp_path / f"{moved}task.jsonl",
                    pairs_source=tmp_path / f"{moved}pairs.jsonl", n_train=0, n_test=0,
                    sft_steps=2, max_new_tokens=8, po_epochs=1, eval_batch_size=8, **over)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Died):
        die_at(mp, "sft:1")  # before SFT is done, the source model is still read
        train.main(flags())
    weights = model / "model.safetensors"
    saved = weights.read_bytes()
    save_pretrained(tiny_qwen(vocab, seed=2), tmp_path / "other", tokenizer="none")
    shutil.copy(tmp_path / "other" / "model.safetensors", weights)  # other weights, same path
    with pytest.raises(ConfigError, match=rf"--init_from {model}: not what this run read from it"):
        train.main(flags())
    weights.write_bytes(saved)
    train.main(flags(stop_after="sft"))
    for path in (model, task, pairs):
        shutil.move(path, tmp_path / f"moved_{path.name}")
    summary = train.main(flags("moved_"))
    assert summary["po"]["test"]["n"] == summary["sft"]["test"]["n"] > 0
    assert common.read_json(out / "config.json")["init_from"] == str(model)  # the run's, as first given
    assert summary["config"]["init_from"] == str(tmp_path / "moved_qwen")  # this command's
    capsys.readouterr()
    evaluate.main(["--ckpt", str(out / "po" / "ckpt.pt"), "--task",
                   str(tmp_path / "moved_task.jsonl")])
    assert "NOT the run's test set" not in capsys.readouterr().out


# -----------------------------------------------------------------------------
# eval.py scores a checkpoint with the settings that made it


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    """A --compare run whose variants differ in loss (and so EOS padding) and granularity, on
    pairs whose chosen and rejected responses differ in length (EOS padding matters)."""
    d = tmp_path_factory.mktemp("compare")
    pairs = [{"prompt": f"Question: Tom has {i} pens. He buys 1. How many?\nAnswer:",
              "chosen": f" He buys 1, so {i}+1={i + 1}.\n#### {i + 1}",
              "rejected": f" {i + 7}\n#### {i + 7}"} for i in range(24)]
    out = d / "run"
    train.main(tiny(out, pairs_source=jsonl(d / "pairs.jsonl", pairs), val_frac=0.3,
                    compare="adpo,ipo,adpo:adaptive:4", baseline="adpo", po_epochs=2))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant, scored", [
    ("ipo_s0", "loss ipo, beta 0.5, family static, size 1, eos_pad True"),
    ("adpo_adaptive_4_s0", "loss adpo, beta 0.5, family adaptive, size 4, eos_pad True")])
def test_eval_scores_a_compare_variant_with_its_own_settings(compare_run, variant, scored, capsys):
    """A variant's checkpoint used to be scored with the run's top-level loss settings: an IPO
    variant's held-out reward accuracy came out 1.00 where its own eval.json said 0.00."""
    folder = compare_run / "compare" / variant
    capsys.readouterr()
    result = evaluate.main(["--ckpt", str(folder / "ckpt.pt"), "--task", "none",
                            "--pairs", str(compare_run / "pairs" / "val.jsonl")])
    said = capsys.readouterr().out.splitlines()[0]
    assert said.startswith(f"settings of the run in {compare_run}, and the checkpoint's own (")
    assert f"): {scored}; NOT the run's test set: --task none" in said, said
    own = json.loads((folder / "eval.json").read_text())["pairs"]["val"]
    for k, v in own.items():
        assert result["pairs"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


# -----------------------------------------------------------------------------
# checks before work


@pytest.mark.slow
def test_a_step_count_far_beyond_the_data_starts_at_once(tmp_path):
    """--sft_steps 100000000 (a typo) ran silently for minutes building its batches, and died of
    memory; training now starts at once (and says step 1/100000000)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *tiny(out, sft_steps=10 ** 8,
                                                               ckpt_every=10 ** 9, log_every=1)],
                            cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    metrics = out / "sft" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and
                                              len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None
            time.sleep(0.1)
        assert metrics.exists(), "no step within 2 minutes"  # (step 2 logged: step 1 printed)
    finally:
        proc.kill()  # by its own pid
        proc.wait(timeout=60)
    assert "[sft] step 1/100000000 |" in proc.stdout.read()


# -----------------------------------------------------------------------------
# torchrun: one line per failure


def torchrun(*args, timeout=240):
    return run_cli(["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                    f"--master_port={free_port()}", *map(str, args)], timeout=timeout)


def check_one_line_under_torchrun(p, message):
    """One `error:` line from the processes; what follows is torchrun's own report of the failed
    process (its log lines, its traceback, which ends in ChildFailedError, and its summary)."""
    assert p.returncode != 0, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], p.stderr
    assert p.stderr.count("Traceback") == 1 and "ChildFailedError" in p.stderr, p.stderr
    assert "gloo" not in p.stderr and "Connection closed by peer" not in p.stderr, p.stderr


@pytest.mark.slow
def test_a_bad_flag_under_torchrun_is_one_line(tmp_path):
    """It used to print twice (once per process)."""
    p = torchrun("train.py", "--out_dir", tmp_path / "run", "--beta", "abc")
    check_one_line_under_torchrun(p, "--beta expects float, got 'abc'")


@pytest.mark.slow
def test_a_refusal_on_rank_0_under_torchrun_is_one_line(tmp_path):
    """Rank 0 refuses the folder (another config) while rank 1 waits for it: rank 1 used to add
    gloo's "Connection reset by peer" traceback."""
    out = tmp_path / "run"
    saved = common.parse(train.Config, tiny(out, device="cpu", beta=0.25))
    common.write_json(out / "config.json", dataclasses.asdict(saved))
    (out / "sft").mkdir()  # what that run computed: a folder of nothing is taken anew
    common.append_jsonl(out / "sft" / "metrics.jsonl", {"step": 1, "loss": 1.0})
    p = torchrun("train.py", *tiny(out, device="cpu"))
    check_one_line_under_torchrun(p, "holds a run with a different config (beta: 0.25 -> 0.5")


# -----------------------------------------------------------------------------
# faults for real: a full disk, permissions, signals


def file_size_limit(limit):
    """A subprocess's preexec_fn: files it writes may not grow past `limit` bytes (`ulimit -f`);
    CPython ignores SIGXFSZ, so a write past it fails with EFBIG, as one on a full disk fails."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def run_limited(args, limit):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=cli_env(), timeout=300, preexec_fn=file_size_limit(limit))


@pytest.mark.slow
@pytest.mark.parametrize("limit", [8 * 1024, 64 * 1024], ids=["in-torch-writer", "at-flush"])
def test_a_full_disk_during_a_checkpoint_save_is_one_line(tmp_path, limit):
    """torch.save's C++ writer reports a failed write as `RuntimeError: [enforce fail at
    inline_container.cc] ... unexpected pos` (a mocked OSError passed while this was a
    traceback); the error names the file and says what is safe. (Where the ~100 kB checkpoint
    crosses the limit decides which: inside the writer at 8 kB, at the final flush at 64 kB.)"""
    out = tmp_path / "run"
    flags = tiny(out, stop_after="sft", sft_steps=2, n_test=2, ckpt_every=1000)  # no state.pt
    p = run_limited(["train.py", *flags], limit)
    check_one_line_error(p.returncode, p.stderr, f"{out}/sft/ckpt.pt: could not write it (File "
                                                 f"too large); nothing was changed: the previous "
                                                 f"version, if any, is intact")
    assert sorted(os.listdir(out / "sft")) == ["metrics.jsonl"]  # no half file, no temp file
    p = run_cli(["train.py", *flags])  # room again: the same command
    assert p.returncode == 0 and (out / "sft" / "ckpt.pt").exists(), p.stderr[-2000:]


@pytest.mark.slow
def test_a_full_disk_while_appending_metrics_names_the_file(tmp_path):
    """It used to be a bare `[Errno 28] No space left on device` naming no file."""
    out = tmp_path / "run"
    flags = tiny(out, stop_after="sft", sft_steps=60, ckpt_every=1000)
    p = run_limited(["train.py", *flags], 4096)  # metrics.jsonl passes 4 kB after ~20 steps
    check_one_line_error(p.returncode, p.stderr, f"{out}/sft/metrics.jsonl: could not append to "
                                                 f"it (File too large); the lines before are "
                                                 f"intact")
    p = run_cli(["train.py", *flags])
    assert p.returncode == 0, p.stderr[-2000:]
    assert [m["step"] for m in common.read_jsonl(out / "sft" / "metrics.jsonl")] == \
        list(range(1, 61))


def real_permissions():
    """A subprocess's preexec_fn under which permission bits hold: as root (whom they do not stop)
    the process gives up CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (dropped from its bounding set,
    it has them no more after exec); anyone else is stopped by them anyway."""
    if os.geteuid() != 0:
        return None
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2
    if libc.prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0) != 0:
        pytest.skip("running as root without CAP_SETPCAP: permission bits cannot be made to hold")

    def drop():
        for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    return drop


@pytest.mark.slow
def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path):
    """A read-only run folder used to give `[Errno 13] Permission denied: '.../.lock'`, a stage
    folder that cannot be written a bare errno naming a file (real permission bits: a root test
    process drops the capabilities that override them, see real_permissions)."""
    if os.geteuid() == 0:
        real_permissions()  # (skips where it cannot)
    out = tmp_path / "run"
    flags = tiny(out, stop_after="sft", sft_steps=4, ckpt_every=1000)
    (out / "sft").mkdir(parents=True)
    common.write_json(out / "config.json", dataclasses.asdict(common.parse(train.Config,
                                                                                 flags)))

    def run():
        return subprocess.run([sys.executable, "train.py", *flags], capture_output=True,
                              text=True, cwd=ROOT, env=cli_env(), timeout=300,
                              preexec_fn=real_permissions())
    try:
        os.chmod(out, 0o555)
        p = run()
        check_one_line_error(p.returncode, p.stderr, f"{out}: cannot write in this run folder "
                                                     f"(Permission denied); a run writes its "
                                                     f"files there")
        os.chmod(out, 0o755)
        os.chmod(out / "sft", 0o555)
        p = run()
        check_one_line_error(p.returncode, p.stderr, f"{out}/sft/metrics.jsonl: could not append "
                                                     f"to it (Permission denied)")
    finally:
        os.chmod(out, 0o755)
        os.chmod(out / "sft", 0o755)
