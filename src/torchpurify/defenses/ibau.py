"""I-BAU: implicit backdoor adversarial unlearning (Zeng, Chen, Park, Mao, Jin, Jia,
"Adversarial Unlearning of Backdoors via Implicit Hypergradient", ICLR 2022; methods.md §6).

The minimax problem  min_θ  max_{‖δ‖₂ ≤ C}  L(f_θ(x + δ), y)  over the clean ``tune`` data, with
one universal perturbation δ (the shape of one input), solved in ``rounds`` rounds:

1. Inner maximisation: δ from zero by one pass of SGD (lr ``perturbation_lr``) over ``tune`` on
   −L(f_θ(x + δ), f_θ(x)) + λ‖δ‖², projected onto the ball ‖δ‖₂ ≤ C after every step.
2. Outer minimisation: one pass over ``tune`` with Adam on the implicit hypergradient of
   L_out(δ, θ) = L(f_θ(x + m ⊙ δ), y), m marking a random ``portion`` of each batch, where δ is
   the fixed point of Φ(δ, θ) = δ − η·∇_δ [−L(f_θ(x₀ + δ), y₀) + λ‖δ‖²] on the first batch (x₀, y₀):

       dL_out/dθ = ∂_θ L_out + (∂_θ Φ)ᵀ v,   v = (∂_δ Φ)ᵀ v + ∂_δ L_out  (K fixed-point steps)

The model stays in evaluation mode throughout (BatchNorm statistics frozen, no dropout), as in the
authors' code. Each outer step runs two forward passes, and backward passes through the
gradient of the inner loss: one plus one vector-Jacobian product per fixed-point step, plus one.

Defaults from the authors' code (YiZeng623/I-BAU ``defense.py``, ``hypergrad.py``): 5 rounds,
K = 5, Adam lr 0.001, η = 0.1, perturbation lr 10, λ = 0.001, portion 0.01 (at least one sample
a batch). The radius: their C = 10 (a projection left commented out in their code; the paper's
problem has the ball) on CIFAR-10 images in [0, 1], whose mean ℓ2 norm is about 29.7 — a third
of an image. Here C = ``max_norm`` × the mean ℓ2 norm of the ``tune`` inputs (``max_norm`` =
0.34), so images of any size and raw waveforms get the same relative budget (a fixed C = 10 was
about 80 % of a Fashion-MNIST image's norm).

Monitoring (``log["rounds"]``, one record a round): the inner loss of the perturbation search
(its last batch), and for the fixed-point iteration of every outer step the relative residual
‖v_K − v_{K−1}‖ / ‖v_K‖ and the contraction ratio ‖v_K − v_{K−1}‖ / ‖v_{K−1} − v_{K−2}‖: a
ratio above 1 means ∂_δΦ does not contract and the K-term sum diverges. There the iteration
stops and keeps the partial sum from before the terms began to grow (the authors' code sums
all K terms whatever they do); such steps are counted (``diverging_steps``) and the log says
``diverging``. A non-finite v raises :class:`Divergence` (the guard backs off). On the tiny
test task the K-term sum grew on most steps, and summing it anyway collapsed holdout accuracy
to 0.53; with the stop the result kept 0.99.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.checks import default
from torchpurify.data.base import Split
from torchpurify.defenses.base import Clean, Defense, Purified, register_defense
from torchpurify.defenses.recipe import adam
from torchpurify.errors import Divergence
from torchpurify.logs import ImplicitUnlearningLog
from torchpurify.train import fit

# Where these defaults come from (methods.md, "Where each default comes from").
PAPER = "paper: I-BAU's code (YiZeng623/I-BAU defense.py, hypergrad.py), methods.md §6.4"


def project(delta: torch.Tensor, radius: float) -> None:
    """Scale ``delta`` in place onto the L2 ball of ``radius`` if it lies outside."""
    norm = float(delta.norm())
    if norm > radius:
        delta.mul_(radius / norm)


def find_perturbation(
    model: nn.Module,
    data: Split,
    *,
    batch_size: int,
    lr: float,
    weight: float,
    radius: float,
    record: dict | None = None,
) -> torch.Tensor:
    """One SGD pass (in data order) maximising the loss against the model's own predictions;
    ``record["inner_loss"]`` gets the last batch's loss when ``record`` is given."""
    device = next(model.parameters()).device
    delta = torch.zeros(1, *data.x.shape[1:], device=device, requires_grad=True)
    optimizer = torch.optim.SGD([delta], lr=lr)
    for start in range(0, len(data), batch_size):
        x = data.x[start : start + batch_size].to(device)
        with torch.no_grad():
            predicted = model(x).argmax(1)
        loss = -F.cross_entropy(model(x + delta), predicted) + weight * delta.pow(2).sum()
        (delta.grad,) = torch.autograd.grad(loss, [delta])
        optimizer.step()
        with torch.no_grad():
            project(delta, radius)
    if record is not None:
        record["inner_loss"] = float(loss.detach())
    return delta.detach()


def input_norm(data: Split) -> float:
    """The mean ℓ2 norm of ``data``'s inputs (one sample each): the scale of the radius."""
    return float(data.x.flatten(1).float().norm(dim=1).mean())


def hypergradient_step(
    state: dict,
    first: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int,
    inner_lr: float,
    weight: float,
    portion: float,
    generator: torch.Generator,
    monitor: list | None = None,
):
    """A :data:`torchpurify.train.Step` applying the implicit hypergradient of the outer loss;
    ``monitor`` (a list) gets each step's fixed-point ``residual`` and ``ratio``."""

    def step(model, x, y, optimizer, cost):
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        delta = state["delta"].to(x.device).requires_grad_(True)
        count = max(1, round(portion * len(x)))
        chosen = torch.randperm(len(x), generator=generator)[:count].to(x.device)
        mask = torch.zeros(len(x), *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        mask[chosen] = 1
        outer = F.cross_entropy(model(x + mask * delta), y)
        grad_delta, *grad_theta = torch.autograd.grad(outer, [delta, *params], allow_unused=True)
        x0, y0 = (t.to(x.device) for t in first)
        inner = -F.cross_entropy(model(x0 + delta), y0) + weight * delta.pow(2).sum()
        (inner_grad,) = torch.autograd.grad(inner, [delta], create_graph=True)
        mapped = delta - inner_lr * inner_grad
        v = torch.zeros_like(delta)
        changes = []
        for _ in range(steps):
            previous = v
            (jv,) = torch.autograd.grad(mapped, [delta], grad_outputs=v, retain_graph=True)
            v = jv + grad_delta
            changes.append(float((v - previous).norm()))
            if len(changes) > 1 and changes[-1] > changes[-2]:  # growing terms: it diverges
                v = previous  # the partial sum before the terms began to grow
                break
            if changes[-1] < 1e-10:
                break
        if not all(math.isfinite(c) for c in changes):
            raise Divergence(
                "i-bau: the fixed-point iteration diverged (non-finite v); lower inner_lr"
            )
        if monitor is not None:
            ratio = changes[-1] / changes[-2] if len(changes) > 1 and changes[-2] > 0 else 0.0
            monitor.append({"residual": changes[-1] / max(float(v.norm()), 1e-12), "ratio": ratio})
        implicit = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
        for p, direct, extra in zip(params, grad_theta, implicit, strict=True):
            total = torch.zeros_like(p)
            for part in (direct, extra):
                if part is not None:
                    total = total + part
            p.grad = total
        optimizer.step()
        return outer.detach()

    return step


@register_defense
@dataclass
class ImplicitBackdoorAdversarialUnlearning(Defense):
    name = "i-bau"
    summary = "unlearn a universal adversarial perturbation via implicit hypergradients (Zeng 2022)"
    quick = {"rounds": 1, "fixed_point_steps": 2}

    rounds: int = default(5, PAPER)
    fixed_point_steps: int = default(5, PAPER)
    lr: float = default(0.001, PAPER)
    inner_lr: float = default(0.1, PAPER)
    perturbation_lr: float = default(10.0, PAPER)
    perturbation_weight: float = default(0.001, PAPER)
    max_norm: float = default(
        0.34, "paper: the authors' radius C = 10 (commented out in YiZeng623/I-BAU defense.py) "
        "over CIFAR-10's mean image norm of about 29.7, as a multiple of the tune inputs' mean "
        "norm, methods.md §6.4"
    )  # fmt: skip
    portion: float = default(0.01, PAPER)

    def validate(self) -> None:
        self.require("rounds", self.rounds >= 1, "at least 1")
        self.require("fixed_point_steps", self.fixed_point_steps >= 1, "at least 1")
        self.require("lr", self.lr > 0, "positive")
        self.require("inner_lr", self.inner_lr > 0, "positive")
        self.require("perturbation_lr", self.perturbation_lr > 0, "positive")
        self.require("perturbation_weight", self.perturbation_weight >= 0, "≥ 0")
        self.require("max_norm", self.max_norm > 0, "positive")
        self.require("portion", 0 < self.portion <= 1, "in (0, 1]")

    def back_off(self) -> ImplicitBackdoorAdversarialUnlearning:
        """The guard's gentler version: half the radius of the perturbation it unlearns. Its
        cost is that perturbation (it sits on its ball every round), not the step: at half the
        outer learning rate the audio holdout collapsed as before (methods.md §6.9, §12.10)."""
        return replace(self, max_norm=self.max_norm / 2)

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        model.eval()
        scale = input_norm(clean.tune)
        radius = self.max_norm * scale
        search = {
            "batch_size": self.batch_size,
            "lr": self.perturbation_lr,
            "weight": self.perturbation_weight,
            "radius": radius,
        }
        rounds: list[dict] = [{}]
        steps: list[dict] = []
        # cuDNN has no double backward for recurrent layers; the hypergradient needs one.
        with torch.backends.cudnn.flags(enabled=False):
            state = {"delta": find_perturbation(model, clean.tune, **search, record=rounds[-1])}
            norms = [float(state["delta"].norm())]

            def next_round(record: dict) -> None:
                record["perturbation_norm"] = norms[-1]
                done = rounds[-1]
                done["perturbation_norm"] = norms[-1]
                done["fixed_point_residual"] = sum(s["residual"] for s in steps) / max(
                    1, len(steps)
                )
                done["contraction"] = max((s["ratio"] for s in steps), default=0.0)
                done["diverging_steps"] = sum(s["ratio"] > 1 for s in steps)
                done["steps"] = len(steps)
                record.update({k: v for k, v in done.items() if k != "perturbation_norm"})
                steps.clear()
                if record["epoch"] < self.rounds:
                    rounds.append({})
                    state["delta"] = find_perturbation(
                        model, clean.tune, **search, record=rounds[-1]
                    )
                    norms.append(float(state["delta"].norm()))

            config = adam(self, self.rounds, self.lr, freeze_bn_stats=True)
            first = (clean.tune.x[: self.batch_size], clean.tune.y[: self.batch_size])
            step = hypergradient_step(
                state,
                first,
                steps=self.fixed_point_steps,
                inner_lr=self.inner_lr,
                weight=self.perturbation_weight,
                portion=self.portion,
                generator=torch.Generator().manual_seed(self.seed),
                monitor=steps,
            )
            result = fit(model, clean.tune, config, step=step, on_epoch=next_round,
                         description=self.name)  # fmt: skip
        log = ImplicitUnlearningLog(
            input_norm=scale,
            radius=radius,
            perturbation_norms=norms,
            rounds=rounds,
            diverging=any(r.get("diverging_steps", 0) for r in rounds),
            history=result.history,
        )
        return Purified(model, log.to_dict())
