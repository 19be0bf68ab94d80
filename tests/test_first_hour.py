"""A researcher's first hour: --help and typos, progress bars in a log file, the resolved config
on the console, run tracking (TensorBoard, read back), chat-format pair files, sampled special
tokens, an offline GPT-2 export, a retry after a failed --init_from, curves.png, and the
lm-evaluation-harness task file."""
import json
import os
import runpy
import subprocess
import sys
import types

import pytest

import eval as evaluate
from machinery import report
import train
from machinery.common import ConfigError, parse, progress_bar
from conftest import ROOT, die_at, Died, tiny

# -----------------------------------------------------------------------------
# --help and typos


def script_help(script, flag, capsys, monkeypatch):
    """What `python SCRIPT FLAG` prints, run as the script (its __main__ block, real argv)."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), flag])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("script", ["train.py", "eval.py", "scripts/bench.py"])
def test_every_script_has_a_help(script, capsys, monkeypatch):
    for flag in ("--help", "-h"):
        text = script_help(script, flag, capsys, monkeypatch)
        assert text.startswith(f"usage: {os.path.basename(script)}") and "--device" in text, text


def test_importing_the_scripts_leaves_fsdp_and_the_memory_planner_out():
    """They are imported where a model is sharded or a plan is made: a run without them does
    not wait for them (torch's compiler stack comes with them)."""
    code = ("import sys, train, eval; print(sorted(m for m in ('torch.distributed.fsdp', "
            "'torch.distributed.checkpoint', 'machinery.plan') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 0 and p.stdout == "[]\n", p.stdout + p.stderr[-2000:]

def test_help_is_the_config_its_comments_and_its_sections(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps at the terminal's width
    text = script_help("train.py", "--help", capsys, monkeypatch)
    flat = " ".join(text.split())
    for name in train.Config.__dataclass_fields__:  # every field is a flag
        assert f"--{name} " in text, name
    # a field of train.Config, under its section, with its comment and its default
    assert "model: --init_from STR scratch | gpt2" in flat
    assert "--n_layer INT scratch only (default: 4)" in flat
    # the comment line aligned under a field's comment continues it
    assert "| a hub id: Qwen/Qwen2.5-0.5B-Instruct, meta-llama/Llama-3.2-1B... (default: " \
           "'scratch')" in flat
    # a field of the base class config.Settings: its comment too (read up the class tree)
    assert "--beta FLOAT (0.1 is common for LLMs; 0.5 kept this tiny model's accuracy) " \
           "(default: 0.5)" in flat
    assert "--compile [BOOL] torch.compile the training forward (default: False)" in flat
    # the `run` sections of Settings and of Config are one group
    assert flat.count("run: ") == 1 and "run: --seed INT" in flat
    assert "--preset NAME" in flat and "smoke" in flat
    eval_help = " ".join(script_help("eval.py", "-h", capsys, monkeypatch).split())
    assert "what to evaluate: --ckpt STR our ckpt.pt" in eval_help


@pytest.mark.parametrize("flag, message", [
    ("--lerning_rate", "unknown flag --lerning_rate (expected one of the fields of Config): "
                       "did you mean --po_lr or --sft_lr or --cdpo_lr?; see --help"),
    ("--po-lr", "unknown flag --po-lr (expected one of the fields of Config): did you mean "
                "--po_lr"),
    ("--n_layers", "did you mean --n_layer?"),
    ("--lr", "did you mean --sft_lr or --po_lr or --cdpo_lr?"),
])
def test_a_typo_gets_the_close_matches(flag, message):
    with pytest.raises(ConfigError) as e:
        parse(train.Config, [flag, "1"], presets=True)
    assert message in str(e.value)


def test_a_typo_in_a_preset_gets_the_close_matches(tmp_path):
    (tmp_path / "p.json").write_text('{"betta": 0.1}')
    with pytest.raises(ConfigError, match=r"unknown key 'betta' \(expected a field of Config\): "
                                          r"did you mean 'beta'\?"):
        parse(train.Config, ["--preset", str(tmp_path / "p.json")], presets=True)


@pytest.mark.parametrize("flag, value, message", [
    ("beta", "0", "--beta must be > 0, got 0.0"),
    ("size", "0", "--size (k or m) must be >= 1, got 0"),
    ("family", "diagonal", "--family must be static or adaptive, got 'diagonal'"),
    ("loss", "nope", "--loss 'nope': expected one of"),
    ("loss", "dpo+0.5sft", "--loss 'dpo+0.5sft': give the weights with --loss_weights"),
    ("tokenizer", "bpe", "--tokenizer 'bpe': expected auto, byte or gpt2"),
    ("chat_template", "yes", "--chat_template 'yes': expected auto or none"),
    ("max_len", "1", "--max_len must be >= 2 (a prompt token and a response token"),
    ("maj_k", "0", "--maj_k must be >= 1, got 0"),
    ("n_test", "-1", "--n_test must be >= 0, got -1"),
    ("seed", "-1", "--seed must be >= 0, got -1"),
    ("task", " ", "--task is empty (expected e.g. 'arith')"),
])
def test_train_and_eval_refuse_a_bad_setting_alike(flag, value, message):
    """The settings a model is scored with are checked by one function for both scripts."""
    messages = []
    for script, cls, extra in ((train, train.Config, []), (evaluate, evaluate.EvalConfig,
                                                          ["--ckpt", "x.pt"])):
        with pytest.raises(ConfigError) as e:
            script.validate(parse(cls, [f"--{flag}", value, *extra]))
        messages.append(str(e.value))
    assert message in messages[0] and messages[0] == messages[1], messages

# -----------------------------------------------------------------------------
# progress


def test_progress_in_a_log_file_is_whole_lines_with_rate_and_eta(capsys):
    """stderr is not a terminal here (pytest captures it), as in `train.py > log 2>&1`."""
    for _ in progress_bar(range(5), "sft", unit="step"):
        pass
    for _ in progress_bar(range(3), "eval greedy", leave=False):  # kept in a log all the same
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("sft:   0%|          | 0/5 [00:00<?, ?step/s]"), lines
    assert lines[1].startswith("sft: 100%|##########| 5/5 [00:00<00:00, "), lines  # elapsed<ETA
    assert lines[1].endswith("step/s]") and lines[-1].startswith("eval greedy: 100%|"), lines

# -----------------------------------------------------------------------------
# the resolved config, and run tracking


@pytest.mark.slow
def test_tensorboard_gets_every_metric_and_a_resume_continues_the_same_curve(tmp_path, capsys):
    """--report_to tensorboard, for real: a run killed after SFT step 7 (its last training state:
    step 6) and resumed; the events read back hold every step of metrics.jsonl once, with its
    values, the stage's evaluation at its last step, and the run's config."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from machinery.common import read_jsonl
    flags = tiny(tmp_path, stop_after="sft", report_to="tensorboard", dropout=0.0)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Died):
        die_at(mp, "sft:7")
        train.main(flags)
    summary = train.main(flags)
    out = capsys.readouterr().out
    line = out.split("\nconfig: ")[1].splitlines()[0]  # the flags that differ from the defaults
    assert f"--out_dir {tmp_path} --stop_after sft --n_layer 1 --n_head 2 --n_embd 32" in line
    assert "--seed" not in line and "(the rest: defaults, see --help" in line
    events = EventAccumulator(str(tmp_path / "tensorboard" / "sft"))
    events.Reload()
    log = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    for key in ("loss", "lr", "tokens_per_s"):
        points = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in points] == list(range(1, 13)), key  # 7 once: the resumed run's
        assert [v for _, v in points] == pytest.approx([r[key] for r in log], rel=1e-6), key
    accuracy = events.Scalars("test/accuracy")
    assert [(e.step, e.value) for e in accuracy] == [(12, summary["sft"]["test"]["accuracy"])]
    config = events.Tensors("config/text_summary")
    assert len(config) == 1 and '"report_to": "tensorboard"' in config[0].tensor_proto \
        .string_val[0].decode()


@pytest.mark.slow
def test_a_run_killed_before_its_first_training_state_logs_each_step_once(tmp_path):
    """Killed after SFT step 1, before any training state (one every 2 steps): the resumed run
    logged from step 1 again, and only a first step past 1 purged what a killed run had logged:
    TensorBoard kept step 1 twice, and the config twice."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    flags = tiny(tmp_path, stop_after="sft", report_to="tensorboard", sft_steps=4, n_test=2)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Died):
        die_at(mp, "sft:1")
        train.main(flags)
    train.main(flags)
    events = EventAccumulator(str(tmp_path / "tensorboard" / "sft"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert len(events.Tensors("config/text_summary")) == 1


def test_report_to_names_its_missing_package(monkeypatch):
    from machinery import tracking
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"--report_to wandb: wandb is not installed \(pip "
                                          r"install wandb\), or use --report_to none"):
        tracking.start("wandb", "unused", {})


class FakeTracker(types.ModuleType):
    """A stand-in for wandb or trackio that records what it is asked (init returns it as the
    run: the module's functions and the run's methods are one record)."""

    def __init__(self, name):
        super().__init__(name)
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def define_metric(self, *args, **kwargs):
        self.calls.append(("define_metric", args, kwargs))

    def log(self, metrics):
        self.calls.append(("log", metrics))

    def finish(self):
        self.calls.append(("finish",))


@pytest.mark.parametrize("package", ["wandb", "trackio"])
def test_wandb_and_trackio_get_each_stages_numbers_and_resume_the_folders_run(
        package, tmp_path, monkeypatch):
    from machinery import tracking
    fake = FakeTracker(package)
    monkeypatch.setitem(sys.modules, package, fake)
    (tmp_path / "config.json").write_text('{"beta": 0.5}')
    tracking.start(package, str(tmp_path), {"beta": 0.5})
    tracking.log("sft", 1, {"loss": 2, "step": 1, "note": "text", "done": True})
    tracking.log("sft", 2, {"loss": 1.5})
    tracking.log("po", 1, {"loss": 3})
    tracking.finish()
    run_id = tracking.run_id(str(tmp_path))
    init = dict(project="nanoADPO", config={"beta": 0.5}, resume="allow")
    if package == "wandb":  # the folder's id resumes the run; each stage against its own step
        init.update(name=tmp_path.name, id=run_id, dir=str(tmp_path))
        sft, po = [[("define_metric", (f"{s}/*",), {"step_metric": f"{s}/step"})]
                   for s in ("sft", "po")]
    else:  # trackio resumes a run by its name
        init.update(name=run_id)
        sft, po = [], []
    assert fake.calls == [("init", init), *sft,
                          ("log", {"sft/step": 1, "sft/loss": 2.0}),
                          ("log", {"sft/step": 2, "sft/loss": 1.5}), *po,
                          ("log", {"po/step": 1, "po/loss": 3.0}), ("finish",)]

# -----------------------------------------------------------------------------
# chat-format pair files, and special tokens a model samples

CONVERSATION = dict(
    prompt=[{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+3?"}],
    chosen=[{"role": "assistant", "content": "2+3=5.\n#### 5"}],
    rejected=[{"role": "assistant", "content": "2+3=6.\n#### 6"}])


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    """A tiny Qwen2.5-style tokenizer folder with its chat template (and transformers' view)."""
    pytest.importorskip("transformers")  # (tiny_hf saves the tokenizer with it)
    from tiny_hf import train_tokenizer
    folder = tmp_path_factory.mktemp("qwen_tok")
    return folder, train_tokenizer("qwen2.5", folder)


def test_chat_pairs_go_through_the_chat_template_as_trl_renders_them(qwen_folder, tmp_path,
                                                                     capsys):
    """TRL's conversational format, with a prompt column and without one (the shared first
    messages are the prompt): rendered as trl.maybe_apply_chat_template renders them (here from
    transformers' apply_chat_template, its definition), each response cut at the <|im_end|> that
    becomes its EOS; the ids are transformers' own."""
    import data
    from machinery.tokenizer import get_tokenizer
    folder, hf = qwen_folder
    tok = get_tokenizer(str(folder))
    implicit = {k: CONVERSATION["prompt"] + CONVERSATION[k] for k in ("chosen", "rejected")}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n")
    (tmp_path / "implicit.jsonl").write_text(json.dumps(implicit) + "\n")
    prompt = hf.apply_chat_template(CONVERSATION["prompt"], tokenize=False,
                                    add_generation_prompt=True)
    for source in (path, tmp_path / "implicit.jsonl"):
        [pair] = data.render_pairs(data.load_pairs(str(source)), tok)
        assert pair["prompt"] == prompt and prompt.endswith("<|im_start|>assistant\n")
        for field in ("chosen", "rejected"):
            whole = hf.apply_chat_template(CONVERSATION["prompt"] + CONVERSATION[field],
                                           tokenize=False)
            assert pair[field] + "<|im_end|>\n" == whole[len(prompt):]  # TRL's response
        [row], _ = data.encode_pairs([pair], tok, max_len=256)
        assert row["prompt_ids"] == hf(prompt)["input_ids"]
        assert row["chosen_ids"] == hf(pair["chosen"])["input_ids"] + [tok.eot_token]
        assert tok.decode([tok.eot_token]) == "<|im_end|>"
    assert "rendered through the chat template of" in capsys.readouterr().out


def test_trl_renders_a_chat_pair_as_we_do(qwen_folder):
    trl = pytest.importorskip("trl")  # requirements-bench.txt
    import data
    from machinery.tokenizer import get_tokenizer
    folder, hf = qwen_folder
    [ours] = data.render_pairs([CONVERSATION], get_tokenizer(str(folder)), verbose=False)
    theirs = trl.maybe_apply_chat_template(CONVERSATION, hf)
    assert theirs["prompt"] == ours["prompt"]
    assert theirs["chosen"] == ours["chosen"] + "<|im_end|>\n"
    assert theirs["rejected"] == ours["rejected"] + "<|im_end|>\n"


def test_the_pairs_stage_renders_a_chat_file_with_the_sft_models_template(qwen_folder, tmp_path):
    """Where it happens: the pairs stage, with the SFT checkpoint's tokenizer, so that
    pairs/train.jsonl holds the prompts evaluation asks (before: "\\n\\nHuman: ..." text)."""
    from machinery.checkpoint import save_checkpoint
    from machinery.common import read_jsonl, setup
    from model import GPT, GPTConfig
    folder, hf = qwen_folder
    (tmp_path / "chat.jsonl").write_text(json.dumps(CONVERSATION) + "\n")
    out = tmp_path / "run"
    model = GPT(GPTConfig(block_size=64, vocab_size=len(hf), n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(out / "sft" / "ckpt.pt", model, tokenizer=str(folder))
    cfg = parse(train.Config, ["--out_dir", str(out), "--pairs_source",
                               str(tmp_path / "chat.jsonl"), "--val_frac", "0"])
    train.stage_pairs(cfg, setup("cpu"))
    [pair] = read_jsonl(out / "pairs" / "train.jsonl")
    assert pair["prompt"] == hf.apply_chat_template(CONVERSATION["prompt"], tokenize=False,
                                                    add_generation_prompt=True)
    assert pair["chosen"] == "2+3=5.\n#### 5"


def test_a_sampled_special_token_is_the_token_trained_on(qwen_folder):
    """A sample holding a special token (here <|im_start|>, as the SFT model sampled it) is
    decoded to its text in the samples file; encoded for training, it is that token again, not
    the 12 characters of its text (what encode_ordinary made of it)."""
    import data
    import torch
    from machinery.tokenizer import get_tokenizer
    folder, hf = qwen_folder
    tok = get_tokenizer(str(folder))
    special = hf.convert_tokens_to_ids("<|im_start|>")
    sampled = hf("He has 12 pens.")["input_ids"] + [special] + hf("user\n5")["input_ids"]

    class Sampler(torch.nn.Module):  # a model that samples `sampled`, then its EOS
        config = type("Config", (), {"block_size": 64})

        def generate(self, prompts, max_new_tokens, **kwargs):
            return [sampled + [tok.eot_token] for _ in prompts]

    [[text]], _, _ = evaluate.complete(Sampler(), tok, ["Question: 1+1?"], max_new_tokens=32,
                                    progress=False)
    assert "<|im_start|>" in text
    [row], _ = data.encode_pairs([dict(prompt="Q", chosen=text, rejected="other")], tok,
                                 max_len=64)
    assert row["chosen_ids"] == sampled + [tok.eot_token]
    assert hf(text)["input_ids"] == sampled  # and transformers (an export, TRL) reads it so

# -----------------------------------------------------------------------------
# a failed start, and the export


def test_a_failed_init_from_leaves_nothing_that_blocks_a_retry(tmp_path, monkeypatch, capsys):
    """--init_from gpt2 offline fails (cleanly) after the run folder got its config.json; the
    retry with another model in the same folder runs (it was refused: 'a different config')."""
    from machinery import hf

    def offline(*args, **kwargs):
        raise ConnectionError("'gpt2' is no local folder, and the Hugging Face hub cannot be "
                              "reached to get it")
    monkeypatch.setattr(hf, "hub_download", offline)
    out = tmp_path / "run"
    with pytest.raises(ConnectionError, match="cannot be reached"):
        train.main(tiny(out, init_from="gpt2", stop_after="sft"))
    assert sorted(p.name for p in out.iterdir()) == [".lock", ".lock.pid", "config.json",
                                                     "inputs.json"]
    summary = train.main(tiny(out, stop_after="sft", sft_steps=1, n_test=2))
    assert summary["config"]["init_from"] == "scratch" and summary["sft"]["test"]["n"] == 2
    said = capsys.readouterr().out
    assert "the run there computed nothing" in said and "init_from: 'gpt2' -> 'scratch'" in said
    with pytest.raises(ConfigError, match="holds a run with a different config"):  # now it did
        train.main(tiny(out, stop_after="sft", sft_steps=2, n_test=2))


@pytest.mark.slow
def test_a_gpt2_runs_export_works_offline(tmp_path, monkeypatch):
    """The README's export of a run on GPT-2's tokenizer, with the hub unreachable (it used to
    fetch openai-community/gpt2's tokenizer files): the folder loads in transformers, whose
    tokenizer makes tiktoken's ids and whose model gives our logits."""
    from machinery import hf
    import tiktoken
    import torch
    import transformers
    from machinery.checkpoint import export, save_checkpoint
    from model import GPT, GPTConfig

    def offline(*args, **kwargs):
        raise AssertionError("the export asked the hub")
    monkeypatch.setattr(hf, "hub_download", offline)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "ckpt.pt", model, tokenizer="gpt2")
    export(str(tmp_path / "ckpt.pt"), tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = tiktoken.get_encoding("gpt2")
    texts = ["Question: Tom has 12 pens.\nAnswer: 12+7=19.\n#### 19", "  two  spaces\n\n\tand"
             " a tab", "héllo wörld 東京 😀 It's we'll", "a<|endoftext|>b"]
    for text in texts:
        assert auto(text)["input_ids"] == enc.encode(text, allowed_special="all"), text
    assert auto.eos_token_id == enc.eot_token
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([enc.encode(texts[0])])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model.eval()(ids), rtol=1e-4, atol=1e-4)

# -----------------------------------------------------------------------------
# curves.png


def test_curves_have_labelled_axes_smoothed_curves_and_the_held_out_pairs(tmp_path, monkeypatch):
    from machinery.common import write_json, write_jsonl
    rng = __import__("random").Random(0)
    for stage, keys in (("sft", ["loss"]), ("po", ["loss", "rewards/accuracy",
                                                    "rewards/margin"])):
        write_jsonl([{"step": s, **{k: rng.random() for k in keys}} for s in range(1, 201)],
                    tmp_path / stage / "metrics.jsonl")
    pairs = {"val_before": {"rewards/accuracy": 0.0, "rewards/margin": 0.0},
             "val": {"rewards/accuracy": 0.7, "rewards/margin": 0.4}}
    write_json(tmp_path / "po" / "eval.json", {"metrics": {"accuracy": 0.5}, "pairs": pairs})
    drawn = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: drawn.append((fig, path)))
    report.plot_curves(str(tmp_path))
    [(fig, path)] = drawn
    assert path.endswith("curves.png") and len(fig.axes) == 4
    for ax, (_, key, label) in zip(fig.axes, report.CURVES):
        assert ax.get_xlabel() == "step" and ax.get_ylabel() == label
        raw, smooth, *held = ax.get_lines()
        assert raw.get_alpha() < 0.5 and smooth.get_alpha() is None  # raw faint under smoothed
        ys = smooth.get_ydata()
        assert max(ys[100:]) - min(ys[100:]) < 0.5 * (max(raw.get_ydata()) - min(raw.get_ydata()))
        if key.startswith("rewards/"):
            assert list(held[0].get_ydata()) == [pairs["val_before"][key], pairs["val"][key]]
            assert list(held[0].get_xdata()) == [0, 200]

# -----------------------------------------------------------------------------
# the lm-evaluation-harness task file


def test_the_lm_eval_task_is_the_runs_test_set_with_its_prompts_and_grader(tmp_path):
    """eval.py --lm_eval_task on a checkpoint of a run: test.jsonl holds the run's own test
    questions and prompts, the YAML asks for greedy generation as eval.py does, and utils.py is
    this project's grader (lm-eval itself is run by hand: see the README)."""
    import importlib.util
    yaml = pytest.importorskip("yaml")
    from machinery.checkpoint import save_checkpoint
    from machinery.common import read_jsonl, write_json
    from data import is_correct, load_split
    from model import GPT, GPTConfig
    run = tmp_path / "run"
    cfg = parse(train.Config, ["--n_test", "7", "--arith_max_number", "5", "--max_new_tokens",
                               "40"])
    write_json(run / "config.json", cfg.__dict__)
    model = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(run / "sft" / "ckpt.pt", model, tokenizer="byte")
    result = evaluate.main(["--ckpt", str(run / "sft" / "ckpt.pt"), "--lm_eval_task",
                            str(tmp_path / "task")])
    name = result["lm_eval_task"]
    rows = read_jsonl(tmp_path / "task" / "test.jsonl")
    assert [(r["prompt"], r["answer"]) for r in rows] == [
        (ex["prompt"], ex["answer"]) for ex in load_split(cfg, "test")]
    text = (tmp_path / "task" / f"{name}.yaml").read_text()
    spec = yaml.safe_load(text.replace("!function ", ""))
    assert spec["task"] == name and spec["output_type"] == "generate_until"
    assert spec["doc_to_text"] == "{{prompt}}" and spec["test_split"] == "test"
    assert spec["generation_kwargs"] == dict(until=["<|endoftext|>"], do_sample=False,
                                             max_gen_toks=40)
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "task" / "test.jsonl")
    loader = importlib.util.spec_from_file_location("utils", tmp_path / "task" / "utils.py")
    utils = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(utils)
    for completion in (" 3+2=5.\n#### 5", " \\boxed{5}", " 4", " #### 6\nQuestion: #### 5"):
        doc = {"answer": "5"}
        assert utils.process_results(doc, [completion]) == {
            "exact_match": float(is_correct(completion, "5"))}
