"""Trigger inversion in the style of Neural Cleanse (Wang et al. 2019; methods.md §7).

For each label t, a mask m (in [0, 1]) and a pattern p are optimised so that
``(1 − m)·x + m·p`` is classified as t, with an L1 penalty ``cost·‖m‖₁``. A backdoor target
needs a much smaller mask than the other labels, so its norm is a low outlier (MAD anomaly
index > 2).

Cost schedule (NC's adaptive one, made cheap): the cost starts at ``cost`` and is checked every
``CHECK_EVERY`` steps on the batches just seen: success ≥ ``threshold`` multiplies it by 1.5,
otherwise it is divided by 1.5^1.5. The smallest mask seen at a successful check is kept, and a
label stops early once that mask has not shrunk by 1 % for ``PATIENCE`` checks (labels stop
after 150–250 steps). Measured on the BadNets small-cnn of methods.md §11 with 600 clean
Fashion-MNIST images, 10 labels, one CPU thread: about 50 s, target found for seeds 0–2 with
anomaly index 3.2–5.6; batches of 32 halve the time but gave index 1.8 for one seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.data.base import Split
from torchpurify.errors import check
from torchpurify.neurons.layers import model_device
from torchpurify.train import console, progress_bar

CHECK_EVERY = 5
PATIENCE = 5
COST_UP, COST_DOWN = 1.5, 1.5**1.5
MASK_START = -2.0  # mask logit everywhere at the start: sigmoid(-2) ≈ 0.12, a faint blend
MAD_CONSTANT = 1.4826  # makes the MAD a consistent estimator of a normal's standard deviation


@dataclass(frozen=True)
class InvertedTrigger:
    """``x -> (1 − mask)·x + mask·pattern`` for one sample or a batch, like an attack trigger."""

    mask: torch.Tensor  # (1, H, W) for images, else one sample's shape
    pattern: torch.Tensor  # one sample's shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(x.device, x.dtype)
        return (1 - mask) * x + mask * self.pattern.to(x.device, x.dtype)


@dataclass(frozen=True)
class Inversion:
    """One inverted trigger per label in ``labels`` (all tensors on the CPU, in that order).

    ``anomaly_index`` is ``(median − norm) / (1.4826·MAD)`` of the mask norms: positive when a
    mask is smaller than typical. ``target`` is the label with the smallest mask among those
    with anomaly index > 2 whose trigger works on most inputs (success ≥ 0.5), else None.
    """

    labels: list[int]
    masks: torch.Tensor
    patterns: torch.Tensor
    mask_norms: torch.Tensor  # L1 norm of each mask
    anomaly_index: torch.Tensor
    success: torch.Tensor  # fraction of non-label samples of ``data`` the trigger flips
    target: int | None

    def trigger(self, label: int) -> InvertedTrigger:
        check(label in self.labels, f"label must be one of {self.labels}, got {label!r}")
        i = self.labels.index(label)
        return InvertedTrigger(self.masks[i], self.patterns[i])


SPACES = ("input", "features", "auto")


def front_end_of(model: nn.Module) -> nn.Module | None:
    """The model's fixed feature front end — ``model.front_end`` when it has no trainable
    parameter (the log-mel or MFCC of the audio models) — or None."""
    front = getattr(model, "front_end", None)
    if not isinstance(front, nn.Module) or any(p.requires_grad for p in front.parameters()):
        return None
    return front


def uses_features(model: nn.Module, space: str) -> bool:
    """Whether to invert in the front end's feature space: ``space`` is "features" (the model
    must have a fixed front end), "input", or "auto" (features whenever there is one)."""
    check(space in SPACES, f"space must be one of {', '.join(SPACES)}, got {space!r}")
    front = front_end_of(model)
    if space == "features":
        check(front is not None, "space=features needs a model with a fixed front_end module")
    return space != "input" and front is not None


@contextmanager
def feature_space(
    model: nn.Module, *splits: Split, batch_size: int = 256
) -> Iterator[tuple[Split, ...]]:
    """Inside the block, ``model`` reads its front end's features (the front end is replaced by
    an identity) and the splits come back as those features, labels kept; on leaving, the front
    end is put back. A trigger inverted inside acts on features — for a log-mel model, a
    time-frequency mask and pattern, which is the shape audio triggers have (methods.md §7).
    Everything after the front end — its weights, pruning masks, fine-tuning — is the same
    model, so what a defense does inside holds for the waveform model outside."""
    front = front_end_of(model)
    check(front is not None, "feature_space needs a model with a fixed front_end module")
    device = model_device(model)
    was_training = front.training
    front.eval()
    with torch.no_grad():
        converted = tuple(
            Split(
                torch.cat(
                    [
                        front(split.x[i : i + batch_size].to(device)).cpu()
                        for i in range(0, len(split), batch_size)
                    ]
                ),
                split.y,
            )
            for split in splits
        )
    front.train(was_training)
    model.front_end = nn.Identity()
    try:
        yield converted
    finally:
        model.front_end = front


def value_range_of(x: torch.Tensor) -> tuple[float, float]:
    """Images live in [0, 1], waveforms in [-1, 1]: an inverted pattern must stay there too.
    Data outside both (a front end's log-mel features, standardised inputs) keeps its own
    (min, max)."""
    low, high = float(x.min()), float(x.max())
    if low >= 0 and high <= 1:
        return (0.0, 1.0)
    if low >= -1 and high <= 1:
        return (-1.0, 1.0)
    return (low, high)


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """MAD-based anomaly index, positive on the low side (Neural Cleanse's outlier test)."""
    median = norms.median()
    mad = MAD_CONSTANT * (norms - median).abs().median()
    return (median - norms) / mad.clamp_min(torch.finfo(norms.dtype).tiny)


@torch.no_grad()
def success_rate(model, x, label, trigger, batch_size) -> float:
    """Fraction of ``x`` (already on the model's device, in its memory format) that ``trigger``
    sends to ``label``, in batches of ``batch_size``; the model must already be in evaluation
    mode (inside :class:`EvalMode`). :func:`trigger_success` is the checked public entry."""
    hits = 0
    for start in range(0, len(x), batch_size):
        hits += int((model(trigger(x[start : start + batch_size])).argmax(1) == label).sum())
    return hits / len(x)


class EvalMode:
    """The model in evaluation mode (channels_last where it prefers it, as in ``train.fit``) for
    the duration of an inversion, and the data prepared the same way; restored afterwards."""

    def __init__(self, model: nn.Module, data: Split, device) -> None:
        self.model = model
        self.device = torch.device(device) if device is not None else model_device(model)
        wanted = data.x.dim() == 4 and getattr(model, "channels_last", True)
        self.memory_format = torch.channels_last if wanted else torch.contiguous_format

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, memory_format=self.memory_format)

    def __enter__(self) -> EvalMode:
        self.was_training = self.model.training
        self.model.eval().to(memory_format=self.memory_format)
        return self

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training).to(memory_format=torch.contiguous_format)


def trigger_success(
    model: nn.Module,
    data: Split,
    label: int,
    trigger,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> float:
    """Fraction of the samples of ``data`` whose label is not ``label`` that ``trigger`` sends to
    ``label`` (an attack success rate measured on clean data; the model is not changed)."""
    check(isinstance(data, Split) and len(data) > 0, "data must be a non-empty Split")
    with EvalMode(model, data, device) as mode:
        x = data.x[data.y != label]
        check(len(x) > 0, f"data has no sample of a label other than {label}")
        return success_rate(model, mode.inputs(x), label, trigger, batch_size)


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-4, 1 - 1e-4)
    return torch.log(p) - torch.log1p(-p)


def invert_capped(
    model: nn.Module,
    data: Split,
    label: int,
    budget: float,
    *,
    start: InvertedTrigger | None = None,
    steps: int = 100,
    batch_size: int = 64,
    lr: float = 0.1,
    value_range: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    device: torch.device | str | None = None,
) -> InvertedTrigger:
    """The trigger for ``label`` that works best on ``data`` among those whose mask has an ℓ1
    norm of at most ``budget`` (methods.md §12.2, the estimated ASR).

    Cross-entropy towards ``label`` is minimised over mask and pattern with no size penalty;
    instead the mask is scaled down to the budget inside the forward pass (``m·min(1, B/‖m‖₁)``),
    so every trigger tried obeys it. ``start`` (e.g. a Neural-Cleanse trigger for the label)
    sets the starting mask and pattern; without it the mask starts uniform. The trigger with the
    best success on the batches of a check is returned. The model is not changed.
    """
    check(isinstance(data, Split) and len(data) > 0, "data must be a non-empty Split")
    check(budget > 0, f"budget must be positive, got {budget}")
    check(isinstance(steps, int) and steps >= 1, f"steps must be a positive integer, got {steps}")
    low, high = value_range
    check(low < high, f"value_range must be (low, high), got {value_range}")
    generator = torch.Generator().manual_seed(seed * 100_003 + label)
    with EvalMode(model, data, device) as mode:
        x = mode.inputs(data.x[data.y != label])
        check(len(x) > 0, f"data has no sample of a label other than {label}")
        sample_shape = x.shape[1:]
        mask_shape = (1, *sample_shape[1:]) if len(sample_shape) == 3 else sample_shape
        if start is None:
            mask_logit = torch.full(mask_shape, MASK_START, device=x.device)
            pattern_logit = torch.randn(sample_shape, generator=generator).to(x.device)
        else:
            mask_logit = _logit(start.mask.to(x.device).reshape(mask_shape))
            pattern = (start.pattern.to(x.device) - low) / (high - low)
            pattern_logit = _logit(pattern.reshape(sample_shape))
        mask_logit.requires_grad_()
        pattern_logit.requires_grad_()
        optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=lr, betas=(0.5, 0.9))
        target = torch.full((batch_size,), label, device=x.device)

        def current() -> InvertedTrigger:
            mask = torch.sigmoid(mask_logit)
            mask = mask * (budget / mask.sum().clamp_min(budget))
            return InvertedTrigger(mask, low + (high - low) * torch.sigmoid(pattern_logit))

        best, best_rate, hits, seen = None, -1.0, 0, 0
        for step in range(1, steps + 1):
            batch = x[torch.randint(len(x), (batch_size,), generator=generator).to(x.device)]
            trigger = current()
            logits = model(trigger(batch))
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            mask_logit.grad, pattern_logit.grad = torch.autograd.grad(
                loss, [mask_logit, pattern_logit]
            )
            optimizer.step()
            hits += int((logits.argmax(1) == label).sum())
            seen += batch_size
            if step % CHECK_EVERY == 0 or step == steps:
                if hits / seen > best_rate:
                    best_rate = hits / seen
                    best = InvertedTrigger(trigger.mask.detach(), trigger.pattern.detach())
                hits, seen = 0, 0
    return InvertedTrigger(best.mask.cpu(), best.pattern.cpu())


def _invert_one(model, x, label, *, steps, batch_size, lr, cost, threshold, value_range, seed):
    """Mask (sigmoid-parametrised) and pattern (squashed into value_range) for one label."""
    low, high = value_range
    generator = torch.Generator().manual_seed(seed * 100_003 + label)  # same for any label order
    sample_shape = x.shape[1:]
    mask_shape = (1, *sample_shape[1:]) if len(sample_shape) == 3 else sample_shape
    mask_logit = torch.full(mask_shape, MASK_START, device=x.device, requires_grad=True)
    pattern_logit = torch.randn(sample_shape, generator=generator).to(x.device).requires_grad_()
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=lr, betas=(0.5, 0.9))
    target = torch.full((batch_size,), label, device=x.device)

    def current() -> InvertedTrigger:
        pattern = low + (high - low) * torch.sigmoid(pattern_logit)
        return InvertedTrigger(torch.sigmoid(mask_logit), pattern)

    # ``stale`` counts checks without a 1 % smaller successful mask, once the cost has first
    # been too high (before that the mask is still finding the trigger and may grow).
    best, best_norm, stale, balanced, hits, seen = None, float("inf"), 0, False, 0, 0
    for step in range(1, steps + 1):
        batch = x[torch.randint(len(x), (batch_size,), generator=generator).to(x.device)]
        trigger = current()
        logits = model(trigger(batch))
        loss = F.cross_entropy(logits, target) + cost * trigger.mask.sum()
        optimizer.zero_grad(set_to_none=True)
        mask_logit.grad, pattern_logit.grad = torch.autograd.grad(loss, [mask_logit, pattern_logit])
        optimizer.step()
        hits += int((logits.argmax(1) == label).sum())
        seen += batch_size
        if step % CHECK_EVERY:
            continue
        if hits / seen >= threshold:
            cost *= COST_UP
            norm = float(trigger.mask.detach().sum())
            stale = 0 if norm < 0.99 * best_norm else stale + 1
            if norm < best_norm:
                best = InvertedTrigger(trigger.mask.detach(), trigger.pattern.detach())
                best_norm = norm
        else:
            cost /= COST_DOWN
            stale += 1
            balanced = balanced or best is not None
        if balanced and stale >= PATIENCE:
            break
        hits, seen = 0, 0
    if best is None:
        trigger = current()
        best = InvertedTrigger(trigger.mask.detach(), trigger.pattern.detach())
    return best


def invert_triggers(
    model: nn.Module,
    data: Split,
    *,
    labels: list[int] | None = None,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 0.1,
    cost: float = 1e-3,
    threshold: float = 0.9,
    value_range: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Inversion:
    """Invert a trigger for each label (default: every class) on the clean ``data``.

    Each label's trigger is optimised on the samples of other labels, at most ``steps``
    mini-batches of ``batch_size``. ``cost`` is the initial weight of ``‖m‖₁``; ``threshold``
    the success rate (on recent batches) at which the cost rises. ``value_range`` bounds the
    pattern: (0, 1) for images, (-1, 1) for waveforms. The model is not changed.
    """
    check(isinstance(data, Split) and len(data) > 0, "data must be a non-empty Split")
    check(isinstance(steps, int) and steps >= 1, f"steps must be a positive integer, got {steps}")
    check(
        isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be ≥ 1, got {batch_size}"
    )
    check(lr > 0, f"lr must be positive, got {lr}")
    check(cost >= 0, f"cost must be ≥ 0, got {cost}")
    check(0 < threshold <= 1, f"threshold must be in (0, 1], got {threshold}")
    check(value_range[0] < value_range[1], f"value_range must be (low, high), got {value_range}")
    device = torch.device(device) if device is not None else model_device(model)
    # channels_last where the model prefers it, as in train.fit (1.35× faster for small-cnn on
    # CPU); the weights keep their values and end contiguous, as fit leaves them.
    wanted = data.x.dim() == 4 and getattr(model, "channels_last", True)
    memory_format = torch.channels_last if wanted else torch.contiguous_format
    was_training = model.training
    model.eval().to(memory_format=memory_format)
    try:
        with torch.no_grad():
            num_classes = model(data.x[:1].to(device)).shape[1]
        labels = list(range(num_classes)) if labels is None else [int(t) for t in labels]
        check(
            len(labels) > 0 and all(0 <= t < num_classes for t in labels),
            f"labels must be a non-empty list of classes in 0..{num_classes - 1}, got {labels}",
        )
        triggers, success = [], []
        with progress_bar(console=console, transient=True, disable=not progress) as bar:
            task = bar.add_task("invert triggers", total=len(labels))
            for label in labels:
                x = data.x[data.y != label].to(device, memory_format=memory_format)
                check(len(x) > 0, f"data has no sample of a label other than {label}")
                trigger = _invert_one(
                    model, x, label, steps=steps, batch_size=batch_size, lr=lr, cost=cost,
                    threshold=threshold, value_range=value_range, seed=seed,
                )  # fmt: skip
                triggers.append(trigger)
                success.append(success_rate(model, x, label, trigger, 4 * batch_size))
                bar.advance(task)
    finally:
        model.train(was_training).to(memory_format=torch.contiguous_format)
    masks = torch.stack([t.mask for t in triggers]).cpu()
    norms = masks.flatten(1).sum(1)
    index = anomaly_index(norms)
    rates = torch.tensor(success)
    candidates = [i for i in range(len(labels)) if index[i] > 2 and rates[i] >= 0.5]
    target = labels[min(candidates, key=lambda i: norms[i])] if candidates else None
    return Inversion(
        labels=labels,
        masks=masks,
        patterns=torch.stack([t.pattern for t in triggers]).cpu(),
        mask_norms=norms,
        anomaly_index=index,
        success=rates,
        target=target,
    )
