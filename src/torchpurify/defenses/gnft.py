"""GN-FT: fine-tuning with a gradient-norm penalty (Zhou, Lin, Liu, ICASSP 2025; methods.md §5),
and FT, the plain fine-tuning baseline it is compared with (the same recipe with α = 0).

The objective on ``tune`` is ``L(θ) + λ·‖∇L(θ)‖₂`` (plus, by default, ``β·KL(p_input ‖ p_θ)``:
``distill``, this project's addition, methods.md §12.8). Its gradient is ``g + λ·H·g/‖g‖``.
``mode="exact"`` differentiates the penalty by double backprop. ``mode="approx"`` uses the
two-pass estimate ``(1 − α)·g1 + α·g2`` with ``g2 = ∇L(θ + r·g1/‖g1‖)`` and ``α = λ/r``, since
``g2 ≈ g1 + r·H·g1/‖g1‖``. That holds for small r only; at the radii that remove backdoors
(a few per cent of ‖θ‖) the two-pass step is sharpness-aware minimisation (SAM, ρ = r) mixed
with the plain gradient — measured in methods.md §5. ``radius="relative"`` (default) gives r as
a fraction of the weights' norm, so one default fits models of any scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.checks import default
from torchpurify.defenses.base import Clean, Purified, register_defense
from torchpurify.defenses.recipe import FineTuneRecipe
from torchpurify.train import FrozenRunningStats, fit

DEV_RADIUS = (
    "dev: development seed 100 (configs/dev-image.yaml BadNets small-cnn, configs/dev-nobn.yaml), "
    "methods.md §5, §11.4"
)


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
    """The update direction of the gradient-norm-penalised loss, and the plain loss.

    Returns one tensor per trainable parameter (same order as ``model.parameters()``);
    the model's weights are unchanged on return. With ``second_pass`` < 1 (approx only) the
    second pass sees just that leading fraction of the batch, and the direction is
    ``g1 + α·(g2_sub − g1_sub)``: the same expectation for ~(1 + second_pass)× the plain cost
    (passes are counted by the samples they see, :class:`torchpurify.train.count_passes`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
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
    # Restore θ from a copy, not by subtracting the step: θ + s − s is not θ in floating point.
    originals = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g, n in zip(params, g1, _norms(g1, per_tensor), strict=True):
            p.add_(g * (r / n))
    try:
        with FrozenRunningStats(model):
            g2 = torch.autograd.grad(F.cross_entropy(model(x[:m]), y[:m]), params)
    finally:
        with torch.no_grad():
            for p, original in zip(params, originals, strict=True):
                p.copy_(original)
    direction = [g + alpha * (b.detach() - a) for g, a, b in zip(g1, g1_sub, g2, strict=True)]
    return direction, loss.detach()


def gradient_norm_step(
    mode: str, r: float, alpha: float, per_tensor: bool, second_pass: float = 1.0
):
    """A :data:`torchpurify.train.Step` applying :func:`gradient_norm_direction`."""

    def step(model, x, y, optimizer, cost):
        direction, loss = gradient_norm_direction(
            model, x, y, mode=mode, r=r, alpha=alpha, per_tensor=per_tensor,
            second_pass=second_pass,
        )  # fmt: skip
        params = [p for p in model.parameters() if p.requires_grad]
        for p, d in zip(params, direction, strict=True):
            p.grad = d
        optimizer.step()
        return loss

    return step


@register_defense
@dataclass
class GradientNormFineTuning(FineTuneRecipe):
    name = "gnft"
    summary = "fine-tune with a gradient-norm penalty, two-pass approximation (Zhou et al. 2025)"
    # Back-off: the step and the radius (λ = α·r): a halved step alone still missed the budget
    # (methods.md §11.4), and the radius is what drove a no-BN model to a constant output (§5).
    gentler: ClassVar[tuple[str, ...]] = ("lr", "r")

    mode: str = default("approx", "paper: GN-FT's two-pass approximation (methods.md §5)")
    # radius="relative": r is a fraction of the weights' norm ‖θ‖ at the start (model-scale
    # free); "absolute": r itself. r and α were chosen on the development cells (methods.md §5,
    # §11.4): at these radii the two-pass step is SAM-like, not the Taylor penalty.
    radius: str = default("relative", DEV_RADIUS)
    r: float = default(0.04, DEV_RADIUS)
    alpha: float = default(0.9, DEV_RADIUS)
    per_tensor: bool = default(
        False, "paper: the objective's ‖∇θ L‖₂ is the global norm (methods.md §5)"
    )
    # The whole batch in both passes: FT and GN-FT see identical batches and BatchNorm
    # statistics are updated once per step, as in FT.
    second_pass: float = default(
        1.0, "protocol: both passes see the whole batch, so alpha 0 is FT step for step "
        "(methods.md §5)"
    )  # fmt: skip
    # Not in the paper: the clean outputs held near the input model's, β·KL(p_input ‖ p) on
    # each tune batch (Trainer.add_distillation), so the penalty removes the backdoor at a
    # fraction of the accuracy it cost without (development cells, methods.md §12.8).
    # distill=0 is the paper's objective; FT keeps 0 (plain fine-tuning).
    distill: float = default(
        8.0, "dev: configs/dev-audio-distill.yaml and configs/dev-image-distill.yaml, seeds "
        "100-102, after single runs on seed 100 (methods.md §12.8)"
    )  # fmt: skip

    def validate(self) -> None:
        super().validate()
        self.require("second_pass", 0 < self.second_pass <= 1, "in (0, 1]")
        self.require("mode", self.mode in ("approx", "exact"), "approx or exact")
        self.require("radius", self.radius in ("relative", "absolute"), "relative or absolute")
        self.require("r", self.r > 0, "positive")
        self.require("alpha", self.alpha >= 0, "≥ 0")

    def absolute_radius(self, model: nn.Module) -> float:
        """The perturbation radius in weight units: r, or r·‖θ‖ for ``radius="relative"``."""
        if self.radius == "absolute":
            return self.r
        params = [p.detach() for p in model.parameters() if p.requires_grad]
        return self.r * float(torch.sqrt(sum((p * p).sum() for p in params)))

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        r = self.absolute_radius(model)
        result = fit(
            model,
            clean.tune,
            self.train_config(),
            step=gradient_norm_step(self.mode, r, self.alpha, self.per_tensor, self.second_pass),
            description=self.name,
        )
        return Purified(model, {"radius": r, "lambda": self.alpha * r, "history": result.history})


@register_defense
@dataclass
class FineTuning(FineTuneRecipe):
    name = "ft"
    summary = "plain fine-tuning on the defender's clean data (GN-FT's recipe, alpha = 0)"

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        result = fit(model, clean.tune, self.train_config(), description=self.name)
        return Purified(model, {"history": result.history})
