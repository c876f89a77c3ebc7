"""Per-channel activation statistics of one layer in one streaming pass (methods.md §2, §3, §8).

A forward hook folds each batch's activations into running per-channel sums and drops them, so
memory does not grow with the number of samples, whatever the data size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from torchpurify.data.base import Split
from torchpurify.errors import UserError, check
from torchpurify.neurons.layers import get_module, model_device

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ActivationStats:
    """Per-channel statistics (float32, CPU, one value per channel) over ``count`` samples.

    ``mean``: signed mean over positions, then samples (Fine-Pruning's ranking);
    ``l1``: mean of |A|; ``l2``: per-sample RMS over positions, averaged over samples;
    ``linf``: per-sample max over positions of A (signed, as methods.md §3), averaged.
    """

    mean: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor
    linf: torch.Tensor
    count: int


def iter_batches(
    data: Split | torch.Tensor,
    batch_size: int,
    device: torch.device,
    transform: Transform | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(inputs, labels)`` batches on ``device``, inputs transformed; labels None for a tensor."""
    check(
        isinstance(batch_size, int) and batch_size >= 1,
        f"batch_size must be a positive integer, got {batch_size!r}",
    )
    x, y = (data.x, data.y) if isinstance(data, Split) else (data, None)
    check(isinstance(x, torch.Tensor), f"data must be a Split or a tensor, got {type(data)}")
    check(len(x) > 0, "data is empty; pass at least one sample")
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        if transform is not None:
            batch = transform(batch)
        labels = None if y is None else y[start : start + batch_size].to(device)
        yield batch.to(device), labels


@torch.no_grad()
def activation_stats(
    model: nn.Module,
    layer: str,
    data: Split | torch.Tensor,
    *,
    transform: Transform | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> ActivationStats:
    """Stream ``data`` (optionally ``transform``-ed, e.g. triggered) once through ``model``.

    Runs in eval mode (BatchNorm uses its running statistics) and restores the model's mode.
    """
    module = get_module(model, layer)
    device = torch.device(device) if device is not None else model_device(model)
    sums: dict[str, torch.Tensor] = {}
    count = 0

    def accumulate(module, args, output):
        nonlocal count
        check(
            isinstance(output, torch.Tensor) and output.dim() >= 2,
            f"layer {layer!r} has no channel axis (N × C × ...); choose another layer",
        )
        a = output.detach().double()
        a = a.flatten(2) if a.dim() > 2 else a[..., None]  # N × C × positions
        per_sample = {
            "mean": a.mean(2),
            "l1": a.abs().mean(2),
            "l2": a.square().mean(2).sqrt(),
            "linf": a.amax(2),
        }
        for key, value in per_sample.items():
            total = value.sum(0)
            sums[key] = sums[key] + total if key in sums else total
        count += len(a)

    was_training = model.training
    model.eval()
    handle = module.register_forward_hook(accumulate)
    try:
        for x, _ in iter_batches(data, batch_size, device, transform):
            model(x)
    finally:
        handle.remove()
        model.train(was_training)
    if not count:
        raise UserError(f"layer {layer!r} did not run on this data; choose another layer")
    results = {key: (total / count).float().cpu() for key, total in sums.items()}
    return ActivationStats(count=count, **results)
