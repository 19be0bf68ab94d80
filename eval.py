"""
Evaluate a checkpoint: greedy accuracy, maj@k, and preference metrics on pairs; and a run's report.

    python eval.py --ckpt out/default/po/ckpt.pt            # the run's own test set (config.json)
    python eval.py --ckpt out/default/po/ckpt.pt --maj_k 8  # + maj@8 (8 samples at temperature 0.7)
    python eval.py --ckpt out/default/po/ckpt.pt --n_test 5000  # more questions than the run used
    python eval.py --ckpt gpt2 --task gsm8k --n_test 200    # a hub model (or an HF folder), GSM8K
    python eval.py --ckpt out/default/po/ckpt.pt --pairs out/default/pairs/val.jsonl
                                                            # reward accuracy vs the run's SFT model

A checkpoint inside a run folder (DIR/sft/ckpt.pt, DIR/po/ckpt.pt, DIR/compare/<variant>/ckpt.pt) is
scored with the run's settings, read from DIR/config.json: the same test questions, the same
generation length, the same β and granularity; a flag you give overrides its setting, and a test
set that differs from the run's is said so. train.py calls the functions below, so a run's numbers
and this script's numbers come from the same code.
"""
import json
import math
import os
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from machinery.common import (ROOT, all_gather, atomic_write, barrier, changed_flags, cli,
                    content_id, file_digest, markdown_table, need, parse, pin_inputs, print0,
                    process_rank, progress_bar, read_json, read_jsonl, read_run_file, setup,
                    write_json, write_jsonl)
from machinery.checkpoint import load_gpt, load_model, load_settings, load_tokenizer, model_files
from machinery.config import Settings, validate_settings
from data import (encode_pairs, extract_answer, grader, is_correct, load_pairs, load_split,
                  preference_batch, render_pairs)
from loss import eos_padded, metric_granularity, preference_metrics
from machinery.parallel import place
from machinery.tables import local_files
from machinery.tokenizer import encode_prompt
from machinery import tracking

# -----------------------------------------------------------------------------
# generation and accuracy


@torch.no_grad()
def complete(model, tok, prompts, *, n=1, max_new_tokens=128, temperature=0.0, top_k=None,
             top_p=None, seed=0, batch_size=64, ctx=nullcontext(), desc="generating",
             progress=True):
    """n completions (strings, EOS removed) for every prompt string -> (list (len(prompts)) of
    lists (n), list of bools: the prompt was longer than the context leaves room for and was cut,
    keeping its end). Work is cut into fixed batches of (prompt, sample) jobs and batch j is
    sampled with seed `seed + j`, so the result does not depend on how many batches ran before."""
    eot = tok.eot_token
    room = model.config.block_size - max_new_tokens  # a prompt longer than this keeps its end
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                         f"model's context of {model.config.block_size} tokens")
    encoded = [encode_prompt(tok, p) for p in prompts]
    cut = [len(ids) > room for ids in encoded]
    encoded = [ids[-room:] for ids in encoded]
    jobs = [i for i in range(len(prompts)) for _ in range(n)]
    out = [[] for _ in prompts]
    batches = range(0, len(jobs), batch_size)
    for j, b0 in enumerate(progress_bar(batches, desc, unit="batch", disable=not progress,
                                        leave=False)):
        chunk = jobs[b0:b0 + batch_size]
        with ctx:
            new = model.generate([encoded[i] for i in chunk], max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p,
                                 eos_token_id=eot,
                                 seed=seed + j)
        for i, ids in zip(chunk, new):
            out[i].append(tok.decode(ids[:-1] if ids and ids[-1] == eot else ids))
    return out, cut


def majority_answer(completions, kind="gsm8k"):
    """(The most frequent extracted answer among completions (first seen wins ties), or None;
    the first completion giving it, which is graded). decision: MATH's answers vote as the text
    math-verify extracts, so \\frac12 and 0.5 are two votes."""
    answers = [extract_answer(c, kind) for c in completions]
    known = [a for a in answers if a is not None]
    if not known:
        return None, None
    top = Counter(known).most_common(1)[0][0]
    return top, completions[answers.index(top)]


def grade(model, tok, examples, *, max_new_tokens=128, batch_size=64, maj_k=1, temperature=0.7,
          seed=0, ctx=nullcontext(), progress=True):
    """One record per example (dicts with 'prompt' and gold 'answer'): question, greedy
    completion, its extracted answer `pred`, `gold`, `correct`, `prompt_cut` (the prompt did not
    fit the context and kept its end), MATH's subject and level where the example has them; and
    `maj`, `maj_correct` when maj_k > 1. Each example is graded by its kind (data.grader)."""
    prompts = [ex["prompt"] for ex in examples]
    greedy, cut = complete(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                           batch_size=batch_size, ctx=ctx, desc="eval greedy", progress=progress)
    records = [dict(question=ex.get("question", ex["prompt"]), completion=c,
                    pred=extract_answer(c, grader(ex)), gold=ex["answer"],
                    correct=is_correct(c, ex["answer"], grader(ex)), prompt_cut=k,
                    **{key: ex[key] for key in BREAKDOWNS if key in ex})
               for ex, (c,), k in zip(examples, greedy, cut)]
    if maj_k > 1:
        samples, _ = complete(model, tok, prompts, n=maj_k, max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed, batch_size=batch_size, ctx=ctx,
                           desc=f"eval maj@{maj_k}", progress=progress)
        for r, s, ex in zip(records, samples, examples):
            r["maj"], voted = majority_answer(s, grader(ex))
            r["maj_correct"] = voted is not None and is_correct(voted, ex["answer"], grader(ex))
    return records


BREAKDOWNS = ("subject", "level")  # what MATH's examples carry: accuracy per value as well


def accuracy_of(records, maj_k=1):
    """{accuracy, correct, n} (+ maj@k) counted from graded records; with MATH's subjects and
    levels, by_subject and by_level: {value: {accuracy, correct, n}}."""
    n = len(records)
    correct = sum(r["correct"] for r in records)
    metrics = {"accuracy": correct / max(n, 1), "correct": correct, "n": n,
               "prompts_cut": sum(r["prompt_cut"] for r in records)}
    if maj_k > 1:
        metrics[f"maj@{maj_k}"] = sum(r["maj_correct"] for r in records) / max(n, 1)
    for key in BREAKDOWNS:
        groups = {}
        for r in records:
            if key in r:
                groups.setdefault(r[key], []).append(r["correct"])
        if groups:  # (in sorted order: levels 1..5, subjects alphabetically)
            metrics[f"by_{key}"] = {str(v): {"accuracy": sum(c) / len(c), "correct": sum(c),
                                             "n": len(c)} for v, c in sorted(groups.items())}
    return metrics


def breakdown_table(tests):
    """Per-subject and per-level accuracy of each model ({label: test metrics}) side by side,
    '' when the task has none (only MATH's does)."""
    tables = []
    for key in BREAKDOWNS:
        found = [m[f"by_{key}"] for m in tests.values() if f"by_{key}" in m]
        if not found:
            continue
        rows = [[value, found[0][value]["n"],
                 *(f"{100 * m[f'by_{key}'][value]['accuracy']:.1f}" for m in tests.values())]
                for value in found[0]]
        tables.append(markdown_table([key, "n", *(f"{label} %" for label in tests)], rows))
    return "\n\n".join(tables)


def evaluate_test(model, tok, cfg, run):
    """Greedy accuracy (and maj@k) on the test split cfg describes, the questions split over the
    ranks -> (metrics, records in test order). cfg: a train.py Config or an EvalConfig."""
    test = load_split(cfg, getattr(cfg, "split", "test"), tok)
    mine = grade(model, tok, test[run.rank::run.world], max_new_tokens=cfg.max_new_tokens,
                 batch_size=cfg.eval_batch_size, maj_k=cfg.maj_k, seed=cfg.seed, ctx=run.ctx,
                 progress=run.master)
    records = [None] * len(test)
    for rank, part in enumerate(all_gather(mine)):  # rank r graded test[r::world]
        records[rank::run.world] = part
    metrics = accuracy_of(records, cfg.maj_k)
    if metrics["prompts_cut"]:
        print0(f"warning: {metrics['prompts_cut']} of {len(test)} test prompts do not fit the "
               f"model's context with --max_new_tokens {cfg.max_new_tokens}: they were cut, "
               f"keeping their end (see prompt_cut in eval.json)")
    return metrics, records

# -----------------------------------------------------------------------------
# log-probs of pairs, and preference metrics


@torch.no_grad()
def pair_logps(model, rows, pad_id, *, batch_size=16, eos_pad=False, device="cpu",
               ctx=nullcontext(), desc="log-probs", progress=True):
    """Per-token log-probs of every pair's response tokens -> list of (chosen (Tw,), rejected
    (Tl,)) float32 CPU tensors. Only the scored (masked-in) positions are kept, in order, so a
    row's values drop back into any batch layout with `logps[mask] = torch.cat(values)`: this is
    how train.py reuses the reference's log-probs."""
    model.eval()
    out = []
    batches = range(0, len(rows), batch_size)
    for b0 in progress_bar(batches, desc, unit="batch", disable=not progress, leave=False):
        chunk = rows[b0:b0 + batch_size]
        batch = preference_batch(chunk, pad_id, eos_pad=eos_pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        with ctx:
            logps = model(batch["input_ids"], batch["targets"]).float()  # (2B, T)
        mask, B = batch["loss_mask"], len(chunk)
        out += [(logps[i][mask[i]].cpu(), logps[B + i][mask[B + i]].cpu()) for i in range(B)]
    return out


def stack_responses(values):
    """A list of 1-D tensors -> ((B, T) left-aligned values, (B, T) mask)."""
    padded = pad_sequence(list(values), batch_first=True)
    lengths = torch.tensor([len(v) for v in values])
    return padded, torch.arange(padded.size(1))[None, :] < lengths[:, None]


def preference_eval(policy_logps, reference_logps, *, beta=0.1, family="static", size=1):
    """Reward accuracy, margin, segment win rate... from per-pair response log-probs
    (see pair_logps), as floats averaged over the pairs."""
    n = len(policy_logps)  # chosen and rejected padded to ONE width: losses need a shared (B, T)
    p, mask = stack_responses([c for c, _ in policy_logps] + [r for _, r in policy_logps])
    ref, _ = stack_responses([c for c, _ in reference_logps] + [r for _, r in reference_logps])
    (pc, pr), (rc, rr), (cm, rm) = p.split(n), ref.split(n), mask.split(n)
    m = preference_metrics(pc.double(), pr.double(), rc.double(), rr.double(), cm, rm,
                           beta=beta, family=family, size=size)
    return {k: float(v) for k, v in m.items()}


def evaluate_stage(stage_dir, cfg, run, pairs=None):
    """Greedy accuracy (and maj@k) of a stage's model (stage_dir/ckpt.pt) on the run's test split,
    plus, for a preference stage, reward accuracy and margins on its training and held-out pairs
    (pairs = encoded train rows, val rows, the reference's log-probs) -> stage_dir/eval.json"""
    path = os.path.join(stage_dir, "eval.json")
    if os.path.exists(path):
        return read_run_file(path)
    model, tok = load_model(os.path.join(stage_dir, "ckpt.pt"))
    model = place(model, run, cfg.fsdp, whole=True).eval()  # (each rank decodes its own)
    metrics, records = evaluate_test(model, tok, cfg, run)
    result = {"metrics": metrics}
    if pairs is not None:
        rows, val_rows, reference = pairs
        kw = dict(batch_size=cfg.po_batch_size, device=run.device, ctx=run.ctx,
                  progress=run.master, eos_pad=eos_padded(cfg.loss, cfg.family, cfg.eos_pad))
        family, size = metric_granularity(cfg.loss, cfg.family, cfg.size)
        score = partial(preference_eval, beta=cfg.beta, family=family, size=size)
        train_logps = pair_logps(model, rows, tok.eot_token, desc="eval pairs", **kw)
        result["pairs"] = {"train": score(train_logps, reference["train"])}
        if val_rows:  # before = the reference against itself (exact ties: accuracy 0)
            val = pair_logps(model, val_rows, tok.eot_token, desc="eval pairs (val)", **kw)
            result["pairs"]["val"] = score(val, reference["val"])
            result["pairs"]["val_before"] = score(reference["val"], reference["val"])
    result["records"] = records
    if run.master:
        write_json(path, result)
    barrier()
    name = os.path.relpath(stage_dir, cfg.out_dir)
    tracking.log(name, last_step(stage_dir), tracked(result), purge=False)  # --report_to
    print0(f"[{name}] test accuracy {100 * metrics['accuracy']:.1f}% "
           f"({metrics['correct']}/{metrics['n']})")
    return result


def last_step(stage_dir):
    """The stage's last training step (0: it trained none), read from its metrics.jsonl."""
    log = os.path.join(stage_dir, "metrics.jsonl")
    last = read_jsonl(log, torn_tail=True)[-1:] if os.path.exists(log) else []
    return last[0]["step"] if last else 0


def tracked(result):
    """An eval.json's numbers as flat tracker keys: test/accuracy, pairs_val/rewards/accuracy..."""
    numbers = {f"test/{k}": v for k, v in result["metrics"].items()}
    for split, metrics in result.get("pairs", {}).items():
        numbers.update({f"pairs_{split}/{k}": v for k, v in metrics.items()})
    return numbers

# -----------------------------------------------------------------------------
# paired statistics: two models scored on the same questions


def bootstrap(correct, baseline=None, n_boot=2000, seed=0):
    """Mean accuracy of `correct` (0/1 per question, (N,) or (seeds, N)) with a 95 % percentile
    bootstrap CI, or, given `baseline` (same shape: the same questions, runs with the same seeds),
    the mean and CI of the paired difference correct − baseline. Every bootstrap sample redraws
    the questions, the same ones for both models (that is the pairing: the question-to-question
    spread cancels), and, with several seeds, the seeds too. -> (mean, [lo, hi]) as fractions."""
    x = np.atleast_2d(np.asarray(correct, dtype=np.float64))                  # (S, N)
    if baseline is not None:
        x = x - np.atleast_2d(np.asarray(baseline, dtype=np.float64))
    S, N = x.shape
    rng = np.random.default_rng(seed)
    seeds = rng.multinomial(S, np.full(S, 1 / S), size=n_boot) / S            # (n_boot, S) weights
    questions = rng.multinomial(N, np.full(N, 1 / N), size=n_boot) / N        # (n_boot, N) weights
    means = ((seeds @ x) * questions).sum(-1)                                 # (n_boot,)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), [float(lo), float(hi)]


def correctness_of(folders):
    """(questions, (len(folders), N) 0/1 array) from the eval.json of stage folders that must have
    scored the same questions in the same order (else the pairing would be meaningless)."""
    records = [read_run_file(os.path.join(f, "eval.json"))["records"] for f in folders]
    questions = [r["question"] for r in records[0]]
    for f, rs in zip(folders, records):
        need([r["question"] for r in rs] == questions,
             f"{f}/eval.json scored other test questions than {folders[0]}/eval.json")
    return questions, np.array([[float(r["correct"]) for r in rs] for rs in records])


def percent(mean, ci, sign=""):
    """0.4235, [0.41, 0.44] -> '42.4 [41.0, 44.0]' (percentage points)."""
    return f"{100 * mean:{sign}.1f} [{100 * ci[0]:{sign}.1f}, {100 * ci[1]:{sign}.1f}]"

# -----------------------------------------------------------------------------
# a run's report, read back from its folders


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

# -----------------------------------------------------------------------------
# command line


@dataclass
class EvalConfig(Settings):
    """Every flag of eval.py: what to score (below), then the settings it is scored with."""
    # what to evaluate
    ckpt: str = ""              # our ckpt.pt, gpt2 | gpt2-medium | ..., or a Hugging Face folder
    split: str = "test"         # the task split to score
    pairs: str = ""             # a prompt/chosen/rejected file: reward accuracy and margins on it
    ref: str = ""               # their reference model (default: the run's SFT model, else ckpt)
    out: str = ""               # write the metrics and the per-question records to this JSON file
    lm_eval_task: str = ""      # write an lm-evaluation-harness task of this test set (the same
                                # prompts and grader) into this folder, and stop
    # The Settings (above) are the run's, read from DIR/config.json, for a checkpoint inside a run
    # folder; outside one, their defaults (train.py's: the same dataclass).


TEST_SET = ("task", "task_seed", "arith_steps", "arith_max_number", "arith_ops", "n_test", "split")


def run_folder(ckpt):
    """DIR for a checkpoint of a run (DIR/<stage>/ckpt.pt or DIR/compare/<variant>/ckpt.pt)."""
    if not os.path.isfile(ckpt):
        return None
    stage = os.path.dirname(os.path.abspath(ckpt))
    for folder in (os.path.dirname(stage), os.path.dirname(os.path.dirname(stage))):
        if os.path.isfile(os.path.join(folder, "config.json")) and \
                os.path.isdir(os.path.join(folder, "sft")):
            return folder
    return None


def validate(cfg):
    need(cfg.ckpt, "--ckpt is required (our ckpt.pt, a GPT-2 name or a Hugging Face folder)")
    validate_settings(cfg)


LM_EVAL_GRADER = """# the grader of nanoADPO (data.is_correct), as lm-evaluation-harness calls it
import sys

sys.path.insert(0, {root!r})  # the nanoADPO checkout that wrote this task
from data import is_correct  # noqa: E402


def process_results(doc, results):
    return {{"exact_match": float(is_correct(results[0], doc["answer"]))}}
"""


def write_lm_eval_task(cfg, tok, folder):
    """An lm-evaluation-harness task of the test set cfg describes, in `folder`: test.jsonl (each
    question with the prompt this project asks it with: the chat template's for a chat model),
    <name>.yaml (greedy generation up to --max_new_tokens, stopping at the EOS) and utils.py (the
    grader: data.is_correct) -> the task's name."""
    examples = load_split(cfg, cfg.split, tok)
    need(examples, f"--lm_eval_task: the task {cfg.task!r} has no {cfg.split} questions")
    folder = os.path.abspath(folder)
    name = "nanoadpo_" + "".join(c if c.isalnum() else "_" for c in os.path.basename(cfg.task))
    write_jsonl([dict(question=ex["question"], prompt=ex["prompt"], answer=ex["answer"])
                 for ex in examples], os.path.join(folder, "test.jsonl"))
    yaml = "\n".join([
        f"task: {name}", "dataset_path: json",
        "dataset_kwargs: {data_files: {test: %s}}" % json.dumps(os.path.join(folder, "test.jsonl")),
        "test_split: test", "output_type: generate_until",
        'doc_to_text: "{{prompt}}"', 'doc_to_target: "{{answer}}"',
        "generation_kwargs:", f"  until: [{json.dumps(tok.decode([tok.eot_token]))}]",
        "  do_sample: false", f"  max_gen_toks: {cfg.max_new_tokens}",
        "process_results: !function utils.process_results",
        "metric_list:", "  - metric: exact_match", "    aggregation: mean",
        "    higher_is_better: true", ""])
    atomic_write(os.path.join(folder, f"{name}.yaml"), lambda f: f.write(yaml.encode()))
    grader = LM_EVAL_GRADER.format(root=ROOT)
    atomic_write(os.path.join(folder, "utils.py"), lambda f: f.write(grader.encode()))
    return name


# -----------------------------------------------------------------------------
# a run's inputs, pinned by their content (DIR/inputs.json): moved, the same input; edited, not

PINNED = ("task", "init_from", "pairs_source")


def input_id(cfg, flag):
    """What --flag's input is (common.content_id): the digest of the files it names, or the name
    itself (arith, scratch, a hub id...); None for a folder without the files it should hold."""
    value = getattr(cfg, flag)
    if not os.path.exists(os.path.expanduser(value)):
        return value
    splits = ("train", "test") if flag == "task" else ("train",)
    files = model_files(value) if flag == "init_from" else local_files(value, splits)
    return content_id(value, files) if files else None


def pinned_inputs(folder):
    """{flag: content_id} of the inputs a run folder has read ({} before it read any)."""
    path = os.path.join(folder, "inputs.json")
    return read_run_file(path) if os.path.isfile(path) else {}


def moved_inputs(cfg):
    """The PINNED flags whose value is not the run's config.json's but names the content the run
    pinned: the same input at another path (a moved model folder), which may differ. (Rank 0
    claims the folder: the other ranks need not hash a thing.)"""
    if process_rank() != 0:
        return ()
    try:
        saved = read_json(os.path.join(cfg.out_dir, "config.json"))
        pinned = pinned_inputs(cfg.out_dir)
    except (OSError, ValueError):  # a new run folder (or a broken one: claim_run_folder says so)
        return ()
    return tuple(f for f in PINNED if f in pinned and saved.get(f) != getattr(cfg, f)
                 and input_id(cfg, f) == pinned[f])


def pin_run_inputs(cfg):
    """Pin (common.pin_inputs) the inputs of a train.py run: each is recorded by the first run of
    the folder, and checked while the run reads it: the task always, the source model until SFT
    is done, the pair source until the pairs are (neither is read after that)."""
    if process_rank() != 0:  # rank 0 checks and records: only it hashes
        return pin_inputs(cfg.out_dir, {})
    sft_done = os.path.exists(os.path.join(cfg.out_dir, "sft", "ckpt.pt"))
    pairs_done = os.path.exists(os.path.join(cfg.out_dir, "pairs", "stats.json"))
    reads = {"task": True, "init_from": not sft_done, "pairs_source": not pairs_done}
    pinned = pinned_inputs(cfg.out_dir)
    pin_inputs(cfg.out_dir, {f: (getattr(cfg, f), input_id(cfg, f)) for f in PINNED
                             if reads[f] or f not in pinned})


def changed_inputs(cfg, base, folder):
    """What of cfg's test set is not what the run scored -> list of notes. The task is compared
    by content with the run's inputs.json: moved, the same task; edited in place, not."""
    pinned = pinned_inputs(folder).get("task")
    same = pinned is not None and input_id(cfg, "task") == pinned
    changed = [f"--{k} {getattr(cfg, k)} (the run's: {base[k]})" for k in TEST_SET
               if k in base and getattr(cfg, k) != base[k] and not (k == "task" and same)]
    if pinned is not None and not same and cfg.task == base.get("task"):
        changed.append(f"--task {cfg.task} changed since the run read it (see "
                       f"{folder}/inputs.json)")
    return changed


def changed_pairs(cfg, folder):
    """A note if --pairs is one of the run's own pair files but not as its pairs stage wrote it."""
    name = os.path.basename(cfg.pairs)
    own = os.path.join(folder, "pairs", name)
    if name not in ("train.jsonl", "val.jsonl") or os.path.realpath(cfg.pairs) != own:
        return ""
    stats = read_run_file(os.path.join(folder, "pairs", "stats.json"))
    same = file_digest(cfg.pairs) == stats.get(f"sha256/{name}")
    return "" if same else f"; --pairs {cfg.pairs} is NOT the file the run's pairs stage wrote"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse(EvalConfig, argv)
    folder = run_folder(cfg.ckpt)
    own = load_settings(cfg.ckpt)  # {} for anything but our checkpoints
    if folder or own:  # the run's settings, then the checkpoint's own, under the flags
        saved = read_json(os.path.join(folder, "config.json")) if folder else {}
        base = {**saved, **own}
        cfg = parse(EvalConfig, argv, base=base)
        where = f"the run in {folder}" if folder else f"{cfg.ckpt}, recorded in it"
        mine = [f"{k} {v}" for k, v in own.items() if k in saved and saved[k] != v]
        where += f", and the checkpoint's own ({', '.join(mine)})" if mine else ""
        changed = changed_inputs(cfg, base, folder) if folder else []
        note = f"; NOT the run's test set: {', '.join(changed)}" if changed else ""
        note += changed_pairs(cfg, os.path.realpath(folder)) if folder and cfg.pairs else ""
        print0(f"settings of {where}: loss {cfg.loss}, beta {cfg.beta}, family {cfg.family}, "
               f"size {cfg.size}, eos_pad {cfg.eos_pad}{note}")
    validate(cfg)
    if cfg.lm_eval_task:  # the test set as a task file: the tokenizer renders the prompts
        tok = load_tokenizer(cfg.ckpt, cfg.tokenizer, cfg.chat_template)
        name = write_lm_eval_task(cfg, tok, cfg.lm_eval_task)
        print0(f"wrote the task {name} ({cfg.split} questions) to {cfg.lm_eval_task}; with the "
               f"checkpoint exported to FOLDER (checkpoint.export): lm_eval --model hf "
               f"--model_args pretrained=FOLDER --include_path {cfg.lm_eval_task} --tasks {name} "
               f"--batch_size 1")
        return {"lm_eval_task": name}
    pairs = load_pairs(cfg.pairs) if cfg.pairs else None  # a bad file fails before the (long) eval
    run = setup(cfg.device, cfg.dtype)
    print0(f"device {run.device} | dtype {run.dtype} | torch {torch.__version__} | config: "
           f"{changed_flags(cfg)}")
    model, tok = load_model(cfg.ckpt, cfg.tokenizer, cfg.chat_template)
    model = place(model, run, cfg.fsdp, whole=True).eval()  # (each rank decodes its own)
    result = {"ckpt": cfg.ckpt, "task": cfg.task}
    if pairs:  # encoded before the accuracy eval, so a bad file or flag fails at once
        context = model.config.block_size
        need(cfg.max_len <= context,
             f"--max_len {cfg.max_len} exceeds the model's context of {context} tokens")
        pairs = render_pairs(pairs, tok)  # chat messages: through the model's chat template
        rows, stats = encode_pairs(pairs, tok, max_len=cfg.max_len)
        need(rows, f"{cfg.pairs}: no pair to score ({stats})")
        ref_path = cfg.ref or (os.path.join(folder, "sft", "ckpt.pt") if folder else cfg.ckpt)
        ref = place(load_gpt(ref_path), run, cfg.fsdp, whole=True).eval()
        need(ref.config.vocab_size == model.config.vocab_size,
             f"--ref {ref_path} has a vocabulary of {ref.config.vocab_size} but --ckpt {cfg.ckpt} "
             f"has {model.config.vocab_size} (expected the same tokenizer for both)")
    if cfg.task != "none":
        metrics, records = evaluate_test(model, tok, cfg, run)
        result.update(metrics, records=records)
        shown = {k: f"{100 * v:.1f}%" for k, v in metrics.items()
                 if k == "accuracy" or k.startswith("maj@")}
        row = [cfg.ckpt, cfg.task, metrics["n"], *shown.values()]
        print0(markdown_table(["checkpoint", "task", "n", *shown], [row]))
        breakdown = breakdown_table({cfg.ckpt: metrics})
        if breakdown:  # MATH: by subject and by level
            print0(breakdown)
    if pairs:
        kw = dict(device=run.device, ctx=run.ctx, progress=False,
                  eos_pad=eos_padded(cfg.loss, cfg.family, cfg.eos_pad))
        family, size = metric_granularity(cfg.loss, cfg.family, cfg.size)
        pref = preference_eval(pair_logps(model, rows, tok.eot_token, **kw),
                               pair_logps(ref, rows, tok.eot_token, **kw),
                               beta=cfg.beta, family=family, size=size)
        result["pairs"] = {"file": cfg.pairs, "reference": ref_path, **stats, **pref}
        print0(markdown_table(list(pref), [[f"{v:.4f}" for v in pref.values()]]))
    if cfg.out and run.master:
        write_json(cfg.out, result)
    return result


if __name__ == "__main__":
    cli(main)
