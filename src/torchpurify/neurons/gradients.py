"""Gradient-based neuron scores: weight-gradient norms (methods.md §5), benign salience (§4),
and the activation-based neuron groups that GN-FT's diagnostics plot against (§5).

Gradients here are taken with ``torch.autograd.grad`` in eval mode: the model's ``.grad``
fields, weights and BatchNorm running statistics are left exactly as they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.data.base import Split
from torchpurify.errors import UserError, check
from torchpurify.neurons.layers import WEIGHTED, get_module, model_device
from torchpurify.neurons.stats import ActivationStats, Transform, iter_batches


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    module = get_module(model, name)
    check(
        isinstance(module, WEIGHTED),
        f"layer {name!r} is a {type(module).__name__}; name a Conv1d, Conv2d or Linear module "
        "(producer_of(model, layer, example) finds the one behind a layer)",
    )
    check(
        module.weight.requires_grad,
        f"{name}.weight does not require gradients; unfreeze it (requires_grad_(True))",
    )
    return module.weight


def _loss_gradients(model, data, weights, batch_size, device, transform):
    """Yield the cross-entropy gradients of ``weights`` batch by batch, in eval mode."""
    check(isinstance(data, Split), "data must be a Split (inputs and labels) to take a loss")
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    try:
        for x, y in iter_batches(data, batch_size, device, transform):
            loss = F.cross_entropy(model(x), y)
            yield torch.autograd.grad(loss, weights)
    finally:
        model.train(was_training)


def weight_gradient_norms(
    model: nn.Module,
    data: Split,
    layers: Sequence[str] | None = None,
    *,
    transform: Transform | None = None,
    batch_size: int = 128,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Per output channel of each conv/linear module (default: all), the L2 norm of the loss's
    weight gradient over that channel's fan-in, averaged over batches (GN-FT's diagnostic).

    The loss is cross-entropy against ``data.y``; ``transform`` (e.g. a trigger) acts on inputs.
    """
    if layers is None:
        layers = [name for name, module in model.named_modules() if isinstance(module, WEIGHTED)]
    check(len(layers) > 0, "layers is empty; name at least one Conv1d, Conv2d or Linear module")
    weights = [_weight(model, name) for name in layers]
    sums = [torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) for w in weights]
    batches = 0
    for grads in _loss_gradients(model, data, weights, batch_size, device, transform):
        for total, grad in zip(sums, grads, strict=True):
            total += grad.flatten(1).norm(dim=1)
        batches += 1
    return {name: (total / batches).float().cpu() for name, total in zip(layers, sums, strict=True)}


class BenignSalience:
    """Benign salience of the weights of chosen conv/linear modules (Fan et al., methods.md §4).

    Per weight, an exponential moving average ``s ← η·s + (1 − η)·(−g ⊙ w)`` (from s = 0) of the
    first-order loss change if the weight were removed: high means the clean task needs it.
    Call :meth:`update` after each backward pass (before the optimiser step, so ``w`` is the
    weight the gradient was taken at), or :meth:`warm_up` to fill it without training.
    """

    def __init__(self, modules: Sequence[str], decay: float = 0.9) -> None:
        check(
            isinstance(modules, (list, tuple)) and len(modules) > 0,
            f"modules must be a non-empty list of module names, got {modules!r}",
        )
        check(0 <= decay < 1, f"decay must be in [0, 1), got {decay}")
        self.modules = list(modules)
        self.decay = decay
        self._scores: dict[str, torch.Tensor] = {}

    def _add(self, name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        estimate = -(grad.detach() * weight.detach())
        previous = self._scores.get(name, torch.zeros_like(estimate))
        self._scores[name] = self.decay * previous + (1 - self.decay) * estimate

    def update(self, model: nn.Module) -> None:
        """Fold in the gradients now in the modules' ``weight.grad``."""
        for name in self.modules:
            weight = _weight(model, name)
            check(
                weight.grad is not None,
                f"{name}.weight has no gradient; call update(model) after loss.backward()",
            )
            self._add(name, weight, weight.grad)

    def warm_up(
        self,
        model: nn.Module,
        data: Split,
        batch_size: int = 128,
        *,
        device: torch.device | str | None = None,
    ) -> BenignSalience:
        """One pass over ``data`` (cross-entropy, eval mode) that updates salience, not weights."""
        weights = [_weight(model, name) for name in self.modules]
        for grads in _loss_gradients(model, data, weights, batch_size, device, None):
            for name, weight, grad in zip(self.modules, weights, grads, strict=True):
                self._add(name, weight, grad)
        return self

    def weight_salience(self, module: str) -> torch.Tensor:
        """Salience of each weight element of ``module`` (shaped like its weight)."""
        check(
            module in self.modules, f"module {module!r} is not tracked; track one of {self.modules}"
        )
        if module not in self._scores:
            raise UserError(f"no salience for {module!r} yet; call warm_up() or update() first")
        return self._scores[module].clone()

    def neuron_salience(self, module: str) -> torch.Tensor:
        """Salience of each output channel of ``module``: the sum over its fan-in weights."""
        return self.weight_salience(module).flatten(1).sum(1)


def neuron_groups(clean: ActivationStats, triggered: ActivationStats, z: float = 1.0) -> list[str]:
    """Label each channel backdoored, hybrid, clean or dormant from its mean activations.

    A channel is *active* under a condition when its mean activation's z-score across the
    layer's channels exceeds ``z``: backdoored = active on triggered inputs only, clean = on
    clean inputs only, hybrid = on both, dormant = on neither (GN-FT's groups, methods.md §5).
    """
    check(
        clean.mean.shape == triggered.mean.shape,
        f"clean and triggered stats have {len(clean.mean)} and {len(triggered.mean)} channels; "
        "measure both on the same layer",
    )

    def active(mean: torch.Tensor) -> torch.Tensor:
        spread = mean.std(unbiased=False).clamp_min(torch.finfo(mean.dtype).tiny)
        return (mean - mean.mean()) / spread > z

    names = {(False, True): "backdoored", (True, True): "hybrid", (True, False): "clean"}
    pairs = zip(active(clean.mean).tolist(), active(triggered.mean).tolist(), strict=True)
    return [names.get(pair, "dormant") for pair in pairs]
