"""A tiny backdoored keyword-spotting model, trained and purified end to end (issue: every
defense works on speech models unchanged)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from torchpurify.attacks import build_attack, poison_split
from torchpurify.data.base import Split
from torchpurify.data.splits import defender_split
from torchpurify.defenses import Clean, build_defense
from torchpurify.diagnostics import neuron_identification
from torchpurify.errors import UserError
from torchpurify.estimate import EstimateConfig, estimate_backdoor
from torchpurify.metrics import evaluate
from torchpurify.models import build_model
from torchpurify.neurons import masked_layers
from torchpurify.neurons.inversion import feature_space, uses_features, value_range_of
from torchpurify.train import TrainConfig, fit

RATE, LENGTH, CLASSES = 16000, 8000, 4
PITCHES = (300.0, 600.0, 1200.0, 2400.0)


def tones(n: int, seed: int) -> Split:
    """Class k: a 150–250 ms tone at PITCHES[k] (±3 %) at a random place, in noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    t = torch.arange(LENGTH) / RATE
    pitch = torch.tensor(PITCHES)[y] * (1 + 0.03 * (2 * torch.rand(n, generator=g) - 1))
    start = torch.randint(0, LENGTH // 2, (n,), generator=g)
    length = torch.randint(2400, 4000, (n,), generator=g)
    index = torch.arange(LENGTH)
    on = (index >= start[:, None]) & (index < (start + length)[:, None])
    amplitude = 0.2 + 0.3 * torch.rand(n, 1, generator=g)
    x = amplitude * torch.sin(2 * math.pi * pitch[:, None] * t) * on
    x = x + 0.02 * torch.randn(n, LENGTH, generator=g)
    return Split(x.clamp(-1, 1), y)


@pytest.fixture(scope="module")
def backdoored_kws():
    clean = tones(1200, seed=0)
    trigger = build_attack("noise-burst", (LENGTH,), amplitude=0.3)
    poisoned = poison_split(clean, trigger, rate=0.1, target=0, seed=0)
    unpoisoned = sorted(set(range(len(clean))) - set(poisoned.poisoned.tolist()))
    tune, holdout = defender_split(unpoisoned, len(clean), fraction=0.3, seed=0)
    torch.manual_seed(0)
    model = build_model("kws-cnn", (LENGTH,), CLASSES)
    fit(model, poisoned.split, TrainConfig(epochs=4, batch_size=64, lr=0.05, progress=False))
    model.eval()
    test = tones(400, seed=1)
    before = evaluate(model, test, trigger, target=0, num_classes=CLASSES)
    assert before.acc > 0.9 and before.asr > 0.9, before
    return model, clean.subset(tune), clean.subset(holdout), test, trigger, before


RECIPES = {
    "gnft": {"epochs": 8, "lr": 0.05, "r": 0.5},
    "fine-pruning": {"epochs": 3},
    "salience-ar": {"epochs": 8, "lr": 0.05},
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_defenses_remove_an_audio_backdoor(name, backdoored_kws):
    model, tune, holdout, test, trigger, before = backdoored_kws
    defense = build_defense(name, device="cpu", batch_size=64, **RECIPES[name])
    purified = defense.purify(model, Clean(tune, holdout))
    after = evaluate(purified.model, test, trigger, target=0, num_classes=CLASSES)
    assert after.asr < 0.5 * before.asr, (name, before, after)
    assert after.acc > before.acc - 0.1, (name, before, after)


def test_linf_pruning_and_diagnostics_run_on_an_audio_model(backdoored_kws):
    model, tune, holdout, test, trigger, before = backdoored_kws
    defense = build_defense("linf-pruning", device="cpu", inversion_steps=30, rounds=1)
    purified = defense.purify(model, Clean(tune, holdout))
    assert purified.log["layer"] == "block4.2" and "trigger" in purified.log
    found = neuron_identification(model, holdout, trigger)
    assert found["layer"] == "block4.2" and 0 <= found["rules"]["mean-activation"]["auc"] <= 1


@pytest.mark.parametrize("architecture", ["kws-cnn", "res8", "ds-cnn", "lstm", "m5"])
def test_every_defense_runs_on_every_audio_model(architecture):
    torch.manual_seed(0)
    model = build_model(architecture, (LENGTH,), CLASSES)
    data = tones(96, seed=2)
    clean = Clean(data.subset(range(64)), data.subset(range(64, 96)))
    for name, params in {
        "ft": {"epochs": 1},
        "gnft": {"epochs": 1},
        "fine-pruning": {"epochs": 1},
        "salience-ar": {"epochs": 1},
        "linf-pruning": {"inversion_steps": 2, "rounds": 1},
    }.items():
        result = build_defense(name, device="cpu", batch_size=32, **params).purify(model, clean)
        assert result.cost.forward > 0, (architecture, name)


def test_in_feature_space_the_model_is_the_same_on_log_mel_features(backdoored_kws):
    model, tune, holdout, test, trigger, before = backdoored_kws
    front = model.front_end
    assert uses_features(model, "auto") and not uses_features(model, "input")
    with torch.no_grad():
        outside = model(holdout.x[:16])
    with feature_space(model, holdout) as (features,):
        assert isinstance(model.front_end, torch.nn.Identity)
        assert features.x.shape[:2] == (len(holdout), front.n_mels) and features.x.dim() == 3
        assert torch.equal(features.y, holdout.y)
        # the pattern may span the log-mel values, not the waveform's [-1, 1]
        low, high = value_range_of(features.x)
        assert (low, high) == (float(features.x.min()), float(features.x.max()))
        assert low < -1 or high > 1
        with torch.no_grad():
            inside = model(features.x[:16])
    assert model.front_end is front
    torch.testing.assert_close(inside, outside)
    with pytest.raises(RuntimeError, match="boom"), feature_space(model, holdout):
        raise RuntimeError("boom")
    assert model.front_end is front  # put back whatever happens inside


def test_feature_space_needs_a_fixed_front_end():
    image_model = build_model("small-cnn", (1, 12, 12), 4)
    assert not uses_features(image_model, "auto")
    with pytest.raises(UserError, match="space=features needs a model with a fixed front_end"):
        uses_features(image_model, "features")
    with pytest.raises(UserError, match="space must be one of input, features, auto"):
        build_defense("linf-pruning", space="log-mel")


def test_the_estimate_and_linf_pruning_run_on_log_mel_features(backdoored_kws, monkeypatch):
    """``space="features"``: the same computation as on the front end's features by hand, and
    ℓ∞ pruning's masks land on the waveform model. (Which label the inversion finds is a
    development question, methods.md §11.5: on these tones, class 3's narrow 2.4 kHz line is a
    smaller time-frequency mask than the noise burst — but not small against the other labels'
    masks, so the size test of §12.2 abstains; the pruning path is then run with the test
    neutral.)"""
    model, tune, holdout, test, trigger, before = backdoored_kws
    config = EstimateConfig(steps=20, capped_steps=10, budget=0.5, families=("mask",))
    by_space = estimate_backdoor(model, holdout, dataclasses.replace(config, space="features"))
    with feature_space(model, holdout) as (features,):
        by_hand = estimate_backdoor(model, features, config)
    assert by_space.mask_norms == by_hand.mask_norms and by_space.est_asr == by_hand.est_asr
    assert by_space.mask_norms != estimate_backdoor(model, holdout, config).mask_norms

    def purify():
        defense = build_defense(
            "linf-pruning", device="cpu", space="features", inversion_steps=30,
            capped_budget=1.0, rounds=1, batch_size=64,
        )  # fmt: skip
        return defense.purify(model, Clean(tune, holdout))

    abstained = purify().log["trigger"]
    assert abstained["target"] is None and abstained["suspected"] is not None, str(abstained)
    assert abstained["size_ratio"] > EstimateConfig().mask_ratio
    assert max(abstained["anomaly_index"]) < EstimateConfig().outlier_index

    from torchpurify.defenses import linf_pruning

    neutral = linf_pruning.suspect

    def without_size_test(model, holdout, inversion, config=None, **kwargs):
        config = dataclasses.replace(config or EstimateConfig(), mask_ratio=1.0)
        return neutral(model, holdout, inversion, config, **kwargs)

    monkeypatch.setattr(linf_pruning, "suspect", without_size_test)
    purified = purify()
    log = purified.log
    assert log["space"] == "features" and log["trigger"]["target"] is not None, str(log["trigger"])
    masks = masked_layers(purified.model)
    assert log["num_pruned"] > 0 and list(masks) == ["block4.2"]
    assert int((masks["block4.2"] == 0).sum()) == log["num_pruned"]
    assert type(purified.model.front_end) is type(model.front_end)  # a waveform model again
    assert purified.model(test.x[:4]).shape == (4, CLASSES)
