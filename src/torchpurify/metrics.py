"""ACC, ASR, RA and DER (methods.md §1) — the one metrics module.

ASR and RA are measured on the test samples whose true label differs from their attack target
(all-to-one: label ≠ target; all-to-all: every sample, since (y + 1) mod K ≠ y), with the trigger
applied: ASR is the fraction predicted as the target, RA the fraction still predicted correctly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from torchpurify.data.base import Split
from torchpurify.errors import check

Trigger = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict(
    model: nn.Module,
    x: torch.Tensor,
    *,
    transform: Trigger | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Predicted labels (on the CPU) for inputs ``x``, optionally transformed batch by batch."""
    if device is None:  # the model's own device; a model without parameters runs on the CPU
        device = next(model.parameters(), torch.empty(0)).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    predictions = []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        if transform is not None:
            batch = transform(batch)
        predictions.append(model(batch.to(device)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, data: Split, **kwargs) -> float:
    check(len(data) > 0, "cannot measure accuracy on an empty split")
    return (predict(model, data.x, **kwargs) == data.y).float().mean().item()


def class_accuracies(model: nn.Module, data: Split, **kwargs) -> dict[int, float]:
    """Accuracy on each class that occurs in ``data``, by label: a holdout's overall accuracy
    can hide a class the model gave up (one class present vouches for nothing else)."""
    check(len(data) > 0, "cannot measure accuracy on an empty split")
    correct = predict(model, data.x, **kwargs) == data.y
    return {int(label): correct[data.y == label].float().mean().item() for label in data.y.unique()}


def balanced_accuracy(model: nn.Module, data: Split, **kwargs) -> float:
    """The mean of :func:`class_accuracies`: every class present counts the same."""
    accuracies = class_accuracies(model, data, **kwargs)
    return sum(accuracies.values()) / len(accuracies)


@dataclass
class Metrics:
    """Clean accuracy; attack success rate and robust accuracy (None without a trigger)."""

    acc: float
    asr: float | None = None
    ra: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def attack_rates(
    predicted: torch.Tensor, y: torch.Tensor, target: int, mode: str, num_classes: int
) -> tuple[float, float]:
    """(ASR, RA) from predictions on triggered inputs and their true labels."""
    # Imported here: the attacks package imports this module (attacks that train).
    from torchpurify.attacks.poison import target_labels

    wanted = target_labels(y, target, mode, num_classes)
    eligible = wanted != y
    check(
        bool(eligible.any()), "no test sample has a label other than the target; ASR is undefined"
    )
    asr = (predicted[eligible] == wanted[eligible]).float().mean().item()
    ra = (predicted[eligible] == y[eligible]).float().mean().item()
    return asr, ra


def evaluate(
    model: nn.Module,
    test: Split,
    trigger: Trigger | None = None,
    *,
    target: int = 0,
    mode: str = "all-to-one",
    num_classes: int | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> Metrics:
    """ACC on ``test``; with a trigger also ASR and RA on its triggered non-target samples."""
    check(len(test) > 0, "the test split is empty; nothing to evaluate")
    acc = (
        (predict(model, test.x, batch_size=batch_size, device=device) == test.y)
        .float()
        .mean()
        .item()
    )
    if trigger is None:
        return Metrics(acc)
    num_classes = num_classes if num_classes is not None else int(test.y.max()) + 1
    from torchpurify.attacks.poison import target_labels

    eligible = target_labels(test.y, target, mode, num_classes) != test.y
    triggered = predict(
        model, test.x[eligible], transform=trigger, batch_size=batch_size, device=device
    )
    asr, ra = attack_rates(triggered, test.y[eligible], target, mode, num_classes)
    return Metrics(acc, asr, ra)


def der(acc_before: float, asr_before: float, acc_after: float, asr_after: float) -> float:
    """Defense effectiveness rating (BackdoorBench), in [0, 1]; 0.5 means no change."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1) / 2
