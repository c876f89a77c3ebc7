"""The one training loop.

:func:`fit` trains any model on a :class:`~torchpurify.data.base.Split`. What happens on one
batch is a pluggable *step*, so two-pass updates (SAM-style, gradient-norm penalties) and
regularised fine-tuning reuse the same loop, schedule, progress display and pass counting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from torchpurify.data.base import Split
from torchpurify.errors import UserError, check
from torchpurify.metrics import accuracy

console = Console(stderr=True)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; asking for CUDA without it is a user error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was asked for but no CUDA GPU is available; use --device cpu"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None


@dataclass
class Cost:
    """What a run spent: wall seconds and forward/backward passes over mini-batches."""

    seconds: float = 0.0
    forward: int = 0
    backward: int = 0

    def add(self, other: Cost) -> None:
        self.seconds += other.seconds
        self.forward += other.forward
        self.backward += other.backward


class Step(Protocol):
    """One update on a batch; returns the (detached) training loss and counts its passes."""

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        cost: Cost,
    ) -> torch.Tensor: ...


def standard_step(model, x, y, optimizer, cost) -> torch.Tensor:
    """Plain empirical-risk minimisation: one forward, one backward, one optimiser step."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    cost.forward += 1
    cost.backward += 1
    optimizer.step()
    return loss.detach()


@dataclass
class TrainConfig:
    """A training recipe. Defaults are the attacker's recipe (methods.md §11): SGD, cosine."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: bool = False
    channels_last: bool | None = None  # None: the model's own preference (see fit)
    freeze_bn_stats: bool = False  # BatchNorm in evaluation mode while training (see fit)
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        check(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        check(self.batch_size >= 2, f"--batch-size must be at least 2, got {self.batch_size}")
        check(self.lr > 0 and math.isfinite(self.lr), f"--lr must be positive, got {self.lr}")
        check(
            self.optimizer in ("sgd", "adam"),
            f"--optimizer must be sgd or adam, got {self.optimizer!r}",
        )
        check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, f"weight decay must be ≥ 0, got {self.weight_decay}")
        check(
            self.schedule in ("cosine", "constant"),
            f"--schedule must be cosine or constant, got {self.schedule!r}",
        )

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "progress"}


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    cost: Cost = field(default_factory=Cost)


class FrozenRunningStats:
    """Within the block, BatchNorm layers normalise with batch statistics (as in training) but
    leave their running statistics, used at evaluation, exactly as they were."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [
            m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]  # fmt: skip

    def __enter__(self) -> None:
        self.saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.layers]
        for m in self.layers:
            m.momentum = 0.0

    def __exit__(self, *exc) -> None:
        for m, (momentum, count) in zip(self.layers, self.saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and a horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    shifts = torch.randint(0, 9, (n, 2), generator=generator).tolist()
    flips = (torch.rand(n, generator=generator) < 0.5).tolist()
    crops = [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts)]
    return torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flips, strict=True)])


def fit(
    model: nn.Module,
    data: Split,
    config: TrainConfig,
    *,
    step: Step = standard_step,
    val: Split | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    description: str = "train",
) -> TrainResult:
    """Train ``model`` in place on ``data`` following ``config``; return history and cost.

    ``val`` (if given) is evaluated after each epoch for the history only: nothing here
    selects or stops on it. ``on_epoch`` receives each epoch's record.
    """
    check(len(data) >= 2, f"the training split has {len(data)} samples; it needs at least 2")
    device = resolve_device(config.device)
    # channels_last is faster for some CNNs on CPU and slower for others
    # (benchmarks/train_throughput.py); models state a preference with a class attribute.
    preferred = getattr(model, "channels_last", True)
    wanted = preferred if config.channels_last is None else config.channels_last
    use_channels_last = wanted and data.x.dim() == 4
    memory_format = torch.channels_last if use_channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
    batches_per_epoch = max(1, len(data) // config.batch_size)
    total = config.epochs * batches_per_epoch
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total))
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult()
    start = time.perf_counter()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} batches"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True, disable=not config.progress) as bar:
        for epoch in range(1, config.epochs + 1):
            task = bar.add_task(
                f"{description} {epoch}/{config.epochs}", total=batches_per_epoch, loss=0.0
            )
            model.train()
            if config.freeze_bn_stats:
                # Evaluation-mode BatchNorm: normalise with the running statistics and keep them.
                # (Batch statistics with frozen running ones train weights for a normalisation
                # the model never evaluates with: ACC collapsed, methods.md §11.1.)
                for module in model.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
            order = torch.randperm(len(data), generator=generator)
            loss_sum = torch.zeros((), device=device)
            for b in range(batches_per_epoch):
                # Whole batches only: the remainder joins the next shuffle (no size-1 BN batch).
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                x = data.x[idx].to(device, non_blocking=True)
                y = data.y[idx].to(device, non_blocking=True)
                if config.augment and x.dim() == 4:
                    x = augment_batch(x, generator)
                x = x.contiguous(memory_format=memory_format) if x.dim() == 4 else x
                loss = step(model, x, y, optimizer, result.cost)
                scheduler.step()
                loss_sum += loss
                if config.progress and (b % 10 == 0 or b == batches_per_epoch - 1):
                    bar.update(task, completed=b + 1, loss=float(loss))
            record = {"epoch": epoch, "loss": float(loss_sum) / batches_per_epoch}
            if not math.isfinite(record["loss"]):
                raise UserError(
                    f"training diverged (loss is {record['loss']} in epoch {epoch}); lower --lr"
                )
            if val is not None and len(val):
                record["val_acc"] = accuracy(model, val, device=device)
            record["seconds"] = time.perf_counter() - start
            result.history.append(record)
            bar.remove_task(task)
            if on_epoch is not None:
                on_epoch(record)
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    result.cost.seconds += time.perf_counter() - start
    return result
