"""One defense on the test suite's tiny backdoor (tests/conftest.py: small-cnn, 12×12 gratings,
six classes, a 3×3 BadNets patch), printing test ACC / ASR before and after and what the
defense logged: the numbers methods.md §6.3, §6.4 and §6.8 quote for the tiny task.

    OMP_NUM_THREADS=1 python benchmarks/tiny_defense.py rnp '{"clean_threshold": 0.4}'

The second argument (JSON, optional) sets hyper-parameters; device cpu and batch size 64
unless it sets them. Seconds on a quiet 2-core machine: 3–10 a run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import TINY_CLASSES, make_tiny_backdoor  # noqa: E402

from torchpurify.defenses import Clean, build_defense  # noqa: E402
from torchpurify.metrics import evaluate  # noqa: E402

SHOWN = ("num_pruned", "neurons", "threshold", "left_out", "zeroed_layers", "layers", "betas",
         "input_norm", "radius", "perturbation_norms", "diverging")  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    name = sys.argv[1]
    params = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    tiny = make_tiny_backdoor()
    model, test, trigger = tiny.model, tiny.test, tiny.trigger
    defense = build_defense(name, **{"device": "cpu", "batch_size": 64, **params})
    result = defense.purify(model, Clean(tiny.tune, tiny.holdout))
    before, after = (
        evaluate(m, test, trigger, target=0, num_classes=TINY_CLASSES)
        for m in (model, result.model)
    )
    guard = result.log["guard"]
    print(f"{name} {params}: ACC {before.acc:.3f} -> {after.acc:.3f}, "
          f"ASR {before.asr:.3f} -> {after.asr:.3f}; guard: {guard['action']}")  # fmt: skip
    log = result.log.get("rolled_back") or result.log
    for key in SHOWN:
        if key in log:
            print(f"  {key}: {log[key]}")
    for layer, values in log.get("mask_values", {}).items():
        zeros = sum(v == 0 for v in values)
        print(f"  masks of {layer}: {zeros} of {len(values)} exactly 0, min {min(values):.3f}")
    for record in log.get("rounds", []):
        print(f"  round: {record}")
    for attempt in guard["attempts"]:
        print(f"  guard attempt: {attempt}")


if __name__ == "__main__":
    main()
