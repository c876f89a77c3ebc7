"""What the pruning defenses share: pruning the first k channels of a ranking, measuring on the
defender's holdout, and finding the cut by binary search (O(log C) evaluations) or a full sweep.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from torchpurify.data.base import Split
from torchpurify.metrics import accuracy, predict
from torchpurify.neurons import mask_channels, unmask


def prune_first(model: nn.Module, layer: str, order: torch.Tensor, k: int) -> None:
    """Mask exactly the channels ``order[:k]`` of ``layer`` (replacing any earlier mask)."""
    unmask(model, layer)
    mask_channels(model, layer, order[:k], num_channels=len(order))


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
