"""What the pruning defenses share: a base class with their common fields (the neuron layer, the
holdout budget of the cut, the fine-tuning afterwards), pruning the first k channels of a
ranking and measuring it on the defender's holdout (the cut itself is found by
:mod:`~torchpurify.defenses.budget`); and the guard's back-off of every pruning defense
(methods.md §0): a smaller cut (``cut_scale`` halved), then, for those that fine-tune, no
fine-tuning. No defense is registered here.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchpurify.checks import default
from torchpurify.data.base import Split
from torchpurify.defenses.base import Clean, Defense
from torchpurify.defenses.recipe import FineTuneRecipe
from torchpurify.errors import Divergence
from torchpurify.metrics import accuracy, predict
from torchpurify.neurons import default_neuron_layer, mask_channels, unmask
from torchpurify.train import TrainConfig, fit

# The share of the cut its selection rule found that a pruning defense prunes: 1 at the default,
# halved by each of the guard's back-offs (methods.md §0) down to MIN_CUT_SCALE, after which the
# defenses that fine-tune drop their fine-tuning and the others roll back.
CUT_SCALE = (
    "protocol: the whole cut the selection rule finds; each of the guard's back-offs halves it "
    "(methods.md §0)"
)
MIN_CUT_SCALE = 1 / 8


def scaled_count(count: int, scale: float) -> int:
    """``scale`` of ``count`` pruned units, rounded down: the guard's smaller cut."""
    return int(count * scale)


def smaller_cut(defense: Defense) -> Defense | None:
    """The same defense with half its ``cut_scale``, or None once it is at MIN_CUT_SCALE."""
    scale = defense.cut_scale  # type: ignore[attr-defined]
    if scale <= MIN_CUT_SCALE:
        return None
    return dataclasses.replace(defense, cut_scale=max(scale / 2, MIN_CUT_SCALE))


@dataclass
class PruningDefense(FineTuneRecipe):
    """Base of the pruning defenses: prune channels of ``layer`` (default: methods.md §0's
    neuron layer) within the holdout budget (``max_acc_drop``, by default the noise rule of
    methods.md §0), then optionally fine-tune with the masks in place."""

    layer: str | None = default(
        None, "paper: the last convolutional feature map, which Fine-Pruning and ℓ∞ pruning "
        "prune (the neuron layer of methods.md §0; §2, §3)"
    )  # fmt: skip
    # Each pruning defense names the source of its own fine-tuning epochs and BN setting.
    epochs: int = 10
    # Fine-tuning a pruned model with train-mode BatchNorm revives the backdoor (methods.md §11.1).
    freeze_bn_stats: bool = True
    cut_scale: float = default(1.0, CUT_SCALE)

    def validate(self) -> None:
        super().validate()
        self.require("cut_scale", 0 < self.cut_scale <= 1, "in (0, 1]")

    @property
    def fine_tunes(self) -> bool:
        raise NotImplementedError

    def without_fine_tuning(self) -> PruningDefense:
        raise NotImplementedError

    def back_off(self) -> PruningDefense | None:
        """The guard's gentler version: half the cut (the cut is chosen at the edge of the
        budget on the selection samples, the fine-tuning is kept only when no worse there), then,
        at MIN_CUT_SCALE, the smallest cut without its fine-tuning."""
        smaller = smaller_cut(self)
        if smaller is not None:
            return smaller  # type: ignore[return-value]
        return self.without_fine_tuning() if self.fine_tunes else None

    def neuron_layer(self, model: nn.Module, clean: Clean) -> str:
        return self.layer or default_neuron_layer(model, clean.holdout.x[:2])

    def fine_tune_pruned(self, model: nn.Module, clean: Clean, pruned_acc: float) -> dict:
        """Fine-tune the pruned model on ``tune`` with its masks in place (when this defense
        fine-tunes); the result is kept only when its holdout accuracy is at least the pruned
        model's (and training did not diverge). Returns what to add to the log."""
        if not self.fine_tunes:
            return {}
        return fine_tune_if_no_worse(
            model, clean.tune, clean.holdout, self.train_config(), pruned_acc, self.name
        )


def prune_first(model: nn.Module, layer: str, order: torch.Tensor, k: int) -> None:
    """Mask exactly the channels ``order[:k]`` of ``layer`` (replacing any earlier mask)."""
    unmask(model, layer)
    mask_channels(model, layer, order[:k], num_channels=len(order))


def fine_tune_if_no_worse(
    model: nn.Module,
    tune: Split,
    holdout: Split,
    config: TrainConfig,
    floor: float,
    description: str,
) -> dict[str, Any]:
    """Fine-tune a pruned model; keep the result only if holdout accuracy is ≥ ``floor`` (the
    pruned model's own: the better of the two is kept) and training did not diverge.

    The holdout — never the test split — decides, and the pruned weights come back when it
    says no. The masks are part of the state and stay as they were.
    """
    pruned = copy.deepcopy(model.state_dict())
    try:
        result = fit(model, tune, config, description=description)
    except Divergence as error:
        model.load_state_dict(pruned)
        return {"fine_tune_kept": False, "fine_tune_diverged": str(error)}
    holdout_acc = accuracy(model, holdout, batch_size=config.batch_size)
    kept = holdout_acc >= floor
    if not kept:
        model.load_state_dict(pruned)
    return {
        "history": result.history,
        "holdout_acc_fine_tuned": holdout_acc,
        "fine_tune_kept": kept,
    }


class HoldoutProbe:
    """Measures a pruned model on the holdout and remembers every evaluation (the curve)."""

    def __init__(
        self, model: nn.Module, layer: str, order: torch.Tensor, holdout: Split, batch_size: int
    ) -> None:
        self.model, self.layer, self.order = model, layer, order
        self.holdout, self.batch_size = holdout, batch_size
        self.curve: dict[int, float] = {}

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
