import pytest
import torch
from torch import nn

from torchpurify.errors import UserError
from torchpurify.models import build_model
from torchpurify.neurons import default_neuron_layer, layer_info, list_layers, producer_of


def test_small_cnn_layers_in_call_order():
    model = build_model("small-cnn", (1, 12, 12), 4)
    example = torch.rand(2, 1, 12, 12)
    layers = {info.name: info for info in list_layers(model, example)}
    names = list(layers)
    assert names[:4] == ["normalize", "block1", "block1.0", "block1.0.0"]
    assert names.index("block4.2") < names.index("pool") < names.index("classifier")
    relu = layers["block4.2"]
    assert (relu.type, relu.output_shape, relu.channels, relu.parameters) == (
        "ReLU",
        (128, 3, 3),
        128,
        0,
    )
    assert layers["block4.0"].parameters == 128 * 128 * 9
    assert layers["block4"].parameters == 128 * 128 * 9 + 2 * 128
    assert layers["pool"].output_shape == (128, 1, 1)
    assert layers["classifier"].output_shape == (4,) and layers["classifier"].channels == 4
    assert default_neuron_layer(model, example) == "block4.2"
    assert producer_of(model, "block4.2", example) == "block4.0"
    assert producer_of(model, "block4", example) == "block4.0"
    assert producer_of(model, "block2", example) == "block2.0.0"
    assert producer_of(model, "classifier", example) == "classifier"
    assert model.training  # the trace restored the mode


def test_lenet5_without_batchnorm():
    model = build_model("lenet5", (1, 12, 12), 4)
    example = torch.rand(2, 1, 12, 12)
    assert default_neuron_layer(model, example) == "features.5"  # the last max-pool, 16×3×3
    assert producer_of(model, "features.5", example) == "features.3"
    assert producer_of(model, "classifier.3", example) == "classifier.2"


def test_preact_resnet18_residual():
    model = build_model("preact-resnet18", (3, 8, 8), 4)
    example = torch.rand(2, 3, 8, 8)
    assert default_neuron_layer(model, example) == "relu"
    assert producer_of(model, "relu", example) == "layer4.1.conv2"
    assert layer_info(model, "layer4.1", example).channels == 512


def test_waveform_conv_net(wave_net):
    example = torch.rand(2, 64) * 2 - 1
    assert layer_info(wave_net, "5", example).output_shape == (16, 16)
    assert default_neuron_layer(wave_net, example) == "5"
    assert producer_of(wave_net, "5", example) == "3"


def test_mlp_falls_back_to_last_hidden_layer():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    assert default_neuron_layer(model, torch.rand(2, 4, 4)) == "2"


class Energy(nn.Module):
    def forward(self, x):
        return x.square().flatten(1).sum(1)


def test_bad_layers_are_user_errors():
    model = build_model("small-cnn", (1, 12, 12), 4)
    example = torch.rand(2, 1, 12, 12)
    with pytest.raises(UserError, match="block4.2"):
        producer_of(model, "block4.3", example)
    with pytest.raises(UserError, match="example must be a batch"):
        list_layers(model, torch.rand(12))
    scorer = nn.Sequential(nn.Conv2d(1, 2, 3), Energy())
    with pytest.raises(UserError, match="no channel axis"):
        layer_info(scorer, "1", example)
    with pytest.raises(UserError, match="no module with a channel axis"):
        default_neuron_layer(nn.Sequential(nn.Flatten(), nn.Linear(144, 3)), example)
    with pytest.raises(UserError, match="no Conv1d, Conv2d or Linear"):
        default_neuron_layer(nn.Sequential(nn.ReLU()), example)
