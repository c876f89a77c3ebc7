"""Issue 12: nothing lost, nothing confusing. Outputs never replace what torchpurify did not
write, hostile specs are refused cheaply, bad numbers and near misses are one line."""

import json
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.cli_helpers import one_line_error, run
from torchpurify import outputs
from torchpurify.cli import app, parse_settings
from torchpurify.errors import UserError
from torchpurify.outputs import artifact_kind, check_output, staged_output, sweep_staging
from torchpurify.spec import MAX_MESSAGE, load_spec, read_value

TRAIN = ("train", "--dataset", "digits", "--model", "lenet5", "--epochs", 1, "--no-progress")


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A clean lenet5 on digits, trained once for this module (a few seconds)."""
    out = tmp_path_factory.mktemp("model") / "m"
    result = run(*TRAIN, "--out", out)
    assert result.exit_code == 0, result.output
    return out


# ----------------------------------------------------------------------------- 1, 3: outputs


def test_train_refuses_a_folder_with_other_files_and_leaves_them(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "f").write_text("x")
    one_line_error(run(*TRAIN, "--out", folder), "other files (f)")
    one_line_error(run(*TRAIN, "--out", folder, "--force"), "other files (f)")  # never forced
    assert (folder / "f").read_text() == "x" and sorted(os.listdir(folder)) == ["f"]


def test_train_refuses_an_existing_file_and_the_current_folder(tmp_path, monkeypatch):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    one_line_error(run(*TRAIN, "--out", file), "is a file")
    assert file.read_text() == "keep me"
    monkeypatch.chdir(tmp_path)
    one_line_error(run(*TRAIN, "--out", "."), "is the current folder")
    one_line_error(run(*TRAIN, "--out", ".."), "is the current folder or above it")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # no ..old.* or staging folder left


def test_an_artifact_is_replaced_only_with_force(digits_model, tmp_path):
    out = tmp_path / "again"
    (out).mkdir()  # an empty folder is a fine place
    assert run(*TRAIN, "--out", out).exit_code == 0
    first = (out / "model.json").read_text()
    one_line_error(run(*TRAIN, "--out", out), "already holds a torchpurify model", "--force")
    assert (out / "model.json").read_text() == first
    result = run(*TRAIN, "--seed", 1, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "model.json").read_text())["data"]["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == ["again"]  # staging and old folders are gone


def test_an_unwritable_place_is_refused_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(run(*TRAIN, "--out", blocker / "sub" / "m"), "is a file; no folder")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkdtemp", refuse)  # chmod cannot stop root
    started = time.perf_counter()
    line = one_line_error(run(*TRAIN, "--out", tmp_path / "m"), "cannot write in", "Permission")
    assert time.perf_counter() - started < 5, "refused before training"
    assert str(tmp_path) in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_a_read_only_folder_is_refused_for_real(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        one_line_error(run(*TRAIN, "--out", locked / "m"), "cannot write in")
    finally:
        locked.chmod(0o700)


def test_staged_output_keeps_what_was_there_when_the_work_fails(tmp_path):
    target = tmp_path / "report"
    with staged_output(target, "report") as folder:
        (folder / "report.md").write_text("first")
    assert artifact_kind(target) == "report"
    with pytest.raises(RuntimeError), staged_output(target, "report") as folder:
        (folder / "report.md").write_text("half")
        raise RuntimeError("killed")
    assert (target / "report.md").read_text() == "first"
    assert sorted(os.listdir(tmp_path)) == ["report"]
    with pytest.raises(UserError, match="already holds a torchpurify report"):
        check_output(target, "report")
    assert check_output(target, "report", force=True) == target


def test_stale_staging_folders_are_swept_except_live_ones(tmp_path):
    key_a, key_b = "a" * 64, "b" * 64
    for name in (f".{key_a}.x1y2z3w4", f".{key_b}.old.q1w2e3r4", f".{key_b}.abcdefgh"):
        (tmp_path / name).mkdir()
    (tmp_path / key_a).mkdir()  # a model folder: never swept
    (tmp_path / ".hidden").mkdir()  # not a staging name: never swept
    removed = sweep_staging(tmp_path, keep={key_b})
    assert [p.name for p in removed] == [f".{key_a}.x1y2z3w4"]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [key_a, ".hidden", f".{key_b}.old.q1w2e3r4", f".{key_b}.abcdefgh"]
    )


def test_report_and_inspect_refuse_foreign_folders(digits_model, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("x")
    one_line_error(run("report", tmp_path / "none.db", "--out", folder), "other files")
    one_line_error(run("inspect", "--model", digits_model, "--out", folder), "other files")
    assert os.listdir(folder) == ["thesis.tex"]


# ----------------------------------------------------------------------------- 2: hostile YAML


def alias_bomb(levels=9):
    """Billion laughs: each level is a list of nine aliases of the one before (9**9 leaves)."""
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    lines.append(f"datasets: *a{levels}")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_in_under_a_second_and_200_mb(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert path.stat().st_size < 600
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(UserError) as error:
        load_spec(path)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "aliases expand to more than" in str(error.value)
    assert seconds < 1.0 and peak < 200e6, (seconds, peak)


def test_shared_structure_under_the_bound_still_reports_briefly(tmp_path):
    # 6 levels of 6 aliases: 46,656 leaves, allowed, and wrong where it sits; the message
    # must not print the whole expansion.
    lines = ['a0: &a0 ["x"]']
    for i in range(1, 7):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 6) + "]")
    (tmp_path / "s.yaml").write_text("\n".join(lines) + "\ndatasets: {name: *a6}\n")
    with pytest.raises(UserError) as error:
        load_spec(tmp_path / "s.yaml")
    assert len(str(error.value)) <= MAX_MESSAGE


def test_self_referencing_and_deep_yaml_are_one_line(tmp_path):
    (tmp_path / "loop.yaml").write_text("datasets: &x [*x]\n")
    with pytest.raises(UserError, match="refers to the node that contains it"):
        load_spec(tmp_path / "loop.yaml")
    (tmp_path / "deep.yaml").write_text("datasets: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(UserError, match="nested too deeply|not valid YAML"):
        load_spec(tmp_path / "deep.yaml")


# ----------------------------------------------------------------------------- 6, 7: numbers


@pytest.mark.parametrize("seed", [-1, 2**64, 2**32])
def test_out_of_range_seeds_are_one_line(tmp_path, seed):
    one_line_error(run(*TRAIN, "--seed", seed, "--out", tmp_path / "m"), "'--seed'")
    assert not (tmp_path / "m").exists()


def test_set_values_are_read_like_yaml_1_2():
    assert read_value("1e-3") == 0.001 and read_value("1E3") == 1000.0
    assert read_value("-2.5e-2") == -0.025 and read_value("3") == 3
    assert read_value(".inf") == float("inf") and read_value("true") is True
    assert read_value("top-left") == "top-left" and read_value("a: [") == "a: ["
    assert parse_settings(["lr=1e-3", "mode=fast"]) == {"lr": 0.001, "mode": "fast"}


def test_spec_numbers_in_exponent_form_are_numbers(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "datasets: [digits]\nmodels: [lenet5]\nattacks: [none]\n"
        "defenses: [{name: ft, params: {lr: 1e-3}}]\ntraining: {lr: 5e-2}\n"
    )
    loaded = load_spec(spec)
    assert loaded.defenses[0].params["lr"] == 0.001 and loaded.training["lr"] == 0.05


# ----------------------------------------------------------------------------- 8: evaluate


def test_evaluate_refuses_batch_size_zero_and_a_target_outside_the_classes(digits_model):
    one_line_error(run("evaluate", "--model", digits_model, "--batch-size", 0), "--batch-size")
    one_line_error(
        run("evaluate", "--model", digits_model, "--attack", "badnets", "--target", 10),
        "--target must be a label of digits, 0..9; got 10",
    )
    result = run("evaluate", "--model", digits_model, "--attack", "badnets", "--target", 9)
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- 9: messages


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--epochs", "x"], ["Invalid value for '--epochs'"]),
        (["--target-mode", "all-to-on"], ["(did you mean all-to-one?)"]),
        (["--datset", "digits"], ["No such option: --datset"]),
    ],
)
def test_click_errors_are_one_line(tmp_path, args, fragments):
    one_line_error(run(*TRAIN, *args, "--out", tmp_path / "m"), *fragments)


def test_near_misses_are_named_on_the_command_line(tmp_path):
    one_line_error(run("trian"), "Did you mean 'train'?")
    one_line_error(run("list", "defense"), "(did you mean defenses?)")
    one_line_error(run("train", "--dataset", "digts", "--model", "lenet5", "--out", tmp_path / "m"),
                   "unknown dataset 'digts' (did you mean digits?)")  # fmt: skip
    one_line_error(
        run(*TRAIN, "--attack", "badnet", "--out", tmp_path / "m"), "(did you mean badnets?)"
    )


def test_help_and_no_arguments_still_show_help():
    assert run("--help").exit_code == 0 and "train" in run("--help").output
    result = CliRunner().invoke(app, [])
    assert "Usage" in result.output and "train" in result.output


def test_an_existing_file_as_data_root_is_named_a_file(tmp_path):
    file = tmp_path / "fashion.gz"
    file.write_bytes(b"")
    line = one_line_error(
        run(
            "train",
            "--dataset",
            "fashion-mnist",
            "--model",
            "lenet5",
            "--data-root",
            file,
            "--out",
            tmp_path / "m",
        ),  # fmt: skip
        "is a file, not a folder",
    )
    assert "does not exist" not in line


def test_val_fraction_zero_is_allowed_as_its_message_says():
    from torchpurify.data.splits import train_val_split

    train, val = train_val_split(10, 0.0)
    assert train.tolist() == list(range(10)) and len(val) == 0
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        train_val_split(10, 1.0)


def test_a_single_class_dataset_is_told_so(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        folder = tmp_path / "one-class" / split / "cat"
        folder.mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.full((8, 8, 3), i * 20, dtype=np.uint8)).save(folder / f"{i}.png")
    result = run("train", "--dataset", "image-folder", "--data-root", tmp_path / "one-class",
                 "--model", "small-cnn", "--attack", "badnets", "--no-progress",
                 "--out", tmp_path / "m")  # fmt: skip
    line = one_line_error(result, "at least two classes")
    assert "poison-rate" not in line


def test_detect_shows_progress_by_default(monkeypatch, tiny_backdoor):
    from torchpurify import diagnostics

    seen = {}

    def fake_invert(*args, **kwargs):
        seen.update(kwargs)
        raise UserError("stop here")

    monkeypatch.setattr(diagnostics, "invert_triggers", fake_invert)
    with pytest.raises(UserError):
        diagnostics.detect(tiny_backdoor.model, tiny_backdoor.holdout, steps=1, progress=True)
    assert seen["progress"] is True


# ----------------------------------------------------------------------------- 17


def test_roc_auc_agrees_with_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    from torchpurify.diagnostics import roc_auc

    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = rng.integers(0, 4, 40).astype(float)
        labels = rng.random(40) < 0.3
        labels[:2] = [True, False]
        assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_vectorised_augmentation_equals_the_per_image_crop_and_flip():
    from torchpurify.train import augment_batch

    x = torch.randn(7, 3, 8, 10)
    generator = torch.Generator().manual_seed(3)
    fast = augment_batch(x, generator)
    generator = torch.Generator().manual_seed(3)  # the same draws, done one image at a time
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    shifts = torch.randint(0, 9, (7, 2), generator=generator).tolist()
    flips = (torch.rand(7, generator=generator) < 0.5).tolist()
    for i, ((dy, dx), flip) in enumerate(zip(shifts, flips, strict=True)):
        crop = padded[i, :, dy : dy + 8, dx : dx + 10]
        assert torch.equal(fast[i], crop.flip(-1) if flip else crop)
    assert fast.shape == x.shape and any(flips) and not all(flips)


def test_paths_in_messages_are_the_users_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("d").mkdir()
    Path("d/f").write_text("x")
    one_line_error(run(*TRAIN, "--out", "d"), "--out d is a folder with other files")
