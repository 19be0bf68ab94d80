"""
FSDP2: a model's weights, gradients and AdamW states split over torchrun's processes, for models
whose training state does not fit one GPU (`torchrun --nproc_per_node=8 train.py ... --fsdp true`).
PyTorch's own engine (torch.distributed.fsdp.fully_shard); this file only puts it in place.

    model = place(model, run, fsdp)           # on this rank's device, or sharded over the ranks
    model = place(model, run, fsdp, whole=True)  # to score and sample: gathered for good
    weights, optim = full_state(model, opt)   # whole, on rank 0: what a checkpoint holds
    load_state(model, opt, weights, optim)    # and back, into a model on one device or sharded

What sharding changes, each handled where it happens:
    each parameter is a DTensor holding 1/N of it; a unit's      place(): fully_shard per block
    forward hook gathers it, so a sharded module must be called   and on the root; generate() is
    (model(x)), never .forward-ed                                 registered as a forward too
    ranks sample different prompts for different numbers of       place(whole=True): every unit
    steps, but each gather is a collective all ranks must join    gathered once, none after
    state dicts of DTensors                                       full_state(), load_state()

torch.distributed.fsdp and torch.distributed.checkpoint are imported where a model is sharded
(about a second: they pull in torch's compiler stack), so that a run without --fsdp never pays
for them.
"""
import sys

import torch

from machinery.lora import lora_settings


def place(model, run, fsdp=False, whole=False):
    """The model on this rank's device; with fsdp, sharded over the ranks: fully_shard on every
    block (gathered for its forward and backward, freed after) and on the root (embeddings, ln_f,
    lm_head). On a GPU the gathered copies are in the compute dtype (bf16) and gradients are
    reduced in float32; the shards stay float32, the optimizer's master weights. The model is
    moved block by block from the CPU, so no GPU ever holds all of it in float32.

    whole=True, for a model that only scores and samples: every unit gathered once and kept
    whole (no reshard after a forward), so that each rank can run its own number of forwards
    (its own prompts, stopping when they do) with no collective in between. decision: this
    costs the whole model in bf16 on every rank (16 GB for an 8B model), and decoding never
    waits for a gather per block per token. Such a model also takes no gradients: autocast keeps
    a bf16 copy of every weight that requires grad for as long as its region lasts (a whole
    generate() call), 2 bytes per parameter that scoring and sampling do not need."""
    if whole:
        model.requires_grad_(False)
    if not fsdp:
        return model.to(run.device)
    from torch.distributed.fsdp import (MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)
    policy = MixedPrecisionPolicy()  # CPU (gloo) or float32: everything in float32
    if run.device_type == "cuda" and run.dtype != "float32":
        policy = MixedPrecisionPolicy(param_dtype=getattr(torch, run.dtype),
                                      reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    register_fsdp_forward_method(model, "generate")  # its pre-forward gathers the root's weights
    if whole:
        keep_gathered(model)
    return model


def keep_gathered(model):
    """Every FSDP unit of `model` gathered now and never resharded after a forward."""
    from torch.distributed.fsdp import FSDPModule
    for unit in (m for m in model.modules() if isinstance(m, FSDPModule)):
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)


def is_sharded(model):
    fsdp = sys.modules.get("torch.distributed.fsdp")  # (not imported yet: nothing is sharded)
    return fsdp is not None and isinstance(getattr(model, "_orig_mod", model), fsdp.FSDPModule)


def full_state(model, optimizer=None):
    """(weights, optimizer state or None) whole: for a sharded model gathered on rank 0 (a
    collective every rank must join; the other ranks get empty dicts), else the state_dict()s.
    Under LoRA the weights are the adapters alone: the frozen base is where the run started.
    decision: the optimizer state of a sharded model is keyed by parameter name (PyTorch's
    distributed format), that of any other by index (torch.optim's): a run folder is resumed
    with the --fsdp it began with (the flag is part of its config)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                   ignore_frozen_params=True)
        weights = get_model_state_dict(model, options=options)
        optim = optimizer and get_optimizer_state_dict(model, optimizer, options=options)
    else:
        weights = model.state_dict()
        optim = optimizer and optimizer.state_dict()
    if lora_settings(model):
        weights = {k: v for k, v in weights.items() if ".lora_" in k}
    return weights, optim


def load_state(model, optimizer, weights, optim):
    """full_state's output back into `model` (on one device or sharded) and `optimizer`. Under
    LoRA `weights` are the adapters: every one must be there, the base is left as it is."""
    lora = lora_settings(model) is not None
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict,
                                                             set_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, strict=not lora)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer, optim, options=options)
        return
    missing, unexpected = model.load_state_dict(weights, strict=not lora)
    adapters = [k for k in missing if ".lora_" in k]
    if unexpected or adapters:
        raise ValueError(f"training state: {(unexpected or adapters)[0]} is "
                         f"{'unexpected' if unexpected else 'missing'}")
    optimizer.load_state_dict(optim)
