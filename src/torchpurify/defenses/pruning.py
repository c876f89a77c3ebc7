"""What the pruning defenses share: pruning the first k channels of a ranking, measuring on the
defender's holdout, and finding the cut by binary search (O(log C) evaluations) or a full sweep.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchpurify.data.base import Split
from torchpurify.metrics import accuracy, predict
from torchpurify.neurons import mask_channels, unmask
from torchpurify.train import Cost, TrainConfig, fit


def prune_first(model: nn.Module, layer: str, order: torch.Tensor, k: int) -> None:
    """Mask exactly the channels ``order[:k]`` of ``layer`` (replacing any earlier mask)."""
    unmask(model, layer)
    mask_channels(model, layer, order[:k], num_channels=len(order))


def fine_tune_within_budget(
    model: nn.Module,
    tune: Split,
    holdout: Split,
    config: TrainConfig,
    floor: float,
    description: str,
) -> tuple[Cost, dict[str, Any]]:
    """Fine-tune a pruned model; keep the result only if holdout accuracy stays ≥ ``floor``.

    Fine-tuning with frozen BatchNorm statistics (the pruning defaults, methods.md §11.1) can
    diverge on an unlucky seed; the holdout — never the test split — decides, and the pruned
    weights come back when it fails. The masks are part of the state and stay as they were.
    """
    pruned = copy.deepcopy(model.state_dict())
    result = fit(model, tune, config, description=description)
    holdout_acc = accuracy(model, holdout, batch_size=config.batch_size)
    kept = holdout_acc >= floor
    if not kept:
        model.load_state_dict(pruned)
    cost = result.cost
    cost.forward += -(-len(holdout) // config.batch_size)
    log = {"history": result.history, "holdout_acc_fine_tuned": holdout_acc, "fine_tune_kept": kept}
    return cost, log


def largest_passing(low: int, high: int, passes: Callable[[int], bool]) -> int:
    """The largest k in [low, high] with ``passes(k)``, given ``passes(low)`` and that
    ``passes`` is monotone (true up to some k, false after)."""
    while low < high:
        middle = (low + high + 1) // 2
        if passes(middle):
            low = middle
        else:
            high = middle - 1
    return low


def first_failing(low: int, high: int, passes: Callable[[int], bool]) -> int:
    """A full sweep: the last k before ``passes`` first fails, scanning up from ``low``."""
    for k in range(low + 1, high + 1):
        if not passes(k):
            return k - 1
    return high


class HoldoutProbe:
    """Measures a pruned model on the holdout and remembers every evaluation (the curve)."""

    def __init__(
        self, model: nn.Module, layer: str, order: torch.Tensor, holdout: Split, batch_size: int
    ) -> None:
        self.model, self.layer, self.order = model, layer, order
        self.holdout, self.batch_size = holdout, batch_size
        self.curve: dict[int, float] = {}
        self.batches_per_pass = -(-len(holdout) // batch_size)

    def accuracy(self, k: int) -> float:
        if k not in self.curve:
            prune_first(self.model, self.layer, self.order, k)
            self.curve[k] = accuracy(self.model, self.holdout, batch_size=self.batch_size)
        return self.curve[k]

    def predictions(self, k: int, transform) -> torch.Tensor:
        prune_first(self.model, self.layer, self.order, k)
        return predict(self.model, self.holdout.x, transform=transform, batch_size=self.batch_size)

    def sorted_curve(self) -> list[list[float]]:
        return [[k, self.curve[k]] for k in sorted(self.curve)]
