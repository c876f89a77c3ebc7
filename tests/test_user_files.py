"""A user's files cannot hurt them (issue 30): class mappings that cannot silently ruin a model,
``--target`` checked on every path, a verdict line that agrees with its own numbers, one line
(exit code 2; a ``ValueError`` in Python) for every model or option torchpurify cannot use, and
progress lines a log can show."""

from __future__ import annotations

import io
import json
import re
import shutil
import time

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from rich.console import Console
from torch import nn

import torchpurify
from tests.cli_helpers import one_line_error, run
from tests.test_byo import CLASSES, SHAPE, TinyNet, images, write_folder
from torchpurify.data.base import Split
from torchpurify.data.byo import parse_classes, read_own
from torchpurify.defenses import DEFENSES
from torchpurify.errors import UserError
from torchpurify.estimate import Estimate, compare, describe_change
from torchpurify.metrics import balanced_accuracy, class_accuracies
from torchpurify.models import build_model
from torchpurify.models.io import CARD, save_model
from torchpurify.train import LogProgress, TrainConfig, fit

ARCH = "tests.test_byo:image_net"
QUICK = ["--defense", "ft", "--set", "epochs=1", "--no-estimate", "--no-progress"]


class NoInit(nn.Module):
    """A user's class without its own ``__init__``: it holds no parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :CLASSES]


class DictOut(TinyNet):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": super().forward(x)}


def rename(root, names: dict[int, str]):
    """A copy of ``root`` with its folders class-k renamed to ``names[k]``."""
    new = root.parent / f"{root.name}-{'-'.join(names.values())}"
    if not new.exists():
        shutil.copytree(root, new)
        for k, name in names.items():
            (new / f"class-{k}").rename(new / name)
    return new


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A clean TinyNet that does its job (its classes in the order class-0 … class-3), saved as
    a bare state dict, and clean and test folders named class-0 … class-3."""
    root = tmp_path_factory.mktemp("user-files")
    torch.manual_seed(0)
    model = TinyNet()
    fit(model, images(400, seed=0), TrainConfig(epochs=4, batch_size=32, progress=False))
    torch.save(model.eval().state_dict(), root / "net.pt")
    write_folder(images(80, seed=1), root / "clean", "images")
    write_folder(images(40, seed=2), root / "test", "images")
    return root, model


def own(root, *extra):
    return ["--model", root / "net.pt", "--arch", ARCH, *extra]


# ---------------------------------------------------------------- class mappings (item 3)


def test_mixed_numbered_and_named_folders_are_refused_unless_mapped(case, tmp_path):
    root, _ = case
    mixed = rename(root / "clean", {0: "0", 1: "1", 2: "2", 3: "three"})
    result = run("purify", *own(root, "--clean", mixed), *QUICK, "--out", tmp_path / "o")
    one_line_error(result, "mixes numbered class folders", "'three'", "--classes")
    assert not (tmp_path / "o").exists()
    result = run(
        "purify", *own(root, "--clean", mixed, "--classes", "0,1,2,three"), *QUICK,
        "--out", tmp_path / "o",
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def test_a_wrong_class_order_stops_before_any_defense(case, tmp_path):
    """Folders named by word sort into another order than the model's: the model scores below
    chance on them, and purify stops (it used to "purify" the model into a broken one)."""
    root, _ = case
    words = {0: "d", 1: "c", 2: "b", 3: "a"}  # sorted: a→0, but a is the model's class 3
    clean = rename(root / "clean", words)
    test = rename(root / "test", words)
    for command in ("purify", "detect"):
        extra = [*QUICK, "--out", tmp_path / "o"] if command == "purify" else ["--steps", 2]
        result = run(command, *own(root, "--clean", clean), *extra)
        line = one_line_error(result, "near or below chance", "class order is likely wrong")
        assert "a→0" in line and "--classes" in line
    assert not (tmp_path / "o").exists()
    result = run(
        "purify", *own(root, "--clean", clean, "--test", test, "--classes", "d,c,b,a"),
        *QUICK, "--json", "--out", tmp_path / "o",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["before"]["acc"] > 0.9
    assert json.loads((tmp_path / "o" / CARD).read_text())["classes"] == list("dcba")


def test_classes_from_a_json_file(case, tmp_path):
    root, _ = case
    clean = rename(root / "clean", {0: "d", 1: "c", 2: "b", 3: "a"})
    (tmp_path / "list.json").write_text(json.dumps(list("dcba")))
    (tmp_path / "map.json").write_text(json.dumps({"a": 3, "b": 2, "c": 1, "d": 0}))
    for mapping in ("list.json", "map.json"):
        assert parse_classes(str(tmp_path / mapping)) == {"d": 0, "c": 1, "b": 2, "a": 3}
        assert read_own(clean, classes=parse_classes(str(tmp_path / mapping))).mapping["a"] == 3
    for bad, message in [
        ("a,b,a", "more than once"),
        ('{"a": 0, "b": 0}', "several names to output index"),
        ('{"a": -1}', "output index 0 or more"),
        ("[1, 2]", "must be strings"),
    ]:
        given = bad
        if bad.startswith(("{", "[")):
            (tmp_path / "bad.json").write_text(bad)
            given = str(tmp_path / "bad.json")
        with pytest.raises(UserError, match=message):
            parse_classes(given)
    with pytest.raises(UserError, match="that --classes does not name"):
        read_own(clean, classes=parse_classes("a,b,c"))


def test_clean_data_lacking_classes_is_refused_unless_allowed(case, tmp_path):
    """One class of clean data and --num-classes 4: a defense could collapse the model and a
    one-class holdout would vouch for it."""
    root, _ = case
    one = tmp_path / "one"
    shutil.copytree(root / "clean" / "class-2", one / "2")
    base = ("purify", *own(root, "--clean", one, "--num-classes", CLASSES), *QUICK)
    result = run(*base, "--out", tmp_path / "o")
    one_line_error(result, "holds 1 of the model's 4 classes", "missing 0, 1, 3")
    result = run(*base, "--allow-missing-classes", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output


def test_the_python_api_checks_the_labels_against_the_model(case):
    _, model = case
    clean = images(80, seed=1)
    shuffled = (clean.y + 1) % CLASSES  # every label off by one: a wrong class order
    with pytest.raises(UserError, match="near or below chance"):
        torchpurify.purify(model, (clean.x, shuffled), "ft", estimate=False)
    with pytest.raises(UserError, match="holds 1 of the model's 4 classes"):
        torchpurify.purify(model, (clean.x[clean.y == 1], clean.y[clean.y == 1]), "ft")
    _, record = torchpurify.purify(
        model, (clean.x[clean.y == 1], clean.y[clean.y == 1]), "ft", epochs=1, estimate=False,
        allow_missing_classes=True,
    )  # fmt: skip
    assert record.defense == "ft"


def test_class_accuracies_show_what_one_overall_accuracy_hides():
    class Always(nn.Module):  # a collapsed model: always class 0
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([1.0, 0.0]))

        def forward(self, x):
            return self.bias.expand(len(x), 2)

    data = Split(torch.zeros(10, 3), torch.tensor([0] * 9 + [1]))
    assert class_accuracies(Always(), data) == {0: 1.0, 1: 0.0}
    assert balanced_accuracy(Always(), data) == 0.5


# ---------------------------------------------------------------- --target (item 4)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--triggered", "TEST", "--target", 10], "--target must be one of the model's labels"),
        (["--triggered", "TEST", "--target", -3], "--target must be one of the model's labels"),
        (["--triggered", "TEST"], "--triggered needs --target"),
        (["--attack", "badnets", "--target", 0], "--attack is measured on --test data"),
        (["--test", "TEST", "--attack", "badnets", "--target", 4], "0..3, got 4"),
        (["--test", "TEST", "--target", 1], "--target needs --attack NAME or --triggered"),
    ],
)
def test_target_is_checked_on_every_path(case, tmp_path, extra, message):
    root, _ = case
    extra = [root / "test" if value == "TEST" else value for value in extra]
    result = run("purify", *own(root, "--clean", root / "clean"), *QUICK, *extra,
                 "--out", tmp_path / "o")  # fmt: skip
    one_line_error(result, message)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the verdict line (item 5)


def estimate(est_asr: float, index: float, size: float = 5.0) -> Estimate:
    return Estimate(
        label=0, flagged=est_asr >= 0.5, nc_target=None, anomaly_index=index, trigger_size=size,
        reference_size=60.0, success=1.0, est_asr=est_asr, budget=4.8, seconds=1.0,
        mask_norms=[size, 60.0, 60.0],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("before", "after", "verdict", "removed"),
    [
        # the case: estimated ASR fell below 0.5 but the anomaly index is 2.12 > 2
        ((0.98, 3.1), (0.477, 2.12), "unclear: the estimated ASR is below 0.5", False),
        ((0.98, 3.1), (0.20, 1.10), "the backdoor is likely removed", True),
        ((0.98, 3.1), (0.90, 1.10), "the backdoor is likely still there", False),
        ((0.20, 1.0), (0.10, 0.9), "no backdoor was suspected before or after", False),
        ((0.20, 2.5), (0.10, 0.9), "no longer one", False),
        ((0.20, 1.0), (0.70, 1.0), "suspected after purification, not before", False),
    ],
)
def test_the_verdict_follows_the_numbers_it_prints(before, after, verdict, removed):
    first, then = estimate(*before), estimate(*after, size=20.0)
    line = describe_change(first, then)
    assert line.endswith(verdict) or verdict in line.split(": ", 1)[1], line
    assert compare(first, then)["removed"] is removed
    index_after = float(re.search(r"anomaly index [\d.]+ → ([\d.]+)", line)[1])
    est_after = float(re.search(r"estimated ASR [\d.]+ → ([\d.]+)", line)[1])
    if "removed" in line:  # the rule of methods.md §12.2, read back from the line itself
        assert est_after < 0.5 and index_after <= 2


# ---------------------------------------------------------------- one line, not a traceback (6)


def test_a_model_class_without_its_own_init_is_one_line(case, tmp_path):
    root, _ = case
    torch.save({}, tmp_path / "empty.pt")  # all the weights such a class has
    result = run("purify", "--model", tmp_path / "empty.pt", "--arch",
                 "tests.test_user_files:NoInit", "--clean", root / "clean", *QUICK,
                 "--out", tmp_path / "o")  # fmt: skip
    one_line_error(result, "has no parameters")


@pytest.mark.parametrize("defense", DEFENSES.names())
def test_a_model_without_parameters_is_refused_by_every_defense(defense):
    clean = images(40, seed=1)
    with pytest.raises(UserError, match="has no parameters"):
        torchpurify.purify(NoInit(), (clean.x, clean.y), defense, estimate=False)


def test_the_python_api_raises_value_errors_with_one_line(case):
    _, model = case
    clean = images(40, seed=1)
    data = (clean.x, clean.y)
    cases = [
        (lambda: TinyNet().to("meta"), data, {}, "meta device"),
        (lambda: model, (clean.x, clean.y + CLASSES), {}, "labels 4..7 but the model outputs 4"),
        (lambda: model, (clean.x[:, :, :8, :8], clean.y), {}, "cannot run on inputs of shape"),
        (DictOut, data, {}, "must return logits of shape N×classes, got a dict"),
        (lambda: model, data, {"seed": -1}, "seed must be an integer"),
        (lambda: model, (clean.x * float("nan"), clean.y), {}, "NaN or infinity"),
    ]
    for make, given, options, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            torchpurify.purify(make(), given, "ft", estimate=False, **options)
        assert isinstance(error.value, UserError) and "\n" not in str(error.value)


# ---------------------------------------------------------------- messages (item 7)


def test_normalize_is_checked_before_any_work(case, tmp_path):
    root, _ = case
    base = ["purify", *own(root, "--clean", root / "clean"), *QUICK, "--out", tmp_path / "o"]
    for value, message in [
        ("0.5,1e-300", "every std must lie in"),
        ("nan,nan", "'nan,nan'"),  # not swallowed as markup, not "got "
        ("0.5,0.5,0.5,0.5,0.5,0.5", "gives 3 means and stds but the inputs have 1 channel"),
    ]:
        started = time.perf_counter()
        line = one_line_error(run(*base, "--normalize", value), message)
        assert "1 or 1" not in line and time.perf_counter() - started < 30
    assert not (tmp_path / "o").exists()


def test_num_classes_zero_is_one_line(case, tmp_path):
    root, _ = case
    result = run("purify", *own(root, "--clean", root / "clean", "--num-classes", 0), *QUICK,
                 "--out", tmp_path / "o")  # fmt: skip
    line = one_line_error(result, "--num-classes must be 2 to")
    assert "0..0" not in line and "0..-1" not in line


def test_a_model_directory_without_its_data_asks_for_clean(tmp_path):
    model = build_model(ARCH, SHAPE, CLASSES)
    directory = save_model(
        model, tmp_path / "m", {"input_shape": list(SHAPE), "classes": list("abcd")}
    )
    result = run("purify", "--model", directory, "--arch", ARCH, *QUICK, "--out", tmp_path / "o")
    line = one_line_error(result, "--clean PATH")
    assert "--dataset" not in line


def test_terminal_escapes_in_a_name_are_shown_escaped(case, tmp_path):
    root, _ = case
    clean = tmp_path / "clean"
    for k in range(CLASSES):
        (clean / f"c{k}").mkdir(parents=True)
        Image.fromarray(np.zeros((12, 12), np.uint8)).save(clean / f"c{k}" / "0.png")
    (clean / "c1" / "bad\x1b[2J\x1b[31m.png").write_bytes(b"not a png")
    result = run("purify", *own(root, "--clean", clean), *QUICK, "--out", tmp_path / "o")
    line = one_line_error(result, "cannot read image", "\\x1b[2J")
    assert "\x1b" not in result.output and "\x1b" not in line
    assert "\x1b" not in str(UserError("a \x1b[31m red \x9b name"))


def test_nan_is_refused_in_a_wav_as_in_an_npz(tmp_path):
    (tmp_path / "wav" / "yes").mkdir(parents=True)
    soundfile.write(tmp_path / "wav" / "yes" / "a.wav", np.array([0.0, np.nan, 0.1]), 16000,
                    subtype="FLOAT")  # fmt: skip
    np.savez(tmp_path / "d.npz", x=np.array([[0.0, np.nan]], np.float32), y=np.array([0]))
    for path in (tmp_path / "wav", tmp_path / "d.npz"):
        with pytest.raises(UserError, match="NaN or infinity"):
            read_own(path)


def test_a_second_run_into_the_same_out_does_not_replace_the_first(case, tmp_path, monkeypatch):
    """Two runs start with --out free; the first finishes while the second works. The second
    is refused in one line and the first's model is left as it was."""
    import torchpurify.api as api

    root, _ = case
    out = tmp_path / "o"
    first = run("purify", *own(root, "--clean", root / "clean"), *QUICK, "--out", out)
    assert first.exit_code == 0, first.output
    written = (out / CARD).read_text()
    (tmp_path / "o").rename(tmp_path / "first")
    real = api.run_defense

    def meanwhile(*args, **kwargs):  # the first run saves while the second defends
        (tmp_path / "first").rename(out)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "run_defense", meanwhile)
    second = run("purify", *own(root, "--clean", root / "clean"), *QUICK, "--seed", 1,
                 "--out", out)  # fmt: skip
    one_line_error(second, str(out))
    assert (out / CARD).read_text() == written


def test_an_arch_module_that_exits_at_import_is_one_line(case, tmp_path, monkeypatch):
    root, _ = case
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.chdir(tmp_path)
    result = run("purify", "--model", root / "net.pt", "--arch", "quits:Net", "--clean",
                 root / "clean", *QUICK, "--out", tmp_path / "o")  # fmt: skip
    one_line_error(result, "called sys.exit(0)")


# ---------------------------------------------------------------- progress in a log (item 8)


def test_progress_in_a_log_is_plain_timestamped_lines(monkeypatch):
    import torchpurify.train as train

    log = io.StringIO()
    monkeypatch.setattr(train, "LOG_EVERY", 0.0)
    bar = LogProgress(Console(file=log, force_terminal=False))
    with bar:
        task = bar.add_task("ft 1/2", total=30, loss=0.0)
        for done in range(1, 31):
            bar.update(task, completed=done, loss=0.5)
    lines = log.getvalue().splitlines()
    assert len(lines) == 30 and "\x1b" not in log.getvalue()
    assert re.fullmatch(r"\d\d:\d\d:\d\d ft 1/2: 30/30, loss 0\.500, \d+ s", lines[-1])
    monkeypatch.setattr(train, "LOG_EVERY", 3600.0)
    quiet = io.StringIO()
    bar = LogProgress(Console(file=quiet, force_terminal=False))
    for _ in range(100):
        bar.advance(bar.add_task("x", total=100))
    assert quiet.getvalue().count("\n") <= 1  # at most one line per LOG_EVERY seconds


def test_training_and_reading_show_progress_lines_when_stderr_is_a_log(case, monkeypatch):
    import torchpurify.train as train

    root, _ = case
    log = io.StringIO()
    monkeypatch.setattr(train, "console", Console(file=log, force_terminal=False))
    monkeypatch.setattr(train, "LOG_EVERY", 0.0)
    read_own(root / "clean", progress=True)
    assert re.search(r"^\d\d:\d\d:\d\d reading clean: \d+/80, \d+ s$", log.getvalue(), re.M)
    fit(TinyNet(), images(64, seed=3), TrainConfig(epochs=1, batch_size=32, progress=True))
    assert re.search(r"^\d\d:\d\d:\d\d .*1/1: \d/2, loss", log.getvalue(), re.M), log.getvalue()
