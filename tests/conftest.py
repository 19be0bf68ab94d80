"""
Shared by the test files: the paths, a tiny pipeline's flags, running the scripts as a user does,
checking their one-line errors, killing a run at a chosen point, random ragged loss inputs.

    python -m pytest -q tests                  # everything (CI)
    python -m pytest -q -m "not slow" tests    # the unit tests, under a minute

`slow` marks the end-to-end tests: whole pipelines, real processes, torchrun, torch.compile.
`cuda` marks the GPU-only tests (skipped without a GPU; `-m cuda` selects them).
"""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# tests import the top-level modules (model, loss, data, train, eval) as a user would
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))
# wall-clock fields of metrics.jsonl: the only numbers allowed to differ between two runs
UNTIMED = ("tokens_per_s", "mfu")

import train  # noqa: E402  (die_at patches it from the outside: production code knows no tests)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end (pipelines, processes, compile); "
                                       "-m 'not slow' runs the unit tests alone")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped without one; "
                                       "-m cuda runs them alone (scripts/gpu_check.sh does)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

# -----------------------------------------------------------------------------
# running train.py / eval.py


def tiny(out_dir, **over):
    """Flags of a whole pipeline in a few seconds. log_every (3) and ckpt_every (2) differ on
    purpose, so that logging windows straddle checkpoints; PO batches hold 3 pairs, so an epoch
    usually ends on a short one."""
    flags = dict(out_dir=out_dir, n_layer=1, n_head=2, n_embd=32, block_size=128, max_len=128,
                 max_new_tokens=32, arith_steps=1, arith_max_number=5, n_train=96, n_test=8,
                 sft_steps=12, sft_batch_size=8, sft_lr=1e-2,
                 n_pair_questions=16, n_samples=4, eval_batch_size=16,
                 po_batch_size=3, po_epochs=3, po_lr=1e-3,
                 log_every=3, ckpt_every=2, dropout=0.1, val_frac=0.25)
    flags.update(over)
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def cli_env(**extra):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the runs a test module makes in this process, as cli_env gives the
    scripts it runs (a tiny model runs no faster on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(args, timeout=180, **env):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=cli_env(**env), timeout=timeout)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# tqdm's "sft:  25%|██▌   | 3/12 [00:00<..."
PROGRESS_BAR = re.compile(r"^.*\d+%\|.*\| *\d+/\d+ \[")


def visible_lines(stderr):
    """stderr's lines that say something: not blank,
    not a progress bar (tqdm draws them on stderr)."""
    lines = [line.strip() for line in re.split(r"[\r\n]", stderr)]
    return [line for line in lines if line and not PROGRESS_BAR.match(line)]


def check_one_line_error(code, stderr, message):
    lines = visible_lines(stderr)
    assert code != 0, stderr
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and message in lines[0], stderr


# -----------------------------------------------------------------------------
# a run that "dies" at a chosen point


class Died(BaseException):
    """Raised by a function patched from here: the run 'dies' at that point (nothing after runs)."""


def die_at(monkeypatch, point):
    """Make the next run die at `point`, patching train.py's own functions from the outside:
    "sft:7" / "po:3" right after that training step is logged, "sft:done" / "po:done" right after
    the stage's ckpt.pt is written, "pairs:4" after the samples of chunk 4 are written,
    "pairs:written" after the pair files (before stats.json), "po:ref" after the reference's
    log-probs. Returns nothing; the patches are undone with the monkeypatch."""
    stage, where = point.split(":")

    def after(fn, hit):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            if hit(*args):
                raise Died(point)
            return result
        return wrapped

    # log_step(step, total, logged, lr, tok_s, model, name)
    if where.isdigit() and stage != "pairs":
        monkeypatch.setattr(train, "log_step", after(train.log_step, lambda step, *a: (
            step == int(where) and a[5] == stage)))
    elif where == "done":
        monkeypatch.setattr(train, "save_checkpoint",
                            after(train.save_checkpoint, lambda path, *a: (
                                str(path).endswith(os.path.join(stage, "ckpt.pt")))))
    elif where == "ref":
        monkeypatch.setattr(train, "atomic_write", after(train.atomic_write, lambda path, *a: (
            str(path).endswith("reference_logps.pt"))))
    else:
        name = "val.jsonl" if where == "written" else f"samples_{int(where):06d}.jsonl"
        monkeypatch.setattr(train, "write_jsonl", after(train.write_jsonl, lambda records, path: (
            str(path).endswith(name))))


# -----------------------------------------------------------------------------
# loss inputs: random ragged batches


def ragged_mask(B, T, lengths, starts):
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, starts[b]:starts[b] + lengths[b]] = True
    return mask


def make_batch(seed=0, dtype=torch.float64, garbage=1e3):
    """6 pairs, 24 columns; ragged lengths (1 to 13), a different start column per row, chosen and
    rejected lengths unequal, and large garbage values off the masks (which must never be read)."""
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 24
    len_w, len_l = [5, 9, 1, 13, 7, 2], [7, 4, 3, 13, 1, 11]
    start_w, start_l = [0, 3, 10, 2, 15, 6], [4, 0, 1, 9, 20, 8]
    cm, rm = ragged_mask(B, T, len_w, start_w), ragged_mask(B, T, len_l, start_l)
    logps = [-torch.rand(B, T, generator=g, dtype=dtype) * 3 for _ in range(4)]
    for x, m in zip(logps, [cm, rm, cm, rm]):
        x[~m] = garbage
    pc, pr, rc, rr = logps
    return dict(policy_chosen_logps=pc.requires_grad_(), policy_rejected_logps=pr.requires_grad_(),
                reference_chosen_logps=rc, reference_rejected_logps=rr,
                chosen_mask=cm, rejected_mask=rm)


# -----------------------------------------------------------------------------
# the slow reference of the loss tests: one pair at a time, segments as Python lists


def response(policy, reference, mask, b, weights=None):
    """The log-ratios ρ_t (times w_t) of row b's response tokens,
    as a Python list of 0-dim tensors."""
    return [(policy[b, t] - reference[b, t]) * (1.0 if weights is None else weights[b, t])
            for t in range(mask.shape[1]) if mask[b, t]]


def split(values, family, size, padded_length=None):
    """The paper's compositions. static: windows of k from the start, last one the remainder,
    over the padded length (positions past the end are ρ = 0).
    adaptive: m segments with boundaries b_i = floor(i*T/m)."""
    if family == "static":
        values = values + [torch.zeros((), dtype=torch.float64)] * (padded_length - len(values))
        return [values[s:s + size] for s in range(0, len(values), size)]
    n = len(values)
    bounds = [i * n // size for i in range(size + 1)]
    return [values[bounds[i]:bounds[i + 1]] for i in range(size)]


def pair_segments(batch, family=None, size=None):
    """Per pair of a make_batch batch, its compared (chosen, rejected) segments of log-ratios as
    Python lists: the whole responses as one segment (family None), or their segments (split)."""
    pc, pr = batch["policy_chosen_logps"], batch["policy_rejected_logps"]
    rc, rr = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    cm, rm = batch["chosen_mask"], batch["rejected_mask"]
    pairs = []
    for b in range(cm.shape[0]):
        rw, rl = response(pc, rc, cm, b), response(pr, rr, rm, b)
        if family is None:
            pairs.append([(rw, rl)])
            continue
        longest = max(len(rw), len(rl))
        pairs.append(list(zip(split(rw, family, size, longest), split(rl, family, size, longest))))
    return pairs


def log_sigmoid(x):
    # fine for the moderate values used here; loss.py uses F.logsigmoid
    return torch.log(torch.sigmoid(x))


def values_and_grads(fn, batch):
    """A loss's per-pair values and the gradients of their sum w.r.t. the policy's chosen and
    rejected log-probs (zeros where the loss reads none: sft and spo read no rejected one)."""
    pc, pr = batch["policy_chosen_logps"], batch["policy_rejected_logps"]
    pc.grad = pr.grad = None
    losses = fn()
    losses.sum().backward()
    grads = [torch.zeros_like(x) if x.grad is None else x.grad.clone() for x in (pc, pr)]
    return losses.detach(), *grads
