"""
The comparison harness (--compare): every variant x seed trained from the same SFT model and the
same pairs, in Table 3's order, each in compare/<variant>_s<seed>/; with --pipeline_seeds the
whole pipeline once per seed, each in DIR/seed_<s>/. The report (report.report_run,
report_pipelines) pairs each variant with the baseline question by question.

    python train.py --compare dpo,adpo:static:4,adpo:adaptive:256,ipo,hinge:adaptive:16 --seeds 0,1
    python train.py --compare dpo,adpo --pipeline_seeds 0,1,2    # SFT and pairs vary too

A variant is a --loss spec (terms joined by +, each NAME or NAME:FAMILY:SIZE, a weight in front
where it is not 1: dpo+0.5sft), then @KEY=VALUE for the preference-stage settings it sets itself.
"""
import dataclasses
import os
import re
from functools import partial

from loss import LOSSES, SEGMENTED, WEIGHTED
from machinery.common import ConfigError, convert, need, parse
from machinery.config import Config, resolve_loss, validate


# the settings a --compare variant may set for itself (robust@label_smoothing=0.1): only the
# preference stage reads them
PO_KEYS = ("beta", "gamma", "label_smoothing", "discopop_tau", "dpop_lambda", "ld_alpha",
           "use_weighting", "nll_weight", "segment_mean", "eos_pad", "po_epochs", "po_lr")
# how the tables name the losses (the others by their TRL names: hinge, robust, ...)
NAMES = {"dpo": "DPO", "adpo": "ADPO", "ipo": "IPO", "simpo": "SimPO", "cdpo": "cDPO",
         "cadpo": "cADPO", "sft": "SFT", "dpop": "DPOP", "spo": "SPO"}


def variant_terms(cfg):
    """[(name, weight, (family, size) or None)]: each term of --loss, with the granularity it
    compares at (None: the whole responses)."""
    return [(term.name, term.weight, term.grain) for term in resolve_loss(cfg).terms]


def overridden(variant, cfg):
    """The PO_KEYS a variant sets differently from the run's config."""
    return [k for k in PO_KEYS if cfg is not None and getattr(variant, k) != getattr(cfg, k)]


def variant_label(variant, cfg=None):
    """A variant's name in the tables: 'ADPO static k=4', 'hinge adaptive m=16', 'DPO + 0.5·SFT',
    then the settings it changes from the run's config cfg ('robust label_smoothing=0.1')."""
    terms = []
    for name, weight, grain in variant_terms(variant):
        label = NAMES.get(name, name)
        if grain:
            label += f" {grain[0]} {'k' if grain[0] == 'static' else 'm'}={grain[1]}"
        terms.append(label if weight == 1 else f"{weight:g}·{label}")
    settings = [f" {k}={getattr(variant, k)}" for k in overridden(variant, cfg)]
    return " + ".join(terms) + "".join(settings)


def variant_folder(variant, cfg):
    """compare/<tag>_s<seed>: the variant's spelling, ':' as '_' (adpo_static_4,
    hinge_adaptive_16, dpo+0.5sft, robust@label_smoothing=0.1); a bare adpo or cadpo with the
    config's granularity (adpo_static_1)."""
    terms = []
    for name, weight, grain in variant_terms(variant):
        tag = name if grain is None else f"{name}_{grain[0]}_{grain[1]}"
        terms.append(tag if weight == 1 else f"{weight:g}{tag}")
    settings = [f"@{k}={getattr(variant, k)}" for k in overridden(variant, cfg)]
    tag = "+".join(terms) + "".join(settings)
    return os.path.join(cfg.out_dir, "compare", f"{tag}_s{variant.seed}")


def parse_variant(spec, cfg, check=None):
    """A --compare variant -> its Config. A variant is a loss spec (--loss's: terms joined by +,
    each NAME or NAME:FAMILY:SIZE), each term with its weight in front where it is not 1
    (0.5sft: --loss_weights has no per-variant form), then @KEY=VALUE for any PO_KEYS the
    variant sets itself: 'dpo' | 'adpo:static:4' | 'hinge:adaptive:16' | 'dpo+0.5sft' |
    'robust@label_smoothing=0.1'. A bare adpo or cadpo keeps the config's --family/--size;
    adpo|cadpo:FAMILY:SIZE alone sets them."""
    loss, *settings = spec.strip().split("@")
    terms = [re.fullmatch(r"\s*([\d.]*)\s*(\S+?)\s*", term) for term in loss.split("+")]
    need(all(terms), f"--compare: bad variant {spec!r}: expected terms joined by + "
                     f"(e.g. dpo+0.5sft)")
    names = [t.group(2) for t in terms]
    weights = [t.group(1) or "1" for t in terms]
    weighted = any(w != "1" for w in weights)
    flags = {"loss": "+".join(names), "loss_weights": ",".join(weights) if weighted else ""}
    name, *grain = names[0].split(":")
    if len(names) == 1 and name in SEGMENTED and len(grain) == 2:  # adpo:static:4 (Table 3)
        flags.update(loss=name, family=grain[0], size=grain[1])
    for setting in settings:
        key, eq, value = setting.partition("=")
        need(eq and key.strip() in PO_KEYS, f"--compare: bad variant {spec!r}: expected "
                                            f"@KEY=VALUE with KEY one of {', '.join(PO_KEYS)}")
        flags[key.strip()] = value.strip()
    try:
        variant = parse(Config, [f"--{k}={v}" for k, v in flags.items()],
                        base=dataclasses.asdict(cfg))
        validate(variant)
        if check is not None:  # train.py's own checks of a variant (its step-0 loss)
            check(variant)
    except ConfigError as e:
        raise ConfigError(f"--compare: bad variant {spec!r}: {e}") from None
    return variant


def table3_order(variant):
    """Table 3's order, for every loss: the DPO family first (static k by k, then DPO = adaptive
    m=1 and adaptive m by m), then each other loss in LOSSES's order the same way (static k, the
    whole responses, adaptive m), then weighted sums, then cDPO and cADPO (Table 2's last rows);
    settings of a variant's own (@KEY=VALUE) after the variant without them."""
    (name, _, grain), *others = variant_terms(variant)
    group = 2 if name in WEIGHTED else 1 if others else 0
    rank = 0 if name in ("dpo", "adpo", "cdpo", "cadpo") else list(LOSSES).index(name)
    fine = (1, 1) if grain is None else (0 if grain[0] == "static" else 1, grain[1])
    return (group, rank, *fine, variant_label(variant))


def seed_list(flag, text):
    """--seeds / --pipeline_seeds '0,1,2' -> [0, 1, 2]; each seed once (one run counted as two
    would narrow the CIs with a duplicate)."""
    seeds = [convert(flag, int, s, text=True) for s in text.split(",") if s.strip()]
    need(seeds, f"--{flag} {text!r}: expected comma-separated seeds (e.g. 0,1,2)")
    twice = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    need(not twice, f"--{flag} {text!r}: seed {', '.join(map(str, twice))} named twice (one run as "
                    f"two seeds would narrow the CIs with a duplicate)")
    need(all(seed >= 0 for seed in seeds), f"--{flag} {text!r}: seeds must be >= 0")
    return seeds


def pipelines(cfg):
    """The runs of the whole pipeline this command makes: cfg itself, or with --pipeline_seeds
    one config per seed in DIR/seed_<s>/, a run folder of its own (`--seed S --out_dir
    DIR/seed_S` names the same run), whose stages, its preference stage included, all use that
    seed: its SFT model, its pairs and every --compare variant differ from the other seeds'."""
    if not cfg.pipeline_seeds:
        return [cfg]
    need(cfg.seeds == Config.seeds, f"--seeds {cfg.seeds} with --pipeline_seeds "
                                    f"{cfg.pipeline_seeds}: choose one (a pipeline seed seeds its "
                                    f"preference stage too)")
    return [dataclasses.replace(cfg, seed=seed, seeds=str(seed), pipeline_seeds="",
                                out_dir=os.path.join(cfg.out_dir, f"seed_{seed}"))
            for seed in seed_list("pipeline_seeds", cfg.pipeline_seeds)]


def variants(cfg, check=None):
    """The preference runs: [(label, its Config, its folder)] and the baseline's label. Without
    --compare, the one run in po/; with it, every variant x seed, in Table 3's order, each in
    compare/<variant>_s<seed>/ (all from the same SFT model and the same pairs)."""
    if not cfg.compare:
        return [(variant_label(cfg), cfg, os.path.join(cfg.out_dir, "po"))], None
    specs = [s for s in cfg.compare.split(",") if s.strip()]
    need(specs, f"--compare {cfg.compare!r}: expected comma-separated variants (e.g. "
                f"dpo,adpo:static:4)")
    seeds = seed_list("seeds", cfg.seeds)
    chosen = sorted(map(partial(parse_variant, cfg=cfg, check=check), specs), key=table3_order)
    labels = [variant_label(v, cfg) for v in chosen]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    need(not twice, f"--compare {cfg.compare!r}: {', '.join(twice)} named twice")
    baseline = variant_label(parse_variant(cfg.baseline, cfg), cfg)
    need(baseline in labels,
         f"--baseline {cfg.baseline}: not among the --compare variants ({cfg.compare})")
    plan = []  # (label, config, folder)
    for v, label in zip(chosen, labels):
        for seed in seeds:
            variant = dataclasses.replace(v, seed=seed)
            plan.append((label, variant, variant_folder(variant, cfg)))
    return plan, baseline
