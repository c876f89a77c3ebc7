"""Trainable gates on neurons (ANP's and RNP's masks): one value per output channel of chosen
modules, applied by forward hooks to a frozen network, learned by :func:`~torchpurify.train.fit`
through :class:`Gated`, then read off (:meth:`NeuronGates.values`) to prune the original model.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn


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
