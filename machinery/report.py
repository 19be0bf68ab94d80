"""
A run's report, read back from its folders (train.py's stage 4): DIR/summary.json, the table the
default run prints (SFT and the preference stage, with the paired gain), curves.png, and for
--compare the comparison's compare.json, compare.md and compare.png. The statistics are eval.py's.
"""
import math
import os

import torch

from eval import bootstrap, breakdown_table, correctness_of, percent
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


def compare_stats(runs, baseline, sft_folder):
    """runs: {label: [stage folder per seed]} -> compare.json's numbers: per variant its accuracy
    per seed, the CI of its mean, and its paired difference with the baseline."""
    _, sft = correctness_of([sft_folder])
    _, base = correctness_of(runs[baseline])
    variants = {}
    for label, folders in runs.items():
        _, correct = correctness_of([sft_folder, *folders])
        correct = correct[1:]                                       # (seeds, N)
        need(correct.shape == base.shape, f"--compare: {label} has {len(folders)} runs, the "
                                          f"baseline {baseline} {len(base)} (expected one a seed)")
        mean_diff, ci_diff = bootstrap(correct, base)
        val = [(stage_report(f).get("pairs") or {}).get("val", {}) for f in folders]
        variants[label] = {"accuracy": correct.mean(1).tolist(), "ci95": bootstrap(correct)[1],
                           "diff_vs_baseline": {"mean": mean_diff, "ci95": ci_diff},
                           "val_reward_accuracy": [v.get("rewards/accuracy") for v in val]}
    return {"baseline": baseline, "n_test": int(base.shape[1]),
            "sft": dict(zip(("accuracy", "ci95"), bootstrap(sft))), "variants": variants}


def report_comparison(out_dir, stats):
    """compare.json (what scripts read), compare.md and compare.png: the same numbers."""
    base = stats["baseline"]
    rows = [["SFT (reference)", "-", percent(stats["sft"]["accuracy"], stats["sft"]["ci95"]), "-",
             "-"]]
    for label, v in stats["variants"].items():
        mean = sum(v["accuracy"]) / len(v["accuracy"])
        diff = v["diff_vs_baseline"]
        val = [a for a in v["val_reward_accuracy"] if a is not None]
        rows.append([label, " / ".join(f"{100 * a:.1f}" for a in v["accuracy"]),
                     percent(mean, v["ci95"]),
                     "(baseline)" if label == base else percent(diff["mean"], diff["ci95"], "+"),
                     f"{100 * sum(val) / len(val):.1f}" if val else "-"])
    header = ["method", "accuracy % per seed", "mean accuracy % [95% CI]",
              f"vs {base}, points [paired 95% CI]", "held-out reward acc. %"]
    table = markdown_table(header, rows) + (
        f"\n\nn = {stats['n_test']} test questions, the same for every run (greedy); CIs: "
        f"bootstrap over questions and seeds, paired for the differences")
    write_json(os.path.join(out_dir, "compare.json"), stats)
    atomic_write(os.path.join(out_dir, "compare.md"), lambda f: f.write((table + "\n").encode()))
    plot_comparison(stats, os.path.join(out_dir, "compare.png"))
    return table


def plot_comparison(stats, path):
    """Accuracy with its 95 % CI per variant, in the order of compare.json (Table 3's: static k,
    then adaptive m), with the SFT model's and the baseline's accuracy as lines."""
    plt = pyplot()
    labels = list(stats["variants"])
    means = [100 * sum(v["accuracy"]) / len(v["accuracy"]) for v in stats["variants"].values()]
    cis = [[100 * c for c in v["ci95"]] for v in stats["variants"].values()]
    err = [[m - lo for m, (lo, _) in zip(means, cis)], [hi - m for m, (_, hi) in zip(means, cis)]]
    fig, ax = plt.subplots(figsize=(0.9 * len(labels) + 2.5, 3.8))
    ax.errorbar(range(len(labels)), means, yerr=err, fmt="o", capsize=4, label="95% CI")
    ax.axhline(100 * stats["sft"]["accuracy"], color="gray", ls="--", label="SFT")
    base = stats["baseline"]
    ax.axhline(means[labels.index(base)], color="tab:red", ls=":", label=base)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"n = {stats['n_test']} test questions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


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
    runs = {}  # label -> the folders of its runs (one per seed), in the plan's order
    for label, _, folder in plan:
        runs.setdefault(label, []).append(folder)
    label, _, folder = plan[0]
    if os.path.basename(folder) == "po" and done:
        summary["po"] = stage_report(folder)
        _, (sft, po) = correctness_of([sft_folder, folder])
        summary["po"]["test"]["ci95"] = bootstrap(po)[1]
        summary["po"]["test"]["vs_sft"] = dict(zip(("mean", "ci95"), bootstrap(po, sft)))
        plot_curves(out_dir)
        print0("\n" + summary_table(summary, label))
        breakdown = breakdown_table({"SFT": summary["sft"]["test"], label: summary["po"]["test"]})
        if breakdown:  # MATH: by subject and by level
            print0("\n" + breakdown)
    elif done:
        summary["compare"] = compare_stats(runs, baseline, sft_folder)
        print0("\n" + report_comparison(out_dir, summary["compare"]))
    elif summary["sft"]:
        print0("\n" + summary_table(summary, label))
    write_json(os.path.join(out_dir, "summary.json"), {k: v for k, v in summary.items() if v})
