"""RNP: reconstructive neuron pruning (Li, Lyu, Ma, Koren, Lyu, Li, Jiang, ICML 2023;
methods.md §6.8).

1. **Unlearn** (:mod:`~torchpurify.defenses.unlearning`, shared with TSBD): on a copy of the
   model, gradient *ascent* on the clean ``tune`` data, ``θ ← θ + η·∇θ L(θ)`` (SGD, lr 0.01,
   momentum 0.9, weight decay 5e-4, gradients clipped to norm 20, the rate divided by 10 after
   epochs 10 and 20), until the accuracy falls to ``clean_threshold`` (0.2) or after
   ``unlearning_epochs`` (20). The reference checks the epoch's running accuracy once an epoch;
   here it is checked on every batch (before that batch's step), so unlearning stops at its
   target instead of up to an epoch past it: a model unlearned far past it has so large a loss
   that the best the recovery can do is to switch a layer off (constant outputs, loss ln K).
   Clean features are destroyed first; the backdoor, which clean data never exercised, survives.
2. **Recover**: freeze the unlearned weights and learn one mask m_k ∈ [0, 1] per neuron of ANP's
   neurons (:func:`~torchpurify.neurons.units.mask_neurons`: the BatchNorm layers, or the hidden
   Conv/Linear units of a model without one) by *minimising* ``α·L`` on ``tune`` (α = 0.2, SGD lr
   0.2, momentum 0.9, 20 epochs, clipped to [0, 1]). As in the reference the mask scales the
   BatchNorm weight γ only, β stays (:class:`WeightGates`; a Conv/Linear unit: its weights, not its
   bias). The last of those layers is left out when switching it off leaves the model's outputs the
   same for every input (:func:`switches_off`): the reference's ResNet-18 has a residual path
   around its last BatchNorm, small-cnn, kws-cnn, res8 and PreAct-ResNet18 (whose final BatchNorm
   the reference's PreAct lacks) have none. Restoring clean accuracy needs the clean neurons; the
   backdoor neurons, which unlearning left intact and which hurt clean accuracy, end with small
   masks.
3. **Prune** the *original* model's neurons with mask values at or below a threshold: chosen on the
   holdout as in ANP (:mod:`~torchpurify.defenses.mask_pruning`; the reference sweeps it against
   the test set). Pruning masks the whole channel (the persistent neuron mask; the reference zeroes
   γ and keeps β): the threshold is chosen on the model actually pruned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.checks import default
from torchpurify.data.base import Split
from torchpurify.defenses.base import Clean, Purified, register_defense
from torchpurify.defenses.mask_pruning import MaskPruning
from torchpurify.defenses.recipe import constant_sgd
from torchpurify.defenses.unlearning import Unlearning, unlearn
from torchpurify.neurons.gates import Gated, NeuronGates
from torchpurify.neurons.units import mask_neurons
from torchpurify.train import fit

# Where these defaults come from (methods.md, "Where each default comes from").
PAPER = "paper: RNP's code (bboylyg/RNP main.py), methods.md §6.8"

MILESTONES = (10, 20)


class WeightGates(NeuronGates):
    """RNP's masks: ``m·(y − b) + b`` on a module's output ``y`` with bias (BatchNorm β) ``b``,
    i.e. the mask scales the weights (γ) and leaves the bias, as the reference's
    ``MaskBatchNorm2d`` (``weight * neuron_mask``, ``bias * 1``). A module without a bias
    (``affine=False`` BatchNorm, a bias-free conv) has its whole output scaled."""

    def _gate(self, i: int, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (out.dim() - 2)
        mask = self.masks[i].view(shape)
        bias = getattr(module, "bias", None)
        if not isinstance(bias, torch.Tensor):
            return out * mask
        bias = bias.view(shape)
        return mask * (out - bias) + bias


def switches_off(model: nn.Module, neurons: tuple[str, int], x: torch.Tensor) -> bool:
    """True when every mask of the layer at 0 makes ``model``'s outputs on ``x`` (a few
    inputs, evaluation mode) the same for every input: no path bypasses the layer."""
    gates = WeightGates(model, [neurons])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            gates.masks[0].zero_()
            out = model(x.to(next(model.parameters()).device))
    finally:
        gates.remove()
        model.train(was_training)
    spread = float((out - out[:1]).abs().max())
    return spread <= 1e-5 * (1 + float(out.abs().max()))


@register_defense
@dataclass
class ReconstructiveNeuronPruning(MaskPruning):
    name = "rnp"
    summary = "unlearn on clean data, recover neuron masks, prune the original (Li et al. 2023)"

    unlearning_lr: float = default(0.01, PAPER)
    unlearning_epochs: int = default(20, PAPER)
    clean_threshold: float = default(0.2, PAPER)
    recovering_lr: float = default(0.2, PAPER)
    recovering_epochs: int = default(20, PAPER)
    alpha: float = default(0.2, PAPER)

    def validate(self) -> None:
        super().validate()
        self.require("unlearning_lr", self.unlearning_lr > 0, "positive")
        self.require("unlearning_epochs", self.unlearning_epochs >= 1, "at least 1")
        self.require("clean_threshold", 0 <= self.clean_threshold <= 1, "in [0, 1]")
        self.require("recovering_lr", self.recovering_lr > 0, "positive")
        self.require("recovering_epochs", self.recovering_epochs >= 1, "at least 1")
        self.require("alpha", self.alpha > 0, "positive")

    quick = {"unlearning_epochs": 2, "recovering_epochs": 2}

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        working = copy.deepcopy(model)
        unlearning = self.unlearn(working, clean.tune)
        neurons = mask_neurons(working, clean.holdout.x[:2])
        left_out = None
        if len(neurons) > 1 and switches_off(working, neurons[-1], clean.holdout.x[:8]):
            left_out = neurons.pop()[0]
        gates = WeightGates(working, neurons)

        def recovery_step(gated, x, y, optimizer, cost):
            optimizer.zero_grad(set_to_none=True)
            loss = self.alpha * F.cross_entropy(gated(x), y)
            loss.backward()
            optimizer.step()
            gated.gates.clamp_masks()
            return loss.detach()

        recovered = fit(
            Gated(working, gates),
            clean.tune,
            constant_sgd(self, self.recovering_epochs, self.recovering_lr),
            step=recovery_step,
            description=f"{self.name} recover",
        )
        gates.remove()
        log = self.prune(model, gates.values(), clean.holdout)
        log.unlearning = unlearning
        log.recovering = recovered.history
        log.left_out = left_out
        log.zeroed_layers = [n for n, v in gates.values().items() if bool((v == 0).all())]
        return Purified(model, log.to_dict())

    def unlearn(self, model: nn.Module, tune: Split) -> list[dict]:
        """Gradient ascent on ``tune`` until the accuracy on a batch, measured before its step,
        is at most the threshold (then no further step), or ``unlearning_epochs`` have run."""
        config = constant_sgd(self, self.unlearning_epochs, self.unlearning_lr, weight_decay=5e-4)
        recipe = Unlearning(config, self.clean_threshold, clip=20, milestones=MILESTONES)
        return unlearn(model, tune, recipe, description="rnp unlearn")
