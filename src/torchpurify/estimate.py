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

Three trigger families (issue 28, methods.md §7 and §12.2; ``EstimateConfig.families``): the
*mask* family is the Neural-Cleanse path above; the *perturbation* family (one additive δ per
label, :func:`.neurons.perturbation.invert_perturbations`, for blends and SIG) and the
*generator* family (a bounded generator per label, :func:`.neurons.generator.invert_generator`,
for warps and input-dependent triggers) measure each label's trigger by its relative radius. For
each, the suspected label is the smallest size, the reference size the median of the other
labels' sizes, and the estimated ASR the success, on the half of the holdout no trigger was
fitted on, of the label's trigger shrunk to at most ``radius_budget × min(reference, 1)`` (a radius
family's trigger is already the smallest that reaches the threshold on the ladder, so shrinking
it is the capped trigger; the mask family fits its capped trigger as above). **The rule**: a
family suspects a backdoor when its estimated ASR is at least :data:`FLAG_ASR` *and* its label's
trigger is much smaller than what reaches the other labels — size ratio (size ÷ reference) at
most ``mask_ratio`` (mask family) or ``radius_ratio`` (radius families), or an outlier among
the labels' sizes (anomaly index ≥ ``outlier_index``); a working capped
trigger on a label nearly as far as the others is a natural shortcut (a clean keyword-spotting
model reaches "stop" with a few clicks), not a backdoor. A backdoor is suspected when any family
suspects one; the verdict names the suspecting family with the highest estimated ASR (none
suspecting: the family with the highest estimated ASR) and its label (ties: the order of
:data:`FAMILIES`), and the top-level numbers of :class:`Estimate` are that family's
(:func:`judge`). After
purification every family that suspected a backdoor before re-checks its own label (the verdict's
family alone when none did; a tenth of a family's cost on ten classes, each), and the highest
estimate after is the verdict: one family can lose a trigger another still finds (methods.md
§12.2).
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
from torchpurify.neurons.generator import invert_generator
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
from torchpurify.neurons.perturbation import (
    TARGET_RATIO,
    halves,
    invert_perturbations,
    radius_anomaly_index,
)
from torchpurify.train import console

FLAG_ASR = 0.5  # a capped trigger that works on at least half the holdout flags a backdoor
OUTLIER_INDEX = 2.0  # Neural Cleanse's anomaly-index threshold (§7)

# Where the settings' defaults come from (methods.md, "Where each default comes from").
COST = (
    "protocol: sized for cost, ~32,000 sample passes before purification (about two training "
    "epochs), methods.md §12.2"
)
CHEAPER_LOST = (
    "dev: benchmarks/estimate_settings.py on six image development models and the pitch-style "
    "kws-cnn (seed 100): 128 fitting samples, 100 benign-mask steps and a first rung at 1/16 "
    "or 1/32 kept every image verdict at 2/3 of the passes but lost the pitch-style detection, "
    "so the searches keep these (notebook §12.14, §12.15)"
)
# The trigger families the estimate can run (methods.md §7, §7.1, §7.2), in the order that breaks
# ties between equal estimated ASRs.
FAMILIES = ("mask", "perturbation", "generator")
SIZE_UNITS = {"mask": "ℓ1", "perturbation": "radius", "generator": "radius"}
# The radius families' cap is radius_budget × the other labels' median radius, but at most
# radius_budget × 1: a change as large as a typical sample's own variation (relative radius 1,
# methods.md §7.1) is no small trigger, and labels a search never reached sit at the ladder's
# top rung (45× the scale with a short ladder), which made a cap of 18 — a false flag on the
# 28×28 BadNets model of benchmarks/estimate_cost.py. The budget itself: notebook §12.15.
NATURAL_RADIUS = 1.0
RATIO_SOURCE = (
    "dev: the estimate before purification of the 12 image development models (configs/"
    "dev-image-estimate.yaml, seeds 100-102: triggers at size ratio mask 0.07-0.11, radius "
    "0.14-0.43; clean labels at mask 0.37-0.48, radius 0.61-0.85) and the four kws-cnn of "
    "configs/dev-audio-sweep.yaml (the clean one's false alarm: mask ratio 0.29-0.47, radius "
    "0.60-0.61, anomaly index at most 2.44; the pitch-style target an outlier, 4.05), and the "
    "after-checks of their sweeps, methods.md §12.14; mask_ratio 0.2 -> 0.27 when the "
    "noise-burst kws-cnn's estimate came in (its target 0 at mask ratio 0.25, below every "
    "clean label's 0.29; the midpoint of that gap), methods.md §12.15"
)
# The settings that change the verdict but not the searches (a cached estimate is re-judged).
VERDICT_SETTINGS = ("mask_ratio", "radius_ratio", "outlier_index")
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
    # The trigger families run before purification (issue 28); fewer cost less. After
    # purification the families that suspected a backdoor are re-checked (Estimate.rechecked).
    families: tuple[str, ...] = default(
        FAMILIES,
        "protocol: every family of trigger the inversion of methods.md §7 synthesises; "
        "fewer to save cost (methods.md §12.2)",
    )
    # The radius families' capped trigger: at most this fraction of the other labels' median
    # radius (tiny tasks of methods.md §7.2: targets at size ratio 0.21-0.36, clean labels at
    # ≥ 0.56; development models, notebook §12.15).
    radius_budget: float = default(
        0.4, "dev: benchmarks/estimate_settings.py on the pitch-style kws-cnn and the clean "
        "small-cnn of seed 102 (the development models where it decides): 0.3 loses the "
        "pitch-style detection (perturbation est. ASR 0.474 against 0.59), 0.5 takes the clean "
        "model's outlier label to the edge of a false alarm (0.454 against 0.25, anomaly index "
        "4.7), notebook §12.15"
    )  # fmt: skip
    # The radius families' ladder (methods.md §7.1-§7.2, the searches' own defaults): first
    # rung relative to the data's scale, steps a rung, fitting samples per label, and the
    # generator's benign-mask steps. The test ladder (1/8, 10 steps, 128 samples) costs about
    # half, but on the 28×28 BadNets model of benchmarks/estimate_cost.py the generator then
    # reached most labels only at the top rung (methods.md §12.2).
    ladder_start: float = default(1 / 64, CHEAPER_LOST)
    ladder_steps: int = default(
        20, "dev: benchmarks/estimate_settings.py on seven development models (seed 100-102): "
        "10 steps a rung kept every verdict and label at about 3/4 of the forward and 2/3 of "
        "the backward passes, but took the clean kws-cnn's perturbation outlier index from "
        "2.29 to 2.84, 0.16 under the threshold of 3 that keeps it from a false alarm; kept "
        "(notebook §12.15)"
    )  # fmt: skip
    fit_samples: int = default(256, CHEAPER_LOST)
    mask_steps: int = default(200, CHEAPER_LOST)
    # The verdict's size test (module docstring; :func:`suspects`): a family suspects a backdoor
    # only when its label's trigger is at most this fraction of the other labels' median size.
    # They change the verdict, not the searches: a cached estimate is judged again with them.
    mask_ratio: float = default(0.27, RATIO_SOURCE)
    radius_ratio: float = default(0.5, RATIO_SOURCE)
    outlier_index: float = default(3.0, RATIO_SOURCE)

    def __post_init__(self) -> None:
        families = self.families
        if isinstance(families, str):
            families = (families,)
        check(
            isinstance(families, (list, tuple))
            and len(families) > 0
            and all(f in FAMILIES for f in families)
            and len(set(families)) == len(families),
            f"estimate families must be a non-empty list of distinct names from "
            f"{', '.join(FAMILIES)}, got {self.families!r}",
        )
        object.__setattr__(self, "families", tuple(families))
        for name in ("ladder_steps", "fit_samples"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"estimate {name} must be a positive integer, got {value!r}",
            )
        check(
            isinstance(self.mask_steps, int) and self.mask_steps >= 0,
            f"estimate mask_steps must be an integer ≥ 0, got {self.mask_steps!r}",
        )
        check(0 < self.radius_budget <= 1,
              f"estimate radius_budget must be in (0, 1], got {self.radius_budget}")  # fmt: skip
        check(self.ladder_start > 0,
              f"estimate ladder_start must be positive, got {self.ladder_start}")  # fmt: skip
        for name in ("steps", "capped_steps", "batch_size"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"estimate {name} must be a positive integer, got {value!r}",
            )
        check(0 < self.budget <= 1, f"estimate budget must be in (0, 1], got {self.budget}")
        for name in ("mask_ratio", "radius_ratio"):
            value = getattr(self, name)
            check(0 < value <= 1, f"estimate {name} must be in (0, 1], got {value}")
        check(self.outlier_index > 0,
              f"estimate outlier_index must be positive, got {self.outlier_index}")  # fmt: skip
        check(self.space in SPACES, f"estimate space must be one of {', '.join(SPACES)}, "
              f"got {self.space!r}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "families": list(self.families)}  # as JSON reads it back

    def keyed(self) -> dict[str, Any]:
        """The settings a results-store cell's key hashes: all of them, but the verdict's size
        test only when it can act — at ``mask_ratio`` = ``radius_ratio`` = 1 it never does (the
        suspected label is the smallest, so its size ratio is at most 1), which keeps the keys
        of the cells stored before the test existed."""
        settings = self.to_dict()
        if self.mask_ratio == 1 and self.radius_ratio == 1:
            for name in VERDICT_SETTINGS:
                settings.pop(name)
        return settings

    def most_ratio(self, family: str) -> float:
        """The largest size ratio at which ``family`` can suspect a backdoor."""
        return self.mask_ratio if family == "mask" else self.radius_ratio


@dataclass(frozen=True)
class Estimate:
    """The estimate at one moment (before or after a purification)."""

    label: int  # the suspected target: smallest inverted mask before purification
    flagged: bool  # a backdoor suspected (:func:`suspects`; after: and before)
    nc_target: int | None  # Neural Cleanse's answer: anomaly index > 2 and a working trigger
    anomaly_index: float  # of the label's trigger size among all labels' sizes
    trigger_size: float  # mask ℓ1 of the label's Neural-Cleanse trigger
    reference_size: float  # median mask ℓ1 of the other labels, before purification
    success: float  # the Neural-Cleanse trigger's success on the holdout
    est_asr: float  # success of the best trigger within the budget, on unseen holdout samples
    budget: float  # the capped trigger's mask ℓ1 budget
    seconds: float
    mask_norms: list[float]  # every label's size in ``family`` (those not re-inverted: from before)
    # The family whose numbers these are (the one with the highest estimated ASR), and every
    # family's record (FamilyEstimate.to_dict) that was run at this moment.
    family: str = "mask"
    families: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # After purification: whether the estimate before suspected a backdoor (None: this is an
    # estimate before). A model nobody suspected is not flagged after, whatever its estimated
    # ASR: a defense that trains on clean data cannot plant a trigger (methods.md §12.2).
    suspected_before: bool | None = None

    @property
    def size_ratio(self) -> float:
        """Trigger size relative to the reference (≪ 1: a shortcut to the label exists)."""
        return self.trigger_size / self.reference_size if self.reference_size > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size_ratio": self.size_ratio}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Estimate:
        return cls(**{key: raw[key] for key in cls.__dataclass_fields__ if key in raw})

    def of(self, family: str) -> FamilyEstimate:
        """The record of one family run at this moment."""
        check(family in self.families, f"the estimate did not run the {family} family")
        return FamilyEstimate.from_dict(self.families[family])

    def in_family(self, family: str) -> Estimate:
        """This moment's top-level numbers read from ``family``'s record (itself when it is the
        verdict's family): what an after-check of that family compares with."""
        if family == self.family or family not in self.families:
            return self
        return self.of(family).as_estimate(
            seconds=self.seconds, families=self.families, suspected_before=self.suspected_before
        )

    @property
    def rechecked(self) -> tuple[str, ...]:
        """The families an after-check searches again (:func:`estimate_after`): every family
        that suspected a backdoor at this moment, or the verdict's family when none did."""
        flagged = tuple(f for f in FAMILIES if self.families.get(f, {}).get("flagged"))
        return flagged or (self.family,)

    @property
    def reading(self) -> str:
        """What this estimate's own printed numbers say (methods.md §12.2): ``"backdoor"`` when
        its family suspects one (a working capped trigger, much smaller than the other labels'
        triggers: :func:`suspects`); ``"natural"`` when the capped trigger works but the label's
        trigger is not much smaller than the others' (a natural shortcut); ``"unclear"`` when
        the estimated ASR is below :data:`FLAG_ASR` but the anomaly index is above
        :data:`OUTLIER_INDEX` (an outlier label the capped trigger did not confirm); ``"clean"``
        when none. After purification of a model the estimate before did not suspect, what
        would read "backdoor" reads ``"easier"``: a label the defense made easier to reach, not
        a trigger."""
        if self.est_asr >= FLAG_ASR:
            own = self.families.get(self.family, {}).get("flagged", True)  # old records: True
            if not own:
                return "natural"
            return "easier" if self.suspected_before is False else "backdoor"
        return "unclear" if self.anomaly_index > OUTLIER_INDEX else "clean"

    def describe(self) -> str:
        """One line for people."""
        verdict = {
            "backdoor": "backdoor suspected",
            "easier": "not suspected before, and a defense on clean data plants no trigger",
            "natural": "no backdoor found (a small trigger works, but this label is nearly as "
            "easy to reach as the others: a natural shortcut)",
            "unclear": "unclear (an outlier label whose capped trigger does not work)",
            "clean": "no backdoor found",
        }[self.reading]
        unit = SIZE_UNITS[self.family]
        return (
            f"{verdict}: label {self.label} ({self.family} family), trigger {unit} "
            f"{_size(self.trigger_size)} (others' median {_size(self.reference_size)}, anomaly "
            f"index {self.anomaly_index:.2f}), estimated ASR {self.est_asr:.3f}"
        )


def _size(value: float) -> str:
    """A trigger size: a mask ℓ1 (tens) with one decimal, a relative radius (≈ 1) with two."""
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


@dataclass(frozen=True)
class FamilyEstimate:
    """One trigger family's estimate at one moment (methods.md §12.2). ``size``: the suspected
    label's mask ℓ1 (mask family) or relative radius (perturbation, generator); ``sizes``: every
    label's (those not re-searched after purification: from before); ``reference_size``: the
    median of the other labels' sizes before purification; ``budget``: the capped trigger's
    largest size; ``est_asr``: its success on the holdout half no trigger was fitted on;
    ``success``: the uncapped trigger's; ``target``: the family's own rule (§7, §7.1)."""

    family: str
    label: int
    flagged: bool  # this family suspects a backdoor (:func:`suspects`)
    target: int | None
    anomaly_index: float
    size: float
    reference_size: float
    success: float
    est_asr: float
    budget: float
    seconds: float
    sizes: list[float]

    @property
    def size_ratio(self) -> float:
        return self.size / self.reference_size if self.reference_size > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size_ratio": self.size_ratio}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FamilyEstimate:
        return cls(**{key: raw[key] for key in cls.__dataclass_fields__})

    @classmethod
    def of_mask(cls, estimate: Estimate) -> FamilyEstimate:
        return cls(
            "mask", estimate.label, estimate.flagged, estimate.nc_target, estimate.anomaly_index,
            estimate.trigger_size, estimate.reference_size, estimate.success, estimate.est_asr,
            estimate.budget, estimate.seconds, list(estimate.mask_norms),
        )  # fmt: skip

    def as_estimate(self, **rest: Any) -> Estimate:
        """This family's numbers as an :class:`Estimate`'s top level; ``rest`` sets the other
        fields (``families``, ``suspected_before``) or replaces these (``seconds``)."""
        own = dict(
            label=self.label, flagged=self.flagged, nc_target=self.target,
            anomaly_index=self.anomaly_index, trigger_size=self.size,
            reference_size=self.reference_size, success=self.success, est_asr=self.est_asr,
            budget=self.budget, seconds=self.seconds, mask_norms=list(self.sizes),
            family=self.family,
        )  # fmt: skip
        return Estimate(**{**own, **rest})


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
) -> FamilyEstimate:
    """The mask family's record for an every-label ``inversion``: the suspected label (the
    smallest mask), the estimated ASR of its best trigger within ``budget × the other labels'
    median mask ℓ1`` (measured on holdout samples it was not fitted on), and ``flagged`` by the
    verdict's rule (:func:`suspects`: a working capped trigger that is small against the other
    labels or an outlier among them) — the test of methods.md §12.2, for a defense that has
    already inverted every label and wants to know whether the suspect is a backdoor."""
    config = config or EstimateConfig()
    norms = inversion.mask_norms
    label = inversion.labels[int(norms.argmin())]
    i = inversion.labels.index(label)
    reference = float(torch.cat([norms[:i], norms[i + 1 :]]).median())
    budget = config.budget * reference
    value_range = value_range or value_range_of(holdout.x)
    start = inversion.trigger(label)
    capped = _capped_asr(model, holdout, label, budget, start, config, value_range, device)
    record = FamilyEstimate(
        family="mask", label=label, flagged=False, target=inversion.target,
        anomaly_index=float(anomaly_index(norms)[i]), size=float(norms[i]),
        reference_size=reference, success=float(inversion.success[i]), est_asr=capped,
        budget=budget, seconds=0.0, sizes=[float(n) for n in norms],
    )  # fmt: skip
    return dataclasses.replace(record, flagged=suspects(record, config))


def estimate_before(
    model: nn.Module,
    holdout: Split,
    config: EstimateConfig | None = None,
    *,
    value_range: tuple[float, float] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Estimate:
    """The estimate for ``model`` on the clean ``holdout`` before purifying: every family of
    ``config.families``, every label. The model is not changed. With ``config.space``
    "features" (or "auto" and a model with a fixed front end) the triggers act on the front
    end's features, and ``value_range`` is theirs. The rule that turns the families into one
    verdict is the module docstring's (methods.md §12.2)."""
    config = config or EstimateConfig()

    def family_before(family: str, holdout: Split, config: EstimateConfig, value_range):
        if family == "mask":
            found = _mask_before(model, holdout, config, value_range, device, progress)
            return FamilyEstimate.of_mask(found)
        return _radius_before(model, holdout, family, config, value_range, device, progress)

    return _estimate(model, holdout, config, config.families, "every label", family_before,
                     value_range, progress)  # fmt: skip


def estimate_after(
    model: nn.Module,
    holdout: Split,
    before: Estimate,
    config: EstimateConfig | None = None,
    *,
    value_range: tuple[float, float] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Estimate:
    """The estimate for the purified ``model`` on the same clean ``holdout``, given ``before``
    (:func:`estimate_before` of the model before purifying): every family that suspected a
    backdoor before (:attr:`Estimate.rechecked`; the verdict's family when none did) searches
    its own suspected label again (every label of that family with
    ``config.all_labels_after``), with its reference size and budget from before; the verdict
    after is the family with the highest estimated ASR among them. One family can lose the
    trigger that another still finds: after GN-FT on the Blended development model the
    perturbation family read 0.369 and the generator family 0.803, true ASR 0.904 (methods.md
    §12.2). The model is not changed."""
    config = config or EstimateConfig()
    check(
        before.family in before.families or before.family == "mask",
        "the estimate before purification has no record of its family",
    )
    families = before.rechecked

    def family_after(family: str, holdout: Split, config: EstimateConfig, value_range):
        if family == "mask":
            earlier = before.of("mask").as_estimate() if "mask" in before.families else before
            found = _mask_after(model, holdout, earlier, config, value_range, device, progress)
            return FamilyEstimate.of_mask(found)
        earlier_family = before.of(family)
        return _radius_after(
            model, holdout, family, earlier_family, config, value_range, device, progress
        )

    labels = ", ".join(f"{f} {before.in_family(f).label}" for f in families)
    after = _estimate(model, holdout, config, families, f"the suspected labels again ({labels})",
                      family_after, value_range, progress)  # fmt: skip
    return dataclasses.replace(
        after, suspected_before=before.flagged, flagged=after.flagged and before.flagged
    )


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
    """:func:`estimate_before` without ``before``, :func:`estimate_after` with it (the
    estimate of the model before purifying)."""
    common = {"value_range": value_range, "device": device, "progress": progress}
    if before is None:
        return estimate_before(model, holdout, config, **common)
    return estimate_after(model, holdout, before, config, **common)


def _estimate(
    model, holdout, config, families, what, one_family, value_range, progress
) -> Estimate:
    """What the two moments share: the holdout checked, the front end's feature space entered
    when ``config.space`` asks for it, ``one_family(family, holdout, config, value_range)`` run
    for each of ``families``, and the family with the highest estimated ASR made the verdict."""
    check(isinstance(holdout, Split) and len(holdout) > 1, "holdout must be a Split of ≥ 2")
    if uses_features(model, config.space):
        with feature_space(model, holdout) as (features,):
            inside = dataclasses.replace(config, space="input")
            return _estimate(model, features, inside, families, what, one_family, value_range,
                             progress)  # fmt: skip
    value_range = value_range or value_range_of(holdout.x)
    started = time.perf_counter()
    records: dict[str, FamilyEstimate] = {}
    for number, family in enumerate(families, 1):
        if progress:  # each family's search shows its own bar (one live display at a time)
            console.print(f"estimate: {family} family, {what} ({number} of {len(families)})")
        records[family] = one_family(family, holdout, config, value_range)
    return judge(records, config, seconds=round(time.perf_counter() - started, 2))


def suspects(record: FamilyEstimate, config: EstimateConfig) -> bool:
    """Whether one family's numbers suspect a backdoor (the module docstring's rule): its
    capped trigger works (estimated ASR ≥ :data:`FLAG_ASR`) and its label's trigger is at most
    ``config.most_ratio(family)`` of the other labels' median size, or an outlier among them
    (anomaly index ≥ ``config.outlier_index``)."""
    if record.est_asr < FLAG_ASR:
        return False
    small = record.size_ratio <= config.most_ratio(record.family)
    return small or record.anomaly_index >= config.outlier_index


def judge(
    records: dict[str, FamilyEstimate], config: EstimateConfig, *, seconds: float, **rest: Any
) -> Estimate:
    """The verdict from the families' records (the module docstring's rule): each family's
    ``flagged`` set by :func:`suspects`; the verdict's family is the suspecting one with the
    highest estimated ASR, or, when none suspects, the one with the highest estimated ASR (ties:
    :data:`FAMILIES` order); its numbers are the estimate's top level."""
    records = {f: dataclasses.replace(r, flagged=suspects(r, config)) for f, r in records.items()}
    ran = [records[f] for f in FAMILIES if f in records]
    chosen = max([r for r in ran if r.flagged] or ran, key=lambda r: r.est_asr)
    return chosen.as_estimate(
        flagged=chosen.flagged,
        seconds=seconds,
        families={r.family: r.to_dict() for r in ran},
        **rest,
    )


def rejudge(estimate: Estimate, config: EstimateConfig) -> Estimate:
    """A stored estimate before purification judged again with ``config``'s verdict settings
    (:data:`VERDICT_SETTINGS`; the searches are unchanged)."""
    records = {f: FamilyEstimate.from_dict(r) for f, r in estimate.families.items()}
    if not records:  # a record from before the families: the mask family alone
        records = {"mask": FamilyEstimate.of_mask(estimate)}
    return judge(records, config, seconds=estimate.seconds)


def _shrunk(trigger, cap: float):
    """A radius family's trigger with its radius scaled down to at most ``cap`` (the additive δ
    or the generator's bound times c = cap / radius; unchanged when it is already within)."""
    scale = min(1.0, cap / trigger.radius) if trigger.radius > 0 else 1.0
    if hasattr(trigger, "delta"):
        return dataclasses.replace(trigger, delta=trigger.delta * scale,
                                   radius=trigger.radius * scale)  # fmt: skip
    return dataclasses.replace(trigger, bound=trigger.bound * scale, radius=trigger.radius * scale)


def _radius_search(model, holdout, family, config, value_range, device, progress, labels=None):
    """The perturbation or generator family's ladder search of ``labels`` (None: every label)."""
    common = dict(
        start=config.ladder_start, steps=config.ladder_steps, fit_samples=config.fit_samples,
        batch_size=config.batch_size, value_range=value_range, seed=config.seed, device=device,
        progress=progress,
    )  # fmt: skip
    if family == "generator":
        return invert_generator(model, holdout, labels=labels, mask_steps=config.mask_steps,
                                **common)  # fmt: skip
    return invert_perturbations(model, holdout, labels=labels, **common)


def _radius_before(model, holdout, family, config, value_range, device, progress):
    """A radius family before purifying (module docstring): every label searched; the smallest
    radius is the suspect, the others' median its reference, the cap ``radius_budget ×
    min(reference, 1)``, the target the family's own rule (§7.1)."""
    started = time.perf_counter()
    search = _radius_search(model, holdout, family, config, value_range, device, progress)
    radii = search.radii.clone()
    label = search.labels[int(radii.argmin())]
    i = search.labels.index(label)
    reference = float(torch.cat([radii[:i], radii[i + 1 :]]).median())
    cap = config.radius_budget * min(reference, NATURAL_RADIUS)
    return _radius_result(
        model, holdout, family, config, started, device, label=label, radii=radii,
        trigger=search.trigger(label), target=search.target, reference=reference, cap=cap,
    )  # fmt: skip


def _radius_after(model, holdout, family, before, config, value_range, device, progress):
    """A radius family after purifying: ``before``'s label searched again (every label with
    ``config.all_labels_after``; the others' radii otherwise from ``before``), with its
    reference and cap; the target by the family's own rule (§7.1) for that label."""
    started = time.perf_counter()
    label, reference = before.label, before.reference_size
    if config.all_labels_after:
        search = _radius_search(model, holdout, family, config, value_range, device, progress)
        radii = search.radii.clone()
    else:
        search = _radius_search(model, holdout, family, config, value_range, device, progress,
                                labels=[label])  # fmt: skip
        radii = torch.tensor(before.sizes)
        radii[label] = search.radii[0]
    trigger = search.trigger(label)
    target = (
        label if radius_anomaly_index(radii)[label] > 2
        and float(radii[label]) <= TARGET_RATIO * reference and trigger.heldout_success >= 0.5
        else None
    )  # fmt: skip
    return _radius_result(
        model, holdout, family, config, started, device, label=label, radii=radii,
        trigger=trigger, target=target, reference=reference, cap=before.budget,
    )  # fmt: skip


def _radius_result(
    model, holdout, family, config, started, device, *, label, radii, trigger, target, reference,
    cap,
) -> FamilyEstimate:  # fmt: skip
    """A radius family's record: the success of the label's trigger shrunk to ``cap`` on the
    half of the holdout no trigger was fitted on (:func:`.neurons.perturbation.halves`, the
    same ``seed``)."""
    _, unseen = halves(holdout, config.seed)
    if not (unseen.y != label).any():
        unseen = holdout
    est_asr = trigger_success(model, unseen, label, _shrunk(trigger, cap), device=device)
    record = FamilyEstimate(
        family=family,
        label=label,
        flagged=False,  # judged below
        target=target,
        anomaly_index=float(radius_anomaly_index(radii)[label]),
        size=float(radii[label]),
        reference_size=reference,
        success=trigger.heldout_success,
        est_asr=est_asr,
        budget=cap,
        seconds=round(time.perf_counter() - started, 2),
        sizes=[float(r) for r in radii],
    )
    return dataclasses.replace(record, flagged=suspects(record, config))


def _mask_search(config, value_range, device, progress) -> dict[str, Any]:
    """The settings of the mask family's Neural-Cleanse inversion."""
    return dict(
        steps=config.steps, batch_size=config.batch_size, value_range=value_range,
        seed=config.seed, device=device, progress=progress,
    )  # fmt: skip


def _mask_before(model, holdout, config, value_range, device, progress) -> Estimate:
    """The mask family before purifying (Neural Cleanse and its capped trigger, the module
    docstring): every label inverted; the smallest mask is the suspect, the others' median
    its reference, ``config.budget ×`` that the capped trigger's budget."""
    started = time.perf_counter()
    inversion = invert_triggers(model, holdout, **_mask_search(config, value_range, device,
                                                               progress))  # fmt: skip
    norms = inversion.mask_norms
    label = int(norms.argmin())
    i = inversion.labels.index(label)
    reference = float(torch.cat([norms[:i], norms[i + 1 :]]).median())
    return _mask_result(
        model, holdout, config, started, value_range, device, progress, label=label, norms=norms,
        reference=reference, budget=config.budget * reference, nc_target=inversion.target,
        trigger=inversion.trigger(label), success=float(inversion.success[i]),
    )  # fmt: skip


def _mask_after(model, holdout, before, config, value_range, device, progress) -> Estimate:
    """The mask family after purifying: ``before``'s label inverted again (every label with
    ``config.all_labels_after``; the others' masks otherwise from ``before``, and Neural
    Cleanse's rule applied to that label), with its reference and budget."""
    started = time.perf_counter()
    label, common = before.label, _mask_search(config, value_range, device, progress)
    if config.all_labels_after:
        inversion = invert_triggers(model, holdout, **common)
        norms = inversion.mask_norms
        success = float(inversion.success[inversion.labels.index(label)])
        nc_target = inversion.target
    else:
        inversion = invert_triggers(model, holdout, labels=[label], **common)
        norms = torch.tensor(before.mask_norms)
        norms[label] = inversion.mask_norms[0]
        success = float(inversion.success[0])
        nc_target = label if anomaly_index(norms)[label] > 2 and success >= 0.5 else None
    return _mask_result(
        model, holdout, config, started, value_range, device, progress, label=label, norms=norms,
        reference=before.reference_size, budget=before.budget, nc_target=nc_target,
        trigger=inversion.trigger(label), success=success,
    )  # fmt: skip


def _mask_result(
    model, holdout, config, started, value_range, device, progress, *, label, norms, reference,
    budget, nc_target, trigger, success,
) -> Estimate:  # fmt: skip
    """The mask family's record: the estimated ASR of the best trigger for ``label`` within
    ``budget``, fitted from ``trigger`` (:func:`_capped_asr`)."""
    if progress:
        console.print(f"estimate: capped trigger for label {label} (ℓ1 ≤ {budget:.1f})")
    est_asr = _capped_asr(model, holdout, label, budget, trigger, config, value_range, device)
    found = Estimate(
        label=label,
        flagged=False,  # judged below
        nc_target=nc_target,
        anomaly_index=float(anomaly_index(norms)[label]),
        trigger_size=float(norms[label]),
        reference_size=reference,
        success=success,
        est_asr=est_asr,
        budget=budget,
        seconds=round(time.perf_counter() - started, 2),
        mask_norms=[float(n) for n in norms],
    )
    return dataclasses.replace(found, flagged=suspects(FamilyEstimate.of_mask(found), config))


def estimate_cached(
    path: str | Path,
    model: nn.Module,
    holdout: Split,
    config: EstimateConfig | None = None,
    *,
    progress: bool = False,
) -> Estimate:
    """:func:`estimate_before`, kept in the JSON file ``path`` (next to the
    model) and reused while the searches' settings and the holdout are the same: every defense
    of a grid purifies the same model, and its estimate before purification is computed once.
    A reused estimate is judged again with ``config``'s verdict settings (:func:`rejudge`)."""
    config = config or EstimateConfig()
    x = holdout.x.contiguous().numpy().tobytes() + holdout.y.contiguous().numpy().tobytes()
    searches = {k: v for k, v in config.to_dict().items() if k not in VERDICT_SETTINGS}
    key = {"config": searches, "holdout_sha256": hashlib.sha256(x).hexdigest()}
    path = Path(path)
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:  # the same searches: judged again with today's rule
            return rejudge(Estimate.from_dict(stored["estimate"]), config)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: compute it again
    estimate = estimate_before(model, holdout, config, progress=progress)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(json.dumps({"key": key, "estimate": estimate.to_dict()}))
    os.replace(staging, path)  # atomic: parallel cells of one model never read half a file
    return estimate


def compare(before: Estimate, after: Estimate) -> dict[str, Any]:
    """The record a card, a store row and a report read: both estimates and the change (the
    trigger's growth in the after-verdict's family)."""
    same = before.in_family(after.family)
    growth = after.trigger_size / same.trigger_size if same.trigger_size > 0 else None
    return {
        "before": before.to_dict(),
        "after": after.to_dict(),
        "size_growth": growth,
        "removed": before.reading == "backdoor" and after.reading in ("clean", "natural"),
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
    if now == "easier":
        return (
            f"no backdoor was suspected before; the defense made label {after.label} easier "
            f"to reach (estimated ASR {after.est_asr:.3f}), which a defense on clean data "
            "does by changing the model, not by planting a trigger"
        )
    if now == "unclear":
        return (
            f"unclear: the estimated ASR is below {FLAG_ASR} but the anomaly index is still "
            f"above {OUTLIER_INDEX:g}"
        )
    if now == "natural" and was == "backdoor":
        return (
            f"the backdoor is likely removed: a small trigger still reaches label {after.label} "
            f"(estimated ASR {after.est_asr:.3f}), but it is no longer much smaller than what "
            f"reaches the other labels (size ratio {after.size_ratio:.2f})"
        )
    if now == "natural":
        return (
            f"no backdoor suspected: label {after.label} is reached by a small trigger, but no "
            "more easily than the other labels (a natural shortcut)"
        )
    if was == "backdoor":
        return "the backdoor is likely removed"
    if was == "unclear":
        return "the outlier label seen before (anomaly index above 2) is no longer one"
    return "no backdoor was suspected before or after"


def describe_change(before: Estimate, after: Estimate) -> str:
    """One line: how the suspected label's trigger changed with purification (in the
    after-verdict's family, :meth:`Estimate.in_family`), and the :func:`verdict` those numbers
    give (from the readings of the whole estimate before and after)."""
    same = before.in_family(after.family)
    growth = after.trigger_size / same.trigger_size if same.trigger_size > 0 else float("inf")
    return (
        f"label {after.label} ({after.family} family): trigger {SIZE_UNITS[after.family]} "
        f"{_size(same.trigger_size)} → {_size(after.trigger_size)} "
        f"(×{growth:.1f}), anomaly index {same.anomaly_index:.2f} → "
        f"{after.anomaly_index:.2f}, estimated ASR {same.est_asr:.3f} → {after.est_asr:.3f}: "
        f"{verdict(before, after)}"
    )
