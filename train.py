"""
The main job: SFT, then on-policy preference pairs, then preference optimisation (ADPO by default).

    python train.py                                  # embedded default: tiny GPT from scratch, CPU
    python train.py --preset smoke --out_dir out/s   # every stage in seconds (what the tests run)
    python train.py --loss dpo --out_dir out/dpo     # dpo | adpo | ipo | simpo | cdpo | cadpo
                                                     # | hinge | robust | ... (loss.LOSSES)
    python train.py --loss hinge:adaptive:16         # any pairwise loss at ADPO's granularities
    python train.py --loss dpo+sft --loss_weights 1,0.5  # weighted combinations (TRL's RPO, MPO)
    python train.py --family adaptive --size 256     # ADPO's headline granularity (paper Table 2)
    python train.py --family static --size 4         # static windows of 4 tokens (paper Table 3)
    python train.py --preset gpt2_gsm8k              # GPT-2 124M on GSM8K, one GPU
    python train.py --stop_after sft                 # the stages up to SFT; re-run to continue
    python train.py --compare dpo,adpo,adpo:static:4,adpo:adaptive:16,ipo,simpo --seeds 0,1,2
                                                     # Table 3 in miniature: same SFT, same pairs
    python train.py --compare dpo,hinge,hinge:adaptive:16,ipo:static:4,dpo+0.5sft,robust@beta=1
                                                     # loss x granularity, weighted sums, settings
    python train.py --compare dpo,adpo --pipeline_seeds 0,1,2   # the whole pipeline per seed
    python train.py --preset length                  # the paper's length question (1-6 step problems)
    python train.py --preset arith_gpu               # Table 3's sweep, sized for one GPU
    torchrun --nproc_per_node=2 train.py ...         # data parallel over 2 GPUs (or CPU processes)

Every flag is a field of `Config` (machinery/config.py; `--help` lists them), given as `--key value`;
`--preset NAME` loads presets/NAME.json first and the flags you give override it. Each stage reads
the folders of the stages before it and writes its own; re-running the same command on a run
folder resumes it where it stopped.

    DIR/config.json          the resolved config: a run folder belongs to one config
    DIR/sft/                 ckpt.pt (the reference of stage 3), metrics.jsonl, eval.json
    DIR/pairs/               train.jsonl, val.jsonl (held out), stats.json, samples_*.jsonl
    DIR/cdpo/                positive/, negative/ (cDPO's two models), weights.pt: cdpo/cadpo only
    DIR/po/                  ckpt.pt, reference_logps.pt, metrics.jsonl, eval.json
    DIR/compare/<variant>/   like po/, one folder per variant and seed (--compare)
    DIR/summary.json         read back from the folders at the end (+ curves.png, compare.md)
    DIR/seed_<s>/            with --pipeline_seeds: a run folder like the above per seed, and
                             DIR/compare.{json,md,png} pooling them
"""
import dataclasses
import math
import os
import sys
import time
from collections import Counter
from functools import lru_cache, partial

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from data import (encode_pairs, encode_sft, grader, is_correct, length_grouped_batches, load_pairs,
                  load_split, make_arith_pairs, pairs_from_samples, preference_batch, render_pairs,
                  row_lengths, sft_batch, split_pairs)
from eval import complete, evaluate_stage, pair_logps
from loss import (WEIGHTED, chosen_nll, contrastive_weights, ld_desensitised, preference_metrics,
                  wpo_weights)
from model import GPT, GPTConfig
from machinery import tracking
from machinery.checkpoint import (load_checkpoint, load_gpt, load_model, load_tokenizer,
                                  save_checkpoint)
from machinery.common import (all_sum, append_jsonl, atomic_write, barrier, changed_flags, cli,
                              file_digest, need, parse, peak_flops, print0, progress_bar,
                              read_json, read_jsonl, read_run_file, seed_for, setup, write_json,
                              write_jsonl)
from machinery.compare import pipelines, variant_label, variants
from machinery.config import Config, check_context, resolve_loss, settings_of, validate
from machinery.inputs import open_run_folder
from machinery.lora import apply_lora, base_digest, lora_settings, lora_targets
from machinery.parallel import load_state, place
from machinery.report import report_pipelines, report_run
from machinery.tokenizer import get_tokenizer


def check_loss_at_start(cfg):
    """At step 0 the policy is the reference (every log-ratio 0): the loss then depends on β (γ)
    and the lengths alone. Where even that is out of float32's range (IPO's (1/(2β))² at
    β = 1e-20), no learning rate is to blame: say so before any work. Checked on the largest
    micro-batch a step takes: its pairs with max_len scored tokens each."""
    B, T = math.ceil(cfg.po_batch_size / cfg.grad_accum), cfg.max_len
    zeros = torch.zeros(2 * B, T)  # (2B, T) log πθ = log πref (SimPO, reference-free: log 1)
    batch = dict(input_ids=None, targets=None, loss_mask=torch.ones(2 * B, T, dtype=torch.bool),
                 reference_logps=zeros, rejected_weights=torch.ones(B, T), delta=0.0)
    loss = preference_loss(lambda idx, targets: zeros, batch, resolve_loss(cfg))[0].item()
    knob = "--gamma" if cfg.loss == "simpo" else "--beta"
    need(math.isfinite(loss), f"--loss {cfg.loss} {knob} {getattr(cfg, knob[2:])}: the loss is "
                              f"{loss} at step 0 already, where the policy is the reference: "
                              f"out of float32's range (expected a "
                              f"{'smaller' if knob == '--gamma' else 'larger'} {knob})")


# -----------------------------------------------------------------------------
# the two losses: summed over their units (response tokens, pairs); train() divides once.
# `model` is the GPT, or its DDP / torch.compile wrapper: model(idx, targets) -> (B, T) log-probs


def sft_loss(model, batch):
    """NLL of the response tokens and their EOS, summed over tokens; the prompt is not trained."""
    logps = model(batch["input_ids"], batch["targets"])  # (B, T) float32: log p(y_t | x, y_<t)
    nll = -torch.where(batch["loss_mask"], logps, 0.0).sum()
    return nll, {"loss": nll.detach()}


class RewardMean:
    """bco_pair's reward shift δ (BCO, Jung et al. 2024): the running mean of the rewards β Σ_t ρ_t
    of the pairs trained on so far, chosen and rejected alike. It is state across steps, held
    here and not in the loss: train() updates it after every step and keeps it in the training
    state (state.pt), since no weights can give it back. decision: δ at step s is the mean, over
    the steps before s, of each step's batch mean (TRL's old RunningMoments also counted the
    batch at hand), so that every micro-batch and rank of a step uses the same δ."""

    def __init__(self):
        self.value = 0.0  # δ
        self.steps = 0    # the steps it averages

    def update(self, logged):
        """After a step: `logged` holds its global means over the pairs (every rank and
        micro-batch)."""
        batch_mean = (logged["rewards/chosen"] + logged["rewards/rejected"]) / 2
        self.steps += 1
        self.value += (batch_mean - self.value) / self.steps

    def state_dict(self):
        return {"value": self.value, "steps": self.steps}

    def load_state_dict(self, state):
        self.value = state["value"]
        self.steps = state["steps"]


def preference_loss(model, batch, objective):
    """The paper's step: score chosen and rejected responses in one forward and compare them with
    the frozen reference through every term of --loss (ADPO alone by default), each summed over
    the B pairs and weighted by --loss_weights. objective: config.resolve_loss(cfg), made once."""
    logps = model(batch["input_ids"], batch["targets"])  # (2B, T) float32: log πθ(y_t | x, y_<t)
    ref = batch["reference_logps"]                       # (2B, T) log πref, precomputed
    mask = batch["loss_mask"]                            # (2B, T) True on response tokens + EOS
    B = mask.size(0) // 2                                # rows [0, B): chosen, [B, 2B): rejected
    six = (logps[:B], logps[B:], ref[:B], ref[B:], mask[:B], mask[B:])
    # -- the extensions beyond the paper's step (each off by default; docs/losses.md) ----------
    # LD-DPO: the log-ratios of the tokens past the shorter response of a pair count α times
    ld = six if objective.ld_alpha == 1 else ld_desensitised(*six, ld_alpha=objective.ld_alpha)
    # WPO: each pair weighted by how likely the policy is to produce it, (B,), no gradient
    pair_weights = wpo_weights(*six[:2], *six[4:]) if objective.use_weighting else 1.0
    # ---------------------------------------------------------------------------------------------
    loss = 0.0
    for term in objective.terms:
        # from the batch, where it has them: cDPO's token weights, BCO's running shift δ
        given = {key: batch[key] for key in term.from_batch if key in batch}
        inputs = ld if term.desensitised else six
        losses, _, _ = term.fn(*inputs, **term.options, **given)  # (B,) one loss per pair
        loss = loss + term.weight * (pair_weights * losses).sum()
    if objective.nll_weight:  # + λ · NLL of the chosen response: keeps its probability up
        loss = loss + objective.nll_weight * chosen_nll(logps[:B], mask[:B]).sum()
    family, size = objective.metric_grain
    metrics = preference_metrics(*(t.detach() for t in six), beta=objective.beta, family=family,
                                 size=size)  # means over the B pairs
    if objective.uses("bco_pair"):  # the δ the step used, logged
        metrics["bco/delta"] = logps.new_tensor(batch.get("delta", 0.0))
    return loss, {"loss": loss.detach(), **{k: B * v for k, v in metrics.items()}}


# -----------------------------------------------------------------------------
# the training loop, shared by SFT and preference optimisation


def cosine_lr(step, total, peak, warmup_frac):
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class BatchOrder:
    """order[step]: the global batch (row indices) of a step, len(order) steps. Length-grouped,
    reshuffled each epoch, and a function of the seed alone, so every rank and every resumed run
    rebuilds the same order. One epoch is held at a time (each has as many batches), so a step
    count far beyond the data (--sft_steps 100000000) costs no memory."""

    def __init__(self, rows, batch_size, steps, seed):
        lengths = row_lengths(rows)
        need(lengths, "no training rows to make batches of")
        self.epoch = lru_cache(maxsize=1)(  # epoch -> its batches
            lambda e: length_grouped_batches(lengths, batch_size, seed=seed_for(seed, e)))
        self.per_epoch = len(self.epoch(0))
        self.steps = steps

    def __len__(self):
        return self.steps

    def __getitem__(self, step):
        if not 0 <= step < self.steps:
            raise IndexError(step)
        return self.epoch(step // self.per_epoch)[step % self.per_epoch]


def my_share(batch, cfg, run):
    """This rank's rows of a global batch (every world-th row), cut into up to cfg.grad_accum
    micro-batches, each with a weight. Every rank runs as many as rank 0 (the busiest), padding
    with one row of weight 0 (a short last batch): under DDP every rank must join every gradient
    all-reduce, under FSDP every gather and reduce-scatter of every micro-batch."""
    mine = batch[run.rank::run.world]
    k = min(cfg.grad_accum, len(mine))
    parts = [(mine[len(mine) * a // k:len(mine) * (a + 1) // k], 1.0) for a in range(k)]
    busiest = min(cfg.grad_accum, len(batch[::run.world]))
    return parts + [(batch[:1], 0.0)] * (busiest - k)


def resume(state_path, metrics_path, model, optimizer, scaler, run, loss_state=None):
    """The step to start from: 0, or that of the training state a killed run left behind."""
    step = 0
    if os.path.exists(state_path):
        state = load_checkpoint(state_path, mmap=True)
        load_state(model, optimizer, state["model"], state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if loss_state is not None:
            loss_state.load_state_dict(state["loss_state"])
        step = state["step"]
    if run.master and os.path.exists(metrics_path):  # lines past that step will be logged again
        kept = [m for m in read_jsonl(metrics_path, torn_tail=True) if m["step"] <= step]
        write_jsonl(kept, metrics_path)
    return step


def check_numbers(loss, gnorm, scaler, step, total, name, cfg, run):
    """Stop with one line naming the step, the likely cause and the last good training state
    rather than train on (and save) non-finite numbers. Checked after the optimizer step: the
    weights in memory may be broken by then, but nothing is saved from them."""
    lr = {"sft": "--sft_lr", "cdpo": "--cdpo_lr"}.get(name.split(os.sep)[0], "--po_lr")
    fp16 = run.dtype == "float16"
    blame = f"the learning rate is probably too high (lower {lr})"
    if step == 0:  # the first step's numbers come from the starting weights: nothing updated them
        blame = "before any update, so no learning rate is to blame: the starting model overflows"
    problems = [  # (broken?, what, likely cause); under fp16 GradScaler skips an overflowed step
        (not math.isfinite(loss), f"non-finite loss ({loss})", blame
         + (", or fp16 overflowed (use --dtype bfloat16 or float32)" if fp16 else "")
         + ", or a batch holds broken data"),
        (not math.isfinite(gnorm) and not fp16, f"non-finite gradient norm ({gnorm}) with a "
         f"finite loss", f"{blame}, or " + ("the model's weights overflowed" if step
                                            else "a batch holds broken data")),
        (fp16 and scaler.get_scale() < 1.0, "fp16 gradients overflow at every loss scale "
         "(GradScaler's scale fell below 1)", f"use --dtype bfloat16 or float32, or lower {lr}")]
    for broken, what, cause in problems:
        if broken:
            saved = step - step % cfg.ckpt_every  # the last training state written (0: none yet)
            kept = (f"the last good training state (step {saved}) is kept in "
                    f"{os.path.join(cfg.out_dir, name, 'state.pt')}" if saved else
                    f"no training state was saved yet (one is saved every --ckpt_every "
                    f"{cfg.ckpt_every} steps)")
            raise FloatingPointError(f"[{name}] {what} at step {step + 1}/{total}: {cause}; {kept}")


def train(model, stage_dir, order, make_batch, loss_fn, lr, cfg, run, loss_state=None):
    """Optimise `model` for len(order) steps, order[step] being that step's global batch (row
    indices). make_batch(indices) -> a batch dict whose "n" counts the units the loss averages over;
    loss_fn(model, batch) -> (loss, metrics), each summed over those units. Every cfg.ckpt_every
    steps weights, optimizer, scaler and step go to stage_dir/state.pt; data order and dropout are
    functions of (seed, stage, step, rank), so that is all a killed run needs to resume exactly,
    with `loss_state`: what the loss carries from step to step (bco_pair's RewardMean), updated
    after every step from its global metrics and saved in state.pt with the rest."""
    name = os.path.relpath(stage_dir, cfg.out_dir)
    state_path = os.path.join(stage_dir, "state.pt")
    metrics_path = os.path.join(stage_dir, "metrics.jsonl")
    os.makedirs(stage_dir, exist_ok=True)
    optimizer = model.configure_optimizers(cfg.weight_decay, lr, (0.9, 0.95), run.device_type)
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.dtype == "float16")  # fp16 only
    start = resume(state_path, metrics_path, model, optimizer, scaler, run, loss_state)
    if start:
        print0(f"[{name}] resuming at step {start}/{len(order)} from {state_path}")
    ddp = model  # the module the losses call: DDP synchronises gradients only through forward
    if run.world > 1 and not cfg.fsdp:  # (a sharded model syncs in its own hooks: parallel.py)
        device_ids = [model.lm_head.weight.device.index] if run.device_type == "cuda" else None
        ddp = DDP(model, device_ids=device_ids)
    score = torch.compile(ddp) if cfg.compile else ddp
    model.activation_checkpointing = cfg.activation_checkpointing
    model.train()
    steps = range(start, len(order))
    for step in progress_bar(steps, name, initial=start, total=len(order), unit="step",
                         disable=not run.master):
        t0 = time.time()
        lr_now = cosine_lr(step, len(order), lr, cfg.warmup_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        micro = [(make_batch(ix), w) for ix, w in my_share(order[step], cfg, run)]
        n = all_sum([sum(w * batch["n"] for batch, w in micro)])[0]  # units, all ranks
        torch.manual_seed(seed_for(cfg.seed, name, step, run.rank))  # this step's dropout
        sums = Counter()
        for i, (batch, w) in enumerate(micro):
            batch = {k: v.to(run.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            # DDP all-reduces the gradients in the backward of the last micro-batch only
            ddp.require_backward_grad_sync = i == len(micro) - 1
            with run.ctx:
                loss, metrics = loss_fn(score, batch)
            # We want the gradient of the global mean, Σ loss / n over every rank's micro-batches.
            # DDP averages gradients over ranks (÷ world), so each rank scales its sums by
            # world / n; micro-batches then simply accumulate into .grad.
            scaler.scale(loss * (w * run.world / n)).backward()
            sums.update({k: w * v.float() for k, v in metrics.items()})
        tokens = sum(w * batch["input_ids"].numel() for batch, w in micro)
        totals = all_sum([tokens] + torch.stack(list(sums.values())).tolist())
        logged = {k: v / n for k, v in zip(sums, totals[1:])}  # global means over the units
        if loss_state is not None:  # (the same on every rank: from the global means)
            loss_state.update(logged)
        scaler.unscale_(optimizer)
        # the norm is taken even without clipping (max_norm=inf scales by 1), to check it
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        scaler.step(optimizer)  # (under fp16: skipped when the gradients overflowed)
        scaler.update()
        check_numbers(logged["loss"], float(gnorm), scaler, step, len(order), name, cfg, run)
        optimizer.zero_grad(set_to_none=True)
        tokens_per_s = totals[0] / (time.time() - t0)
        log_step(step + 1, len(order), logged, lr_now, tokens_per_s, model, name, cfg, run)
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < len(order):  # (rank 0 writes it)
            carried = {} if loss_state is None else {"loss_state": loss_state.state_dict()}
            save_checkpoint(state_path, model, optimizer, step=step + 1,
                            scaler=scaler.state_dict(), **carried)
            barrier()  # every rank goes on once the training state is on disk
    model.eval()


def log_step(step, total, logged, lr, tokens_per_s, model, name, cfg, run):
    """Append the step's metrics to metrics.jsonl; print them every cfg.log_every steps."""
    mfu = model.estimate_mfu(tokens_per_s / run.world, peak_flops(run.device))
    if run.master:
        record = {"step": step, **logged, "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu}
        append_jsonl(os.path.join(cfg.out_dir, name, "metrics.jsonl"), record)
        tracking.log(name, step, record)  # --report_to: the same numbers
    if step % cfg.log_every == 0 or step == total:
        shown = " | ".join(f"{k.removeprefix('rewards/')} {v:.4f}" for k, v in logged.items())
        print0(f"[{name}] step {step}/{total} | {shown} | lr {lr:.2e} | "
               f"{tokens_per_s / 1e3:.1f}k tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu else ""))


# -----------------------------------------------------------------------------
# the stages: each reads the folders of the stages before it and writes its own


def bucket(cfg):
    """Under torch.compile, batch lengths are rounded up to a multiple of 64: a few shapes are
    compiled, not one per step."""
    return dict(pad_to=64, max_len=cfg.max_len) if cfg.compile else {}


def sft_ckpt(cfg):
    """DIR/sft/ckpt.pt: the SFT model, the reference (and the start) of every later stage."""
    return os.path.join(cfg.out_dir, "sft", "ckpt.pt")


def build_model(cfg):
    """The model SFT starts from and its tokenizer: a GPT from scratch (on the byte tokenizer,
    unless --tokenizer says otherwise), or --init_from with its own; checked against the lengths."""
    if cfg.init_from == "scratch":
        tok = get_tokenizer("byte" if cfg.tokenizer == "auto" else cfg.tokenizer, cfg.chat_template)
        torch.manual_seed(cfg.seed)  # the initial weights
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=tok.n_vocab,
                              n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                              dropout=cfg.dropout))
    else:
        model, tok = load_model(cfg.init_from, cfg.tokenizer, cfg.chat_template,
                                dropout=cfg.dropout)
    check_context(cfg, model.config.block_size)
    return model, tok


def lora_base(cfg):
    """The frozen weights a LoRA run's adapters sit on (one adapter for the run: SFT trains it
    from B = 0, later stages continue it): --init_from (a local path made absolute), or for a
    model from scratch its initial weights, DIR/sft/base.pt."""
    if cfg.init_from == "scratch":
        return os.path.abspath(os.path.join(cfg.out_dir, "sft", "base.pt"))
    return os.path.abspath(cfg.init_from) if os.path.exists(cfg.init_from) else cfg.init_from


def with_lora(model, tok, cfg):
    """The SFT model under LoRA: adapters on --lora_targets, the rest frozen (the initial
    weights of a model from scratch saved first as its base); without LoRA the model itself."""
    need(lora_settings(model) is None, f"--init_from {cfg.init_from} holds LoRA adapters: start "
                                       f"from its merged export (checkpoint.export) instead")
    if not cfg.lora_rank:
        return model
    lora_targets(model.config, cfg.lora_targets)  # (a bad name fails before base.pt is written)
    if cfg.init_from == "scratch":
        save_checkpoint(lora_base(cfg), model, tokenizer=tok, chat_template=cfg.chat_template)
    return apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout,
                      seed=seed_for(cfg.seed, "lora"),
                      base_digest=base_digest(model))  # (every checkpoint pins its base by it)


def drop_training_state(stage_dir, run):
    """Once the stage's ckpt.pt is written its training state is not needed (also after a kill
    that came between the two)."""
    state = os.path.join(stage_dir, "state.pt")
    if run.master and os.path.exists(state):
        os.remove(state)
    barrier()


def finetune(model, examples, tok, out, steps, batch_size, lr, cfg, run):
    """Supervised fine-tuning on (prompt, response) examples: the NLL of the response tokens
    -> out/ckpt.pt (resumable through out/state.pt)."""
    name = os.path.relpath(out, cfg.out_dir)
    rows, stats = encode_sft(examples, tok, max_len=cfg.max_len, verbose=run.master)
    print0(f"[{name}] {len(rows)} examples ({stats}) | {model.num_params() / 1e6:.2f}M parameters")
    order = BatchOrder(rows, batch_size, steps, seed_for(cfg.seed, name))

    def make_batch(ix):
        batch = sft_batch([rows[i] for i in ix], tok.eot_token, **bucket(cfg))
        return {**batch, "n": batch["loss_mask"].sum().item()}  # the loss is per response token

    train(model, out, order, make_batch, sft_loss, lr, cfg, run)
    save_checkpoint(os.path.join(out, "ckpt.pt"), model, base=lora_base(cfg), tokenizer=tok,
                    chat_template=cfg.chat_template, settings=settings_of(cfg))


def stage_sft(cfg, run):
    """1. SFT: the model learns the worked solutions of the training questions -> DIR/sft/"""
    out = os.path.join(cfg.out_dir, "sft")
    if not os.path.exists(os.path.join(out, "ckpt.pt")):
        model, tok = build_model(cfg)
        model = with_lora(model, tok, cfg)
        finetune(place(model, run, cfg.fsdp), load_split(cfg, "train", tok), tok, out,
                 cfg.sft_steps, cfg.sft_batch_size, cfg.sft_lr, cfg, run)
    drop_training_state(out, run)
    evaluate_stage(out, cfg, run)


def sample_pairs(cfg, run, out):
    """cfg.n_samples completions of each training question from the SFT model, graded against the
    gold answer, one pair per question (data.pairs_from_samples). Each chunk of questions is a file
    of its own: a killed run keeps what it sampled, and chunk c is sampled with
    seed_for(seed, "pairs", c) whichever rank and run samples it."""
    model, tok = load_model(sft_ckpt(cfg))
    model = place(model, run, cfg.fsdp, whole=True).eval()  # (each rank samples its own)
    questions = load_split(cfg, "train", tok)[:cfg.n_pair_questions or None]
    chunk = max(1, cfg.eval_batch_size // cfg.n_samples)  # questions per batch of samples
    starts = range(0, len(questions), chunk)
    files = {c: os.path.join(out, f"samples_{c:06d}.jsonl") for c in starts}
    mine = list(files)[run.rank::run.world]
    for c in progress_bar(mine, "pairs", unit="chunk", disable=not run.master):
        if os.path.exists(files[c]):
            continue
        part = questions[c:c + chunk]
        samples, cut, finished = complete(model, tok, [q["prompt"] for q in part],
                                          n=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
                                          temperature=cfg.temperature, top_k=cfg.top_k or None,
                                          top_p=cfg.top_p, seed=seed_for(cfg.seed, "pairs", c),
                                          batch_size=cfg.eval_batch_size, ctx=run.ctx,
                                          progress=False)
        write_jsonl([dict(question=q["question"], prompt=q["prompt"], answer=q["answer"],
                          kind=grader(q), samples=s, finished=f, prompt_cut=k)
                     for q, s, f, k in zip(part, samples, finished, cut)],
                    files[c])
        print0(f"[pairs] sampled {min(c + chunk, len(questions))}/{len(questions)} questions")
    barrier()
    records = [r for path in files.values() for r in read_jsonl(path)]
    return pairs_from_samples(records)


def stage_pairs(cfg, run):
    """2. Preference pairs: on-policy samples of the SFT model graded against the gold answers, or
    the arith task's offline pairs, or a pair dataset -> DIR/pairs/"""
    out = os.path.join(cfg.out_dir, "pairs")
    if os.path.exists(os.path.join(out, "stats.json")):
        return
    stats = {"source": cfg.pairs_source}
    if cfg.pairs_source == "sample":
        pairs, sampled = sample_pairs(cfg, run, out)
        stats.update(sampled)
    elif cfg.pairs_source == "offline":
        tok = load_tokenizer(sft_ckpt(cfg))
        questions = load_split(cfg, "train", tok)[:cfg.n_pair_questions or None]
        pairs = make_arith_pairs(questions, seed=cfg.seed)
    else:  # a pair file: chat messages rendered for the SFT model (its chat template, if any)
        pairs = render_pairs(load_pairs(cfg.pairs_source, split="train"),
                             load_tokenizer(sft_ckpt(cfg)), verbose=run.master)
    train_pairs, val_pairs, split = split_pairs(pairs, cfg.val_frac, seed=cfg.seed)
    stats.update(split)
    need(train_pairs or not pairs, f"--val_frac {cfg.val_frac} holds out all {len(val_pairs)} "
                                   f"pairs: none is left to train on (lower --val_frac)")
    barrier()  # every rank has seen stats.json missing before rank 0 writes it
    if run.master:
        for name, part in (("train.jsonl", train_pairs), ("val.jsonl", val_pairs)):
            write_jsonl(part, os.path.join(out, name))
            stats[f"sha256/{name}"] = file_digest(os.path.join(out, name))
        write_json(os.path.join(out, "stats.json"), stats)  # last: it marks the stage done
    barrier()
    print0(f"[pairs] { {k: v for k, v in stats.items() if not k.startswith('sha256')} }")


def read_pairs(cfg):
    """The pairs stage's train and held-out pairs, as it wrote them (checked against stats.json:
    pairs edited or cut since then would be trained on under the old numbers)."""
    folder = os.path.join(cfg.out_dir, "pairs")
    stats = read_run_file(os.path.join(folder, "stats.json"))
    parts = []
    for name in ("train.jsonl", "val.jsonl"):
        path = os.path.join(folder, name)
        need(file_digest(path) == stats.get(f"sha256/{name}"),
             f"{path} is not the file the pairs stage wrote (its stats.json says "
             f"{stats.get(name.replace('.jsonl', '_pairs'))} pairs): delete {folder} to rebuild "
             f"the pairs, or restore the file")
        parts.append(read_jsonl(path))
    return parts


def contrastive_examples(cfg, train_pairs):
    """The data of cDPO's two models: (correct, incorrect) lists of dict(prompt, response). With
    sampled pairs, every graded sample the pairs stage drew for a training pair's question (never
    a held-out one); otherwise (decision) the training pairs' chosen and rejected responses."""
    if cfg.pairs_source != "sample":
        return ([dict(prompt=p["prompt"], response=p["chosen"]) for p in train_pairs],
                [dict(prompt=p["prompt"], response=p["rejected"]) for p in train_pairs])
    prompts = {p["prompt"] for p in train_pairs}
    folder = os.path.join(cfg.out_dir, "pairs")
    right, wrong = [], []
    for name in sorted(f for f in os.listdir(folder) if f.startswith("samples_")):
        for r in read_jsonl(os.path.join(folder, name)):
            for sample in (s for s in r["samples"] if s.strip() and r["prompt"] in prompts):
                group = right if is_correct(sample, r["answer"], grader(r)) else wrong
                group.append(dict(prompt=r["prompt"], response=sample))
    return right, wrong


@torch.no_grad()
def token_weights(positive, negative, rows, cfg, run, eot):
    """cDPO's weight w_t of every rejected-response token (its EOS included), one 1-D tensor per
    row: both models score prompt + rejected response, and loss.contrastive_weights combines
    their logits at the positions that predict those tokens."""
    out = []
    for b0 in range(0, len(rows), cfg.po_batch_size):
        chunk = [dict(prompt_ids=r["prompt_ids"], response_ids=r["rejected_ids"])
                 for r in rows[b0:b0 + cfg.po_batch_size]]
        batch = {k: v.to(run.device) for k, v in sft_batch(chunk, eot).items()}
        with run.ctx:
            w = contrastive_weights(positive(batch["input_ids"]), negative(batch["input_ids"]),
                                    batch["targets"])                                 # (B, T)
        out += [w[i][batch["loss_mask"][i]].float().cpu() for i in range(len(chunk))]
    return out


def stage_contrastive(cfg, run):
    """2b. cDPO's contrastive estimation, for the cdpo/cadpo losses only: two copies of the SFT
    model fine-tuned on correct ("positive") and on incorrect ("negative") samples, then the
    weight of every rejected token of the training pairs -> DIR/cdpo/ (weights.pt: one 1-D tensor
    per pair of pairs/train.jsonl, in its order: empty for a pair that max_len drops)"""
    out = os.path.join(cfg.out_dir, "cdpo")
    if os.path.exists(os.path.join(out, "weights.pt")):
        return
    tok = load_tokenizer(sft_ckpt(cfg))
    train_pairs, _ = read_pairs(cfg)
    models = {}
    for name, examples in zip(("positive", "negative"), contrastive_examples(cfg, train_pairs)):
        kind = "correct" if name == "positive" else "incorrect"
        need(examples, f"cDPO's {name} model needs {kind} samples, and the pairs stage drew "
                       f"none: sample more (--n_samples, --n_pair_questions, --temperature)")
        folder = os.path.join(out, name)
        if not os.path.exists(os.path.join(folder, "ckpt.pt")):
            start = place(load_gpt(sft_ckpt(cfg), dropout=cfg.dropout), run, cfg.fsdp)
            finetune(start, examples, tok, folder, cfg.cdpo_steps, cfg.cdpo_batch_size,
                     cfg.cdpo_lr, cfg, run)
        drop_training_state(folder, run)
        model = load_gpt(os.path.join(folder, "ckpt.pt"))
        models[name] = place(model, run, cfg.fsdp, whole=True).eval()
    rows, _ = encode_pairs(train_pairs, tok, max_len=cfg.max_len, verbose=False)
    weights = [torch.zeros(0) for _ in train_pairs]
    for row, w in zip(rows, token_weights(models["positive"], models["negative"], rows, cfg, run,
                                          tok.eot_token)):
        weights[row["idx"]] = w
    if run.master:
        atomic_write(os.path.join(out, "weights.pt"), lambda f: torch.save(weights, f))
    barrier()
    print0(f"[cdpo] token weights of {len(rows)} rejected responses: mean "
           f"{torch.cat(weights).mean():.3f}")


def pair_batch(rows, reference, eot, eos_pad, weights=None, **padding):
    """Pairs as one (2B, T) batch, chosen rows then rejected rows, with the reference's per-token
    log-probs dropped into the same (2B, T) layout; n = B (the loss is per pair). eos_pad: the
    paper's EOS padding of the static family (Objective.eos_pad). With cDPO's token weights (one
    1-D tensor per rejected response), also (B, T) rejected_weights: 1 off the response and on
    the EOS tokens of that padding. padding: bucket(cfg)'s, under torch.compile."""
    batch = preference_batch(rows, eot, eos_pad=eos_pad, **padding)
    mask = batch["loss_mask"]
    batch["reference_logps"] = torch.zeros(mask.shape)  # (2B, T) float32, 0 off the mask
    values = [c for c, _ in reference] + [r for _, r in reference]  # chosen rows, then rejected
    batch["reference_logps"][mask] = torch.cat(values)
    if weights is not None:
        rejected = mask[len(rows):]                                        # (B, T)
        padded = [torch.cat([w, torch.ones(int(m.sum()) - len(w))])
                  for w, m in zip(weights, rejected)]
        batch["rejected_weights"] = torch.ones(rejected.shape)
        batch["rejected_weights"][rejected] = torch.cat(padded)
    return {**batch, "n": len(rows)}


def reference_logps(cfg, run, rows, val_rows, out, eos_pad):
    """The frozen SFT model's per-token log-probs of every pair, computed once (ADPO needs them per
    token, and the reference never changes) and reused every epoch -> out/reference_logps.pt"""
    path = os.path.join(out, "reference_logps.pt")
    if os.path.exists(path):
        return read_run_file(path)
    sft, tok = load_model(sft_ckpt(cfg))
    sft = place(sft, run, cfg.fsdp, whole=True).eval()
    eot = tok.eot_token
    kw = dict(batch_size=cfg.po_batch_size, device=run.device, ctx=run.ctx, progress=run.master,
              eos_pad=eos_pad)
    reference = {"train": pair_logps(sft, rows, eot, desc="reference log-probs", **kw),
                 "val": pair_logps(sft, val_rows, eot, desc="reference log-probs (val)", **kw)}
    if run.master:
        atomic_write(path, lambda f: torch.save(reference, f))
    return reference


def stage_po(cfg, run, out):
    """3. Preference optimisation of the SFT model against its frozen self -> out/ (DIR/po/, or a
    variant's folder under DIR/compare/)"""
    if os.path.exists(os.path.join(out, "eval.json")):
        return
    tok = load_tokenizer(sft_ckpt(cfg))
    pairs_dir = os.path.join(cfg.out_dir, "pairs")
    train_pairs, val_pairs = read_pairs(cfg)
    rows, stats = encode_pairs(train_pairs, tok, max_len=cfg.max_len, verbose=run.master)
    val_rows, _ = encode_pairs(val_pairs, tok, max_len=cfg.max_len, verbose=False)
    need(stats["rows"], f"no preference pairs to train on: the SFT model's finished samples were "
                        f"all right or all wrong, and samples cut at --max_new_tokens make none "
                        f"(see {pairs_dir}/stats.json); sample more (--n_samples, "
                        f"--n_pair_questions, --max_new_tokens) or use --pairs_source offline")
    need(rows, f"all {stats['rows']} training pairs were dropped: none has a response token "
               f"within --max_len {cfg.max_len} ({stats})")
    objective = resolve_loss(cfg)  # --loss, once: what every step computes
    reference = reference_logps(cfg, run, rows, val_rows, out, objective.eos_pad)
    if not os.path.exists(os.path.join(out, "ckpt.pt")):
        policy = place(load_gpt(sft_ckpt(cfg), dropout=cfg.dropout), run, cfg.fsdp)
        print0(f"[{os.path.relpath(out, cfg.out_dir)}] {len(rows)} train pairs, {len(val_rows)} "
               f"val pairs ({stats}) | {variant_label(cfg)}, beta {cfg.beta} | at step 0 the "
               f"policy is the reference: loss T'·ln2 per pair (DPO/ADPO), margins and reward "
               f"accuracy 0, up to float noise (loss.preference_metrics says why)")
        steps = math.ceil(cfg.po_epochs * math.ceil(len(rows) / cfg.po_batch_size))
        order = BatchOrder(rows, cfg.po_batch_size, steps, seed_for(cfg.seed, "po"))
        weights = None
        if objective.uses(*WEIGHTED):  # one per pair of pairs/train.jsonl (rows[i]["idx"])
            weights = read_run_file(os.path.join(cfg.out_dir, "cdpo", "weights.pt"))
            weights = [weights[r["idx"]] for r in rows]
        reward_mean = RewardMean() if objective.uses("bco_pair") else None  # bco_pair's δ

        def make_batch(ix):
            batch = pair_batch([rows[i] for i in ix], [reference["train"][i] for i in ix],
                               tok.eot_token, objective.eos_pad,
                               None if weights is None else [weights[i] for i in ix], **bucket(cfg))
            if reward_mean is not None:  # the shift δ of this step: the mean of the steps before
                batch["delta"] = reward_mean.value
            return batch

        train(policy, out, order, make_batch, partial(preference_loss, objective=objective),
              cfg.po_lr, cfg, run, loss_state=reward_mean)
        save_checkpoint(os.path.join(out, "ckpt.pt"), policy, base=lora_base(cfg), tokenizer=tok,
                        chat_template=cfg.chat_template, settings=settings_of(cfg))
    drop_training_state(out, run)
    evaluate_stage(out, cfg, run, pairs=(rows, val_rows, reference))


# -----------------------------------------------------------------------------
# the run: its folder, its variants, its stages, its report


def check_inputs(cfg):
    """Read the task's splits, and a pair file if one is given, before any work: a bad file fails
    now, not after SFT, and a test question that is also a training question is never silent."""
    test = load_split(cfg, "test")
    need(test, f"--task {cfg.task}: no test questions (a single file keeps about 1 question in 10 "
               f"for testing; or pass a folder with train.jsonl and test.jsonl)")
    seen = {ex["question"] for ex in load_split(cfg, "train")}
    need(seen, f"--task {cfg.task}: no training questions")
    leaked = [ex["question"] for ex in test if ex["question"] in seen]
    need(not leaked, f"--task {cfg.task}: {len(leaked)} of the {len(test)} test questions are also "
                     f"training questions, e.g. {leaked[0][:60]!r}" if leaked else "")
    pairs_done = os.path.exists(os.path.join(cfg.out_dir, "pairs", "stats.json"))
    if cfg.pairs_source not in ("sample", "offline") and cfg.stop_after != "sft" and not pairs_done:
        load_pairs(cfg.pairs_source, split="train")
    return len(test)


def main(argv=None):
    cfg = parse(Config, sys.argv[1:] if argv is None else argv, presets=True)
    validate(cfg)
    check_loss_at_start(cfg)              # a loss out of float32's range already at step 0
    runs = pipelines(cfg)                 # this run, or one per --pipeline_seeds seed
    plans = [variants(sub, check=check_loss_at_start) for sub in runs]  # [(label, cfg, folder)]
    # what plan.py traces
    losses = dict(sft=sft_loss, po=partial(preference_loss, objective=resolve_loss(cfg)))
    from machinery.plan import check_fits, print_plan  # (not at the top: ~1 s of torch imports)
    if cfg.plan:                          # memory per stage and GPU, from config.json; no work
        return print_plan(cfg, losses)
    check_fits(cfg, losses)               # on a GPU: a plan that does not fit fails here
    run = setup(cfg.device, cfg.dtype)    # device, autocast, DDP process group
    need(not cfg.fsdp or (run.world > 1 and run.dtype != "float16"), "--fsdp true shards over "
         "torchrun's processes in bf16 or float32: torchrun --nproc_per_node=N (N >= 2) train.py")
    n_test = check_inputs(cfg)            # (a bad file fails before it claims the folder)
    open_run_folder(cfg)                  # new, or a resume; its inputs pinned; --report_to
    print0(f"device {run.device} | dtype {run.dtype} | world size {run.world} | task {cfg.task}: "
           f"{n_test} test questions | torch {torch.__version__}")
    print0(f"config: {changed_flags(cfg)} (the rest: defaults, see --help; "
           f"all of it: {os.path.join(cfg.out_dir, 'config.json')})")
    t0 = time.time()
    for sub, (plan, baseline) in zip(runs, plans):
        if sub is not cfg:
            open_run_folder(sub)          # DIR/seed_<s>/: a run folder of its own
        stage_sft(sub, run)               # 1. SFT                    -> sft/
        if sub.stop_after != "sft":
            stage_pairs(sub, run)         # 2. on-policy pairs        -> pairs/
        if sub.stop_after == "po" and any(resolve_loss(v).uses(*WEIGHTED) for _, v, _ in plan):
            stage_contrastive(sub, run)   # 2b. cDPO's token weights   -> cdpo/
        if sub.stop_after == "po":
            for _, variant, folder in plan:
                stage_po(variant, run, folder)  # 3. preference stage -> po/ or compare/<variant>/
        if run.master:                    # 4. summary.json, tables, plots: read from the folders
            report_run(sub.out_dir, plan, baseline, run, wall_time_s=time.time() - t0,
                       config=dataclasses.asdict(sub))
    if cfg.pipeline_seeds and run.master:  # 4b. the seeds pooled: DIR/summary.json, compare.*
        report_pipelines(cfg.out_dir, [(sub.out_dir, *plan) for sub, plan in zip(runs, plans)],
                         run, wall_time_s=time.time() - t0, config=dataclasses.asdict(cfg))
    tracking.finish()
    barrier()
    return read_json(os.path.join(cfg.out_dir, "summary.json"))


if __name__ == "__main__":
    cli(main)
