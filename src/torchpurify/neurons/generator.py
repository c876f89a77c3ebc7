"""Trigger inversion with a generator, in the manner of BTI-DBF (Xu, Huang, Li, Qin, Ren, ICLR
2024, "Towards Reliable and Efficient Backdoor Trigger Inversion via Decoupling Benign
Features"; issue 27, the third trigger family beside the mask and pattern of :mod:`.inversion`
and the additive δ of :mod:`.perturbation`; methods.md §7.2).

A warp (WaNet) or any input-dependent trigger is neither a small mask nor one fixed δ: the
change it makes depends on the input. So, as BTI-DBF does, a small generator G turns each clean
input into a poisoned-looking one, ``x' = clip(x + B_ε(G(x)))``, where ``B_ε`` bounds the change
of every sample to ε (ℓ2: ``ε·r/max(1, ‖r‖₂)``; ℓ∞: ``ε·tanh(r)``). For each candidate label t
we look for the smallest ε at which such a G sends the clean samples of other labels to t while
keeping their *benign features*::

    minimise over G:   mean_i CE(f(x'_i), t)
                       + λ · Σ_i ‖m ⊙ (φ(x'_i) − φ(x_i))‖² / Σ_i ‖m ⊙ φ(x_i)‖²

φ is a feature layer (by default the model's neuron layer, the last feature map before global
pooling, methods.md §0) and m ∈ [0, 1] BTI-DBF's *benign-feature mask* on it, fitted once on the
clean fitting samples (all labels) so that the masked features keep the prediction and the
unmasked ones lose it (their loss ``CE(h(m⊙φ), y) − CE(h((1 − m)⊙φ), y)``, h the layers after
φ). A backdoor target is reached through the features outside m at a small ε; another label
needs its own benign features, which the penalty resists, so it needs a much larger ε: the
backdoor target's radius is a low outlier (the MAD anomaly index of
:func:`.perturbation.radius_anomaly_index`).

Where this differs from the authors' code (a simpler variant, as issue 27 allows): they train
one generator without a label, pushing the features outside m apart (``−MSE((1 − m)φ(x'),
(1 − m)φ(x)) + 0.01·MSE(mφ(x'), mφ(x))`` while an MSE bound on ``x' − x`` holds), and read the
target as the label most generated samples get. Here every label is searched, targeted, on a
ladder of bounds, so each family (mask, additive, generator) gives the same thing: per label
the smallest bound that works, an anomaly index and a size ratio, read by the same rule
(:func:`.perturbation.suspected_target`). Their generator is a UNet pretrained to reproduce its
input; ours is three convolutions whose last one starts at zero (G starts as the identity, no
pretraining) and which also reads the sample's coordinates (CoordConv: one channel per axis in
[−1, 1]) — a translation-equivariant net alone cannot make WaNet's fixed, position-dependent
displacement field, and a patch or a fixed δ is a function of position too.

Scale, ladder, success and refinement are those of :mod:`.perturbation`: relative radius
ε/s with s the mean ‖x_i − x̄‖ of the fitting samples; rung k has ε_k = ``start``·``ratio``^k·s;
G (and its Adam state) carries over from rung to rung; the first rung whose recent mini-batches
and then all fitting samples reach ``threshold`` ends the climb; ``flip_scale`` then shrinks the
change by the smallest factor c ∈ [1/ratio, 1] that still sends a ``threshold`` fraction to t
(the generator's output scaled by c obeys the bound c·ε), so radii are continuous. A label that
never gets there keeps the top rung (``found`` False). Fit success is measured on the samples G
was fitted on; held-out success on samples neither G nor m nor the scale ever saw.

Shapes: a sample of shape (T,) is a 1-channel sequence, (C, T) a C-channel sequence (a mono
waveform (1, T), or a front end's (mel, frame) map read as mel channels over time), (C, H, W) an
image; G is made of Conv1d or Conv2d to match. ``space="features"`` inverts on the output of a
model's fixed front end (:func:`.inversion.feature_space`), as the other families do.

Cost per label, at most ``rungs``·``steps`` forward and backward passes of ``batch_size``
samples through the model and G (G is a few thousand parameters: its cost is small beside a
classifier's), plus one forward pass over the fitting samples per passed check and
``REFINE_STEPS`` + 2 for the refinement; once for all labels, ``mask_steps`` steps of two
forward and backward passes for the benign mask. Every label's G is initialised and fed from its
own seeded generator, so the result does not depend on the label order. The model stays in
evaluation mode and is not changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.data.base import Split
from torchpurify.errors import check
from torchpurify.neurons.inversion import (
    EvalMode,
    feature_space,
    success_rate,
    uses_features,
    value_range_of,
)
from torchpurify.neurons.layers import default_neuron_layer, get_module
from torchpurify.neurons.perturbation import (
    CHECK_EVERY,
    check_ladder_search,
    data_scale,
    flip_scale,
    halves,
    label_samples,
    radius_anomaly_index,
    searched_labels,
    size_ratios,
    suspected_target,
)
from torchpurify.train import progress_bar


class TriggerGenerator(nn.Module):
    """G: one batch of samples in, one unbounded change ``r`` of the same shape out.

    Three convolutions (kernel 3; the middle one dilated by 2, so each output sees 9 values per
    axis) of ``width`` channels with ReLUs between, reading the standardised sample and its
    coordinates; the last convolution starts at zero, so G starts as "no change".
    """

    def __init__(
        self, sample_shape: tuple[int, ...], *, width: int = 16, centre: float = 0.0,
        spread: float = 1.0,
    ) -> None:  # fmt: skip
        super().__init__()
        check(
            1 <= len(sample_shape) <= 3,
            f"a generator works on samples of 1 to 3 axes (T; C×T; C×H×W), got {sample_shape}",
        )
        self.sample_shape = tuple(int(n) for n in sample_shape)
        self.channels = 1 if len(sample_shape) == 1 else self.sample_shape[0]
        self.axes = self.sample_shape[-1:] if len(sample_shape) <= 2 else self.sample_shape[1:]
        conv = nn.Conv1d if len(self.axes) == 1 else nn.Conv2d
        grids = torch.meshgrid(*(torch.linspace(-1, 1, n) for n in self.axes), indexing="ij")
        self.register_buffer("coordinates", torch.stack(grids)[None])
        self.register_buffer("centre", torch.tensor(float(centre)))
        self.register_buffer("spread", torch.tensor(float(spread)))
        inputs = self.channels + len(self.axes)
        self.net = nn.Sequential(
            conv(inputs, width, 3, padding=1),
            nn.ReLU(),
            conv(width, width, 3, padding=2, dilation=2),
            nn.ReLU(),
            conv(width, self.channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        h = ((x - self.centre) / self.spread).reshape(n, self.channels, *self.axes)
        h = torch.cat([h, self.coordinates.expand(n, *self.coordinates.shape[1:])], 1)
        return self.net(h).reshape(x.shape)


def bounded(r: torch.Tensor, norm: str, bound: float | torch.Tensor) -> torch.Tensor:
    """``r`` (a batch) turned into changes of at most ``bound`` in ``norm`` per sample:
    ``bound·r/max(1, ‖r‖₂)`` (ℓ2) or ``bound·tanh(r)`` (ℓ∞)."""
    if norm == "linf":
        return bound * torch.tanh(r)
    size = torch.linalg.vector_norm(r.flatten(1), dim=1).clamp_min(1.0)
    return bound * r / size.view((-1,) + (1,) * (r.dim() - 1))


@dataclass(frozen=True, eq=False)
class GeneratedTrigger:
    """``x -> clip(x + B_bound(G(x)))`` for one sample or a batch: the input-dependent trigger
    for ``label``. ``radius`` is the bound relative to the data's scale (``bound``/scale);
    ``found`` says whether ``fit_success`` reached the threshold within the ladder."""

    label: int
    norm: str
    radius: float
    bound: float  # the absolute bound on ‖x' − x‖ in ``norm``
    fit_success: float  # on the samples G was fitted on
    heldout_success: float  # on samples G never saw
    found: bool
    generator: TriggerGenerator  # evaluation mode, parameters frozen
    value_range: tuple[float, float]

    def __post_init__(self) -> None:
        self.generator.eval().requires_grad_(False)

    def change(self, x: torch.Tensor) -> torch.Tensor:
        """The bounded change ``B_bound(G(x))`` for a batch ``x`` (before clipping)."""
        generator = self.generator
        if next(generator.parameters()).device != x.device:
            generator.to(x.device)
        return bounded(generator(x.to(torch.float32)).to(x.dtype), self.norm, self.bound)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == len(self.generator.sample_shape)
        batch = x[None] if single else x
        low, high = self.value_range
        out = (batch + self.change(batch)).clamp(low, high)
        return out[0] if single else out


@dataclass(frozen=True)
class GeneratorSearch:
    """One generated trigger per label in ``labels`` (in that order; generators on the CPU).

    The fields and the target rule are those of :class:`.perturbation.PerturbationSearch`:
    ``radii`` the smallest relative bounds that reach the threshold, ``anomaly_index`` their MAD
    outlier score (positive when a label needs less than typical), ``size_ratio`` each radius
    over the median of the other labels', ``target`` the suspected label or None
    (:func:`.perturbation.suspected_target`). ``layer`` is the feature layer of the benign
    mask (None when ``benign_weight`` was 0) and ``benign_mask`` the mask, on the CPU.
    """

    labels: list[int]
    triggers: list[GeneratedTrigger]
    radii: torch.Tensor
    anomaly_index: torch.Tensor
    size_ratio: torch.Tensor
    scale: float
    norm: str
    space: str
    target: int | None
    layer: str | None
    benign_mask: torch.Tensor | None

    def trigger(self, label: int) -> GeneratedTrigger:
        check(label in self.labels, f"label must be one of {self.labels}, got {label!r}")
        return self.triggers[self.labels.index(label)]


class _Tap:
    """A forward hook on ``layer`` that keeps its output (``features``) and, while ``mask`` is
    set, passes ``mask ⊙ output`` on instead. The output passed on is always a new tensor, so an
    in-place module after the layer cannot change the kept features."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.mask: torch.Tensor | None = None
        self.features: torch.Tensor | None = None
        self.handle = get_module(model, layer).register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.features = output
        return output * self.mask if self.mask is not None else output.clone()

    def close(self) -> None:
        self.handle.remove()


@contextmanager
def _tapped(model: nn.Module, layer: str) -> Iterator[_Tap]:
    tap = _Tap(model, layer)
    try:
        yield tap
    finally:
        tap.close()


def _benign_mask(model, tap, x, y, *, steps, batch_size, lr, seed) -> torch.Tensor:
    """BTI-DBF's decoupling: m ∈ [0, 1] on the tapped features with the masked features keeping
    the prediction and the rest losing it, ``CE(h(m⊙φ), y) − CE(h((1 − m)⊙φ), y)``, fitted
    with Adam on mini-batches of the clean fitting samples (all labels)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + 99_991)
    with torch.no_grad():
        model(x[:1])
    shape = tap.features.shape[1:]
    logit = (0.1 * torch.randn(shape, generator=generator)).to(x.device).requires_grad_()
    optimizer = torch.optim.Adam([logit], lr=lr)
    try:
        for _ in range(steps):
            pick = torch.randint(len(x), (batch_size,), generator=generator).to(x.device)
            batch, labels = x[pick], y[pick]
            mask = torch.sigmoid(logit)
            tap.mask = mask
            kept = F.cross_entropy(model(batch), labels)
            tap.mask = 1 - mask
            lost = F.cross_entropy(model(batch), labels)
            optimizer.zero_grad(set_to_none=True)
            (logit.grad,) = torch.autograd.grad(kept - lost, [logit])
            optimizer.step()
    finally:
        tap.mask = None
    return torch.sigmoid(logit.detach())


def _search_one(model, tap, x, label, *, norm, scale, value_range, ladder, ratio, steps, lr,
                batch_size, threshold, mask, benign_weight, width, centre,
                spread, seed):  # fmt: skip
    """Climb the ladder for one label; returns G, its absolute bound and whether it worked."""
    low, high = value_range
    generator = torch.Generator().manual_seed(seed * 100_003 + label)  # same for any label order
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + label)
        net = TriggerGenerator(x.shape[1:], width=width, centre=centre, spread=spread)
    net.to(x.device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    target = torch.full((batch_size,), label, device=x.device)
    clean = None
    if benign_weight > 0:  # the clean samples' masked features, once
        with torch.no_grad():
            clean = torch.cat([
                mask * (model(x[i : i + 4 * batch_size]), tap.features)[1]
                for i in range(0, len(x), 4 * batch_size)
            ])  # fmt: skip

    def changes(bound: float) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([
                bounded(net(x[i : i + 4 * batch_size]), norm, bound)
                for i in range(0, len(x), 4 * batch_size)
            ])  # fmt: skip

    for relative in ladder:
        bound = relative * scale
        hits, seen = 0, 0
        for step in range(1, steps + 1):
            pick = torch.randint(len(x), (batch_size,), generator=generator).to(x.device)
            batch = x[pick]
            logits = model((batch + bounded(net(batch), norm, bound)).clamp(low, high))
            loss = F.cross_entropy(logits, target)
            if clean is not None:
                reference = clean[pick]
                moved = (mask * tap.features - reference).pow(2).sum()
                loss = loss + benign_weight * moved / reference.pow(2).sum().clamp_min(1e-12)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            hits += int((logits.argmax(1) == label).sum())
            seen += batch_size
            if step % CHECK_EVERY == 0:
                if hits / seen >= threshold:
                    net.eval()
                    delta = changes(bound)
                    if _rate(model, x, delta, label, value_range, 4 * batch_size) >= threshold:
                        c = flip_scale(
                            model, x, label, delta, value_range, threshold, 1 / ratio,
                            4 * batch_size,
                        )  # fmt: skip
                        return net, c * bound, True
                    net.train()
                hits, seen = 0, 0
    return net.eval(), ladder[-1] * scale, False


@torch.no_grad()
def _rate(model, x, delta, label, value_range, batch_size) -> float:
    low, high = value_range
    hits = 0
    for i in range(0, len(x), batch_size):
        batch = (x[i : i + batch_size] + delta[i : i + batch_size]).clamp(low, high)
        hits += int((model(batch).argmax(1) == label).sum())
    return hits / len(x)


def invert_generator(
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
    lr: float = 0.01,
    batch_size: int = 32,
    fit_samples: int = 256,
    width: int = 16,
    benign_weight: float = 1.0,
    layer: str | None = None,
    mask_steps: int = 200,
    mask_lr: float = 0.01,
    value_range: tuple[float, float] | None = None,
    space: str = "input",
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> GeneratorSearch:
    """Search an input-dependent (generated) trigger for each label on the clean ``data``.

    G and the benign mask are fitted on ``data`` and held-out success is measured on
    ``heldout``; without ``heldout``, ``data`` is split into two halves by ``seed``
    (:func:`.perturbation.halves`). The model is not changed. Defaults (methods.md §7.2; those
    marked *pending* are still to be chosen on development cells, §12.1):

    - ``norm``, ``threshold``, ``start``, ``ratio``, ``rungs``, ``steps``, ``batch_size``,
      ``fit_samples``, ``value_range``, ``space``: as :func:`.perturbation.invert_perturbations`,
      so the families' radii are on one scale. *pending*
    - ``lr`` 0.01 (Adam on G; BTI-DBF trains its generator with Adam), ``width`` 16 channels:
      the smallest that found the tiny tests' warp. *pending*
    - ``benign_weight`` λ 1.0: the benign-feature penalty (0 turns it and the mask off).
      *pending*
    - ``layer``: the model's neuron layer (:func:`.layers.default_neuron_layer`), where BTI-DBF
      puts its mask (the features before the classifier head).
    - ``mask_steps`` 200, ``mask_lr`` 0.01: BTI-DBF's mask learning rate; 200 mini-batches is
      about their 20 epochs over 5 % of CIFAR-10 at batch 128, counted in samples. *pending*
    """
    check_ladder_search(
        data, heldout, norm=norm, threshold=threshold, start=start, ratio=ratio, space=space,
        rungs=rungs, steps=steps, batch_size=batch_size, fit_samples=fit_samples, width=width,
    )  # fmt: skip
    check(
        isinstance(mask_steps, int) and not isinstance(mask_steps, bool) and mask_steps >= 0,
        f"mask_steps must be an integer ≥ 0, got {mask_steps!r}",
    )
    check(lr > 0 and mask_lr > 0, f"lr and mask_lr must be positive, got {lr}, {mask_lr}")
    check(benign_weight >= 0, f"benign_weight must be ≥ 0, got {benign_weight}")
    check(
        1 <= data.x.dim() - 1 <= 3,
        f"samples must have 1 to 3 axes (T; C×T; C×H×W), got {tuple(data.x.shape[1:])}",
    )
    if heldout is None:
        check(len(data) >= 2, "data must have at least 2 samples to split off a held-out half")
        data, heldout = halves(data, seed)
    if uses_features(model, space):
        with feature_space(model, data, heldout) as (fit_features, heldout_features):
            search = invert_generator(
                model, fit_features, heldout=heldout_features, labels=labels, norm=norm,
                threshold=threshold, start=start, ratio=ratio, rungs=rungs, steps=steps, lr=lr,
                batch_size=batch_size, fit_samples=fit_samples, width=width,
                benign_weight=benign_weight, layer=layer, mask_steps=mask_steps,
                mask_lr=mask_lr, value_range=value_range, seed=seed, device=device,
                progress=progress,
            )  # fmt: skip
        return dataclasses.replace(search, space="features")
    value_range = value_range or value_range_of(data.x)
    check(value_range[0] < value_range[1], f"value_range must be (low, high), got {value_range}")
    scale = data_scale(data.x, norm)
    check(scale > 0, "data has no variation to measure a radius against (all samples equal)")
    centre, spread = float(data.x.mean()), float(data.x.std()) or 1.0
    ladder = [start * ratio**k for k in range(rungs)]
    use_mask = benign_weight > 0
    triggers = []
    with EvalMode(model, data, device) as mode:
        labels = searched_labels(model, mode, data, labels)
        if use_mask and layer is None:
            layer = default_neuron_layer(model, mode.inputs(data.x[:2]))
        requires = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)  # gradients flow to G and the mask only
        try:
            with _tapped(model, layer) if use_mask else _no_tap() as tap:
                mask = None
                if use_mask:
                    mask = _benign_mask(
                        model, tap, mode.inputs(data.x), data.y.to(mode.device),
                        steps=mask_steps, batch_size=batch_size, lr=mask_lr, seed=seed,
                    )  # fmt: skip
                with progress_bar(disable=not progress) as bar:
                    task = bar.add_task("invert generators", total=len(labels))
                    for label in labels:
                        x, held = label_samples(mode, data, heldout, label, fit_samples, seed)
                        net, bound, found = _search_one(
                            model, tap, x, label, norm=norm, scale=scale,
                            value_range=value_range, ladder=ladder, ratio=ratio, steps=steps,
                            lr=lr, batch_size=batch_size, threshold=threshold, mask=mask,
                            benign_weight=benign_weight, width=width, centre=centre,
                            spread=spread, seed=seed,
                        )  # fmt: skip
                        trigger = GeneratedTrigger(
                            label, norm, bound / scale, bound, 0.0, 0.0, found, net,
                            value_range,
                        )  # fmt: skip
                        with torch.no_grad():
                            fit = success_rate(model, x, label, trigger, 4 * batch_size)
                            unseen = success_rate(model, held, label, trigger, 4 * batch_size)
                        net.cpu()
                        triggers.append(
                            dataclasses.replace(trigger, fit_success=fit, heldout_success=unseen)
                        )
                        bar.advance(task)
        finally:
            for p, wanted in zip(model.parameters(), requires, strict=True):
                p.requires_grad_(wanted)
    radii = torch.tensor([t.radius for t in triggers])
    index = radius_anomaly_index(radii)
    ratios = size_ratios(radii)
    return GeneratorSearch(
        labels=labels,
        triggers=triggers,
        radii=radii,
        anomaly_index=index,
        size_ratio=ratios,
        scale=scale,
        norm=norm,
        space="input",
        target=suspected_target(
            labels, radii, index, ratios, [t.heldout_success for t in triggers]
        ),
        layer=layer if use_mask else None,
        benign_mask=mask.cpu() if mask is not None else None,
    )


@contextmanager
def _no_tap() -> Iterator[None]:
    yield None
