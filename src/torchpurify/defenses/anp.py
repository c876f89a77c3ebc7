"""ANP: adversarial neuron perturbation, then pruning by the learned masks (Wu & Wang,
NeurIPS 2021; methods.md §6).

Every neuron k gets a mask m_k ∈ [0, 1] and relative perturbations δ_k, ξ_k of its weight and
bias: a neuron computing ``w_k·x + b_k`` computes ``(m_k + δ_k)·w_k·x + (m_k + ξ_k)·b_k``.
On the defender's clean ``tune`` data the masks solve

    min_m  α·L(m, 0, 0) + (1 − α)·max_{‖δ‖∞, ‖ξ‖∞ ≤ ε} L(m, δ, ξ)

with one signed-gradient ascent step on (δ, ξ) from a uniform random start per batch (then
clipped to the ε-ball, the paper's constraint), then one SGD step on m, clipped to [0, 1].
Neurons whose backdoor is easy to wake up by a small perturbation end with small masks.
Defaults are the paper's: ε = 0.4, α = 0.2, one step, mask learning rate 0.2 with momentum 0.9,
2000 iterations of batch 128.

The neurons are those the reference perturbs, its BatchNorm layers — here every BatchNorm that
runs after the first weighted layer (not an input normalisation); a model without BatchNorm
(LeNet-5, the LSTM) has the output channels of its hidden Conv/Linear layers instead
(:func:`~torchpurify.neurons.units.mask_neurons`).

Pruning: the neurons whose mask value is at or below a threshold t are masked with the
persistent neuron masks (the whole channel; see :class:`~torchpurify.neurons.gates.NeuronGates`
for why the mask scales the bias too). The reference sweeps t = 0, 0.05, …, 0.9 and reads the
result off the *test* set; here t is the largest value of that grid (up to ``pruning_max``)
whose pruned model keeps the defender's holdout accuracy within the defense's budget
(``max_acc_drop``; by default the noise rule of methods.md §0), found by binary search since
holdout accuracy falls close to monotonically in t — or the fixed ``threshold`` when one is
given (:mod:`~torchpurify.defenses.mask_pruning`, which RNP shares).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.checks import default
from torchpurify.defenses.base import Clean, Purified, register_defense
from torchpurify.defenses.mask_pruning import MaskPruning
from torchpurify.defenses.recipe import constant_sgd
from torchpurify.neurons.gates import Gated, NeuronGates
from torchpurify.neurons.units import mask_neurons
from torchpurify.train import Cost, fit

# Where these defaults come from (methods.md, "Where each default comes from").
PAPER = "paper: ANP's code (csdongxian/ANP_backdoor optimize_mask_cifar.py), methods.md §6.6"


def epochs_for(iterations: int, samples: int, batch_size: int) -> int:
    """Epochs of ``samples`` covering at least ``iterations`` batches (whole batches only)."""
    return max(1, math.ceil(iterations / max(1, samples // batch_size)))


@register_defense
@dataclass
class AdversarialNeuronPruning(MaskPruning):
    name = "anp"
    summary = "prune neurons sensitive to adversarial neuron perturbation (Wu & Wang 2021)"

    eps: float = default(0.4, PAPER)
    steps: int = default(1, PAPER)
    alpha: float = default(0.2, PAPER)
    mask_lr: float = default(0.2, PAPER)
    iterations: int = default(2000, PAPER)

    quick = {"iterations": 12}

    def validate(self) -> None:
        super().validate()
        self.require("eps", 0 <= self.eps < 1, "in [0, 1)")
        self.require("steps", self.steps >= 1, "at least 1")
        self.require("alpha", 0 <= self.alpha <= 1, "in [0, 1]")
        self.require("mask_lr", self.mask_lr > 0, "positive")
        self.require("iterations", self.iterations >= 1, "at least 1")

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        working = copy.deepcopy(model)
        gates = NeuronGates(working, mask_neurons(working, clean.holdout.x[:2]))
        epochs = epochs_for(self.iterations, len(clean.tune), self.batch_size)
        result = fit(
            Gated(working, gates),
            clean.tune,
            constant_sgd(self, epochs, self.mask_lr),
            step=self.step,
            description=self.name,
        )
        gates.remove()
        log = self.prune(model, gates.values(), clean.holdout)
        log.history = result.history
        return Purified(model, log.to_dict())

    def step(self, gated: Gated, x, y, optimizer, cost: Cost) -> torch.Tensor:
        """One ANP iteration: perturb the neurons adversarially, then step the masks."""
        gates = gated.gates
        if self.eps > 0:
            noise = gates.noise()
            with torch.no_grad():
                for n in noise:
                    n.uniform_(-self.eps, self.eps)
            gates.perturbed = True
            for _ in range(self.steps):
                for n in noise:
                    n.requires_grad_(True)
                loss = F.cross_entropy(gated(x), y)
                grads = torch.autograd.grad(loss, noise)
                with torch.no_grad():
                    for n, g in zip(noise, grads, strict=True):
                        n.requires_grad_(False)
                        n.add_(self.eps / self.steps * g.sign()).clamp_(-self.eps, self.eps)
        optimizer.zero_grad(set_to_none=True)
        robust = torch.zeros((), device=x.device)
        if self.eps > 0:
            robust = F.cross_entropy(gated(x), y)
        gates.perturbed = False
        natural = F.cross_entropy(gated(x), y)
        loss = self.alpha * natural + (1 - self.alpha) * robust
        loss.backward()
        optimizer.step()
        gates.clamp_masks()
        return loss.detach()
