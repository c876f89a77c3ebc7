"""ℓ∞-based neuron pruning (Cheng, Xu, Liu, Chen, Zhao, Lin 2019; methods.md §3).

A backdoor biases the peak (ℓ∞) of activation maps more than their ℓ1 or ℓ2 norm. With a trigger
reverse-engineered from the model (``trigger="inverted"``, realistic) or the attack's own
(``trigger="known"``, an oracle), channels are ranked by ``mean_x max A(x_triggered) − mean_x
max A(x_clean)`` on the holdout and pruned, highest first, until that trigger stops working on
the holdout or holdout accuracy would fall more than ``max_acc_drop``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchpurify.defenses.base import Clean, Purified, register_defense
from torchpurify.defenses.gnft import FineTuneRecipe
from torchpurify.defenses.pruning import HoldoutProbe, largest_passing, prune_first
from torchpurify.errors import UserError
from torchpurify.metrics import predict
from torchpurify.neurons import activation_stats, default_neuron_layer, invert_triggers
from torchpurify.neurons.inversion import value_range_of
from torchpurify.train import Cost, fit


@register_defense
@dataclass
class LinfPruning(FineTuneRecipe):
    name = "linf-pruning"
    summary = (
        "prune channels whose activation peak the (inverted) trigger raises (Cheng et al. 2019)"
    )

    trigger: str = "inverted"
    layer: str | None = None
    max_acc_drop: float = 0.04
    stop_asr: float = 0.1
    fine_tune: bool = False
    epochs: int = 10
    inversion_steps: int = 300

    def validate(self) -> None:
        super().validate()
        self.require("trigger", self.trigger in ("inverted", "known"), "inverted or known")
        self.require("max_acc_drop", 0 <= self.max_acc_drop < 1, "in [0, 1)")
        self.require("stop_asr", 0 < self.stop_asr <= 1, "in (0, 1]")
        self.require("inversion_steps", self.inversion_steps >= 1, "at least 1")

    @property
    def uses_known_trigger(self) -> bool:
        return self.trigger == "known"

    def _trigger(self, model: nn.Module, clean: Clean, log: dict):
        """The trigger to inspect with, and the label it is taken to aim at."""
        if self.trigger == "known":
            if clean.known_trigger is None:
                raise UserError("linf-pruning with trigger=known needs the attack's trigger")
            trigger = clean.known_trigger
            # The label the trigger drives the unpruned model to (the card's target is not read).
            guesses = predict(model, clean.holdout.x, transform=trigger, batch_size=self.batch_size)
            target = int(torch.mode(guesses).values)
            log["trigger"] = {"kind": "known (oracle)", "target": target}
            return trigger, target
        inversion = invert_triggers(
            model, clean.holdout, steps=self.inversion_steps, seed=self.seed,
            value_range=value_range_of(clean.holdout.x), progress=self.progress,
        )  # fmt: skip
        target = inversion.target
        if target is None:  # no outlier: take the most anomalous label all the same
            target = inversion.labels[int(inversion.anomaly_index.argmax())]
        log["trigger"] = {
            "kind": "inverted",
            "target": target,
            "outlier_found": inversion.target is not None,
            "anomaly_index": inversion.anomaly_index.tolist(),
        }
        return inversion.trigger(target), target

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        log: dict = {}
        trigger, target = self._trigger(model, clean, log)
        layer = self.layer or default_neuron_layer(model, clean.holdout.x[:2])
        stats_clean = activation_stats(model, layer, clean.holdout, batch_size=self.batch_size)
        stats_triggered = activation_stats(
            model, layer, clean.holdout, transform=trigger, batch_size=self.batch_size
        )
        scores = stats_triggered.linf - stats_clean.linf
        order = scores.argsort(descending=True)
        probe = HoldoutProbe(model, layer, order, clean.holdout, self.batch_size)
        others = clean.holdout.y != target
        success_curve: dict[int, float] = {}

        def trigger_success(k: int) -> float:
            if k not in success_curve:
                guesses = probe.predictions(k, trigger)
                success_curve[k] = float((guesses[others] == target).float().mean())
            return success_curve[k]

        threshold = probe.accuracy(0) - self.max_acc_drop
        last = len(order) - 1
        # Most channels accuracy allows; then the fewest among those that stop the trigger.
        allowed = largest_passing(0, last, lambda k: probe.accuracy(k) >= threshold)
        if trigger_success(allowed) < self.stop_asr:
            cut = largest_passing(0, allowed, lambda k: trigger_success(k) >= self.stop_asr)
            cut = min(cut + 1, allowed)
        else:
            cut = allowed
        prune_first(model, layer, order, cut)
        log.update(
            layer=layer,
            channels=len(order),
            scores={
                "linf": scores.tolist(),
                "l1": (stats_triggered.l1 - stats_clean.l1).tolist(),
                "l2": (stats_triggered.l2 - stats_clean.l2).tolist(),
            },
            pruned=order[:cut].tolist(),
            num_pruned=cut,
            holdout_acc_before=probe.curve[0],
            threshold=threshold,
            curve=probe.sorted_curve(),
            trigger_success_curve=[[k, success_curve[k]] for k in sorted(success_curve)],
        )
        passes = len(probe.curve) + len(success_curve) + 2
        cost = Cost(forward=passes * probe.batches_per_pass)
        if self.fine_tune:
            result = fit(model, clean.tune, self.train_config(), description=self.name)
            cost.add(result.cost)
            log["history"] = result.history
        return Purified(model, log, cost)
