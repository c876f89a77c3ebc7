"""RNP: reconstructive neuron pruning (Li, Lyu, Ma, Koren, Lyu, Li, Jiang, ICML 2023;
methods.md §6).

1. **Unlearn**: on a copy of the model, gradient *ascent* on the clean ``tune`` data,
   ``θ ← θ + η·∇θ L(θ)`` (SGD, lr 0.01, momentum 0.9, weight decay 5e-4, gradients clipped to
   norm 20, the rate divided by 10 after epochs 10 and 20), until the accuracy over an epoch
   falls to ``clean_threshold`` (0.2) or after ``unlearning_epochs`` (20). Clean features are
   destroyed first; the backdoor, which clean data never exercised, survives.
2. **Recover**: freeze the unlearned weights and learn one mask m_k ∈ [0, 1] per neuron
   (the reference masks BatchNorm weights, here the same neurons as ANP, ``anp.mask_neurons``)
   by *minimising* ``α·L`` on ``tune`` (α = 0.2, SGD lr 0.2, momentum 0.9, 20 epochs, clipped
   to [0, 1]). Restoring clean accuracy needs the clean neurons; the backdoor neurons, which
   unlearning left intact and which hurt clean accuracy, end with small masks.
3. **Prune** the *original* model's neurons with mask values at or below a threshold: chosen on
   the holdout as in ANP (the reference sweeps it against the test set).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from torchpurify.checks import default
from torchpurify.data.base import Split
from torchpurify.defenses.anp import Gated, MaskPruning, NeuronGates, mask_neurons, mask_recipe
from torchpurify.defenses.base import Clean, Purified, register_defense
from torchpurify.train import TrainConfig, Trainer, fit

# Where these defaults come from (methods.md, "Where each default comes from").
PAPER = "paper: RNP's code (bboylyg/RNP main.py), methods.md §6.8"

MILESTONES = (10, 20)


@register_defense
@dataclass
class ReconstructiveNeuronPruning(MaskPruning):
    name = "rnp"
    summary = "unlearn on clean data, recover neuron masks, prune the original (Li et al. 2023)"

    unlearning_lr: float = default(0.01, PAPER)
    unlearning_epochs: int = default(20, PAPER)
    clean_threshold: float = default(0.2, PAPER)
    recovering_lr: float = default(0.2, PAPER)
    recovering_epochs: int = default(20, PAPER)
    alpha: float = default(0.2, PAPER)

    def validate(self) -> None:
        super().validate()
        self.require("unlearning_lr", self.unlearning_lr > 0, "positive")
        self.require("unlearning_epochs", self.unlearning_epochs >= 1, "at least 1")
        self.require("clean_threshold", 0 <= self.clean_threshold <= 1, "in [0, 1]")
        self.require("recovering_lr", self.recovering_lr > 0, "positive")
        self.require("recovering_epochs", self.recovering_epochs >= 1, "at least 1")
        self.require("alpha", self.alpha > 0, "positive")

    quick = {"unlearning_epochs": 2, "recovering_epochs": 2}

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        working = copy.deepcopy(model)
        unlearning = self.unlearn(working, clean.tune)
        gates = NeuronGates(working, mask_neurons(working, clean.holdout.x[:2]))

        def recovery_step(gated, x, y, optimizer, cost):
            optimizer.zero_grad(set_to_none=True)
            loss = self.alpha * F.cross_entropy(gated(x), y)
            loss.backward()
            optimizer.step()
            gated.gates.clamp_masks()
            return loss.detach()

        recovered = fit(
            Gated(working, gates),
            clean.tune,
            mask_recipe(self, self.recovering_epochs, self.recovering_lr),
            step=recovery_step,
            description=f"{self.name} recover",
        )
        gates.remove()
        log = self.prune(model, gates.values(), clean.holdout)
        log["unlearning"] = unlearning
        log["recovering"] = recovered.history
        return Purified(model, log)

    def unlearn(self, model: nn.Module, tune: Split) -> list[dict]:
        """Gradient ascent on ``tune``, epoch by epoch, until its accuracy reaches the threshold."""
        seen = {"correct": 0, "total": 0}

        def ascent_step(net, x, y, optimizer, cost):
            optimizer.zero_grad(set_to_none=True)
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            (-loss).backward()
            nn.utils.clip_grad_norm_(net.parameters(), max_norm=20)
            optimizer.step()
            seen["correct"] += int((logits.argmax(1) == y).sum())
            seen["total"] += len(y)
            return loss.detach()

        config = TrainConfig(
            epochs=self.unlearning_epochs,
            batch_size=self.batch_size,
            lr=self.unlearning_lr,
            momentum=0.9,
            weight_decay=5e-4,
            schedule="constant",
            seed=self.seed,
            device=self.device,
            progress=self.progress,
        )
        history = []
        with Trainer(model, tune, config, step=ascent_step, description="rnp unlearn") as trainer:
            for epoch in range(1, self.unlearning_epochs + 1):
                lr = self.unlearning_lr * 0.1 ** sum(epoch > m for m in MILESTONES)
                for group in trainer.optimizer.param_groups:
                    group["lr"] = lr
                seen.update(correct=0, total=0)
                record = trainer.epoch()
                record.update(lr=lr, train_acc=seen["correct"] / max(1, seen["total"]))
                history.append(record)
                if record["train_acc"] <= self.clean_threshold:
                    break
        return history
