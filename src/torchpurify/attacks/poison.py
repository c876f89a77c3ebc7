"""Poison a training split: pick samples by seed, apply the trigger, relabel them.

BackdoorBench defaults (methods.md §0): rate 10 %, target 0, all-to-one. Error messages name
the CLI options, since that is where most users set these values.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from torchpurify.attacks.base import Trigger
from torchpurify.data.base import Split
from torchpurify.errors import UserError, check

MODES = ("all-to-one", "all-to-all")


def poisoning_problem(
    rate: float, mode: str = "all-to-one", target: int = 0, num_classes: int | None = None
) -> tuple[str, str] | None:
    """The one range check of how an attack poisons (CLI, spec, experiment, :func:`poison_split`):
    a rate in (0, 1], a known target mode, a target label in [0, num_classes). Returns the first
    wrong field and what is wrong with it (``("poison_rate", "must be in (0, 1], got 2")``)."""
    number = not isinstance(rate, bool) and isinstance(rate, (int, float))
    if not (number and math.isfinite(rate) and 0 < rate <= 1):
        return "poison_rate", f"must be in (0, 1], got {rate!r}"
    if mode not in MODES:
        return "target_mode", f"must be one of {', '.join(MODES)}, got {mode!r}"
    label = isinstance(target, int) and not isinstance(target, bool) and target >= 0
    if not label or (num_classes is not None and target >= num_classes):
        allowed = "a label ≥ 0" if num_classes is None else f"in [0, {num_classes})"
        return "target", f"must be {allowed}, got {target!r}"
    return None


def check_poisoning(
    rate: float, mode: str = "all-to-one", target: int = 0, num_classes: int | None = None
) -> None:
    """:func:`poisoning_problem` as a one-line UserError naming the CLI option."""
    problem = poisoning_problem(rate, mode, target, num_classes)
    if problem is not None:
        field, message = problem
        raise UserError(f"--{field.replace('_', '-')} {message}")


def target_labels(y: torch.Tensor, target: int, mode: str, num_classes: int) -> torch.Tensor:
    """The label a triggered sample of true label ``y`` should be classified as."""
    if mode == "all-to-one":
        return torch.full_like(y, target)
    if mode == "all-to-all":
        return (y + 1) % num_classes
    raise UserError(f"--target-mode must be one of {', '.join(MODES)}, got {mode!r}")


@dataclass
class Poisoned:
    """A poisoned copy of a split and which of its samples were changed."""

    split: Split
    poisoned: torch.Tensor  # sorted indices: triggered (and relabelled unless clean-label)
    noise: torch.Tensor  # sorted indices: noise-warped, labels kept (WaNet cross samples)

    def indices_sha256(self) -> str:
        """Fingerprint of the poisoned indices (as little-endian int64) for the model card."""
        return hashlib.sha256(self.poisoned.numpy().astype("<i8").tobytes()).hexdigest()


def poison_split(
    split: Split,
    trigger: Trigger,
    rate: float,
    target: int = 0,
    mode: str = "all-to-one",
    num_classes: int | None = None,
    seed: int = 0,
    clean_label: bool | None = None,
) -> Poisoned:
    """Trigger round(rate·N) samples drawn by ``seed``; return a new split, ``split`` is untouched.

    Dirty-label all-to-one draws from samples not already labelled ``target``; all-to-all from
    every sample. Clean-label (the trigger's default unless given) draws only target-class
    samples and keeps their labels, so it poisons at most as many as that class has.
    ``num_classes`` defaults to the largest label + 1.
    """
    n = len(split)
    if num_classes is None:
        num_classes = int(split.y.max()) + 1
    check_poisoning(rate, mode, target, num_classes)
    count = round(rate * n)
    check(
        count > 0,
        f"--poison-rate {rate} poisons 0 of {n} samples; use at least {1 / max(n, 1):.2g}",
    )
    if clean_label is None:
        clean_label = trigger.clean_label

    if clean_label:
        check(
            mode == "all-to-one",
            "clean-label poisoning keeps labels, so it needs --target-mode all-to-one",
        )
        candidates = torch.nonzero(split.y == target).flatten()
        check(len(candidates) > 0, f"clean-label poisoning needs samples of --target {target}")
        count = min(count, len(candidates))
    elif mode == "all-to-one":
        candidates = torch.nonzero(split.y != target).flatten()
        check(
            count <= len(candidates),
            f"--poison-rate {rate} asks for {count} samples but only {len(candidates)} have a "
            f"label other than --target {target}; lower --poison-rate",
        )
    else:
        candidates = torch.arange(n)

    generator = torch.Generator().manual_seed(seed)
    poisoned = candidates[torch.randperm(len(candidates), generator=generator)[:count]].sort()[0]
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[poisoned] = False
    rest = torch.nonzero(untouched).flatten()
    noise_count = round(trigger.cross_ratio * count)
    check(
        noise_count <= len(rest),
        f"{trigger.name} needs {noise_count} noise samples (cross_ratio x poisoned) but only "
        f"{len(rest)} samples are left; lower --poison-rate or the trigger's cross_ratio",
    )
    noise = rest[torch.randperm(len(rest), generator=generator)[:noise_count]].sort()[0]

    x, y = split.x.clone(), split.y.clone()
    x[poisoned] = trigger(split.x[poisoned])
    if len(noise):
        x[noise] = trigger.noise(split.x[noise], generator)
    if not clean_label:
        y[poisoned] = target_labels(split.y[poisoned], target, mode, num_classes)
    return Poisoned(Split(x, y), poisoned, noise)
