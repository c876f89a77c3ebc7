"""FST: feature shift tuning (Min, Qin, Shen, Cheng, "Towards Stable Backdoor Purification
through Feature Shift Tuning", NeurIPS 2023; methods.md §6).

Re-initialise the linear head (weights and bias uniform in ±1/√fan_in), then fine-tune the whole
model on ``tune`` with

    L(θ) + α · ⟨W, W₀⟩

where W is the head's weight matrix and W₀ the backdoored model's, so the new head is pushed away
from the old one and the features must shift with it. After every step W is rescaled to the norm
of W₀, so the penalty cannot be met by shrinking W.

"The linear head" is the last ``nn.Linear`` that produces the model's logits, found by tracing one
batch (:func:`~torchpurify.neurons.units.linear_head`; ``head`` names another module). Defaults
from the authors' code (AISafety-HKUST/stable_backdoor_purification ``fine_tune/ft.py``): SGD lr
0.01, momentum 0.9, no weight decay, cosine schedule; α = 0.05 and 30 epochs from the development
cells (the authors' α = 0.2 and 10 epochs were rolled back there; methods.md §12.14).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.checks import default
from torchpurify.defenses.base import Clean, Purified, register_defense
from torchpurify.defenses.recipe import FineTuneRecipe
from torchpurify.errors import UserError
from torchpurify.logs import FeatureShiftLog
from torchpurify.neurons.layers import get_module
from torchpurify.neurons.units import linear_head
from torchpurify.train import descend, fit

# Where these defaults come from (methods.md, "Where each default comes from").
PAPER = (
    "paper: FST's code (AISafety-HKUST/stable_backdoor_purification fine_tune/ft.py), "
    "methods.md §6.2"
)
FST_DEV = (
    "dev: configs/dev-image-sweep.yaml and -3.yaml (four small-cnn, seed 100): the authors' "
    "alpha 0.2 x 10 epochs (tuned for ResNet-18 on CIFAR-10) was rolled back on both models it "
    "ran on; alpha 0.05 x 30 epochs left none of the three backdoored models suspected at -3.1 / "
    "-1.9 guard-half points (backdoored / clean), the least over the rule's budgets; on "
    "configs/dev-audio-sweep.yaml every setting was rolled back (methods.md §12.14)"
)


def reinitialise(layer: nn.Linear) -> None:
    """Weights and bias uniform in ±1/√fan_in (the authors' re-initialisation)."""
    bound = 1 / math.sqrt(layer.weight.shape[1])
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound)
        if layer.bias is not None:
            layer.bias.uniform_(-bound, bound)


def feature_shift_step(head: nn.Linear, original: torch.Tensor, alpha: float):
    """A :data:`torchpurify.train.Step`: CE + α·⟨W, W₀⟩ (+ the recipe's distillation term),
    then W rescaled to ‖W₀‖."""
    target_norm = original.norm()

    def step(model, x, y, optimizer, cost, distill=None):
        reference = original.to(head.weight.device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        (loss + alpha * (head.weight * reference).sum()).backward()
        descend(model, x, optimizer, distill)
        with torch.no_grad():
            head.weight.mul_(target_norm.to(head.weight.device) / head.weight.norm())
        return loss.detach()

    return step


@register_defense
@dataclass
class FeatureShiftTuning(FineTuneRecipe):
    name = "fst"
    summary = "re-initialise the head, fine-tune pushing it from the old one (Min et al. 2023)"

    epochs: int = default(30, FST_DEV)
    lr: float = default(0.01, PAPER)
    momentum: float = default(0.9, PAPER)
    weight_decay: float = default(0.0, PAPER)
    alpha: float = default(0.05, FST_DEV)
    head: str | None = default(None, "paper: the linear head, found generically (methods.md §6.2)")

    def validate(self) -> None:
        super().validate()
        self.require("alpha", self.alpha >= 0, "≥ 0")

    def back_off(self) -> FeatureShiftTuning:
        """The guard's gentler version: half the push away from the old head (α) and twice the
        steps for the new head to learn, at the same rate — FST's cost comes from α and too few
        steps, and a halved rate moved it away from the budget (methods.md §0)."""
        return dataclasses.replace(self, alpha=self.alpha / 2, epochs=self.epochs * 2)

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        name = self.head or linear_head(model, clean.tune.x[:2])
        head = get_module(model, name)
        if not isinstance(head, nn.Linear):
            raise UserError(f"fst: head {name!r} is a {type(head).__name__}, not an nn.Linear")
        original = head.weight.detach().clone()
        reinitialise(head)
        result = fit(
            model,
            clean.tune,
            self.train_config(),
            step=feature_shift_step(head, original, self.alpha),
            description=self.name,
        )
        weight = head.weight.detach().cpu()
        cosine = F.cosine_similarity(weight.flatten(), original.cpu().flatten(), dim=0)
        log = FeatureShiftLog(
            head=name,
            head_norm=float(original.norm()),
            head_cosine_to_original=float(cosine),
            history=result.history,
        )
        return Purified(model, log.to_dict())
