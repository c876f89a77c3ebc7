"""What each trigger family's after-check reads after a defense, against the true ASR — the
development study that chose the after-check rule of methods.md §12.2 (issue 28; notebook §12.13).

For one cached development model (a folder of ``runs/dev-*/models`` with its
``estimate-before.json``, written by ``torchpurify run`` with ``--cache``) and each defense
setting given, it purifies the model with the defender's data of the grid (the card's split,
``--defender-fraction``), measures the true ASR and ACC on the test split, and re-checks every
family the estimate before ran (its own suspected label, its reference and cap from before) —
not only those the rule re-checks — so the rules can be compared on one table. One JSON line per
setting. With ``--reference-after`` the radius families also search every label after the
defense and report the estimate with the cap taken from the purified model's own reference
(``est_after_ref``, ten times the cost).

It reads test data, so it refuses models of evaluation seeds (< 100): development cells only.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/estimate_after_families.py \\
        runs/dev-image/models/d7d9f6e85fa1 ft gnft ft-sam fine-pruning bti-dbf \\
        fst:alpha=0.1:epochs=30

A model may be named by the first characters of its folder; a setting is ``NAME`` or
``NAME:KEY=VALUE:KEY=VALUE``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from torchpurify.card import targeting
from torchpurify.defenses import Clean, build_defense
from torchpurify.estimate import (
    NATURAL_RADIUS,
    Estimate,
    EstimateConfig,
    _radius_search,
    _shrunk,
    estimate_after,
)
from torchpurify.experiment import defender_data, trigger_of
from torchpurify.metrics import evaluate
from torchpurify.models.io import load_model
from torchpurify.neurons.inversion import trigger_success, value_range_of
from torchpurify.neurons.perturbation import halves

DEVELOPMENT_SEEDS = 100  # methods.md §12.1: development cells use seeds ≥ 100


def parse_setting(text: str) -> tuple[str, dict]:
    name, *pairs = text.split(":")
    params = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        params[key] = float(value) if "." in value or "e" in value else int(value)
    return name, params


def reference_after(model, holdout, family, before, config) -> dict:
    """The radius family searched on every label after the defense: the estimate with the cap
    from the purified model's own reference."""
    search = _radius_search(model, holdout, family, config, value_range_of(holdout.x), "cpu", False)
    radii, label = search.radii, before.label
    reference = float(torch.cat([radii[:label], radii[label + 1 :]]).median())
    cap = config.radius_budget * min(reference, NATURAL_RADIUS)
    _, unseen = halves(holdout, config.seed)
    est = trigger_success(model, unseen, label, _shrunk(search.trigger(label), cap), device="cpu")
    return {
        "ref_before": round(before.reference_size, 3),
        "ref_after": round(reference, 3),
        "est_after_ref": round(est, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a cached model folder (model.json, estimate-before.json)")
    parser.add_argument("settings", nargs="+", help="NAME or NAME:KEY=VALUE:…")
    parser.add_argument("--arch", default=None, help="architecture (default: the card's)")
    parser.add_argument("--defender-fraction", type=float, default=0.1)
    parser.add_argument("--reference-after", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.model)
    if not folder.exists():  # the first characters of a cache folder's name
        matches = sorted(folder.parent.glob(folder.name + "*"))
        if len(matches) != 1:
            raise SystemExit(f"{args.model}: {len(matches)} model folders start so")
        folder = matches[0]
    net, card = load_model(folder, args.arch)
    seed = card["data"]["seed"]
    if seed < DEVELOPMENT_SEEDS:
        raise SystemExit(f"seed {seed} is an evaluation seed: this study reads test data")
    tune, holdout, prepared = defender_data(card, fraction=args.defender_fraction, progress=False)
    trigger = trigger_of(card)
    stored = json.loads((folder / "estimate-before.json").read_text())
    before = Estimate.from_dict(stored["estimate"])
    config = EstimateConfig(**stored["key"]["config"])
    how = targeting(card.get("attack"), len(card["classes"])).as_kwargs()
    for text in args.settings:
        name, params = parse_setting(text)
        defense = build_defense(name, seed=seed, device="cpu", **params)
        result = defense.purify(net, Clean(tune, holdout))
        after = evaluate(result.model, prepared.test, trigger, **how)
        families = {}
        for family in before.families:
            started = time.perf_counter()
            earlier = dataclasses.replace(before, family=family, families={
                family: before.families[family]})  # fmt: skip
            found = estimate_after(result.model, holdout, earlier, config, device="cpu").of(family)
            record = before.of(family)
            families[family] = {
                "label": found.label,
                "est_before": round(record.est_asr, 3),
                "est_after": round(found.est_asr, 3),
                "ratio_before": round(record.size_ratio, 3),
                "ratio_after": round(found.size_ratio, 3),
                "seconds": round(time.perf_counter() - started, 1),
            }
            if args.reference_after and family != "mask":
                families[family].update(
                    reference_after(result.model, holdout, family, record, config)
                )
        attack = card.get("attack")
        print(json.dumps({
            "model": folder.name[:12],
            "attack": attack["trigger"]["attack"] if attack else None,
            "seed": seed,
            "setting": text,
            "asr_after": None if after.asr is None else round(after.asr, 3),
            "acc_change": round(after.acc - card["metrics"]["acc"], 4),
            "guard": result.log.get("guard", {}).get("action"),
            "rechecked_by_rule": list(before.rechecked),
            "families": families,
            "defense_seconds": round(result.cost.seconds, 1),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
