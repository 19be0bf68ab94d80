"""cDPO and cADPO: the contrastive token weights (against a slow loop), the losses' identities, and
the contrastive step of train.py (alignment with the pairs, resume, bad input)."""
import json

import pytest
import torch
import torch.nn.functional as F

import eval as eval_
import train
from machinery.config import eos_padded, resolve_loss
from machinery.checkpoint import load_gpt
from data import encode_pairs
from loss import adpo_loss, cadpo_loss, cdpo_loss, contrastive_weights, dpo_loss
from model import GPT, GPTConfig
from machinery.tokenizer import get_tokenizer
from conftest import die_at, Died, make_batch, tiny


def tiny_gpt(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=16)).eval()


def test_the_weights_follow_the_formula_token_by_token():
    """w_t = 1 − softmax(2·z⁺ − z⁻)[y_t], each z computed from scratch on the prefix alone."""
    positive, negative, tok = tiny_gpt(1), tiny_gpt(2), get_tokenizer("byte")
    pairs = [dict(prompt="Question: 2+3?\nAnswer:", chosen=" 5", rejected=" 2+3=6\n#### 6"),
             dict(prompt="Question: 1+1?\nAnswer:", chosen=" 2", rejected=" 3")]
    rows, _ = encode_pairs(pairs, tok, max_len=64)
    cfg = train.Config(po_batch_size=2)
    run = train.setup("cpu")
    fast = train.token_weights(positive, negative, rows, cfg, run, tok.eot_token)
    for row, w in zip(rows, fast):
        ids = row["prompt_ids"] + row["rejected_ids"]   # the rejected response ends with EOS
        assert w.shape == (len(row["rejected_ids"]),)
        for t, token in enumerate(row["rejected_ids"]):
            prefix = torch.tensor([ids[:len(row["prompt_ids"]) + t]])
            with torch.no_grad():
                z = 2 * positive(prefix)[0, -1] - negative(prefix)[0, -1]
            assert w[t].item() == pytest.approx(1 - F.softmax(z, -1)[token].item(), abs=1e-6)
    assert all(((w >= 0) & (w <= 1)).all() for w in fast)


def test_contrastive_weights_on_logits():
    z_pos = torch.tensor([[[2.0, 0.0, 0.0]]])
    z_neg = torch.tensor([[[0.0, 0.0, 3.0]]])  # 2·z⁺ − z⁻ = (4, 0, −3)
    w = contrastive_weights(z_pos, z_neg, torch.tensor([[0]]))
    p = torch.softmax(torch.tensor([4.0, 0.0, -3.0]), 0)[0]
    assert w.item() == pytest.approx(1 - p.item())


def test_unit_weights_give_dpo_and_adpo_exactly():
    batch = make_batch(seed=21)
    six = [batch[k] for k in ("policy_chosen_logps", "policy_rejected_logps",
                              "reference_chosen_logps", "reference_rejected_logps",
                              "chosen_mask", "rejected_mask")]
    ones = torch.ones_like(six[0])
    assert torch.equal(cdpo_loss(*six, beta=0.3, rejected_weights=ones)[0],
                       dpo_loss(*six, beta=0.3)[0])
    w = torch.rand(ones.shape, dtype=ones.dtype, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(cdpo_loss(*six, beta=0.3, rejected_weights=w)[0],  # = cADPO, m = 1
                          cadpo_loss(*six, beta=0.3, family="adaptive", size=1,
                                     rejected_weights=w)[0], rtol=1e-12)
    for family, size in (("adaptive", 256), ("adaptive", 4), ("static", 1), ("static", 3)):
        assert torch.equal(cadpo_loss(*six, beta=0.3, family=family, size=size,
                                      rejected_weights=ones)[0],
                           adpo_loss(*six, beta=0.3, family=family, size=size)[0])


def test_cadpo_static_pads_with_eos_like_adpo_static_and_unit_weights_give_its_step():
    """The paper's EOS padding of the static family holds for cADPO too (--eos_pad false turns it
    off), and through train.py's batches cADPO with weights 1 takes ADPO's step exactly."""
    policy, reference, tok = tiny_gpt(5), tiny_gpt(6), get_tokenizer("byte")
    pairs = [dict(prompt="Question: 2+3?\nAnswer:", chosen=" 5", rejected=" 2+3=6\n#### 6"),
             dict(prompt="Question: 7-1?\nAnswer:", chosen=" 7-1=6\n#### 6", rejected=" 8")]
    rows, _ = encode_pairs(pairs, tok, max_len=64)
    ones = [torch.ones(len(row["rejected_ids"])) for row in rows]
    for eos_pad in (True, False):
        steps = []
        for loss in ("adpo", "cadpo"):
            cfg = train.Config(loss=loss, family="static", size=2, beta=0.3, eos_pad=eos_pad)
            ref = eval_.pair_logps(reference, rows, tok.eot_token, eos_pad=eos_padded(cfg.loss, cfg.family, cfg.eos_pad),
                                   progress=False)
            batch = train.pair_batch(rows, ref, tok.eot_token, resolve_loss(cfg).eos_pad,
                                     weights=ones if loss == "cadpo" else None)
            steps.append((batch["loss_mask"], train.preference_loss(policy, batch, resolve_loss(cfg))[0]))
        (mask_a, loss_a), (mask_c, loss_c) = steps
        assert torch.equal(mask_a, mask_c) and torch.equal(loss_a, loss_c)
        lengths = mask_c.sum(-1)  # chosen rows, then rejected rows
        assert (lengths[:2] == lengths[2:]).all() == eos_pad  # padded to equal length, or not


def test_weights_weigh_the_rejected_log_ratios_and_the_public_code_form():
    """cDPO = −log σ(β Σρ^w − β Σ w ρ^l); cDPO's public code: the mean over token positions of
    −log σ(β ρ^w_t − β w_t ρ^l_t) (static k=1, zero padding, segment_mean)."""
    batch = make_batch(seed=22)
    six = [batch[k] for k in ("policy_chosen_logps", "policy_rejected_logps",
                              "reference_chosen_logps", "reference_rejected_logps",
                              "chosen_mask", "rejected_mask")]
    pc, pr, rc, rr, cm, rm = six
    w = torch.rand(pr.shape, dtype=pr.dtype, generator=torch.Generator().manual_seed(3))
    beta = 0.4
    for b in range(pc.size(0)):
        rho_w = (pc[b] - rc[b])[cm[b]]
        rho_l = ((pr[b] - rr[b]) * w[b])[rm[b]]
        expected = -F.logsigmoid(beta * rho_w.sum() - beta * rho_l.sum())
        got = cdpo_loss(*six, beta=beta, rejected_weights=w)[0][b]
        assert got.item() == pytest.approx(expected.item(), rel=1e-9)
        T = max(len(rho_w), len(rho_l))  # zero padding to the longer response
        per_token = -F.logsigmoid(beta * F.pad(rho_w, (0, T - len(rho_w)))
                                  - beta * F.pad(rho_l, (0, T - len(rho_l))))
        got = adpo_loss(*six, beta=beta, family="static", size=1, segment_mean=True,
                        rejected_weights=w)[0][b]
        assert got.item() == pytest.approx(per_token.mean().item(), rel=1e-9)


@pytest.fixture(scope="module")
def cdpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cdpo") / "run"
    train.main(tiny(out, pairs_source="offline", n_pair_questions=12, loss="cdpo", cdpo_steps=4,
                    dropout=0.0))
    return out


@pytest.mark.slow
def test_one_weight_per_rejected_token_in_the_order_of_the_pairs(cdpo_run):
    weights = torch.load(cdpo_run / "cdpo" / "weights.pt", weights_only=True)
    pairs = [json.loads(line) for line in (cdpo_run / "pairs" / "train.jsonl").open()]
    tok = get_tokenizer("byte")
    rows, _ = encode_pairs(pairs, tok, max_len=128)
    assert len(weights) == len(pairs)
    positive, negative = (load_gpt(cdpo_run / "cdpo" / m / "ckpt.pt").eval()
                          for m in ("positive", "negative"))
    direct = train.token_weights(positive, negative, rows, train.Config(po_batch_size=1),
                                 train.setup("cpu"), tok.eot_token)
    for row, w, d in zip(rows, weights, direct):  # each pair on its own: no batching effects
        assert len(weights[row["idx"]]) == len(row["rejected_ids"]) == len(tok.encode_ordinary(
            pairs[row["idx"]]["rejected"])) + 1  # + EOS
        assert torch.allclose(weights[row["idx"]], d, atol=1e-6)
    assert (cdpo_run / "po" / "eval.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["cdpo/positive:2", "cdpo/negative:done"])
def test_resume_after_a_kill_in_the_contrastive_step_gives_the_same_weights(cdpo_run, tmp_path,
                                                                            point):
    flags = tiny(tmp_path / "run", pairs_source="offline", n_pair_questions=12, loss="cdpo",
                 cdpo_steps=4, dropout=0.0)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Died):
        die_at(mp, point)
        train.main(flags)
    train.main(flags)
    a, b = (torch.load(d / "cdpo" / "weights.pt", weights_only=True)
            for d in (cdpo_run, tmp_path / "run"))
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not (tmp_path / "run" / "cdpo" / "positive" / "state.pt").exists()


@pytest.mark.slow
def test_no_incorrect_samples_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "contrastive_examples",
                        lambda cfg, pairs: ([dict(prompt="Q", response=" 1")], []))
    with pytest.raises(ValueError, match=r"cDPO's negative model needs incorrect samples, and the "
                                         r"pairs stage drew none: sample more \(--n_samples"):
        train.main(tiny(tmp_path / "run", pairs_source="offline", n_pair_questions=12,
                        loss="cadpo"))
