"""Benign salience + Adaptive Regularization (Fan, Liu, Chen, Liu, Guo 2022; methods.md §4).

Benign salience ranks weights by how much the clean loss needs them (an EMA of −g ⊙ w). During
fine-tuning on ``tune`` the weights at the infected end of that ranking (``target="low"``: least
needed) are pushed to zero by the adaptive penalty ``α·|w|`` (|w| ≤ 1) / ``α·exp(|w| − 1)``
(|w| > 1), on a fraction of each purified layer that grows from β to 1 over the epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.defenses.base import Clean, Purified, register_defense
from torchpurify.defenses.recipe import FineTuneRecipe
from torchpurify.errors import check
from torchpurify.neurons import BenignSalience, default_neuron_layer, list_layers, producer_of
from torchpurify.train import Trainer


def adaptive_penalty_grad(w: torch.Tensor, alpha: float) -> torch.Tensor:
    """d/dw of the AR penalty: α·sign(w) inside [−1, 1], α·sign(w)·exp(|w| − 1) outside."""
    magnitude = w.abs()
    return alpha * torch.sign(w) * torch.where(magnitude > 1, torch.exp(magnitude - 1), 1.0)


def adaptive_penalty(w: torch.Tensor, alpha: float) -> torch.Tensor:
    magnitude = w.abs()
    return alpha * torch.where(magnitude > 1, torch.exp(magnitude - 1), magnitude).sum()


@register_defense
@dataclass
class SalienceAR(FineTuneRecipe):
    name = "salience-ar"
    summary = "benign salience finds infected weights, adaptive regularisation purifies (Fan 2022)"

    epochs: int = 10
    target: str = "low"
    # α and lr chosen by the calibration runs of methods.md §11.1 (the paper's α = 0.01 leaves
    # BadNets at ASR 0.99 at our scale).
    alpha: float = 0.1
    lr: float = 0.02
    beta: float = 0.5
    eta: float = 0.9
    layers: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        self.require("target", self.target in ("low", "high"), "low or high")
        self.require("alpha", self.alpha >= 0, "≥ 0")
        self.require("beta", 0 <= self.beta <= 1, "in [0, 1]")
        self.require("eta", 0 <= self.eta < 1, "in [0, 1)")
        self.require(
            "layers",
            self.layers is None or (isinstance(self.layers, list) and len(self.layers) > 0),
            "a non-empty list of module names",
        )

    def default_layers(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        """The module producing the neuron layer's channels, and the final linear layer."""
        producer = producer_of(model, default_neuron_layer(model, example), example)
        linears = [info.name for info in list_layers(model, example) if info.type == "Linear"]
        return list(dict.fromkeys([producer, *linears[-1:]]))

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        layers = self.layers or self.default_layers(model, clean.holdout.x[:2])
        modules = dict(model.named_modules())
        for name in layers:
            check(
                name in modules
                and isinstance(getattr(modules[name], "weight", None), torch.Tensor),
                f"salience-ar: layer {name!r} is not a module with weights",
            )
        weights = {name: modules[name].weight for name in layers}
        salience = BenignSalience(layers, decay=self.eta).warm_up(
            model, clean.tune, self.batch_size
        )
        step = AdaptiveRegularisedStep(salience, weights, self.alpha)
        ratios = []
        config = self.train_config()
        with Trainer(model, clean.tune, config, step=step, description=self.name) as trainer:
            for epoch in range(self.epochs):
                # The schedule: AR acts on a share of each layer's weights that grows from β to
                # 1, the least salient first (target="low"), ranked by the salience so far.
                ratio = self.beta + (1 - self.beta) * epoch / self.epochs
                step.selected = {
                    name: self.infected(salience.weight_salience(name), ratio) for name in layers
                }
                trainer.epoch()
                ratios.append(ratio)
        log = {
            "layers": layers,
            "ratios": ratios,
            "neuron_salience": {name: salience.neuron_salience(name).tolist() for name in layers},
            "history": trainer.result.history,
        }
        return Purified(model, log)

    def infected(self, scores: torch.Tensor, ratio: float) -> torch.Tensor:
        """A mask (shaped like ``scores``) of the ``ratio`` share of weights at the infected end of
        the salience ranking: the least salient for ``target="low"``, the most for ``"high"``."""
        flat = scores.flatten()
        chosen = flat.argsort(descending=self.target == "high")[: round(ratio * flat.numel())]
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        mask[chosen] = True
        return mask.view_as(scores)


class AdaptiveRegularisedStep:
    """One update: the clean loss's gradient (which also updates benign salience), plus the AR
    penalty's gradient on the weights in :attr:`selected` (a mask per layer, set each epoch)."""

    def __init__(
        self, salience: BenignSalience, weights: dict[str, torch.Tensor], alpha: float
    ) -> None:
        self.salience, self.weights, self.alpha = salience, weights, alpha
        self.selected: dict[str, torch.Tensor] = {}

    def __call__(self, model, x, y, optimizer, cost) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        self.salience.update(model)  # the clean loss's gradient, before the penalty is added
        with torch.no_grad():
            for name, weight in self.weights.items():
                mask = self.selected[name].to(weight.device)
                weight.grad += mask * adaptive_penalty_grad(weight, self.alpha)
        optimizer.step()
        return loss.detach()
