"""The statistics a comparison is read with (eval.py): the two-level bootstrap against a slow
reference written from its definition, Holm's correction against a hand-worked example, the
bootstrap p-value, and the effect a design can detect."""
import numpy as np
import pytest

from eval import (bootstrap, bootstrap_means, bootstrap_p, bootstrap_slope, detectable_effect,
                  holm)


def slow_bootstrap(x, n_boot, seed, levels=("runs", "questions")):
    """The definition, one replicate at a time: draw the runs with replacement, then the
    questions with replacement, the same questions for every drawn run; the replicate is the
    mean of the drawn cells. levels: which of the two are redrawn (the other kept as it is)."""
    rng = np.random.default_rng(seed)
    S, N = x.shape
    means = []
    for _ in range(n_boot):
        runs = rng.integers(S, size=S) if "runs" in levels else np.arange(S)
        questions = rng.integers(N, size=N) if "questions" in levels else np.arange(N)
        means.append(x[runs][:, questions].mean())
    return np.percentile(means, [2.5, 97.5])


def two_level_data(seed=0, S=4, N=400):
    """Paired differences with all three parts a comparison has: a per-seed shift (the pipeline),
    a per-question effect that every seed shares (some questions are hard for both models), and
    noise."""
    rng = np.random.default_rng(seed)
    item = rng.normal(0, 0.8, N)                   # shared by every seed
    shift = np.array([0.06, -0.04, 0.05, -0.07])[:S]  # the seeds disagree
    return shift[:, None] + item[None, :] + rng.normal(0, 0.5, (S, N))


def test_the_bootstrap_resamples_runs_then_questions_as_its_definition_does():
    x = two_level_data()
    fast = np.percentile(bootstrap_means(x, n_boot=4000, seed=1), [2.5, 97.5])
    slow = slow_bootstrap(x, n_boot=4000, seed=2)
    width = slow[1] - slow[0]
    assert np.abs(fast - slow).max() < 0.08 * width  # Monte-Carlo error of 4000 replicates
    # either level alone gives a CI too narrow to pass the check above: it can fail
    for level in ("runs", "questions"):
        lo, hi = slow_bootstrap(x, n_boot=2000, seed=3, levels=(level,))
        assert hi - lo < 0.8 * width, level


def test_the_questions_are_redrawn_once_for_every_run():
    """Questions that are hard for every seed move every seed's mean together: drawing them anew
    per seed would average that away and narrow the CI."""
    rng = np.random.default_rng(4)
    item = rng.normal(0, 1.0, 300)
    x = np.repeat(item[None, :], 5, axis=0) + rng.normal(0, 0.1, (5, 300))
    lo, hi = np.percentile(bootstrap_means(x, n_boot=4000, seed=5), [2.5, 97.5])
    shared = slow_bootstrap(x, n_boot=2000, seed=6)
    independent = []
    draw = np.random.default_rng(7)
    for _ in range(2000):
        runs = draw.integers(5, size=5)
        independent.append(np.mean([x[s][draw.integers(300, size=300)].mean() for s in runs]))
    narrow = np.percentile(independent, [2.5, 97.5])
    assert abs((hi - lo) - (shared[1] - shared[0])) < 0.1 * (shared[1] - shared[0])
    assert narrow[1] - narrow[0] < 0.6 * (hi - lo)


def test_two_thousand_replicates_are_the_bootstrap_the_reports_always_printed():
    """bootstrap_means draws 2000 replicates at a time: up to 2000 the draws (and so the CIs of
    every report before it) are those of one batch, and more replicates continue the stream."""
    x = two_level_data(S=3, N=200)
    rng = np.random.default_rng(0)
    seeds = rng.multinomial(3, np.full(3, 1 / 3), size=2000) / 3
    questions = rng.multinomial(200, np.full(200, 1 / 200), size=2000) / 200
    assert np.array_equal(bootstrap_means(x, 2000, seed=0), ((seeds @ x) * questions).sum(-1))
    assert np.array_equal(bootstrap_means(x, 5000, seed=0)[:2000], bootstrap_means(x, 2000, 0))


def test_holm_adjusts_as_the_hand_worked_example():
    """p = (0.01, 0.04, 0.03, 0.20), k = 4. Sorted: 0.01·4 = 0.04; 0.03·3 = 0.09; 0.04·2 = 0.08,
    raised to the 0.09 before it (step-down: never below an earlier one); 0.20·1 = 0.20. At 5 %
    only the first survives, where 0.04 and 0.03 alone would pass uncorrected."""
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.003]) == [0.003]                        # one comparison: nothing to correct
    assert holm([]) == []


def test_the_bootstrap_p_value_is_the_dual_of_its_ci():
    rng = np.random.default_rng(8)
    base = (rng.random((2, 2000)) < 0.3).astype(float)
    better = base.copy()
    better[:, np.flatnonzero(base[0] == 0)[:120]] = 1      # +6 points on both seeds
    same = base.copy()
    assert bootstrap_p(better, base) < 0.01 and bootstrap(better, base)[1][0] > 0
    assert bootstrap_p(same, base) == 1.0                   # every replicate is exactly 0
    noisy = base.copy()
    flip = rng.choice(2000, 200, replace=False)
    noisy[:, flip] = 1 - noisy[:, flip]                     # as many gained as lost, about
    p = bootstrap_p(noisy, base)
    lo, hi = bootstrap(noisy, base)[1]
    assert (p > 0.05) == (lo <= 0 <= hi)
    assert bootstrap_p(better, base, n_boot=999) >= 2 / 1000  # never 0: its Monte-Carlo floor


def test_the_detectable_effect_is_what_the_design_finds_four_times_in_five():
    """Simulate the design: one run per seed, N questions, a true gain of the detectable effect.
    The paired bootstrap's CI must exclude 0 in about 80 % of the simulated studies."""
    rng = np.random.default_rng(9)
    N, discordant = 800, 0.15  # 15 % of the questions change, won or lost, the gain tips them

    def study(gain):
        # each question: (baseline right, variant right) = (1, 1), (0, 0), (1, 0) or (0, 1)
        won, lost = (discordant + gain) / 2, (discordant - gain) / 2
        kind = rng.choice(4, size=N, p=[0.25, 0.6, lost, won])
        base = np.isin(kind, (0, 2)).astype(float)[None, :]
        other = np.isin(kind, (0, 3)).astype(float)[None, :]
        return other, base

    effect = detectable_effect(*study(0.0))
    assert 0.02 < effect < 0.1
    found = [bootstrap(*study(effect), n_boot=500, seed=i)[1][0] > 0 for i in range(60)]
    assert 0.6 <= np.mean(found) <= 0.95


def test_seeds_that_disagree_raise_the_detectable_effect():
    rng = np.random.default_rng(10)
    base = (rng.random((3, 1000)) < 0.3).astype(float)
    calm = base.copy()
    calm[:, :30] = 1                                   # the same +3 points on every seed
    wild = base.copy()
    wild[0, :150] = 1                                  # +15, 0, 0 points: the seed decides
    one = detectable_effect(calm[:1], base[:1])        # one run: the questions' noise only
    assert detectable_effect(calm, base) < one
    assert detectable_effect(wild, base) > 2 * detectable_effect(calm, base)


def test_the_length_slope_is_least_squares_and_its_ci_the_two_level_bootstrap():
    """A gain that grows by 2 points per step, on 3 runs of 2400 questions of 1 to 6 steps."""
    rng = np.random.default_rng(11)
    lengths = np.repeat(np.arange(1, 7), 400)
    base = (rng.random((3, 2400)) < 0.3).astype(float)
    better = base.copy()
    for s in range(3):
        gain = 0.02 * (lengths - 1)               # 0 points at one step, +10 at six
        better[s] = np.where(rng.random(2400) < gain, 1.0, base[s])
    slope, (lo, hi), p = bootstrap_slope(better, base, lengths)
    d = (better - base).mean(0)
    assert slope == pytest.approx(np.polyfit(lengths, d, 1)[0])
    assert lo < slope < hi and lo > 0 and p < 0.01
    # the slow reference: draw runs, then questions, fit the line, one replicate at a time
    draw = np.random.default_rng(12)
    slow = []
    for _ in range(1000):
        runs, questions = draw.integers(3, size=3), draw.integers(2400, size=2400)
        slow.append(np.polyfit(lengths[questions], (better - base)[runs][:, questions].mean(0),
                               1)[0])
    slow_lo, slow_hi = np.percentile(slow, [2.5, 97.5])
    assert abs(lo - slow_lo) < 0.15 * (slow_hi - slow_lo)
    assert abs(hi - slow_hi) < 0.15 * (slow_hi - slow_lo)
    flat, (flat_lo, flat_hi), _ = bootstrap_slope(base, base[::-1], lengths)
    assert flat_lo < 0 < flat_hi                  # no trend: a CI around 0
