"""The command line as a user meets it: commands, outputs, and one-line errors with exit code 2."""

import json
import os
import pickle

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.cli_helpers import one_line_error
from torchpurify.cli import app
from torchpurify.data import DEBIAN_FASHION_MNIST, ENV_VAR

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def train_digits(out, model="lenet5", *extra, epochs=1):
    """Train a quick digits model with the CLI (must succeed) and return its directory."""
    result = run("train", "--dataset", "digits", "--model", model, *extra, "--epochs", epochs,
                 "--no-progress", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def fashion_available():
    return DEBIAN_FASHION_MNIST.is_dir() or bool(os.environ.get(ENV_VAR))


needs_fashion = pytest.mark.skipif(
    not fashion_available() and not os.environ.get("CI"),
    reason="Fashion-MNIST is not installed (make test installs it)",
)


@needs_fashion
def test_backdoored_model_has_high_asr_and_clean_model_low(tmp_path):
    common = [
        "--dataset",
        "fashion-mnist",
        "--model",
        "small-cnn",
        "--train-size",
        4000,
        "--epochs",
        4,
        "--no-progress",
    ]
    result = run(
        "train", *common, "--attack", "badnets", "--poison-rate", 0.1, "--out", tmp_path / "badnets"
    )
    assert result.exit_code == 0, result.output
    assert "ASR" in result.output and (tmp_path / "badnets" / "model.safetensors").is_file()
    result = run("evaluate", "--model", tmp_path / "badnets", "--json")
    backdoored = json.loads(result.output.strip().splitlines()[-1])
    assert backdoored["asr"] > 0.9 and backdoored["acc"] > 0.7

    assert run("train", *common, "--out", tmp_path / "clean").exit_code == 0
    result = run("evaluate", "--model", tmp_path / "clean", "--attack", "badnets", "--json")
    clean = json.loads(result.output.strip().splitlines()[-1])
    assert clean["asr"] < 0.2 and clean["acc"] > 0.7


def test_train_and_evaluate_on_digits_agree(tmp_path):
    out = tmp_path / "m"
    result = run(
        "train",
        "--dataset",
        "digits",
        "--model",
        "lenet5",
        "--attack",
        "blended",
        "--set",
        "alpha=0.3",
        "--epochs",
        2,
        "--no-progress",
        "--json",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    trained = json.loads(result.output.strip().splitlines()[-1])
    card = json.loads((out / "model.json").read_text())
    assert card["attack"]["trigger"]["params"]["alpha"] == 0.3
    assert card["data"] == {"dataset": "digits", "train_size": None, "val_fraction": 0.1, "seed": 0}
    evaluated = json.loads(
        run("evaluate", "--model", out, "--json").output.strip().splitlines()[-1]
    )
    assert evaluated == pytest.approx(trained)


def test_list_shows_registered_names():
    assert "small-cnn" in run("list", "models").output
    assert "wanet" in run("list", "attacks").output
    assert "fashion-mnist" in run("list", "datasets").output


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--dataset", "fashion-mnst"], ["unknown dataset 'fashion-mnst'", "fashion-mnist"]),
        (["--model", "resnet9000"], ["unknown model 'resnet9000'"]),
        (["--attack", "badnet"], ["unknown attack 'badnet'", "badnets"]),
        (["--attack", "badnets", "--poison-rate", "1.5"], ["--poison-rate", "(0, 1]"]),
        (["--attack", "badnets", "--poison-rate", "0"], ["--poison-rate"]),
        (["--attack", "badnets", "--set", "sizee=4"], ["unknown parameter 'sizee'"]),
        (["--attack", "badnets", "--target", "12"], ["--target"]),
        (["--poison-rate", "0.1"], ["need --attack"]),
        (["--epochs", "0"], ["--epochs"]),
    ],
)
def test_bad_train_input_is_one_line_and_writes_nothing(tmp_path, args, fragments):
    base = {"--dataset": "digits", "--model": "lenet5"}
    for key, value in zip(args[::2], args[1::2], strict=True):
        base[key] = value
    flat = [item for pair in base.items() for item in pair]
    one_line_error(run("train", *flat, "--no-progress", "--out", tmp_path / "m"), *fragments)
    assert not (tmp_path / "m").exists()


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_truncated_idx_file_names_the_file(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", np.zeros((n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    broken = root / "train-images-idx3-ubyte"
    broken.write_bytes(broken.read_bytes()[:1000])
    result = run(
        "train",
        "--dataset",
        "fashion-mnist",
        "--data-root",
        root,
        "--model",
        "lenet5",
        "--no-progress",
        "--out",
        tmp_path / "m",
    )
    one_line_error(result, "train-images-idx3-ubyte")
    assert not (tmp_path / "m").exists()


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED_FILE']}",))


def test_pickle_where_weights_were_expected_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PWNED_FILE", str(tmp_path / "pwned"))
    (tmp_path / "model.pt").write_bytes(pickle.dumps({"weight": Payload()}))
    result = run(
        "evaluate", "--model", tmp_path / "model.pt", "--arch", "lenet5", "--dataset", "digits"
    )
    one_line_error(result, "refusing to load")
    assert not (tmp_path / "pwned").exists()


def test_model_that_does_not_fit_the_data(tmp_path):
    train_digits(tmp_path / "m", "lenet5", epochs=1)
    card = tmp_path / "m" / "model.json"
    record = json.loads(card.read_text())
    record["data"]["dataset"] = "fashion-mnist"
    card.write_text(json.dumps(record))
    one_line_error(
        run("evaluate", "--model", tmp_path / "m", "--dataset", "fashion-mnist"),
        "(1, 8, 8)",
        "(1, 28, 28)",
    )


def test_missing_model_and_empty_split(tmp_path):
    one_line_error(run("evaluate", "--model", tmp_path / "nothing"), "does not exist")
    root = tmp_path / "images"
    (root / "train" / "a").mkdir(parents=True)
    (root / "test" / "a").mkdir(parents=True)
    result = run(
        "train",
        "--dataset",
        "image-folder",
        "--data-root",
        root,
        "--model",
        "lenet5",
        "--no-progress",
        "--out",
        tmp_path / "m",
    )
    one_line_error(result)
    assert not (tmp_path / "m").exists()


def test_purify_reports_before_after_and_der_and_saves_a_loadable_model(tmp_path):
    out = tmp_path / "m"
    train_digits(out, "small-cnn", "--attack", "badnets", epochs=3)
    result = run(
        "--threads",
        1,
        "purify",
        "--model",
        out,
        "--defense",
        "fine-pruning",
        "--set",
        "epochs=1",
        "--defender-fraction",
        0.2,
        "--no-progress",
        "--out",
        tmp_path / "p",
        "--json",
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["name"] == "fine-pruning" and 0 <= record["der"] <= 1
    assert set(record["before"]) == set(record["after"]) == {"acc", "asr", "ra"}
    card = json.loads((tmp_path / "p" / "model.json").read_text())
    assert card["defense"]["tune_size"] + card["defense"]["holdout_size"] == round(0.2 * 1294)
    assert list(card["masks"]) == ["block4.2"]
    evaluated = run("evaluate", "--model", tmp_path / "p", "--json")
    assert json.loads(evaluated.output.strip().splitlines()[-1]) == pytest.approx(record["after"])
    table = run(
        "purify",
        "--model",
        out,
        "--defense",
        "ft",
        "--set",
        "epochs=1",
        "--no-progress",
        "--out",
        tmp_path / "q",
    )
    assert "after ft" in table.output and "DER" in table.output


def test_purify_bad_input(tmp_path):
    one_line_error(
        run("purify", "--model", tmp_path, "--defense", "gnft", "--out", tmp_path / "x"),
        "model.json is missing",
    )
    (tmp_path / "w.pt").write_bytes(b"")
    one_line_error(
        run("purify", "--model", tmp_path / "w.pt", "--defense", "gnft", "--out", tmp_path / "x"),
        "is a weights file: give your clean data with --clean",
    )
    one_line_error(
        run("purify", "--model", tmp_path, "--defense", "nope", "--out", tmp_path / "x"),
        "unknown defense 'nope'",
    )
    one_line_error(
        run(
            "purify",
            "--model",
            tmp_path,
            "--defense",
            "gnft",
            "--set",
            "alpha=-1",
            "--out",
            tmp_path / "x",
        ),
        "alpha must be ≥ 0",
    )
    assert run("--threads", 0, "list", "models").exit_code == 2


def test_detect_and_inspect_write_their_outputs(tmp_path):
    out = tmp_path / "m"
    train_digits(out, "small-cnn", "--attack", "badnets", "--set", "size=2", epochs=3)
    result = run("detect", "--model", out, "--steps", 20, "--defender-fraction", 0.2, "--json")
    assert result.exit_code == 0, result.output
    detected = json.loads(result.output.strip().splitlines()[-1])
    assert len(detected["labels"]) == 10 and detected["trigger"] == "inverted"
    result = run(
        "inspect", "--model", out, "--out", tmp_path / "inspect", "--defender-fraction", 0.2
    )
    assert result.exit_code == 0, result.output
    for name in (
        "neurons.csv",
        "bias.png",
        "gradient_groups.png",
        "pruning_curve.png",
        "identification.json",
    ):
        assert (tmp_path / "inspect" / name).stat().st_size > 0, name
    assert "salience-low" in result.output and "ROC-AUC" in result.output
    clean = tmp_path / "clean"
    train_digits(clean, "lenet5", epochs=1)
    one_line_error(run("inspect", "--model", clean, "--out", tmp_path / "x"), "records no attack")


def test_divergence_is_one_line_and_a_defense_rolls_it_back(tmp_path):
    diverged = run("train", "--dataset", "digits", "--model", "lenet5", "--epochs", 1, "--lr",
                   1e30, "--no-progress", "--out", tmp_path / "d")  # fmt: skip
    assert diverged.exit_code == 3 and "diverged" in diverged.output
    assert len(diverged.output.strip().splitlines()) == 1
    out = train_digits(tmp_path / "m", epochs=3)
    result = run("purify", "--model", out, "--defense", "ft", "--set", "epochs=1", "--set",
                 "lr=1e30", "--defender-fraction", 0.5, "--no-progress",
                 "--out", tmp_path / "p")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "guard: rolled back to the input model" in result.output
    card = json.loads((tmp_path / "p" / "model.json").read_text())
    assert card["defense"]["log"]["guard"]["attempts"][1]["changed"] == {"lr": 5e29}


def test_purify_follows_the_cards_seed_unless_one_is_given(tmp_path):
    """Without --seed a model directory is purified with its training seed, as the runner's
    cells are: the same defender split and the same defense seed as the grid's."""
    out = train_digits(tmp_path / "m", "lenet5", "--attack", "badnets", "--seed", 3)
    for given, expected in (([], 3), (["--seed", 5], 5)):
        folder = tmp_path / f"p{expected}"
        result = run("purify", "--model", out, "--defense", "clp", "--no-estimate",
                     "--no-progress", "--out", folder, *given)  # fmt: skip
        assert result.exit_code == 0, result.output
        card = json.loads((folder / "model.json").read_text())
        assert card["defense"]["context"]["seed"] == expected  # the run context, apart
