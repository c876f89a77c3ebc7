"""The pruning-aware attack of the Fine-Pruning paper (Liu, Dolan-Gavitt, Garg, RAID 2018, §4.3;
methods.md §10): an adaptive attacker who knows the defender will prune dormant channels.

It is a training procedure around a base trigger (BadNets by default), not a trigger of its own:

1. train the model on *clean* data;
2. prune the neuron layer's channels that are dormant on clean data (increasing mean activation
   on the attacker's clean validation split, as many as keep its accuracy within
   ``max_acc_drop``: the defender's own rule);
3. retrain the pruned model on the *poisoned* data, so the backdoor has to live in the channels
   a defender keeps, shared with the clean task;
4. restore the pruned channels as dormant decoys: unmask them and lower the bias of the module
   that makes them (``b_k ← b_k − max_x z_k(x) − decoy_margin``, z_k the channel before the
   activation, over the clean validation split), so they output nothing on clean data and a
   defender who prunes by mean activation removes them first — for no accuracy cost — and then
   meets the channels that carry both the clean task and the backdoor.

Triggered inputs are those of the base trigger; the model card records the decoys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchpurify.attacks.base import ATTACKS, Trigger, TriggerParams, register_attack
from torchpurify.data.base import Split
from torchpurify.errors import UserError, check
from torchpurify.metrics import accuracy
from torchpurify.neurons import (
    activation_stats,
    default_neuron_layer,
    list_layers,
    mask_channels,
    unmask,
)
from torchpurify.train import TrainConfig, TrainResult, fit


@dataclasses.dataclass(frozen=True)
class PruningAwareParams(TriggerParams):
    base: str = "badnets"
    base_params: dict = dataclasses.field(default_factory=dict)
    max_acc_drop: float = 0.04
    decoy_margin: float = 1.0
    layer: str | None = None


@register_attack
class PruningAware(Trigger):
    """A base trigger, and the training procedure that hides its backdoor from pruning."""

    name = "pruning-aware"
    summary = (
        "train clean, prune dormant channels, retrain poisoned, restore decoys (Liu et al. 2018)"
    )
    params_class = PruningAwareParams

    def __init__(self, params: PruningAwareParams) -> None:
        check(
            isinstance(params.base, str) and params.base != self.name,
            f"pruning-aware: base must be the name of another attack, got {params.base!r}",
        )
        check(
            isinstance(params.base_params, dict),
            f"pruning-aware: base_params must be a mapping, got {params.base_params!r}",
        )
        self.base = ATTACKS.get(params.base)(
            params.input_shape, seed=params.seed, **params.base_params
        )
        # The base trigger decides what an input looks like and how poisoning treats it.
        self.sample_dims = self.base.sample_dims
        self.value_range = self.base.value_range
        self.clean_label = self.base.clean_label
        self.cross_ratio = self.base.cross_ratio
        super().__init__(params)

    def validate(self) -> None:
        self.require("max_acc_drop", float, lambda v: 0 <= v < 1, "in [0, 1)")
        self.require("decoy_margin", float, lambda v: v >= 0, "≥ 0")
        layer = self.params.layer
        check(
            layer is None or (isinstance(layer, str) and layer != ""),
            f"pruning-aware: layer must be a module name or null, got {layer!r}",
        )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.apply(x)

    def noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.base.noise(x, generator)

    def train_backdoored(
        self,
        model: nn.Module,
        clean: Split,
        poisoned: Split,
        val: Split,
        config: TrainConfig,
        on_epoch: Callable[[dict], None] | None = None,
    ) -> tuple[TrainResult, dict[str, Any]]:
        """Steps 1–4 of the module docstring; ``val`` is the attacker's clean validation split."""
        check(len(val) > 0, "pruning-aware needs a clean validation split; raise --val-fraction")
        result = TrainResult()

        def phase(name: str, data: Split) -> None:
            def tagged(record: dict) -> None:
                record["phase"] = name
                if on_epoch is not None:
                    on_epoch(record)

            done = fit(model, data, config, on_epoch=tagged, description=f"train ({name})")
            result.history.extend(done.history)
            result.cost.add(done.cost)

        phase("clean", clean)
        layer = self.params.layer or default_neuron_layer(model, val.x[:2])
        order = activation_stats(model, layer, val, batch_size=config.batch_size).mean.argsort()
        decoys, before, pruned_acc = self._prune_dormant(model, layer, order, val, config)
        phase("poisoned, pruned", poisoned)
        unmask(model, layer)
        bias_module = self._lower_biases(model, layer, decoys, val, config.batch_size)
        log = {
            "layer": layer,
            "channels": len(order),
            "decoys": decoys.tolist(),
            "num_decoys": len(decoys),
            "bias_module": bias_module,
            "val_acc_clean_model": before,
            "val_acc_pruned_clean_model": pruned_acc,
            "val_acc": accuracy(model, val, batch_size=config.batch_size),
        }
        return result, log

    def _prune_dormant(
        self, model: nn.Module, layer: str, order: torch.Tensor, val: Split, config: TrainConfig
    ) -> tuple[torch.Tensor, float, float]:
        """Mask the most dormant channels, as many as keep ``val`` accuracy within the budget."""
        curve: dict[int, float] = {}

        def pruned_accuracy(k: int) -> float:
            if k not in curve:
                unmask(model, layer)
                if k:
                    mask_channels(model, layer, order[:k], num_channels=len(order))
                curve[k] = accuracy(model, val, batch_size=config.batch_size)
            return curve[k]

        floor = pruned_accuracy(0) - self.params.max_acc_drop
        low, high = 0, len(order) - 1  # keep at least one channel
        while low < high:  # the largest k within the budget (accuracy falls with k)
            middle = (low + high + 1) // 2
            low, high = (middle, high) if pruned_accuracy(middle) >= floor else (low, middle - 1)
        pruned_accuracy(low)  # leave exactly the chosen channels masked
        return order[:low], curve[0], curve[low]

    def _lower_biases(
        self, model: nn.Module, layer: str, decoys: torch.Tensor, val: Split, batch_size: int
    ) -> str:
        """Make ``decoys`` dormant on clean data by lowering their producer's bias."""
        name = bias_producer(model, layer, val.x[:2])
        producer = model.get_submodule(name)
        peak = torch.full((producer.bias.numel(),), -torch.inf, device=producer.bias.device)

        def track(module, args, output):
            reduce = [d for d in range(output.dim()) if d != 1]
            peak.copy_(torch.maximum(peak, output.detach().amax(dim=reduce)))

        handle = producer.register_forward_hook(track)
        try:
            accuracy(model, val, batch_size=batch_size)
        finally:
            handle.remove()
        with torch.no_grad():
            index = decoys.to(producer.bias.device)
            producer.bias[index] -= peak[index] + self.params.decoy_margin
        return name


def bias_producer(model: nn.Module, layer: str, example: torch.Tensor) -> str:
    """The last module run at or before ``layer`` with a per-channel bias of its width (the
    BatchNorm before the ReLU of a conv block, or a Conv/Linear with a bias)."""
    infos = list_layers(model, example)
    leaves = [i for i in infos if next(model.get_submodule(i.name).children(), None) is None]
    target = next((i for i in infos if i.name == layer), None)
    check(target is not None, f"pruning-aware: layer {layer!r} does not run on this input")
    inside = [p for p, i in enumerate(leaves) if i.name == layer or i.name.startswith(layer + ".")]
    for info in reversed(leaves[: max(inside) + 1]):
        bias = getattr(model.get_submodule(info.name), "bias", None)
        if isinstance(bias, nn.Parameter) and bias.numel() == target.channels:
            return info.name
    raise UserError(f"pruning-aware: no module with a bias makes the channels of {layer!r}")
