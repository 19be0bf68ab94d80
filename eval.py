"""
Evaluate a checkpoint: greedy accuracy, maj@k, and preference metrics on pairs.

    python eval.py --ckpt out/default/po/ckpt.pt                       # greedy accuracy, embedded arith test split
    python eval.py --ckpt out/default/po/ckpt.pt --maj_k 8             # + maj@8 (8 samples at temperature 0.7)
    python eval.py --ckpt gpt2 --task gsm8k --n 200                    # a hub model (or any HF folder) on GSM8K
    python eval.py --ckpt out/default/po/ckpt.pt --ref out/default/sft/ckpt.pt \\
                   --pairs out/default/pairs/val.jsonl                 # reward accuracy / margins on held-out pairs

The functions here are also what train.py calls, so the numbers a run prints and the numbers this script prints
for the same checkpoint are computed by the same code.
"""
import argparse
import json
import math
import os
import sys
from collections import Counter
from contextlib import nullcontext

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from data import encode_pairs, extract_answer, get_tokenizer, is_correct, load_task, preference_batch, read_jsonl
from loss import preference_metrics
from model import GPT, load_checkpoint

# -----------------------------------------------------------------------------
# generation


@torch.no_grad()
def complete(model, tok, prompts, *, n=1, max_new_tokens=128, temperature=0.0, top_k=None, seed=0,
             batch_size=64, ctx=nullcontext(), desc="generating", progress=True):
    """n completions (strings, EOS removed) for every prompt string -> list (len(prompts)) of lists (n).

    Work is cut into fixed batches of (prompt, sample) jobs and batch j is sampled with seed `seed + j`, so the
    result does not depend on how many batches ran before it (a resumed or sharded run gets the same samples).
    """
    eot = tok.eot_token
    room = model.config.block_size - max_new_tokens  # a prompt longer than this keeps its end
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {model.config.block_size} tokens")
    encoded = [tok.encode_ordinary(p)[-room:] for p in prompts]
    jobs = [i for i in range(len(prompts)) for _ in range(n)]
    out = [[] for _ in prompts]
    for j, b0 in enumerate(tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not progress, leave=False)):
        chunk = jobs[b0:b0 + batch_size]
        with ctx:
            new = model.generate([encoded[i] for i in chunk], max_new_tokens, temperature=temperature,
                                 top_k=top_k, eos_token_id=eot, seed=seed + j)
        for i, ids in zip(chunk, new):
            out[i].append(tok.decode(ids[:-1] if ids and ids[-1] == eot else ids))
    return out


def majority_answer(completions):
    """The most frequent extracted answer among completions (first seen wins ties), or None."""
    answers = [a for a in map(extract_answer, completions) if a is not None]
    return Counter(answers).most_common(1)[0][0] if answers else None


def accuracy(model, tok, examples, *, max_new_tokens=128, batch_size=64, maj_k=1, temperature=0.7, seed=0,
             ctx=nullcontext(), progress=True):
    """Greedy accuracy on `examples` (dicts with 'prompt' and gold 'answer'); maj@k when maj_k > 1.

    Returns (metrics dict, one record per example) so a caller can write the completions next to the number.
    """
    prompts = [ex["prompt"] for ex in examples]
    greedy = complete(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                      batch_size=batch_size, ctx=ctx, desc="eval greedy", progress=progress)
    records = []
    for ex, (c,) in zip(examples, greedy):
        records.append(dict(question=ex.get("question", ex["prompt"]), completion=c, pred=extract_answer(c),
                            gold=ex["answer"], correct=is_correct(c, ex["answer"])))
    n_correct = sum(r["correct"] for r in records)
    metrics = {"accuracy": n_correct / max(len(records), 1), "correct": n_correct, "n": len(records)}
    if maj_k > 1:
        samples = complete(model, tok, prompts, n=maj_k, max_new_tokens=max_new_tokens, temperature=temperature,
                           seed=seed, batch_size=batch_size, ctx=ctx, desc=f"eval maj@{maj_k}", progress=progress)
        maj = [majority_answer(s) for s in samples]
        for r, m in zip(records, maj):
            r["maj"] = m
        metrics[f"maj@{maj_k}"] = sum(m is not None and is_correct(m, r["gold"])
                                      for r, m in zip(records, maj)) / max(len(records), 1)
    return metrics, records


# -----------------------------------------------------------------------------
# log-probs of pairs, and preference metrics


@torch.no_grad()
def pair_logps(model, rows, pad_id, *, batch_size=16, eos_pad=False, device="cpu", ctx=nullcontext(),
               desc="log-probs", progress=True):
    """Per-token log-probs of every pair's response tokens -> list of (chosen (Tw,), rejected (Tl,)) float32 CPU.

    Only the scored (masked-in) positions are kept, in order, so a row's values can be dropped back into any
    batch layout with `logps[mask] = torch.cat(values)`: this is how train.py reuses the reference's log-probs.
    """
    model.eval()
    out = []
    for b0 in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = rows[b0:b0 + batch_size]
        batch = {k: v.to(device) for k, v in preference_batch(chunk, pad_id, eos_pad=eos_pad).items()}
        with ctx:
            logps = model.token_logps(batch["input_ids"], batch["targets"]).float()  # (2B, T)
        mask = batch["loss_mask"]
        B = len(chunk)
        for i in range(B):
            out.append((logps[i][mask[i]].cpu(), logps[B + i][mask[B + i]].cpu()))
    return out


def stack_responses(values):
    """A list of 1-D tensors -> ((B, T) left-aligned values, (B, T) mask)."""
    padded = pad_sequence(list(values), batch_first=True)
    lengths = torch.tensor([len(v) for v in values])
    return padded, torch.arange(padded.size(1))[None, :] < lengths[:, None]


def preference_eval(policy_logps, reference_logps, *, beta=0.1, family="static", size=1):
    """Reward accuracy, margin, segment win rate... from per-pair response log-probs (see pair_logps)."""
    n = len(policy_logps)  # chosen and rejected padded to ONE width: the losses need a shared (B, T)
    p, mask = stack_responses([c for c, _ in policy_logps] + [r for _, r in policy_logps])
    ref, _ = stack_responses([c for c, _ in reference_logps] + [r for _, r in reference_logps])
    (pc, pr), (rc, rr), (cm, rm) = p.split(n), ref.split(n), mask.split(n)
    m = preference_metrics(pc.double(), pr.double(), rc.double(), rr.double(), cm, rm,
                           beta=beta, family=family, size=size)
    return {k: float(v) for k, v in m.items()}


# -----------------------------------------------------------------------------
# tables


def markdown_table(header, rows):
    """A GitHub-markdown table from a header list and a list of row lists (cells formatted by str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(xs):
    """'mean ± std' in percent (sample std; '±0.0' for a single run)."""
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


# -----------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (argparse's default prints the whole usage block first)
        raise ValueError(f"{message} (see python eval.py --help)")


def main(argv=None):
    p = _Parser(description="Evaluate a checkpoint (ours, a GPT-2 name, or a HF folder).")
    p.add_argument("--ckpt", required=True, help="our ckpt.pt, gpt2 | gpt2-medium | ..., or a HF-format folder")
    p.add_argument("--task", default="arith", help="arith | gsm8k | a local file with question/answer columns | "
                                                      "none (only --pairs)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=500, help="number of test questions (0 = all)")
    p.add_argument("--tokenizer", default="auto", help="byte | gpt2 | auto (what the checkpoint was trained with)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--maj_k", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for maj@k")
    p.add_argument("--seed", type=int, default=0, help="maj@k sampling seed")
    p.add_argument("--task_seed", type=int, default=0, help="the arith task's generator seed (as in train.py)")
    p.add_argument("--arith_steps", type=int, default=2)
    p.add_argument("--arith_max_number", type=int, default=50)
    p.add_argument("--arith_ops", default="+-")
    p.add_argument("--ref", default=None, help="reference checkpoint for --pairs (default: the policy itself)")
    p.add_argument("--pairs", default=None, help="a pairs jsonl (prompt/chosen/rejected) for preference metrics")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--family", default="static", choices=["static", "adaptive"])
    p.add_argument("--size", type=int, default=1)
    p.add_argument("--max_len", type=int, default=None, help="pair truncation length (default: model context)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write metrics + per-question records to this json file")
    args = p.parse_args(argv)
    for flag in ("n", "batch_size", "maj_k", "max_new_tokens", "size"):
        if getattr(args, flag) < (0 if flag == "n" else 1):
            p.error(f"--{flag} must be >= {0 if flag == 'n' else 1}, got {getattr(args, flag)}")
    if not (args.beta > 0 and math.isfinite(args.beta)):
        p.error(f"--beta must be a finite number > 0, got {args.beta}")
    if args.max_len is not None and args.max_len < 1:
        p.error(f"--max_len must be >= 1, got {args.max_len}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine has no CUDA GPU that torch can use (expected --device cpu)")
    pairs = read_jsonl(args.pairs) if args.pairs else None  # a bad pairs file fails before the (long) accuracy eval
    for i, row in enumerate(pairs or []):
        if not isinstance(row, dict):
            p.error(f"--pairs {args.pairs} row {i}: a JSON {type(row).__name__}, expected an object with prompt, "
                    f"chosen and rejected")

    model = GPT.from_pretrained(args.ckpt).to(args.device).eval()
    tok_name = args.tokenizer
    if tok_name == "auto":  # our checkpoints record their tokenizer; GPT-2 weights use gpt2
        saved = load_checkpoint(args.ckpt).get("tokenizer") if os.path.isfile(args.ckpt) else None
        tok_name = saved or ("byte" if model.config.vocab_size < 1000 else "gpt2")
    tok = get_tokenizer(tok_name)
    if tok.n_vocab > model.config.vocab_size:
        sys.exit(f"error: tokenizer '{tok_name}' has {tok.n_vocab} tokens but {args.ckpt} has a vocabulary of "
                 f"{model.config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)")
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else nullcontext())
    if args.pairs:  # checked and encoded before the accuracy eval, so a bad file or flag fails at once
        if (args.max_len or 0) > model.config.block_size:
            p.error(f"--max_len {args.max_len} exceeds the model's context of {model.config.block_size} tokens")
        rows, stats = encode_pairs(pairs, tok, max_len=args.max_len or model.config.block_size)
        if not rows:
            raise ValueError(f"{args.pairs}: no pair to score ({stats})")
        ref = GPT.from_pretrained(args.ref).to(args.device).eval() if args.ref else model
        if ref.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"--ref {args.ref} has a vocabulary of {ref.config.vocab_size} but --ckpt {args.ckpt} has "
                             f"{model.config.vocab_size} (expected the same tokenizer for both)")

    result = {"ckpt": args.ckpt, "task": args.task}
    if args.task != "none":
        knobs = dict(steps=(args.arith_steps, args.arith_steps), max_number=args.arith_max_number,
                     ops=args.arith_ops) if args.task == "arith" else {}
        examples = load_task(args.task, args.split, n=args.n or None, seed=args.task_seed, **knobs)
        metrics, records = accuracy(model, tok, examples, max_new_tokens=args.max_new_tokens,
                                    batch_size=args.batch_size, maj_k=args.maj_k, temperature=args.temperature,
                                    seed=args.seed, ctx=ctx)
        result.update(metrics, records=records)
        print(markdown_table(["checkpoint", "task", "n", "accuracy"] + ([f"maj@{args.maj_k}"] if args.maj_k > 1 else []),
                             [[args.ckpt, args.task, metrics["n"], f"{100 * metrics['accuracy']:.1f}%"]
                              + ([f"{100 * metrics[f'maj@{args.maj_k}']:.1f}%"] if args.maj_k > 1 else [])]))
    if args.pairs:
        kw = dict(device=args.device, ctx=ctx, eos_pad=args.family == "static")
        pref = preference_eval(pair_logps(model, rows, tok.eot_token, **kw), pair_logps(ref, rows, tok.eot_token, **kw),
                               beta=args.beta, family=args.family, size=args.size)
        result["pairs"] = {"file": args.pairs, **stats, **pref}
        print(markdown_table(list(pref), [[f"{v:.4f}" for v in pref.values()]]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {' '.join(str(e).split()) or type(e).__name__}")
