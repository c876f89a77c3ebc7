"""Unlearning: gradient *ascent* of the cross-entropy on clean data, ``θ ← θ + η·∇θ L(θ)``, until
the model's accuracy falls to a target or the epoch budget runs out — the first stage of RNP
(methods.md §6.8) and of TSBD (§6.5). Clean features are destroyed first; the backdoor, which
clean data never exercised, survives, and what unlearning moved (TSBD) or what recovering from
it needs (RNP) points at the backdoor's neurons.

Where the accuracy is measured, and so when unlearning stops, is the choice the two methods make
differently, and :func:`unlearn` takes it as an argument:

- without a ``holdout`` (RNP), on the tune batches themselves: each batch's accuracy is measured
  by its own forward pass, before its step, and the first batch at or under the target takes no
  step and ends the unlearning (the rest of its epoch is skipped). An epoch whose running
  accuracy is at or under the target ends it too (the reference's check, once an epoch).
- with a ``holdout`` (TSBD), on that split after every epoch.

Its optimiser is SGD at a constant rate (:func:`~torchpurify.defenses.recipe.constant_sgd`),
divided by 10 after each of ``milestones``; with ``restart`` every epoch is a training run of its
own (a fresh optimiser, so no momentum carried over, and the shuffle seeded with
``seed + epoch``), as TSBD's code calls its trainer once an epoch.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.data.base import Split
from torchpurify.metrics import accuracy
from torchpurify.train import Step, TrainConfig, Trainer


@dataclass(frozen=True)
class Unlearning:
    """How to unlearn: ``config`` is the optimiser (its ``epochs`` the budget), ``target`` the
    accuracy at or under which unlearning stops, ``clip`` the gradient-norm clip (None: none);
    ``milestones`` and ``restart`` as in the module docstring."""

    config: TrainConfig
    target: float
    clip: float | None = None
    milestones: tuple[int, ...] = ()
    restart: bool = False

    def run_config(self, epoch: int) -> TrainConfig:
        """The training run that starts at ``epoch``: one epoch of its own with ``restart``."""
        if self.restart:
            return replace(self.config, epochs=1, seed=self.config.seed + epoch)
        return self.config

    def lr(self, epoch: int) -> float:
        return self.config.lr * 0.1 ** sum(epoch > m for m in self.milestones)


@dataclass
class Tally:
    """What the ascent saw in the current epoch, and the batch of it (1-based) that reached the
    target, once one has."""

    correct: int = 0
    total: int = 0
    losses: list[float] = field(default_factory=list)
    stopped: int | None = None

    def new_epoch(self) -> None:
        self.correct, self.total, self.losses = 0, 0, []


def ascent_step(tally: Tally, stop_at: float | None, clip: float | None) -> Step:
    """A :data:`torchpurify.train.Step` of gradient ascent that counts into ``tally``; with
    ``stop_at``, a batch whose accuracy is at or under it takes no step, nor does any after it."""

    def step(model, x, y, optimizer, cost):
        if tally.stopped is not None:  # the target is reached: the epoch's rest is skipped
            return torch.zeros((), device=x.device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        correct = int((logits.argmax(1) == y).sum())
        tally.correct += correct
        tally.total += len(y)
        tally.losses.append(float(loss.detach()))
        if stop_at is not None and correct / len(y) <= stop_at:
            tally.stopped = len(tally.losses)
            return loss.detach()
        (-loss).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)
        optimizer.step()
        return loss.detach()

    return step


def unlearn(
    model: nn.Module,
    tune: Split,
    recipe: Unlearning,
    *,
    holdout: Split | None = None,
    description: str = "unlearn",
) -> list[dict]:
    """Unlearn ``model`` in place on ``tune`` (see the module docstring); one record an epoch:
    with a ``holdout``, its accuracy (``holdout_acc``); without, the epoch's rate, mean loss
    and running accuracy (``train_acc``), and ``stopped_at_batch`` when a batch reached the
    target."""
    tally = Tally()
    step = ascent_step(tally, recipe.target if holdout is None else None, recipe.clip)
    history: list[dict] = []
    with ExitStack() as running:
        trainer = None
        for epoch in range(1, recipe.config.epochs + 1):
            if trainer is None:
                run = Trainer(model, tune, recipe.run_config(epoch), step=step,
                              description=description)  # fmt: skip
                trainer = running.enter_context(run)
            lr = recipe.lr(epoch)
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr
            tally.new_epoch()
            record = trainer.epoch()
            if recipe.restart:  # the run ends with its epoch (the model in evaluation mode)
                running.close()
                trainer = None
            if holdout is None:
                record.update(
                    epoch=epoch,
                    lr=lr,
                    loss=sum(tally.losses) / max(1, len(tally.losses)),
                    train_acc=tally.correct / max(1, tally.total),
                )
                if tally.stopped is not None:
                    record["stopped_at_batch"] = tally.stopped
                measured = record["train_acc"]
            else:
                measured = accuracy(model, holdout, batch_size=recipe.config.batch_size)
                record = {"epoch": epoch, "holdout_acc": measured}
            history.append(record)
            if tally.stopped is not None or measured <= recipe.target:
                break
    return history
