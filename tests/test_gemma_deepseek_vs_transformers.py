"""
Tests for the paper's other two model families against transformers, the independent reference:
tiny random-init Gemma3ForCausalLM checkpoints (a sliding window shorter than the sequences,
local and global layers with their own rotary bases, linear rope scaling, query_pre_attn_scalar,
soft-capped logits) in both config.json layouts, one of them sharded; and DeepSeek-Math-style
LlamaForCausalLM checkpoints (as many k/v heads as q heads, untied, the hub's older keys). Logits,
token log-probs, ragged greedy generation, the export back to transformers, our checkpoints,
activation checkpointing, bf16 autocast, refused configs; and the whole pipeline on a tiny
Gemma-3 with a chat template and a Gemma-style tokenizer.
"""

import json
import os
from dataclasses import asdict

# before anything imports huggingface_hub: tests never touch the network
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

from machinery.checkpoint import load_checkpoint, load_gpt, save_checkpoint
from machinery.common import read_json
from machinery.hf import save_pretrained
from model import GPT, GPTConfig
from tiny_hf import (GEMMA3, gemma3_to_hub_layout, hf_gemma3, randomize_, to_hub_layout)

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

V = GEMMA3["vocab_size"]
LAYOUTS = [("transformers5", False), ("hub", True)]  # (config.json layout, sharded weights)


def ids(shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gemma():
    return hf_gemma3()


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: p[0])
def loaded(request, gemma, tmp_path_factory):
    """(HF model, its folder, our model loaded from it)."""
    layout, sharded = request.param
    folder = tmp_path_factory.mktemp(f"gemma3_{layout}")
    gemma.save_pretrained(folder, max_shard_size="20KB" if sharded else "5GB")
    if layout == "hub":
        gemma3_to_hub_layout(folder)
    config = read_json(folder / "config.json")
    assert ("rope_parameters" in config) == (layout == "transformers5")
    assert ("layer_types" in config) == (layout == "transformers5")
    assert (folder / "model.safetensors.index.json").exists() == sharded
    return gemma, folder, load_gpt(folder).eval()


def test_config_maps_every_gemma_difference(loaded):
    _, _, model = loaded
    c = model.config
    assert c.gemma and c.tie_embeddings and c.kv_heads == 2 < c.n_head
    assert c.layer_types == ["sliding_attention", "full_attention"] * 2
    assert (c.sliding_window, c.rope_local_theta, c.rope_theta) == (8, 100.0, 1000.0)
    assert c.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert (c.query_pre_attn_scalar, c.final_logit_softcapping, c.head_size) == (12, 5.0, 16)


def test_logits_match_transformers_and_the_window_matters(loaded):
    hf, _, model = loaded
    idx = ids((3, 40))  # 5 times the window
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.shape == (3, 40, V)
    assert (ours - theirs).abs().max() < 1e-4
    for change in (dict(sliding_window=10 ** 6), dict(rope_local_theta=1000.0),
                   dict(rope_scaling=None), dict(query_pre_attn_scalar=None),
                   dict(final_logit_softcapping=None)):  # each difference is exercised
        other = GPT(GPTConfig(**{**asdict(model.config), **change})).eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (other(idx) - theirs).abs().max() > 1e-2, change


def test_token_logps_match_transformers(loaded):
    hf, _, model = loaded
    idx, targets = ids((2, 33), 1), ids((2, 33), 2)
    targets[0, :5] = -100
    with torch.no_grad():
        want = F.log_softmax(hf(idx).logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        got = model(idx, targets, chunk_size=7)
    assert (got - want.masked_fill(targets < 0, 0)).abs().max() < 1e-4


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [12, 13], [14, 15, 16, 17]]


def test_ragged_greedy_generation_equals_transformers(loaded):
    """Left-padded prompts of different lengths, 14 new tokens: every row runs past the window
    of 8, so the local layers' mask over the cache's columns decides tokens."""
    hf, _, model = loaded
    got = model.generate(PROMPTS, 14, temperature=0, eos_token_id=1)
    for prompt, row in zip(PROMPTS, got):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           pad_token_id=0)[0, len(prompt):].tolist()
        assert row == want
    assert len({tuple(r) for r in got}) > 1
    with torch.no_grad():  # greedy with the cache = greedy recomputing the whole sequence
        seq = torch.tensor([PROMPTS[2] + got[2]])
        assert model(seq)[0, len(PROMPTS[2]) - 1:-1].argmax(-1).tolist() == got[2]


def test_the_static_cache_keeps_the_window(loaded):
    """generate(static_cache=True) (a fixed batch, a 64-column cache written at tensor positions:
    what CUDA graphs replay) gives the dynamic cache's tokens past the window too."""
    _, _, model = loaded
    for kw in (dict(temperature=0), dict(temperature=0.9, seed=3)):
        assert (model.generate(PROMPTS, 14, static_cache=True, **kw)
                == model.generate(PROMPTS, 14, **kw)), kw


def test_save_pretrained_loads_in_transformers(loaded, tmp_path):
    hf, folder, model = loaded
    out = save_pretrained(model, tmp_path / "export", tokenizer="none")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is transformers.Gemma3ForCausalLM
    assert reloaded.config.layer_types == hf.config.layer_types
    idx = ids((2, 40), 3)
    with torch.no_grad():
        assert (reloaded(idx).logits - hf(idx).logits).abs().max() < 1e-4
        again = load_gpt(out).eval()  # our own export reads back
        assert torch.equal(again(idx), model(idx))


def test_checkpoint_round_trip_keeps_the_family(loaded, tmp_path):
    _, _, model = loaded
    save_checkpoint(tmp_path / "ckpt.pt", model, tokenizer="some/repo")
    assert load_checkpoint(tmp_path / "ckpt.pt")["config"]["layer_types"] == \
        model.config.layer_types
    idx = ids((2, 20), 5)
    with torch.no_grad():
        assert torch.equal(load_gpt(tmp_path / "ckpt.pt").eval()(idx), model(idx))


def test_activation_checkpointing_and_bf16_autocast(loaded):
    _, _, model = loaded
    model = GPT(model.config)
    model.load_state_dict(loaded[2].state_dict())
    idx, targets = ids((2, 24), 6), ids((2, 24), 7)
    grads = []
    for on in (False, True):
        model.activation_checkpointing = on
        model.zero_grad()
        model(idx, targets).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        exact = model(idx, targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(idx, targets)
    # (random weights with norm gains near 2 make big activations: bf16's rounding shows, ~1%)
    assert mixed.dtype == torch.float32 and (mixed - exact).abs().mean() < 0.1


@pytest.mark.slow
def test_compiles_without_graph_breaks(gemma, tmp_path):
    """torch.compile, one graph: the banded mask, both kinds of layer, soft-capping."""
    gemma.save_pretrained(tmp_path)
    model = load_gpt(tmp_path).eval()
    idx = ids((2, 20), 10)  # longer than the window
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx))
        torch.testing.assert_close(compiled(idx, idx, 5), model(idx, idx, 5))


def test_hub_defaults_and_the_older_layer_pattern(gemma, tmp_path):
    """gemma-3-1b's config.json: sliding_window_pattern 6 (every 6th layer global), no
    rope_scaling, and head_dim / query_pre_attn_scalar left to transformers' defaults (256)."""
    hf = hf_gemma3(num_hidden_layers=7, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window_pattern=6, rope_scaling=None, final_logit_softcapping=None)
    hf.save_pretrained(tmp_path)
    gemma3_to_hub_layout(tmp_path)
    cfg = read_json(tmp_path / "config.json")
    for key in ("head_dim", "query_pre_attn_scalar", "final_logit_softcapping"):
        del cfg[key]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_gpt(tmp_path).eval()
    assert [model.config.layer_type(i) for i in (4, 5, 6)] == \
        ["sliding_attention", "full_attention", "sliding_attention"]
    assert model.config.rope_scaling is None and model.config.head_size == 256
    idx = ids((2, 30), 8)
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max() < 1e-4


@pytest.mark.parametrize("key,value", [
    ("hidden_activation", "gelu"), ("attention_bias", True), ("attn_logit_softcapping", 50.0),
    ("use_bidirectional_attention", True), ("rope_scaling", {"rope_type": "yarn", "factor": 2}),
    ("layer_types", ["sliding_attention", "chunked_attention"] * 2), ("sliding_window", 0),
    ("num_key_value_heads", 3),
])
def test_config_it_cannot_represent(gemma, tmp_path, key, value):
    gemma.save_pretrained(tmp_path)
    gemma3_to_hub_layout(tmp_path)
    cfg = read_json(tmp_path / "config.json")
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"config\.json: {key}=.* cannot be represented"):
        load_gpt(tmp_path)


# -----------------------------------------------------------------------------
# DeepSeek-Math-7B: the Llama architecture with as many k/v heads as query heads


DEEPSEEK = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_deepseek_math_style_llama_matches_transformers(tmp_path, layout):
    torch.manual_seed(0)
    hf = randomize_(transformers.LlamaForCausalLM(transformers.LlamaConfig(**DEEPSEEK)), seed=4)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded, as the 7B is
    if layout == "hub":  # DeepSeek-Math-7B's config.json: the old keys, pretraining_tp
        to_hub_layout(tmp_path)
        cfg = read_json(tmp_path / "config.json")
        (tmp_path / "config.json").write_text(json.dumps(dict(cfg, pretraining_tp=1)))
    model = load_gpt(tmp_path).eval()
    assert model.config.model_type == "llama" and model.config.kv_heads == 4
    idx = ids((2, 50), 9)
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max() < 1e-4
    got = model.generate(PROMPTS, 8, temperature=0)
    for prompt, row in zip(PROMPTS, got):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        assert row == want
    out = save_pretrained(model, tmp_path / "export", tokenizer="none")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (reloaded(idx).logits - hf(idx).logits).abs().max() < 1e-4


@pytest.mark.parametrize("preset,task", [("gemma3_270m_gsm8k", "gsm8k"),
                                         ("gemma3_1b_math500", "math500"),
                                         ("qwen25_math_15b_math500", "math500")])
def test_presets_are_valid_runs(preset, task):
    import train
    from machinery.common import parse
    from machinery.hf import is_hub_id
    cfg = parse(train.Config, ["--preset", preset], presets=True)
    train.validate(cfg)
    plan, baseline = train.variants(cfg)
    assert cfg.sft_steps == 0 and cfg.task == task and is_hub_id(cfg.init_from)
    assert cfg.max_new_tokens < cfg.max_len
    assert {label for label, _, _ in plan} == {"DPO", "ADPO adaptive m=256", "ADPO static k=4"}


# -----------------------------------------------------------------------------
# the pipeline on a tiny Gemma-3 with a chat template, and the export of its result


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    """A tiny Gemma-3 checkpoint: random weights, a Gemma-style tokenizer trained here (run by the
    tokenizers library) with its chat template, and, as the real one, a special token one past
    the model's rows (gemma-3's <image_soft_token>)."""
    from tiny_hf import train_gemma3_tokenizer
    folder = tmp_path_factory.mktemp("tiny_gemma3")
    tok = train_gemma3_tokenizer(folder, vocab_size=400)
    rows = len(tok)
    tok.add_tokens(["<image_soft_token>"], special_tokens=True)
    tok.save_pretrained(folder)
    randomize_(hf_gemma3(vocab_size=rows), seed=2, std=0.05).save_pretrained(folder)
    return folder


def test_special_tokens_past_the_models_rows_are_let_through_unless_plain(gemma_folder,
                                                                         tmp_path):
    import shutil
    from machinery.checkpoint import load_model
    model, tok = load_model(str(gemma_folder))
    assert tok.n_vocab == model.config.vocab_size + 1 and tok.chat_template is not None
    plain = tmp_path / "plain"  # the same extra token, but one text can make: refused
    shutil.copytree(gemma_folder, plain)
    spec = read_json(plain / "tokenizer.json")
    spec["added_tokens"][-1]["special"] = False
    (plain / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="has a vocabulary of"):
        load_model(str(plain))


@pytest.mark.slow
def test_pipeline_on_gemma3_with_a_chat_template_and_its_export(gemma_folder, tmp_path):
    """sft_steps 0: the checkpoint is the SFT model and the reference; pairs, ADPO and eval run
    on Gemma's chat prompts (<end_of_turn> closes every response); the result exports as a
    Hugging Face folder that transformers loads, with the same logits and prompt ids."""
    import subprocess
    import sys
    from conftest import ROOT
    from machinery.tokenizer import HFTokenizer, get_tokenizer
    out = tmp_path / "run"
    flags = ["--init_from", str(gemma_folder), "--sft_steps", "0", "--out_dir", str(out),
             "--arith_steps", "1", "--arith_max_number", "5", "--n_train", "40", "--n_test", "8",
             "--pairs_source", "offline", "--n_pair_questions", "12", "--max_len", "160",
             "--max_new_tokens", "8", "--po_epochs", "1", "--po_batch_size", "4",
             "--eval_batch_size", "8", "--ckpt_every", "2", "--log_every", "1", "--po_lr", "1e-2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    tok = get_tokenizer(str(gemma_folder))
    assert isinstance(tok, HFTokenizer) and tok.eot_token == tok.encode_single_token(
        "<end_of_turn>")
    pair = json.loads((out / "pairs" / "train.jsonl").read_text().splitlines()[0])
    assert pair["prompt"].startswith("<bos><start_of_turn>user\n")
    assert pair["prompt"].endswith("<start_of_turn>model\n")
    first = json.loads((out / "po" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/accuracy"] == 0 and abs(first["rewards/margin"]) < 1e-4  # step 0: ties
    sft, po = (load_checkpoint(out / s / "ckpt.pt")["model"] for s in ("sft", "po"))
    assert max((po[k] - sft[k]).abs().max().item() for k in po) > 1e-3  # it trained
    export = tmp_path / "hf"
    code = (f"from machinery.checkpoint import export; "
            f"export({str(out / 'po' / 'ckpt.pt')!r}, {str(export)!r})")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120, env=env)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    assert type(hf) is transformers.Gemma3ForCausalLM
    auto = transformers.AutoTokenizer.from_pretrained(export)
    turn = [{"role": "user", "content": "Ann has 3 pens."}]
    prompt = auto.apply_chat_template(turn, add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
    assert prompt == tok.encode_prompt(tok.render_chat(turn))
    ours = load_gpt(out / "po" / "ckpt.pt").eval()
    with torch.no_grad():
        assert (hf(torch.tensor([prompt])).logits - ours(torch.tensor([prompt]))).abs().max() < 1e-4
