"""
A run's inputs, pinned by their content (DIR/inputs.json): the task file, the model a run starts
from and a pair file are recorded by the first run of a folder that reads them, and a later run
whose input holds other content is refused (moved, the same input; edited, not). eval.py says when
it scores another test set than the run's.
"""
import dataclasses
import os

from machinery import tracking
from machinery.checkpoint import model_files
from machinery.common import (claim_run_folder, content_id, file_digest, pin_inputs,
                              process_rank, read_json, read_run_file)
from machinery.config import RUN_ONLY
from machinery.tables import local_files

# what of a config makes its test set
TEST_SET = ("task", "task_seed", "arith_steps", "arith_max_steps", "arith_max_number", "arith_ops",
            "n_test", "split")

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




def open_run_folder(cfg):
    """Claim cfg.out_dir for this config (a new folder, or the same config to resume it:
    common.claim_run_folder), pin the inputs it reads, and start its tracker (--report_to)."""
    config = dataclasses.asdict(cfg)
    claim_run_folder(cfg.out_dir, config, RUN_ONLY + moved_inputs(cfg),
                     defaults=dataclasses.asdict(type(cfg)()))
    pin_run_inputs(cfg)
    tracking.start(cfg.report_to, cfg.out_dir, config)
