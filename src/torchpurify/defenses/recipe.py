"""The fine-tuning recipe every defense that trains shares (FT, GN-FT, the pruners' fine-tuning,
Salience-AR, and the baselines): SGD with momentum and weight decay, a cosine schedule, and the
option to keep BatchNorm's running statistics frozen.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from torchpurify.checks import default
from torchpurify.defenses.base import Defense
from torchpurify.train import TrainConfig

# Sources shared by several defenses' fields (each field names its own; methods.md, "Where each
# default comes from").
SHARED_SGD = (
    "protocol: the shared fine-tuning recipe's SGD (methods.md §11; BackdoorBench's values, "
    "§6.1), not tuned"
)
FT_EPOCHS = (
    "dev: configs/dev-image-sweep-4.yaml and configs/dev-audio-sweep-2.yaml (four small-cnn and "
    "four kws-cnn, seed 100) by the development rule: 10 epochs chosen on both (guard-half "
    "points, backdoored / clean: images +0.5 / -0.0 against -0.1 / +0.3 at 20, audio -1.9 / "
    "-1.5 against -1.9 / -2.1), notebook §12.15"
)
FT_LR = (
    "dev: configs/dev-image-sweep.yaml and configs/dev-audio-sweep.yaml (seed 100): 0.02 costs "
    "more on both modalities (images -0.5 / -0.6 against -0.1 / +0.3, audio -2.6 / -2.6 "
    "against -1.9 / -2.1) and is not chosen, so 0.01 is kept (notebook §12.14, §12.15)"
)
BN_TRAINING_MODE = (
    "paper: fine-tuning as the papers run it, BatchNorm in training mode (methods.md §11.1)"
)


@dataclass
class FineTuneRecipe(Defense):
    """The fine-tuning recipe shared by FT and GN-FT (and the fine-tuning inside other methods)."""

    # Where each default comes from (methods.md, "Where each default comes from"). FT is this
    # recipe; a defense whose paper gives other values redeclares the field with its source.
    epochs: int = default(10, FT_EPOCHS)
    lr: float = default(0.01, FT_LR)
    momentum: float = default(0.9, SHARED_SGD)
    weight_decay: float = default(5e-4, SHARED_SGD)
    # Re-estimating BatchNorm statistics on clean-only data alone revives a pruned backdoor
    # (methods.md §11.1); frozen, the running statistics stay those the model was trained with.
    freeze_bn_stats: bool = default(False, BN_TRAINING_MODE)
    # Augment the tune set while fine-tuning (TrainConfig.augment: crop + flip on images, a
    # ±100 ms time shift on waveforms); off by default (methods.md §12.7).
    augment: bool = default(
        False,
        "dev: single runs on configs/dev-audio.yaml models, seed 100: augmentation removed a "
        "little more and cost more, so off for every fine-tuning defense (methods.md §12.7)",
    )
    # Hold the clean outputs near the input model's while fine-tuning: β of β·KL(p_input ‖ p),
    # on the tune batches (Trainer.add_distillation); 0 = off.
    distill: float = default(
        0.0, "paper: the method's own objective, no distillation term (methods.md §12.8)"
    )

    def validate(self) -> None:
        self.require("epochs", self.epochs >= 1, "at least 1")
        self.require("lr", self.lr > 0 and math.isfinite(self.lr), "a positive finite number")
        self.require("momentum", 0 <= self.momentum < 1, "in [0, 1)")
        self.require("weight_decay", self.weight_decay >= 0, "≥ 0")
        self.require("distill", self.distill >= 0, "≥ 0")

    # What the guard's back-off halves (methods.md §0): the step, and a method's own strength
    # knob where that is what costs accuracy (GN-FT's r, FT-SAM's rho, Salience-AR's alpha,
    # NAD's beta). A method whose cost lies elsewhere overrides back_off (FST, the pruners).
    gentler: ClassVar[tuple[str, ...]] = ("lr",)

    def back_off(self) -> FineTuneRecipe:
        """The guard's smaller step: the same recipe with every ``gentler`` knob halved."""
        return dataclasses.replace(self, **{k: getattr(self, k) / 2 for k in self.gentler})

    def train_config(self, epochs: int | None = None) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs if epochs is None else epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule="cosine",
            freeze_bn_stats=self.freeze_bn_stats,
            augment=self.augment,
            distill=self.distill,
            seed=self.seed,
            device=self.device,
            progress=self.progress,
        )


def adam(
    defense: Defense,
    epochs: int,
    lr: float,
    *,
    schedule: str = "constant",
    freeze_bn_stats: bool = False,
    seed: int | None = None,
) -> TrainConfig:
    """Adam without weight decay on the defense's batch size, seed (unless given), device and
    progress: the unlearning step of I-BAU, SAU and BTI-DBF(U) (their reference
    implementations' optimiser)."""
    return TrainConfig(
        epochs=epochs,
        batch_size=defense.batch_size,
        lr=lr,
        optimizer="adam",
        weight_decay=0.0,
        schedule=schedule,
        freeze_bn_stats=freeze_bn_stats,
        seed=defense.seed if seed is None else seed,
        device=defense.device,
        progress=defense.progress,
    )


def constant_sgd(
    defense: Defense,
    epochs: int,
    lr: float,
    *,
    weight_decay: float = 0.0,
    progress: bool | None = None,
) -> TrainConfig:
    """SGD with momentum 0.9 at a constant rate, BatchNorm in training mode, on the defense's
    batch size, seed and device: ANP's and RNP's mask optimiser (both reference
    implementations'; no weight decay) and RNP's and TSBD's unlearning. ``progress``: the
    defense's own setting unless given."""
    return TrainConfig(
        epochs=epochs,
        batch_size=defense.batch_size,
        lr=lr,
        momentum=0.9,
        weight_decay=weight_decay,
        schedule="constant",
        seed=defense.seed,
        device=defense.device,
        progress=defense.progress if progress is None else progress,
    )
