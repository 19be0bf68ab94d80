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
from statistics import NormalDist

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from data import (encode_pairs, extract_answer, grader, is_correct, load_pairs, load_split,
                  preference_batch, render_pairs)
from loss import preference_metrics
from machinery import tracking
from machinery.checkpoint import load_gpt, load_model, load_settings, load_tokenizer
from machinery.common import (ROOT, all_gather, atomic_write, barrier, changed_flags,
                              cli, markdown_table, need, parse, print0, progress_bar, read_json,
                              read_jsonl, read_run_file, setup, write_json, write_jsonl)
from machinery.config import Settings, eos_padded, metric_granularity, validate_settings
from machinery.inputs import changed_inputs, changed_pairs
from machinery.parallel import place
from machinery.tokenizer import encode_prompt

# -----------------------------------------------------------------------------
# generation and accuracy


@torch.no_grad()
def complete(model, tok, prompts, *, n=1, max_new_tokens=128, temperature=0.0, top_k=None,
             top_p=None, seed=0, batch_size=64, ctx=nullcontext(), desc="generating",
             progress=True):
    """n completions (strings, EOS removed) for every prompt string -> (list (len(prompts)) of
    lists (n), list of bools: the prompt was longer than the context leaves room for and was cut,
    keeping its end, list of lists of bools: the completion ended with the EOS, not at
    max_new_tokens). Work is cut into fixed batches of (prompt, sample) jobs and batch j is
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
    finished = [[] for _ in prompts]
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
            ended = bool(ids) and ids[-1] == eot
            out[i].append(tok.decode(ids[:-1] if ended else ids))
            finished[i].append(ended)
    return out, cut, finished


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
    greedy, cut, _ = complete(model, tok, prompts, max_new_tokens=max_new_tokens,
                              temperature=0.0, batch_size=batch_size, ctx=ctx, desc="eval greedy",
                              progress=progress)
    records = [dict(question=ex.get("question", ex["prompt"]), completion=c,
                    pred=extract_answer(c, grader(ex)), gold=ex["answer"],
                    correct=is_correct(c, ex["answer"], grader(ex)), prompt_cut=k,
                    **{key: ex[key] for key in BREAKDOWNS if key in ex})
               for ex, (c,), k in zip(examples, greedy, cut)]
    if maj_k > 1:
        samples, _, _ = complete(model, tok, prompts, n=maj_k, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed, batch_size=batch_size,
                                 ctx=ctx, desc=f"eval maj@{maj_k}", progress=progress)
        for r, s, ex in zip(records, samples, examples):
            r["maj"], voted = majority_answer(s, grader(ex))
            r["maj_correct"] = voted is not None and is_correct(voted, ex["answer"], grader(ex))
    return records


# what examples carry beside their question, accuracy per value as well: MATH's subject and
# level; the lines of reasoning of a worked solution (arith's steps, GSM8K's lines: data._example)
BREAKDOWNS = ("subject", "level", "steps")


def accuracy_of(records, maj_k=1):
    """{accuracy, correct, n} (+ maj@k) counted from graded records; with MATH's subjects and
    levels or the solutions' steps, by_subject, by_level, by_steps: {value: {accuracy, correct,
    n}}."""
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
        if groups:  # (in sorted order: levels 1..5, steps 1.., subjects alphabetically)
            metrics[f"by_{key}"] = {str(v): {"accuracy": sum(c) / len(c), "correct": sum(c),
                                             "n": len(c)} for v, c in sorted(groups.items())}
    return metrics


def breakdown_table(tests):
    """Accuracy per subject, level or steps of each model ({label: test metrics}) side by side,
    '' when the task's questions do not differ in them (a task of 2-step problems alone)."""
    tables = []
    for key in BREAKDOWNS:
        found = [m[f"by_{key}"] for m in tests.values() if f"by_{key}" in m]
        if not found or len(found[0]) < 2:
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


def paired(correct, baseline=None):
    """(S, N) float64: 0/1 per run and question, or the paired differences correct − baseline
    (the same questions, runs matched one to one). (N,) counts as one run."""
    x = np.atleast_2d(np.asarray(correct, dtype=np.float64))                  # (S, N)
    if baseline is not None:
        x = x - np.atleast_2d(np.asarray(baseline, dtype=np.float64))
    return x


def replicate_weights(S, N, n_boot, seed):
    """The two-level bootstrap's draws, 2000 replicates at a time (memory: 2000 × N): each
    replicate redraws the S runs (seeds), then the N questions, the same questions for every run
    (and, for differences, for both models: that is the pairing, the question-to-question spread
    cancels). Yields ((b, S), (b, N)) multinomial weights, each row summing to 1."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, 2000):
        b = min(2000, n_boot - start)
        yield (rng.multinomial(S, np.full(S, 1 / S), size=b) / S,
               rng.multinomial(N, np.full(N, 1 / N), size=b) / N)


def bootstrap_means(x, n_boot=2000, seed=0):
    """(n_boot,) bootstrap replicates of the mean of x (S, N) (replicate_weights' two levels)."""
    S, N = x.shape
    means = [((seeds @ x) * questions).sum(-1)                                # (b,)
             for seeds, questions in replicate_weights(S, N, n_boot, seed)]
    return np.concatenate(means)


def bootstrap(correct, baseline=None, n_boot=2000, seed=0):
    """Mean accuracy of `correct` (0/1 per question, (N,) or (runs, N)) with a 95 % percentile
    bootstrap CI (bootstrap_means: runs, then questions), or, given `baseline` (same shape: the
    same questions, runs matched one to one), the mean and CI of the paired difference
    correct − baseline. -> (mean, [lo, hi]) as fractions."""
    x = paired(correct, baseline)
    lo, hi = np.percentile(bootstrap_means(x, n_boot, seed), [2.5, 97.5])
    return float(x.mean()), [float(lo), float(hi)]


def bootstrap_p(correct, baseline, n_boot=10000, seed=0):
    """Two-sided p-value of "no difference" from the bootstrap distribution of the paired mean
    difference (the dual of the percentile CI): 2·min(share of replicates ≤ 0, share ≥ 0), with
    the +1 of a Monte-Carlo p-value so that it is never 0 (its floor is 2/(n_boot + 1))."""
    return two_sided_p(bootstrap_means(paired(correct, baseline), n_boot, seed))


def two_sided_p(replicates):
    """The p-value of "0" from bootstrap replicates: 2·min(share ≤ 0, share ≥ 0), with the +1
    of a Monte-Carlo p-value (never 0: its floor is 2/(n + 1))."""
    tail = min((replicates <= 0).sum(), (replicates >= 0).sum())
    return min(1.0, 2 * (tail + 1) / (len(replicates) + 1))


def bootstrap_slope(correct, baseline, lengths, n_boot=2000, seed=0):
    """How the paired difference correct − baseline changes with a question's length: the
    least-squares slope of the per-question difference (mean over runs) on its length, per unit
    of length, with a 95 % CI from the same two-level bootstrap (each replicate the weighted
    least-squares slope under its weights) -> (slope, [lo, hi], two-sided p)."""
    x = paired(correct, baseline)                                              # (S, N)
    L = np.asarray(lengths, dtype=np.float64)                                  # (N,)
    S, N = x.shape

    def slope(d, v):  # d (b, N) differences, v (b, N) question weights -> (b,) slopes
        centred = L[None, :] - (v * L).sum(-1, keepdims=True)
        return (v * centred * d).sum(-1) / (v * centred ** 2).sum(-1)

    fit = slope(x.mean(0, keepdims=True), np.full((1, N), 1 / N))[0]
    slopes = np.concatenate([slope(seeds @ x, questions)
                             for seeds, questions in replicate_weights(S, N, n_boot, seed)])
    lo, hi = np.percentile(slopes, [2.5, 97.5])
    return float(fit), [float(lo), float(hi)], two_sided_p(slopes)


def holm(p_values):
    """Holm's step-down adjustment (family-wise error rate) of k p-values, in their order: the
    i-th smallest is multiplied by k − i + 1 (i from 1), and an adjusted p-value is never below
    the one before it in that order. Significant at level α after correction: adjusted ≤ α."""
    k = len(p_values)
    adjusted = [0.0] * k
    running = 0.0
    for rank, i in enumerate(sorted(range(k), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (k - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def detectable_effect(correct, baseline, alpha=0.05, power=0.8):
    """The smallest true difference this design detects with probability `power` in a two-sided
    test at level alpha: (z_{1−α/2} + z_power) · SE, SE the standard error of the pooled mean
    difference. decision: with S >= 2 runs, SE² = max(s², σ²/N) / S, s² the variance of the runs'
    mean differences (it holds the seed's spread and the questions' noise) and σ²/N its floor,
    the questions' noise alone (σ²: the per-question variance of the difference, which the
    discordant questions make); with one run SE² = σ²/N: the questions' noise only, a lower bound
    when seeds matter. With few runs s² is itself uncertain (S − 1 degrees of freedom)."""
    x = paired(correct, baseline)                                              # (S, N)
    S, N = x.shape
    within = x.var(axis=1).mean() / N                                          # σ²/N
    between = x.mean(axis=1).var(ddof=1) if S > 1 else 0.0                     # s²
    se = math.sqrt(max(between, within) / S)
    z = NormalDist()
    return (z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * se


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
    need(cfg.task != "none" or cfg.pairs,
         "--task none and no --pairs: nothing to evaluate (expected a task to score, "
         "--pairs FILE, or both)")
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
