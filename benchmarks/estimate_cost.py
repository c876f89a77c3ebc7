"""What the defender-side estimate costs against a defense (issue 28 item 2, methods.md §12.2),
as ratios measured in one run (machine-independent numbers):

- the estimate before purification (every family of ``--families``, every label) and after it
  (the suspected family and label only), in seconds and in forward / backward sample passes,
  each divided by the median over FT, Fine-Pruning and GN-FT at their defaults on the same
  model and defender data (issue 28 asks: before at most 1×, after a fraction);
- each family's seconds before purification, against the same median.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/estimate_cost.py [--quick]
        [--families mask,perturbation,generator] [--defenses ft,fine-pruning,gnft] [--json FILE]

small-cnn on the synthetic 1×28×28, 10-class task of ``benchmarks/defense_cost.py`` with a
BadNets backdoor, one thread; defender data 1,440 tune / 360 holdout (the protocol's), or 480 /
120 with ``--quick``. The after-check runs on the model FT returned. No test asserts a time: the
ratios are read, not checked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from defense_cost import CLASSES, SHAPE, prototype_split  # noqa: E402

from torchpurify.attacks import build_attack, poison_split  # noqa: E402
from torchpurify.defenses import DEFENSES, Clean, build_defense  # noqa: E402
from torchpurify.errors import UserError  # noqa: E402
from torchpurify.estimate import EstimateConfig, estimate_backdoor  # noqa: E402
from torchpurify.metrics import evaluate  # noqa: E402
from torchpurify.models import build_model  # noqa: E402
from torchpurify.train import TrainConfig, count_passes, fit  # noqa: E402

DEFENSES_COMPARED = "ft,fine-pruning,gnft"


def timed_estimate(model, holdout, config, before=None) -> tuple[object, dict[str, float]]:
    """The estimate with its wall seconds and sample passes."""
    started = time.perf_counter()
    with count_passes(model) as cost:
        estimate = estimate_backdoor(model, holdout, config, before=before, device="cpu")
    seconds = time.perf_counter() - started
    return estimate, {"seconds": seconds, "forward": cost.forward, "backward": cost.backward}


def measure(families: tuple[str, ...], names: list[str], quick: bool) -> dict:
    tune_size, holdout_size, epochs = (480, 120, 1) if quick else (1440, 360, 2)
    trigger = build_attack("badnets", SHAPE)
    train = poison_split(prototype_split(4000, seed=0), trigger, rate=0.1, seed=0).split
    torch.manual_seed(0)
    model = build_model("small-cnn", SHAPE, CLASSES)
    fit(model, train, TrainConfig(epochs=epochs, batch_size=128, progress=False, device="cpu"))
    model.eval()
    rates = evaluate(model, prototype_split(1000, seed=3), trigger, target=0, num_classes=CLASSES)
    print(f"  model: ACC {rates.acc:.3f}, ASR {rates.asr:.3f}", file=sys.stderr, flush=True)
    clean = Clean(prototype_split(tune_size, seed=1), prototype_split(holdout_size, seed=2))
    defenses, purified_by = {}, {}
    for name in names:
        result = build_defense(name, device="cpu").purify(model, clean)
        cost = result.cost
        defenses[name] = {"seconds": cost.seconds, "forward": cost.forward,
                          "backward": cost.backward}  # fmt: skip
        purified_by[name] = result.model
        print(f"  {name}: {cost.seconds:.1f} s", file=sys.stderr, flush=True)
    config = EstimateConfig(families=families)
    before, cost_before = timed_estimate(model, clean.holdout, config)
    print(f"  estimate before: {cost_before['seconds']:.1f} s", file=sys.stderr, flush=True)
    after_model = purified_by[names[0]]
    after, cost_after = timed_estimate(after_model, clean.holdout, config, before=before)
    median = {k: statistics.median(d[k] for d in defenses.values())
              for k in ("seconds", "forward", "backward")}  # fmt: skip
    return {
        "defenses": defenses,
        "median_defense": median,
        "estimate_before": cost_before,
        "estimate_after": {**cost_after, "after": names[0]},
        "families_seconds": {f: r["seconds"] for f, r in before.families.items()},
        "families": {
            f: {k: r[k] for k in ("label", "anomaly_index", "size_ratio", "est_asr")}
            for f, r in before.families.items()
        },
        "verdict_before": before.describe(),
        "model": {"acc": rates.acc, "asr": rates.asr},
        "tune": tune_size,
        "holdout": holdout_size,
    }


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(results: dict) -> None:
    median = results["median_defense"]
    shown = ", ".join(f"{n} {d['seconds']:.1f} s" for n, d in results["defenses"].items())
    rates = results["model"]
    print(f"BadNets small-cnn, ACC {rates['acc']:.3f}, ASR {rates['asr']:.3f}; defender data "
          f"{results['tune']} tune / {results['holdout']} holdout; {shown}")  # fmt: skip
    print(f"{'':<22}{'seconds':>9}{'s ÷ median':>12}{'fwd ÷ median':>14}{'bwd ÷ median':>14}")
    for key, label in (
        ("estimate_before", "estimate before"),
        ("estimate_after", "estimate after"),
    ):
        cost = results[key]
        print(
            f"{label:<22}{cost['seconds']:>9.1f}{ratio(cost['seconds'], median['seconds']):>12.2f}"
            f"{ratio(cost['forward'], median['forward']):>14.2f}"
            f"{ratio(cost['backward'], median['backward']):>14.2f}"
        )
    print(f"{'median defense':<22}{median['seconds']:>9.1f}")
    for family, seconds in results["families_seconds"].items():
        found = results["families"][family]
        print(f"  {family} family before: {seconds:.1f} s, "
              f"{ratio(seconds, median['seconds']):.2f} × the median defense; label "
              f"{found['label']}, index {found['anomaly_index']:.2f}, ratio "
              f"{found['size_ratio']:.2f}, est. ASR {found['est_asr']:.3f}")  # fmt: skip
    print(f"after-check on the model {results['estimate_after']['after']} returned")
    print(f"verdict before: {results['verdict_before']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller defender data (~minutes)")
    parser.add_argument("--families", default="mask,perturbation,generator")
    parser.add_argument("--defenses", default=DEFENSES_COMPARED)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    names = [n.strip() for n in args.defenses.split(",") if n.strip()]
    unknown = [n for n in names if n not in DEFENSES.names()]
    if not names or unknown:
        parser.error(f"--defenses must name defenses of {', '.join(DEFENSES.names())}")
    try:
        families = tuple(f.strip() for f in args.families.split(","))
        EstimateConfig(families=families)
    except UserError as error:
        parser.error(str(error))
    torch.set_num_threads(1)
    results = measure(families, names, args.quick)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
