"""Generator-based trigger inversion (issue 27, BTI-DBF's family): an input-dependent trigger
such as a WaNet warp is found as a label that a bounded generator reaches with a much smaller
change than the others."""

import copy
import math
import time

import pytest
import torch
from torch import nn

from tests.conftest import TINY_CLASSES, TINY_SHAPE, gratings
from tests.test_neurons_perturbation import train_small_cnn, wave_model
from torchpurify.attacks import build_attack, poison_split
from torchpurify.data.base import Split
from torchpurify.errors import UserError
from torchpurify.metrics import evaluate
from torchpurify.models import build_model
from torchpurify.neurons import invert_generator
from torchpurify.neurons.generator import GeneratedTrigger, TriggerGenerator, bounded
from torchpurify.neurons.inversion import feature_space, trigger_success
from torchpurify.neurons.perturbation import data_scale, halves, invert_perturbations

# Test-sized ladder, as in test_neurons_perturbation: the tiny tasks' natural radii are ≈ 0.7,
# so start at 1/8 and take 10 steps a rung.
CHEAP = dict(fit_samples=128, start=1 / 8, steps=10)
# Shape-only runs: two labels, two rungs, a few steps.
SHAPE_ONLY = dict(labels=[0, 1], rungs=2, steps=5, batch_size=8, mask_steps=5)


@pytest.fixture(scope="module")
def warped():
    """small-cnn on 2,000 gratings, 10 % warped (WaNet, k 4, s 1, cross samples 2×) to label 0."""
    trigger = build_attack("wanet", TINY_SHAPE, s=1.0)
    poisoned = poison_split(gratings(2000, seed=0), trigger, rate=0.1, target=0, seed=0)
    model = train_small_cnn(poisoned.split)
    rates = evaluate(model, gratings(800, seed=1), trigger, target=0, num_classes=TINY_CLASSES)
    assert rates.acc > 0.9 and rates.asr > 0.9, rates
    return model, gratings(300, seed=2)


@pytest.fixture(scope="module")
def warped_search(warped):
    model, holdout = warped
    return invert_generator(model, holdout, **CHEAP)


def rounded(values) -> list[float]:
    return [round(float(v), 2) for v in values]


def test_a_warp_target_needs_the_smallest_generated_change(warped, warped_search):
    """Observed: radii [0.17, 0.70, 0.93, 0.69, 0.61, 0.89], anomaly index 4.2 for label 0,
    size ratio 0.24 (seeds 1, 2: see methods.md §7.2). The additive family on the same model
    does not single label 0 out (index 1.9, ratio 0.85): a warp is no fixed δ."""
    model, holdout = warped
    search = warped_search
    print(
        f"generator radii {rounded(search.radii)}, index {rounded(search.anomaly_index)}, "
        f"ratio {rounded(search.size_ratio)}"
    )
    assert search.labels == list(range(TINY_CLASSES)) and search.norm == "l2"
    assert search.space == "input" and search.layer == "block4.2"
    assert int(search.radii.argmin()) == 0 and search.target == 0
    assert search.anomaly_index[0] > 3 and search.size_ratio[0] < 0.4
    assert search.size_ratio[1:].min() > 0.7
    found = search.trigger(0)
    assert found.found and found.fit_success >= 0.9 and found.heldout_success > 0.7
    assert trigger_success(model, holdout, 0, found) > 0.7  # G acts as a trigger
    assert search.benign_mask.dim() == 3 and 0 <= search.benign_mask.min()  # C×H×W of block4.2
    assert search.benign_mask.max() <= 1


def test_a_clean_model_has_no_outlier(warped_search):
    """Observed: radii [0.62, 0.78, 0.91, 0.62, 0.66, 0.73], largest index 0.67, smallest
    ratio 0.85; the warped model's label 0 stands out far more (4.2)."""
    model = train_small_cnn(gratings(2000, seed=0))
    search = invert_generator(model, gratings(300, seed=2), **CHEAP)
    print(f"clean radii {rounded(search.radii)}, index {rounded(search.anomaly_index)}")
    assert search.target is None
    assert search.anomaly_index.max() < 2 < warped_search.anomaly_index[0]
    assert search.size_ratio.min() > 0.7
    assert all(t.found for t in search.triggers)


def test_the_bound_is_respected(warped, warped_search):
    """Every sample's change is within the trigger's bound, before and after clipping, for ℓ2
    (from the search) and ℓ∞ (a generator by hand); ``radius`` is that bound over the scale."""
    _, holdout = warped
    for t in warped_search.triggers:
        change = (t(holdout.x) - holdout.x).flatten(1).norm(dim=1)
        assert float(change.max()) <= t.bound * (1 + 1e-5)
        assert math.isclose(t.radius, t.bound / warped_search.scale, rel_tol=1e-6)
    assert warped_search.scale == pytest.approx(data_scale(halves(holdout, 0)[0].x, "l2"))
    torch.manual_seed(0)
    generator = TriggerGenerator(TINY_SHAPE)
    nn.init.normal_(generator.net[-1].weight, std=5.0)  # far beyond any bound
    with torch.no_grad():
        r = generator(holdout.x)
    assert float(bounded(r, "l2", 0.3).flatten(1).norm(dim=1).max()) <= 0.3 * (1 + 1e-5)
    assert float(bounded(r, "linf", 0.05).abs().max()) <= 0.05
    linf = GeneratedTrigger(0, "linf", 0.1, 0.05, 0.0, 0.0, True, generator, (0.0, 1.0))
    moved = linf(holdout.x)
    assert float((moved - holdout.x).abs().max()) <= 0.05 + 1e-6 and float(moved.min()) >= 0
    torch.testing.assert_close(linf(holdout.x[0]), moved[0])  # one sample or a batch


def test_held_out_samples_are_not_used_for_fitting(warped):
    """Changing the held-out samples changes nothing but the held-out success, which is the
    success on exactly those samples."""
    model, holdout = warped
    fitted, unseen = halves(holdout, seed=0)
    settings = dict(labels=[0, 3], rungs=3, steps=5, mask_steps=20, start=0.25)
    split = invert_generator(model, holdout, **settings)
    same = invert_generator(model, fitted, heldout=unseen, **settings)
    noisy = Split((unseen.x + 0.3 * torch.rand(unseen.x.shape)).clamp(0, 1), unseen.y)
    other = invert_generator(model, fitted, heldout=noisy, **settings)
    assert torch.equal(split.benign_mask, other.benign_mask)
    for a, b, c in zip(split.triggers, same.triggers, other.triggers, strict=True):
        assert a.bound == b.bound == c.bound and a.fit_success == c.fit_success
        for p, q in zip(a.generator.parameters(), c.generator.parameters(), strict=True):
            assert torch.equal(p, q)
        assert a.heldout_success == b.heldout_success == trigger_success(model, unseen, a.label, a)
        assert c.heldout_success == trigger_success(model, noisy, c.label, c)
        assert a.fit_success == trigger_success(model, fitted, a.label, a)


def test_waveforms_of_both_layouts_and_norms():
    """N×T and N×1×T waveforms: G is 1-D, its change has the sample's shape and stays in
    [-1, 1]; the model is not changed, keeps its mode and gets no gradients."""
    torch.manual_seed(0)
    model = wave_model().train()
    before = copy.deepcopy(model.state_dict())
    generator = torch.Generator().manual_seed(0)
    waves = (0.5 * torch.randn(40, 64, generator=generator)).clamp(-1, 1)
    for x, norm in ((waves, "l2"), (waves[:, None], "linf")):
        net = model if x.dim() == 2 else nn.Sequential(nn.Flatten(), model)
        search = invert_generator(net, Split(x, torch.arange(40) % 5), norm=norm, **SHAPE_ONLY)
        trigger = search.trigger(1)
        assert trigger.generator.sample_shape == x.shape[1:] and trigger.norm == norm
        moved = trigger(x)
        assert moved.shape == x.shape and float(moved.abs().max()) <= 1
        assert search.radii.shape == (2,) and search.benign_mask is not None
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_feature_space_of_an_audio_front_end():
    """``space="features"``: G lives on the kws-cnn log-mel map (40 mel channels over time),
    as by hand inside ``feature_space``."""
    torch.manual_seed(0)
    model = build_model("kws-cnn", (4000,), 3).eval()
    generator = torch.Generator().manual_seed(0)
    waves = (0.3 * torch.randn(60, 4000, generator=generator)).clamp(-1, 1)
    data = Split(waves, torch.arange(60) % 3)
    front = model.front_end
    search = invert_generator(model, data, space="features", **SHAPE_ONLY)
    assert model.front_end is front and search.space == "features"
    fitted, unseen = halves(data, seed=0)
    with feature_space(model, fitted, unseen) as (features, unseen_features):
        by_hand = invert_generator(model, features, heldout=unseen_features, **SHAPE_ONLY)
        trigger = search.trigger(0)
        assert trigger.generator.sample_shape == features.x.shape[1:] == (40, 26)
        assert trigger(features.x).shape == features.x.shape
    assert torch.equal(search.radii, by_hand.radii) and by_hand.space == "input"


def test_the_search_is_deterministic_and_independent_of_label_order():
    torch.manual_seed(0)
    model = wave_model().eval()
    data = Split((0.5 * torch.randn(40, 64)).clamp(-1, 1), torch.arange(40) % 5)
    first = invert_generator(model, data, **{**SHAPE_ONLY, "labels": [1, 3], "seed": 3})
    again = invert_generator(model, data, **{**SHAPE_ONLY, "labels": [3, 1], "seed": 3})
    other = invert_generator(model, data, **{**SHAPE_ONLY, "labels": [1, 3], "seed": 4})
    x = data.x[:8]
    for label in (1, 3):
        assert torch.equal(first.trigger(label)(x), again.trigger(label)(x))
        assert not torch.equal(first.trigger(label)(x), other.trigger(label)(x))
    alone = invert_generator(model, data, **{**SHAPE_ONLY, "labels": [1], "benign_weight": 0.0})
    assert math.isnan(alone.size_ratio[0]) and alone.layer is None and alone.benign_mask is None


def test_results_read_like_the_additive_family(wave_net):
    """The fields the estimate reads are the same for both families."""
    data = Split((torch.rand(20, 64) * 2 - 1), torch.arange(20) % 3)
    generated = invert_generator(wave_net, data, **{**SHAPE_ONLY, "batch_size": 4})
    additive = invert_perturbations(wave_net, data, labels=[0, 1], rungs=2, steps=5)
    for field in ("labels", "radii", "anomaly_index", "size_ratio", "scale", "norm", "space"):
        assert type(getattr(generated, field)) is type(getattr(additive, field)), field
    for result in (generated, additive):
        trigger = result.trigger(1)
        assert trigger.label == 1 and {"radius", "found", "heldout_success"} <= set(
            trigger.__dataclass_fields__
        )


def test_bad_arguments_are_one_line_errors(wave_net):
    data = Split(torch.rand(20, 64) * 2 - 1, torch.arange(20) % 3)
    with pytest.raises(UserError, match="norm must be one of l2, linf"):
        invert_generator(wave_net, data, norm="l1")
    with pytest.raises(UserError, match="heldout samples must have the shape"):
        invert_generator(wave_net, data, heldout=Split(torch.rand(4, 32), torch.zeros(4)))
    with pytest.raises(UserError, match="benign_weight must be ≥ 0"):
        invert_generator(wave_net, data, benign_weight=-1.0)
    with pytest.raises(UserError, match="samples must have 1 to 3 axes"):
        invert_generator(wave_net, Split(torch.rand(4, 1, 2, 2, 2), torch.zeros(4)))
    with pytest.raises(UserError, match="is not a module of this model"):
        invert_generator(wave_net, data, layer="nope", **SHAPE_ONLY)
    with pytest.raises(UserError, match="label must be one of"):
        invert_generator(wave_net, data, **SHAPE_ONLY).trigger(2)


FAMILIES = (("generator", invert_generator), ("additive", invert_perturbations))


def measure(seeds: list[int], ladder: dict) -> None:
    """The tiny-task rows of methods.md §7.2: both ladder families on the warped, blended and
    clean small-cnns, one line per model, family and seed."""
    from tests.test_neurons_perturbation import blend_task

    trigger = build_attack("wanet", TINY_SHAPE, s=1.0)
    warp = poison_split(gratings(2000, seed=0), trigger, rate=0.1, target=0, seed=0).split
    blend = build_attack("blended", TINY_SHAPE, alpha=0.2)
    blended = poison_split(blend_task(2000, seed=0), blend, rate=0.15, target=0, seed=0).split
    models = {
        "wanet": (train_small_cnn(warp), gratings(300, seed=2)),
        "clean gratings": (train_small_cnn(gratings(2000, seed=0)), gratings(300, seed=2)),
        "blended": (train_small_cnn(blended), blend_task(300, seed=2)),
        "clean blend task": (train_small_cnn(blend_task(2000, seed=0)), blend_task(300, seed=2)),
    }
    for name, (model, holdout) in models.items():
        for seed in seeds:
            for family, invert in (
                ("generator", invert_generator),
                ("additive", invert_perturbations),
            ):
                start = time.perf_counter()
                search = invert(model, holdout, seed=seed, **ladder)
                print(
                    f"{name:17} seed {seed} {family:9} radii {rounded(search.radii)} "
                    f"index {rounded(search.anomaly_index)} ratio {rounded(search.size_ratio)} "
                    f"target {search.target} {time.perf_counter() - start:.1f} s",
                    flush=True,
                )


if __name__ == "__main__":  # python -m tests.test_neurons_generator [--defaults] [seeds...]
    import sys

    torch.set_num_threads(1)
    arguments = sys.argv[1:]
    ladder = {} if "--defaults" in arguments else CHEAP
    measure([int(a) for a in arguments if a != "--defaults"] or [0], ladder)
