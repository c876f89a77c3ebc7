"""NAD: neural attention distillation (Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention
Distillation: Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021; methods.md §6).

1. Teacher: a copy of the backdoored model fine-tuned on ``tune`` for ``teacher_epochs``.
2. Student: the backdoored model, fine-tuned on ``tune`` with

       L_CE(student) + β · Σ_layers ‖ a(F_s) − a(F_t) ‖²  (mean over samples and positions)

   where F is a layer's output (N × C × positions) and a(F) = Σ_c |F_c|^p, flattened and
   L2-normalised per sample: where in the input the layer attends. Without a spatial or time axis
   (an N × F feature vector), a(F) = |F|^p over the units, normalised the same way.

Defaults from the authors' code (bboylyg/NAD ``config.py`` at its last commit, ``main.py``):
β₁, β₂, β₃ = 500, 1000, 1000 on the outputs of a WRN-16-1's three block groups, shallow to deep
(here ``beta`` = 1000 and :data:`LAYER_WEIGHTS` = ½, 1, 1; an earlier commit had β = 5000 on
the last group only), p = 2, 20 student epochs, weight decay 1e-4, momentum 0.9; teacher 10
epochs (their README: 5–10). Their learning rate is 0.1 for 2 epochs then 0.01; here lr 0.01
with the shared cosine schedule, as BackdoorBench runs it.

The layers (:func:`attention_layers`): the outputs of the model's last three feature stages. A
stage is a run of consecutive leaf modules with the same channel count (after the first
weighted layer, with a spatial or time axis not all of size 1), and its output is the run's
last module: ``block1.1``, ``block2.1``, ``block4.2`` of small-cnn; ``block2.3``, ``block3.3``,
``block4.2`` of kws-cnn; ``layer3.0.bn1``, ``layer4.0.bn1``, ``relu`` of PreAct-ResNet18 (its
layer2 and layer3 outputs as the next stage normalises them, and the neuron layer). A model
with fewer widths than three has the last run split by its blocks (leaves grouped by the first
two parts of their names; a group of one leaf joins the group before it): res8's three
residual blocks, DS-CNN's last three blocks. A model with fewer stages still (LeNet-5: two)
uses those, with the last weights; one without any (the LSTM) the neuron layer of methods.md
§0. ``layers`` (comma-separated module names) replaces them.
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
from torchpurify.logs import AttentionDistillationLog
from torchpurify.neurons import default_neuron_layer
from torchpurify.neurons.layers import WEIGHTED, get_module, list_layers
from torchpurify.train import descend, fit

# Where these defaults come from (methods.md, "Where each default comes from").
PAPER = "paper: NAD's code (bboylyg/NAD config.py, main.py), methods.md §6.3"

# The authors' β₁ : β₂ : β₃ = 500 : 1000 : 1000 as multiples of ``beta``, shallow to deep; with
# fewer layers the last ones, with more the first repeated.
LAYER_WEIGHTS = (0.5, 1.0, 1.0)


def layer_weights(count: int) -> list[float]:
    """The multiple of β for each of ``count`` attention layers, shallow to deep."""
    kept = min(count, len(LAYER_WEIGHTS))
    extra = [LAYER_WEIGHTS[0]] * (count - kept)
    return extra + list(LAYER_WEIGHTS[len(LAYER_WEIGHTS) - kept :])


def attention_layers(model: nn.Module, example: torch.Tensor, count: int = 3) -> list[str]:
    """The outputs of the last ``count`` feature stages (the rule of the module docstring)."""
    leaves = [
        info
        for info in list_layers(model, example)
        if next(model.get_submodule(info.name).children(), None) is None
    ]
    first = next(
        (
            i
            for i, info in enumerate(leaves)
            if isinstance(model.get_submodule(info.name), WEIGHTED)
        ),
        len(leaves),
    )
    maps = [
        info
        for info in leaves[first:]
        if info.output_shape and len(info.output_shape) >= 2 and max(info.output_shape[1:]) > 1
    ]
    runs: list[list] = []
    for info in maps:
        if runs and runs[-1][-1].channels == info.channels:
            runs[-1].append(info)
        else:
            runs.append([info])
    if 0 < len(runs) < count:
        groups: list[list] = []
        for info in runs.pop():
            key = ".".join(info.name.split(".")[:2])
            if groups and ".".join(groups[-1][-1].name.split(".")[:2]) == key:
                groups[-1].append(info)
            else:
                groups.append([info])
        blocks: list[list] = []
        for group in groups:  # a lone leaf (a final BN or ReLU) ends the block before it
            if blocks and len(group) == 1:
                blocks[-1].extend(group)
            else:
                blocks.append(group)
        runs.extend(blocks)
    # No map with a spatial or time axis (an LSTM's features): the neuron layer of §0 alone.
    return [run[-1].name for run in runs[-count:]] or [default_neuron_layer(model, example)]


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


def distillation_step(
    teacher: nn.Module, layers: list[str], betas: list[float], power: float, sink
):
    """A :data:`torchpurify.train.Step`: CE + Σ βᵢ·attention lossᵢ against the frozen teacher
    (+ the recipe's output distillation term, towards the input model); ``sink`` receives the
    weighted attention loss of each batch."""

    def step(model, x, y, optimizer, cost, distill=None):
        teacher.to(x.device)
        optimizer.zero_grad(set_to_none=True)
        with captured(model, layers) as student_maps:
            loss = F.cross_entropy(model(x), y)
        with torch.no_grad(), captured(teacher, layers) as teacher_maps:
            teacher(x)
        at = sum(
            beta * attention_loss(student_maps[name], teacher_maps[name], power)
            for name, beta in zip(layers, betas, strict=True)
        )
        (loss + at).backward()
        descend(model, x, optimizer, distill)
        sink.append(float(at.detach()))
        return loss.detach()

    return step


@register_defense
@dataclass
class NeuralAttentionDistillation(FineTuneRecipe):
    name = "nad"
    summary = "distil a fine-tuned teacher's attention maps into the model (Li et al. 2021)"
    quick = {"teacher_epochs": 1}
    # Back-off: the step and β: on small maps β swamps the cross-entropy (methods.md §6.3); on
    # 7 × 7 maps NAD is fine-tuning, and a halved step brought it within the floor (§6.9).
    gentler = ("lr", "beta")

    epochs: int = default(20, PAPER)
    lr: float = default(
        0.01, "paper: BackdoorBench's NAD, lr 0.01 with the cosine schedule (the authors' "
        "0.1 then 0.01), methods.md §6.3"
    )  # fmt: skip
    momentum: float = default(0.9, PAPER)
    weight_decay: float = default(1e-4, PAPER)
    teacher_epochs: int = default(10, "paper: NAD's README (5-10 epochs), methods.md §6.3")
    beta: float = default(
        1000.0, "paper: NAD's code (bboylyg/NAD config.py: β₁, β₂, β₃ = 500, 1000, 1000), the "
        "first of three layers weighted β/2, methods.md §6.3"
    )  # fmt: skip
    power: float = default(2.0, PAPER)
    layers: str | None = default(
        None, "paper: the outputs of the last three feature stages, as the authors' three "
        "block groups (the stage rule of methods.md §6.3)"
    )  # fmt: skip

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
        layers = self.layer_names() or attention_layers(model, clean.tune.x[:2])
        for name in layers:
            get_module(model, name)  # an unknown name fails before any training
        betas = [self.beta * w for w in layer_weights(len(layers))]
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
            step=distillation_step(teacher, layers, betas, self.power, losses),
            on_epoch=close_epoch,
            description=self.name,
        )
        log = AttentionDistillationLog(
            layers=layers,
            betas=betas,
            attention_loss=per_epoch,
            teacher_history=taught.history,
            history=result.history,
        )
        return Purified(model, log.to_dict())
