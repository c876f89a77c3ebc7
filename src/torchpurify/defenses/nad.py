"""NAD: neural attention distillation (Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention
Distillation: Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021; methods.md §6).

1. Teacher: a copy of the backdoored model fine-tuned on ``tune`` for ``teacher_epochs``.
2. Student: the backdoored model, fine-tuned on ``tune`` with

       L_CE(student) + β · Σ_layers ‖ a(F_s) − a(F_t) ‖²  (mean over samples and positions)

   where F is a layer's output (N × C × positions) and a(F) = Σ_c |F_c|^p, flattened and
   L2-normalised per sample: where in the input the layer attends. Without a spatial or time axis
   (an N × F feature vector), a(F) = |F|^p over the units, normalised the same way.

Defaults from the authors' code (bboylyg/NAD ``config.py``, ``main.py``): β = 5000 on the last
feature map only (their β₁ = β₂ = 0), p = 2, 20 student epochs, weight decay 1e-4, momentum 0.9;
teacher 10 epochs (their README: 5–10). Their learning rate is 0.1 for 2 epochs then 0.01; here
lr 0.01 with the shared cosine schedule, as BackdoorBench runs it. ``layers`` (comma-separated
module names) replaces the default layer, the project's neuron layer (methods.md §0).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.checks import default
from torchpurify.defenses.base import Clean, Purified, register_defense
from torchpurify.defenses.recipe import FineTuneRecipe
from torchpurify.neurons import default_neuron_layer
from torchpurify.neurons.layers import get_module
from torchpurify.train import fit

# Where these defaults come from (methods.md, "Where each default comes from").
PAPER = "paper: NAD's code (bboylyg/NAD config.py, main.py), methods.md §6.3"


def attention_map(features: torch.Tensor, power: float) -> torch.Tensor:
    """Σ_c |F_c|^p per position (|F|^p per unit for N × F), flattened, unit L2 norm per sample."""
    magnitude = features.abs().pow(power)
    if features.dim() > 2:
        magnitude = magnitude.sum(1)
    flat = magnitude.flatten(1)
    return flat / (flat.norm(dim=1, keepdim=True) + 1e-6)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, power: float) -> torch.Tensor:
    return F.mse_loss(attention_map(student, power), attention_map(teacher, power))


@contextmanager
def captured(model: nn.Module, layers: list[str]):
    """Within the block, ``outputs[name]`` is the latest output of each named module."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        get_module(model, name).register_forward_hook(
            lambda module, args, output, name=name: outputs.__setitem__(name, output)
        )
        for name in layers
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def distillation_step(teacher: nn.Module, layers: list[str], beta: float, power: float, sink):
    """A :data:`torchpurify.train.Step`: CE + β·attention loss against the frozen teacher."""

    def step(model, x, y, optimizer, cost):
        teacher.to(x.device)
        optimizer.zero_grad(set_to_none=True)
        with captured(model, layers) as student_maps:
            loss = F.cross_entropy(model(x), y)
        with torch.no_grad(), captured(teacher, layers) as teacher_maps:
            teacher(x)
        at = sum(attention_loss(student_maps[name], teacher_maps[name], power) for name in layers)
        (loss + beta * at).backward()
        optimizer.step()
        sink.append(float(at.detach()))
        return loss.detach()

    return step


@register_defense
@dataclass
class NeuralAttentionDistillation(FineTuneRecipe):
    name = "nad"
    summary = "distil a fine-tuned teacher's attention maps into the model (Li et al. 2021)"
    quick = {"teacher_epochs": 1}

    epochs: int = default(20, PAPER)
    lr: float = default(
        0.01, "paper: BackdoorBench's NAD, lr 0.01 with the cosine schedule (the authors' "
        "0.1 then 0.01), methods.md §6.3"
    )  # fmt: skip
    momentum: float = default(0.9, PAPER)
    weight_decay: float = default(1e-4, PAPER)
    teacher_epochs: int = default(10, "paper: NAD's README (5-10 epochs), methods.md §6.3")
    beta: float = default(5000.0, PAPER)
    power: float = default(2.0, PAPER)
    layers: str | None = default(
        None, "paper: the last feature map only (the neuron layer of methods.md §0), §6.3"
    )

    def validate(self) -> None:
        super().validate()
        self.require("teacher_epochs", self.teacher_epochs >= 1, "at least 1")
        self.require("beta", self.beta >= 0, "≥ 0")
        self.require("power", self.power > 0, "positive")
        if self.layers is not None:
            self.require("layers", bool(self.layer_names()), "module names separated by commas")

    def layer_names(self) -> list[str]:
        return [name.strip() for name in (self.layers or "").split(",") if name.strip()]

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        layers = self.layer_names() or [default_neuron_layer(model, clean.tune.x[:2])]
        for name in layers:
            get_module(model, name)  # an unknown name fails before any training
        teacher = copy.deepcopy(model)
        taught = fit(
            teacher, clean.tune, self.train_config(self.teacher_epochs), description="nad teacher"
        )
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        losses: list[float] = []
        per_epoch: list[float] = []

        def close_epoch(record: dict) -> None:
            per_epoch.append(sum(losses) / max(1, len(losses)))
            record["attention_loss"] = per_epoch[-1]
            losses.clear()

        result = fit(
            model,
            clean.tune,
            self.train_config(),
            step=distillation_step(teacher, layers, self.beta, self.power, losses),
            on_epoch=close_epoch,
            description=self.name,
        )
        log = {
            "layers": layers,
            "attention_loss": per_epoch,
            "teacher_history": taught.history,
            "history": result.history,
        }
        return Purified(model, log)
