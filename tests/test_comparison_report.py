"""eval.py's statistics on hand-made records: the paired bootstrap and the comparison report."""
import json
import math

import numpy as np
import pytest

from machinery import report
from eval import bootstrap


def test_identical_models_differ_by_exactly_zero():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, size=500)
    mean, ci = bootstrap(a, a)
    assert mean == 0 and ci == [0.0, 0.0]
    seeds = rng.integers(0, 2, size=(3, 500))
    assert bootstrap(seeds, seeds) == (0.0, [0.0, 0.0])


def test_right_where_the_other_is_wrong_is_a_gain_above_zero():
    base = np.array([1, 0] * 100)  # 50 %
    better = np.ones(200)          # right on every question the baseline got wrong
    mean, (lo, hi) = bootstrap(better, base)
    assert mean == pytest.approx(0.5) and 0 < lo <= mean <= hi
    mean, (lo, hi) = bootstrap(base, better)  # and the other way round
    assert mean == pytest.approx(-0.5) and lo <= mean <= hi < 0


def test_pairing_sees_a_small_consistent_gain_that_two_separate_cis_cannot():
    """The same questions before and after: 20 more right, none lost, on 1000 questions. The two
    accuracies' CIs overlap, but the paired difference is clearly above zero."""
    rng = np.random.default_rng(1)
    before = (rng.random(1000) < 0.4).astype(float)
    after = before.copy()
    after[np.flatnonzero(before == 0)[:20]] = 1
    (_, ci_before), (_, ci_after) = bootstrap(before), bootstrap(after)
    assert ci_after[0] < ci_before[1]  # separately: not distinguishable
    mean, (lo, hi) = bootstrap(after, before)
    assert mean == pytest.approx(0.02) and lo > 0


def test_the_ci_of_an_accuracy_has_the_binomial_width():
    x = np.array([1, 0] * 2000)  # p = 0.5, n = 4000: 95 % half-width 1.96 * sqrt(p(1-p)/n)
    mean, (lo, hi) = bootstrap(x, n_boot=4000)
    half = 1.96 * math.sqrt(0.25 / 4000)
    assert mean == 0.5 and (hi - lo) / 2 == pytest.approx(half, rel=0.1)


def test_seeds_widen_the_ci():
    """Three seeds that disagree by 10 points: the seed-to-seed spread enters the CI."""
    base = np.zeros((3, 1000))
    runs = np.zeros((3, 1000))
    for s, p in enumerate((0.3, 0.4, 0.5)):
        runs[s, :int(p * 1000)] = 1
    _, (lo, hi) = bootstrap(runs, base)
    _, (lo1, hi1) = bootstrap(runs[1:2], base[1:2])
    assert hi - lo > 2 * (hi1 - lo1)
    assert lo < 0.4 < hi


def stage(folder, correct, questions=None):
    folder.mkdir(parents=True)
    questions = questions or [f"q{i}" for i in range(len(correct))]
    records = [dict(question=q, correct=bool(c)) for q, c in zip(questions, correct)]
    n = len(records)
    metrics = dict(accuracy=sum(correct) / n, correct=sum(correct), n=n)
    (folder / "eval.json").write_text(json.dumps(dict(metrics=metrics, records=records)))
    return str(folder)


def test_compare_stats_are_consistent(tmp_path):
    rng = np.random.default_rng(2)
    sft = stage(tmp_path / "sft", rng.integers(0, 2, 300).tolist())
    runs = {label: [stage(tmp_path / f"{label}_s{s}", rng.integers(0, 2, 300).tolist())
                    for s in range(2)] for label in ("DPO", "ADPO adaptive m=4")}
    stats = report.compare_stats(runs, "DPO", [sft, sft])
    assert stats["baseline"] == "DPO" and stats["n_test"] == 300
    base = stats["variants"]["DPO"]
    for label, v in stats["variants"].items():
        mean = sum(v["accuracy"]) / 2
        assert v["ci95"][0] <= mean <= v["ci95"][1]
        d = v["diff_vs_baseline"]
        assert d["mean"] == pytest.approx(mean - sum(base["accuracy"]) / 2)
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    same = base["diff_vs_baseline"]  # the baseline against itself: no difference at all
    assert (same["mean"], same["ci95"], same["p"], same["detectable"]) == (0.0, [0.0, 0.0], 1.0, 0.0)
    table = report.report_comparison(str(tmp_path), stats)
    assert "(baseline)" in table and json.loads((tmp_path / "compare.json").read_text()) == stats
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_runs_on_other_questions_cannot_be_paired(tmp_path):
    sft = stage(tmp_path / "sft", [1, 0, 1])
    other = stage(tmp_path / "other", [1, 0, 1], questions=["a", "b", "c"])
    with pytest.raises(ValueError, match="scored other test questions"):
        report.compare_stats({"DPO": [other]}, "DPO", [sft])
