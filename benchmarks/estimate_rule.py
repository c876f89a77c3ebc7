"""The estimate's verdict rule re-read on development stores and cached development models — the
study that chose the size test of methods.md §12.2 (issue 28; notebook §12.14).

Each stored estimate keeps every family's numbers (estimated ASR, size ratio, anomaly index), so
the verdict can be judged again under another rule without rerunning a search
(:func:`torchpurify.estimate.rejudge`). For the cached models given (folders with
``estimate-before.json``) it prints each family's numbers and the verdict before purification
under the stored rule and under today's (``EstimateConfig``'s verdict settings, or those given);
for each store it counts, per modality, false alarms on clean models before and after, and false
all-clears after (backdoored cells whose true ASR after is ≥ 0.5 but whose verdict after is
clean) under both rules. The true ASR is read from the store's cells, so it refuses stores or
models of evaluation seeds (< 100).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/estimate_rule.py \\
        --models runs/dev-image/models runs/dev-audio/models \\
        --stores docs/results/dev-sweep/results.db docs/results/dev-audio-sweep/results.db \\
        [--set radius_ratio=0.6]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from torchpurify.estimate import Estimate, EstimateConfig, FamilyEstimate, judge
from torchpurify.report import modality, read_store

DEVELOPMENT_SEEDS = 100  # methods.md §12.1: development cells use seeds ≥ 100
HIGH_ASR = 0.5


def rejudged(record: dict, config: EstimateConfig) -> Estimate:
    """One stored moment judged under ``config`` (a record without families: the mask's)."""
    estimate = Estimate.from_dict(record)
    families = {f: FamilyEstimate.from_dict(r) for f, r in estimate.families.items()}
    if not families:
        families = {estimate.family: FamilyEstimate.of_mask(estimate)}
    return judge(families, config, seconds=estimate.seconds)


def line(estimate: Estimate) -> str:
    parts = []
    for family, r in estimate.families.items():
        mark = "*" if r["flagged"] else " "
        parts.append(f"{family[:4]} L{r['label']} {r['est_asr']:.2f} "
                     f"r{r['size_ratio']:.2f} a{r['anomaly_index']:.1f}{mark}")  # fmt: skip
    return " | ".join(parts)


def models(folders: list[str], config: EstimateConfig) -> None:
    print("Estimate before purification, cached development models (* = the family suspects):")
    for root in folders:
        for folder in sorted(Path(root).iterdir()):
            cached = folder / "estimate-before.json"
            if not cached.exists():
                continue
            card = json.loads((folder / "model.json").read_text())
            if card["data"]["seed"] < DEVELOPMENT_SEEDS:
                raise SystemExit(f"{folder}: an evaluation seed; development models only")
            attack = card.get("attack") or {}
            kind = (attack.get("trigger") or {}).get("attack", "none")
            stored = Estimate.from_dict(json.loads(cached.read_text())["estimate"])
            now = rejudged(stored.to_dict(), config)
            print(f"  {folder.name[:8]} seed {card['data']['seed']} {kind:12s} "
                  f"target {attack.get('target')}: stored {_verdict(stored)}; "
                  f"today {_verdict(now)}")  # fmt: skip
            print(f"      {line(now)}")


def _verdict(estimate: Estimate) -> str:
    return f"{estimate.family} L{estimate.label}" if estimate.flagged else "not suspected"


def stores(paths: list[str], config: EstimateConfig) -> None:
    for path in paths:
        _, cells = read_store(path)
        latest: dict[tuple, dict] = {}
        for row in sorted(cells, key=lambda r: r["finished_at"]):
            if row["seed"] < DEVELOPMENT_SEEDS:
                raise SystemExit(f"{path}: a cell of evaluation seed {row['seed']}")
            if row.get("estimate") and row["estimate"].get("after"):
                latest[row["label"], row["model_key"]] = row
        counts: dict[str, dict[str, list[int]]] = {}
        for row in latest.values():
            before, after = row["estimate"]["before"], row["estimate"]["after"]
            old_before = bool(before["flagged"])
            old_after = bool(after["flagged"]) and old_before
            new_before = rejudged(before, config).flagged
            new_after = rejudged(after, config).flagged and new_before
            tally = counts.setdefault(modality(row), {})
            if row["attack"] == "none":
                for key, old, new in (("clean flagged before", old_before, new_before),
                                      ("clean flagged after", old_after, new_after)):  # fmt: skip
                    tally.setdefault(key, [0, 0, 0])
                    tally[key][0] += old
                    tally[key][1] += new
                    tally[key][2] += 1
            elif row["asr_after"] is not None:
                key = "false all-clear after"
                tally.setdefault(key, [0, 0, 0])
                if row["asr_after"] >= HIGH_ASR:
                    tally[key][0] += not old_after
                    tally[key][1] += not new_after
                tally[key][2] += 1
        print(f"{path} (latest cell per setting and model; old rule → today's):")
        for kind, tally in counts.items():
            for key, (old, new, total) in tally.items():
                print(f"  {kind}: {key}: {old} → {new} of {total} cells")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=[], help="cache folders of models")
    parser.add_argument("--stores", nargs="*", default=[], help="development results stores")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE verdict setting")
    args = parser.parse_args()
    settings = {k: float(v) for k, v in (pair.split("=", 1) for pair in args.set)}
    config = dataclasses.replace(EstimateConfig(), **settings)
    models(args.models, config)
    stores(args.stores, config)


if __name__ == "__main__":
    main()
