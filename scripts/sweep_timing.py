"""
A shortened run of a sweep preset, timed stage by stage, and the full run's time projected from
it, to plan GPU time (scripts/gpu_check.sh runs it on the arith_gpu preset):

    python scripts/sweep_timing.py --preset arith_gpu --out_dir out/sweep_timing \
        --sft_steps 300 --n_test 500 --n_pair_questions 512 --compare dpo,adpo:adaptive:256

The flags are train.py's: the preset alone is the full run, the preset and the other flags the
short one. The short run is train.main itself, with four of its functions timed from the outside:
every training step (log_step, with --log_every 1), every evaluation (evaluate_stage), the pairs
stage's sampling (sample_pairs) and the reference log-probs (reference_logps). The full run's time
is then its counts times those unit times:

    SFT steps x the median SFT step  +  evaluations x test questions x seconds per question
    + pair questions x seconds per question  +  runs x (PO steps x the median PO step
    + pairs x reference seconds per pair)  +  the short run's one-off costs (start-up, compiles)

where a run is a variant and seed of --compare, and the full run's pairs (hence its PO steps:
po_epochs x pairs / po_batch_size) are the short run's pairs per question times its questions.
Compiles are counted once, as in the short run; the cDPO stage is not projected. Prints
`name: value` lines; a part the short run did not reach (no pairs to train on, or a SIGTERM from a
time box, which stops the run and still prints) reads n/a.
"""
import math
import os
import signal
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from machinery.common import cli, need, parse, read_json  # noqa: E402

TIMED = ("log_step", "evaluate_stage", "sample_pairs", "reference_logps")


def run_timed(argv):
    """train.main(argv) with TIMED's functions timed -> ({function: [(first argument or stage
    name, end time, seconds)]}, wall seconds, the error that stopped it or None)."""
    calls = {name: [] for name in TIMED}
    originals = {name: getattr(train, name) for name in TIMED}

    def timing(name, fn):
        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:  # log_step(step, total, logged, lr, tok/s, model, name, ...): its stage name
                key = args[6] if name == "log_step" else args[0]
                calls[name].append((key, time.perf_counter(), time.perf_counter() - t0))
        return wrapped

    for name, fn in originals.items():
        setattr(train, name, timing(name, fn))
    def stop(signum, frame):  # a time box's SIGTERM: stop and report what was measured
        raise TimeoutError(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    t0, error = time.perf_counter(), None
    try:
        train.main(argv)
    except (ValueError, RuntimeError, FloatingPointError, TimeoutError) as e:  # what was
        error = str(e).splitlines()[0]                                          # measured counts
    finally:
        for name, fn in originals.items():
            setattr(train, name, fn)
    return calls, time.perf_counter() - t0, error


def step_deltas(steps, stage):
    """The times between consecutive logged steps of each stage `stage` accepts (one step each)."""
    deltas = []
    for name in dict.fromkeys(n for n, _, _ in steps):
        if stage(name):
            ends = [end for n, end, _ in steps if n == name]
            deltas += [b - a for a, b in zip(ends, ends[1:])]
    return deltas


def median(xs):
    return statistics.median(xs) if xs else None


def product(*xs):
    return None if any(x is None for x in xs) else math.prod(xs)


def is_po(name):  # po/ or compare/<variant>_s<seed>/
    return name == "po" or name.startswith("compare")


def questions(cfg):  # the training questions the pairs stage samples on
    return cfg.n_pair_questions or cfg.n_train


def project(full, short, calls, wall):
    """The unit times of the short run and the full run's projected seconds -> {name: value}.
    The steady step time is the median step (a compile of a new shape is one outlier); all the
    short run spent beyond steady steps, evaluations, sampling and reference log-probs (start-up,
    data, compiles, checkpoints) is its one-off cost, counted once in the full run too."""
    sft = step_deltas(calls["log_step"], lambda name: name == "sft")
    po = step_deltas(calls["log_step"], is_po)
    evals = [s for _, _, s in calls["evaluate_stage"]]
    sampled = sum(s for _, _, s in calls["sample_pairs"]) or None
    reference = sum(s for _, _, s in calls["reference_logps"]) or None
    stats_path = os.path.join(short.out_dir, "pairs", "stats.json")
    stats = read_json(stats_path) if os.path.exists(stats_path) else {}
    pairs = stats.get("train_pairs", 0) + stats.get("val_pairs", 0) or None
    u = dict(sft_step_s=median(sft), po_step_s=median(po),
             eval_s_per_question=product(median(evals), 1 / short.n_test),
             pairs_s_per_question=product(sampled, 1 / questions(short)),
             reference_s_per_pair=product(reference, 1 / pairs) if pairs else None,
             pairs_per_question=product(pairs, 1 / questions(short)))
    steady = (len(sft) * (u["sft_step_s"] or 0) + len(po) * (u["po_step_s"] or 0) + sum(evals)
              + (sampled or 0) + (reference or 0))
    full_pairs = product(u["pairs_per_question"], questions(full))
    po_steps = None
    if full_pairs is not None:
        train_pairs = full_pairs * (1 - full.val_frac)
        po_steps = math.ceil(full.po_epochs * math.ceil(train_pairs / full.po_batch_size))
    runs = len(train.variants(full)[0])
    per_run = product(po_steps, u["po_step_s"])
    if per_run is not None:
        per_run += product(full_pairs, u["reference_s_per_pair"]) or 0
    parts = dict(projected_sft_s=product(full.sft_steps, u["sft_step_s"]),
                 projected_eval_s=product(1 + runs, full.n_test, u["eval_s_per_question"]),
                 projected_pairs_s=product(questions(full), u["pairs_s_per_question"]),
                 projected_po_s=product(runs, per_run))
    one_off = max(0.0, wall - steady)
    total = one_off + sum(v for v in parts.values() if v is not None)
    lacks = [k.removeprefix("projected_").removesuffix("_s") for k, v in parts.items() if v is None]
    return dict(measured_wall_s=wall, **u, one_off_s=one_off, full_runs=runs,
                full_po_steps_per_run=po_steps, **parts, projected_full_sweep_s=total,
                projected_full_sweep_h=total / 3600, projection_lacks=",".join(lacks) or "nothing")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    need("--preset" in argv[:-1], "sweep_timing.py: expected --preset NAME (the full run) and "
                                  "train.py flags that shorten it")
    preset = argv[argv.index("--preset") + 1]
    full = parse(train.Config, ["--preset", preset], presets=True)
    short_argv = argv + ["--log_every", "1"]  # every step logged, so every step is timed
    short = parse(train.Config, short_argv, presets=True)
    calls, wall, error = run_timed(short_argv)
    print(f"\nsweep timing: --preset {preset}, shortened by {' '.join(argv)}")
    for k, v in project(full, short, calls, wall).items():
        print(f"{k}: {'n/a' if v is None else f'{v:.4g}' if isinstance(v, float) else v}")
    if error:
        print(f"short_run_error: {error}")


if __name__ == "__main__":
    cli(main)
