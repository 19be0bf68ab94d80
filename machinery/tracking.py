"""
Run tracking (--report_to): every metric metrics.jsonl has, stage by stage, and each stage's
evaluation, also sent to TensorBoard, Weights & Biases or Trackio, with the run's config.

    tracking.start(cfg.report_to, cfg.out_dir, config)   # train.main, once the folder is claimed
    tracking.log("sft", step, metrics)                    # train.log_step, every training step
    tracking.log("sft", step, results, purge=False)       # eval.evaluate_stage, once a stage
    tracking.finish()

The trackers are optional (pip install tensorboard | wandb | trackio); `none`, the default, sends
nothing anywhere. Only rank 0 reports. Each stage has its own curves: TensorBoard runs
DIR/tensorboard/<stage>/ (sft, po, compare/<variant>, ...) with tags like `loss` and
`rewards/accuracy`; Weights & Biases and Trackio keys `<stage>/<metric>` against `<stage>/step`.

A resumed run continues the same curves. TensorBoard: the first training step a process logs to a
stage purges the events at and after that step (step 1 too), which a killed run logged past its
last training state and the resumed run logs again (SummaryWriter's purge_step). Weights & Biases
and Trackio: the run folder names the tracked run (its id is a digest of the folder's path and
config.json), which is resumed; the steps a killed run logged past its last training state appear
twice there.
"""
import hashlib
import json
import os

from machinery.common import ConfigError, process_rank

REPORT_TO = ("none", "tensorboard", "wandb", "trackio")
PROJECT = "nanoADPO"

_tracker = None  # what start() opened: one per process, like wandb.run


def start(report_to, out_dir, config):
    """Open the tracker of a run (rank 0; a no-op for --report_to none)."""
    global _tracker
    finish()
    if report_to == "none" or process_rank() != 0:
        return
    if report_to not in REPORT_TO:
        raise ConfigError(f"--report_to {report_to!r}: expected one of {', '.join(REPORT_TO)}")
    if report_to == "tensorboard":
        _tracker = TensorBoard(out_dir, config)
    else:
        _tracker = Hosted(report_to, out_dir, config)


def log(stage, step, metrics, purge=True):
    """Report a stage's numbers at a step (numbers only: other values are left out). purge: a
    training step (see the module docstring), not an evaluation logged at the stage's end."""
    if _tracker is not None:
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        _tracker.log(stage, step, numbers, purge)


def finish():
    global _tracker
    if _tracker is not None:
        _tracker.finish()
    _tracker = None


def _require(module, package):
    """The tracker's module, or a one-line error saying how to install its package."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"--report_to {package}: {package} is not installed (pip install "
                          f"{package}), or use --report_to none") from None


def run_id(out_dir):
    """The tracked run of a run folder: the same folder with the same config.json (a resume) is
    the same run; a new folder, or a new config at the same path, is another."""
    with open(os.path.join(out_dir, "config.json"), "rb") as f:
        config = f.read()
    return hashlib.sha256(os.path.realpath(out_dir).encode() + config).hexdigest()[:16]


class TensorBoard:
    """One SummaryWriter (event files) per stage, under DIR/tensorboard/<stage>/."""

    def __init__(self, out_dir, config):
        self.tensorboard = _require("torch.utils.tensorboard", "tensorboard")
        self.folder = os.path.join(out_dir, "tensorboard")
        self.config = "```json\n" + json.dumps(config, indent=2) + "\n```"
        self.writers = {}

    def log(self, stage, step, numbers, purge):
        if stage not in self.writers:
            folder = os.path.join(self.folder, stage)
            new = not os.path.isdir(folder)  # (one a killed run wrote holds the config already)
            # a killed run may have logged this step and later ones, step 1 too: purged
            writer = self.tensorboard.SummaryWriter(folder, purge_step=step if purge else None)
            if new:
                writer.add_text("config", self.config, 0)
            self.writers[stage] = writer
        for k, v in numbers.items():
            self.writers[stage].add_scalar(k, v, step)
        self.writers[stage].flush()  # a kill loses no logged step

    def finish(self):
        for writer in self.writers.values():
            writer.close()


class Hosted:
    """A Weights & Biases or Trackio run, through the module's own init / log / finish (trackio
    mirrors wandb's; both act on the one run of the process). The run folder's id (run_id)
    resumes the tracked run: W&B's run id (the folder's name shown), Trackio's run name. W&B
    also plots each stage against its own step."""

    def __init__(self, module, out_dir, config):
        self.module = _require(module, module)
        self.wandb = module == "wandb"
        named = dict(name=run_id(out_dir))
        if self.wandb:
            named = dict(id=run_id(out_dir), name=os.path.basename(os.path.abspath(out_dir)),
                         dir=out_dir)
        self.module.init(project=PROJECT, config=config, resume="allow", **named)
        self.stages = set()

    def log(self, stage, step, numbers, purge):
        if self.wandb and stage not in self.stages:  # each stage's curves against its own step
            self.module.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.stages.add(stage)
        self.module.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in numbers.items()}})

    def finish(self):
        self.module.finish()
