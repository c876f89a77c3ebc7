"""The estimate's cost knobs against its verdicts on development models — the study that chooses
``EstimateConfig``'s ladder and sample defaults (issue 28 item 2, issue 29 item 2; methods.md
§12.2, notebook §12.14).

For each cached development model (a folder of ``runs/dev-*/models`` with its
``estimate-before.json``, written by ``torchpurify run`` with ``--cache``) and each setting given,
it runs the estimate before purification on the defender's holdout of the grid (the card's split,
``--defender-fraction``) and prints one JSON line: the setting, the model's attack and target
(from its card: what a development model is known to be), every family's label, estimated ASR,
size ratio, anomaly index and flag, the verdict, the seconds and the sample passes. The stored
estimate's config is the base every setting changes (so the audio models keep their families).
No test data is read; the study still refuses models of evaluation seeds (< 100), since it
chooses defaults.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/estimate_settings.py \\
        runs/dev-image/models/d7d9f6e85fa1 runs/dev-image/models/287c9cb86cd4 \\
        --setting base --setting fit_samples=128 --setting ladder_start=0.0625

A model may be named by the first characters of its folder; a setting is ``base`` or
``KEY=VALUE,KEY=VALUE`` over ``EstimateConfig``'s fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from torchpurify.estimate import EstimateConfig, estimate_before
from torchpurify.experiment import defender_data
from torchpurify.models.io import load_model
from torchpurify.train import count_passes

DEVELOPMENT_SEEDS = 100  # methods.md §12.1: development cells use seeds ≥ 100


def parse_setting(text: str) -> dict:
    if text == "base":
        return {}
    params = {}
    for pair in text.split(","):
        key, value = pair.split("=", 1)
        params[key] = float(value) if "." in value or "e" in value else int(value)
    return params


def find(name: str) -> Path:
    folder = Path(name)
    if folder.exists():
        return folder
    matches = sorted(folder.parent.glob(folder.name + "*"))
    if len(matches) != 1:
        raise SystemExit(f"{name}: {len(matches)} model folders start so")
    return matches[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="cached model folders (or their prefixes)")
    parser.add_argument(
        "--setting", action="append", default=None,
        help="base, or KEY=VALUE,KEY=VALUE over EstimateConfig (repeatable)",
    )  # fmt: skip
    parser.add_argument("--defender-fraction", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        folder = find(name)
        net, card = load_model(folder)
        seed = card["data"]["seed"]
        if seed < DEVELOPMENT_SEEDS:
            raise SystemExit(f"seed {seed} is an evaluation seed: this study chooses defaults")
        _, holdout, _ = defender_data(card, fraction=args.defender_fraction, progress=False)
        stored = json.loads((folder / "estimate-before.json").read_text())
        base = EstimateConfig(**stored["key"]["config"])
        attack = card.get("attack") or {}
        for text in args.setting or ["base"]:
            config = dataclasses.replace(base, **parse_setting(text))
            started = time.perf_counter()
            with count_passes(net) as cost:
                found = estimate_before(net, holdout, config, device="cpu")
            line = {
                "model": folder.name[:12],
                "attack": (attack.get("trigger") or {}).get("attack", "none"),
                "target": attack.get("target"),
                "setting": text,
                "verdict": [found.flagged, found.family, found.label, round(found.est_asr, 3)],
                "families": {
                    f: [
                        r["label"],
                        round(r["est_asr"], 3),
                        round(r["size_ratio"], 2),
                        round(r["anomaly_index"], 2),
                        r["flagged"],
                        round(r["seconds"], 1),
                    ]
                    for f, r in found.families.items()
                },
                "seconds": round(time.perf_counter() - started, 1),
                "forward": cost.forward,
                "backward": cost.backward,
            }
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
