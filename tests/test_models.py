import pytest
import torch

from torchpurify.errors import UserError
from torchpurify.models import MODELS, architecture_of, build_model

IMAGE_MODELS = [n for n in MODELS.names() if MODELS.get(n).__module__.endswith(".image")]


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (3, 20, 30)])
def test_every_model_adapts_to_channels_and_size(name, shape):
    model = build_model(name, shape, 7)
    assert model(torch.rand(2, *shape)).shape == (2, 7)
    assert architecture_of(model) == {"name": name, "kwargs": {}}


def test_small_cnn_size_and_normalisation_from_arguments():
    model = build_model("small-cnn", (1, 28, 28), 10, mean=[0.3], std=[0.2])
    n = sum(p.numel() for p in model.parameters())
    assert 0.2e6 < n < 0.3e6
    assert torch.allclose(model.normalize(torch.full((1, 1, 2, 2), 0.5)), torch.ones(1, 1, 2, 2))


def make_tiny(input_shape, num_classes, hidden=4):
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(int(torch.tensor(input_shape).prod()), hidden),
        torch.nn.Linear(hidden, num_classes),
    )


def test_user_architecture_by_module_function():
    model = build_model("tests.test_models:make_tiny", (1, 4, 4), 3, hidden=5)
    assert model(torch.rand(2, 1, 4, 4)).shape == (2, 3)
    assert architecture_of(model) == {
        "name": "tests.test_models:make_tiny",
        "kwargs": {"hidden": 5},
    }


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no-such-model", "unknown model 'no-such-model'"),
        ("no_such_module_xyz:f", "cannot import"),
        ("tests.test_models:nothing", "no callable"),
        ("tests", "unknown model"),
    ],
)
def test_bad_architecture_names(name, message):
    with pytest.raises(UserError, match=message):
        build_model(name, (1, 4, 4), 3)
