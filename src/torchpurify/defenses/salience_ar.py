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
from torchpurify.train import fit


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
        salience = BenignSalience(layers, decay=self.eta).warm_up(
            model, clean.tune, self.batch_size
        )
        selected: dict[str, torch.Tensor] = {}
        ratios: list[float] = []

        def select(epoch: int) -> None:
            ratio = self.beta + (1 - self.beta) * epoch / self.epochs
            ratios.append(ratio)
            for name in layers:
                scores = salience.weight_salience(name).flatten()
                k = round(ratio * scores.numel())
                chosen = scores.argsort(descending=self.target == "high")[:k]
                mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
                mask[chosen] = True
                selected[name] = mask.view_as(modules[name].weight)

        def step(model, x, y, optimizer, cost):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            cost.forward += 1
            cost.backward += 1
            salience.update(model)  # the clean loss's gradient, before the penalty is added
            with torch.no_grad():
                for name in layers:
                    weight = modules[name].weight
                    mask = selected[name].to(weight.device)
                    weight.grad += mask * adaptive_penalty_grad(weight, self.alpha)
            optimizer.step()
            return loss.detach()

        select(0)
        result = fit(
            model,
            clean.tune,
            self.train_config(),
            step=step,
            on_epoch=lambda record: (
                select(record["epoch"]) if record["epoch"] < self.epochs else None
            ),
            description=self.name,
        )
        log = {
            "layers": layers,
            "ratios": ratios,
            "neuron_salience": {name: salience.neuron_salience(name).tolist() for name in layers},
            "history": result.history,
        }
        result.cost.backward += -(-len(clean.tune) // self.batch_size)  # the warm-up pass
        result.cost.forward += -(-len(clean.tune) // self.batch_size)
        return Purified(model, log, result.cost)
