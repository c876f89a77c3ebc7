import json
import math

import pytest
import torch

from torchpurify.attacks import ATTACKS, build_attack, trigger_from_dict
from torchpurify.attacks.audio import audio_attack_names
from torchpurify.errors import UserError

IMAGE_ATTACKS = [n for n in ATTACKS.names() if n not in audio_attack_names()]

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 20, 30)]


def images(shape, n=4, seed=0):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def smooth_images(shape, n=2):
    """Images with small gradients, so a sub-pixel warp changes them only a little."""
    c, h, w = shape
    rows = torch.linspace(0, 1, h)[:, None]
    cols = torch.linspace(0, 1, w)[None, :]
    base = 0.5 + 0.4 * torch.sin(2 * math.pi * (rows + cols) / 2)
    return base.expand(n, c, h, w).clone()


@pytest.mark.parametrize("name", IMAGE_ATTACKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_trigger_contract(name, shape):
    trigger = build_attack(name, shape, seed=3)
    x = images(shape)
    before = x.clone()
    out = trigger(x)
    assert torch.equal(x, before), "input was modified in place"
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)
    assert torch.equal(build_attack(name, shape, seed=3)(x), out)
    singles = torch.stack([trigger(sample) for sample in x])
    torch.testing.assert_close(singles, out)


@pytest.mark.parametrize("name", IMAGE_ATTACKS)
def test_round_trip_through_json(name):
    trigger = build_attack(name, (3, 20, 30), seed=7)
    record = json.loads(json.dumps(trigger.to_dict()))
    assert record["attack"] == name and record["params"]["input_shape"] == [3, 20, 30]
    rebuilt = trigger_from_dict(record)
    assert rebuilt.params == trigger.params
    x = images((3, 20, 30))
    assert torch.equal(rebuilt(x), trigger(x))


@pytest.mark.parametrize("name", IMAGE_ATTACKS)
def test_keeps_dtype(name):
    x = images((1, 28, 28)).double()
    assert build_attack(name, (1, 28, 28))(x).dtype == torch.float64


def test_summaries_and_clean_label_defaults():
    assert all(ATTACKS.summary(name) for name in ATTACKS.names())
    assert build_attack("sig", (1, 8, 8)).clean_label
    assert not build_attack("badnets", (1, 8, 8)).clean_label


def test_badnets_patch_in_place():
    x = torch.full((2, 3, 20, 30), 0.5)
    out = build_attack("badnets", (3, 20, 30))(x)
    checkerboard = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert torch.equal(out[..., 17:, 27:], checkerboard.expand(2, 3, 3, 3))
    out[..., 17:, 27:] = 0.5
    assert torch.equal(out, x)


def test_badnets_position_and_size():
    x = torch.full((1, 10, 12), 0.5)
    out = build_attack("badnets", (1, 10, 12), size=4, position="top-left")(x)
    assert out[0, 0, 0] == 1 and out[0, 0, 1] == 0 and out[0, 3, 3] == 1
    assert torch.equal(out[:, 4:, :], x[:, 4:, :]) and torch.equal(out[:, :, 4:], x[:, :, 4:])


def test_blended_formula():
    trigger = build_attack("blended", (3, 8, 8), seed=1, alpha=0.3)
    x = images((3, 8, 8))
    pattern = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(trigger(x), 0.7 * x + 0.3 * pattern)
    other_seed = build_attack("blended", (3, 8, 8), seed=2, alpha=0.3)
    assert not torch.allclose(other_seed(x), trigger(x))


def test_sig_amplitude():
    x = torch.full((1, 3, 6, 24), 0.5)
    out = build_attack("sig", (3, 6, 24))(x)
    signal = (20 / 255) * torch.sin(2 * math.pi * torch.arange(24) * 6 / 24)
    torch.testing.assert_close(out, x + signal)
    assert (out - x).abs().max() == pytest.approx(20 / 255, abs=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_wanet_warps_slightly(shape):
    x = smooth_images(shape)
    change = (build_attack("wanet", shape)(x) - x).abs().mean()
    assert 0 < change < 0.02


@pytest.mark.parametrize("shape", SHAPES)
def test_wanet_identity_without_strength(shape):
    x = images(shape)
    torch.testing.assert_close(build_attack("wanet", shape, s=0.0)(x), x)


def test_wanet_noise_mode():
    trigger = build_attack("wanet", (3, 20, 30))
    x = smooth_images((3, 20, 30))
    first = trigger.noise(x, torch.Generator().manual_seed(0))
    again = trigger.noise(x, torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    assert not torch.allclose(first, trigger(x))
    assert first.min() >= 0 and first.max() <= 1
    assert trigger.noise(x[0], torch.Generator()).shape == x[0].shape


@pytest.mark.parametrize(
    ("name", "params", "words"),
    [
        ("blended", {"alpha": 1.5}, "alpha must be a number in (0, 1]"),
        ("blended", {"alpha": 0}, "alpha"),
        ("blended", {"alpha": "0.2"}, "alpha"),
        ("blended", {"alpah": 0.2}, "unknown parameter 'alpah'"),
        ("badnets", {"size": 9}, "size must be an integer in [1, 8]"),
        ("badnets", {"position": "middle"}, "position must be one of"),
        ("sig", {"frequency": -1}, "frequency"),
        ("wanet", {"k": 1}, "k must be an integer in [2, 8]"),
        ("wanet", {"s": -0.1}, "s must be"),
    ],
)
def test_bad_parameters(name, params, words):
    with pytest.raises(UserError) as info:
        build_attack(name, (3, 8, 8), **params)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_bad_names_shapes_and_inputs():
    with pytest.raises(UserError, match="choose one of"):
        build_attack("nope", (3, 8, 8))
    with pytest.raises(UserError, match="input_shape"):
        build_attack("badnets", (8, 8))
    trigger = build_attack("badnets", (3, 8, 8))
    with pytest.raises(UserError, match="shape"):
        trigger(torch.rand(2, 1, 8, 8))
    with pytest.raises(UserError, match="float"):
        trigger(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(UserError, match="trigger record"):
        trigger_from_dict({"attack": "badnets"})
