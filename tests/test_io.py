import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

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


def write_card(tmp_path, **changes):
    """A saved lenet5 whose card is then edited (None deletes a field)."""
    path = save_model(build_model("lenet5", SHAPE, 3), tmp_path / "m", card())
    record = json.loads((path / CARD).read_text())
    for key, value in changes.items():
        if value is None and key != "classes":
            record.pop(key, None)
        else:
            record[key] = value
    (path / CARD).write_text(json.dumps(record))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architecture": None}, "architecture is missing"),
        ({"architecture": "lenet5"}, "architecture must be an object"),
        ({"architecture": {"kwargs": {}}}, "architecture.name must be"),
        ({"classes": None}, "classes must be a list"),
        ({"classes": ["a", 1]}, "classes must be a list"),
        ({"format_version": "1"}, "format_version must be 1"),
        ({"format_version": 99}, "newer torchpurify"),
        ({"architecture": {"name": "lenet5", "kwargs": [1]}}, "kwargs must be an object"),
        ({"input_shape": [1, -8, 8]}, "input_shape must be a list of 1 to 4 positive"),
        ({"input_shape": "1x8x8"}, "input_shape must be a list"),
        ({"masks": {"features.0": -1}}, "masks.features.0 must be a channel count"),
        ({"attack": {"target": 7}}, "attack.trigger must be"),
        ({"data": {"dataset": "digits", "seed": "x"}}, "data.seed has the wrong type"),
    ],
)
def test_card_fields_are_type_checked(tmp_path, changes, message):
    path = write_card(tmp_path, **changes)
    with pytest.raises(UserError, match=message) as error:
        load_model(path)
    assert str(path / CARD) in str(error.value)  # the message names the file


def test_huge_architecture_arguments_are_refused_before_allocating(tmp_path):
    import time

    path = write_card(tmp_path, architecture={"name": "small-cnn", "kwargs": {"width": 100000}})
    started = time.perf_counter()
    with pytest.raises(UserError, match="would hold"):
        load_model(path)
    assert time.perf_counter() - started < 5  # 2.3e12 values were never allocated
    with pytest.raises(UserError, match="would hold"):
        build_model("kws-cnn", (16000,), 10, width=100000)  # audio front ends too


def test_build_model_checks_arguments_against_the_signature(tmp_path):
    with pytest.raises(UserError, match="has no argument 'depth'"):
        build_model("small-cnn", SHAPE, 3, depth=3)
    with pytest.raises(UserError, match="must be an integer"):
        build_model("small-cnn", SHAPE, 3, width=2.5)
    path = write_card(tmp_path, architecture={"name": "lenet5", "kwargs": {"num_classes": 4}})
    with pytest.raises(UserError, match="comes from the data"):
        load_model(path)
    torch.manual_seed(0)
    a = build_model("small-cnn", SHAPE, 3, width=8)
    torch.manual_seed(0)
    b = build_model("small-cnn", SHAPE, 3, width=8)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_negative_input_shape_is_refused_by_evaluate_and_purify(tmp_path):
    from typer.testing import CliRunner

    from torchpurify.cli import app

    path = write_card(
        tmp_path,
        input_shape=[1, -8, 8],
        data={"dataset": "digits", "train_size": None, "val_fraction": 0.1, "seed": 0},
    )
    for args in (
        ["evaluate", "--model", path],
        ["purify", "--model", path, "--defense", "ft", "--out", tmp_path / "out"],
        ["detect", "--model", path],
    ):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        assert "input_shape must be a list of 1 to 4 positive integers" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_export_folds_masks_into_a_plain_state_dict(tmp_path):
    from torchpurify.models.io import export_weights
    from torchpurify.neurons import mask_channels

    model = build_model("small-cnn", SHAPE, 3).eval()
    mask_channels(model, "block4.2", [0, 3])
    x = torch.rand(4, *SHAPE)
    for name in ("w.pt", "w.safetensors"):
        path = export_weights(model, tmp_path / name)
        fresh = build_model("small-cnn", SHAPE, 3).eval()
        state = torch.load(path) if name.endswith(".pt") else load_file(str(path))
        assert not any(key.endswith("neuron_mask") for key in state)
        fresh.load_state_dict(state)
        assert torch.allclose(fresh(x), model(x), atol=1e-6)
