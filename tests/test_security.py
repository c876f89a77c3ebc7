"""A model file never runs code: a card naming a ``module:function`` architecture is refused by
every entry point that loads a model, unless the user names that function or passes
--trust-code. Each attempt would create a marker file; the marker must never appear."""

import json
import uuid

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.cli_helpers import one_line_error
from torchpurify import runner as grid
from torchpurify.api import load_own
from torchpurify.cli import app
from torchpurify.errors import UserError
from torchpurify.models import build_model
from torchpurify.models.io import CARD, load_model, save_model
from torchpurify.spec import cell_jobs, load_spec, model_jobs

SHAPE = (1, 8, 8)  # scikit-learn's digits, bundled: no download
cli = CliRunner()


def run(*args):
    return cli.invoke(app, [str(a) for a in args])


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A model directory whose card names a function that creates ``marker`` when called, and a
    clean image folder. Returns (model dir, marker, the card's reference, clean folder)."""
    marker = tmp_path / "marker"
    module = f"evil_{uuid.uuid4().hex}"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{module}.py").write_text(
        "from pathlib import Path\n"
        "from torchpurify.models import build_model\n"
        "def build(input_shape, num_classes):\n"
        f"    Path({str(marker)!r}).touch()\n"
        "    return build_model('lenet5', input_shape, num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    folder = tmp_path / "model"
    card = {
        "input_shape": list(SHAPE),
        "classes": [str(d) for d in range(10)],
        "attack": None,
        "data": {"dataset": "digits", "train_size": None, "val_fraction": 0.1, "seed": 0},
    }
    save_model(build_model("lenet5", SHAPE, 10), folder, card)
    reference = f"{module}:build"
    edit_card(folder, architecture={"name": reference, "kwargs": {}})
    clean = tmp_path / "clean"
    for label in range(10):
        (clean / str(label)).mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(label * 10 + i).integers(0, 255, (8, 8), np.uint8)
            Image.fromarray(pixels, mode="L").save(clean / str(label) / f"{i}.png")
    return folder, marker, reference, clean


def edit_card(folder, **changes):
    card = json.loads((folder / CARD).read_text())
    card.update(changes)
    (folder / CARD).write_text(json.dumps(card))


def cli_attempts(folder, clean, out):
    return [
        ("evaluate", "--model", folder),
        ("evaluate", "--model", folder, "--dataset", "digits"),
        ("purify", "--model", folder, "--defense", "ft", "--out", out),
        ("purify", "--model", folder, "--clean", clean, "--defense", "ft", "--out", out),
        ("detect", "--model", folder, "--steps", 1),
        ("detect", "--model", folder, "--clean", clean, "--steps", 1),
        ("inspect", "--model", folder, "--out", out),
        ("inspect", "--model", folder, "--clean", clean, "--out", out),
    ]


def test_every_command_refuses_a_card_that_names_code(evil, tmp_path):
    folder, marker, reference, clean = evil
    for args in cli_attempts(folder, clean, tmp_path / "out"):
        one_line_error(run(*args), "asks to run Python code", reference, "--trust-code")
        assert not marker.exists(), args
    assert not (tmp_path / "out").exists()


def test_os_system_in_a_card_never_runs(evil, tmp_path):
    folder, _, _, clean = evil
    shell_marker = tmp_path / "shell-marker"
    edit_card(
        folder, architecture={"name": "os:system", "kwargs": {"command": f"touch {shell_marker}"}}
    )
    for args in cli_attempts(folder, clean, tmp_path / "out"):
        one_line_error(run(*args), "'os:system'")
    with pytest.raises(UserError, match="asks to run Python code"):
        load_model(folder)
    assert not shell_marker.exists()


def test_the_python_api_and_the_runner_refuse_it(evil, tmp_path):
    folder, marker, reference, clean = evil
    with pytest.raises(UserError, match="asks to run Python code"):
        load_model(folder)
    with pytest.raises(UserError, match="asks to run Python code"):
        load_own(folder, clean)
    with pytest.raises(UserError, match="records the architecture"):
        load_model(folder, "lenet5")  # naming another architecture does not unlock it
    # The runner loads the models of its cache with the architecture its spec names.
    (tmp_path / "spec.yaml").write_text(
        "datasets: [digits]\nmodels: [lenet5]\nattacks: [none]\n"
        "defenses: [{name: ft, params: {epochs: 1}}]\nseeds: [0]\ndevice: cpu\n"
    )
    spec = load_spec(tmp_path / "spec.yaml")
    job = model_jobs(spec)[0]
    with pytest.raises(UserError, match="records the architecture"):
        grid.prepare_model(grid.ModelStage(job, folder, None, {"key": job.key}), spec)
    with pytest.raises(UserError, match="records the architecture"):
        grid.run_cell(cell_jobs(spec)[0], {"path": str(folder)}, spec, "hash")
    assert not marker.exists()


def test_only_naming_the_function_or_trust_code_runs_it(evil):
    folder, marker, reference, _ = evil
    assert run("evaluate", "--model", folder, "--trust-code").exit_code == 0
    assert marker.exists()
    marker.unlink()
    assert run("evaluate", "--model", folder, "--arch", reference).exit_code == 0
    assert marker.exists()
    marker.unlink()
    load_model(folder, trust_code=True)
    assert marker.exists()


def test_card_arguments_must_fit_the_signature(evil):
    folder, marker, _, _ = evil
    cases = [
        ({"name": "lenet5", "kwargs": {"exec": "print(1)"}}, "has no argument 'exec'"),
        ({"name": "small-cnn", "kwargs": {"width": "wide"}}, "must be an integer"),
        ({"name": "small-cnn", "kwargs": {"width": 100000}}, "values"),
        ({"name": "lenet5", "kwargs": {"mean": [float("inf")]}}, "finite"),
        ({"name": "lenet5", "kwargs": [1, 2]}, "kwargs must be an object"),
    ]
    for architecture, message in cases:
        edit_card(folder, architecture=architecture)
        with pytest.raises(UserError, match=message):
            load_model(folder)
    assert not marker.exists()
