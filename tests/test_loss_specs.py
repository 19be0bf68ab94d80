"""
Tests for train.py's loss plumbing: --loss specs and --loss_weights (each term a mean over pairs,
then weighted, under train()'s one division by the pair count), bco_pair's running reward mean
(state the caller holds, exact on resume), and the --compare variants: their parsing, labels,
folders and Table-3 order.
"""
import dataclasses
import shutil

import pytest
import torch

from machinery import compare
import train
from machinery.config import eos_padded, metric_granularity, resolve_loss
from conftest import UNTIMED, Died, die_at, make_batch, tiny
from machinery.common import ConfigError, read_jsonl
from loss import LOSSES


def six_of(batch):
    return [batch[k] for k in ("policy_chosen_logps", "policy_rejected_logps",
                               "reference_chosen_logps", "reference_rejected_logps",
                               "chosen_mask", "rejected_mask")]


def step_batch(batch):
    """make_batch's six tensors as train.preference_loss's (2B, T) batch, and a 'model' that
    returns the policy's log-probs."""
    pc, pr, rc, rr, cm, rm = six_of(batch)
    policy = torch.cat([pc, pr])  # (2B, T): chosen rows, then rejected rows
    step = dict(input_ids=torch.zeros(policy.shape, dtype=torch.long),
                targets=torch.zeros(policy.shape, dtype=torch.long),
                loss_mask=torch.cat([cm, rm]), reference_logps=torch.cat([rc, rr]))
    return step, (lambda idx, targets: policy)


# -----------------------------------------------------------------------------
# the step: terms, weights, the pair-count contract


def test_a_weighted_sum_is_each_term_summed_over_pairs_then_weighted():
    batch = make_batch(seed=40)
    step, model = step_batch(batch)
    cfg = train.Config(loss="dpo+hinge:adaptive:3+sft", loss_weights="1,0.25,0.5", beta=0.3)
    loss, metrics = train.preference_loss(model, step, resolve_loss(cfg))
    six = six_of(batch)
    want = (LOSSES["dpo"](*six, beta=0.3)[0].sum()
            + 0.25 * LOSSES["hinge"](*six, beta=0.3, family="adaptive", size=3)[0].sum()
            + 0.5 * LOSSES["sft"](*six)[0].sum())
    torch.testing.assert_close(loss, want)
    assert metrics["loss"].item() == pytest.approx(want.item())


@pytest.mark.parametrize("loss,weights", [("adpo", ""), ("dpo+sft", "1,0.5"),
                                          ("bco_pair+ipo:static:2", "0.2,1")])
def test_a_batch_split_in_parts_sums_to_the_whole(loss, weights):
    """What lets train() divide the summed loss by the global pair count once: every term is a
    sum over pairs (so parts of a batch add up to the whole), with or without LD-DPO and WPO."""
    batch = make_batch(seed=41)
    for extra in ({}, {"ld_alpha": 0.5, "use_weighting": True}):
        cfg = train.Config(loss=loss, loss_weights=weights, **extra)
        whole = train.preference_loss(step_batch(batch)[1], step_batch(batch)[0],
                                      resolve_loss(cfg))[0]
        parts = 0.0
        for rows in (slice(0, 2), slice(2, 6)):
            part = {k: v[rows] for k, v in batch.items()}
            step, model = step_batch(part)
            parts = parts + train.preference_loss(model, step, resolve_loss(cfg))[0]
        torch.testing.assert_close(whole, parts)


def test_the_default_loss_is_today_s_step_bit_for_bit():
    """One term of weight 1, no LD-DPO, no WPO: the sum over pairs of the loss, as before."""
    batch = make_batch(seed=42)
    step, model = step_batch(batch)
    cfg = train.Config()
    loss, _ = train.preference_loss(model, step, resolve_loss(cfg))
    want = LOSSES["adpo"](*six_of(batch), beta=cfg.beta, family=cfg.family, size=cfg.size)[0]
    assert torch.equal(loss, want.sum())


def test_bco_pair_takes_its_shift_from_the_running_mean_its_batch_carries():
    batch = make_batch(seed=43)
    step, model = step_batch(batch)
    cfg = train.Config(loss="bco_pair", beta=0.3)
    mean = train.RewardMean()
    for chosen, rejected in ((0.0, 0.0), (0.3, -0.1), (0.5, 0.1)):
        mean.update({"rewards/chosen": chosen, "rewards/rejected": rejected})
    assert mean.value == pytest.approx((0.0 + 0.1 + 0.3) / 3) and mean.steps == 3
    loss, metrics = train.preference_loss(model, step | {"delta": mean.value}, resolve_loss(cfg))
    want = LOSSES["bco_pair"](*six_of(batch), beta=0.3, delta=mean.value)[0].sum()
    torch.testing.assert_close(loss, want)
    assert metrics["bco/delta"].item() == pytest.approx(6 * mean.value)  # summed over 6 pairs
    at_zero = train.preference_loss(model, step | {"delta": 0.0}, resolve_loss(cfg))[0]
    assert not torch.allclose(loss, at_zero)  # δ = 0
    again = train.RewardMean()
    again.load_state_dict(mean.state_dict())
    assert vars(again) == vars(mean)


def test_eos_padding_and_the_metrics_follow_the_terms_granularity():
    assert eos_padded("adpo", "static") and not eos_padded("adpo", "adaptive")
    assert eos_padded("hinge:static:4", "adaptive") and not eos_padded("hinge", "static")
    assert eos_padded("dpo+ipo:static:2", "adaptive")
    assert not eos_padded("hinge:static:4", "static", eos_pad=False)
    assert not eos_padded("dpo", "static") and not eos_padded("cdpo", "static")
    assert metric_granularity("hinge:adaptive:16", "static", 1) == ("adaptive", 16)
    assert metric_granularity("dpo+sft", "static", 1) == ("static", 1)
    assert metric_granularity("adpo", "adaptive", 256) == ("adaptive", 256)


# -----------------------------------------------------------------------------
# --compare variants


@pytest.mark.parametrize("spec,label,folder", [
    # today's spellings keep their labels and folders (runs made before still read back)
    ("dpo", "DPO", "dpo_s0"), ("adpo", "ADPO static k=1", "adpo_static_1_s0"),
    ("adpo:adaptive:256", "ADPO adaptive m=256", "adpo_adaptive_256_s0"),
    ("cadpo:adaptive:256", "cADPO adaptive m=256", "cadpo_adaptive_256_s0"),
    ("ipo", "IPO", "ipo_s0"), ("simpo", "SimPO", "simpo_s0"), ("cdpo", "cDPO", "cdpo_s0"),
    # loss x granularity, weighted sums, a variant's own settings
    ("hinge", "hinge", "hinge_s0"),
    ("hinge:adaptive:16", "hinge adaptive m=16", "hinge_adaptive_16_s0"),
    ("ipo:static:4", "IPO static k=4", "ipo_static_4_s0"),
    ("dpo+sft", "DPO + SFT", "dpo+sft_s0"),
    ("dpo+0.5sft", "DPO + 0.5·SFT", "dpo+0.5sft_s0"),
    ("0.8dpo+0.2bco_pair+sft", "0.8·DPO + 0.2·bco_pair + SFT", "0.8dpo+0.2bco_pair+sft_s0"),
    ("robust@label_smoothing=0.1", "robust label_smoothing=0.1",
     "robust@label_smoothing=0.1_s0"),
    ("simpo@beta=2@gamma=1", "SimPO beta=2.0 gamma=1.0", "simpo@beta=2.0@gamma=1.0_s0"),
])
def test_variants_parse_label_and_file_themselves(spec, label, folder, tmp_path):
    cfg = train.Config(out_dir=str(tmp_path))
    variant = dataclasses.replace(compare.parse_variant(spec, cfg), seed=0)
    assert compare.variant_label(variant, cfg) == label
    assert compare.variant_folder(variant, cfg) == str(tmp_path / "compare" / folder)


def test_a_variant_becomes_the_config_it_names():
    cfg = train.Config()
    v = compare.parse_variant("dpo+0.5sft", cfg)
    assert (v.loss, v.loss_weights) == ("dpo+sft", "1,0.5")
    v = compare.parse_variant("adpo:static:4", cfg)
    assert (v.loss, v.family, v.size) == ("adpo", "static", 4)
    v = compare.parse_variant("hinge:adaptive:16", cfg)
    assert (v.loss, v.family, v.size) == ("hinge:adaptive:16", cfg.family, cfg.size)
    v = compare.parse_variant("robust@label_smoothing=0.1@po_lr=3e-4", cfg)
    assert (v.label_smoothing, v.po_lr, v.loss) == (0.1, 3e-4, "robust")


@pytest.mark.parametrize("spec,match", [
    ("robust@bogus=1", "expected @KEY=VALUE with KEY one of beta, gamma"),
    ("robust@n_test=5", "expected @KEY=VALUE with KEY one of"),
    ("robust@label_smoothing=0.7", "--label_smoothing must be in [0, 0.5), got 0.7"),
    ("exo_pair", "--loss exo_pair needs --label_smoothing > 0"),
    ("bco_pair:static:4", "bco_pair has no granularity"),
    ("hinge:diagonal:4", "FAMILY static or adaptive"),
    ("dpo+sft+", "expected terms joined by +"),
])
def test_bad_variants_are_one_line(spec, match):
    with pytest.raises(ConfigError, match="--compare: bad variant") as e:
        compare.parse_variant(spec, train.Config())
    assert match in str(e.value) and "\n" not in str(e.value)


def test_the_table_3_order_holds_loss_x_granularity():
    cfg = train.Config(compare="cadpo:adaptive:256,dpo+sft,hinge:adaptive:16,robust,cdpo,"
                               "ipo:static:4,hinge,adpo:adaptive:16,adpo:static:4,dpo,ipo,"
                               "hinge:static:2,robust@label_smoothing=0.1", seeds="0")
    labels = [label for label, _, _ in compare.variants(cfg)[0]]
    assert labels == ["ADPO static k=4", "DPO", "ADPO adaptive m=16",
                      "IPO static k=4", "IPO",
                      "hinge static k=2", "hinge", "hinge adaptive m=16",
                      "robust", "robust label_smoothing=0.1",
                      "DPO + SFT", "cDPO", "cADPO adaptive m=256"]


def test_a_variant_named_twice_is_refused():
    cfg = train.Config(compare="adpo,adpo:static:1", seeds="0")
    with pytest.raises(ConfigError, match="ADPO static k=1 named twice"):
        compare.variants(cfg)


# -----------------------------------------------------------------------------
# bco_pair's running mean across a kill: stored in the training state, resumed exactly


def untimed(log):
    return [{k: v for k, v in m.items() if k not in UNTIMED} for m in log]


@pytest.mark.slow
def test_bco_pair_resumes_exactly_with_its_running_mean(tmp_path):
    flags = dict(loss="bco_pair", pairs_source="offline", n_pair_questions=96, po_epochs=0.3)
    whole = tmp_path / "whole"
    train.main(tiny(whole, **flags))
    log = read_jsonl(whole / "po" / "metrics.jsonl")
    assert len(log) >= 4, "the tiny run should train a few PO steps"
    # δ at each step: the mean over the steps before of their (chosen + rejected) / 2
    means = [(m["rewards/chosen"] + m["rewards/rejected"]) / 2 for m in log]
    for s, m in enumerate(log):
        assert m["bco/delta"] == pytest.approx(sum(means[:s]) / max(s, 1), abs=1e-6)
    assert any(m["bco/delta"] != 0 for m in log)
    # the same run killed after PO step 3 (its last training state: step 2), then resumed
    killed = tmp_path / "killed"
    shutil.copytree(whole, killed, ignore=shutil.ignore_patterns("po", "summary.json", "*.png",
                                                                 ".lock"))
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Died):
        die_at(mp, "po:3")
        train.main(tiny(killed, **flags))
    assert "loss_state" in torch.load(killed / "po" / "state.pt", weights_only=True)
    train.main(tiny(killed, **flags))
    assert untimed(read_jsonl(killed / "po" / "metrics.jsonl")) == untimed(log)
    a, b = (torch.load(d / "po" / "ckpt.pt", weights_only=True)["model"] for d in (whole, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
