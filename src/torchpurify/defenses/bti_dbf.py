"""BTI-DBF(U): backdoor trigger inversion by decoupling benign features, then unlearning (Xu,
Huang, Li, Qin, Ren, "Towards Reliable and Efficient Backdoor Trigger Inversion via Decoupling
Benign Features", ICLR 2024; methods.md §6.12).

A generator G learns to turn clean inputs into poisoned-looking ones without knowing the
trigger, by *decoupling benign features*; the model then unlearns what G makes, with the true
labels. ``rounds`` rounds of three steps on the clean ``tune`` data:

1. **Decoupling** (once a round): a mask m ∈ [0, 1] on the features φ of the model's neuron
   layer (the last feature map before global pooling, methods.md §0) such that the masked
   features keep the prediction and the rest lose it, ``CE(h(m⊙φ), y) − CE(h((1 − m)⊙φ), y)``
   (h: the layers after φ) — :mod:`torchpurify.neurons.generator`'s benign mask, ``mask_epochs``
   passes' worth of mini-batches.
2. **Inversion**: G (:class:`~torchpurify.neurons.generator.TriggerGenerator`, carried over from
   round to round with its optimiser) makes ``x' = clip(x + B_ε(G(x)))``, the change bounded in
   ℓ2 by ε per sample, and is trained for ``generator_epochs`` passes to move the features
   outside the mask while keeping those inside:
   ``−MSE((1 − m)⊙φ(x'), (1 − m)⊙φ(x)) + β·MSE(m⊙φ(x'), m⊙φ(x))``, and from the second round on
   ``+ CE(f(x'), t)``, t the label most generated inputs get in the first round (the authors'
   target detection, ``log["target"]``).
3. **Unlearning**: the model, in training mode, for ``unlearn_epochs`` passes with Adam: in each
   batch a random ``portion`` of the samples (and one more) is replaced by its x', and the loss
   is ``CE(f(batch), y) + γ·MSE(φ(x), φ(batch))`` — every sample, generated or not, with its
   **true** label, and the generated samples' features pulled to their clean ones.

Defaults from the authors' code (xuxiong0214/BTIDBF ``btidbfu.py``, ``cfg.py``): mask lr 0.01,
generator Adam lr 1e-3, β = 0.01, classifier Adam lr 1e-4, portion 0.1, γ = 1. **Scaled to this
project's small models and 2-core budget**: their 5 rounds of 20 mask, 30 generator and 30
unlearning epochs over 5 % of CIFAR-10 are here 1 round of 5, 10 and 10 (the epochs sized for
cost; one round against two chosen on development cells, notebook §12.15).

Where this differs from the authors' code (issue 27 item 5 allows our own code):

- **The bound.** Theirs is a switch: while ``MSE(x', x)`` exceeds 0.3 (their inputs standardised
  per channel) or the benign features' MSE exceeds 3, the loss is ``MSE(x', x)`` alone. Here the
  change is bounded outright, ε = ``radius`` × the mean ‖x − x̄‖₂ of the tune inputs
  (:func:`.perturbation.data_scale`, the scale of every trigger family's radii): an MSE of 0.3 on
  standardised inputs is a root-mean-square change of √0.3 ≈ 0.55 of a value's spread, so
  ``radius`` = 0.55, for images of any range and raw waveforms alike. No feature bound.
- **The generator.** Theirs is a UNet pretrained to reproduce its input; ours is the estimate's
  three-convolution generator (CoordConv, starting as "no change", :mod:`.generator`), on the
  change rather than the input, so no pretraining is needed, and it handles N×T waveforms and
  N×C×H×W images alike.
- The mask is fitted with the model in evaluation mode (their copy is in training mode); the
  target vote reads G's inputs without their 0.03 Gaussian noise.

Cost per round: ``mask_epochs`` passes of two forward and backward passes through the model;
``generator_epochs`` of one forward pass on the clean batch and one forward and backward on the
generated one; ``unlearn_epochs`` of two forward passes (clean and mixed) and their backward.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.checks import default
from torchpurify.data.base import Split
from torchpurify.defenses.base import Clean, Defense, Purified, register_defense
from torchpurify.defenses.recipe import adam
from torchpurify.logs import GeneratorUnlearningLog
from torchpurify.neurons.generator import (
    TriggerGenerator,
    _benign_mask,
    _tapped,
    bounded,
    invert_generator,
)
from torchpurify.neurons.inversion import value_range_of
from torchpurify.neurons.layers import default_neuron_layer, model_device
from torchpurify.neurons.perturbation import data_scale
from torchpurify.train import fit

# Where these defaults come from (methods.md, "Where each default comes from").
PAPER = "paper: BTI-DBF's code (xuxiong0214/BTIDBF btidbfu.py, cfg.py), methods.md §6.12"
SCALED = (
    "protocol: sized for cost, not tuned on any cell: the authors' 20 mask, 30 generator and 30 "
    "unlearning epochs a round (cfg.py) cut to 5, 10 and 10, so that a round costs about FT's "
    "passes on this project's models (methods.md §6.12); the number of rounds is chosen on "
    "development cells"
)
ROUNDS = (
    "dev: configs/dev-image-sweep-5.yaml against parts 2-3 (four small-cnn, seed 100) by the "
    "development rule: one round within the cost budget (guard-half points -0.5 / -0.3, "
    "backdoored / clean), two over it (-0.5 / -1.9) at 3x the seconds; the authors' five "
    "rounds cost more still (notebook §12.15)"
)
# The standard deviation of G's last-layer weights at the start (see BackdoorTriggerInversion-
# Unlearning.run): small beside the bound, so G starts within a few percent of "no change".
START_SCALE = 1e-3
# How the target label is found: the estimate's generator search, or the authors' vote.
TARGET_RULES = ("search", "vote")


@register_defense
@dataclass
class BackdoorTriggerInversionUnlearning(Defense):
    name = "bti-dbf"
    summary = "invert the trigger by decoupling benign features, unlearn it (BTI-DBF(U), Xu 2024)"
    # The vote, not the search: the generator search climbs a ladder for every label.
    quick = {"rounds": 1, "mask_epochs": 1, "generator_epochs": 1, "unlearn_epochs": 1,
             "target_rule": "vote"}  # fmt: skip

    rounds: int = default(1, ROUNDS)
    mask_epochs: int = default(5, SCALED)
    generator_epochs: int = default(10, SCALED)
    unlearn_epochs: int = default(10, SCALED)
    mask_lr: float = default(0.01, PAPER)
    generator_lr: float = default(0.001, PAPER)
    lr: float = default(1e-4, PAPER)
    radius: float = default(
        0.55, "paper: the authors' bound MSE(x', x) ≤ 0.3 on standardised CIFAR-10 inputs "
        "(cfg.py norm_bound), a root-mean-square change of √0.3 of a value's spread, as a "
        "multiple of the tune inputs' mean distance from their mean, methods.md §6.12"
    )  # fmt: skip
    benign_weight: float = default(0.01, PAPER)
    portion: float = default(0.1, PAPER)
    feature_weight: float = default(1.0, PAPER)
    width: int = default(
        16, "protocol: the estimate's generator width (neurons/generator.py, methods.md §7.2)"
    )
    target_rule: str = default(
        "search", "dev: configs/dev-image-sweep-7.yaml against -5.yaml (four small-cnn, seed "
        "100, one round) by the development rule: the authors' vote is as cheap on the guard's "
        "half (-0.4 / -0.3 points against -0.5 / -0.3) and leaves as many backdoored models "
        "suspected (1), but a higher estimated ASR after (0.597 against 0.473), at 88 s a cell "
        "against 228 s; on the tiny test task the vote named label 3, the search the target 0 "
        "(methods.md §6.12, notebook §12.15)"
    )  # fmt: skip

    def validate(self) -> None:
        for knob in ("rounds", "generator_epochs", "unlearn_epochs", "width"):
            self.require(knob, getattr(self, knob) >= 1, "at least 1")
        self.require("mask_epochs", self.mask_epochs >= 0, "≥ 0")
        for knob in ("mask_lr", "generator_lr", "lr", "radius"):
            value = getattr(self, knob)
            self.require(knob, value > 0 and math.isfinite(value), "a positive finite number")
        self.require("benign_weight", self.benign_weight >= 0, "≥ 0")
        self.require("feature_weight", self.feature_weight >= 0, "≥ 0")
        self.require("portion", 0 <= self.portion < 1, "in [0, 1)")
        self.require("target_rule", self.target_rule in TARGET_RULES, " or ".join(TARGET_RULES))

    def back_off(self) -> BackdoorTriggerInversionUnlearning:
        """The guard's gentler version: half the bound on the generated change, so the inputs it
        unlearns lie nearer the clean ones, at the same step and learning rate."""
        return replace(self, radius=self.radius / 2)

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        tune = clean.tune
        device = model_device(model)
        model.eval()
        layer = default_neuron_layer(model, tune.x[:2].to(device))
        scale = data_scale(tune.x, "l2")
        bound = self.radius * scale
        low, high = value_range_of(tune.x)
        spread = float(tune.x.std()) or 1.0  # G reads standardised inputs (purify seeds it)
        generator = TriggerGenerator(
            tune.x.shape[1:], width=self.width, centre=float(tune.x.mean()), spread=spread
        )
        # G starts as "no change", where the gradient of the feature distance is zero (a saddle
        # the authors' pretrained UNet, not exactly the identity, never sits on): a small
        # random last layer starts it just off it.
        nn.init.normal_(generator.net[-1].weight, std=START_SCALE)
        generator.to(device)
        optimizer = torch.optim.Adam(generator.parameters(), lr=self.generator_lr)
        draw = torch.Generator().manual_seed(self.seed)

        def generated(x: torch.Tensor) -> torch.Tensor:
            return (x + bounded(generator(x), "l2", bound)).clamp(low, high)

        target: int | None = None
        log = GeneratorUnlearningLog(layer=layer, scale=scale, bound=bound)
        if self.target_rule == "search":
            search = invert_generator(model, tune, seed=self.seed, device=device)
            target = search.target
            log.search = {"radii": search.radii.tolist(), "target": target}
            if target is not None:  # G starts as the search's generator for the target
                generator.load_state_dict(search.trigger(target).generator.state_dict())
        rounds = []
        for number in range(1, self.rounds + 1):
            record: dict = {"round": number}
            with _frozen(model), _tapped(model, layer) as tap:
                steps = self.mask_epochs * max(1, len(tune) // self.batch_size)
                mask = _benign_mask(
                    model, tap, tune.x.to(device), tune.y.to(device), steps=steps,
                    batch_size=self.batch_size, lr=self.mask_lr, seed=self.seed + number,
                )  # fmt: skip
                record["mask_mean"] = float(mask.mean())
                generator.train()
                record.update(
                    self._invert(model, tap, tune, generated, optimizer, mask, target, draw)
                )
                generator.eval()
                if target is None:
                    target, record["target_share"] = _most_predicted(
                        model, tune, generated, self.batch_size
                    )
                record["target"] = target
            with _tapped(model, layer) as tap:
                record["unlearning"] = self._unlearn(model, tune, tap, generated, number)
            rounds.append(record)
        log.target, log.rounds = target, rounds
        return Purified(model, log.to_dict())

    def _invert(self, model, tap, tune, generated, optimizer, mask, target, draw) -> dict:
        """Train G for ``generator_epochs`` passes over ``tune`` (whole shuffled batches);
        returns the last pass's mean feature losses."""
        device = model_device(model)
        totals = {"moved_backdoor_features": 0.0, "moved_benign_features": 0.0}
        batches = max(1, len(tune) // self.batch_size)
        for _ in range(self.generator_epochs):
            order = torch.randperm(len(tune), generator=draw)
            for key in totals:
                totals[key] = 0.0
            for b in range(batches):
                x = tune.x[order[b * self.batch_size : (b + 1) * self.batch_size]].to(device)
                with torch.no_grad():
                    model(x)
                    features = tap.features
                logits = model(generated(x))
                backdoor = F.mse_loss((1 - mask) * tap.features, (1 - mask) * features)
                benign = F.mse_loss(mask * tap.features, mask * features)
                loss = -backdoor + self.benign_weight * benign
                if target is not None:
                    loss = loss + F.cross_entropy(
                        logits, torch.full_like(logits[:, 0], target, dtype=torch.long)
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                totals["moved_backdoor_features"] += float(backdoor.detach()) / batches
                totals["moved_benign_features"] += float(benign.detach()) / batches
        return totals

    def _unlearn(self, model, tune: Split, tap, generated, number: int) -> list[dict]:
        """Fine-tune ``model`` on batches with a ``portion`` of generated samples, all with
        their true labels (module docstring, step 3); the history of the training run."""
        draw = torch.Generator().manual_seed(self.seed * 1_000 + number)

        def step(model, x, y, optimizer, cost):
            count = int(self.portion * len(x) + 1)
            chosen = torch.randperm(len(x), generator=draw)[:count].to(x.device)
            mixed = x.clone()
            with torch.no_grad():
                mixed[chosen] = generated(x[chosen])
            model(x)
            features = tap.features
            logits = model(mixed)
            loss = F.cross_entropy(logits, y)
            loss = loss + self.feature_weight * F.mse_loss(features, tap.features)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()

        config = adam(self, self.unlearn_epochs, self.lr, seed=self.seed + number)
        return fit(model, tune, config, step=step, description=self.name).history


@contextmanager
def _frozen(model: nn.Module):
    """Within the block the model's parameters take no gradient (only G and the mask train)."""
    wanted = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), wanted, strict=True):
            p.requires_grad_(flag)


@torch.no_grad()
def _most_predicted(model, tune: Split, generated, batch_size: int) -> tuple[int, float]:
    """The label the model gives most of the generated tune inputs, and its share (the authors'
    ``get_target_label``)."""
    device = model_device(model)
    counts = None
    for start in range(0, len(tune), 4 * batch_size):
        logits = model(generated(tune.x[start : start + 4 * batch_size].to(device)))
        found = torch.bincount(logits.argmax(1), minlength=logits.shape[1]).cpu()
        counts = found if counts is None else counts + found
    assert counts is not None
    return int(counts.argmax()), float(counts.max() / counts.sum())
