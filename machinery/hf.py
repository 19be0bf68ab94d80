"""
Hugging Face in and out: the hub, config.json, the names of the weights, and the export.

    folder = local_folder("Qwen/Qwen2.5-0.5B-Instruct")  # a hub id, a GPT-2 name or a folder
    config = GPTConfig(**config_kwargs(folder))           # config.json -> model.py's config
    state, _ = state_dict(weight_files(folder), config)   # the weights under model.py's names
    save_pretrained(model, "out/hf", tokenizer=folder)    # the way back: a folder transformers,
                                                          # vLLM and lm-eval load

The mapping is plain dicts and tensors: this file imports nothing of the project but common.py,
and model.py knows nothing of Hugging Face. checkpoint.py puts the pieces together
(load_model). `transformers` is never imported; it is only the reference the tests compare with.

What differs between their layout and ours, each handled where it happens:
    GPT-2 stores four weights as Conv1D (in, out)          CONV1D_WEIGHTS, transposed
    the hub's gpt2* files lack the "transformer." prefix   _gpt2_state_dict
    q, k, v (and gate, up) are separate matrices there     llama_keys: stacked into one matmul
    a tied lm_head is left out of the files                _gpt2_state_dict, _llama_state_dict
    config.json comes in two layouts (the hub's, and       _llama_config, _gemma3_config
    transformers 5's rope_parameters)
    Gemma-3's post_attention_layernorm follows attention   llama_keys
    (Llama's is the norm before the MLP)
"""

import glob
import json
import math
import os
import pickle
import re
import shutil
import uuid
from contextlib import contextmanager
from functools import partial

import torch

from machinery.common import atomic_write, read_json

# also accepted as "openai-community/<name>"
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# Hugging Face's model_type -> its architecture; the model types this mapping knows
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}
# GPT-2 checkpoints store these four weights as Conv1D (in, out); nn.Linear wants (out, in).
# Biases are 1D.
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight",
                  ".mlp.c_fc.weight", ".mlp.c_proj.weight")

# -----------------------------------------------------------------------------
# the hub: one client (huggingface_hub's snapshot_download), one error text

# what we fetch from a hub repo: the config, safetensors weights and tokenizer files, nothing else
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
MODEL_FILES = ("config.json", "model*.safetensors", "model.safetensors.index.json",
               *TOKENIZER_FILES)
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # PEFT's
HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


def is_gpt2(name):
    """'gpt2', 'gpt2-medium', ... or 'openai-community/gpt2-xl'."""
    return name.removeprefix("openai-community/") in GPT2_NAMES


def is_hub_id(name):
    """'Qwen/Qwen2.5-0.5B-Instruct' is; a path that exists, or ends like a weights file, is not."""
    return (HUB_ID_RE.fullmatch(name) is not None and not os.path.exists(name)
            and not name.endswith((".pt", ".bin", ".safetensors", ".json")))


def hub_download(repo_id, patterns):
    """The local folder holding a hub repo's files that match `patterns`, fetched once by
    huggingface_hub and cached the usual way (offline, it answers from the cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError
    try:
        return snapshot_download(repo_id, allow_patterns=list(patterns))
    except RepositoryNotFoundError:  # also a gated repo (Llama) without an accepted license
        raise FileNotFoundError(f"{repo_id!r}: no such local folder, and no hub repo the hub "
                                f"lets us read (gated models such as Llama need their license "
                                f"accepted on the hub and `hf auth login`)") from None
    except Exception as e:  # connection, timeout, offline mode: the hub client raises many kinds
        raise ConnectionError(f"{repo_id!r} is no local folder, and the Hugging Face hub cannot "
                              f"be reached to get it (offline, or not cached); download it where "
                              f"there is a connection and pass its local folder instead "
                              f"[{type(e).__name__}]") from None


def local_folder(source):
    """The local folder of a model: `source` itself if it is a folder; for a hub id or a GPT-2
    name, its config, weights and tokenizer files fetched from the hub (once; then cached)."""
    if os.path.isdir(source):
        return source
    if is_gpt2(source):  # (GPT-2's own tokenizer is tiktoken's "gpt2": no files needed)
        folder = hub_download(source, ("config.json", "model.safetensors"))
        if not os.path.isfile(os.path.join(folder, "model.safetensors")):
            folder = hub_download(source, ("config.json", "pytorch_model.bin"))  # older repos
        return folder
    return hub_download(source, MODEL_FILES)


def tokenizer_files(source):
    """{file name: local path} of the tokenizer files (and generation_config.json) of an HF
    folder or hub repo; GPT-2's for 'gpt2'; none for 'none', our byte tokenizer, or no source."""
    if source in (None, "none", "byte"):
        return {}
    if is_gpt2(source):
        source = "openai-community/gpt2"  # every GPT-2 size shares this tokenizer
    if not os.path.isdir(source) and not is_hub_id(source):
        raise FileNotFoundError(f"{source}: the tokenizer folder this model came from is gone; "
                                f"pass save_pretrained(..., tokenizer='its/folder' or 'none')")
    folder = source if os.path.isdir(source) else hub_download(source, TOKENIZER_FILES)
    return {name: os.path.join(folder, name) for name in TOKENIZER_FILES
            if os.path.isfile(os.path.join(folder, name))}

# -----------------------------------------------------------------------------
# config.json -> the keyword arguments of model.GPTConfig


def config_kwargs(folder):
    """GPTConfig's keyword arguments from an HF folder's config.json (GPT-2 here, the Llama family
    in _llama_config); anything this model would silently compute differently is refused."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder}: folder has no config.json (expected a Hugging Face "
                                f"model folder or a folder holding our ckpt.pt)")
    cfg = read_json(config_path)  # a broken file names itself
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_path}: expected a JSON object (a Hugging Face config)")
    if cfg.get("model_type") == "gemma3_text":
        return _gemma3_config(cfg, config_path)
    if cfg.get("model_type") in ARCHITECTURES and cfg["model_type"] != "gpt2":
        return _llama_config(cfg, config_path)
    refuse = partial(_refuse, config_path, cfg, "GPT-2")
    if cfg.get("model_type", "gpt2") != "gpt2":
        refuse("model_type", f"one of {', '.join(ARCHITECTURES)}")
    for key in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):
        if not _count(cfg.get(key)):
            refuse(key, "an integer >= 1")
    # same tanh GELU
    if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        refuse("activation_function", "'gelu_new'")
    if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]):
        refuse("n_inner", f"null or 4*n_embd = {4 * cfg['n_embd']}")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if not _number(eps) or not math.isclose(eps, 1e-5, rel_tol=1e-6):
        refuse("layer_norm_epsilon", "1e-05")
    for key, default in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("reorder_and_upcast_attn", False), ("add_cross_attention", False),
                         ("tie_word_embeddings", True)):
        if cfg.get(key, default) != default:
            refuse(key, default)
    if cfg["n_embd"] % cfg["n_head"] != 0:
        refuse("n_embd", f"a multiple of n_head={cfg['n_head']}")
    # HF's attn/embd/resid_pdrop (0.1) are for pretraining;
    # fine-tuning here runs without dropout by default
    return dict(block_size=cfg["n_positions"], vocab_size=cfg["vocab_size"],
                n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                dropout=0.0, bias=True)


def _refuse(config_path, cfg, model, key, expected):
    """config.json's `key` is a value `model` would compute differently: one line naming both."""
    raise ValueError(f"{config_path}: {key}={cfg.get(key)!r} cannot be represented "
                     f"by this {model} (expected {expected})")


def _count(value):
    """A size read as what it is: an int >= 1 (JSON's true is no 1, 0 heads no model)."""
    return type(value) is int and value >= 1


def _number(value):
    """A finite int or float, not a bool (nor a string holding a number)."""
    return type(value) in (int, float) and math.isfinite(value)


LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _llama_config(cfg, config_path):
    """GPTConfig's keyword arguments from a Llama / Qwen2 / Qwen3 config.json in either layout:
    the hub's (rope_theta, rope_scaling at the top level) or transformers 5's (rope_parameters)."""
    refuse = partial(_refuse, config_path, cfg, f"{cfg['model_type']} model")
    _check_shape(cfg, refuse)
    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "'silu' (SwiGLU)")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):  # (Qwen2's q/k/v biases are
        if cfg.get(key, False):                                        # part of its model_type)
            refuse(key, "false")
    if any(kind != "full_attention" for kind in cfg.get("layer_types") or ()):
        refuse("layer_types", "full_attention in every layer")
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or 0
    key = "rope_parameters" if cfg.get("rope_parameters") is not None else "rope_scaling"
    if not isinstance(cfg.get(key) or {}, dict):
        refuse(key, "an object, or null")
    if key == "rope_parameters":  # transformers 5
        rope = cfg["rope_parameters"]
    else:  # the hub's files
        rope = dict(cfg.get("rope_scaling") or {})
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    theta = rope.get("rope_theta", 10000.0)
    if not (_number(theta) and theta > 0):
        refuse("rope_theta" if key == "rope_scaling" else key, "a rope_theta > 0")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        refuse(key, "no scaling, or rope_type 'llama3'")
    if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse("partial_rotary_factor", "1.0")
    scaling = {k: rope.get(k) for k in LLAMA3_ROPE} if kind == "llama3" else None
    if scaling and not all(map(_number, scaling.values())):
        refuse(key, f"numbers for {', '.join(LLAMA3_ROPE)}")
    return dict(model_type=cfg["model_type"], block_size=cfg["max_position_embeddings"],
                vocab_size=cfg["vocab_size"], n_layer=cfg["num_hidden_layers"],
                n_head=heads, n_embd=cfg["hidden_size"], dropout=0.0, bias=False,
                n_kv_head=kv_heads or None, head_dim=cfg.get("head_dim"),
                n_inner=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=scaling,
                tie_embeddings=cfg.get("tie_word_embeddings", False))


def _check_shape(cfg, refuse):
    """The sizes every Llama-family or Gemma config.json needs, read as what they are (an int >= 1:
    JSON's true is no 1, and 0 heads no model), and heads that divide evenly."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings"):
        if not _count(cfg.get(key)):
            refuse(key, "an integer >= 1")
    eps = cfg.get("rms_norm_eps")
    if eps is not None and not (_number(eps) and eps > 0):
        refuse("rms_norm_eps", "a number > 0")
    if cfg.get("tie_word_embeddings") not in (None, True, False):
        refuse("tie_word_embeddings", "true or false")
    if cfg.get("head_dim") is not None and not _count(cfg["head_dim"]):
        refuse("head_dim", "an integer >= 1, or null")
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or 0
    if type(kv_heads) is not int or kv_heads < 0 or (kv_heads and heads % kv_heads):
        refuse("num_key_value_heads", f"an integer that divides num_attention_heads={heads}")
    if cfg.get("head_dim") is None and cfg["hidden_size"] % heads:
        refuse("hidden_size", f"a multiple of num_attention_heads={heads}, or a head_dim")


# what transformers' Gemma3TextConfig assumes for a key its config.json leaves out
GEMMA3_DEFAULTS = dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                       rope_theta=1e6, rope_local_base_freq=1e4, rms_norm_eps=1e-6,
                       max_position_embeddings=131072, tie_word_embeddings=True,
                       sliding_window_pattern=6, hidden_activation="gelu_pytorch_tanh")


def _gemma3_config(cfg, config_path):
    """GPTConfig's keyword arguments from a Gemma-3 text config.json (Gemma3ForCausalLM) in
    either layout: the hub's (rope_theta and rope_scaling for the global layers,
    rope_local_base_freq for the local ones, layer_types or the older sliding_window_pattern:
    every n-th layer global) or transformers 5's (rope_parameters per kind of layer)."""
    cfg = {**GEMMA3_DEFAULTS, **cfg}  # (a refused key shows the value the model would use)
    refuse = partial(_refuse, config_path, cfg, "gemma3_text model")
    _check_shape(cfg, refuse)
    if cfg["hidden_activation"] != "gelu_pytorch_tanh":
        refuse("hidden_activation", "'gelu_pytorch_tanh' (GeGLU with the tanh GELU)")
    for key in ("attention_bias", "use_bidirectional_attention", "attn_logit_softcapping"):
        if cfg.get(key):  # (attention logit soft-capping: Gemma-2's, not Gemma-3's)
            refuse(key, "false or null")
    n = cfg["num_hidden_layers"]
    pattern = cfg.get("_sliding_window_pattern", cfg["sliding_window_pattern"])
    kinds = cfg.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0
                                       else "sliding_attention" for i in range(n)]
    if len(kinds) != n or set(kinds) - {"full_attention", "sliding_attention"}:
        refuse("layer_types", f"full_attention or sliding_attention for each of the {n} layers")
    if cfg.get("rope_parameters") is not None:  # transformers 5: one entry per kind of layer
        key, rope = "rope_parameters", cfg["rope_parameters"]
        full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    else:  # the hub's: rope_scaling is the global layers'
        key = "rope_scaling"
        full = dict(cfg.get("rope_scaling") or {}, rope_theta=cfg["rope_theta"])
        local = dict(rope_theta=cfg["rope_local_base_freq"])
    kind = full.get("rope_type", full.get("type", "default"))
    if kind not in ("default", "linear") or local.get("rope_type", "default") != "default":
        refuse(key, "the global layers' rope unscaled or 'linear', the local ones' unscaled")
    if kind == "linear" and not isinstance(full.get("factor"), (int, float)):
        refuse(key, "a number for the linear scaling's factor")
    window = cfg.get("sliding_window")
    if "sliding_attention" in kinds and not (isinstance(window, int) and window >= 1):
        refuse("sliding_window", "an integer >= 1")
    return dict(model_type="gemma3_text", block_size=cfg["max_position_embeddings"],
                vocab_size=cfg["vocab_size"], n_layer=n, n_head=cfg["num_attention_heads"],
                n_embd=cfg["hidden_size"], dropout=0.0, bias=False,
                n_kv_head=cfg.get("num_key_value_heads") or None, head_dim=cfg["head_dim"],
                n_inner=cfg["intermediate_size"], norm_eps=cfg["rms_norm_eps"],
                rope_theta=full.get("rope_theta", 1e6),
                rope_scaling=dict(rope_type="linear", factor=full["factor"])
                if kind == "linear" else None,
                tie_embeddings=cfg["tie_word_embeddings"], layer_types=kinds,
                sliding_window=window, rope_local_theta=local.get("rope_theta", 1e4),
                query_pre_attn_scalar=cfg["query_pre_attn_scalar"],
                final_logit_softcapping=cfg.get("final_logit_softcapping"))


def hf_config(config, dtype_name):
    """config.json for transformers, in the hub's layout (transformers 4 and 5 both read it)."""
    c = config
    out = dict(architectures=[ARCHITECTURES[c.model_type]], model_type=c.model_type,
               vocab_size=c.vocab_size, tie_word_embeddings=c.tie_embeddings,
               torch_dtype=dtype_name)
    if not c.llama:
        return dict(out, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                    n_head=c.n_head, n_inner=None, activation_function="gelu_new",
                    layer_norm_epsilon=c.norm_eps, resid_pdrop=c.dropout, embd_pdrop=c.dropout,
                    attn_pdrop=c.dropout)
    if c.gemma:
        return dict(out, hidden_size=c.n_embd, intermediate_size=c.inner,
                    num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                    num_key_value_heads=c.kv_heads, head_dim=c.head_size,
                    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=c.block_size,
                    rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                    rope_local_base_freq=c.rope_local_theta, rope_scaling=c.rope_scaling,
                    layer_types=[c.layer_type(i) for i in range(c.n_layer)],
                    sliding_window=c.sliding_window, query_pre_attn_scalar=c.query_pre_attn_scalar,
                    final_logit_softcapping=c.final_logit_softcapping,
                    attn_logit_softcapping=None, attention_bias=False,
                    attention_dropout=c.dropout, use_bidirectional_attention=False)
    rope_scaling = dict(rope_type="llama3", **c.rope_scaling) if c.rope_scaling else None
    out.update(hidden_size=c.n_embd, intermediate_size=c.inner, num_hidden_layers=c.n_layer,
               num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
               head_dim=c.head_size, hidden_act="silu", max_position_embeddings=c.block_size,
               rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, rope_scaling=rope_scaling,
               attention_dropout=c.dropout)
    if c.model_type != "qwen2":  # (Qwen2's q/k/v biases come with its model_type)
        out.update(attention_bias=False)
    if c.model_type == "llama":
        out.update(mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
    return out

# -----------------------------------------------------------------------------
# the weights: their names and layouts <-> ours


def weight_files(folder):
    """The weight file(s) of an HF folder: model.safetensors, its shards, or pytorch_model.bin."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    # save_pretrained shards big models; the index maps each key to a shard
    if os.path.isfile(index):
        saved = read_json(index)
        weight_map = saved.get("weight_map") if isinstance(saved, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map (expected the index save_pretrained writes: "
                             f"{{\"weight_map\": {{key: shard file}}}})")
        return [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return [os.path.join(folder, "pytorch_model.bin")]
    raise FileNotFoundError(f"{folder}: no model weights found; "
                            f"expected model.safetensors or pytorch_model.bin (or our ckpt.pt)")


def llama_keys(config):
    """[(our key, [(Hugging Face key, its shape), ...])] of a Llama-family model. Several of theirs
    stack into one of ours along the output dimension: q, k, v -> c_attn; gate, up -> c_fc."""
    C, V, hs, I = config.n_embd, config.vocab_size, config.head_size, config.inner
    q, kv = config.n_head * hs, config.kv_heads * hs
    keys = [("transformer.wte.weight", [("model.embed_tokens.weight", (V, C))])]
    for i in range(config.n_layer):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        keys.append((ours + "ln_1.weight", [(hf + "input_layernorm.weight", (C,))]))
        keys.append((ours + "attn.c_attn.weight", [(hf + "self_attn.q_proj.weight", (q, C)),
                                                   (hf + "self_attn.k_proj.weight", (kv, C)),
                                                   (hf + "self_attn.v_proj.weight", (kv, C))]))
        if config.model_type == "qwen2":
            keys.append((ours + "attn.c_attn.bias", [(hf + "self_attn.q_proj.bias", (q,)),
                                                     (hf + "self_attn.k_proj.bias", (kv,)),
                                                     (hf + "self_attn.v_proj.bias", (kv,))]))
        if config.model_type in ("qwen3", "gemma3_text"):
            keys.append((ours + "attn.q_norm.weight", [(hf + "self_attn.q_norm.weight", (hs,))]))
            keys.append((ours + "attn.k_norm.weight", [(hf + "self_attn.k_norm.weight", (hs,))]))
        keys.append((ours + "attn.c_proj.weight", [(hf + "self_attn.o_proj.weight", (C, q))]))
        if config.gemma:  # four norms: before and after attention, before and after the MLP
            keys.append((ours + "post_ln_1.weight", [(hf + "post_attention_layernorm.weight",
                                                      (C,))]))
            keys.append((ours + "ln_2.weight", [(hf + "pre_feedforward_layernorm.weight", (C,))]))
            keys.append((ours + "post_ln_2.weight", [(hf + "post_feedforward_layernorm.weight",
                                                      (C,))]))
        else:  # (Llama's post_attention_layernorm is the norm before the MLP)
            keys.append((ours + "ln_2.weight", [(hf + "post_attention_layernorm.weight", (C,))]))
        keys.append((ours + "mlp.c_fc.weight", [(hf + "mlp.gate_proj.weight", (I, C)),
                                                (hf + "mlp.up_proj.weight", (I, C))]))
        keys.append((ours + "mlp.c_proj.weight", [(hf + "mlp.down_proj.weight", (C, I))]))
    keys.append(("transformer.ln_f.weight", [("model.norm.weight", (C,))]))
    if not config.tie_embeddings:
        keys.append(("lm_head.weight", [("lm_head.weight", (V, C))]))
    return keys


def _read_weights(paths):
    """{key: (tensor, file)} from safetensors or pytorch_model.bin files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    raw = {}
    for path in paths:
        try:
            if path.endswith(".safetensors"):
                part = load_file(path)
            else:
                part = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file (named by the folder's index)") from None
        except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
            raise ValueError(f"{path}: not a readable weight file (truncated or corrupt? "
                             f"{reason})") from None
        raw.update({k: (v, path) for k, v in part.items()})
    return raw


def state_dict(paths, config):
    """The weights in an HF folder's weight files (weight_files) under our keys, for a model built
    from `config` -> (state dict, the name error messages give it: its one weight file, or the
    folder of its shards)."""
    source = paths[0] if len(paths) == 1 else os.path.dirname(paths[0])
    raw = _read_weights(paths)
    if config.llama:
        return _llama_state_dict(raw, config, source), source
    return _gpt2_state_dict(raw), source


def _gpt2_state_dict(raw):
    """Hub gpt2* files lack the 'transformer.' prefix, carry the causal-mask buffers h.N.attn.bias /
    h.N.attn.masked_bias, and have no lm_head.weight (it is tied)."""
    state, files = {}, {}
    for k, (v, path) in raw.items():
        # leading dot: ".attn.c_attn.bias" is a real weight
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        k = k if k == "lm_head.weight" or k.startswith("transformer.") else "transformer." + k
        if k.endswith(CONV1D_WEIGHTS):
            v = v.t()  # Conv1D (in, out) -> Linear (out, in)
        state[k], files[k] = v, path
    wte = state.get("transformer.wte.weight")
    if ("lm_head.weight" in state and wte is not None
            and not torch.equal(state["lm_head.weight"], wte)):
        raise ValueError(f"{files['lm_head.weight']}: lm_head.weight differs from "
                         f"transformer.wte.weight, but this GPT ties them")
    if wte is not None:
        state["lm_head.weight"] = wte
    return state


def _llama_state_dict(raw, config, source):
    """A Llama-family state dict in our keys; every key of theirs checked for presence and shape,
    so a bad file is named with the key of theirs that is wrong."""
    state, used = {}, set()
    for ours, theirs in llama_keys(config):
        parts = []
        for key, shape in theirs:
            if key not in raw:
                raise ValueError(f"{source}: missing key {key}")
            tensor, path = raw[key]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, "
                                 f"expected {shape}")
            parts.append(tensor)
            used.add(key)
        state[ours] = torch.cat(parts) if len(parts) > 1 else parts[0]
    wte = state["transformer.wte.weight"]
    if config.tie_embeddings:
        if "lm_head.weight" in raw and not torch.equal(raw["lm_head.weight"][0], wte):
            raise ValueError(f"{raw['lm_head.weight'][1]}: lm_head.weight differs from "
                             f"model.embed_tokens.weight, but tie_word_embeddings is true")
        used.add("lm_head.weight")
        state["lm_head.weight"] = wte
    # older Llama files carry the rotary frequencies as a buffer; we compute them
    unexpected = [k for k in raw if k not in used and not k.endswith(".rotary_emb.inv_freq")]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{raw[unexpected[0]][1]}: unexpected key {unexpected[0]}{more}")
    return state


def hf_state_dict(model, dtype=None):
    """The model's weights under Hugging Face's names and layouts (the inverse of loading), in
    `dtype` (default: the weights' own); a tied lm_head is left out, as transformers saves it."""
    # (LoRA adapters folded into their weights: GPT.merged_state_dict)
    ours = {k.replace("_orig_mod.", ""): v.detach() for k, v in model.merged_state_dict().items()}
    config = model.config
    if config.llama:
        state = {}
        for key, theirs in llama_keys(config):
            parts = ours[key].split([shape[0] for _, shape in theirs])  # un-stack q/k/v, gate/up
            if len(parts) > 1:  # (copies: safetensors refuses tensors that share memory)
                parts = [part.clone() for part in parts]
            state.update({name: part for (name, _), part in zip(theirs, parts)})
    elif not config.bias:
        raise ValueError("save_pretrained: a GPT-2 built with bias=False has no Hugging Face "
                         "equivalent (GPT-2 has biases in every layer)")
    else:
        state = {k: v.t() if k.endswith(CONV1D_WEIGHTS) else v  # Linear -> Conv1D (in, out)
                 for k, v in ours.items() if k != "lm_head.weight"}
    return {k: v.to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}

# -----------------------------------------------------------------------------
# export


def save_pretrained(model, folder, tokenizer=None, dtype=None, max_shard_size="5GB",
                    token_ids=None):
    """Write a Hugging Face folder that transformers, vLLM or lm-evaluation-harness load:
    config.json, model.safetensors (shards and an index past max_shard_size), and the tokenizer
    files of `tokenizer` (an HF folder or hub id, 'gpt2', or 'none'/'byte'/None: our byte tokenizer
    has none). dtype: e.g. torch.bfloat16 (default: the weights' own). token_ids: {bos_token_id,
    eos_token_id, pad_token_id} for those the source's generation_config.json lacks (the
    tokenizer's: checkpoint.export passes them; a null eos would never stop generating). The
    folder appears whole and holds this export alone (export_folder)."""
    from huggingface_hub import save_torch_state_dict
    state = hf_state_dict(model, dtype)
    extra = tokenizer_files(tokenizer)  # {file name: path}, fetched before anything is written
    with export_folder(folder) as new:
        save_torch_state_dict(state, new, max_shard_size=max_shard_size)
        for name, path in extra.items():
            shutil.copyfile(path, os.path.join(new, name))
        dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
        # the special token ids, as the source's generation config has them (transformers'
        # defaults, e.g. Llama's eos 2, would be wrong)
        generation = extra.get("generation_config.json")
        generation = read_json(generation) if generation else {}
        ids = {k: generation[k] if generation.get(k) is not None else (token_ids or {}).get(k)
               for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        config = json.dumps(dict(hf_config(model.config, dtype_name), **ids), indent=2).encode()
        atomic_write(os.path.join(new, "config.json"), lambda f: f.write(config))
    return folder


@contextmanager
def export_folder(folder):
    """A new folder beside `folder` to write an export into, swapped in for `folder` once it is
    complete: `folder` then holds exactly this export, none of an earlier one's tokenizer, chat
    template or weights. `folder` must be new, empty, or an earlier export (only the files
    exports write): anything else in it, a run's files above all, would be lost, and is refused
    in one line before anything is written. A kill before the swap leaves the earlier export
    whole; what it left beside it is removed by the next export there."""
    path = os.path.abspath(os.path.expanduser(os.fspath(folder)))  # ('' is the working folder)
    folder = os.fspath(folder) or path
    if os.path.isfile(path):
        raise ValueError(f"{folder}: a file (expected a folder to export into)")
    foreign = _not_an_export(path) if os.path.isdir(path) else []
    if foreign:
        raise ValueError(f"{folder}: holds files that are not an export's "
                         f"({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}): an "
                         f"export replaces the whole folder, and they would be lost; export "
                         f"into a new folder (e.g. {os.path.join(folder, 'hf')})")
    parent, name = os.path.split(path)
    for stale in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.export-*")):
        shutil.rmtree(stale, ignore_errors=True)  # (a killed export's)
    new = os.path.join(parent, f".{name}.export-{uuid.uuid4().hex[:8]}")
    os.makedirs(new)
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    for written in os.listdir(new):  # on disk before the swap, as common.atomic_write's files
        with open(os.path.join(new, written), "rb") as f:
            os.fsync(f.fileno())
    if os.path.isdir(path):  # the earlier export out of the way, then the new one in its place
        os.rename(path, new + "-old")
    os.rename(new, path)
    shutil.rmtree(new + "-old", ignore_errors=True)


def _not_an_export(folder):
    """The entries of `folder` that no export writes, as an error names them."""
    foreign = []
    for name in sorted(os.listdir(folder)):
        weights = name.startswith(("model", "pytorch_model")) and name.endswith(WEIGHT_SUFFIXES)
        if name == "config.json":  # (a run's own config.json has no model_type)
            try:
                config = read_json(os.path.join(folder, name))
            except (OSError, ValueError):
                config = None
            if not (isinstance(config, dict) and "model_type" in config):
                foreign.append("config.json: not a Hugging Face config")
        elif name.startswith(".tmp-") or (name.startswith(".") and name.endswith(".tmp")):
            continue  # what a killed write of an export left (earlier versions wrote in place)
        elif not (weights or name in TOKENIZER_FILES or name in ADAPTER_FILES) \
                or not os.path.isfile(os.path.join(folder, name)):
            foreign.append(name)
    return foreign


# -----------------------------------------------------------------------------
# LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors


def peft_module(config, ours, target):
    """The Hugging Face module of one adapter: our fused projection `ours` (e.g.
    transformer.h.3.attn.c_attn) and the target it holds (q_proj) ->
    model.layers.3.self_attn.q_proj. GPT-2's modules have our names."""
    if not config.llama:
        return ours
    layer = ours.split(".")[2]
    kind = "self_attn" if ".attn." in ours else "mlp"
    return f"model.layers.{layer}.{kind}.{target}"


def save_adapter(model, folder, base):
    """The model's LoRA adapters as a PEFT folder (adapter_config.json, adapter_model.safetensors)
    that `peft.PeftModel.from_pretrained(<the Hugging Face base>, folder)` loads onto `base`:
    one lora_A (r, in) and lora_B (out, r) per adapted Hugging Face module, cut from our fused
    ones (lora.LoRALinear.adapters)."""
    from safetensors.torch import save
    state, targets, settings = {}, set(), None
    for name, module in model.named_modules():
        if hasattr(module, "adapters"):  # a lora.LoRALinear
            settings = settings or (module.rank, module.alpha, module.lora_dropout.p)
            for target, A, B in module.adapters():
                hf = peft_module(model.config, name.replace("_orig_mod.", ""), target)
                state[f"base_model.model.{hf}.lora_A.weight"] = A.detach().cpu().contiguous()
                state[f"base_model.model.{hf}.lora_B.weight"] = B.detach().cpu().contiguous()
                targets.add(".".join(hf.split(".")[-2:]))  # self_attn.q_proj, attn.c_attn, ...
    if settings is None:
        raise ValueError("save_adapter: the model has no LoRA adapters")
    rank, alpha, dropout = settings
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base, r=rank,
                  lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(targets),
                  bias="none",
                  fan_in_fan_out=not model.config.llama,  # GPT-2's Conv1D stores W as (in, out)
                  use_rslora=False, init_lora_weights=True, inference_mode=True)
    blob = save(state)
    text = json.dumps(config, indent=2).encode()
    with export_folder(folder) as new:
        atomic_write(os.path.join(new, "adapter_model.safetensors"), lambda f: f.write(blob))
        atomic_write(os.path.join(new, "adapter_config.json"), lambda f: f.write(text))
    return folder
