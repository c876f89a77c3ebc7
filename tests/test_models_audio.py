import math

import pytest
import torch

from torchpurify.data.base import Split
from torchpurify.errors import UserError
from torchpurify.models import architecture_of, build_model
from torchpurify.models.io import load_model, save_model
from torchpurify.neurons import default_neuron_layer, list_layers, mask_channels, masked_layers
from torchpurify.train import TrainConfig, fit

# name → (default neuron layer, its channels)
NEURONS = {
    "kws-cnn": ("block4.2", 128),
    "res8": ("blocks.2.bn2", 45),
    "ds-cnn": ("blocks.3.pointwise.2", 64),
    "lstm": ("features.1", 128),
    "m5": ("blocks.3.3", 512),
}
PRUNED = [0, 3, 44]


def waveforms(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, length, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def layer_output(model, layer: str, x: torch.Tensor):
    outputs = []
    module = model.get_submodule(layer)
    handle = module.register_forward_hook(lambda m, args, out: outputs.append(out.detach()))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    return outputs[0], logits


@pytest.mark.parametrize("name", NEURONS)
@pytest.mark.parametrize("length", [16000, 8000])
def test_output_shape_for_the_clip_length_given_at_build(name, length):
    model = build_model(name, (length,), 7)
    assert model(waveforms(3, length)).shape == (3, 7)
    assert architecture_of(model) == {"name": name, "kwargs": {}}


@pytest.mark.parametrize("name", NEURONS)
def test_other_sample_rates_frame_in_milliseconds(name):
    model = build_model(name, (8000,), 3, sample_rate=8000)
    assert model(waveforms(2, 8000)).shape == (2, 3)
    if name != "m5":
        assert (model.front_end.win_length, model.front_end.hop_length) == (200, 80)


@pytest.mark.parametrize("name", NEURONS)
def test_default_neuron_layer_and_persistent_mask(name, tmp_path):
    layer, channels = NEURONS[name]
    torch.manual_seed(0)
    model = build_model(name, (16000,), 5)
    x = waveforms(4, 16000)
    model.train()
    model(x)  # move BatchNorm running statistics away from their defaults
    model.eval()
    assert default_neuron_layer(model, x[:2]) == layer
    before, _ = layer_output(model, layer, x)
    assert before.shape[:2] == (4, channels)

    mask_channels(model, layer, PRUNED, num_channels=channels)
    after, logits = layer_output(model, layer, x)
    kept = [c for c in range(channels) if c not in PRUNED]
    assert (after[:, PRUNED] == 0).all()
    torch.testing.assert_close(after[:, kept], before[:, kept])

    card = {"input_shape": [16000], "classes": list("abcde"), "attack": None}
    path = save_model(model, tmp_path / name, card)
    loaded, _ = load_model(path)
    assert torch.equal(masked_layers(loaded)[layer], masked_layers(model)[layer])
    assert not any(k.startswith("front_end.") for k in loaded.state_dict())
    reloaded_out, reloaded_logits = layer_output(loaded, layer, x)
    assert (reloaded_out[:, PRUNED] == 0).all()
    torch.testing.assert_close(reloaded_logits, logits)


@pytest.mark.parametrize("hidden", [128, 24])
def test_lstm_neurons_are_its_hidden_units(hidden):
    model = build_model("lstm", (8000,), 4, hidden=hidden)
    x = waveforms(3, 8000)
    info = {i.name: i for i in list_layers(model, x)}["features.1"]
    assert info.output_shape == (hidden,) and info.channels == hidden
    out, _ = layer_output(model, "features.1", x)
    assert out.shape == (3, hidden)


@pytest.mark.parametrize("name", ["kws-cnn", "res8", "ds-cnn"])
def test_channels_last_preference_changes_layout_not_outputs(name):
    model = build_model(name, (8000,), 4).eval()
    x = waveforms(2, 8000)
    with torch.no_grad():
        model.channels_last = False
        plain = model(x)
        model.channels_last = True
        last = model(x)
    torch.testing.assert_close(plain, last, rtol=1e-4, atol=1e-5)


def tones(n: int, seed: int) -> Split:
    """Class 0: a 300 Hz tone, class 1: a 2 kHz tone; random phase and level, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    t = torch.arange(4000) / 16000
    freq = torch.where(y == 1, 2000.0, 300.0)[:, None]
    phase = torch.rand(n, 1, generator=g) * 2 * math.pi
    level = 0.1 + 0.4 * torch.rand(n, 1, generator=g)
    x = level * torch.sin(2 * math.pi * freq * t + phase)
    return Split(x + 0.05 * torch.randn(n, 4000, generator=g), y)


def test_kws_cnn_learns_through_fit():
    torch.manual_seed(0)
    model = build_model("kws-cnn", (4000,), 2)
    config = TrainConfig(epochs=3, batch_size=16, lr=0.05, progress=False, device="cpu")
    result = fit(model, tones(64, seed=0), config)
    losses = [record["loss"] for record in result.history]
    assert losses[-1] < 0.5 * losses[0]
    test = tones(32, seed=1)
    with torch.no_grad():
        assert (model(test.x).argmax(1) == test.y).float().mean() > 0.9


@pytest.mark.parametrize("name", NEURONS)
def test_image_shape_or_too_short_clip_is_a_user_error(name):
    with pytest.raises(UserError, match=r"input_shape must be \(T,\)"):
        build_model(name, (1, 28, 28), 10)
    with pytest.raises(UserError, match="at least"):
        build_model(name, (200,), 10)


def test_unknown_front_end_is_a_user_error():
    with pytest.raises(UserError, match="front_end must be one of log-mel, mfcc"):
        build_model("kws-cnn", (16000,), 10, front_end="spectrogram")
