"""
Tests for model.py's Llama family (Llama-3.x, Qwen2.5, Qwen3) against transformers, the independent
reference: tiny random-init LlamaForCausalLM (llama3 rope scaling, untied), Qwen2ForCausalLM (tied,
q/k/v biases) and Qwen3ForCausalLM (q/k norm, head_dim, sharded) saved with save_pretrained, in
both config.json layouts. Logits, token log-probs, ragged greedy generation, save_pretrained back
to transformers (GPT-2 included), checkpoints, activation checkpointing, torch.compile, bf16
autocast, the hub, refused configs; the whole pipeline on a tiny Qwen2 with a chat template; and
(CUDA only) the preference step at Qwen2.5-0.5B's exact shape.
"""

import json
import math
import os
import subprocess
import sys
import time

# before anything imports huggingface_hub: tests never touch the network
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

from machinery.common import peak_flops, read_json
from machinery.checkpoint import load_checkpoint, load_gpt, save_checkpoint
from machinery.hf import is_hub_id, save_pretrained
from model import GPT, GPTConfig
from machinery.tokenizer import get_tokenizer
from tiny_hf import MODELS, hf_model, randomize_, to_hub_layout, train_tokenizer
from conftest import free_port, ROOT

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

V = 97  # vocabulary of the tiny models


@pytest.fixture(scope="module")
def hf_models():
    return {kind: hf_model(kind, V) for kind in MODELS}


# each family in one config.json layout; the logits test also runs the other layout of each
ONE_LAYOUT = [("llama", "hub"), ("qwen2", "transformers5"), ("qwen3", "hub")]
OTHER_LAYOUT = [("llama", "transformers5"), ("qwen2", "hub"), ("qwen3", "transformers5")]


@pytest.fixture(scope="module", params=ONE_LAYOUT, ids="-".join)
def loaded(request, hf_models, tmp_path_factory):
    """(kind, HF model, its folder, our model loaded from it). Qwen3 is saved in shards."""
    kind, layout = request.param
    hf = hf_models[kind]
    folder = tmp_path_factory.mktemp(f"{kind}_{layout}")
    hf.save_pretrained(folder, max_shard_size="20KB" if kind == "qwen3" else "5GB")
    if layout == "hub":
        to_hub_layout(folder)
    config = json.loads((folder / "config.json").read_text())
    assert ("rope_parameters" in config) == (layout == "transformers5")
    assert (folder / "model.safetensors.index.json").exists() == (kind == "qwen3")
    return kind, hf, folder, load_gpt(folder).eval()


def ids(shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("loaded", ONE_LAYOUT + OTHER_LAYOUT, ids="-".join, indirect=True)
def test_logits_match_transformers(loaded):
    kind, hf, _, model = loaded
    c = model.config
    assert (c.model_type, c.tie_embeddings) == (kind, MODELS[kind]["tie_word_embeddings"])
    assert c.kv_heads == MODELS[kind]["num_key_value_heads"] < c.n_head  # grouped-query attention
    assert (c.rope_scaling is not None) == (kind == "llama")
    idx = ids((3, 70))  # past the llama3 scaling's original context (16)
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.shape == (3, 70, V)
    assert (ours - theirs).abs().max() < 1e-4


def test_token_logps_match_transformers(loaded):
    _, hf, _, model = loaded
    idx, targets = ids((2, 33), 1), ids((2, 33), 2)
    targets[0, :5] = -100
    with torch.no_grad():
        want = F.log_softmax(hf(idx).logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        got = model(idx, targets, chunk_size=7)
    assert (got - want.masked_fill(targets < 0, 0)).abs().max() < 1e-4


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def test_ragged_greedy_generation_equals_transformers(loaded):
    """Prompts of different lengths decoded in one left-padded batch (per-row rotary positions,
    the GQA cache) give, token for token, what transformers' generate gives each prompt alone."""
    _, hf, _, model = loaded
    hf_eos = hf.generation_config.eos_token_id  # transformers stops there: so do we
    got = model.generate(PROMPTS, 12, temperature=0, eos_token_id=hf_eos)
    for prompt, row in zip(PROMPTS, got):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           pad_token_id=0)[0, len(prompt):].tolist()
        assert row == want
    assert len({tuple(r) for r in got}) > 1
    free = model.generate(PROMPTS, 12, temperature=0)
    eos = free[2][3]  # a token one row emits early: that row stops there, the others go on
    stopped = model.generate(PROMPTS, 12, temperature=0, eos_token_id=eos)
    assert stopped == [r[:r.index(eos) + 1] if eos in r else r for r in free]


def test_save_pretrained_loads_in_transformers(loaded, tmp_path):
    kind, hf, folder, model = loaded
    out = save_pretrained(model, tmp_path / "export", tokenizer=str(folder))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf)
    idx = ids((2, 40), 3)
    with torch.no_grad():
        assert (reloaded(idx).logits - hf(idx).logits).abs().max() < 1e-4
    source = read_json(folder / "generation_config.json")  # copied, its ids in config.json too
    assert read_json(tmp_path / "export" / "generation_config.json") == source
    assert reloaded.config.eos_token_id == source.get("eos_token_id")
    again = load_gpt(out).eval()  # our own export reads back
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))


def test_gpt2_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    model = randomize_(GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=2, n_embd=16)),
                       seed=3)
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)  # a smaller file, as people share them
    assert not (tmp_path / "tokenizer.json").exists()  # a model from scratch has no HF tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf) is transformers.GPT2LMHeadModel
    assert read_json(tmp_path / "config.json")["torch_dtype"] == "bfloat16"
    idx = ids((2, 32), 4)
    with torch.no_grad():
        want = model.to(torch.bfloat16).float()(idx)  # the same bf16-rounded weights
        assert (hf(idx).logits - want).abs().max() < 1e-4
    with pytest.raises(ValueError, match="bias=False has no Hugging Face equivalent"):
        save_pretrained(GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=8,
                                      bias=False)), tmp_path / "no")


def test_checkpoint_round_trip_keeps_the_family(loaded, tmp_path):
    kind, _, _, model = loaded
    save_checkpoint(tmp_path / "ckpt.pt", model, tokenizer="some/repo")
    saved = load_checkpoint(tmp_path / "ckpt.pt")
    assert saved["config"]["model_type"] == kind
    loaded_again = load_gpt(tmp_path / "ckpt.pt").eval()
    idx = ids((2, 20), 5)
    with torch.no_grad():
        assert torch.equal(loaded_again(idx), model(idx))


def tiny_llama(kind="qwen3", **kw):
    cfg = dict(model_type=kind, block_size=64, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2,
               n_embd=32, n_inner=48, bias=False, tie_embeddings=False)
    return randomize_(GPT(GPTConfig(**{**cfg, **kw})), seed=7, std=0.1)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_activation_checkpointing_gives_the_same_gradients(kind):
    model = tiny_llama(kind).train()
    idx, targets = ids((2, 24), 6), ids((2, 24), 7)
    grads = []
    for on in (False, True):
        model.activation_checkpointing = on
        model.zero_grad()
        model(idx, targets).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    model = tiny_llama("qwen3").train()
    idx = ids((2, 16), 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(idx), model(idx))  # logits
    logps = compiled(idx, idx, 5)  # log-probs: chunks + checkpointing, one graph
    logps.sum().backward()
    torch.testing.assert_close(logps, model(idx, idx, 5))


def test_bf16_autocast_on_cpu_stays_close():
    model = tiny_llama("qwen2")
    idx = ids((2, 24), 9)
    with torch.no_grad():
        exact = model(idx, idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(idx, idx)
            assert model(idx).dtype == torch.bfloat16
    assert mixed.dtype == torch.float32 and (mixed - exact).abs().max() < 0.1


def test_mfu_counts_the_untied_output_layer_once():
    model = tiny_llama("llama")
    all_params = model.num_params(non_embedding=False)
    assert model.num_params() == all_params - V * 32  # the input table is a lookup, no matmul
    linear = sum(p.numel() for p in model.parameters() if p.dim() == 2) - V * 32  # no bias, norm
    assert model.flops_per_token(10) == 6 * linear + 12 * 2 * 4 * 8 * 10


@pytest.mark.parametrize("key,value", [
    ("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True),
    ("use_sliding_window", True), ("layer_types", ["sliding_attention", "full_attention"]),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}), ("partial_rotary_factor", 0.5),
    ("num_key_value_heads", 3), ("model_type", "mistral"),
])
def test_config_it_cannot_represent(hf_models, tmp_path, key, value):
    hf_models["llama"].save_pretrained(tmp_path)
    to_hub_layout(tmp_path)
    cfg = read_json(tmp_path / "config.json")
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"config\.json: {key}=.* cannot be represented"):
        load_gpt(tmp_path)


def test_weight_file_errors_name_their_key(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file
    hf_models["qwen2"].save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    good = dict(state)
    del state["model.layers.1.self_attn.k_proj.bias"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing key model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_gpt(tmp_path)
    state = dict(good, **{"model.layers.0.mlp.up_proj.weight": torch.zeros(48, 31)})
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"up_proj\.weight has shape \(48, 31\), expected"):
        load_gpt(tmp_path)
    save_file(dict(good, extra=torch.zeros(1)), path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected key extra"):
        load_gpt(tmp_path)
    save_file(dict(good, **{"lm_head.weight": torch.zeros(V, 32)}), path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_gpt(tmp_path)


def test_hub_ids_go_through_huggingface_hub(hf_models, tmp_path, monkeypatch):
    hf_models["qwen2"].save_pretrained(tmp_path)
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kw):  # a stand-in for the hub
        calls.append((repo_id, tuple(allow_patterns)))
        return str(tmp_path)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    model = load_gpt("Qwen/Qwen2.5-0.5B-Instruct")
    assert model.config.model_type == "qwen2"
    patterns = calls[0][1]
    assert "model*.safetensors" in patterns and "tokenizer.json" in patterns
    assert not any(p.endswith((".bin", ".pth", "*")) for p in patterns)  # nothing else
    assert is_hub_id("meta-llama/Llama-3.2-1B") and not is_hub_id("gpt2")
    assert not is_hub_id("does/not/exist.pt") and not is_hub_id(str(tmp_path))


# -----------------------------------------------------------------------------
# the pipeline on a tiny Qwen2 with a chat template, and the export of its result


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    """A tiny Qwen2.5-style checkpoint: random weights, a trained tokenizer, a chat template."""
    folder = tmp_path_factory.mktemp("tiny_qwen")
    tok = train_tokenizer("qwen2.5", folder, vocab_size=400)
    randomize_(hf_model("qwen2", len(tok)), seed=2, std=0.05).save_pretrained(folder)
    return folder


def run_train(*flags, launch=(), timeout=300):
    """train.py in a fresh process (or under torchrun, `launch`) -> its stdout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, *launch, "train.py", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_pipeline_on_a_chat_model_and_its_export(qwen_folder, tmp_path):
    """sft_steps 0: the checkpoint is the SFT model and the reference; pairs, ADPO and eval run
    on chat prompts, in one process and in two (DDP over gloo) alike; the result exports as a
    Hugging Face folder that transformers loads."""
    out = tmp_path / "run"
    flags = ["--init_from", str(qwen_folder), "--sft_steps", "0",
             "--arith_steps", "1", "--arith_max_number", "5", "--n_train", "40", "--n_test", "8",
             "--pairs_source", "offline", "--n_pair_questions", "16", "--max_len", "160",
             "--max_new_tokens", "8", "--po_epochs", "1", "--po_batch_size", "4",
             "--grad_accum", "2", "--activation_checkpointing", "true", "--eval_batch_size", "8",
             "--ckpt_every", "2", "--log_every", "1", "--po_lr", "1e-2"]
    run_train(*flags, "--out_dir", str(out))
    ddp = ["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={free_port()}"]
    assert "world size 2" in run_train(*flags, "--out_dir", str(tmp_path / "ddp"), launch=ddp)
    one, two = (load_checkpoint(d / "po" / "ckpt.pt")["model"] for d in (out, tmp_path / "ddp"))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 5e-4
    assert max((one[k] - sft_weights).abs().max().item() for k, sft_weights in
               load_checkpoint(out / "sft" / "ckpt.pt")["model"].items()) > 1e-3  # it trained
    tok = get_tokenizer(str(qwen_folder))
    sft = load_checkpoint(out / "sft" / "ckpt.pt")
    assert sft["tokenizer"] == str(qwen_folder) and sft["chat_template"] == "auto"
    source = load_gpt(qwen_folder)
    for k, v in source.state_dict().items():  # sft_steps 0: the loaded checkpoint, unchanged
        assert torch.equal(sft["model"][k], v), k
    record = read_json(out / "po" / "eval.json")["records"][0]
    assert "<|im_start|>user" not in record["question"]
    pair = json.loads((out / "pairs" / "train.jsonl").read_text().splitlines()[0])
    assert pair["prompt"].startswith("<|im_start|>system") and "\\boxed{}" in pair["prompt"]
    first = json.loads((out / "po" / "metrics.jsonl").read_text().splitlines()[0])
    # step 0: the policy is the reference (the same chat prompts scored the same way): all ties
    assert first["rewards/accuracy"] == 0 and abs(first["rewards/margin"]) < 1e-4
    # export the final model: the one-liner of the README
    export = tmp_path / "hf"
    code = (f"from machinery.checkpoint import export; "
            f"export({str(out / 'po' / 'ckpt.pt')!r}, {str(export)!r})")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    auto = transformers.AutoTokenizer.from_pretrained(export)
    ours = load_gpt(out / "po" / "ckpt.pt").eval()
    prompt = auto.apply_chat_template([{"role": "user", "content": "Ann has 3 pens."}],
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
    assert prompt == tok.encode_prompt(tok.render_chat([{"role": "user",
                                                         "content": "Ann has 3 pens."}]))
    with torch.no_grad():
        assert (hf(torch.tensor([prompt])).logits - ours(torch.tensor([prompt]))).abs().max() < 1e-4


@pytest.mark.parametrize("preset", ["qwen25_05b_gsm8k", "qwen3_06b_gsm8k", "llama32_1b_gsm8k"])
def test_presets_are_valid_runs(preset):
    import train
    from machinery.common import parse
    cfg = parse(train.Config, ["--preset", preset], presets=True)
    train.validate(cfg)
    plan, baseline = train.variants(cfg)
    assert cfg.sft_steps == 0 and cfg.task == "gsm8k" and is_hub_id(cfg.init_from)
    assert {label for label, _, _ in plan} == {"DPO", "ADPO adaptive m=256", "ADPO static k=4"}


# -----------------------------------------------------------------------------
# CUDA only: the preference step at Qwen2.5-0.5B's exact shape


QWEN25_05B = dict(model_type="qwen2", block_size=32768, vocab_size=151936, n_layer=24, n_head=14,
                  n_kv_head=2, n_embd=896, n_inner=4864, norm_eps=1e-6, rope_theta=1e6,
                  bias=False, tie_embeddings=True)


def preference_steps(config, device, B, T, steps=4):
    """The preference step train.py runs (one forward of chosen + rejected, ADPO adaptive m=256,
    AdamW) on random tokens, bf16 autocast, activation checkpointing, as many times as `steps`
    -> (last loss, tokens/s of the fastest step after the first, peak memory in GiB or None)."""
    from train import Config, preference_loss
    from machinery.config import resolve_loss
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config)).to(device).train()
    model.activation_checkpointing = True
    optimizer = model.configure_optimizers(0.1, 1e-6, (0.9, 0.95), device)
    cfg = Config(loss="adpo", beta=0.1, family="adaptive", size=256, gamma=0.5, nll_weight=0.0)
    idx = torch.randint(0, config["vocab_size"], (2 * B, T), device=device)  # chosen, rejected
    mask = torch.zeros(2 * B, T, dtype=torch.bool, device=device)
    mask[:, T // 4:] = True  # a prompt of T/4 tokens, then the response
    batch = dict(input_ids=idx, targets=idx.roll(-1, 1), loss_mask=mask,
                 reference_logps=torch.full((2 * B, T), -2.0, device=device))
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.time()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, _ = preference_loss(model, batch, resolve_loss(cfg))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    return loss.item(), 2 * B * T / min(times[1:]), peak, model


def test_preference_step_runs_in_bf16_with_activation_checkpointing():
    """What the CUDA test below runs at Qwen2.5-0.5B's shape, at a tiny one on the CPU."""
    tiny = dict(QWEN25_05B, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_inner=48)
    loss, tokens_per_s, _, _ = preference_steps(tiny, "cpu", B=2, T=32, steps=2)
    assert math.isfinite(loss) and tokens_per_s > 0


@pytest.mark.cuda
def test_qwen25_05b_shape_preference_step_in_bf16():
    """One GPU: 8 pairs x 512 tokens per step (the micro-batch of the qwen25_05b_gsm8k preset).
    Prints tokens/s, MFU and peak memory (pytest -s to see them)."""
    loss, tokens_per_s, peak, model = preference_steps(QWEN25_05B, "cuda", B=8, T=512)
    mfu = model.estimate_mfu(tokens_per_s, peak_flops(), seq_len=512)
    print(f"\nQwen2.5-0.5B shape, {torch.cuda.get_device_name()}: {tokens_per_s:,.0f} tokens/s, "
          f"MFU {'unknown' if mfu is None else f'{100 * mfu:.1f}%'}, peak memory {peak:.1f} GiB")
    assert math.isfinite(loss)
    assert peak < 20  # the preference stage of a 0.5B model fits one 24 GB GPU, with room
