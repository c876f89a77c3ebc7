"""CLP: channel Lipschitzness-based pruning (Zheng, Zhang, Wang, Zhu, ECCV 2022; methods.md §6).

Data-free. For output channel k of a convolution with weights W (C_out × C_in × kernel), the
upper bound of the channel's Lipschitz constant (UCLC) is the spectral norm of its weights,
reshaped to a C_in × |kernel| matrix, times the scale of the BatchNorm that normalises it:

    UCLC_k = σ_max(W_k) · |γ_k| / sqrt(running_var_k + ε)

(the factor is 1 when no BatchNorm follows). A backdoor channel reacts strongly to a small
input pattern, so it has an outlying UCLC: within each layer, channels with
``UCLC_k > mean + u · std`` are pruned, u = 3 by default (the paper's).

The reference code pairs every BatchNorm2d with the last Conv2d *registered* before it, which
breaks when a conv has no BatchNorm after it (rkteddy/channel-Lipschitzness-based-pruning#2)
and on pre-activation blocks. Here a conv (1-D or 2-D) is paired with a BatchNorm only when the
BatchNorm is the next module run after it, with at most channel-wise modules (ReLU, pooling,
dropout) in between and the same channel count; otherwise its own weights bound the channel.
A pruned channel is masked at the output of the BatchNorm when paired (the reference zeroes
that BatchNorm's weight and bias), else at the conv's output — with the persistent neuron masks.
A model without convolutions (the LSTM) has its hidden Linear units scored the same way. (The
pairing is :func:`~torchpurify.neurons.units.weighted_units`, which ANP and RNP use too.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchpurify.checks import default
from torchpurify.defenses.base import Clean, Defense, Purified, register_defense
from torchpurify.defenses.pruning import CUT_SCALE, scaled_count, smaller_cut
from torchpurify.logs import ChannelLipschitzLog
from torchpurify.neurons import mask_channels
from torchpurify.neurons.units import CONVS, Unit, weighted_units
from torchpurify.train import Cost


def channel_lipschitz(model: nn.Module, unit: Unit) -> torch.Tensor:
    """UCLC of each output channel of ``unit`` (see the module docstring)."""
    weight = model.get_submodule(unit.layer).weight.detach()
    matrices = weight.reshape(weight.shape[0], weight.shape[1], -1).float().cpu()
    bound = torch.linalg.matrix_norm(matrices, ord=2)
    if unit.norm is not None:
        norm = model.get_submodule(unit.norm)
        scale = torch.ones_like(bound)
        if norm.weight is not None:
            scale = norm.weight.detach().abs().float().cpu()
        if norm.running_var is not None:
            scale = scale / (norm.running_var.detach().float().cpu() + norm.eps).sqrt()
        bound = bound * scale
    return bound


@register_defense
@dataclass
class ChannelLipschitzPruning(Defense):
    name = "clp"
    summary = "prune channels with outlying Lipschitz upper bounds, data-free (Zheng et al. 2022)"

    u: float = default(3.0, "paper: CLP's default u (methods.md §6.7)")
    # conv: convolutions only (the paper); conv+linear: hidden Linear units too; auto: conv,
    # or the hidden Linear units of a model without convolutions.
    layers: str = default(
        "auto", "paper: convolutions, as the paper; the hidden Linear units of a model "
        "without any (methods.md §6.7)"
    )  # fmt: skip
    cut_scale: float = default(1.0, CUT_SCALE)

    def validate(self) -> None:
        self.require("u", self.u >= 0, "≥ 0")
        self.require("cut_scale", 0 < self.cut_scale <= 1, "in (0, 1]")
        self.require(
            "layers", self.layers in ("auto", "conv", "conv+linear"), "auto, conv or conv+linear"
        )

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        # Data-free: two holdout inputs only tell which modules run, in which order.
        example = clean.holdout.x[:2]
        kinds = CONVS + (nn.Linear,) if self.layers == "conv+linear" else CONVS
        units = weighted_units(model, example, kinds)
        if not units and self.layers == "auto":
            units = weighted_units(model, example, (nn.Linear,))
        pruned: dict[str, list[int]] = {}
        scores: dict[str, list[float]] = {}
        outliers: list[
            tuple[float, int, Unit, int]
        ] = []  # (−z, unit, channel), most outlying first
        for position, unit in enumerate(units):
            if unit.channels < 2:
                continue
            bound = channel_lipschitz(model, unit)
            threshold = bound.mean() + self.u * bound.std()
            z = (bound - bound.mean()) / bound.std().clamp_min(1e-12)
            index = torch.nonzero(bound > threshold).flatten()
            scores[unit.masked_at] = [round(float(v), 4) for v in bound]
            outliers += [(-float(z[i]), position, unit, int(i)) for i in index]
        # The guard's back-off (cut_scale, methods.md §0): only that share, the most outlying.
        kept = sorted(outliers, key=lambda o: o[:2] + (o[3],))
        kept = kept[: scaled_count(len(outliers), self.cut_scale)]
        for unit in units:
            index = sorted(channel for _, _, owner, channel in kept if owner == unit)
            if index:
                mask_channels(model, unit.masked_at, index, num_channels=unit.channels)
                pruned[unit.masked_at] = index
        log = ChannelLipschitzLog(
            u=self.u,
            cut_scale=self.cut_scale,
            num_within_threshold=len(outliers),
            units=[{"layer": u.layer, "batchnorm": u.norm, "channels": u.channels} for u in units],
            pruned=pruned,
            num_pruned=sum(len(v) for v in pruned.values()),
            uclc=scores,
        )
        return Purified(model, log.to_dict(), Cost(forward=1))

    def back_off(self) -> ChannelLipschitzPruning | None:
        """The guard's gentler version: half the outlying channels, the most outlying kept, down
        to an eighth of them; then the input model."""
        return smaller_cut(self)  # type: ignore[return-value]
