"""End-to-end tests of train.py / eval.py on the smoke preset:
every stage's outputs, resume, the harness."""
import json
import math
import os

import pytest
import torch

import eval as evaluate
import train
from machinery.common import ConfigError, read_jsonl
from data import is_correct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # end to end: whole pipelines


def run_main(out_dir, *flags):
    return train.main(["--preset", "smoke", "--out_dir", str(out_dir), *flags])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One uninterrupted smoke run, shared by the checks below."""
    out = tmp_path_factory.mktemp("smoke")
    summary = run_main(out)
    return out, summary


def test_summary_has_config_and_every_stage(smoke):
    out, summary = smoke
    on_disk = json.load(open(out / "summary.json"))
    assert on_disk["config"] == json.load(open(out / "config.json"))
    # Table-1 ADPO by default
    assert on_disk["config"]["loss"] == "adpo" and on_disk["config"]["size"] == 1
    for stage in ("sft", "pairs", "po"):
        assert stage in on_disk, stage
    assert on_disk["po"]["test"]["accuracy"] == summary["po"]["test"]["accuracy"]
    # the default run's gain: paired over the same test questions, with its CI
    gain = summary["po"]["test"]["vs_sft"]
    po, sft = summary["po"]["test"], summary["sft"]["test"]
    assert gain["mean"] == pytest.approx(po["accuracy"] - sft["accuracy"])
    assert gain["ci95"][0] <= gain["mean"] <= gain["ci95"][1]
    assert po["ci95"][0] <= po["accuracy"] <= po["ci95"][1]


def test_sft_lowers_the_loss(smoke):
    out, summary = smoke
    log = read_jsonl(out / "sft" / "metrics.jsonl")
    # every step
    assert [r["step"] for r in log] == list(range(1, summary["config"]["sft_steps"] + 1))
    first, last = [sum(r["loss"] for r in part) / 5 for part in (log[:5], log[-5:])]
    assert last < 0.7 * first
    assert summary["sft"]["train"]["loss"] == log[-1]["loss"]


def test_pairs_are_graded_correct_and_incorrect(smoke):
    out, summary = smoke
    pairs = read_jsonl(out / "pairs" / "train.jsonl") + read_jsonl(out / "pairs" / "val.jsonl")
    stats = summary["pairs"]
    assert len(pairs) == stats["pairs"] > 0
    assert stats["pairs"] == (stats["questions"] - stats["skipped_no_correct"]
                              - stats["skipped_no_wrong"])
    for p in pairs:
        assert is_correct(p["chosen"], p["answer"]), p
        assert not is_correct(p["rejected"], p["answer"]), p
    # every pair comes from the recorded samples of its question
    samples = {r["prompt"]: r["samples"]
               for f in sorted(os.listdir(out / "pairs")) if f.startswith("samples_")
               for r in read_jsonl(out / "pairs" / f)}
    for p in pairs:
        assert p["chosen"] in samples[p["prompt"]] and p["rejected"] in samples[p["prompt"]]


def test_adpo_raises_reward_accuracy_on_training_pairs(smoke):
    out, summary = smoke
    train_pairs = summary["po"]["pairs"]["train"]
    assert train_pairs["rewards/accuracy"] > 0.6  # 0 at step 0: the policy is the reference (ties)
    assert train_pairs["rewards/margin"] > 0
    log = read_jsonl(out / "po" / "metrics.jsonl")
    assert len(log) == summary["po"]["train"]["step"] and all(math.isfinite(r["loss"]) for r in log)


def test_eval_numbers_match_the_files(smoke):
    out, summary = smoke
    for stage in ("sft", "po"):
        saved = json.load(open(out / stage / "eval.json"))
        records = saved["records"]
        assert len(records) == summary[stage]["test"]["n"] == saved["metrics"]["n"]
        for r in records:  # the stored verdicts are the grader's verdicts on the stored completions
            assert r["correct"] == is_correct(r["completion"], r["gold"])
        assert summary[stage]["test"]["accuracy"] == pytest.approx(
            sum(r["correct"] for r in records) / len(records))



def test_eval_py_scores_the_runs_own_test_set(smoke, capsys):
    """The README's command, no task flags: the smoke run's task (one-step problems, operands up
    to 5) is not eval.py's default one, and eval.py must still score exactly the run's questions."""
    out, summary = smoke
    assert summary["config"]["arith_max_number"] != evaluate.EvalConfig.arith_max_number
    for stage in ("sft", "po"):
        res = evaluate.main(["--ckpt", str(out / stage / "ckpt.pt")])
        saved = json.load(open(out / stage / "eval.json"))
        assert res["records"] == saved["records"]
        assert res["accuracy"] == summary[stage]["test"]["accuracy"]
    assert "NOT the run's test set" not in capsys.readouterr().out
    res = evaluate.main(["--ckpt", str(out / "po" / "ckpt.pt"), "--n_test", "7"])  # asked for
    assert (res["n"] == 7
            and "NOT the run's test set: --n_test 7 (the run's: 40)" in capsys.readouterr().out)


def test_resume_after_sft_gives_the_same_result(smoke, tmp_path):
    out, summary = smoke
    partial = run_main(tmp_path, "--stop_after", "sft")
    assert "pairs" not in partial and not (tmp_path / "pairs").exists()
    resumed = run_main(tmp_path)
    for stage in ("sft", "pairs", "po"):
        assert resumed[stage] == summary[stage], stage
    a = torch.load(out / "po" / "ckpt.pt")["model"]
    b = torch.load(tmp_path / "po" / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(out / "pairs" / "train.jsonl") == \
        read_jsonl(tmp_path / "pairs" / "train.jsonl")


def test_resume_refuses_a_different_config(smoke):
    out, _ = smoke
    with pytest.raises(ConfigError, match="different config.*beta"):
        run_main(out, "--beta", "0.3")


def test_comparison_harness_reports_paired_differences(smoke, tmp_path):
    """The README's harness command on the smoke run: compare.json has the documented shape and
    its numbers are consistent (each mean inside its CI, each difference = variant − baseline)."""
    out, summary = smoke
    # reuse the smoke run's SFT model and pairs: the harness must not redo them
    for stage in ("sft", "pairs"):
        os.symlink(out / stage, tmp_path / stage)
    (tmp_path / "config.json").write_text((out / "config.json").read_text())
    res = run_main(tmp_path, "--compare", "dpo,adpo,adpo:adaptive:4", "--seeds", "0,1")
    stats = json.loads((tmp_path / "compare.json").read_text())
    assert res["compare"] == stats
    on_disk = json.loads((tmp_path / "summary.json").read_text())["config"]  # this command's
    assert on_disk["compare"] == "dpo,adpo,adpo:adaptive:4" and on_disk["seeds"] == "0,1"
    labels = ["ADPO static k=1", "DPO", "ADPO adaptive m=4"]  # Table 3's order
    assert list(stats["variants"]) == labels
    assert stats["baseline"] == "DPO" and stats["n_test"] == summary["config"]["n_test"]
    base = sum(stats["variants"]["DPO"]["accuracy"]) / 2
    for label, v in stats["variants"].items():
        assert len(v["accuracy"]) == 2
        seeds = [json.loads((tmp_path / "compare" / f"{tag}_s{s}" / "eval.json").read_text())
                 for tag in [{"DPO": "dpo", "ADPO static k=1": "adpo_static_1",
                              "ADPO adaptive m=4": "adpo_adaptive_4"}[label]] for s in (0, 1)]
        assert v["accuracy"] == [e["metrics"]["accuracy"] for e in seeds]
        mean = sum(v["accuracy"]) / 2
        assert v["ci95"][0] <= mean <= v["ci95"][1]
        assert v["diff_vs_baseline"]["mean"] == pytest.approx(mean - base)
        lo, hi = v["diff_vs_baseline"]["ci95"]
        assert lo <= v["diff_vs_baseline"]["mean"] <= hi
    table = (tmp_path / "compare.md").read_text()
    assert all(label in table for label in labels) and "paired 95% CI" in table
    assert (tmp_path / "compare.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="--baseline ipo: not among the --compare"):
        run_main(tmp_path, "--compare", "dpo,adpo", "--baseline", "ipo")


def test_table_2_rows_run_in_the_harness(smoke, tmp_path):
    """The paper's Table 2 in miniature: DPO, ADPO, cDPO and cADPO from one SFT model and one
    set of pairs; cDPO and cADPO share one set of contrastive weights."""
    out, _ = smoke
    for stage in ("sft", "pairs"):
        os.symlink(out / stage, tmp_path / stage)
    (tmp_path / "config.json").write_text((out / "config.json").read_text())
    res = run_main(tmp_path, "--compare", "dpo,cdpo,adpo:adaptive:4,cadpo:adaptive:4",
                   "--seeds", "0")
    assert list(res["compare"]["variants"]) == ["DPO", "ADPO adaptive m=4", "cDPO",
                                                "cADPO adaptive m=4"]
    weights = torch.load(tmp_path / "cdpo" / "weights.pt", weights_only=True)
    assert len(weights) == res["pairs"]["train_pairs"]
    assert sorted(p.name for p in (tmp_path / "cdpo").iterdir()) == ["negative", "positive",
                                                                    "weights.pt"]


def test_the_gpu_sweep_preset_at_cpu_size(tmp_path):
    """--preset arith_gpu is paper Table 3's sweep (11 variants x 3 seeds, one SFT model, one set
    of pairs); here at a CPU's size: the same preset with a tiny model, a few questions and the
    task's offline pairs (a tiny model solves none of these problems to sample from)."""
    cfg = train.parse(train.Config, ["--preset", "arith_gpu"], presets=True)
    plan, baseline = train.variants(cfg)
    labels = list(dict.fromkeys(label for label, _, _ in plan))
    assert labels == ["ADPO static k=1", "ADPO static k=2", "ADPO static k=4", "ADPO static k=8",
                      "DPO", "ADPO adaptive m=2", "ADPO adaptive m=16", "ADPO adaptive m=128",
                      "ADPO adaptive m=256", "IPO", "SimPO"]
    assert len(plan) == 33 and baseline == "DPO" and cfg.n_test >= 5000
    small = dict(n_layer=1, n_head=2, n_embd=32, n_train=300, n_test=30, sft_steps=20,
                 sft_batch_size=16, n_pair_questions=24, max_new_tokens=48, po_batch_size=8,
                 eval_batch_size=64, dtype="float32", compile="false", seeds="0,1",
                 compare="dpo,adpo:static:8,adpo:adaptive:256", pairs_source="offline")
    res = train.main(["--preset", "arith_gpu", "--out_dir", str(tmp_path / "run"),
                      *[x for k, v in small.items() for x in (f"--{k}", str(v))]])
    assert list(res["compare"]["variants"]) == ["ADPO static k=8", "DPO", "ADPO adaptive m=256"]
    assert res["compare"]["n_test"] == 30
