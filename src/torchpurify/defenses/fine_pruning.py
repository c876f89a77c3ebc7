"""Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018; methods.md §2).

Prune the neuron layer's channels in increasing order of mean activation on the clean holdout,
as many as keep holdout accuracy within ``max_acc_drop`` of the unpruned model, then fine-tune
on ``tune`` with the masks in place.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from torchpurify.defenses.base import Clean, Purified, register_defense
from torchpurify.defenses.pruning import (
    HoldoutProbe,
    fine_tune_within_budget,
    first_failing,
    largest_passing,
    prune_first,
)
from torchpurify.defenses.recipe import FineTuneRecipe
from torchpurify.neurons import activation_stats, default_neuron_layer
from torchpurify.train import Cost


@register_defense
@dataclass
class FinePruning(FineTuneRecipe):
    name = "fine-pruning"
    summary = "prune channels dormant on clean data, then fine-tune (Liu et al. 2018)"

    epochs: int = 10
    layer: str | None = None
    # Defaults chosen by the calibration runs of methods.md §11.1 (the paper's 4-point budget and
    # train-mode BatchNorm leave BadNets at ASR 0.99 at our scale).
    max_acc_drop: float = 0.08
    freeze_bn_stats: bool = True
    search: str = "binary"
    prune_only: bool = False

    def validate(self) -> None:
        super().validate()
        self.require("max_acc_drop", 0 <= self.max_acc_drop < 1, "in [0, 1)")
        self.require("search", self.search in ("binary", "sweep"), "binary or sweep")

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        layer = self.layer or default_neuron_layer(model, clean.holdout.x[:2])
        stats = activation_stats(model, layer, clean.holdout, batch_size=self.batch_size)
        order = stats.mean.argsort()  # most dormant first
        probe = HoldoutProbe(model, layer, order, clean.holdout, self.batch_size)
        base = probe.accuracy(0)
        threshold = base - self.max_acc_drop

        def within(k: int) -> bool:
            return probe.accuracy(k) >= threshold

        search = largest_passing if self.search == "binary" else first_failing
        cut = search(0, len(order) - 1, within)
        prune_first(model, layer, order, cut)
        log = {
            "layer": layer,
            "channels": len(order),
            "pruned": order[:cut].tolist(),
            "num_pruned": cut,
            "holdout_acc_before": base,
            "holdout_acc_pruned": probe.curve[cut],
            "threshold": threshold,
            "search": self.search,
            "holdout_evaluations": len(probe.curve),
            "curve": probe.sorted_curve(),
        }
        cost = Cost(forward=(len(probe.curve) + 1) * probe.batches_per_pass)
        if not self.prune_only:
            tuned_cost, tuned_log = fine_tune_within_budget(
                model, clean.tune, clean.holdout, self.train_config(), threshold, self.name
            )
            cost.add(tuned_cost)
            log.update(tuned_log)
        return Purified(model, log, cost)
