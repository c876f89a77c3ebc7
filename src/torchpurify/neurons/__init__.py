"""Neuron tools (methods.md §0, §3–§5, §7, §8): find layers, score channels, mask them, invert
triggers. Layers are addressed by their ``named_modules()`` name; a neuron is one channel
(axis 1) of a layer's output."""

from torchpurify.neurons.generator import GeneratorSearch, invert_generator
from torchpurify.neurons.gradients import BenignSalience, neuron_groups, weight_gradient_norms
from torchpurify.neurons.inversion import Inversion, InvertedTrigger, anomaly_index, invert_triggers
from torchpurify.neurons.layers import (
    LayerInfo,
    default_neuron_layer,
    layer_info,
    list_layers,
    producer_of,
)
from torchpurify.neurons.masks import (
    attach_masks,
    fold_masks,
    mask_channels,
    masked_layers,
    unmask,
)
from torchpurify.neurons.perturbation import PerturbationSearch, invert_perturbations
from torchpurify.neurons.stats import ActivationStats, activation_stats

__all__ = [
    "ActivationStats",
    "BenignSalience",
    "GeneratorSearch",
    "Inversion",
    "InvertedTrigger",
    "LayerInfo",
    "PerturbationSearch",
    "activation_stats",
    "anomaly_index",
    "attach_masks",
    "default_neuron_layer",
    "fold_masks",
    "invert_generator",
    "invert_perturbations",
    "invert_triggers",
    "layer_info",
    "list_layers",
    "mask_channels",
    "masked_layers",
    "neuron_groups",
    "producer_of",
    "unmask",
    "weight_gradient_norms",
]
