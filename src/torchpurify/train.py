"""The one training loop.

:func:`fit` trains any model on a :class:`~torchpurify.data.base.Split`. What happens on one
batch is a pluggable *step*, so two-pass updates (SAM-style, gradient-norm penalties) and
regularised fine-tuning reuse the same loop, schedule, progress display and pass counting.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from torchpurify.data.base import Split
from torchpurify.errors import Divergence, UserError, check
from torchpurify.metrics import accuracy

console = Console(stderr=True)

LOG_EVERY = 10.0  # seconds between two progress lines in a log (stderr not a terminal)
# When the last progress line was printed (or the first bar started), shared by every bar: a
# command quicker than LOG_EVERY prints none.
_last_line: list[float] = []


class LogProgress:
    """What a progress bar shows, as plain timestamped lines for a log: ``12:03:45 ft 2/5:
    40/120, 23 s`` — stage, done/total, elapsed — at most one line every :data:`LOG_EVERY`
    seconds over all bars, the first after a stage has run that long. The subset of
    ``rich.progress.Progress`` torchpurify uses."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.tasks: dict[int, dict] = {}
        if not _last_line:
            _last_line.append(time.monotonic())

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        task = len(self.tasks)
        self.tasks[task] = {"description": description, "total": total, "completed": 0,
                            "start": time.monotonic(), **fields}  # fmt: skip
        return task

    def update(self, task: int, *, completed: float | None = None, advance: float = 0, **fields):
        state = self.tasks[task]
        state.update(fields)
        state["completed"] = (state["completed"] if completed is None else completed) + advance
        now = time.monotonic()
        # Nothing for work that ends within LOG_EVERY seconds (a one-line refusal stays one line).
        if now - state["start"] < LOG_EVERY or now - _last_line[0] < LOG_EVERY:
            return
        _last_line[0] = now
        total = "" if state["total"] is None else f"/{state['total']:g}"
        loss = f", loss {state['loss']:.3f}" if isinstance(state.get("loss"), float) else ""
        self.console.print(
            f"{time.strftime('%H:%M:%S')} {state['description']}: {state['completed']:g}{total}"
            f"{loss}, {now - state['start']:.0f} s",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)


def progress_bar(
    *columns, console: Console | None = None, transient: bool = True, disable: bool = False
) -> Progress | LogProgress:
    """A rich progress bar on a terminal; :class:`LogProgress` lines where the output is a log
    (a bar would show nothing until the end there); a disabled bar when ``disable``. The
    console is stderr's (this module's ``console``) unless given."""
    console = console or globals()["console"]
    if not disable and not console.is_terminal:
        return LogProgress(console)
    return Progress(*columns, console=console, transient=transient, disable=disable)


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
    """What a run spent: wall seconds, and the samples it passed forward and backward through
    the model. :class:`count_passes` is the one place passes are counted: a batch of 128 counts
    128, a second pass on half of it 64, a holdout probe of 540 images 540."""

    seconds: float = 0.0
    forward: int = 0
    backward: int = 0

    def add(self, other: Cost) -> None:
        self.seconds += other.seconds
        self.forward += other.forward
        self.backward += other.backward


class count_passes:  # noqa: N801 (a context manager, used like a function)
    """Within the block, every call of ``model`` (its root module, however it is reached: a
    training step, a holdout probe, trigger inversion) adds its batch size to ``cost.forward``,
    and every backward pass through its output adds it to ``cost.backward``.

    The hook is a plain function, so a ``copy.deepcopy`` of the model made inside the block
    counts into the same ``cost``; :meth:`strip` removes it from such a copy.
    """

    def __init__(self, model: nn.Module, cost: Cost | None = None) -> None:
        self.model = model
        self.cost = cost if cost is not None else Cost()

        def hook(module, args, output) -> None:
            tensor = output if isinstance(output, torch.Tensor) else _first_tensor(output)
            if tensor is None or tensor.dim() == 0:
                return
            samples = int(tensor.shape[0])
            self.cost.forward += samples
            if tensor.requires_grad:
                tensor.register_hook(lambda grad: _add_backward(self.cost, samples))

        self.hook = hook

    def __enter__(self) -> Cost:
        self.model.register_forward_hook(self.hook)
        return self.cost

    def __exit__(self, *exc) -> None:
        self.strip(self.model)

    def strip(self, model: nn.Module) -> None:
        """Remove this counter's hook from ``model`` (the counted model, a copy of it, or a
        module that wraps one)."""
        for module in model.modules():
            for key, hook in list(module._forward_hooks.items()):
                if hook is self.hook:
                    del module._forward_hooks[key]


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, (tuple, list)):
        return next((t for t in output if isinstance(t, torch.Tensor)), None)
    return None


def _add_backward(cost: Cost, samples: int) -> None:
    cost.backward += samples


class Step(Protocol):
    """One update on a batch; returns the (detached) training loss.

    Passes are counted by :func:`fit` (:class:`count_passes`), not by the step; ``cost`` is
    the run's :class:`Cost`, for a step that wants to read it. A recipe with ``distill`` > 0
    hands the step a :class:`Distillation` term as the keyword ``distill``: a step that
    fine-tunes takes it and adds its gradient before the optimiser steps (:func:`descend`); a
    step without the keyword is refused such a recipe (:class:`Trainer`).
    """

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        cost: Cost,
    ) -> torch.Tensor: ...


class Distillation:
    """The term ``β·KL(p_teacher ‖ p_model)`` on a batch: the model's clean outputs held near
    those of the model training started from (``teacher``, a frozen copy in evaluation mode),
    while a step's own objective (a penalty, a mask, a regulariser) moves it. A recipe's
    ``distill`` is β; the :class:`Trainer` makes the term once, before the first step.
    """

    def __init__(self, model: nn.Module, beta: float) -> None:
        self.beta = beta
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def add_gradient(self, model: nn.Module, x: torch.Tensor) -> None:
        """Add ``∇ β·KL`` on the batch ``x`` to the gradient already in ``model``'s trainable
        parameters. One more forward and backward of the model; BatchNorm's running statistics
        are not touched by it (:class:`FrozenRunningStats`)."""
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            target = F.log_softmax(self.teacher(x), dim=1)
        with torch.enable_grad(), FrozenRunningStats(model):
            log_p = F.log_softmax(model(x), dim=1)
            kl = F.kl_div(log_p, target, reduction="batchmean", log_target=True)
            grads = torch.autograd.grad(self.beta * kl, params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g


def descend(
    model: nn.Module,
    x: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    distill: Distillation | None = None,
) -> None:
    """The optimiser's step on the gradient a step computed, with the distillation term's
    gradient on the batch ``x`` added first when there is one."""
    if distill is not None:
        distill.add_gradient(model, x)
    optimizer.step()


def standard_step(model, x, y, optimizer, cost, distill=None) -> torch.Tensor:
    """Plain empirical-risk minimisation: one forward, one backward, one optimiser step (with
    the distillation term's gradient added, when the recipe distils)."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    descend(model, x, optimizer, distill)
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
    augment: bool = False  # images: crop + flip (augment_batch); waveforms: time shift
    channels_last: bool | None = None  # None: the model's own preference (see fit)
    freeze_bn_stats: bool = False  # BatchNorm in evaluation mode while training (see fit)
    # A defense's fine-tuning only: the weight β of β·KL(p_input ‖ p_model) on each batch, the
    # model's outputs distilled towards those of the model it started from (Distillation).
    distill: float = 0.0
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        check(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        check(self.batch_size >= 2, f"--batch-size must be at least 2, got {self.batch_size}")
        check(
            self.lr > 0 and math.isfinite(self.lr),
            f"--lr must be a positive finite number, got {self.lr}",
        )
        check(
            self.optimizer in ("sgd", "adam"),
            f"--optimizer must be sgd or adam, got {self.optimizer!r}",
        )
        check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, f"weight decay must be ≥ 0, got {self.weight_decay}")
        check(self.distill >= 0, f"distill must be ≥ 0, got {self.distill}")
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
    """Random crop with 4-pixel zero padding and a horizontal flip, per image (one gather for
    the whole batch: each image's rows and columns are indexed from its own offset)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    shifts = torch.randint(0, 9, (n, 2), generator=generator).to(x.device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    rows = shifts[:, :1] + torch.arange(h, device=x.device)  # n × h
    columns = torch.arange(w, device=x.device).expand(n, w)
    columns = shifts[:, 1:] + torch.where(flips[:, None], columns.flip(-1), columns)  # n × w
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], columns[:, None, None, :]]


def shift_waveforms(
    x: torch.Tensor, generator: torch.Generator, fraction: float = 0.1
) -> torch.Tensor:
    """Each waveform (N×T) shifted in time by up to ``fraction`` of its length either way, the
    gap filled with zeros — TensorFlow's Speech Commands ``time_shift_ms`` = 100 on 1-s clips."""
    n, t = x.shape
    most = int(fraction * t)
    shifts = torch.randint(-most, most + 1, (n, 1), generator=generator).to(x.device)
    source = torch.arange(t, device=x.device) - shifts  # n × t: where each sample comes from
    inside = (source >= 0) & (source < t)
    return torch.where(inside, x.gather(1, source.clamp(0, t - 1)), torch.zeros((), dtype=x.dtype))


class Trainer:
    """The one training loop, one epoch at a time: :func:`fit` runs every epoch; a method whose
    schedule changes between epochs (Salience-AR) calls :meth:`epoch` in its own loop, so the
    schedule reads top to bottom. Use as a context manager; :attr:`result` holds the history and
    cost, and leaving the block puts the model in evaluation mode with contiguous weights.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Split,
        config: TrainConfig,
        *,
        step: Step = standard_step,
        val: Split | None = None,
        description: str = "train",
    ) -> None:
        check(len(data) >= 2, f"the training split has {len(data)} samples; it needs at least 2")
        self.model, self.data, self.config = model, data, config
        self.step, self.val, self.description = step, val, description
        self.device = resolve_device(config.device)
        # channels_last is faster for some CNNs on CPU and slower for others
        # (benchmarks/train_throughput.py); models state a preference with a class attribute.
        preferred = getattr(model, "channels_last", True)
        wanted = preferred if config.channels_last is None else config.channels_last
        use_channels_last = wanted and data.x.dim() == 4
        self.memory_format = torch.channels_last if use_channels_last else torch.contiguous_format
        model.to(device=self.device, memory_format=self.memory_format)
        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
        self.batches_per_epoch = max(1, len(data) // config.batch_size)
        total = config.epochs * self.batches_per_epoch
        self.scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total)
            if config.schedule == "cosine"
            else None
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.result = TrainResult()
        self.epochs_done = 0
        self.counter = count_passes(model, self.result.cost)
        # The distillation term, handed to every step (the step adds it: Step, descend).
        self.distill: Distillation | None = None
        if config.distill > 0:
            if "distill" not in inspect.signature(step).parameters:
                raise ValueError(f"{description}: its step takes no distillation term (distill)")
            self.distill = Distillation(model, config.distill)
        self.start = time.perf_counter()

    def __enter__(self) -> Trainer:
        self.counter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.counter.__exit__()
        self.model.to(memory_format=torch.contiguous_format)
        self.model.eval()
        self.result.cost.seconds += time.perf_counter() - self.start

    def epoch(self) -> dict:
        """Train one epoch (whole batches of a fresh shuffle); return its history record."""
        config, model, device = self.config, self.model, self.device
        if self.epochs_done >= config.epochs:  # a caller's bug, not the user's mistake
            raise RuntimeError(f"{self.description}: all {config.epochs} epochs have run")
        self.epochs_done += 1
        epoch = self.epochs_done
        model.train()
        if config.freeze_bn_stats:
            # Evaluation-mode BatchNorm: normalise with the running statistics and keep them.
            # (Batch statistics with frozen running ones train weights for a normalisation
            # the model never evaluates with: ACC collapsed, methods.md §11.1.)
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        order = torch.randperm(len(self.data), generator=self.generator)
        loss_sum = torch.zeros((), device=device)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} batches"),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with progress_bar(*columns, transient=True, disable=not config.progress) as bar:
            task = bar.add_task(
                f"{self.description} {epoch}/{config.epochs}",
                total=self.batches_per_epoch,
                loss=0.0,
            )
            for b in range(self.batches_per_epoch):
                # Whole batches only: the remainder joins the next shuffle (no size-1 BN batch).
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                x = self.data.x[idx].to(device, non_blocking=True)
                y = self.data.y[idx].to(device, non_blocking=True)
                if config.augment and x.dim() == 4:
                    x = augment_batch(x, self.generator)
                elif config.augment and x.dim() == 2:
                    x = shift_waveforms(x, self.generator)
                elif config.augment:
                    raise UserError(
                        "augment needs images (N×C×H×W) or waveforms (N×T), got inputs of "
                        f"shape {tuple(x.shape[1:])} per sample; leave augment off"
                    )
                x = x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x
                if self.distill is None:
                    loss = self.step(model, x, y, self.optimizer, self.result.cost)
                else:
                    loss = self.step(
                        model, x, y, self.optimizer, self.result.cost, distill=self.distill
                    )
                if self.scheduler is not None:
                    self.scheduler.step()
                loss_sum += loss
                if config.progress and (b % 10 == 0 or b == self.batches_per_epoch - 1):
                    bar.update(task, completed=b + 1, loss=float(loss))
        record = {"epoch": epoch, "loss": float(loss_sum) / self.batches_per_epoch}
        if not math.isfinite(record["loss"]):
            raise Divergence(
                f"training diverged (loss is {record['loss']} in epoch {epoch}); lower --lr"
            )
        if self.val is not None and len(self.val):
            record["val_acc"] = accuracy(model, self.val, device=device)
        record["seconds"] = time.perf_counter() - self.start
        self.result.history.append(record)
        return record


@contextmanager
def reproducible(threads: int | None = None) -> Iterator[None]:
    """Within the block: deterministic algorithms and, when ``threads`` is given, that many
    intra-op threads (a reduction split over another number of threads rounds differently);
    both are restored after it. On CUDA, cuBLAS is asked for its deterministic workspace."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if threads is not None:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])


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
    selects or stops on it. ``on_epoch`` receives each epoch's record. A non-finite epoch loss
    raises :class:`~torchpurify.errors.Divergence`.
    """
    with Trainer(model, data, config, step=step, val=val, description=description) as trainer:
        for _ in range(config.epochs):
            record = trainer.epoch()
            if on_epoch is not None:
                on_epoch(record)
    return trainer.result
