"""
Checkpoints: ours (one file, written atomically), and loading a model with its tokenizer from
whatever a run starts from.

    model, tok = load_model("out/default/po/ckpt.pt")    # ours; or an HF folder, a hub id, gpt2
    save_checkpoint("ckpt.pt", model, optimizer, step=7, tokenizer=tok)
    export("out/default/po/ckpt.pt", "out/hf")           # a Hugging Face folder (hf.py)
    export("out/lora/po/ckpt.pt", "out/peft", adapter=True)  # LoRA adapters for peft

A checkpoint records its tokenizer ("byte", "gpt2", or a Hugging Face tokenizer: its name and the
files it was read from, so it loads after the folder moved, or with the hub offline) and the
chat-template setting it was trained with, so load_model gives back the pair a run used.
"""

import json
import os
import tempfile
from dataclasses import asdict, fields

import torch

from machinery.common import atomic_write, process_rank, read_json, write_json
from machinery.hf import (config_kwargs, is_gpt2, is_hub_id, local_folder, save_adapter, save_pretrained,
                state_dict, tokenizer_files, weight_files)
from machinery.lora import apply_lora, base_digest, lora_settings
from model import GPT, LLAMA_FIELDS, GPTConfig
from machinery.parallel import full_state
from machinery.tokenizer import BYTE_DECODER, get_tokenizer, has_hf_tokenizer

# -----------------------------------------------------------------------------
# our checkpoints: one file, written atomically


def save_checkpoint(path, model, optimizer=None, base=None, **extra):
    """torch.save {'format': 'nanoadpo', 'config', 'model', 'optimizer'?, **extra} to `path`,
    atomically (common.atomic_write: an interrupted save leaves the previous checkpoint intact).
    Keep extras to tensors and plain Python values (load_checkpoint reads weights_only); a
    tokenizer object as `tokenizer` is kept as its name and, for a Hugging Face one, its files.
    Every rank calls it (a sharded model is gathered first: parallel.full_state); rank 0 writes.
    A LoRA model's checkpoint holds its adapters, their settings ('lora', with the digest of
    their base), and `base`, the source (load_gpt's) of the frozen weights they sit on; a local
    one also as `base_relative`, its path from the checkpoint's folder (a run folder that moved
    keeps its sft/base.pt)."""
    path = os.fspath(path)
    reserved = {"format", "config", "model", "optimizer", "lora", "base", "base_relative",
                "tokenizer_files"}
    clash = reserved & set(extra)
    if clash:
        raise ValueError(f"save_checkpoint: extra keys {sorted(clash)} are reserved")
    tok = extra.get("tokenizer")
    if tok is not None and not isinstance(tok, str):
        extra["tokenizer"] = tok.name
        if getattr(tok, "files", None):
            extra["tokenizer_files"] = tok.files  # {file name: bytes}
    weights, optim = full_state(model, optimizer)  # (a collective for a sharded model)
    if process_rank() != 0:
        return
    raw = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k.replace("_orig_mod.", ""): v for k, v in weights.items()}
    ckpt = {"format": "nanoadpo", "config": _config_dict(raw.config), "model": state}
    if optimizer is not None:
        ckpt["optimizer"] = optim
    if lora_settings(raw) is not None:
        ckpt.update(lora=lora_settings(raw), base=base)
        if isinstance(base, str) and os.path.exists(base):
            ckpt["base_relative"] = os.path.relpath(base, os.path.dirname(os.path.abspath(path)))
    ckpt.update(extra)
    atomic_write(path, lambda f: torch.save(ckpt, f))


def _config_dict(config):
    """The config as a checkpoint stores it: the fields the Llama family added (LLAMA_FIELDS) only
    where they differ from their defaults, so a GPT-2 checkpoint is exactly what it was before
    them."""
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
    a hub id of a Llama, Qwen2, Qwen3 or Gemma-3 (text) checkpoint (e.g.
    'Qwen/Qwen2.5-0.5B-Instruct'), or
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
        if "lora" in ckpt:  # adapters on a base of their own
            return _lora_model(ckpt, path, overrides)
        config, state, where = checkpoint_config(ckpt, path), ckpt["model"], path
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


def checkpoint_config(ckpt, path):
    """The GPTConfig our checkpoint `ckpt` (read from `path`) records; a field this model.py does
    not know (a checkpoint of another version) is named, not a TypeError."""
    names = {f.name for f in fields(GPTConfig)}
    if not isinstance(ckpt.get("config"), dict) or set(ckpt["config"]) - names:
        raise ValueError(f"{path}: checkpoint config has fields GPTConfig does not know: "
                         f"{ckpt.get('config')}")
    return GPTConfig(**ckpt["config"])


def _lora_model(ckpt, path, overrides):
    """A LoRA checkpoint's model: its base (_lora_base_of) with the adapters put back; the base
    frozen, the adapters trainable. The base must be the model the adapters were trained on: the
    same weights (lora.base_digest, recorded with them), or for a checkpoint from before digests
    the same config."""
    base = _lora_base_of(ckpt, path)
    try:
        model = load_gpt(base, **overrides)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: its LoRA adapters sit on {base}, which cannot be loaded "
                         f"({str(e).splitlines()[0][:200]})") from None
    why = _not_the_base(model, ckpt)
    if why:
        raise ValueError(f"{path}: its base {base} is not the model these adapters were trained "
                         f"on ({why}): restore that base")
    apply_lora(model, **ckpt["lora"])
    adapters = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    _copy_weights_into(adapters, ckpt["model"], path)
    return model


def _lora_base_of(ckpt, path):
    """Where the base of the LoRA checkpoint `ckpt` (read from `path`) is: where it lay relative
    to the checkpoint, if anything is there (a run folder moved or renamed keeps its sft/base.pt,
    and its old path may hold another run's), else ckpt['base'] (a hub id, an absolute path)."""
    base = ckpt.get("base")
    if not isinstance(base, str):
        raise ValueError(f"{path}: LoRA adapters without the name of their base model")
    if ckpt.get("base_relative"):
        near = os.path.join(os.path.dirname(os.path.abspath(path)), ckpt["base_relative"])
        base = os.path.normpath(near) if os.path.exists(near) else base
    return base


def _not_the_base(model, ckpt):
    """Why `model` is not the base of the LoRA checkpoint `ckpt` (None where it is)."""
    ours = {k: v for k, v in _config_dict(model.config).items() if k != "dropout"}
    if ours != {k: v for k, v in ckpt["config"].items() if k != "dropout"}:
        return f"config {_config_dict(model.config)}, expected {ckpt['config']}"
    pinned = ckpt["lora"].get("base_digest")  # (None: a checkpoint from before digests)
    digest = pinned and base_digest(model)
    if digest != pinned:
        return f"weights digest {digest[:12]}…, expected {pinned[:12]}…"
    return None


def _copy_weights(model, state, source):
    """Copy `state` into `model` by name; every key must match in name and shape."""
    _copy_weights_into(model.state_dict(), state, source)


def _copy_weights_into(ours, state, source):
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
    """The config.Settings our checkpoint records it was trained with ({} for any other source,
    and for checkpoints written before they recorded them)."""
    path = _our_checkpoint(os.fspath(source))
    return load_checkpoint(path, mmap=True).get("settings", {}) if path else {}


def check_vocab(tok, model, source):
    """Every id the tokenizer makes must have a row in the model's embedding. decision: special
    tokens past the model's rows are let through while the run never writes them (not its EOS):
    Gemma-3's tokenizer lists <image_soft_token>, id 262144, for the vision models, one past the
    text models' 262144 rows (a prompt holding it is refused by generate)."""
    rows = model.config.vocab_size
    specials = {tok.encode_single_token(t): t for t in tok.special_tokens_set}
    # harmless: a special token that plain text never becomes (the added tokens that are not
    # special, such as Qwen3's <think>, are matched in plain text)
    harmless = all(i in specials and tok.encode_ordinary(specials[i]) != [i]
                   for i in range(rows, tok.n_vocab))
    if not harmless or tok.eot_token >= rows:
        raise ValueError(f"tokenizer '{tok.name}' has {tok.n_vocab} tokens but the model from "
                         f"{source} has a vocabulary of {model.config.vocab_size}: pass the "
                         f"tokenizer the model was trained with (--tokenizer byte | gpt2)")


def load_model(source, tokenizer="auto", chat_template="auto", **overrides):
    """(model, tokenizer) of `source` (see load_gpt and load_tokenizer), checked against each
    other. overrides: dropout, block_size. A path may start with ~ (the home folder)."""
    source = os.path.expanduser(os.fspath(source))
    model = load_gpt(source, **overrides)
    tok = load_tokenizer(source, tokenizer, chat_template)
    check_vocab(tok, model, source)
    return model, tok


def export(source, folder, dtype=None, max_shard_size="5GB", adapter=False):
    """A model (e.g. a run's ckpt.pt) as a Hugging Face folder with its tokenizer's files, for
    transformers, vLLM or lm-evaluation-harness (hf.save_pretrained; LoRA adapters merged into
    the weights). Offline, from what the run has: the tokenizer files the checkpoint keeps, or
    GPT-2's made from tiktoken's (gpt2_tokenizer_files); the special token ids the source's
    generation_config.json lacks come from the tokenizer (the EOS a response ends with).
    adapter=True: a LoRA checkpoint's adapters alone, in PEFT's format (hf.save_adapter), for peft
    to load onto their base, an HF folder or hub id (a base that is one of our checkpoints exports
    to one first: export(base, folder)). Either path may start with ~ (the home folder)."""
    source = os.path.expanduser(os.fspath(source))
    model, tok = load_model(source)
    ours = _our_checkpoint(source)
    if adapter:
        if ours is None or lora_settings(model) is None:
            raise ValueError(f"{source}: not a LoRA checkpoint (expected a ckpt.pt of a run with "
                             f"--lora_rank); export the whole model with adapter=False")
        return save_adapter(model, folder, base=_lora_base_of(load_checkpoint(ours, mmap=True),
                                                              ours))
    eos = list(dict.fromkeys([tok.eot_token, getattr(tok, "eos_token_id", tok.eot_token)]))
    bos = getattr(tok, "bos", None) or [None]  # (Llama-3's <|begin_of_text|>)
    ids = dict(bos_token_id=bos[0], eos_token_id=eos[0] if len(eos) == 1 else eos)
    with tempfile.TemporaryDirectory(prefix="nanoadpo-tokenizer-") as made:
        files = getattr(tok, "files", None)  # the files our checkpoint keeps
        if not files:  # gpt2, byte, an HF source's own, or a checkpoint from before files were kept
            name = tok.name if ours else source
            where = gpt2_tokenizer_files(made) if is_gpt2(name) else name
            files = {n: _read_bytes(p) for n, p in tokenizer_files(where).items()}
        if getattr(tok, "chat_template", None) is None:  # the run's prompts were plain text
            files = _without_chat_template(files)
        for name, content in files.items():
            if name != "config.json":
                with open(os.path.join(made, name), "wb") as f:
                    f.write(content)
        return save_pretrained(model, folder, tokenizer=made, dtype=dtype,
                               max_shard_size=max_shard_size, token_ids=ids)


def _without_chat_template(files):
    """{file name: bytes} of a tokenizer without its chat template (chat_template.jinja,
    chat_template.json, tokenizer_config.json's chat_template), for a run that prompted without
    it (--chat_template none): a client would otherwise prompt in a format the model never saw."""
    files = {n: c for n, c in files.items()
             if n not in ("chat_template.jinja", "chat_template.json")}
    config = json.loads(files.get("tokenizer_config.json", b"{}"))
    if "chat_template" in config:
        del config["chat_template"]
        files["tokenizer_config.json"] = json.dumps(config, indent=2).encode()
    return files


def gpt2_tokenizer_files(folder):
    """GPT-2's tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json,
    generation_config.json) in `folder`, made with the `tokenizers` library from the BPE that
    tiktoken already has: nothing is fetched. tiktoken ranks byte strings; a Hugging Face BPE
    lists merges. Every split of a token into two tokens is a merge, in the order of the merged
    token's rank (the conversion transformers uses for tiktoken models): the lowest merge then
    always makes the lowest-ranked token, as in tiktoken, so the two tokenize alike. -> folder"""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    enc = get_tokenizer("gpt2")
    ranks = enc._mergeable_ranks  # {token bytes: id}: tiktoken's own table (no public accessor)
    text = {b: c for c, b in BYTE_DECODER.items()}  # a byte as byte-level BPE's character

    def spelled(token):
        return "".join(text[b] for b in token)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))
        merges += [(spelled(a), spelled(b)) for a, b in splits]
    bpe = Tokenizer(models.BPE(vocab={spelled(t): i for t, i in ranks.items()}, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    eot = "<|endoftext|>"
    bpe.add_special_tokens([AddedToken(eot, special=True)])  # id 50256, after the vocabulary
    assert bpe.token_to_id(eot) == enc.eot_token
    bpe.save(os.path.join(folder, "tokenizer.json"))
    write_json(os.path.join(folder, "tokenizer_config.json"), dict(
        tokenizer_class="GPT2Tokenizer", bos_token=eot, eos_token=eot, unk_token=eot,
        model_max_length=1024, add_prefix_space=False, clean_up_tokenization_spaces=False))
    write_json(os.path.join(folder, "generation_config.json"),
               dict(bos_token_id=enc.eot_token, eos_token_id=enc.eot_token))
    return folder
