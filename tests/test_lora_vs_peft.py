"""
LoRA (lora.LoRALinear, apply_lora) against independent references: the equation written out as
a slow loop, transformers (a merged export), and peft (the PEFT-format adapters on the Hugging Face
base), for GPT-2 and each Llama-family kind; gradients only in the adapters; checkpoints that hold
the adapters and the name of their base; exact resume of a LoRA run.
"""
import os
import shutil

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

import train
from machinery.config import resolve_loss
from machinery.common import read_jsonl
from machinery.checkpoint import export, load_checkpoint, load_gpt, save_checkpoint
from machinery.hf import save_pretrained
from machinery.lora import LoRALinear, apply_lora, base_digest, lora_settings, lora_targets
from model import GPT, GPTConfig
from tiny_hf import hf_model
from conftest import die_at, Died, run_cli, tiny, UNTIMED

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

V = 260  # (> 257: the byte tokenizer the checkpoints name fits)
KINDS = ["gpt2", "llama", "qwen2", "qwen3"]


def base_folder(kind, folder):
    """A Hugging Face base of each kind: transformers' own Llama/Qwen classes (random init), and
    for GPT-2 a random GPT exported by save_pretrained."""
    if kind == "gpt2":
        torch.manual_seed(3)
        model = GPT(GPTConfig(block_size=64, vocab_size=V, n_layer=2, n_head=2, n_embd=32))
        save_pretrained(model, folder)
    else:
        hf_model(kind, V).save_pretrained(folder)
    return folder


def ids(shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def randomize_adapters_(model, seed=5):
    """B is 0 at init; random B (and A) make every adapter matter in the comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("targets", ["attn,mlp", "v_proj,up_proj"])
def test_at_init_the_adapted_model_is_the_base(kind, targets, tmp_path):
    model = load_gpt(base_folder(kind, tmp_path)).eval()
    if kind == "gpt2":
        targets = targets.replace("v_proj", "c_attn").replace("up_proj", "mlp.c_proj")
    idx = ids((2, 17))
    with torch.no_grad():
        before = model(idx)
        apply_lora(model, rank=4, alpha=8, targets=targets, dropout=0.1, seed=1)
        after = model(idx)
    assert torch.equal(before, after)  # B = 0: exactly the base (dropout is off in eval mode)
    assert lora_settings(model)["targets"] == ",".join(lora_targets(model.config, targets))


def test_the_update_is_the_equation_part_by_part():
    """A fused c_attn with adapters on q and v only:
    y = x Wᵀ + b + (α/r) [B_q A_q x; 0; B_v A_v x], each part from its own A_i, B_i."""
    config = GPTConfig(model_type="qwen2", block_size=32, vocab_size=V, n_layer=1, n_head=4,
                       n_kv_head=2, n_embd=32, n_inner=48, bias=False)
    model = randomize_adapters_(apply_lora(GPT(config), 3, 6.0, "q_proj,v_proj", seed=2))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.bias is not None  # Qwen2's q/k/v bias kept
    x = torch.randn(2, 5, 32)
    A, B = layer.lora_A, layer.lora_B
    q, kv = 4 * 8, 2 * 8
    want = [x @ layer.weight[:q].t() + layer.bias[:q] + 2.0 * (x @ A[:3].t()) @ B[:q].t(),
            x @ layer.weight[q:q + kv].t() + layer.bias[q:q + kv],  # k: no adapter
            x @ layer.weight[q + kv:].t() + layer.bias[q + kv:] + 2.0 * (x @ A[3:].t()) @ B[q:].t()]
    assert torch.allclose(layer(x), torch.cat(want, -1), atol=1e-6)
    merged = layer.merged_weight()
    assert torch.allclose(x @ merged.t() + layer.bias, layer(x), atol=1e-5)


def test_gradients_reach_only_the_adapters_and_the_optimizer_holds_only_them():
    config = GPTConfig(model_type="llama", block_size=32, vocab_size=V, n_layer=2, n_head=4,
                       n_kv_head=2, n_embd=32, n_inner=48, bias=False, tie_embeddings=False)
    model = apply_lora(GPT(config), 4, 8, seed=0)
    batch = preference_batch()
    loss, _ = train.preference_loss(model, batch, resolve_loss(PO_CFG))
    loss.backward()
    for name, p in model.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        # at B = 0 the A's gradient is 0 too (it passes through B); the B's is not
        assert p.requires_grad == (".lora_" in name), name
        assert has_grad == name.endswith("lora_B"), name
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (
        3 * 4 * 32 + 4 * (32 + 16 + 16)       # q, k, v: A (4, 32) each; B (32|16|16, 4)
        + 4 * 32 + 32 * 4                      # o
        + 2 * 4 * 32 + 4 * (48 + 48)           # gate, up
        + 4 * 48 + 32 * 4)                     # down


PO_CFG = train.Config(loss="adpo", beta=0.5, family="static", size=1)


def preference_batch(B=3, T=20, seed=0):
    """Random chosen/rejected rows (2B, T) with a prompt of 6 tokens and a reference."""
    idx = ids((2 * B, T), seed)
    mask = torch.zeros(2 * B, T, dtype=torch.bool)
    mask[:, 6:] = True
    return dict(input_ids=idx, targets=idx.roll(-1, 1), loss_mask=mask,
                reference_logps=torch.full((2 * B, T), -4.0))


def preference_steps(model, steps=3):
    optimizer = model.configure_optimizers(0.0, 2e-2, (0.9, 0.95), "cpu")
    model.train()
    for step in range(steps):
        loss, _ = train.preference_loss(model, preference_batch(seed=step), resolve_loss(PO_CFG))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_after_training_the_merged_export_and_peft_give_the_adapted_logits(kind, tmp_path):
    """A few preference steps on a LoRA model; then save_pretrained (adapters merged) loads in
    transformers, and the PEFT-format adapters load with peft onto the Hugging Face base: both
    give our adapted model's logits. The checkpoint holds only the adapters and the base's name."""
    folder = base_folder(kind, tmp_path / "base")
    model = preference_steps(apply_lora(load_gpt(folder), 4, 8, dropout=0.0, seed=1))
    base = load_gpt(folder).eval()
    idx = ids((2, 19), 3)
    with torch.no_grad():
        ours = model(idx)
        assert (ours - base(idx)).abs().max() > 1e-3  # it trained
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, model, base=str(folder), tokenizer="byte")
    saved = load_checkpoint(ckpt)
    assert saved["base"] == str(folder) and all(".lora_" in k for k in saved["model"])
    with torch.no_grad():
        assert torch.equal(load_gpt(ckpt).eval()(idx), ours)
    export(ckpt, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(idx).logits - ours).abs().max() < 1e-4
    peft = pytest.importorskip("peft")
    export(ckpt, tmp_path / "adapter", adapter=True)
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json",
                                                        "adapter_model.safetensors"]
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (adapted(idx).logits - ours).abs().max() < 1e-4


def test_a_lora_checkpoint_whose_base_changed_or_went_is_one_line(tmp_path):
    folder = base_folder("qwen2", tmp_path / "base")
    model = apply_lora(load_gpt(folder), 2, 4)
    save_checkpoint(tmp_path / "ckpt.pt", model, base=str(tmp_path / "gone"))
    with pytest.raises(ValueError, match="its LoRA adapters sit on .*gone, which cannot be"):
        load_gpt(tmp_path / "ckpt.pt")
    other = base_folder("qwen3", tmp_path / "other")
    save_checkpoint(tmp_path / "ckpt.pt", model, base=str(other))
    with pytest.raises(ValueError, match="is not the model these adapters were trained on"):
        load_gpt(tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="'qkv' is not a projection of this qwen2 model"):
        lora_targets(model.config, "qkv")


# -----------------------------------------------------------------------------
# a LoRA run end to end


LORA = dict(lora_rank=4, lora_alpha=8, lora_dropout=0.1, sft_lr=3e-2)


@pytest.mark.slow
def test_a_lora_run_resumes_exactly_and_trains_only_its_adapter(tmp_path):
    """A whole tiny pipeline with LoRA (from scratch: its initial weights are the base), then the
    same run killed mid-SFT and mid-PO and resumed: identical adapters, metrics, evaluations."""
    flags = dict(LORA, pairs_source="offline")  # (a tiny adapter's samples rarely finish)
    one = tmp_path / "one"
    train.main(tiny(one, **flags))
    two = tmp_path / "two"
    for point in ("sft:5", "po:3"):
        with pytest.MonkeyPatch.context() as mp, pytest.raises(Died):
            die_at(mp, point)
            train.main(tiny(two, **flags))
    train.main(tiny(two, **flags))
    for stage in ("sft", "po"):
        a, b = (load_checkpoint(d / stage / "ckpt.pt") for d in (one, two))
        assert a["lora"] == b["lora"] == dict(rank=4, alpha=8.0, dropout=0.1,
                                               targets="c_attn,attn.c_proj,c_fc,mlp.c_proj",
                                               base_digest=base_digest(load_gpt(one / "sft" /
                                                                                "base.pt")))
        assert (a["base"], b["base"]) == (str(one / "sft" / "base.pt"),
                                          str(two / "sft" / "base.pt"))
        assert a["model"].keys() == b["model"].keys()
        assert all(".lora_" in k and torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        ma, mb = ([{k: v for k, v in r.items() if k not in UNTIMED}
                   for r in read_jsonl(d / stage / "metrics.jsonl")] for d in (one, two))
        assert ma == mb and len(ma) > 0
        for d in (one, two):
            assert not (d / stage / "state.pt").exists()
        ea, eb = ((d / stage / "eval.json").read_text() for d in (one, two))
        assert ea == eb
    base = load_gpt(one / "sft" / "base.pt").state_dict()
    po = load_gpt(one / "po" / "ckpt.pt").state_dict()
    assert all(torch.equal(base[k], po[k]) for k in base)  # the base never moved
    sft = load_checkpoint(one / "sft" / "ckpt.pt")["model"]
    po_adapters = load_checkpoint(one / "po" / "ckpt.pt")["model"]
    assert max((sft[k] - po_adapters[k]).abs().max().item() for k in sft) > 1e-4  # PO trained


@pytest.mark.slow
def test_a_lora_checkpoint_loads_its_own_base_after_its_run_folder_moved(tmp_path):
    """A LoRA checkpoint named its base by absolute path and checked it by config only: a
    renamed run folder could load none of its checkpoints, and a new run at the old path lent
    them its own random base without a word. The base is now found relative to the checkpoint
    first, and pinned by a digest of its weights: another base is refused in one line."""
    run, moved = tmp_path / "run", tmp_path / "renamed"
    train.main(tiny(run, **LORA, stop_after="sft"))
    idx = ids((2, 19)) % 257  # (the byte tokenizer's ids)
    with torch.no_grad():
        trained = load_gpt(run / "sft" / "ckpt.pt").eval()(idx)
    os.rename(run, moved)
    with torch.no_grad():
        assert torch.equal(load_gpt(moved / "sft" / "ckpt.pt").eval()(idx), trained)
    made = run_cli(["train.py", *tiny(run, **LORA, stop_after="sft", seed=1)])  # a new run there
    assert made.returncode == 0, made.stderr[-2000:]
    assert not torch.equal(load_gpt(run / "sft" / "base.pt").transformer.wte.weight,
                           load_gpt(moved / "sft" / "base.pt").transformer.wte.weight)
    with torch.no_grad():
        assert torch.equal(load_gpt(moved / "sft" / "ckpt.pt").eval()(idx), trained)
    shutil.copy(run / "sft" / "base.pt", moved / "sft" / "base.pt")  # another base, same config
    with pytest.raises(ValueError, match=r"ckpt.pt: its base .*base.pt is not the model these "
                                         r"adapters were trained on \(weights digest"):
        load_gpt(moved / "sft" / "ckpt.pt")


@pytest.mark.slow
def test_lora_under_compile_and_activation_checkpointing_gives_the_eager_gradients():
    """The adapters through torch.compile and activation checkpointing: the loss and adapter
    gradients of the plain eager model (float32: to float rounding)."""
    config = GPTConfig(model_type="qwen3", block_size=32, vocab_size=V, n_layer=2, n_head=4,
                       n_kv_head=2, head_dim=8, n_embd=32, n_inner=48, bias=False)
    torch.manual_seed(0)
    eager = randomize_adapters_(apply_lora(GPT(config), 4, 8, seed=1))
    other = apply_lora(GPT(config), 4, 8, seed=1)
    other.load_state_dict(eager.state_dict())
    other.activation_checkpointing = True
    batch = preference_batch()
    losses, grads = [], []
    for model, wrap in ((eager, lambda m: m), (other, torch.compile)):
        loss, _ = train.preference_loss(wrap(model), batch, resolve_loss(PO_CFG))
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and all(".lora_" in n for n in grads[0])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6), n
