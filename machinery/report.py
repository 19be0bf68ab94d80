"""
A run's report, read back from its folders (train.py's stage 4): DIR/summary.json, the table the
default run prints (SFT and the preference stage, with the paired gain), curves.png, and for
--compare the comparison's compare.json, compare.md and compare.png. The statistics are eval.py's.
"""
import math
import os

import torch

from eval import (bootstrap, bootstrap_p, bootstrap_slope, breakdown_table, correctness_of,
                  detectable_effect, holm, percent)
from machinery.common import (atomic_write, markdown_table, need, print0, read_jsonl,
                              read_run_file, write_json)


def pyplot():
    """matplotlib.pyplot drawing to files only (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """A figure as a PNG, written atomically: a kill never leaves an empty or half a PNG."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    pyplot().close(fig)


def stage_report(folder):
    """What a stage folder holds: its last training step's metrics and its eval.json's numbers."""
    if not os.path.exists(os.path.join(folder, "eval.json")):
        return None
    saved = read_run_file(os.path.join(folder, "eval.json"))
    log = os.path.join(folder, "metrics.jsonl")
    last = read_jsonl(log, torn_tail=True)[-1:] if os.path.exists(log) else []
    untimed = {k: v for k, v in (last or [{}])[0].items() if k not in ("tokens_per_s", "mfu")}
    report = {"train": untimed, "test": saved["metrics"]}
    if "pairs" in saved:
        report["pairs"] = saved["pairs"]
    return report


def summary_table(summary, label):
    """SFT and the preference-optimised model on the same test questions, with the paired gain."""
    sft, po = summary["sft"]["test"], summary.get("po", {}).get("test")
    rows = [["SFT (reference)", percent(sft["accuracy"], sft["ci95"]), "-", "-", "-"]]
    if po:
        pairs = summary["po"].get("pairs", {})
        acc = [pairs.get(split, {}).get("rewards/accuracy", math.nan) for split in ("train", "val")]
        rows.append([label, percent(po["accuracy"], po["ci95"]),
                     percent(po["vs_sft"]["mean"], po["vs_sft"]["ci95"], "+"),
                     f"{acc[0]:.2f} / {acc[1]:.2f}",
                     f"{pairs.get('val', {}).get('rewards/margin', math.nan):.3f}"])
    header = ["model", "test accuracy % [95% CI]", "gain over SFT, points [paired 95% CI]",
              "reward acc. train / held-out pairs", "held-out margin"]
    return markdown_table(header, rows) + f"\n\nn = {sft['n']} test questions (greedy)"


# the panels of curves.png: (stage, metrics.jsonl key, what the y axis shows)
CURVES = (("sft", "loss", "SFT loss (NLL per response token)"),
          ("po", "loss", "preference loss (per pair)"),
          ("po", "rewards/accuracy", "reward accuracy (chosen > rejected)"),
          ("po", "rewards/margin", "reward margin (chosen − rejected)"))


def smoothed(values):
    """An exponential moving average (debiased, as TensorBoard's) over about 5 % of the steps:
    a per-step curve is the noise of one batch."""
    weight = 1 - 1 / max(1.0, 0.05 * len(values))
    out, average = [], 0.0
    for i, v in enumerate(values, 1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight ** i))
    return out


def plot_curves(out_dir):
    """Training curves of the run -> DIR/curves.png: each stage's per-step metric faint, its
    smoothed curve over it, and on the reward panels the held-out pairs before (the reference
    against itself) and after training."""
    logs = {n: read_jsonl(os.path.join(out_dir, n, "metrics.jsonl"), torn_tail=True)
            for n in ("sft", "po") if os.path.exists(os.path.join(out_dir, n, "metrics.jsonl"))}
    panels = [(n, k, label) for n, k, label in CURVES if logs.get(n) and k in logs[n][0]]
    if not panels:
        return
    report = stage_report(os.path.join(out_dir, "po")) or {}
    held_out = report.get("pairs", {})
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (n, k, label) in zip(axes[0], panels):
        steps = [m["step"] for m in logs[n]]
        values = [m[k] for m in logs[n]]
        ax.plot(steps, values, color="tab:blue", alpha=0.25, lw=1, label="per step")
        ax.plot(steps, smoothed(values), color="tab:blue", lw=2, label="smoothed")
        if k.startswith("rewards/") and "val" in held_out:
            before, after = held_out["val_before"][k], held_out["val"][k]
            ax.plot([0, steps[-1]], [before, after], "o", color="tab:orange",
                    label="held-out pairs: before, after")
        ax.set_title(f"{n}: {k}")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, os.path.join(out_dir, "curves.png"))


# what the CIs of a comparison cover, by how its runs differ (compare.json's "scope")
SCOPES = {
    "pipeline": "every run is a seed of the whole pipeline (SFT, pairs, preference stage): CIs "
                "cover the seeds' spread and the questions' noise",
    "preference": "the runs share one SFT model and one set of pairs and differ in the preference "
                  "stage's seed: CIs cover that seed and the questions' noise, not the spread of "
                  "the whole pipeline (--pipeline_seeds)",
    "single": "one run of each: CIs cover the questions' noise only, not a seed's "
              "(--pipeline_seeds 0,1,2 runs the whole pipeline per seed)",
}


def lengths_of(folder):
    """The length axis of a stage's test questions: ("steps", [each one's]) for a worked
    solution's steps (arith, GSM8K), ("level", [...]) for MATH's levels; None when they have
    neither, or all the same length."""
    records = read_run_file(os.path.join(folder, "eval.json"))["records"]
    for axis in ("steps", "level"):
        lengths = [r.get(axis) for r in records]
        if None not in lengths and len(set(lengths)) > 1:
            return axis, lengths
    return None


def paired_stats(correct, base):
    """A variant's (runs, N) 0/1 answers against the baseline's, the same questions and runs
    matched one to one: its mean accuracy with a CI, and the paired difference (mean, CI,
    bootstrap p-value, between-run spread, the effect the design detects at 80 % power)."""
    mean_diff, ci_diff = bootstrap(correct, base)
    per_run = (correct - base).mean(1)                                        # (runs,)
    return {"accuracy": correct.mean(1).tolist(), "ci95": bootstrap(correct)[1],
            "diff_vs_baseline": {
                "mean": mean_diff, "ci95": ci_diff, "per_run": per_run.tolist(),
                "spread": float(per_run.std(ddof=1)) if len(per_run) > 1 else None,
                "p": bootstrap_p(correct, base), "detectable": detectable_effect(correct, base)}}


def compare_stats(runs, baseline, sft_folders, scope="preference"):
    """runs: {label: [stage folder per run]}; sft_folders: the SFT folder of each run (one per
    pipeline seed, or the shared one repeated) -> compare.json's numbers: per variant its
    accuracy per run with the CI of its mean, its gain over its SFT model, and its paired
    difference with the baseline: CI, p-value, Holm's adjustment over the k variants,
    between-run spread and detectable effect; then the same per length bucket."""
    questions, sft = correctness_of(sft_folders)
    _, base = correctness_of(runs[baseline])
    axis, lengths = lengths_of(sft_folders[0]) or (None, None)
    variants = {}
    for label, folders in runs.items():
        _, correct = correctness_of([sft_folders[0], *folders])
        correct = correct[1:]                                                 # (runs, N)
        need(correct.shape == base.shape, f"--compare: {label} has {len(folders)} runs, the "
                                          f"baseline {baseline} {len(base)} (expected one a seed)")
        variants[label] = paired_stats(correct, base)
        variants[label]["vs_sft"] = dict(zip(("mean", "ci95"), bootstrap(correct, sft)))
        val = [(stage_report(f).get("pairs") or {}).get("val", {}) for f in folders]
        variants[label]["val_reward_accuracy"] = [v.get("rewards/accuracy") for v in val]
        # how the preferred responses' log-likelihood moved from the reference's (held out)
        variants[label]["val_chosen_vs_ref"] = [v.get("logps/chosen_vs_ref") for v in val]
        if lengths:
            variants[label]["by_length"] = {
                str(v): paired_stats(correct[:, ix], base[:, ix])
                for v, ix in length_buckets(lengths).items()}
            # does the difference grow with the length? one slope per variant, not one CI a cell
            slope, ci, p = bootstrap_slope(correct, base, lengths)
            variants[label]["length_slope"] = {"per_unit": slope, "ci95": ci, "p": p}
    others = [label for label in variants if label != baseline]
    for key in ("diff_vs_baseline", "length_slope"):  # Holm over the k variants, per question
        if lengths or key == "diff_vs_baseline":
            adjusted = holm([variants[label][key]["p"] for label in others])
            for label, p in zip(others, adjusted):
                variants[label][key]["p_holm"] = p
    stats = {"baseline": baseline, "n_test": len(questions), "runs": len(sft), "scope": scope,
             "sft": dict(zip(("accuracy", "ci95"), bootstrap(sft))), "variants": variants}
    if lengths:
        stats["length_axis"] = axis
        stats["n_by_length"] = {str(v): len(ix) for v, ix in length_buckets(lengths).items()}
    return stats


def length_buckets(lengths):
    """{length: the indices of its questions}, shortest first."""
    buckets = {}
    for i, v in enumerate(lengths):
        buckets.setdefault(v, []).append(i)
    return dict(sorted(buckets.items()))


def report_comparison(out_dir, stats):
    """compare.json (what scripts read), compare.md and compare.png: the same numbers."""
    write_json(os.path.join(out_dir, "compare.json"), stats)
    table = comparison_table(stats)
    length = length_table(stats)
    text = table + ("\n\n" + length if length else "")
    atomic_write(os.path.join(out_dir, "compare.md"), lambda f: f.write((text + "\n").encode()))
    plot_comparison(stats, os.path.join(out_dir, "compare.png"))
    return text


def comparison_table(stats):
    """The variants against the baseline: accuracy, paired difference with its CI, Holm-adjusted
    p-value and between-run spread; then what the design could have seen and what it covers."""
    base = stats["baseline"]
    rows = []
    if "SFT" not in stats["variants"]:  # (without --compare the SFT model is the baseline)
        rows.append(["SFT (reference)", "-", percent(stats["sft"]["accuracy"],
                                                     stats["sft"]["ci95"]), *["-"] * 6])
    for label, v in stats["variants"].items():
        mean = sum(v["accuracy"]) / len(v["accuracy"])
        diff = v["diff_vs_baseline"]
        val = [a for a in v["val_reward_accuracy"] if a is not None]
        drift = [d for d in v.get("val_chosen_vs_ref", []) if d is not None]
        rows.append([label, " / ".join(f"{100 * a:.1f}" for a in v["accuracy"]),
                     percent(mean, v["ci95"]),
                     "(baseline)" if label == base else percent(diff["mean"], diff["ci95"], "+"),
                     "-" if label == base else f"{diff['p_holm']:.3f}",
                     "-" if diff["spread"] is None else f"{100 * diff['spread']:.1f}",
                     "-" if label == base else f"{100 * diff['detectable']:.1f}",
                     f"{100 * sum(val) / len(val):.1f}" if val else "-",
                     f"{sum(drift) / len(drift):+.2f}" if drift else "-"])
    header = ["method", "accuracy % per run", "mean accuracy % [95% CI]",
              f"vs {base}, points [paired 95% CI]", "p (Holm)", "spread between runs, points",
              "detectable, points", "held-out reward acc. %",
              "held-out log πθ(y_w) − log πref(y_w)"]
    return markdown_table(header, rows) + "\n\n" + comparison_notes(stats)


def comparison_notes(stats):
    """What a reader needs beside the table: n and runs, what the CIs cover, how many false alarms
    chance alone gives with k comparisons, which survive Holm, and the detectable effect."""
    base = stats["baseline"]
    others = {k: v["diff_vs_baseline"] for k, v in stats["variants"].items() if k != base}
    k = len(others)
    found = [label for label, d in others.items() if d["p_holm"] <= 0.05]
    lines = [f"n = {stats['n_test']} test questions, the same for every run (greedy); "
             f"{stats['runs']} run(s) per variant: {SCOPES[stats['scope']]}."]
    if k:
        # each variant's own: one whose seeds disagree (a collapse on one seed) sees less
        ranked = sorted(others, key=lambda label: others[label]["detectable"])
        sizes = [f"{100 * others[label]['detectable']:.1f} ({label})"
                 for label in dict.fromkeys([ranked[0], ranked[-1]])]
        seen = (f"{' to '.join(sizes)} points: a null result rules out differences of that "
                f"size for its variant, not smaller ones" if others[ranked[-1]]["detectable"] else
                "not estimable: no question was answered differently")
        lines.append(
            f"{k} comparison(s) with {base} at 95 %: {0.05 * k:.2f} false alarm(s) expected by "
            f"chance alone; after Holm's correction (family-wise 5 %) "
            + (f"{len(found)} differ: {', '.join(found)}" if found else "none differs")
            + f". Detectable effect (80 % power, 5 % two-sided, from the observed per-question "
              f"discordance and the spread between runs; the `detectable` column): {seen}.")
    return "\n".join(lines)


def length_table(stats):
    """Per length bucket: n, the baseline's accuracy, and each variant's paired difference with
    it [95 % CI]; then each variant's slope of that difference per unit of length, the one test
    of "does it grow with length" ('' without a length axis)."""
    if "length_axis" not in stats:
        return ""
    base = stats["baseline"]
    others = [label for label in stats["variants"] if label != base]
    rows = []
    for v, n in stats["n_by_length"].items():
        at = {label: stats["variants"][label]["by_length"][v] for label in stats["variants"]}
        row = [v, n, f"{100 * sum(at[base]['accuracy']) / len(at[base]['accuracy']):.1f}"]
        row += [percent(at[label]["diff_vs_baseline"]["mean"],
                        at[label]["diff_vs_baseline"]["ci95"], "+") for label in others]
        rows.append(row)
    slopes = [stats["variants"][label]["length_slope"] for label in others]
    rows.append([f"slope per {stats['length_axis'].rstrip('s')} (p Holm)", "", "",
                 *(f"{percent(s['per_unit'], s['ci95'], '+')} ({s['p_holm']:.3f})"
                   for s in slopes)])
    header = [stats["length_axis"], "n", f"{base} accuracy %",
              *(f"{label} vs {base}, points [95% CI]" for label in others)]
    cells = len(others) * len(stats["n_by_length"])
    return (f"By length ({stats['length_axis']} of the worked solution):\n\n"
            + markdown_table(header, rows)
            + f"\n\n{cells} cells at 95 %: about {0.05 * cells:.1f} exclude zero by chance alone; "
              f"the slope (least squares of the per-question difference on the length, "
              f"bootstrapped like the rest, Holm-adjusted over the {len(others)} variants) is the "
              f"one test of a trend.")


def plot_comparison(stats, path):
    """Accuracy with its 95 % CI per variant, in the order of compare.json (Table 3's: static k,
    then adaptive m), with the SFT model's and the baseline's accuracy as lines; with a length
    axis, beside it each variant's paired difference with the baseline per length bucket."""
    plt = pyplot()
    labels = list(stats["variants"])
    means = [100 * sum(v["accuracy"]) / len(v["accuracy"]) for v in stats["variants"].values()]
    cis = [[100 * c for c in v["ci95"]] for v in stats["variants"].values()]
    err = [[m - lo for m, (lo, _) in zip(means, cis)], [hi - m for m, (_, hi) in zip(means, cis)]]
    panels = 2 if "length_axis" in stats else 1
    fig, axes = plt.subplots(1, panels, figsize=(0.9 * len(labels) + 2.5 + 5 * (panels - 1), 3.8),
                             squeeze=False)
    ax = axes[0][0]
    ax.errorbar(range(len(labels)), means, yerr=err, fmt="o", capsize=4, label="95% CI")
    ax.axhline(100 * stats["sft"]["accuracy"], color="gray", ls="--", label="SFT")
    base = stats["baseline"]
    ax.axhline(means[labels.index(base)], color="tab:red", ls=":", label=base)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"n = {stats['n_test']} test questions, {stats['runs']} run(s) each")
    ax.legend(fontsize=8)
    if panels == 2:
        plot_by_length(axes[0][1], stats)
    fig.tight_layout()
    save_figure(fig, path)


def plot_by_length(ax, stats):
    """Each variant's paired difference with the baseline per length bucket, with its 95 % CI
    (the variants side by side within a bucket)."""
    base = stats["baseline"]
    others = [label for label in stats["variants"] if label != base]
    buckets = list(stats["n_by_length"])
    for j, label in enumerate(others):
        diffs = [stats["variants"][label]["by_length"][v]["diff_vs_baseline"] for v in buckets]
        x = [i + 0.6 * (j + 0.5) / len(others) - 0.3 for i in range(len(buckets))]
        y = [100 * d["mean"] for d in diffs]
        err = [[100 * (d["mean"] - d["ci95"][0]) for d in diffs],
               [100 * (d["ci95"][1] - d["mean"]) for d in diffs]]
        slope = stats["variants"][label]["length_slope"]
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, ms=4, lw=1,
                    label=f"{label} (slope {percent(slope['per_unit'], slope['ci95'], '+')})")
    ax.axhline(0, color="tab:red", ls=":", lw=1)
    ax.set_xticks(range(len(buckets)),
                  [f"{v}\n(n={stats['n_by_length'][v]})" for v in buckets])
    ax.set_xlabel(f"{stats['length_axis']} of the worked solution")
    ax.set_ylabel(f"vs {base}, points [95% CI]")
    ax.legend(fontsize=7)


def report_run(out_dir, plan, baseline, run, wall_time_s, config):
    """4. DIR/summary.json (config: this command's, whose --compare, --seeds... may differ from the
    run's first; device; every stage's numbers read from its folder) and the tables and plots:
    the default run's (PO vs SFT), or the comparison's (--compare)."""
    summary = {"config": config, "device": run.device,
               "dtype": run.dtype, "torch": torch.__version__, "wall_time_s": wall_time_s}
    sft_folder = os.path.join(out_dir, "sft")
    summary["sft"] = stage_report(sft_folder)
    if summary["sft"]:
        summary["sft"]["test"]["ci95"] = bootstrap(correctness_of([sft_folder])[1])[1]
    if os.path.exists(os.path.join(out_dir, "pairs", "stats.json")):
        summary["pairs"] = read_run_file(os.path.join(out_dir, "pairs", "stats.json"))
    done = all(os.path.exists(os.path.join(folder, "eval.json")) for _, _, folder in plan)
    runs = runs_of(plan)
    label, _, folder = plan[0]
    if os.path.basename(folder) == "po" and done:
        summary["po"] = stage_report(folder)
        _, (sft, po) = correctness_of([sft_folder, folder])
        summary["po"]["test"]["ci95"] = bootstrap(po)[1]
        summary["po"]["test"]["vs_sft"] = dict(zip(("mean", "ci95"), bootstrap(po, sft)))
        plot_curves(out_dir)
        print0("\n" + summary_table(summary, label) + "; " + SCOPES["single"])
        breakdown = breakdown_table({"SFT": summary["sft"]["test"], label: summary["po"]["test"]})
        if breakdown:  # MATH: by subject and by level; a task of many lengths: by steps
            print0("\n" + breakdown)
    elif done:
        seeds = len(next(iter(runs.values())))
        summary["compare"] = compare_stats(runs, baseline, [sft_folder] * seeds,
                                           "preference" if seeds > 1 else "single")
        print0("\n" + report_comparison(out_dir, summary["compare"]))
    elif summary["sft"]:
        print0("\n" + summary_table(summary, label))
    write_json(os.path.join(out_dir, "summary.json"), {k: v for k, v in summary.items() if v})


def runs_of(plan):
    """{label: the folders of its runs (one per seed)}, in the plan's order."""
    runs = {}
    for label, _, folder in plan:
        runs.setdefault(label, []).append(folder)
    return runs


def report_pipelines(out_dir, pipelines, run, wall_time_s, config):
    """4. (--pipeline_seeds) The runs of every seed of the whole pipeline, pooled: DIR/summary.json
    and DIR/compare.{json,md,png}, each variant against the baseline (without --compare: the
    preference stage against its SFT model), the CIs over the seeds and the questions.
    pipelines: [(run folder, plan, baseline)] of the seeds, in --pipeline_seeds' order."""
    summary = {"config": config, "device": run.device, "dtype": run.dtype,
               "torch": torch.__version__, "wall_time_s": wall_time_s,
               "runs": [os.path.relpath(folder, out_dir) for folder, _, _ in pipelines]}
    done = all(os.path.exists(os.path.join(folder, "eval.json"))
               for _, plan, _ in pipelines for _, _, folder in plan)
    if done:
        runs = {}
        for _, plan, _ in pipelines:
            for label, seeded in runs_of(plan).items():
                runs.setdefault(label, []).extend(seeded)
        baseline = pipelines[0][2]
        sft = [os.path.join(folder, "sft") for folder, _, _ in pipelines]
        if baseline is None:  # no --compare: the preference stage against SFT
            baseline = "SFT"
            runs = {"SFT": sft, **runs}
        summary["compare"] = compare_stats(runs, baseline, sft, "pipeline")
        print0("\n" + report_comparison(out_dir, summary["compare"]))
    write_json(os.path.join(out_dir, "summary.json"), summary)
