import json
import os
import pickle

import pytest
import torch

from torchpurify.errors import UserError
from torchpurify.models import build_model
from torchpurify.models.io import CARD, WEIGHTS, load_model, save_model

SHAPE = (1, 8, 8)


def card(**extra):
    return {"input_shape": list(SHAPE), "classes": ["a", "b", "c"], "attack": None, **extra}


def test_round_trip_keeps_weights_buffers_and_card(tmp_path):
    torch.manual_seed(0)
    model = build_model("small-cnn", SHAPE, 3, mean=[0.2], std=[0.3])
    model.train()
    model(torch.rand(4, *SHAPE))  # move BatchNorm running statistics away from their defaults
    model.eval()
    path = save_model(model, tmp_path / "m", card(note="x"))
    assert sorted(p.name for p in path.iterdir()) == [CARD, WEIGHTS]
    loaded, loaded_card = load_model(path)
    x = torch.rand(3, *SHAPE)
    assert torch.equal(model(x), loaded(x))
    assert loaded_card["note"] == "x"
    assert loaded_card["architecture"] == {
        "name": "small-cnn",
        "kwargs": {"mean": [0.2], "std": [0.3]},
    }
    assert "torch" in loaded_card["versions"]


def test_save_replaces_existing_artifact_and_leaves_no_temporaries(tmp_path):
    model = build_model("lenet5", SHAPE, 3)
    save_model(model, tmp_path / "m", card(version=1))
    save_model(model, tmp_path / "m", card(version=2))
    assert json.loads((tmp_path / "m" / CARD).read_text())["version"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = build_model("lenet5", SHAPE, 3)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("torchpurify.models.io.save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tmp_path / "m", card())
    assert list(tmp_path.iterdir()) == []


def test_plain_state_dict_loads_through_weights_only(tmp_path):
    model = build_model("lenet5", SHAPE, 3)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded, loaded_card = load_model(
        tmp_path / "w.pt", architecture="lenet5", input_shape=SHAPE, num_classes=3
    )
    x = torch.rand(2, *SHAPE)
    assert torch.equal(model.eval()(x), loaded(x))
    assert loaded_card["architecture"]["name"] == "lenet5"


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED_FILE']}",))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_FILE", str(marker))
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(UserError, match="not a plain state dict"):
        load_model(tmp_path / "evil.pt", architecture="lenet5", input_shape=SHAPE, num_classes=3)
    assert not marker.exists()


def test_whole_pickled_module_is_refused(tmp_path):
    torch.save(build_model("lenet5", SHAPE, 3), tmp_path / "full.pth")
    with pytest.raises(UserError, match="refusing to load"):
        load_model(tmp_path / "full.pth", architecture="lenet5", input_shape=SHAPE, num_classes=3)


def test_wrong_class_count_names_the_mismatch(tmp_path):
    save_model(build_model("lenet5", SHAPE, 3), tmp_path / "m", card())
    torch.save(build_model("lenet5", SHAPE, 5).state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match="class count"):
        load_model(tmp_path / "w.pt", architecture="lenet5", input_shape=SHAPE, num_classes=3)


def test_nan_weights_are_refused(tmp_path):
    model = build_model("lenet5", SHAPE, 3)
    with torch.no_grad():
        model.classifier[0].weight[0, 0] = float("nan")
    save_model(model, tmp_path / "m", card())
    with pytest.raises(UserError, match="NaN"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "does not exist"),
        (lambda d: (d / "m").mkdir(), "model.json is missing"),
        (lambda d: ((d / "m").mkdir(), (d / "m" / CARD).write_text("{oops")), "not valid JSON"),
    ],
)
def test_missing_or_corrupt_artifacts(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(UserError, match=message):
        load_model(tmp_path / "m")


def test_corrupt_safetensors_is_a_user_error(tmp_path):
    path = save_model(build_model("lenet5", SHAPE, 3), tmp_path / "m", card())
    weights = path / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_model(path)


def test_bare_weights_need_an_architecture(tmp_path):
    torch.save(build_model("lenet5", SHAPE, 3).state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match="bare weights file"):
        load_model(tmp_path / "w.pt")


def test_masks_survive_save_and_load(tmp_path):
    from torchpurify.neurons import mask_channels, masked_layers

    model = build_model("small-cnn", SHAPE, 3).eval()
    mask_channels(model, "block4.2", [1, 5])
    path = save_model(model, tmp_path / "m", card())
    assert json.loads((path / CARD).read_text())["masks"] == {"block4.2": 128}
    loaded, _ = load_model(path)
    assert masked_layers(loaded)["block4.2"][[1, 5]].tolist() == [0.0, 0.0]
    features = {}
    loaded.block4.register_forward_hook(lambda m, i, o: features.update(out=o))
    x = torch.rand(4, *SHAPE)
    assert torch.equal(loaded(x), model(x))
    assert features["out"][:, [1, 5]].abs().sum() == 0
