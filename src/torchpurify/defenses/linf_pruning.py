"""ℓ∞-based neuron pruning (Cheng, Xu, Liu, Chen, Zhao, Lin 2019; methods.md §3).

A backdoor biases the peak (ℓ∞) of activation maps more than their ℓ1 or ℓ2 norm. With a trigger
reverse-engineered from the model (``trigger="inverted"``, realistic) or the attack's own
(``trigger="known"``, an oracle), channels are ranked by ``mean_x max A(x_triggered) − mean_x
max A(x_clean)`` on the holdout and pruned, highest first, until that trigger stops working on
the holdout or holdout accuracy would fall more than ``max_acc_drop``.

An inverted trigger is only an approximation of the real one: once it stops working, the
target label's trigger is inverted again on the pruned model, and while that new trigger is
still an anomalously small mask (anomaly index > 2 against the other labels' first-round
norms), its ℓ∞ bias ranks the remaining channels for another round (at most ``rounds``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchpurify.defenses.base import Clean, Purified, register_defense
from torchpurify.defenses.pruning import (
    HoldoutProbe,
    fine_tune_within_budget,
    largest_passing,
    prune_first,
)
from torchpurify.defenses.recipe import FineTuneRecipe
from torchpurify.errors import UserError
from torchpurify.metrics import accuracy, predict
from torchpurify.neurons import (
    activation_stats,
    anomaly_index,
    default_neuron_layer,
    invert_triggers,
)
from torchpurify.neurons.inversion import value_range_of
from torchpurify.train import Cost


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
    # When fine_tune is on: train-mode BatchNorm revives pruned backdoors (methods.md §11.1).
    freeze_bn_stats: bool = True
    epochs: int = 10
    inversion_steps: int = 300
    rounds: int = 3

    def validate(self) -> None:
        super().validate()
        self.require("trigger", self.trigger in ("inverted", "known"), "inverted or known")
        self.require("max_acc_drop", 0 <= self.max_acc_drop < 1, "in [0, 1)")
        self.require("stop_asr", 0 < self.stop_asr <= 1, "in (0, 1]")
        self.require("inversion_steps", self.inversion_steps >= 1, "at least 1")
        self.require("rounds", self.rounds >= 1, "at least 1")

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
            return trigger, target, None
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
        return inversion.trigger(target), target, inversion

    def _prune_round(self, model, layer, holdout, trigger, target, pruned, threshold, cost):
        """Rank the unpruned channels by ℓ∞ bias under ``trigger`` and prune more of them: the
        fewest that stop the trigger, within the accuracy budget. Returns the pruned channels
        and the round's record."""
        stats_clean = activation_stats(model, layer, holdout, batch_size=self.batch_size)
        stats_triggered = activation_stats(
            model, layer, holdout, transform=trigger, batch_size=self.batch_size
        )
        scores = stats_triggered.linf - stats_clean.linf
        done = set(pruned.tolist())
        ranked = [c for c in scores.argsort(descending=True).tolist() if c not in done]
        order = torch.cat([pruned, torch.tensor(ranked, dtype=torch.long)])
        probe = HoldoutProbe(model, layer, order, holdout, self.batch_size)
        others = holdout.y != target
        success: dict[int, float] = {}

        def trigger_success(k: int) -> float:
            if k not in success:
                guesses = probe.predictions(k, trigger)
                success[k] = float((guesses[others] == target).float().mean())
            return success[k]

        start, last = len(pruned), len(order) - 1
        allowed = largest_passing(start, last, lambda k: probe.accuracy(k) >= threshold)
        cut = allowed
        if trigger_success(allowed) < self.stop_asr:
            cut = largest_passing(start, allowed, lambda k: trigger_success(k) >= self.stop_asr)
            cut = min(cut + 1, allowed)
        prune_first(model, layer, order, cut)
        cost.forward += (len(probe.curve) + len(success) + 2) * probe.batches_per_pass
        record = {
            "scores": {
                "linf": scores.tolist(),
                "l1": (stats_triggered.l1 - stats_clean.l1).tolist(),
                "l2": (stats_triggered.l2 - stats_clean.l2).tolist(),
            },
            "num_pruned": cut,
            "budget_exhausted": cut == allowed and trigger_success(allowed) >= self.stop_asr,
            "curve": probe.sorted_curve(),
            "trigger_success_curve": [[k, success[k]] for k in sorted(success)],
        }
        return order[:cut], record

    def _reinvert(self, model, holdout, inversion, target, record):
        """A fresh trigger for ``target`` if the pruned model still has an anomalously small one."""
        again = invert_triggers(
            model, holdout, labels=[target], steps=self.inversion_steps, seed=self.seed,
            value_range=value_range_of(holdout.x),
        )  # fmt: skip
        norms = inversion.mask_norms.clone()
        position = inversion.labels.index(target)
        norms[position] = again.mask_norms[0]
        record["reinverted_anomaly_index"] = float(anomaly_index(norms)[position])
        record["reinverted_success"] = float(again.success[0])
        if record["reinverted_anomaly_index"] <= 2 or record["reinverted_success"] < 0.5:
            return None
        return again.trigger(target)

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        log: dict = {"rounds": []}
        trigger, target, inversion = self._trigger(model, clean, log)
        layer = self.layer or default_neuron_layer(model, clean.holdout.x[:2])
        cost = Cost()
        holdout_acc = accuracy(model, clean.holdout, batch_size=self.batch_size)
        threshold = holdout_acc - self.max_acc_drop
        pruned = torch.empty(0, dtype=torch.long)
        rounds = self.rounds if inversion is not None else 1  # a known trigger does not change
        for round_index in range(rounds):
            pruned, record = self._prune_round(
                model, layer, clean.holdout, trigger, target, pruned, threshold, cost
            )
            log["rounds"].append(record)
            if record["budget_exhausted"] or round_index == rounds - 1:
                break
            trigger = self._reinvert(model, clean.holdout, inversion, target, record)
            if trigger is None:
                break
        log.update(
            layer=layer,
            holdout_acc_before=holdout_acc,
            threshold=threshold,
            pruned=pruned.tolist(),
            num_pruned=len(pruned),
        )
        if self.fine_tune:
            tuned_cost, tuned_log = fine_tune_within_budget(
                model, clean.tune, clean.holdout, self.train_config(), threshold, self.name
            )
            cost.add(tuned_cost)
            log.update(tuned_log)
        return Purified(model, log, cost)
