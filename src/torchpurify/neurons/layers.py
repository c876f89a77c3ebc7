"""Layer discovery: which modules a model runs, what they output, and which one to score.

Modules are addressed by their ``named_modules()`` name, like Captum. A module's channel axis is
always axis 1 of its output (N×C×H×W, N×C×T, N×F), so one output channel is one neuron
(methods.md §0). Everything here is found by running one example batch through forward hooks,
which works for any ``nn.Module`` whatever its ``forward`` does.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

from torchpurify.errors import UserError, check

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerInfo:
    """One module as seen in a forward pass; ``channels`` is None without a channel axis."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None  # without the batch axis; None for non-tensor output
    channels: int | None
    parameters: int  # including those of its children


@dataclass(frozen=True)
class _Trace:
    layers: list[LayerInfo]  # in the order the modules are called
    finished: list[str]  # in the order their outputs are produced (children before parents)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def get_module(model: nn.Module, layer: str) -> nn.Module:
    """The module named ``layer``; an unknown name is a UserError naming the closest ones."""
    modules = dict(model.named_modules())
    if isinstance(layer, str) and layer and layer in modules:
        return modules[layer]
    names = [name for name in modules if name]
    close = difflib.get_close_matches(str(layer), names, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see list_layers(model, example)"
    raise UserError(f"layer {layer!r} is not a module of this model; {hint}")


def _trace(model: nn.Module, example: torch.Tensor) -> _Trace:
    """Run ``example`` once (eval mode, no gradients), noting each module's output shape."""
    check(
        isinstance(example, torch.Tensor) and example.dim() >= 2,
        "example must be a batch of inputs (N × input shape), e.g. data.x[:2]",
    )
    called: list[str] = []
    shapes: dict[str, tuple[int, ...] | None] = {}
    finished: list[str] = []

    def before(name):
        def hook(module, args):
            if name not in called:
                called.append(name)

        return hook

    def after(name):
        def hook(module, args, output):
            if name not in shapes:
                shapes[name] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None
                finished.append(name)

        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(before(name)))
            handles.append(module.register_forward_hook(after(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example.to(model_device(model)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    layers = []
    for name in called:
        shape, module = shapes.get(name), model.get_submodule(name)
        channels = shape[0] if shape else None
        count = sum(p.numel() for p in module.parameters())
        layers.append(LayerInfo(name, type(module).__name__, shape, channels, count))
    return _Trace(layers, finished)


def list_layers(model: nn.Module, example: torch.Tensor) -> list[LayerInfo]:
    """Every submodule that runs on ``example`` (a batch), in the order it is called."""
    return _trace(model, example).layers


def default_neuron_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The final feature map before global pooling: methods.md §0's default neuron layer.

    That is the last leaf module whose output has a channel axis and a spatial or time axis not
    all of size 1 (``block4.2`` of small-cnn, ``relu`` of preact-resnet18). A model without one
    (an MLP) gets the last leaf with an N×F output before its final Conv/Linear layer. Either
    way the layer runs at or after the first Conv/Linear, so weights make its channels.
    """
    leaves = [
        info
        for info in _trace(model, example).layers
        if next(model.get_submodule(info.name).children(), None) is None
    ]
    weighted = [
        i for i, info in enumerate(leaves) if isinstance(model.get_submodule(info.name), WEIGHTED)
    ]
    check(bool(weighted), "the model runs no Conv1d, Conv2d or Linear layer; nothing to score")
    maps = [
        info
        for info in leaves[weighted[0] :]
        if info.output_shape and len(info.output_shape) >= 2 and max(info.output_shape[1:]) > 1
    ]
    if maps:
        return maps[-1].name
    flat = [
        info
        for info in leaves[weighted[0] : weighted[-1]]
        if info.output_shape and len(info.output_shape) == 1
    ]
    check(
        bool(flat),
        "found no module with a channel axis before the final layer; name the layer explicitly "
        "(see list_layers(model, example))",
    )
    return flat[-1].name


def layer_info(model: nn.Module, layer: str, example: torch.Tensor) -> LayerInfo:
    """The :class:`LayerInfo` of ``layer``; a UserError if it does not run or has no channels."""
    return _find(_trace(model, example), model, layer)


def _find(trace: _Trace, model: nn.Module, layer: str) -> LayerInfo:
    get_module(model, layer)
    info = next((i for i in trace.layers if i.name == layer), None)
    check(info is not None, f"layer {layer!r} does not run on this input; choose another layer")
    check(
        info.channels is not None,
        f"layer {layer!r} has no channel axis in its output (it needs N × C × ...); choose a "
        "conv, linear, norm or activation layer",
    )
    return info


def producer_of(model: nn.Module, layer: str, example: torch.Tensor) -> str:
    """The Conv1d/Conv2d/Linear whose weights make ``layer``'s channels.

    It is the last such module whose output is produced at or before ``layer``'s and whose
    output channel count equals ``layer``'s (``block4.0`` for small-cnn's ``block4.2``).
    Weight-gradient norms, benign salience and Adaptive Regularization act on its weights.
    """
    trace = _trace(model, example)
    info = _find(trace, model, layer)
    channels = {i.name: i.channels for i in trace.layers}
    done = trace.finished[: trace.finished.index(layer) + 1]
    for name in reversed(done):
        module = model.get_submodule(name)
        if isinstance(module, WEIGHTED) and channels[name] == info.channels:
            return name
    raise UserError(
        f"no Conv1d, Conv2d or Linear with {info.channels} output channels runs before layer "
        f"{layer!r}; name the producing layer explicitly"
    )
