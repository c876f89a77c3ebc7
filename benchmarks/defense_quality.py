"""Every defense against backdoored models, over attacks and seeds (methods.md §11 protocol).

    python benchmarks/defense_quality.py --attacks badnets,blended --seeds 0,1,2 \
        --defenses ft,fine-pruning,linf-pruning,salience-ar,gnft [--set gnft.alpha=0.9 ...]

Backdoored models are trained once per (attack, seed) and cached under --cache; each defense
result is appended as one JSON line to --results, and a table of mean ± std over seeds is
printed at the end. Defenses use the defender's clean data only (5 % of the training set);
the test split is read after each defense returns, to report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from torchpurify.defenses import build_defense
from torchpurify.experiment import AttackSpec, DataSpec, purify_model, train_model
from torchpurify.models.io import load_model
from torchpurify.train import TrainConfig


def backdoored(args, attack: str, seed: int):
    path = Path(args.cache) / f"{args.dataset}-{args.model}-{attack}-s{seed}"
    if not (path / "model.json").is_file():
        train_model(
            DataSpec(args.dataset, seed=seed),
            args.model,
            AttackSpec(attack, poison_rate=args.poison_rate),
            TrainConfig(epochs=args.epochs, seed=seed, progress=False),
            out=path,
        )
    return load_model(path)


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """``gnft.alpha=0.9`` → ``{"gnft": {"alpha": 0.9}}``."""
    overrides: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        defense, _, param = key.partition(".")
        overrides.setdefault(defense, {})[param] = yaml.safe_load(value)
    return overrides


def summarise(rows: list[dict]) -> None:
    def stat(values):
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f}±{statistics.stdev(values):.3f}"

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["attack"], row["label"]), []).append(row)
    print(
        f"\n{'attack':<9}{'defense':<34}{'ACC before':>13}{'ASR before':>13}"
        f"{'ACC after':>13}{'ASR after':>13}{'DER':>13}{'seconds':>10}"
    )
    for (attack, label), group in groups.items():
        col = {k: [r[k] for r in group] for k in ("acc0", "asr0", "acc1", "asr1", "der", "s")}
        print(
            f"{attack:<9}{label:<34}{stat(col['acc0']):>13}{stat(col['asr0']):>13}"
            f"{stat(col['acc1']):>13}{stat(col['asr1']):>13}{stat(col['der']):>13}"
            f"{statistics.mean(col['s']):>10.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="small-cnn")
    parser.add_argument("--attacks", default="badnets,blended")
    parser.add_argument("--defenses", default="ft,fine-pruning,linf-pruning,salience-ar,gnft")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--poison-rate", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="DEFENSE.PARAM=VALUE, e.g. gnft.alpha=0.9 (repeatable)",
    )
    parser.add_argument("--label", default="", help="suffix for the defense column")
    parser.add_argument("--cache", default="runs/bench")
    parser.add_argument("--results", default="runs/bench/results.jsonl")
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    rows = []
    for attack in args.attacks.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            model, card = backdoored(args, attack, seed)
            for name in args.defenses.split(","):
                params = overrides.get(name, {})
                defense = build_defense(name, seed=seed, **params)
                start = time.perf_counter()
                result = purify_model(model, card, defense)
                label = name + (f" {args.label}" if args.label else "")
                row = {
                    "attack": attack,
                    "seed": seed,
                    "defense": name,
                    "params": params,
                    "label": label,
                    "acc0": result.before.acc,
                    "asr0": result.before.asr,
                    "acc1": result.after.acc,
                    "asr1": result.after.asr,
                    "ra1": result.after.ra,
                    "der": result.der,
                    "s": time.perf_counter() - start,
                    "log": {
                        k: v
                        for k, v in result.card["defense"]["log"].items()
                        if k in ("num_pruned", "trigger", "layer")
                    },
                }
                rows.append(row)
                Path(args.results).parent.mkdir(parents=True, exist_ok=True)
                with open(args.results, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(
                    f"{attack} seed {seed} {label}: ACC {row['acc0']:.3f}→{row['acc1']:.3f} "
                    f"ASR {row['asr0']:.3f}→{row['asr1']:.3f} DER {row['der']:.3f} "
                    f"{row['s']:.0f}s {row['log']}",
                    flush=True,
                )
    summarise(rows)


if __name__ == "__main__":
    main()
