"""Which neurons a model has, for the methods that score, mask or gate them one by one (CLP, ANP,
RNP, TSBD, FST): the weighted layers whose output channels are neurons, with the BatchNorm that
normalises each (:func:`weighted_units`), the neurons ANP and RNP put masks on
(:func:`mask_neurons`), and the classifier's linear head (:func:`linear_head`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchpurify.errors import UserError, check
from torchpurify.neurons.layers import WEIGHTED, LayerInfo, list_layers
from torchpurify.neurons.masks import ZERO_PRESERVING

CONVS = (nn.Conv1d, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Unit:
    """A weighted layer whose output channels are neurons: ``layer`` makes them, ``norm`` (when
    a BatchNorm directly normalises them) is where they are masked, ``channels`` counts them."""

    layer: str
    norm: str | None
    channels: int

    @property
    def masked_at(self) -> str:
        return self.norm or self.layer


def leaf_layers(model: nn.Module, example: torch.Tensor) -> list[LayerInfo]:
    """The modules without children that run on ``example``, in call order."""
    infos = list_layers(model, example)
    return [i for i in infos if next(model.get_submodule(i.name).children(), None) is None]


def weighted_units(model: nn.Module, example: torch.Tensor, kinds=CONVS) -> list[Unit]:
    """Every ``kinds`` leaf module that runs on ``example``, in call order, with the BatchNorm
    that normalises its output when there is one. Linear layers count only when their output's
    axis 1 is their ``out_features`` (not an attention score over time), and the last weighted
    layer run (the classifier) never counts."""
    leaves = leaf_layers(model, example)
    weighted = [i for i, info in enumerate(leaves) if _width(model, info) is not None]
    units = []
    for position in weighted[:-1]:
        info = leaves[position]
        module = model.get_submodule(info.name)
        if not isinstance(module, kinds) or _width(model, info) != info.channels:
            continue
        norm = None
        for later in leaves[position + 1 :]:
            following = model.get_submodule(later.name)
            if isinstance(following, NORMS) and later.channels == info.channels:
                norm = later.name
                break
            if not isinstance(following, ZERO_PRESERVING):
                break
        units.append(Unit(info.name, norm, info.channels))
    return units


def _width(model: nn.Module, info: LayerInfo) -> int | None:
    module = model.get_submodule(info.name)
    if isinstance(module, CONVS):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return None


def mask_neurons(model: nn.Module, example: torch.Tensor) -> list[tuple[str, int]]:
    """``[(module, channels)]``: the neurons ANP and RNP put masks on, those the references
    perturb — every BatchNorm that runs after the first weighted layer (not an input
    normalisation); for a model without BatchNorm, the output channels of its hidden Conv and
    Linear layers (:func:`weighted_units`)."""
    leaves = leaf_layers(model, example)
    units = weighted_units(model, example, WEIGHTED)
    first = next(
        (
            position
            for position, info in enumerate(leaves)
            if isinstance(model.get_submodule(info.name), WEIGHTED)
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


def linear_head(model: nn.Module, example: torch.Tensor) -> str:
    """The name of the last ``nn.Linear`` whose output has one unit per logit."""
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            outputs = model(example.to(next(model.parameters()).device)).shape[1]
        finally:
            model.train(was_training)
    heads = [
        info.name
        for info in list_layers(model, example)
        if isinstance(model.get_submodule(info.name), nn.Linear) and info.output_shape == (outputs,)
    ]
    if not heads:
        raise UserError(
            f"found no nn.Linear with {outputs} outputs (one per class); name the head with "
            "--set head=MODULE"
        )
    return heads[-1]
