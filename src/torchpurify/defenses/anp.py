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
(LeNet-5, the LSTM) has the output channels of its hidden Conv/Linear layers instead.

Pruning: the neurons whose mask value is at or below a threshold t are masked with the
persistent neuron masks (the whole channel; see :class:`NeuronGates` for why the mask scales
the bias too). The reference sweeps t = 0, 0.05, …, 0.9 and reads the result off the *test*
set; here t is the largest value of that grid (up to ``pruning_max``) whose pruned model keeps
the defender's holdout accuracy within the defense's budget (``max_acc_drop``; by default the
noise rule of methods.md §0), found by binary search since holdout accuracy falls close to
monotonically in t — or the fixed ``threshold`` when one is given.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.checks import default
from torchpurify.data.base import Split
from torchpurify.defenses.base import Clean, Defense, Purified, register_defense
from torchpurify.defenses.clp import NORMS, Unit, weighted_units
from torchpurify.defenses.pruning import CUT_SCALE, largest_passing, scaled_count, smaller_cut
from torchpurify.errors import check
from torchpurify.metrics import accuracy
from torchpurify.neurons import list_layers, mask_channels, masked_layers, unmask
from torchpurify.train import Cost, TrainConfig, fit

# Where these defaults come from (methods.md, "Where each default comes from").
PAPER = "paper: ANP's code (csdongxian/ANP_backdoor optimize_mask_cifar.py), methods.md §6.6"


def mask_neurons(model: nn.Module, example: torch.Tensor) -> list[tuple[str, int]]:
    """``[(module, channels)]``: the neurons ANP and RNP put masks on (see the docstring)."""
    infos = list_layers(model, example)
    leaves = [i for i in infos if next(model.get_submodule(i.name).children(), None) is None]
    units: list[Unit] = weighted_units(model, example, (nn.Conv1d, nn.Conv2d, nn.Linear))
    first = next(
        (
            position
            for position, info in enumerate(leaves)
            if isinstance(model.get_submodule(info.name), (nn.Conv1d, nn.Conv2d, nn.Linear))
        ),
        len(leaves),
    )
    norms = [
        (info.name, info.channels)
        for info in leaves[first:]
        if isinstance(model.get_submodule(info.name), NORMS) and info.channels
    ]
    neurons = norms or [(unit.layer, unit.channels) for unit in units]
    check(bool(neurons), "found no BatchNorm, Conv or hidden Linear layer to put neuron masks on")
    return neurons


class NeuronGates(nn.Module):
    """Masks (trainable) and perturbations (set by the caller) on the chosen modules' outputs.

    A forward hook turns a module's output ``y = w·x + b`` into ``m·y + δ·(y − b) + ξ·b``
    (δ = ξ = 0 unless ``perturbed``): weights ``(m + δ)·w`` and bias ``(m + ξ)·b``, for a
    BatchNorm, a Conv or a Linear alike. The mask scales the whole channel, so m = 0 is exactly
    what the persistent neuron mask that prunes it does. (The references scale only the
    BatchNorm weight, ``(m + δ)·γ`` and ``(1 + ξ)·β``, and prune by zeroing γ, which leaves β
    as a constant output: masks learned that way do not describe the pruned model here.)
    """

    def __init__(self, model: nn.Module, neurons: list[tuple[str, int]]) -> None:
        super().__init__()
        self.names = [name for name, _ in neurons]
        self.masks = nn.ParameterList([nn.Parameter(torch.ones(c)) for _, c in neurons])
        self.weight_noise = nn.ParameterList(
            [nn.Parameter(torch.zeros(c), requires_grad=False) for _, c in neurons]
        )
        self.bias_noise = nn.ParameterList(
            [nn.Parameter(torch.zeros(c), requires_grad=False) for _, c in neurons]
        )
        self.perturbed = False
        self.handles = [
            model.get_submodule(name).register_forward_hook(partial(self._gate, i))
            for i, name in enumerate(self.names)
        ]

    def _gate(self, i: int, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (out.dim() - 2)
        gated = out * self.masks[i].view(shape)
        if not self.perturbed:
            return gated
        bias = getattr(module, "bias", None)
        bias = bias.view(shape) if isinstance(bias, torch.Tensor) else torch.zeros_like(gated)
        weight_noise = self.weight_noise[i].view(shape)
        return gated + weight_noise * (out - bias) + self.bias_noise[i].view(shape) * bias

    def noise(self) -> list[nn.Parameter]:
        return [*self.weight_noise, *self.bias_noise]

    def clamp_masks(self) -> None:
        with torch.no_grad():
            for mask in self.masks:
                mask.clamp_(0, 1)

    def values(self) -> dict[str, torch.Tensor]:
        return {n: m.detach().cpu().clone() for n, m in zip(self.names, self.masks, strict=True)}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Gated(nn.Module):
    """A frozen network with gates: what :func:`~torchpurify.train.fit` trains (the gates)."""

    def __init__(self, net: nn.Module, gates: NeuronGates) -> None:
        super().__init__()
        self.net, self.gates = net, gates
        self.channels_last = getattr(net, "channels_last", True)
        for p in net.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mask_recipe(defense: Defense, epochs: int, lr: float) -> TrainConfig:
    """SGD with momentum 0.9 at a constant rate and no weight decay: the mask optimiser of
    both reference implementations. BatchNorm in training mode, as there."""
    return TrainConfig(
        epochs=epochs,
        batch_size=defense.batch_size,
        lr=lr,
        momentum=0.9,
        weight_decay=0.0,
        schedule="constant",
        seed=defense.seed,
        device=defense.device,
        progress=defense.progress,
    )


def epochs_for(iterations: int, samples: int, batch_size: int) -> int:
    """Epochs of ``samples`` covering at least ``iterations`` batches (whole batches only)."""
    return max(1, math.ceil(iterations / max(1, samples // batch_size)))


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
) -> dict[str, Any]:
    """Mask every neuron whose learned mask value is ≤ the chosen threshold (see docstring);
    with ``cut_scale`` < 1 (the guard's back-off, methods.md §0) only that share of them, those
    with the smallest mask values."""
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
        chosen = largest_passing(0, len(grid), lambda p: holdout_accuracy(p) >= floor)
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
    log = {
        "threshold": grid[chosen - 1] if chosen else None,
        "holdout_acc_before": base,
        "holdout_acc_pruned": after,
        "floor": floor,
        "pruned": pruned,
        "num_pruned": sum(len(v) for v in pruned.values()),
        "num_within_budget": within,
        "cut_scale": cut_scale,
        "neurons": sum(len(v) for v in values.values()),
        "curve": [[grid[p - 1] if p else None, curve[p]] for p in sorted(curve)],
        "mask_values": {k: [round(float(x), 4) for x in v] for k, v in values.items()},
    }
    return log


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
    ) -> dict[str, Any]:
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
            mask_recipe(self, epochs, self.mask_lr),
            step=self.step,
            description=self.name,
        )
        gates.remove()
        log = self.prune(model, gates.values(), clean.holdout)
        log["history"] = result.history
        return Purified(model, log)

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
