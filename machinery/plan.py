"""
The memory plan: what a run needs on each GPU, stage by stage, before renting one, from a
model's config.json alone (no weights: an 8B model plans on a laptop in a minute).

    python train.py --preset llama3_8b_lora --plan true     # the table, then plan_<mode>_peak_gib
    python train.py --init_from folder/with/config.json --plan true --plan_gpus 8 --gpu_gib 80

Each number comes from running the run's own step (train.py's sft_loss / preference_loss, fused
AdamW, the run's micro-batch at max_len tokens) on fake tensors, which have shapes and dtypes but
no memory (torch._subclasses.fake_tensor.FakeTensorMode), CPU tensors under CPU bf16 autocast,
while torch.distributed._tools.mem_tracker.MemTracker follows every tensor's bytes by category.
The parameter, gradient and optimizer bytes it sees are checked against exact counts (numel x
bytes per element, FSDP's padded shards); the activations are its peak, all the rest it saw at
the step's busiest moment (checkpointed inputs, logits chunks, temporaries, FSDP's gathers).

The modes, per GPU: full (full fine-tuning), full_checkpointed (+ activation checkpointing),
lora (--lora_rank or 16, checkpointed), fsdp<N> (full fine-tuning sharded over N GPUs with FSDP2,
bf16 gathers, checkpointed). The stages: sft and po (training steps), reference (the preference
stage's no-grad scoring of 2 x po_batch_size rows), generate (sampling and evaluation: a no-grad
forward of eval_batch_size rows over the whole context, plus the KV cache's bytes, counted).

How the CPU-side estimate relates to a GPU's: the same tensors (CPU's flash attention keeps O(T)
statistics like the GPU's; fused AdamW has no temporaries on either); not seen: the CUDA
context and kernel workspaces (cuBLAS, ~0.5-1 GiB, outside the allocator), the caching
allocator's fragmentation, and NCCL's buffers. So `fits` asks for 10% of the GPU to spare.
"""
import math
import os
from collections import OrderedDict
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.hooks import RemovableHandle

from machinery.checkpoint import _our_checkpoint, checkpoint_config, load_checkpoint
from machinery.common import markdown_table, need, print0
from machinery.config import check_context
from machinery.hf import config_kwargs, hub_download, is_gpt2, is_hub_id
from machinery.lora import apply_lora
from model import GPT, GPTConfig
from machinery.parallel import keep_gathered

GiB = 2 ** 30
HEADROOM = 0.9  # a plan fits a GPU when its peak is at most this fraction of the GPU's memory
STAGES = ("sft", "po", "reference", "generate")


class PeakTracker(MemTracker):
    """MemTracker keeping only the global peak: its per-module peaks (which the plan does not
    use) cost a pass over every module at every op, ~5x the whole trace. Frozen parameters
    (LoRA's base) get a stand-in for the gradient hook MemTracker puts on every parameter, which
    a tensor that takes no gradient refuses."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        hooks = OrderedDict()  # (no hook: removing these stand-ins removes nothing)
        for p in module.parameters():
            if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[p] = (RemovableHandle(hooks),
                                                       RemovableHandle(hooks))
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _update_peak_stats(self, peak_state):
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)

    def bytes(self, kind="current"):  # {category name: bytes} on the one (CPU) device
        snap = next(iter(self.get_tracker_snapshot(kind).values()), {})
        return {getattr(k, "value", k): v for k, v in snap.items()}


def model_config(cfg):
    """The GPTConfig of the run's model, from config.json alone: the flags (scratch), our
    checkpoint's config, or an HF folder's / hub repo's config.json (only that file is fetched);
    checked against the run's lengths, as the run checks the model it loads."""
    source = cfg.init_from
    if source == "scratch":
        vocab = 50257 if cfg.tokenizer == "gpt2" else 257  # (the byte tokenizer's otherwise)
        return GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd)
    path = _our_checkpoint(source)
    if path:
        config = checkpoint_config(load_checkpoint(path, mmap=True), path)
    else:
        if not os.path.isdir(source):
            need(is_gpt2(source) or is_hub_id(source), f"--init_from {source}: no such folder")
            source = hub_download(source, ("config.json",))
        config = GPTConfig(**config_kwargs(source))
    check_context(cfg, config.block_size)
    return config


def micro_rows(cfg, stage, gpus):
    """Rows of one GPU's micro-batch: training splits the global batch over the GPUs and then
    into grad_accum micro-batches; the reference scores all pairs on every GPU, 2 rows each."""
    if stage == "sft":
        return math.ceil(cfg.sft_batch_size / gpus / cfg.grad_accum)
    if stage == "po":
        return 2 * math.ceil(cfg.po_batch_size / gpus / cfg.grad_accum)
    return 2 * cfg.po_batch_size if stage == "reference" else cfg.eval_batch_size


def exact_bytes(model, gpus):
    """(parameters, gradients, AdamW states) in bytes on one GPU, counted: float32 everywhere,
    FSDP's shards padded to ceil(rows / N) rows; AdamW holds exp_avg, exp_avg_sq and a float32
    step per trainable tensor."""
    def on_one(p):
        return math.ceil(p.size(0) / gpus) * (p.numel() // p.size(0)) * p.element_size()
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    grads = sum(map(on_one, trainable))
    return sum(map(on_one, params)), grads, 2 * grads + 4 * len(trainable)


def fake_batch(config, rows, T):  # a batch of `rows` sequences of T tokens, every one scored
    idx = torch.randint(0, config.vocab_size, (rows, T))
    return dict(input_ids=idx, targets=idx, loss_mask=torch.ones(rows, T, dtype=torch.bool),
                reference_logps=torch.zeros(rows, T), rejected_weights=torch.ones(rows // 2, T),
                n=rows)


def build(config, mode, mesh, lora, dtype, training):
    """The model of a mode, on fake tensors: lora = (rank, targets); for fsdp sharded over
    `mesh` (a fake group's)."""
    model = GPT(config)
    model.activation_checkpointing = mode != "full"
    if mode == "lora":
        apply_lora(model, lora[0], 2 * lora[0], lora[1])
    if not training:  # (as parallel.place does for a model that only scores)
        model.requires_grad_(False)
    if mode.startswith("fsdp"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if not training:  # (a model that only scores is kept gathered: parallel.place)
            keep_gathered(model)
    return model


@contextmanager
def fake_group(gpus):
    """A device mesh of `gpus` ranks over PyTorch's fake process group (this process plays rank
    0; collectives return at once), for FSDP's shapes without any GPU. Made outside
    FakeTensorMode; the group is gone after the block (a real run sets up its own after it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"
    dist.init_process_group("fake", rank=0, world_size=gpus, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (gpus,))
    finally:
        dist.destroy_process_group()


def trace(config, mode, stage, rows, T, losses, grad_accum=1, gpus=1, lora=(16, "attn,mlp"),
          kv_len=0):
    """One stage's step in one mode on fake tensors -> {params, grads, optimizer, activations,
    peak} in bytes on one GPU, and `exact`: the counted (params, grads, optimizer)."""
    sharded = mode.startswith("fsdp")
    with fake_group(gpus) if sharded else nullcontext() as mesh, FakeTensorMode():
        training = stage in losses
        model = build(config, mode, mesh, lora, torch.bfloat16, training)
        exact = exact_bytes(model, gpus if sharded else 1)
        batch = fake_batch(config, rows, T)
        tracker = PeakTracker()
        if training:  # fused AdamW, as on a GPU
            optimizer = model.configure_optimizers(0.1, 1e-5, (0.9, 0.95), "cuda")
            tracker.track_external(model, optimizer)
        grad = nullcontext() if training else torch.no_grad()
        with tracker, torch.autocast("cpu", dtype=torch.bfloat16), grad:
            if training:
                loss, _ = losses[stage](model.train(), batch)
                loss.backward()
            else:
                model.eval()(batch["input_ids"], batch["targets"])
        after, top = tracker.bytes(), tracker.bytes("peak")
        optim = 0
        if training:
            with tracker:
                optimizer.step()
            optim = tracker.bytes()["Optstate"]
    params, grads = after["Parameter"], after["Gradient"]
    kv = 2 * config.n_layer * rows * config.kv_heads * config.head_size * kv_len * 2  # bf16
    held = top["Total"] + optim + kv
    if grad_accum > 1:  # later micro-batches run with every gradient of the earlier ones held
        held += grads - top["Gradient"]
    return dict(params=params, grads=grads, optimizer=optim,
                activations=top["Total"] - top["Parameter"] - top["Gradient"] + kv,
                peak=max(held, params + grads + optim),  # (the step itself: fused, in place)
                exact=exact)


def modes(cfg):
    return ["full", "full_checkpointed", "lora", f"fsdp{cfg.plan_gpus}"]


def run_mode(cfg, world):
    """The mode a run with these flags trains in."""
    if cfg.fsdp:
        return f"fsdp{world}"
    if cfg.lora_rank:
        return "lora"
    return "full_checkpointed" if cfg.activation_checkpointing else "full"


def stage_plan(cfg, config, mode, stage, losses):
    """trace() of one stage of the run in one mode, at its micro-batch and lengths."""
    gpus = int(mode[4:]) if mode.startswith("fsdp") else 1
    kv_len = min(config.block_size, cfg.max_len + cfg.max_new_tokens)
    return trace(config, mode, stage, micro_rows(cfg, stage, gpus), cfg.max_len, losses,
                 grad_accum=cfg.grad_accum if stage in losses else 1, gpus=gpus,
                 lora=(cfg.lora_rank or 16, cfg.lora_targets),
                 kv_len=kv_len if stage == "generate" else 0)


def run_stages(cfg):  # the stages a run's flags run (no SFT training with --sft_steps 0)
    return [s for s in STAGES if s != "sft" or cfg.sft_steps > 0]


def gpu_gib(cfg):
    """The GPU memory a plan is held against: --gpu_gib, else this machine's GPU, else 80."""
    if cfg.gpu_gib:
        return cfg.gpu_gib
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.cuda.get_device_properties(local).total_memory / GiB
    return 80.0


def print_plan(cfg, losses):
    """The plan's table (per stage and mode, GiB on one GPU), then one line per mode:
    plan_<mode>_peak_gib: X (the highest stage). Returns {mode: peak GiB}."""
    config = model_config(cfg)
    with torch.device("meta"):  # shapes without storage: a real 8B model is 32 GB
        n = sum(p.numel() for p in GPT(config).parameters())
    memory = gpu_gib(cfg)
    print0(f"plan: {cfg.init_from} ({config.model_type}, {config.n_layer} layers, n_embd "
           f"{config.n_embd}, {n / 1e6:.1f}M parameters), max_len "
           f"{cfg.max_len}, grad_accum {cfg.grad_accum}; GiB per GPU; fits: peak <= "
           f"{HEADROOM:.0%} of {memory:.0f} GiB")
    rows, peaks = [], {}
    for stage in run_stages(cfg):
        for mode in modes(cfg):
            r = stage_plan(cfg, config, mode, stage, losses)
            traced = (r["params"], r["grads"], r["optimizer"])
            need(stage not in losses or traced == r["exact"],  # (no-grad stages: FSDP's root
                 f"plan: {stage} {mode}: traced bytes {traced} are not the exact counts "
                 f"{r['exact']}")                            # stays gathered after them)
            peaks[mode] = max(peaks.get(mode, 0), r["peak"] / GiB)
            rows.append([stage, mode, *(gib(r[k]) for k in
                                        ("params", "grads", "optimizer", "activations", "peak")),
                         "yes" if r["peak"] / GiB <= HEADROOM * memory else "no"])
    header = ["stage", "mode", "params", "grads", "AdamW", "activations", "peak", "fits"]
    print0(markdown_table(header, rows))
    for mode, peak in peaks.items():
        print0(f"plan_{mode}_peak_gib: {peak:.2f}")
    return peaks


def gib(n):  # bytes -> '12.34' (GiB), more digits below 0.1 GiB
    return f"{n / GiB:.2f}" if n >= 0.1 * GiB else f"{n / GiB:.2g}"


def check_fits(cfg, losses):
    """On a GPU (or with --gpu_gib), before any work: the plan of this run's own mode must fit,
    else one line naming the stage, the peak and the ways out."""
    if not (cfg.gpu_gib or (torch.cuda.is_available() and cfg.device != "cpu")):
        return
    memory, mode = gpu_gib(cfg), run_mode(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    config = model_config(cfg)
    for stage in run_stages(cfg):
        peak = stage_plan(cfg, config, mode, stage, losses)["peak"]
        need(peak <= HEADROOM * memory * GiB,
             f"plan: the {stage} stage needs ~{gib(peak)} GiB per GPU in mode {mode}, more than "
             f"{HEADROOM:.0%} of the GPU's {memory:g} GiB: lower --{stage_batch(stage)} (or "
             f"raise --grad_accum), or use --activation_checkpointing true, --lora_rank 16 or "
             f"--fsdp true (see --plan true)")


def stage_batch(stage):
    return {"sft": "sft_batch_size", "po": "po_batch_size", "reference": "po_batch_size",
            "generate": "eval_batch_size"}[stage]
