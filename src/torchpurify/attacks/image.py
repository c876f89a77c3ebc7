"""Image triggers (methods.md §10) with BackdoorBench's default parameters.

All act on float images C×H×W (or batches N×C×H×W) in [0, 1].
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property

import torch
import torch.nn.functional as F

from torchpurify.attacks.base import Trigger, TriggerParams, register_attack


class ImageTrigger(Trigger):
    sample_dims = ("C", "H", "W")
    value_range = (0.0, 1.0)

    @property
    def height(self) -> int:
        return self.params.input_shape[1]

    @property
    def width(self) -> int:
        return self.params.input_shape[2]


@dataclasses.dataclass(frozen=True)
class BadNetsParams(TriggerParams):
    size: int = 3
    position: str = "bottom-right"


CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


@register_attack
class BadNets(ImageTrigger):
    """Gu et al. 2017: a size×size 0/1 checkerboard stamped into a corner of every channel."""

    name = "badnets"
    summary = "3x3 checkerboard patch in a corner (Gu et al. 2017)"
    params_class = BadNetsParams

    def validate(self) -> None:
        side = min(self.height, self.width)
        self.require("size", int, lambda n: 1 <= n <= side, f"an integer in [1, {side}]")
        self.require("position", str, CORNERS.__contains__, f"one of {', '.join(CORNERS)}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        size, position = self.params.size, self.params.position
        grid = torch.arange(size, device=x.device)
        checkerboard = ((grid[:, None] + grid[None, :]) % 2 == 0).to(x.dtype)
        top = self.height - size if position.startswith("bottom") else 0
        left = self.width - size if position.endswith("right") else 0
        out = x.clone()
        out[..., top : top + size, left : left + size] = checkerboard
        return out


@dataclasses.dataclass(frozen=True)
class BlendedParams(TriggerParams):
    alpha: float = 0.2


@register_attack
class Blended(ImageTrigger):
    """Chen et al. 2017: blend a fixed uniform-noise pattern drawn from the seed."""

    name = "blended"
    summary = "blend a fixed random pattern, x' = (1-alpha) x + alpha p (Chen et al. 2017)"
    params_class = BlendedParams

    def validate(self) -> None:
        self.require("alpha", float, lambda a: 0 < a <= 1, "a number in (0, 1]")

    @cached_property
    def pattern(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.params.seed)
        return torch.rand(self.params.input_shape, generator=generator)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.params.alpha
        return (1 - alpha) * x + alpha * self.pattern.to(x)


@dataclasses.dataclass(frozen=True)
class SIGParams(TriggerParams):
    delta: float = 20 / 255
    frequency: float = 6.0


@register_attack
class SIG(ImageTrigger):
    """Barni et al. 2019: add ``delta * sin(2π j f / W)`` along columns j; clean-label."""

    name = "sig"
    summary = "add a horizontal sinusoid, clean-label (Barni et al. 2019)"
    params_class = SIGParams
    clean_label = True

    def validate(self) -> None:
        self.require("delta", float, lambda d: 0 < d <= 1, "a number in (0, 1]")
        self.require("frequency", float, lambda f: f > 0, "a positive number")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        columns = torch.arange(self.width, device=x.device, dtype=x.dtype)
        signal = torch.sin(2 * math.pi * columns * self.params.frequency / self.width)
        return x + self.params.delta * signal


@dataclasses.dataclass(frozen=True)
class WaNetParams(TriggerParams):
    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0


@register_attack
class WaNet(ImageTrigger):
    """Nguyen & Tran, ICLR 2021: warp the image with a fixed smooth random displacement field.

    The field is a k×k control grid of uniform noise in [-1, 1], normalised by its mean absolute
    value and upsampled bicubically; its x / y components are divided by W / H (the paper's images
    are square) so displacements are isotropic in pixels. "Cross" samples get the trigger field plus
    per-sample noise and keep their labels, which stops the model learning any warp as the trigger.
    """

    name = "wanet"
    summary = "smooth warping field, with noise mode (Nguyen & Tran, ICLR 2021)"
    params_class = WaNetParams

    @property
    def cross_ratio(self) -> float:
        return self.params.cross_ratio

    def validate(self) -> None:
        side = min(self.height, self.width)
        self.require("k", int, lambda k: 2 <= k <= side, f"an integer in [2, {side}]")
        self.require("s", float, lambda s: s >= 0, "a number >= 0")
        self.require("grid_rescale", float, lambda r: r > 0, "a positive number")
        self.require("cross_ratio", float, lambda r: r >= 0, "a number >= 0")

    @cached_property
    def pixel_scale(self) -> torch.Tensor:
        """Per-axis divisors (W, H) from field units to grid units; the paper divides by H."""
        return torch.tensor([float(self.width), float(self.height)])

    @cached_property
    def grid(self) -> torch.Tensor:
        """The trigger's sampling grid, 1×H×W×2 in [-1, 1] (x then y, as grid_sample wants)."""
        k, h, w = self.params.k, self.height, self.width
        generator = torch.Generator().manual_seed(self.params.seed)
        control = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
        control = control / control.abs().mean()
        field = F.interpolate(control, size=(h, w), mode="bicubic", align_corners=True)
        rows, cols = torch.meshgrid(
            torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij"
        )
        identity = torch.stack((cols, rows), dim=-1)[None]
        warped = identity + self.params.s * field.permute(0, 2, 3, 1) / self.pixel_scale
        return (warped * self.params.grid_rescale).clamp(-1, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.warp(x, self.grid.to(x).expand(len(x), -1, -1, -1))

    def noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The cross warp: the trigger grid plus per-sample jitter of up to about half a pixel."""

        def jittered_warp(batch: torch.Tensor) -> torch.Tensor:
            shape = (len(batch), self.height, self.width, 2)
            jitter = torch.rand(shape, generator=generator) * 2 - 1
            grid = (self.grid + jitter / self.pixel_scale).clamp(-1, 1)
            return self.warp(batch, grid.to(batch))

        return self.on_batch(x, jittered_warp)

    @staticmethod
    def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid, align_corners=True)
