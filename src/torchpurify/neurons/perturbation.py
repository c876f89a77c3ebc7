"""Trigger inversion for whole-input triggers: an input-agnostic additive perturbation per label
(issue 27; a second trigger family beside the mask and pattern of :mod:`.inversion`).

Neural Cleanse's mask sees small patches. A blend (``x' = (1 − α)·x + α·p`` over the whole
input), SIG's additive sinusoid or an audio overlay is not a small mask, but it is close to one
fixed additive change ``x' ≈ x + δ``. So, for each candidate label t, we look for the smallest
δ, bounded in ℓ2 or ℓ∞, that sends the clean samples of other labels to t::

    minimise over ‖δ‖_p ≤ ε:   mean_i  CE(f(clip(x_i + δ)), t)

where ``clip`` keeps the input in its value range (``value_range_of``: [0, 1] for images,
[-1, 1] for waveforms). A backdoor target needs a much smaller δ than the other labels, whose
only way in is their natural features, so its radius is a low outlier (MAD anomaly index of
:func:`.inversion.anomaly_index` > 2, with the MAD floored: :func:`radius_anomaly_index`).

Scale. Radii are relative to the data's scale ``s``: the mean ‖x_i − x̄‖_p over the fitting
samples (x̄ the per-feature mean), in the norm searched. Centring makes the scale blind to an
offset (log-mel features are far from zero), and a relative radius reads the same for images,
waveforms and features: 0.1 is a change a tenth the size of a typical sample's variation.

Search: a geometric ladder of radii, not a Lagrangian penalty — a ladder gives the radius
directly, has no penalty weight to schedule, and its cost is bounded by its length. Rung k has
ε_k = ``start``·``ratio``^k·s. On each rung δ takes ``steps`` projected normalised-gradient
steps (PGD: δ ← Π_ε(δ − ``step_size``·ε·d), d = g/‖g‖₂ for ℓ2, sign(g) for ℓ∞) on mini-batches
of the fitting samples; δ carries over to the next rung (warm start: it is inside the larger
ball). When the mini-batches of the last ``CHECK_EVERY`` steps were classified as t at the
success ``threshold``, δ is checked on all fitting samples; the first rung where that check
passes ends the climb. The rung's granularity (``ratio``) is then removed: for each fitting
sample, ``REFINE_STEPS`` bisections (forward passes only) find the smallest scale c ∈
[1/ratio, 1] at which c·δ sends it to t, and δ is scaled by the ``threshold`` quantile of those
scales. Radii are then continuous, so the MAD of the labels' radii is not zero by rounding to a
grid (it was, with one bisection of a single scale: equal radii gave anomaly indices of 10⁵). A
label that never reaches the threshold keeps its top-rung δ and radius (``found`` False):
censored, but large, which is what the anomaly index needs to know about it.

Success: the fraction of samples of other labels classified as t. *Fit success* is measured on
the samples δ was fitted on, *held-out success* on samples it never saw (``heldout``, or the
other half of ``data`` split by seed): a real trigger generalises, an over-fitted δ does not.

Cost per label, at most ``rungs``·``steps`` forward and backward passes of ``batch_size``
samples (defaults: 18·20·32 = 11,520 sample passes; a backdoor target stops after a few rungs,
other labels at the rung of their natural radius — rung 12 for a radius of 1), one forward pass
over the fitting samples per passed mini-batch check, ``REFINE_STEPS`` + 1 for the refinement
and one over the held-out samples. Measured on the 6-class 12×12 test task (small-cnn, 300
clean images, half fitting, one CPU thread): about 8 s with the defaults, 2.3 s with ``start`` 1/8,
``steps`` 10, ``fit_samples`` 128, the same radii within a few percent. Every label is searched
with its own seeded generator, so the result is the same for any label order. The model stays
in evaluation mode (BatchNorm statistics are not updated) and its parameters are never changed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.data.base import Split
from torchpurify.errors import check
from torchpurify.neurons.inversion import (
    MAD_CONSTANT,
    SPACES,
    EvalMode,
    anomaly_index,
    feature_space,
    success_rate,
    uses_features,
    value_range_of,
)
from torchpurify.train import console, progress_bar

NORMS = ("l2", "linf")
CHECK_EVERY = 5  # steps between looks at the recent mini-batches' success
# A target must also need at most half the median radius of the other labels: natural classes
# can sit so close together that the MAD is tiny, and on the clean 6-class test task a label
# 6–8 % below the rest got anomaly index 2.6 (2 of 6 seeds). Still to be swept on development
# cells (methods.md §12.1).
TARGET_RATIO = 0.5
REFINE_STEPS = 8  # bisections of each sample's flipping scale: resolution ratio^(1/256)
# The MAD of the radii is floored at MAD_FLOOR·median/1.4826 (1.4826·MAD ≥ 5 % of the median):
# labels that stop on one rung with nearly the same refined scale tie, and with six labels two
# ties in the middle made the MAD ~0 and indices of 10² (the generator family with its default
# ladder on the tiny warp task: radii 0.668, 0.668, 0.669 gave 379 and 126). Pending
# development cells (methods.md §12.1).
MAD_FLOOR = 0.05


@dataclass(frozen=True)
class Perturbation:
    """``x -> clip(x + delta)`` for one sample or a batch: the additive trigger for ``label``.

    ``radius`` is ‖delta‖ in ``norm`` relative to the data's scale (module docstring);
    ``found`` says whether ``fit_success`` reached the threshold within the ladder.
    """

    label: int
    norm: str
    radius: float
    fit_success: float  # on the samples delta was fitted on
    heldout_success: float  # on samples delta never saw
    found: bool
    delta: torch.Tensor  # one sample's shape
    value_range: tuple[float, float]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.value_range
        return (x + self.delta.to(x.device, x.dtype)).clamp(low, high)


@dataclass(frozen=True)
class PerturbationSearch:
    """One additive trigger per label in ``labels`` (in that order; tensors on the CPU).

    ``radii`` are the relative radii; ``anomaly_index`` is their MAD outlier score
    (:func:`radius_anomaly_index`), positive
    when a label needs a smaller δ than typical; ``size_ratio`` each radius over the median of
    the other labels' radii. ``target`` is the label with the smallest radius among those with
    anomaly index > 2 whose δ works on most held-out samples (≥ 0.5) — the rule of
    :class:`.inversion.Inversion` — and whose size ratio is at most ``TARGET_RATIO``; else None.
    ``space`` is where δ acts: "input", or "features" (the output of the model's fixed front
    end).
    """

    labels: list[int]
    perturbations: list[Perturbation]
    radii: torch.Tensor
    anomaly_index: torch.Tensor
    size_ratio: torch.Tensor  # each radius over the median radius of the other labels
    scale: float  # the data scale radii are relative to
    norm: str
    space: str
    target: int | None

    def perturbation(self, label: int) -> Perturbation:
        check(label in self.labels, f"label must be one of {self.labels}, got {label!r}")
        return self.perturbations[self.labels.index(label)]

    def trigger(self, label: int) -> Perturbation:
        """The same as :meth:`perturbation`: the name every trigger family's result shares
        (:meth:`.inversion.Inversion.trigger`, :meth:`.generator.GeneratorSearch.trigger`)."""
        return self.perturbation(label)


def radius_anomaly_index(radii: torch.Tensor) -> torch.Tensor:
    """:func:`.inversion.anomaly_index` of the radii, with ``1.4826·MAD`` at least
    ``MAD_FLOOR`` times their median: a label must be a few percent of the median below it, not
    just below a tie, to score high. Positive when a label needs less than typical."""
    median = radii.median()
    floor = MAD_FLOOR * median / MAD_CONSTANT
    mad = (radii - median).abs().median()
    if mad >= floor:
        return anomaly_index(radii)
    return (median - radii) / (MAD_CONSTANT * floor).clamp_min(torch.finfo(radii.dtype).tiny)


def size_ratios(radii: torch.Tensor) -> torch.Tensor:
    """Each radius over the median radius of the other labels (≪ 1: a shortcut to the label);
    NaN for a single label, which has no others."""
    if len(radii) < 2:
        return torch.full_like(radii, float("nan"))
    others = [torch.cat([radii[:i], radii[i + 1 :]]).median() for i in range(len(radii))]
    return radii / torch.stack(others).clamp_min(torch.finfo(radii.dtype).tiny)


def halves(data: Split, seed: int) -> tuple[Split, Split]:
    """Two disjoint halves of ``data`` drawn by ``seed``: δ is fitted on the first and its
    held-out success measured on the second."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    half = len(data) // 2
    return data.subset(order[:half]), data.subset(order[half:])


def data_scale(x: torch.Tensor, norm: str) -> float:
    """Mean ‖x_i − x̄‖ in ``norm`` over the samples of ``x`` (x̄: the per-feature mean)."""
    check(norm in NORMS, f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    centred = (x - x.mean(0)).flatten(1)
    ord = 2 if norm == "l2" else float("inf")
    return float(torch.linalg.vector_norm(centred, ord=ord, dim=1).mean())


def _norm(delta: torch.Tensor, norm: str) -> float:
    return float(torch.linalg.vector_norm(delta, ord=2 if norm == "l2" else float("inf")))


def _project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / torch.linalg.vector_norm(delta).clamp_min(eps))


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-descent direction of unit ``norm`` for the gradient ``grad``."""
    if norm == "linf":
        return grad.sign()
    return grad / torch.linalg.vector_norm(grad).clamp_min(torch.finfo(grad.dtype).tiny)


def _search_one(model, x, label, *, norm, scale, value_range, ladder, ratio, steps, step_size,
                batch_size, threshold, seed):  # fmt: skip
    """Climb the ladder for one label; returns delta and whether it reached ``threshold``."""
    low, high = value_range
    generator = torch.Generator().manual_seed(seed * 100_003 + label)  # same for any label order
    target = torch.full((batch_size,), label, device=x.device)
    delta = torch.zeros(x.shape[1:], device=x.device)

    def rate(d: torch.Tensor) -> float:
        return success_rate(model, x, label, lambda b: (b + d).clamp(low, high), 4 * batch_size)

    for relative in ladder:
        eps = relative * scale
        hits, seen = 0, 0
        for step in range(1, steps + 1):
            batch = x[torch.randint(len(x), (batch_size,), generator=generator).to(x.device)]
            delta.requires_grad_(True)
            logits = model((batch + delta).clamp(low, high))
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, target), [delta])
            delta = _project(delta.detach() - step_size * eps * _direction(grad, norm), norm, eps)
            hits += int((logits.argmax(1) == label).sum())
            seen += batch_size
            if step % CHECK_EVERY == 0:
                if hits / seen >= threshold and rate(delta) >= threshold:
                    scale_down = flip_scale(
                        model, x, label, delta, value_range, threshold, 1 / ratio, 4 * batch_size
                    )
                    return scale_down * delta, True
                hits, seen = 0, 0
    return delta, False


@torch.no_grad()
def flip_scale(model, x, label, delta, value_range, threshold, lowest, batch_size) -> float:
    """The smallest c in [``lowest``, 1] such that ``clip(x + c·delta)`` sends a ``threshold``
    fraction of ``x`` to ``label``: each sample's flipping scale is bisected in log c
    (``REFINE_STEPS`` forward passes), and c is the ``threshold`` quantile of those scales — a
    continuous value, so the labels' radii do not tie on a grid. ``delta`` is one sample's
    shape (shared, :func:`invert_perturbations`) or ``x``'s shape (one change per sample, the
    generator of :mod:`.generator`). The model must be in evaluation mode."""
    low_value, high_value = value_range
    shape = (-1,) + (1,) * (x.dim() - 1)
    per_sample = delta.dim() == x.dim()

    def flipped(scale: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            model((x[i : i + batch_size] + scale[i : i + batch_size].view(shape)
                   * (delta[i : i + batch_size] if per_sample else delta))
                  .clamp(low_value, high_value)).argmax(1) == label
            for i in range(0, len(x), batch_size)
        ])  # fmt: skip

    low = torch.full((len(x),), lowest, device=x.device)
    high = torch.ones(len(x), device=x.device)
    never = ~flipped(high)
    for _ in range(REFINE_STEPS):
        middle = (low * high).sqrt()
        hit = flipped(middle)
        high = torch.where(hit, middle, high)
        low = torch.where(hit, low, middle)
    high[never] = float("inf")
    needed = min(len(x), max(1, math.ceil(threshold * len(x) - 1e-9)))
    return float(high.sort().values[needed - 1].clamp_max(1.0))


def suspected_target(
    labels: list[int], radii: torch.Tensor, index: torch.Tensor, ratios: torch.Tensor,
    heldout_success: list[float],
) -> int | None:  # fmt: skip
    """The label with the smallest radius among those with anomaly index > 2, size ratio at most
    ``TARGET_RATIO`` and held-out success ≥ 0.5; None if there is none. The rule of
    :class:`PerturbationSearch` and :class:`.generator.GeneratorSearch`."""
    candidates = [
        i
        for i in range(len(labels))
        if index[i] > 2 and ratios[i] <= TARGET_RATIO and heldout_success[i] >= 0.5
    ]
    return labels[min(candidates, key=lambda i: radii[i])] if candidates else None


def check_ladder_search(
    data: Split, heldout: Split | None, *, norm: str, threshold: float, start: float,
    ratio: float, space: str, **positive: int,
) -> None:  # fmt: skip
    """The arguments both ladder families (this one and :mod:`.generator`) share, each mistake
    one line; ``positive`` names the integers that must be ≥ 1."""
    check(isinstance(data, Split) and len(data) > 0, "data must be a non-empty Split")
    check(
        heldout is None or (isinstance(heldout, Split) and len(heldout) > 0),
        "heldout must be a non-empty Split or None",
    )
    check(
        heldout is None or heldout.x.shape[1:] == data.x.shape[1:],
        "heldout samples must have the shape of data's samples",
    )
    check(norm in NORMS, f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    check(0 < threshold <= 1, f"threshold must be in (0, 1], got {threshold}")
    check(start > 0, f"start must be a positive relative radius, got {start}")
    check(ratio > 1, f"ratio must be > 1, got {ratio}")
    for name, value in positive.items():
        check(
            isinstance(value, int) and not isinstance(value, bool) and value >= 1,
            f"{name} must be a positive integer, got {value!r}",
        )
    check(space in SPACES, f"space must be one of {', '.join(SPACES)}, got {space!r}")


def searched_labels(model: nn.Module, mode: EvalMode, data: Split, labels) -> list[int]:
    """``labels`` checked against the model's outputs, or every class when None."""
    with torch.no_grad():
        num_classes = model(mode.inputs(data.x[:1])).shape[1]
    labels = list(range(num_classes)) if labels is None else [int(t) for t in labels]
    check(
        len(labels) > 0 and all(0 <= t < num_classes for t in labels),
        f"labels must be a non-empty list of classes in 0..{num_classes - 1}, got {labels}",
    )
    return labels


def label_samples(
    mode: EvalMode, data: Split, heldout: Split, label: int, fit_samples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of other labels a trigger for ``label`` is fitted on (at most
    ``fit_samples``, drawn by ``seed`` and the label) and checked on (all of ``heldout``'s)."""
    others = (data.y != label).nonzero().flatten()
    check(len(others) > 0, f"data has no sample of a label other than {label}")
    if len(others) > fit_samples:
        pick = torch.Generator().manual_seed(seed * 100_003 + label)
        others = others[torch.randperm(len(others), generator=pick)[:fit_samples]]
    held = mode.inputs(heldout.x[heldout.y != label])
    check(len(held) > 0, f"heldout has no sample of a label other than {label}")
    return mode.inputs(data.x[others]), held


def invert_perturbations(
    model: nn.Module,
    data: Split,
    *,
    heldout: Split | None = None,
    labels: list[int] | None = None,
    norm: str = "l2",
    threshold: float = 0.9,
    start: float = 1 / 64,
    ratio: float = 2**0.5,
    rungs: int = 18,
    steps: int = 20,
    step_size: float = 0.1,
    batch_size: int = 32,
    fit_samples: int = 256,
    value_range: tuple[float, float] | None = None,
    space: str = "input",
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> PerturbationSearch:
    """Search an additive trigger for each label (default: every class) on the clean ``data``.

    δ is fitted on ``data`` and its held-out success measured on ``heldout``; without
    ``heldout``, ``data`` is split into two halves by ``seed`` (:func:`halves`). The model is
    not changed. Defaults and why (those marked *sweep* are still to be chosen on development
    cells, methods.md §12.1 — never on evaluation data):

    - ``norm`` "l2": a blend or an overlay spreads a moderate change over every input value,
      which ℓ2 measures; "linf" suits triggers bounded per value (SIG). *sweep*
    - ``threshold`` 0.9: Neural Cleanse's success rate for a working trigger.
    - ``start`` 1/64, ``ratio`` √2, ``rungs`` 18: relative radii 0.016 … 5.7, from below a
      universal adversarial perturbation's size to well beyond a natural class change (≈ 1 on
      the tiny test tasks); √2 keeps the warm start close to the last rung. *sweep*
    - ``steps`` 20 per rung, ``step_size`` 0.1·ε: twenty steps of a tenth of the radius cross the
      ball's diameter once, enough for the warm-started δ to follow the growing ball. *sweep*
    - ``batch_size`` 32: the estimate's mini-batch (``EstimateConfig``).
    - ``fit_samples`` 256 (per label, samples of other labels, drawn by ``seed``): enough for δ to
      generalise on 6–10 classes while each success check stays one cheap forward pass. *sweep*
    - ``value_range``: ``value_range_of(data.x)`` — [0, 1] images, [-1, 1] waveforms, the data's
      own range for features.
    - ``space`` "input"; "features" (or "auto" and a model with a fixed front end) searches δ
      on the front end's output, e.g. an audio model's log-mel map (:func:`.feature_space`).
    """
    check_ladder_search(
        data, heldout, norm=norm, threshold=threshold, start=start, ratio=ratio, space=space,
        rungs=rungs, steps=steps, batch_size=batch_size, fit_samples=fit_samples,
    )  # fmt: skip
    check(0 < step_size <= 1, f"step_size must be in (0, 1], got {step_size}")
    if heldout is None:
        check(len(data) >= 2, "data must have at least 2 samples to split off a held-out half")
        data, heldout = halves(data, seed)
    if uses_features(model, space):
        with feature_space(model, data, heldout) as (fit_features, heldout_features):
            search = invert_perturbations(
                model, fit_features, heldout=heldout_features, labels=labels, norm=norm,
                threshold=threshold, start=start, ratio=ratio, rungs=rungs, steps=steps,
                step_size=step_size, batch_size=batch_size, fit_samples=fit_samples,
                value_range=value_range, seed=seed, device=device, progress=progress,
            )  # fmt: skip
        return dataclasses.replace(search, space="features")
    value_range = value_range or value_range_of(data.x)
    check(value_range[0] < value_range[1], f"value_range must be (low, high), got {value_range}")
    scale = data_scale(data.x, norm)
    check(scale > 0, "data has no variation to measure a radius against (all samples equal)")
    ladder = [start * ratio**k for k in range(rungs)]
    perturbations = []
    with EvalMode(model, data, device) as mode:
        labels = searched_labels(model, mode, data, labels)
        with progress_bar(console=console, transient=True, disable=not progress) as bar:
            task = bar.add_task("invert perturbations", total=len(labels))
            for label in labels:
                x, held = label_samples(mode, data, heldout, label, fit_samples, seed)
                delta, found = _search_one(
                    model, x, label, norm=norm, scale=scale, value_range=value_range,
                    ladder=ladder, ratio=ratio, steps=steps, step_size=step_size,
                    batch_size=batch_size, threshold=threshold, seed=seed,
                )  # fmt: skip
                trigger = Perturbation(
                    label, norm, _norm(delta, norm) / scale, 0.0, 0.0, found, delta.cpu(),
                    value_range,
                )  # fmt: skip
                perturbations.append(
                    dataclasses.replace(
                        trigger,
                        fit_success=success_rate(model, x, label, trigger, 4 * batch_size),
                        heldout_success=success_rate(model, held, label, trigger, 4 * batch_size),
                    )
                )
                bar.advance(task)
    radii = torch.tensor([p.radius for p in perturbations])
    index = radius_anomaly_index(radii)
    ratios = size_ratios(radii)
    target = suspected_target(
        labels, radii, index, ratios, [p.heldout_success for p in perturbations]
    )
    return PerturbationSearch(
        labels=labels,
        perturbations=perturbations,
        radii=radii,
        anomaly_index=index,
        size_ratio=ratios,
        scale=scale,
        norm=norm,
        space="input",
        target=target,
    )
