"""TSBD: the two-stage backdoor defense (Lin, Liu, Zhou, Zhang, NeurIPS 2024, "Unveiling and
Mitigating Backdoor Vulnerabilities based on Unlearning Weight Changes and Backdoor Activeness";
code linweiii/TSBD; methods.md §6). GN-FT (methods.md §5) is its second stage's successor.

Stage 1, neuron weight change (NWC) and zeroing:
- unlearn a copy of the model by gradient *ascent* of L on ``tune`` (SGD, lr ``unlearn_lr``,
  momentum 0.9) until holdout accuracy ≤ ``unlearn_acc`` (at most ``unlearn_epochs`` epochs;
  ``defenses/unlearning.py``, shared with RNP);
- score every neuron (output channel) of every Conv1d/Conv2d by NWC = Σ_fan-in |w_unlearned − w|
  (a model without convolutions: every Linear but the head);
- for the top fraction n of neurons by NWC, zero the fraction m of their weights that changed
  most (one threshold over all their weights), in the original model.

Stage 2: fine-tune on ``tune`` with the gradient-norm step of GN-FT
(``defenses/two_pass.py``): g = (1 − α)·∇L(θ) + α·∇L(θ + r·∇L/‖∇L‖), norms per tensor as in the
authors' code.

The authors sweep n ∈ {0.01, …, 0.9} and read each result's test ASR. Here n is chosen on the
holdout: the largest n of that grid whose zeroed model keeps holdout accuracy within the
defense's budget (``max_acc_drop``, by default the holdout-noise rule of methods.md §0), every
n tried (``defenses/budget.py``'s ``search="every"``: no monotone curve assumed); none within
it zeroes nothing. ``fraction`` fixes n instead.

The fine-tuning recipe's fields (``epochs``, ``lr``, ``momentum``, ``weight_decay``,
``freeze_bn_stats``, ``augment``, ``distill``) are stage 2's; stage 1's unlearning has its own
(``unlearn_*``: constant-rate SGD with momentum 0.9, no augmentation, no distillation).

Defaults from the authors' code (``tsbd.py``, ``tsbd/config.yaml``): unlearning lr 1e-4 until
accuracy ≤ 10 % (at most 1,000 epochs); m = 0.7; fine-tuning SGD lr 0.01, momentum 0.9, no
weight decay, constant learning rate, 21 epochs (their ``ft_epoch + 1``), r = 0.05, α = 0.7.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from torchpurify.checks import default
from torchpurify.defenses.base import Clean, Purified, register_defense
from torchpurify.defenses.budget import largest_passing
from torchpurify.defenses.pruning import CUT_SCALE
from torchpurify.defenses.recipe import FineTuneRecipe, constant_sgd
from torchpurify.defenses.two_pass import gradient_norm_step
from torchpurify.defenses.unlearning import Unlearning, unlearn
from torchpurify.logs import TwoStageLog
from torchpurify.metrics import accuracy
from torchpurify.neurons.units import linear_head
from torchpurify.train import fit

# Where these defaults come from (methods.md, "Where each default comes from").
PAPER = "paper: TSBD's code (linweiii/TSBD tsbd.py, tsbd/config.yaml), methods.md §6.5"

FRACTIONS = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 0.9)


def scored_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Every Conv1d/Conv2d; for a model without one, every Linear except the head."""
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    if convs:
        return convs
    head = linear_head(model, example)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head]


def weight_changes(
    original: nn.Module, changed: nn.Module, layers: list[str]
) -> dict[str, torch.Tensor]:
    """|w_changed − w_original| per layer, one row per output channel (neuron)."""
    return {
        name: (changed.get_submodule(name).weight - original.get_submodule(name).weight)
        .detach()
        .abs()
        .flatten(1)
        .cpu()
        for name in layers
    }


def rank_neurons(changes: dict[str, torch.Tensor]) -> list[tuple[str, int, float]]:
    """(layer, channel, NWC) for every neuron, largest weight change first."""
    neurons = [
        (name, channel, float(score))
        for name, rows in changes.items()
        for channel, score in enumerate(rows.sum(1))
    ]
    return sorted(neurons, key=lambda neuron: -neuron[2])


def zero_changed_weights(
    model: nn.Module,
    changes: dict[str, torch.Tensor],
    neurons: list[tuple[str, int, float]],
    fraction: float,
) -> int:
    """Zero, in ``model``, the ``fraction`` of the given neurons' weights that changed most.

    One threshold over all their weights (the authors' merged list); returns how many were zeroed.
    """
    if not neurons:
        return 0
    merged = torch.cat([changes[name][channel] for name, channel, _ in neurons])
    count = int(len(merged) * fraction)
    if count == 0:
        return 0
    threshold = merged.topk(count).values.min()
    zeroed = 0
    with torch.no_grad():
        for name, channel, _ in neurons:
            weight = model.get_submodule(name).weight
            chosen = (changes[name][channel] >= threshold).to(weight.device)
            weight[channel].view(-1)[chosen] = 0.0
            zeroed += int(chosen.sum())
    return zeroed


@register_defense
@dataclass
class TwoStageDefense(FineTuneRecipe):
    name = "tsbd"
    summary = "zero the neurons clean unlearning moves most, then GN fine-tuning (Lin et al. 2024)"
    quick = {"unlearn_epochs": 3, "unlearn_lr": 0.05}

    epochs: int = default(21, PAPER)
    lr: float = default(0.01, PAPER)
    momentum: float = default(0.9, PAPER)
    weight_decay: float = default(0.0, PAPER)
    unlearn_lr: float = default(1e-4, PAPER)
    unlearn_acc: float = default(0.10, PAPER)
    unlearn_epochs: int = default(1000, PAPER)
    weight_fraction: float = default(0.7, PAPER)
    fraction: float | None = default(
        None, "protocol: n chosen on the holdout within the budget from the authors' grid "
        "(they read test ASR), methods.md §6.5"
    )  # fmt: skip
    r: float = default(0.05, PAPER)
    alpha: float = default(0.7, PAPER)
    cut_scale: float = default(1.0, CUT_SCALE)

    def validate(self) -> None:
        super().validate()
        self.require("unlearn_lr", self.unlearn_lr > 0, "positive")
        self.require("unlearn_acc", 0 <= self.unlearn_acc < 1, "in [0, 1)")
        self.require("unlearn_epochs", self.unlearn_epochs >= 1, "at least 1")
        self.require("weight_fraction", 0 < self.weight_fraction <= 1, "in (0, 1]")
        if self.fraction is not None:
            self.require("fraction", 0 < self.fraction <= 1, "in (0, 1] or null")
        self.require("r", self.r > 0, "positive")
        self.require("alpha", 0 <= self.alpha <= 1, "in [0, 1]")
        self.require("cut_scale", 0 < self.cut_scale <= 1, "in (0, 1]")

    def back_off(self) -> TwoStageDefense:
        """The guard's gentler version: half the zeroed neurons (n is chosen at the edge of the
        budget on the selection samples) and half the fine-tuning's step (its 21 epochs of
        GN-FT cost by themselves, methods.md §6.9)."""
        return replace(self, cut_scale=self.cut_scale / 2, lr=self.lr / 2)

    def unlearn(self, model: nn.Module, clean: Clean) -> tuple[nn.Module, list[dict]]:
        """A copy of ``model`` unlearnt until its holdout accuracy falls to ``unlearn_acc``
        (each epoch its own run, as the authors' code; the holdout decides after each)."""
        unlearned = copy.deepcopy(model)
        config = constant_sgd(self, self.unlearn_epochs, self.unlearn_lr, progress=False)
        recipe = Unlearning(config, self.unlearn_acc, restart=True)
        history = unlearn(
            unlearned, clean.tune, recipe, holdout=clean.holdout, description="tsbd unlearn"
        )
        return unlearned, history

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        layers = scored_layers(model, clean.tune.x[:2])
        unlearned, unlearning = self.unlearn(model, clean)
        changes = weight_changes(model, unlearned, layers)
        del unlearned
        ranked = rank_neurons(changes)
        base = accuracy(model, clean.holdout, batch_size=self.batch_size)
        threshold = base - self.budget(base, len(clean.holdout))
        curve: list[list[float]] = []

        def zeroed_accuracy(position: int) -> float:
            fraction = FRACTIONS[position]
            trial = copy.deepcopy(model)
            top = ranked[: int(len(ranked) * fraction)]
            zero_changed_weights(trial, changes, top, self.weight_fraction)
            acc = accuracy(trial, clean.holdout, batch_size=self.batch_size)
            curve.append([fraction, acc])
            return acc

        if self.fraction is not None:
            chosen = self.fraction
        else:
            # Every fraction is tried (holdout accuracy need not fall monotonically in n); the
            # largest within the budget is kept, none within it zeroes nothing.
            position = largest_passing(
                0, len(FRACTIONS) - 1, lambda p: zeroed_accuracy(p) >= threshold, search="every"
            )
            chosen = 0.0 if position is None else FRACTIONS[position]
        # The guard's back-off zeroes a share of them (cut_scale, methods.md §0).
        top = ranked[: int(len(ranked) * chosen * self.cut_scale)]
        zeroed = zero_changed_weights(model, changes, top, self.weight_fraction)
        tuned = fit(
            model,
            clean.tune,
            replace(self.train_config(), schedule="constant"),
            step=gradient_norm_step("approx", self.r, self.alpha, per_tensor=True),
            description=self.name,
        )
        log = TwoStageLog(
            layers=layers, unlearning=unlearning, holdout_acc_before=base, threshold=threshold,
            curve=curve, fraction=chosen, cut_scale=self.cut_scale, neurons=len(ranked),
            zeroed_neurons=[[name, channel] for name, channel, _ in top],
            nwc_top=[list(neuron) for neuron in ranked[: len(top) + 20]],
            zeroed_weights=zeroed, history=tuned.history,
        )  # fmt: skip
        return Purified(model, log.to_dict())
