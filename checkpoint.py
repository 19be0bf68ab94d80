"""
Checkpoints: ours (one file, written atomically), and loading a model with its tokenizer from
whatever a run starts from.

    model, tok = load_model("out/default/po/ckpt.pt")    # ours; or an HF folder, a hub id, gpt2
    save_checkpoint("ckpt.pt", model, optimizer, step=7, tokenizer=tok)
    export("out/default/po/ckpt.pt", "out/hf")           # a Hugging Face folder (hf.py)

A checkpoint records its tokenizer ("byte", "gpt2", or a Hugging Face tokenizer: its name and the
files it was read from, so it loads after the folder moved, or with the hub offline) and the
chat-template setting it was trained with, so load_model gives back the pair a run used.
"""

import os
import tempfile
from dataclasses import asdict, fields

import torch

from common import atomic_write, read_json
from hf import (config_kwargs, is_gpt2, is_hub_id, local_folder, save_pretrained, state_dict,
                tokenizer_files, weight_files)
from model import GPT, GPTConfig
from tokenizer import get_tokenizer, has_hf_tokenizer

# GPTConfig fields added with the Llama family: stored only where they differ from the defaults
LLAMA_FIELDS = ("model_type", "n_kv_head", "head_dim", "n_inner", "norm_eps", "rope_theta",
                "rope_scaling", "tie_embeddings")

# -----------------------------------------------------------------------------
# our checkpoints: one file, written atomically


def save_checkpoint(path, model, optimizer=None, **extra):
    """torch.save {'format': 'nanoadpo', 'config', 'model', 'optimizer'?, **extra} to `path`,
    atomically (common.atomic_write: an interrupted save leaves the previous checkpoint intact).
    Keep extras to tensors and plain Python values (load_checkpoint reads weights_only); a
    tokenizer object as `tokenizer` is kept as its name and, for a Hugging Face one, its files."""
    path = os.fspath(path)
    clash = {"format", "config", "model", "optimizer", "tokenizer_files"} & set(extra)
    if clash:
        raise ValueError(f"save_checkpoint: extra keys {sorted(clash)} are reserved")
    tok = extra.get("tokenizer")
    if tok is not None and not isinstance(tok, str):
        extra["tokenizer"] = tok.name
        if getattr(tok, "files", None):
            extra["tokenizer_files"] = tok.files  # {file name: bytes}
    raw = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}
    ckpt = {"format": "nanoadpo", "config": _config_dict(raw.config), "model": state}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    ckpt.update(extra)
    atomic_write(path, lambda f: torch.save(ckpt, f))


def _config_dict(config):
    """The config as a checkpoint stores it: the fields the Llama family added only where they
    differ from their defaults, so a GPT-2 checkpoint is exactly what it was before them."""
    defaults = {f.name: f.default for f in fields(GPTConfig)}
    return {k: v for k, v in asdict(config).items()
            if k not in LLAMA_FIELDS or v != defaults[k]}


def load_checkpoint(path, map_location="cpu", mmap=False):
    """Read a checkpoint written by save_checkpoint ->
    dict(format, config, model, optimizer?, **extra). mmap=True maps the tensors lazily instead of
    reading them (cheap when only the extras are wanted)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, mmap=mmap,
                          weights_only=True)  # never runs pickled code
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not a readable checkpoint (truncated, corrupt, or holding "
                         f"objects other than tensors and plain Python values): "
                         f"{type(e).__name__}: {reason}") from None
    if (not isinstance(ckpt, dict) or ckpt.get("format") != "nanoadpo"
            or "config" not in ckpt or "model" not in ckpt):
        raise ValueError(f"{path}: not a nanoADPO checkpoint "
                         f"(expected a dict with format='nanoadpo', config and model); "
                         f"for Hugging Face weights pass their folder to load_model")
    return ckpt


def _our_checkpoint(source):
    """The ckpt.pt file `source` names (the file, or a folder holding it), or None."""
    if os.path.isfile(source):
        return source
    path = os.path.join(source, "ckpt.pt")
    return path if os.path.isfile(path) else None

# -----------------------------------------------------------------------------
# loading a model, its tokenizer, or both


def load_gpt(source, **overrides):
    """The network of `source`: one of our checkpoints (a file, or a folder holding ckpt.pt), a
    local Hugging Face folder (config.json + model.safetensors, its shards, or pytorch_model.bin),
    a hub id of a Llama, Qwen2 or Qwen3 checkpoint (e.g. 'Qwen/Qwen2.5-0.5B-Instruct'), or
    'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl'. overrides: dropout=... for fine-tuning
    (default: the checkpoint's), block_size=... smaller than its context (which is cropped)."""
    unknown = set(overrides) - {"dropout", "block_size"}
    if unknown:
        raise ValueError(f"load_gpt: cannot override {sorted(unknown)}; only dropout and "
                         f"block_size")
    src = os.fspath(source)
    path = _our_checkpoint(src)
    if path is not None:
        ckpt = load_checkpoint(path)
        names = {f.name for f in fields(GPTConfig)}
        if not isinstance(ckpt["config"], dict) or set(ckpt["config"]) - names:
            raise ValueError(f"{path}: checkpoint config has fields GPTConfig does not know: "
                             f"{ckpt['config']}")
        config, state, where = GPTConfig(**ckpt["config"]), ckpt["model"], path
    elif os.path.isdir(src) or is_gpt2(src) or is_hub_id(src):  # (checked first: no stray calls)
        folder = local_folder(src)
        paths = weight_files(folder)  # (first: what an empty folder lacks above all)
        config = GPTConfig(**config_kwargs(folder))
        state, where = state_dict(paths, config)
    elif os.sep in src or src.endswith((".pt", ".bin", ".safetensors")):
        raise FileNotFoundError(f"{src}: no such file or folder")
    else:
        raise ValueError(f"unknown model {src!r}: expected one of gpt2, gpt2-medium, gpt2-large, "
                         f"gpt2-xl, a hub id like Qwen/Qwen2.5-0.5B-Instruct, a local Hugging "
                         f"Face folder (config.json + model.safetensors), "
                         f"or a nanoADPO checkpoint file")
    block_size = overrides.get("block_size", config.block_size)
    if block_size > config.block_size:
        raise ValueError(f"load_gpt: block_size={block_size} exceeds the checkpoint's "
                         f"{config.block_size}")
    config.dropout = overrides.get("dropout", config.dropout)
    model = GPT(config)
    _copy_weights(model, state, where)
    if block_size < config.block_size:
        model.crop_block_size(block_size)
    return model


def _copy_weights(model, state, source):
    """Copy `state` into `model` by name; every key must match in name and shape."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(f"{source}: {what} key {keys[0]}{more}")
    with torch.no_grad():
        for k, w in ours.items():
            if state[k].shape != w.shape:
                raise ValueError(f"{source}: {k} has shape {tuple(state[k].shape)}, "
                                 f"expected {tuple(w.shape)}")
            w.copy_(state[k])


def load_tokenizer(source, name="auto", chat_template="auto"):
    """The tokenizer of a model source. name 'auto': the one our checkpoint records (with the
    chat-template setting it was trained with), a Hugging Face folder's or hub repo's own
    tokenizer.json, else GPT-2's (for a GPT-2 only: another model's ids are not GPT-2's); any
    other name goes to tokenizer.get_tokenizer. A Hugging Face tokenizer comes with `.files`,
    {file name: bytes} of the files it was read from, which our checkpoints keep."""
    if name != "auto":
        return get_tokenizer(name, chat_template)
    src = os.fspath(source)
    path = _our_checkpoint(src)
    if path is not None:
        ckpt = load_checkpoint(path, mmap=True)  # the weights stay on disk
        recorded = ckpt.get("tokenizer") or "gpt2"
        template = ckpt.get("chat_template", "auto")
        if ckpt.get("tokenizer_files"):
            return _from_files(ckpt["tokenizer_files"], recorded, template)
        if os.path.isabs(recorded) and not os.path.exists(recorded):
            raise FileNotFoundError(f"{path}: its tokenizer was read from {recorded}, which is "
                                    f"gone (checkpoints written since record the files "
                                    f"themselves): put the folder back there")
        return get_tokenizer(recorded, template)
    if has_hf_tokenizer(src):
        tok = get_tokenizer(src, chat_template)
        tok.files = {n: _read_bytes(p) for n, p in _tokenizer_sources(src).items()}
        return tok
    config = os.path.join(src, "config.json")
    config = read_json(config) if os.path.isfile(config) else {}
    kind = config.get("model_type", "gpt2") if isinstance(config, dict) else "gpt2"
    if kind != "gpt2":  # GPT-2's ids would fit the vocabulary, silently meaning other text
        raise FileNotFoundError(f"{src}: no tokenizer.json, and a {kind} model's ids are not "
                                f"GPT-2's: copy its tokenizer files (tokenizer.json, "
                                f"tokenizer_config.json) into the folder")
    return get_tokenizer("gpt2")


def _tokenizer_sources(source):
    """{file name: path} of what a Hugging Face tokenizer is read from (hf.tokenizer_files, and
    config.json, which may hold its special token ids)."""
    files = tokenizer_files(source)  # (tokenizer.json among them: the tokenizer was read)
    config = os.path.join(os.path.dirname(files["tokenizer.json"]), "config.json")
    return {**files, "config.json": config} if os.path.isfile(config) else files


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _from_files(files, name, chat_template):
    """A Hugging Face tokenizer rebuilt from the files a checkpoint keeps (written to a temporary
    folder, read, removed), under the name it was trained with."""
    with tempfile.TemporaryDirectory(prefix="nanoadpo-tokenizer-") as folder:
        for file, content in files.items():
            with open(os.path.join(folder, os.path.basename(file)), "wb") as f:
                f.write(content)
        tok = get_tokenizer(folder, chat_template)
    tok.name = name
    tok.files = files
    return tok


def model_files(source):
    """The local files a model source is read from (what pins a run to the model it starts
    from): our checkpoint; an HF folder's config.json, weights and tokenizer files; none for a
    hub id or a GPT-2 name (the hub's cache answers for those) or a source that is not there."""
    src = os.fspath(source)
    path = _our_checkpoint(src)
    if path is not None:
        return [path]
    if not os.path.isfile(os.path.join(src, "config.json")):
        return []
    config_kwargs(src)  # a broken config.json: the one-line error loading it gives
    weights = weight_files(src)
    extra = _tokenizer_sources(src) if has_hf_tokenizer(src) else {}
    return [os.path.join(src, "config.json"), *weights,
            *(p for n, p in sorted(extra.items()) if n != "config.json")]


def load_settings(source):
    """The eval.Settings our checkpoint records it was trained with ({} for any other source,
    and for checkpoints written before they recorded them)."""
    path = _our_checkpoint(os.fspath(source))
    return load_checkpoint(path, mmap=True).get("settings", {}) if path else {}


def check_vocab(tok, model, source):
    """Every id the tokenizer makes must have a row in the model's embedding."""
    if tok.n_vocab > model.config.vocab_size:
        raise ValueError(f"tokenizer '{tok.name}' has {tok.n_vocab} tokens but the model from "
                         f"{source} has a vocabulary of {model.config.vocab_size}: pass the "
                         f"tokenizer the model was trained with (--tokenizer byte | gpt2)")


def load_model(source, tokenizer="auto", chat_template="auto", **overrides):
    """(model, tokenizer) of `source` (see load_gpt and load_tokenizer), checked against each
    other. overrides: dropout, block_size."""
    model = load_gpt(source, **overrides)
    tok = load_tokenizer(source, tokenizer, chat_template)
    check_vocab(tok, model, source)
    return model, tok


def export(source, folder, dtype=None, max_shard_size="5GB"):
    """A model (e.g. a run's ckpt.pt) as a Hugging Face folder with its tokenizer's files, for
    transformers, vLLM or lm-evaluation-harness (hf.save_pretrained); the special token ids the
    source's generation_config.json lacks come from the tokenizer (the EOS a response ends with)."""
    model, tok = load_model(source)
    eos = list(dict.fromkeys([tok.eot_token, getattr(tok, "eos_token_id", tok.eot_token)]))
    bos = getattr(tok, "bos", None) or [None]  # (Llama-3's <|begin_of_text|>)
    ids = dict(bos_token_id=bos[0], eos_token_id=eos[0] if len(eos) == 1 else eos)
    if not getattr(tok, "files", None):  # gpt2, byte, or a checkpoint from before files were kept
        files = tok.name if _our_checkpoint(os.fspath(source)) else os.fspath(source)
        return save_pretrained(model, folder, tokenizer=files, dtype=dtype,
                               max_shard_size=max_shard_size, token_ids=ids)
    with tempfile.TemporaryDirectory(prefix="nanoadpo-tokenizer-") as files:
        for name, content in tok.files.items():
            if name != "config.json":
                with open(os.path.join(files, name), "wb") as f:
                    f.write(content)
        return save_pretrained(model, folder, tokenizer=files, dtype=dtype,
                               max_shard_size=max_shard_size, token_ids=ids)
