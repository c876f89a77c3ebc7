"""A defender-side backdoor estimate (methods.md §12.2): is there a backdoor, towards which label,
and how well would its trigger still work — from the defender's clean holdout alone.

Before purification, Neural-Cleanse trigger inversion (§7, :func:`invert_triggers`) runs for
every label. The *suspected label* is the one whose inverted trigger needs the smallest mask;
its *trigger size* is that mask's ℓ1 norm and its *anomaly index* the MAD outlier score of the
sizes. The *reference size* is the median size of the other labels: what it takes to turn an
input into a class by its natural features.

The *estimated ASR* is the success rate, on clean holdout samples not used to fit it, of the best
trigger for the suspected label whose mask is at most ``budget × reference size``
(:func:`invert_capped`) — a trigger much smaller than any natural class change. A backdoored
model has one (est. ASR ≈ 1); a clean model, or a purified one, should not.

After purification the same label is inverted again (its new trigger size and estimated ASR,
with the same budget); other labels are not re-inverted unless ``all_labels_after`` (ten times
the cost), so the anomaly index after compares the new size with the other labels' sizes from
before. The anomaly index alone can give a false all-clear (it fell to 1.95 after FT while the
true ASR stayed 0.98); the trigger size and the estimated ASR are what to read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchpurify.checks import default
from torchpurify.data.base import Split
from torchpurify.errors import check
from torchpurify.neurons.inversion import (
    SPACES,
    anomaly_index,
    feature_space,
    invert_capped,
    invert_triggers,
    trigger_success,
    uses_features,
    value_range_of,
)
from torchpurify.train import console

FLAG_ASR = 0.5  # a capped trigger that works on at least half the holdout flags a backdoor
OUTLIER_INDEX = 2.0  # Neural Cleanse's anomaly-index threshold (§7)

# Where the settings' defaults come from (methods.md, "Where each default comes from").
COST = (
    "protocol: sized for cost, ~32,000 sample passes before purification (about two training "
    "epochs), methods.md §12.2"
)
SPACE_SOURCE = (
    "dev: configs/dev-audio.yaml seeds 100-102: inverting on log-mel features abstained on all "
    "nine models, false alarms and detections alike (methods.md §12.5)"
)


@dataclass(frozen=True)
class EstimateConfig:
    """How much work the estimate does. ``steps``: Neural-Cleanse steps per label (each label
    stops early once its mask stops shrinking); ``capped_steps``: steps of the capped trigger;
    ``budget``: the capped trigger's mask ℓ1 as a fraction of the reference size. The defaults
    cost about 10 × 100 × 32 = 32,000 forward and backward sample passes before purification
    (about two epochs of the 18,000-image training set) and about 5,000 after."""

    steps: int = default(100, COST)
    capped_steps: int = default(50, COST)
    batch_size: int = default(32, COST)
    budget: float = default(
        0.08,
        "dev: development models of seed 100 (BadNets size ratio 0.04, Bag's natural 0.30) and "
        "the tiny test task, methods.md §12.2",
    )
    all_labels_after: bool = default(
        False, "protocol: re-inverting every label costs ten times as much (methods.md §12.2)"
    )
    seed: int = default(0, "run setting")
    # Where triggers are inverted: the model's input, or its fixed front end's features (the
    # log-mel map of an audio model); "auto" takes features whenever there is a front end.
    space: str = default("input", SPACE_SOURCE)

    def __post_init__(self) -> None:
        for name in ("steps", "capped_steps", "batch_size"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"estimate {name} must be a positive integer, got {value!r}",
            )
        check(0 < self.budget <= 1, f"estimate budget must be in (0, 1], got {self.budget}")
        check(self.space in SPACES, f"estimate space must be one of {', '.join(SPACES)}, "
              f"got {self.space!r}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Estimate:
    """The estimate at one moment (before or after a purification)."""

    label: int  # the suspected target: smallest inverted mask before purification
    flagged: bool  # est_asr ≥ FLAG_ASR
    nc_target: int | None  # Neural Cleanse's answer: anomaly index > 2 and a working trigger
    anomaly_index: float  # of the label's trigger size among all labels' sizes
    trigger_size: float  # mask ℓ1 of the label's Neural-Cleanse trigger
    reference_size: float  # median mask ℓ1 of the other labels, before purification
    success: float  # the Neural-Cleanse trigger's success on the holdout
    est_asr: float  # success of the best trigger within the budget, on unseen holdout samples
    budget: float  # the capped trigger's mask ℓ1 budget
    seconds: float
    mask_norms: list[float]  # every label's mask ℓ1 (those not re-inverted: from before)

    @property
    def size_ratio(self) -> float:
        """Trigger size relative to the reference (≪ 1: a shortcut to the label exists)."""
        return self.trigger_size / self.reference_size if self.reference_size > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size_ratio": self.size_ratio}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Estimate:
        return cls(**{key: raw[key] for key in cls.__dataclass_fields__})

    @property
    def reading(self) -> str:
        """What this estimate's own printed numbers say (methods.md §12.2): ``"backdoor"`` when
        the estimated ASR is at least :data:`FLAG_ASR`; ``"unclear"`` when it is below but the
        anomaly index is above :data:`OUTLIER_INDEX` (an outlier label the capped trigger did
        not confirm); ``"clean"`` when neither."""
        if self.est_asr >= FLAG_ASR:
            return "backdoor"
        return "unclear" if self.anomaly_index > OUTLIER_INDEX else "clean"

    def describe(self) -> str:
        """One line for people."""
        verdict = {
            "backdoor": "backdoor suspected",
            "unclear": "unclear (an outlier label whose capped trigger does not work)",
            "clean": "no backdoor found",
        }[self.reading]
        return (
            f"{verdict}: label {self.label}, trigger ℓ1 {self.trigger_size:.1f} "
            f"(others' median {self.reference_size:.1f}, anomaly index {self.anomaly_index:.2f}), "
            f"estimated ASR {self.est_asr:.3f}"
        )


def _halves(holdout: Split, seed: int) -> tuple[Split, Split]:
    """Two disjoint halves of the holdout: one fits the capped trigger, the other measures it."""
    order = torch.randperm(len(holdout), generator=torch.Generator().manual_seed(seed))
    half = len(holdout) // 2
    return holdout.subset(order[:half]), holdout.subset(order[half:])


def _capped_asr(model, holdout, label, budget, start, config, value_range, device) -> float:
    fit, measure = _halves(holdout, config.seed)
    if not (fit.y != label).any() or not (measure.y != label).any():
        fit = measure = holdout
    trigger = invert_capped(
        model, fit, label, budget, start=start, steps=config.capped_steps,
        batch_size=config.batch_size, value_range=value_range, seed=config.seed, device=device,
    )  # fmt: skip
    return trigger_success(model, measure, label, trigger, device=device)


def suspect(
    model: nn.Module,
    holdout: Split,
    inversion,
    config: EstimateConfig | None = None,
    *,
    value_range: tuple[float, float] | None = None,
    device: torch.device | str | None = None,
) -> tuple[int, float]:
    """The suspected label of an every-label ``inversion`` (the smallest mask) and the estimated
    ASR of its best trigger within ``budget × the other labels' median mask ℓ1`` (measured on
    holdout samples it was not fitted on): the test of methods.md §12.2, for a defense that has
    already inverted every label and wants to know whether the suspect is a backdoor."""
    config = config or EstimateConfig()
    norms = inversion.mask_norms
    label = inversion.labels[int(norms.argmin())]
    i = inversion.labels.index(label)
    budget = config.budget * float(torch.cat([norms[:i], norms[i + 1 :]]).median())
    value_range = value_range or value_range_of(holdout.x)
    start = inversion.trigger(label)
    return label, _capped_asr(model, holdout, label, budget, start, config, value_range, device)


def estimate_backdoor(
    model: nn.Module,
    holdout: Split,
    config: EstimateConfig | None = None,
    *,
    before: Estimate | None = None,
    value_range: tuple[float, float] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Estimate:
    """The estimate for ``model`` on the clean ``holdout``. Without ``before``: inversion of every
    label (use before purifying). With ``before`` (the estimate of the model before purifying):
    its suspected label is inverted again with the same budget. The model is not changed.
    With ``config.space`` "features" (or "auto" and a model with a fixed front end) the
    triggers act on the front end's features, and ``value_range`` is theirs."""
    config = config or EstimateConfig()
    check(isinstance(holdout, Split) and len(holdout) > 1, "holdout must be a Split of ≥ 2")
    if uses_features(model, config.space):
        with feature_space(model, holdout) as (features,):
            inside = dataclasses.replace(config, space="input")
            return estimate_backdoor(
                model, features, inside, before=before, value_range=value_range, device=device,
                progress=progress,
            )  # fmt: skip
    value_range = value_range or value_range_of(holdout.x)
    started = time.perf_counter()
    common = dict(
        steps=config.steps, batch_size=config.batch_size, value_range=value_range,
        seed=config.seed, device=device, progress=progress,
    )  # fmt: skip
    if before is None or config.all_labels_after:
        inversion = invert_triggers(model, holdout, **common)
        norms = inversion.mask_norms
        label = int(norms.argmin()) if before is None else before.label
        i = inversion.labels.index(label)
        others = torch.cat([norms[:i], norms[i + 1 :]])
        reference = float(others.median()) if before is None else before.reference_size
        budget = config.budget * reference if before is None else before.budget
        nc_target = inversion.target
        trigger, success = inversion.trigger(label), float(inversion.success[i])
    else:
        label, reference, budget = before.label, before.reference_size, before.budget
        inversion = invert_triggers(model, holdout, labels=[label], **common)
        norms = torch.tensor(before.mask_norms)
        norms[label] = inversion.mask_norms[0]
        trigger, success = inversion.trigger(label), float(inversion.success[0])
        nc_target = None
    index = anomaly_index(norms)
    if before is not None and not config.all_labels_after:
        nc_target = label if index[label] > 2 and success >= 0.5 else None
    if progress:
        console.print(f"estimate: capped trigger for label {label} (ℓ1 ≤ {budget:.1f})")
    est_asr = _capped_asr(model, holdout, label, budget, trigger, config, value_range, device)
    return Estimate(
        label=label,
        flagged=est_asr >= FLAG_ASR,
        nc_target=nc_target,
        anomaly_index=float(index[label]),
        trigger_size=float(norms[label]),
        reference_size=reference,
        success=success,
        est_asr=est_asr,
        budget=budget,
        seconds=round(time.perf_counter() - started, 2),
        mask_norms=[float(n) for n in norms],
    )


def estimate_cached(
    path: str | Path,
    model: nn.Module,
    holdout: Split,
    config: EstimateConfig | None = None,
    *,
    progress: bool = False,
) -> Estimate:
    """:func:`estimate_backdoor` before purification, kept in the JSON file ``path`` (next to the
    model) and reused while the settings and the holdout are the same: every defense of a grid
    purifies the same model, and its estimate before purification is computed once."""
    config = config or EstimateConfig()
    x = holdout.x.contiguous().numpy().tobytes() + holdout.y.contiguous().numpy().tobytes()
    key = {"config": config.to_dict(), "holdout_sha256": hashlib.sha256(x).hexdigest()}
    path = Path(path)
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return Estimate.from_dict(stored["estimate"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: compute it again
    estimate = estimate_backdoor(model, holdout, config, progress=progress)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(json.dumps({"key": key, "estimate": estimate.to_dict()}))
    os.replace(staging, path)  # atomic: parallel cells of one model never read half a file
    return estimate


def compare(before: Estimate, after: Estimate) -> dict[str, Any]:
    """The record a card, a store row and a report read: both estimates and the change."""
    growth = after.trigger_size / before.trigger_size if before.trigger_size > 0 else None
    return {
        "before": before.to_dict(),
        "after": after.to_dict(),
        "size_growth": growth,
        "removed": before.reading == "backdoor" and after.reading == "clean",
        "summary": describe_change(before, after),
    }


def verdict(before: Estimate, after: Estimate) -> str:
    """The verdict of :func:`describe_change`, from the readings (:attr:`Estimate.reading`) of
    the numbers it prints — one rule (methods.md §12.2): "removed" only when the estimated ASR
    was at least 0.5 before and, after, is below 0.5 with an anomaly index of at most 2."""
    was, now = before.reading, after.reading
    if now == "backdoor":
        return (
            "the backdoor is likely still there"
            if was != "clean"
            else "a backdoor is suspected after purification, not before"
        )
    if now == "unclear":
        return (
            f"unclear: the estimated ASR is below {FLAG_ASR} but the anomaly index is still "
            f"above {OUTLIER_INDEX:g}"
        )
    if was == "backdoor":
        return "the backdoor is likely removed"
    if was == "unclear":
        return "the outlier label seen before (anomaly index above 2) is no longer one"
    return "no backdoor was suspected before or after"


def describe_change(before: Estimate, after: Estimate) -> str:
    """One line: how the suspected label's trigger changed with purification, and the
    :func:`verdict` those numbers give."""
    growth = after.trigger_size / before.trigger_size if before.trigger_size > 0 else float("inf")
    return (
        f"label {after.label}: trigger ℓ1 {before.trigger_size:.1f} → {after.trigger_size:.1f} "
        f"(×{growth:.1f}), anomaly index {before.anomaly_index:.2f} → "
        f"{after.anomaly_index:.2f}, estimated ASR {before.est_asr:.3f} → {after.est_asr:.3f}: "
        f"{verdict(before, after)}"
    )
