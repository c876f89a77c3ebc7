"""Two-pass steps: the gradient at perturbed weights (GN-FT's gradient-norm step, which TSBD's
fine-tuning uses too, and FT-SAM's sharpness-aware step; methods.md §5, §6).

Each step on a batch: a first pass gives the gradient g at θ; the weights move to θ + ε, with ε
made from g (``r·g/‖g‖`` for the gradient-norm step, FT-SAM's adaptive ε); a second pass gives the
gradient at θ + ε (:func:`perturbed_gradient`), and θ is restored. The second pass sees the
same batch with BatchNorm normalising by its statistics, as in training, but its running
statistics are left as they were (:class:`~torchpurify.train.FrozenRunningStats`): the batch has
already moved them once. θ is restored from a copy: θ + ε − ε is not θ in floating point.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.train import Distillation, FrozenRunningStats, descend


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a step updates, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def perturbed_gradient(
    model: nn.Module,
    params: list[torch.Tensor],
    offsets: list[torch.Tensor],
    loss: Callable[[], torch.Tensor],
) -> list[torch.Tensor]:
    """The gradient of ``loss()`` with respect to ``params`` at ``params + offsets``, BatchNorm's
    running statistics frozen; ``params`` are exactly as they were on return. A parameter the
    loss does not reach gets a zero gradient."""
    originals = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, offset in zip(params, offsets, strict=True):
            p.add_(offset)
    try:
        with FrozenRunningStats(model):
            return gradients(loss(), params)
    finally:
        with torch.no_grad():
            for p, original in zip(params, originals, strict=True):
                p.copy_(original)


def gradients(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """∇ ``loss`` for each of ``params``; zero for a parameter the loss does not reach."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def step_along(
    model: nn.Module,
    x: torch.Tensor,
    direction: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    distill: Distillation | None = None,
) -> None:
    """One optimiser step with ``direction`` as the gradient of ``model``'s trainable
    parameters, plus the distillation term's gradient on the batch ``x`` when there is one."""
    for p, d in zip(trainable(model), direction, strict=True):
        p.grad = d
    descend(model, x, optimizer, distill)


def _norms(grads: list[torch.Tensor], per_tensor: bool) -> list[torch.Tensor]:
    """‖g‖ for each tensor: the global norm repeated, or each tensor's own norm."""
    if per_tensor:
        return [g.norm().clamp_min(1e-12) for g in grads]
    total = torch.sqrt(sum((g * g).sum() for g in grads)).clamp_min(1e-12)
    return [total] * len(grads)


def gradient_norm_direction(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mode: str = "approx",
    r: float = 0.05,
    alpha: float = 0.7,
    per_tensor: bool = False,
    second_pass: float = 1.0,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The update direction of the gradient-norm-penalised loss ``L + α·r·‖∇L‖`` (GN-FT,
    :mod:`~torchpurify.defenses.gnft`), and the plain loss.

    Returns one tensor per trainable parameter (same order as ``model.parameters()``);
    the model's weights are unchanged on return. ``mode="exact"`` differentiates the penalty by
    double backprop; ``"approx"`` is the two-pass ``(1 − α)·g1 + α·g2`` with
    ``g2 = ∇L(θ + r·g1/‖g1‖)``. With ``second_pass`` < 1 (approx only) the second pass sees just
    that leading fraction of the batch, and the direction is ``g1 + α·(g2_sub − g1_sub)``: the
    same expectation for ~(1 + second_pass)× the plain cost (passes are counted by the samples
    they see, :class:`torchpurify.train.count_passes`).
    """
    params = trainable(model)
    if mode == "exact":
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        norms = _norms(list(grads), per_tensor)
        penalty = sum(g.norm() for g in grads) if per_tensor else norms[0]
        direction = torch.autograd.grad(loss + alpha * r * penalty, params)
        return [d.detach() for d in direction], loss.detach()
    m = len(x) if alpha == 0 else max(1, min(len(x), round(second_pass * len(x))))
    loss = F.cross_entropy(model(x[:m]), y[:m])
    g1_sub = [g.detach() for g in torch.autograd.grad(loss, params)]
    g1 = g1_sub
    if m < len(x):  # the rest of the batch, so the plain part of the step sees all of it
        rest = F.cross_entropy(model(x[m:]), y[m:])
        g_rest = torch.autograd.grad(rest, params)
        share = m / len(x)
        g1 = [share * a + (1 - share) * b for a, b in zip(g1_sub, g_rest, strict=True)]
        loss = share * loss + (1 - share) * rest
    if alpha == 0:
        return g1, loss.detach()
    offsets = [g * (r / n) for g, n in zip(g1, _norms(g1, per_tensor), strict=True)]
    g2 = perturbed_gradient(model, params, offsets, lambda: F.cross_entropy(model(x[:m]), y[:m]))
    direction = [g + alpha * (b.detach() - a) for g, a, b in zip(g1, g1_sub, g2, strict=True)]
    return direction, loss.detach()


def gradient_norm_step(
    mode: str, r: float, alpha: float, per_tensor: bool, second_pass: float = 1.0
):
    """A :data:`torchpurify.train.Step` applying :func:`gradient_norm_direction` (and the
    recipe's distillation term, :class:`~torchpurify.train.Distillation`, when it has one)."""

    def step(model, x, y, optimizer, cost, distill=None):
        direction, loss = gradient_norm_direction(
            model, x, y, mode=mode, r=r, alpha=alpha, per_tensor=per_tensor,
            second_pass=second_pass,
        )  # fmt: skip
        step_along(model, x, direction, optimizer, distill)
        return loss

    return step
