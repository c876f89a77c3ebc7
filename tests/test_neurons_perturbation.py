"""Additive-perturbation trigger inversion (issue 27): a whole-input trigger such as a blend is
found as a label that needs a much smaller δ than the others."""

import copy
import math

import pytest
import torch
from torch import nn

from tests.conftest import TINY_CLASSES, TINY_SHAPE, gratings
from torchpurify.attacks import build_attack, poison_split
from torchpurify.data.base import Split
from torchpurify.errors import UserError
from torchpurify.metrics import evaluate
from torchpurify.models import build_model
from torchpurify.neurons import invert_triggers
from torchpurify.neurons.inversion import feature_space, trigger_success
from torchpurify.neurons.perturbation import data_scale, halves, invert_perturbations
from torchpurify.train import TrainConfig, fit

# Test-sized ladder: the tiny tasks' natural radii are ≈ 1, so start at 1/8 and take 10 steps a
# rung (the defaults climb from 1/64 with 20; same answers here, about 4× slower).
CHEAP = dict(fit_samples=128, start=1 / 8, steps=10)
WAVE_LENGTH, WAVE_CLASSES = 64, 5


def varied_contrast(split: Split, seed: int) -> Split:
    """The gratings with a random contrast in [0.4, 1] each: a blend lowers contrast by 1 − α,
    and on fixed-contrast gratings the model learns that instead of the pattern (a contrast
    drop of 0.8 alone flipped 99.6 % of inputs; no additive δ can lower contrast)."""
    generator = torch.Generator().manual_seed(seed)
    contrast = 0.4 + 0.6 * torch.rand(len(split), 1, 1, 1, generator=generator)
    return Split(0.5 + contrast * (split.x - 0.5), split.y)


def blend_task(n: int, seed: int) -> Split:
    return varied_contrast(gratings(n, seed=seed), seed + 7)


def train_small_cnn(data: Split) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("small-cnn", TINY_SHAPE, TINY_CLASSES)
    fit(model, data, TrainConfig(epochs=4, batch_size=64, lr=0.05, progress=False, device="cpu"))
    return model.eval()


@pytest.fixture(scope="module")
def blended():
    """small-cnn on 2,000 gratings, 15 % blended (α = 0.2, a fixed uniform pattern) to label 0."""
    trigger = build_attack("blended", TINY_SHAPE, alpha=0.2)
    poisoned = poison_split(blend_task(2000, seed=0), trigger, rate=0.15, target=0, seed=0)
    model = train_small_cnn(poisoned.split)
    rates = evaluate(model, blend_task(800, seed=1), trigger, target=0, num_classes=TINY_CLASSES)
    assert rates.acc > 0.9 and rates.asr > 0.9, rates
    return model, blend_task(300, seed=2)


def tones(n: int, seed: int) -> Split:
    """Class k: a sinusoid of k + 2 cycles per clip, random phase and amplitude, in noise."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % WAVE_CLASSES
    phase = torch.rand(n, 1, generator=generator) * 2 * math.pi
    amplitude = 0.2 + 0.4 * torch.rand(n, 1, generator=generator)
    t = torch.arange(WAVE_LENGTH) / WAVE_LENGTH
    x = amplitude * torch.sin(2 * math.pi * (y[:, None] + 2) * t + phase)
    x = x + 0.05 * torch.randn(n, WAVE_LENGTH, generator=generator)
    return Split(x.clamp(-1, 1), y)


def wave_model() -> nn.Module:
    """The shape of conftest's ``wave_net`` (1-D convs, BatchNorm), with five classes."""
    return nn.Sequential(
        nn.Unflatten(1, (1, -1)),
        nn.Conv1d(1, 8, 9, stride=2, padding=4),
        nn.ReLU(),
        nn.Conv1d(8, 16, 5, stride=2, padding=2),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(16, WAVE_CLASSES),
    )


@pytest.fixture(scope="module")
def blended_waves():
    """The 1-D model trained on 1,000 tones, 15 % blended (audio blend, α = 0.2) to label 0."""
    trigger = build_attack("blend", (WAVE_LENGTH,), alpha=0.2)
    poisoned = poison_split(tones(1000, seed=0), trigger, rate=0.15, target=0, seed=0)
    torch.manual_seed(0)
    model = wave_model()
    config = TrainConfig(epochs=6, batch_size=32, lr=0.05, progress=False, device="cpu")
    fit(model, poisoned.split, config)
    model.eval()
    rates = evaluate(model, tones(500, seed=1), trigger, target=0, num_classes=WAVE_CLASSES)
    assert rates.acc > 0.9 and rates.asr > 0.9, rates
    return model, tones(300, seed=2)


def rounded(values) -> list[float]:
    return [round(float(v), 2) for v in values]


def test_a_blend_target_needs_the_smallest_perturbation(blended):
    """Observed: radii [0.29, 0.86, 0.89, 1.01, 1.10, 1.00], anomaly index 3.5 for label 0,
    size ratio 0.29. Neural Cleanse on the same model (100 steps) also singles label 0 out on
    these 12×12 images (mask ℓ1 5.0 against 22–30, index 6.1): only the perturbation result is
    asserted here."""
    model, holdout = blended
    search = invert_perturbations(model, holdout, **CHEAP)
    nc = invert_triggers(model, holdout, steps=100, batch_size=32)
    print(
        f"perturbation radii {rounded(search.radii)}, index {rounded(search.anomaly_index)}, "
        f"ratio {rounded(search.size_ratio)}; mask-and-pattern ℓ1 {rounded(nc.mask_norms)}, "
        f"index {rounded(nc.anomaly_index)}"
    )
    assert search.labels == list(range(TINY_CLASSES)) and search.norm == "l2"
    assert int(search.radii.argmin()) == 0 and search.target == 0
    assert search.anomaly_index[0] > 2.5 and search.size_ratio[0] < 0.45
    assert search.size_ratio[1:].min() > 0.75
    found = search.perturbation(0)
    assert found.found and found.fit_success >= 0.9 and found.heldout_success > 0.8
    assert found.delta.shape == TINY_SHAPE
    assert math.isclose(found.delta.norm().item() / search.scale, found.radius, rel_tol=1e-4)
    assert trigger_success(model, holdout, 0, found) > 0.8  # δ acts as a trigger
    assert 0 <= float(found(holdout.x).min()) and float(found(holdout.x).max()) <= 1


def test_a_clean_model_has_no_outlier():
    """Observed: radii [0.97, 0.89, 1.07, 1.11, 1.01, 1.19], largest index 1.3 (up to 2.6 over
    other seeds, when the natural radii sit within a few percent), smallest ratio 0.88."""
    model = train_small_cnn(blend_task(2000, seed=0))
    search = invert_perturbations(model, blend_task(300, seed=2), **CHEAP)
    print(f"clean radii {rounded(search.radii)}, index {rounded(search.anomaly_index)}")
    assert search.target is None
    assert search.size_ratio.min() > 0.75 and search.anomaly_index.max() < 3
    assert all(p.found for p in search.perturbations)


def test_waveforms_end_to_end(blended_waves):
    """N×T waveforms, both norms. Observed (ℓ2): label 0 at radius 0.16, size ratio 0.17."""
    model, holdout = blended_waves
    for norm in ("l2", "linf"):
        search = invert_perturbations(model, holdout, norm=norm, **CHEAP)
        print(f"{norm} radii {rounded(search.radii)}, ratio {rounded(search.size_ratio)}")
        assert int(search.radii.argmin()) == 0 and search.size_ratio[0] < 0.4
        found = search.perturbation(0)
        assert found.delta.shape == (WAVE_LENGTH,) and found.norm == norm
        assert found.heldout_success > 0.8 and found(holdout.x).shape == holdout.x.shape
        ord = 2 if norm == "l2" else math.inf
        size = torch.linalg.vector_norm(found.delta, ord=ord).item() / search.scale
        assert math.isclose(size, found.radius, rel_tol=1e-4)
        assert search.scale == pytest.approx(data_scale(halves(holdout, 0)[0].x, norm))


def test_the_model_is_not_changed_and_stays_in_its_mode(blended_waves):
    """BatchNorm running statistics would move if the search ran in training mode."""
    model = copy.deepcopy(blended_waves[0]).train()
    before = copy.deepcopy(model.state_dict())
    invert_perturbations(model, blended_waves[1], labels=[0, 2], **CHEAP)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_held_out_success_is_measured_on_samples_not_fitted(blended_waves):
    model, holdout = blended_waves
    fitted, unseen = halves(holdout, seed=0)
    assert not set(fitted.x[:, 0].tolist()) & set(unseen.x[:, 0].tolist())
    split = invert_perturbations(model, holdout, **CHEAP)
    same = invert_perturbations(model, fitted, heldout=fitted, **CHEAP)
    for a, b in zip(split.perturbations, same.perturbations, strict=True):
        assert torch.equal(a.delta, b.delta) and a.fit_success == b.fit_success
        assert b.heldout_success == b.fit_success  # held out = fitted: the same number
        assert a.heldout_success == trigger_success(model, unseen, a.label, a)
        assert a.fit_success == trigger_success(model, fitted, a.label, a)
    assert any(a.heldout_success != a.fit_success for a in split.perturbations)


def test_the_search_is_deterministic_and_independent_of_label_order(blended_waves):
    model, holdout = blended_waves
    first = invert_perturbations(model, holdout, labels=[1, 3], seed=3, **CHEAP)
    again = invert_perturbations(model, holdout, labels=[3, 1], seed=3, **CHEAP)
    other = invert_perturbations(model, holdout, labels=[1, 3], seed=4, **CHEAP)
    for label in (1, 3):
        assert torch.equal(first.perturbation(label).delta, again.perturbation(label).delta)
        assert not torch.equal(first.perturbation(label).delta, other.perturbation(label).delta)
    assert math.isnan(invert_perturbations(model, holdout, labels=[1], **CHEAP).size_ratio[0])


def test_feature_space_of_an_audio_front_end():
    """``space="features"``: δ lives on the log-mel map, as by hand inside ``feature_space``."""
    torch.manual_seed(0)
    model = build_model("kws-cnn", (4000,), 3).eval()
    generator = torch.Generator().manual_seed(0)
    waves = (0.3 * torch.randn(60, 4000, generator=generator)).clamp(-1, 1)
    data = Split(waves, torch.arange(60) % 3)
    settings = dict(labels=[0, 1], rungs=2, steps=5, batch_size=8)
    front = model.front_end
    search = invert_perturbations(model, data, space="features", **settings)
    assert model.front_end is front and search.space == "features"
    fitted, unseen = halves(data, seed=0)
    with feature_space(model, fitted, unseen) as (features, unseen_features):
        by_hand = invert_perturbations(model, features, heldout=unseen_features, **settings)
        assert search.perturbation(0).delta.shape == features.x.shape[1:]
    assert torch.equal(search.radii, by_hand.radii) and by_hand.space == "input"


def test_bad_arguments_are_one_line_errors(wave_net):
    data = Split(torch.rand(20, 64) * 2 - 1, torch.arange(20) % 3)
    with pytest.raises(UserError, match="norm must be one of l2, linf"):
        invert_perturbations(wave_net, data, norm="l1")
    with pytest.raises(UserError, match="heldout samples must have the shape"):
        invert_perturbations(wave_net, data, heldout=Split(torch.rand(4, 32), torch.zeros(4)))
    with pytest.raises(UserError, match="ratio must be > 1"):
        invert_perturbations(wave_net, data, ratio=1.0)
    with pytest.raises(UserError, match="labels"):
        invert_perturbations(wave_net, data, labels=[3])
    with pytest.raises(UserError, match="label must be one of"):
        invert_perturbations(wave_net, data, labels=[1], rungs=1, steps=1).perturbation(0)
