"""Persistent channel masks: prune neurons by zeroing channels of a module's output (§0).

The mask is a registered buffer ``neuron_mask`` (float, one value per channel) on the masked
module, applied by a module-level forward hook. A buffer moves with ``.to()``/``.half()``, is
copied by ``copy.deepcopy``, is left alone by optimisers (so a pruned channel stays exactly zero
through fine-tuning) and is saved in ``state_dict()``. To load a saved masked model, call
:func:`attach_masks` on a fresh model first, then ``load_state_dict``. :func:`fold_masks` bakes
masks into weights for export.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from torchpurify.errors import UserError, check
from torchpurify.neurons.layers import get_module, model_device

MASK = "neuron_mask"

FOLDABLE = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)
# Channel-wise modules mapping a zero channel to a zero channel: a mask after one of them can
# move to the module before it.
ZERO_PRESERVING = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Softsign, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
)  # fmt: skip


def _apply_mask(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: multiply axis 1 of the output by ``module.neuron_mask``."""
    mask = getattr(module, MASK)
    if output.shape[1] != mask.numel():
        raise UserError(
            f"a {type(module).__name__} outputs {output.shape[1]} channels but its neuron mask "
            f"has {mask.numel()}; re-create the mask with the right number of channels"
        )
    return output * mask.view(1, -1, *([1] * (output.dim() - 2))).to(output.dtype)


def _attach(model: nn.Module, module: nn.Module, channels: int) -> None:
    module.register_buffer(MASK, torch.ones(channels, device=model_device(model)))
    if _apply_mask not in module._forward_hooks.values():
        module.register_forward_hook(_apply_mask)


def _fold_target(model: nn.Module, layer: str) -> nn.Module:
    """The Conv/Linear/BatchNorm whose weights can carry ``layer``'s mask, or a UserError.

    A Sequential passes it to its last child; a zero-preserving module (ReLU, pooling, …) to
    the module before it in the same Sequential.
    """
    module = model.get_submodule(layer)
    if isinstance(module, FOLDABLE) and getattr(module, "weight", None) is not None:
        return module
    if isinstance(module, nn.Sequential) and len(module):
        return _fold_target(model, f"{layer}.{[n for n, _ in module.named_children()][-1]}")
    parent_name, _, name = layer.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(module, ZERO_PRESERVING) and isinstance(parent, nn.Sequential):
        siblings = [n for n, _ in parent.named_children()]
        position = siblings.index(name)
        if position > 0:
            previous = siblings[position - 1]
            return _fold_target(model, f"{parent_name}.{previous}" if parent_name else previous)
    raise UserError(
        f"the mask on {layer!r} ({type(module).__name__}) cannot be folded into weights: no "
        "Conv/Linear/affine BatchNorm produces it inside a Sequential; keep the mask or mask "
        "that producing module instead"
    )


def mask_channels(
    model: nn.Module,
    layer: str,
    channels: Sequence[int] | torch.Tensor,
    *,
    num_channels: int | None = None,
) -> None:
    """Zero ``channels`` of ``layer``'s output from now on; repeated calls add channels.

    ``num_channels`` is needed only the first time, when the count cannot be read from the
    module or the Conv/Linear/BatchNorm before it (e.g. a ReLU outside a Sequential): pass
    ``len(activation_stats(...).mean)``.
    """
    module = get_module(model, layer)
    if getattr(module, MASK, None) is None:
        if num_channels is None:
            try:
                num_channels = _fold_target(model, layer).weight.shape[0]
            except UserError:
                raise UserError(
                    f"cannot tell how many channels {layer!r} outputs; pass num_channels"
                ) from None
        check(
            isinstance(num_channels, int) and num_channels >= 1,
            f"num_channels must be a positive integer, got {num_channels!r}",
        )
        _attach(model, module, num_channels)
    mask = getattr(module, MASK)
    check(
        num_channels is None or num_channels == mask.numel(),
        f"num_channels is {num_channels} but {layer!r} already has a mask of {mask.numel()}",
    )
    index = torch.as_tensor(channels, dtype=torch.long).flatten()
    check(
        bool(((index >= 0) & (index < mask.numel())).all()),
        f"channels must lie in 0..{mask.numel() - 1} for layer {layer!r}, got {index.tolist()}",
    )
    mask[index.to(mask.device)] = 0


def unmask(model: nn.Module, layer: str) -> None:
    """Remove ``layer``'s mask and its hook (nothing happens when it has none)."""
    module = get_module(model, layer)
    if MASK in module._buffers:
        del module._buffers[MASK]
    for key, hook in list(module._forward_hooks.items()):
        if hook is _apply_mask:
            del module._forward_hooks[key]


def masked_layers(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: mask}`` for every masked module (1 = kept, 0 = pruned)."""
    suffix = "." + MASK
    return {
        name[: -len(suffix)]: mask.detach().clone()
        for name, mask in model.named_buffers()
        if name.endswith(suffix)
    }


def attach_masks(model: nn.Module, channels: Mapping[str, int]) -> None:
    """Give ``model`` all-ones masks of ``{layer: channel count}`` so a saved masked
    ``state_dict`` (with its ``<layer>.neuron_mask`` keys) loads into it."""
    for layer, count in channels.items():
        module = get_module(model, layer)
        check(
            isinstance(count, int) and count >= 1,
            f"channel count for {layer!r} must be a positive integer, got {count!r}",
        )
        existing = getattr(module, MASK, None)
        if existing is None:
            _attach(model, module, count)
        else:
            check(
                existing.numel() == count,
                f"{layer!r} already has a mask of {existing.numel()} channels, not {count}",
            )


def fold_masks(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every mask folded into weights, without hooks or mask buffers.

    A masked Conv/Linear gets zero weight rows and bias; a BatchNorm zero weight and bias; a
    ReLU-like module or a Sequential moves its mask to the producing module first. The copy's
    outputs equal the masked model's, in eval and train mode.
    """
    folded = copy.deepcopy(model)
    for layer, mask in masked_layers(folded).items():
        target = _fold_target(folded, layer)
        check(
            target.weight.shape[0] == mask.numel(),
            f"the mask on {layer!r} has {mask.numel()} channels but the {type(target).__name__} "
            f"producing it has {target.weight.shape[0]}; it cannot be folded",
        )
        pruned = (mask == 0).to(target.weight.device)
        with torch.no_grad():
            target.weight[pruned] = 0
            if target.bias is not None:
                target.bias[pruned] = 0
        unmask(folded, layer)
    return folded
