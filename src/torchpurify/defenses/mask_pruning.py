"""What ANP and RNP share (methods.md §6.6, §6.8): a defense that learns one mask value per
neuron and prunes the *original* model's neurons whose value is at or below a threshold.

The references sweep the threshold t = 0, 0.05, …, 0.9 and read each result off the test set.
Here t is the largest value of that grid (up to ``pruning_max``) whose pruned model keeps the
defender's holdout accuracy within the defense's budget (``max_acc_drop``; by default the noise
rule of methods.md §0), found by binary search — :mod:`~torchpurify.defenses.budget` with
``search="binary"``, which assumes holdout accuracy falls monotonically in t (it falls close to
monotonically) — or the fixed ``threshold`` when one is given. Pruning masks the whole channel
with the persistent neuron masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from torchpurify.checks import default
from torchpurify.data.base import Split
from torchpurify.defenses.base import Defense
from torchpurify.defenses.budget import largest_passing
from torchpurify.defenses.pruning import CUT_SCALE, scaled_count, smaller_cut
from torchpurify.logs import MaskPruningLog
from torchpurify.metrics import accuracy
from torchpurify.neurons import mask_channels, masked_layers, unmask

THRESHOLDS = 0.05


def prune_by_mask_values(
    model: nn.Module,
    values: dict[str, torch.Tensor],
    holdout: Split,
    *,
    budget: Callable[[float, int], float],
    pruning_max: float,
    threshold: float | None,
    batch_size: int,
    cut_scale: float = 1.0,
) -> MaskPruningLog:
    """Mask every neuron whose learned mask value is ≤ the chosen threshold (see the module
    docstring); with ``cut_scale`` < 1 (the guard's back-off, methods.md §0) only that share of
    them, those with the smallest mask values."""
    if threshold is not None:
        grid = [threshold]
    else:
        steps = int(round(pruning_max / THRESHOLDS))
        grid = [round(i * THRESHOLDS, 4) for i in range(steps + 1)]
    curve: dict[int, float] = {}

    earlier = masked_layers(model)  # masks the model came with stay in place

    def below(position: int) -> dict[str, torch.Tensor]:
        empty = torch.empty(0, dtype=torch.long)
        return {
            layer: torch.nonzero(value <= grid[position - 1]).flatten() if position else empty
            for layer, value in values.items()
        }

    def apply(position: int, chosen: dict[str, torch.Tensor] | None = None) -> None:
        for layer, value in values.items():
            unmask(model, layer)
            index = (below(position) if chosen is None else chosen)[layer]
            if layer in earlier:
                kept = torch.nonzero(earlier[layer] == 0).flatten().cpu()
                index = torch.cat([kept, torch.as_tensor(index, dtype=torch.long)])
            if len(index):
                mask_channels(model, layer, index, num_channels=len(value))

    def holdout_accuracy(position: int) -> float:
        if position not in curve:
            apply(position)
            curve[position] = accuracy(model, holdout, batch_size=batch_size)
        return curve[position]

    base = holdout_accuracy(0)
    floor = base - budget(base, len(holdout))
    if threshold is None:
        chosen = largest_passing(
            0, len(grid), lambda p: holdout_accuracy(p) >= floor, search="binary"
        )
    else:
        chosen = 1
    after = holdout_accuracy(chosen)
    selected = below(chosen)
    within = sum(len(index) for index in selected.values())
    if cut_scale < 1:  # the smallest mask values first; ties in layer and channel order
        ranked = sorted(
            (float(values[layer][i]), position, layer, int(i))
            for position, (layer, index) in enumerate(selected.items())
            for i in index
        )
        kept = ranked[: scaled_count(within, cut_scale)]
        selected = {
            layer: torch.tensor([i for _, _, name, i in kept if name == layer], dtype=torch.long)
            for layer in values
        }
    apply(chosen, selected)
    if cut_scale < 1:
        after = accuracy(model, holdout, batch_size=batch_size)
    pruned = {
        layer: torch.nonzero(mask == 0).flatten().tolist()
        for layer, mask in masked_layers(model).items()
        if layer in values
    }
    return MaskPruningLog(
        threshold=grid[chosen - 1] if chosen else None,
        holdout_acc_before=base,
        holdout_acc_pruned=after,
        floor=floor,
        pruned=pruned,
        num_pruned=sum(len(v) for v in pruned.values()),
        num_within_budget=within,
        cut_scale=cut_scale,
        neurons=sum(len(v) for v in values.values()),
        curve=[[grid[p - 1] if p else None, curve[p]] for p in sorted(curve)],
        mask_values={k: [round(float(x), 4) for x in v] for k, v in values.items()},
    )


@dataclass
class MaskPruning(Defense):
    """What ANP and RNP share: learn a mask per neuron, prune the original by its values
    (holdout budget: ``max_acc_drop``, by default the noise rule of methods.md §0)."""

    pruning_max: float = default(
        0.9, "paper: the top of the ANP / RNP authors' threshold grid, methods.md §6.6, §6.8"
    )
    threshold: float | None = default(
        None, "protocol: the threshold is chosen on the holdout within the budget (the "
        "authors read it off the test set), methods.md §6.6"
    )  # fmt: skip
    cut_scale: float = default(1.0, CUT_SCALE)

    def validate(self) -> None:
        self.require("pruning_max", 0 < self.pruning_max <= 1, "in (0, 1]")
        self.require("cut_scale", 0 < self.cut_scale <= 1, "in (0, 1]")
        self.require(
            "threshold",
            self.threshold is None
            or (isinstance(self.threshold, (int, float)) and 0 <= self.threshold <= 1),
            "null or in [0, 1]",
        )

    def prune(
        self, model: nn.Module, values: dict[str, torch.Tensor], holdout: Split
    ) -> MaskPruningLog:
        return prune_by_mask_values(
            model,
            values,
            holdout,
            budget=self.budget,
            pruning_max=self.pruning_max,
            threshold=self.threshold,
            batch_size=self.batch_size,
            cut_scale=self.cut_scale,
        )

    def back_off(self) -> MaskPruning | None:
        """The guard's gentler version: half the neurons the threshold chose, those with the
        smallest mask values kept (no fine-tuning follows: the cut is the whole cost), down to
        an eighth of them; then the input model."""
        return smaller_cut(self)  # type: ignore[return-value]
