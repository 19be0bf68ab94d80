"""--pipeline_seeds: the whole pipeline (SFT, pairs, every variant) once per seed, each seed a run
folder of its own, resumable, pooled in one report with the spread between seeds, Holm's
correction, the detectable effect and, on a task of many lengths, the length axis."""
import json
import os

import pytest

import train
from machinery.common import ConfigError, read_jsonl
from conftest import Died, die_at, tiny

pytestmark = pytest.mark.slow  # end to end: whole pipelines


def pipeline(out_dir, **over):
    # the arith task's offline pairs: a tiny SFT model of a few steps rarely finishes a right
    # answer, and its unfinished samples make no pairs (data.pairs_from_samples)
    flags = dict(pipeline_seeds="0,1", compare="dpo,adpo", arith_max_steps=3, n_test=12,
                 pairs_source="offline")
    return tiny(out_dir, **{**flags, **over})


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    return out, train.main(pipeline(out))


def test_each_seed_is_a_whole_pipeline_in_a_run_folder_of_its_own(pooled):
    out, _ = pooled
    records, losses = {}, {}
    for seed in (0, 1):
        folder = out / f"seed_{seed}"
        config = read(folder / "config.json")
        assert (config["seed"], config["seeds"], config["pipeline_seeds"]) == (seed, str(seed), "")
        assert config["out_dir"] == str(folder)
        for variant in ("dpo", "adpo_static_1"):
            assert (folder / "compare" / f"{variant}_s{seed}" / "eval.json").exists()
        records[seed] = read(folder / "sft" / "eval.json")["records"]
        losses[seed] = [m["loss"] for m in read_jsonl(folder / "sft" / "metrics.jsonl")]
    # another seed is another SFT model (its own init and data order) on the same questions
    assert [r["question"] for r in records[0]] == [r["question"] for r in records[1]]
    assert losses[0][0] != losses[1][0]


def test_a_seed_folder_is_the_run_of_its_seed(pooled):
    """`--seed 1 --out_dir DIR/seed_1` names the same run: it resumes, computing nothing."""
    out, _ = pooled
    folder = out / "seed_1"
    stamp = os.path.getmtime(folder / "compare" / "dpo_s1" / "eval.json")
    flags = pipeline(folder, pipeline_seeds="", seed=1, seeds="1")
    summary = train.main(flags)
    assert os.path.getmtime(folder / "compare" / "dpo_s1" / "eval.json") == stamp
    assert summary["compare"]["runs"] == 1 and summary["compare"]["scope"] == "single"


def test_the_pooled_report_reads_every_seed(pooled):
    out, summary = pooled
    stats = read(out / "compare.json")
    assert summary["compare"] == stats and summary["runs"] == ["seed_0", "seed_1"]
    assert stats["scope"] == "pipeline" and stats["runs"] == 2
    for seed in (0, 1):  # run s of each variant is seed s's
        seeded = read(out / f"seed_{seed}" / "summary.json")["compare"]["variants"]
        for label, v in stats["variants"].items():
            assert v["accuracy"][seed] == seeded[label]["accuracy"][0]
    adpo = stats["variants"]["ADPO static k=1"]["diff_vs_baseline"]
    assert adpo["per_run"] == pytest.approx(
        [a - b for a, b in zip(stats["variants"]["ADPO static k=1"]["accuracy"],
                               stats["variants"]["DPO"]["accuracy"])])
    for key in ("p", "p_holm", "spread", "detectable"):
        assert adpo[key] is not None, key
    text = (out / "compare.md").read_text()
    assert "seed of the whole pipeline" in text and "false alarm" in text
    assert "Detectable effect" in text and (out / "compare.png").stat().st_size > 0


def test_a_task_of_many_lengths_is_reported_by_length(pooled):
    out, _ = pooled
    stats = read(out / "compare.json")
    assert stats["length_axis"] == "steps"
    assert list(stats["n_by_length"]) == ["1", "2", "3"]
    assert sum(stats["n_by_length"].values()) == stats["n_test"]
    for label, v in stats["variants"].items():
        assert list(v["by_length"]) == ["1", "2", "3"], label
    slope = stats["variants"]["ADPO static k=1"]["length_slope"]  # the one test of a trend
    assert slope["ci95"][0] <= slope["per_unit"] <= slope["ci95"][1] and "p_holm" in slope
    text = (out / "compare.md").read_text()
    assert "By length (steps" in text and "slope per step" in text


def test_a_killed_pipeline_resumes_to_the_same_report(pooled, tmp_path, monkeypatch):
    out, _ = pooled
    with monkeypatch.context() as m:
        die_at(m, "compare/dpo_s0:3")  # seed 0, mid-way through its first variant
        with pytest.raises(Died):
            train.main(pipeline(tmp_path))
    assert not (tmp_path / "seed_1").exists()
    train.main(pipeline(tmp_path))
    assert read(tmp_path / "compare.json") == read(out / "compare.json")


def test_without_compare_the_pooled_gain_is_over_sft(tmp_path):
    summary = train.main(pipeline(tmp_path, compare="", pipeline_seeds="3"))
    stats = summary["compare"]
    assert stats["baseline"] == "SFT" and list(stats["variants"]) == ["SFT", "ADPO static k=1"]
    gain = stats["variants"]["ADPO static k=1"]["diff_vs_baseline"]["mean"]
    seed = read(tmp_path / "seed_3" / "summary.json")
    assert gain == pytest.approx(seed["po"]["test"]["vs_sft"]["mean"])


def test_seeds_and_pipeline_seeds_are_one_or_the_other(tmp_path):
    with pytest.raises(ConfigError, match="--seeds 0,1 with --pipeline_seeds 0,1: choose one"):
        train.main(pipeline(tmp_path, seeds="0,1"))
    with pytest.raises(ConfigError, match="--pipeline_seeds '0,1,0': seed 0 named twice"):
        train.main(pipeline(tmp_path, pipeline_seeds="0,1,0"))
    assert not os.listdir(tmp_path)  # refused before any work
