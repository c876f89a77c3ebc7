"""Bring your own model and data: an architecture defined here (no BatchNorm), trained with a
backdoor through the Python API, saved as a plain ``.pt``, purified through the CLI with every
registered defense from a folder of clean PNGs (or WAVs), exported, and reloaded into a fresh
instance of the user's own class with ``load_state_dict``."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import torchpurify
from torchpurify.attacks import build_attack, poison_split
from torchpurify.data.base import Split
from torchpurify.data.byo import read_own
from torchpurify.defenses import DEFENSES
from torchpurify.errors import UserError
from torchpurify.estimate import EstimateConfig
from torchpurify.metrics import evaluate
from torchpurify.models import build_model
from torchpurify.models.io import CARD, load_model, save_model
from torchpurify.train import TrainConfig, fit

SHAPE, CLASSES, TARGET = (1, 12, 12), 4, 0
RATE = 1600  # audio: 1-s clips at 1.6 kHz keep the test fast
cli = CliRunner()

# Per-defense settings that keep one run under a second or two on this tiny data (only the keys
# a defense has are passed).
FAST = {
    "epochs": 2, "teacher_epochs": 1, "iterations": 30, "inversion_steps": 30, "rounds": 1,
    "unlearning_epochs": 2, "recovering_epochs": 2, "unlearn_epochs": 5, "fixed_point_steps": 2,
    "batch_size": 32,
}  # fmt: skip


class TinyNet(nn.Module):
    """The user's own image classifier: two convolutions, no BatchNorm."""

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 6 * 6, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyAudioNet(nn.Module):
    """The user's own keyword spotter on raw waveforms (N×T): strided 1-D convolutions."""

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 8, 16, stride=8), nn.ReLU(), nn.MaxPool1d(4),
            nn.Conv1d(8, 16, 5, stride=2), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 23, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)))


def image_net(num_classes: int) -> nn.Module:
    """What ``--arch tests.test_byo:image_net`` builds: the signature asks only for the classes."""
    return TinyNet(num_classes)


def audio_net(num_classes: int) -> nn.Module:
    return TinyAudioNet(num_classes)


def run(*args):
    return cli.invoke(app(), [str(a) for a in args])


def app():
    from torchpurify.cli import app

    return app


def images(n: int, seed: int) -> Split:
    """Class k: a bright bar in quadrant k plus noise (uint8-exact, so PNGs read back equal)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    x = rng.integers(0, 60, (n, *SHAPE)).astype(np.float32)
    for i, label in enumerate(y):
        row, col = divmod(int(label), 2)
        x[i, 0, row * 6 + 1 : row * 6 + 5, col * 6 + 1 : col * 6 + 5] += 150
    return Split(torch.from_numpy(np.round(x) / 255), torch.from_numpy(y.astype(np.int64)))


def clips(n: int, seed: int) -> Split:
    """Class k: a tone at (k + 2) × 60 Hz with a random phase, plus noise; 16-bit exact."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    t = np.arange(RATE) / RATE
    phase = rng.uniform(0, 2 * math.pi, (n, 1))
    x = 0.4 * np.sin(2 * math.pi * (y[:, None] + 2) * 60 * t + phase)
    x += 0.02 * rng.standard_normal((n, RATE))
    x = np.round(np.clip(x, -1, 1) * 32767) / 32768
    return Split(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)))


def write_folder(split: Split, root, kind: str) -> None:
    for i, (x, y) in enumerate(zip(split.x, split.y, strict=True)):
        folder = root / f"class-{int(y)}"  # names, not numbers: mapped by sorted order
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "images":
            pixels = (x[0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
        else:
            soundfile.write(folder / f"{i}.wav", x.numpy(), RATE, subtype="PCM_16")


def backdoored(make, data: Split, trigger, **recipe) -> nn.Module:
    """The user's model, trained on 20 % poisoned data through the Python API."""
    poisoned = poison_split(
        data, trigger, 0.2, target=TARGET, num_classes=CLASSES, seed=0, clean_label=False
    )
    torch.manual_seed(0)
    model = make(CLASSES)
    fit(model, poisoned.split, TrainConfig(batch_size=32, progress=False, **recipe))
    return model.eval()


def fast_settings(name: str) -> list[str]:
    fields = {f.name for f in dataclasses.fields(DEFENSES.get(name))}
    settings = []
    for key, value in FAST.items():
        if key in fields:
            settings += ["--set", f"{key}={value}"]
    return settings


@pytest.fixture(scope="module")
def image_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo-image")
    trigger = build_attack("badnets", SHAPE, size=3)
    model = backdoored(TinyNet, images(800, seed=0), trigger, epochs=6, lr=0.05)
    torch.save(model.state_dict(), root / "net.pt")
    write_folder(images(80, seed=1), root / "clean", "images")
    test = images(80, seed=2)
    write_folder(test, root / "test", "images")
    return root, model, trigger, test


@pytest.fixture(scope="module")
def audio_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo-audio")
    trigger = build_attack("noise-burst", (RATE,), sample_rate=RATE, amplitude=0.5)
    model = backdoored(
        TinyAudioNet, clips(400, seed=0), trigger, epochs=8, lr=0.01, optimizer="adam"
    )
    torch.save(model.state_dict(), root / "net.pt")
    write_folder(clips(60, seed=1), root / "clean", "audio")
    test = clips(40, seed=2)
    write_folder(test, root / "test", "audio")
    # The user's triggered test clips, each in its TRUE class folder.
    write_folder(Split(trigger(test.x), test.y), root / "triggered", "audio")
    return root, model, trigger, test


def purify_and_reload(root, arch: str, make, defense: str, example: torch.Tensor, *extra):
    out, export = root / f"out-{defense}", root / f"{defense}.safetensors"
    result = run(
        "purify", "--model", root / "net.pt", "--arch", arch, "--clean", root / "clean",
        "--test", root / "test", "--defense", defense, *fast_settings(defense), "--out", out,
        "--export", export, "--no-estimate", "--no-progress", "--json", *extra,
    )  # fmt: skip
    assert result.exit_code == 0, (defense, result.output)
    summary = json.loads(result.output.strip().splitlines()[-1])
    purified, card = load_model(out, arch)
    assert json.loads((out / CARD).read_text())["clean"] == card["clean"]
    fresh = make(CLASSES).eval()
    fresh.load_state_dict(load_file(str(export)))  # the user's own class, no torchpurify needed
    assert torch.allclose(fresh(example), purified(example), atol=1e-5), defense
    return summary, card


def test_image_model_purified_by_every_defense_and_exported(image_case):
    root, model, trigger, test = image_case
    before = evaluate(model, test, trigger, target=TARGET, num_classes=CLASSES)
    assert before.acc > 0.9 and before.asr > 0.9  # a working backdoor to remove
    example = torch.rand(5, *SHAPE)
    for defense in DEFENSES.names():
        summary, card = purify_and_reload(
            root, "tests.test_byo:image_net", TinyNet, defense, example,
            "--attack", "badnets", "--attack-set", "size=3", "--target", TARGET,
        )  # fmt: skip
        assert summary["before"]["acc"] == pytest.approx(before.acc)
        assert summary["before"]["asr"] == pytest.approx(before.asr)
        assert summary["after"]["acc"] is not None and summary["after"]["asr"] is not None
    assert card["clean"]["files"] == 80 and len(card["clean"]["sha256"]) == 64
    assert card["clean"]["classes"] == {f"class-{k}": k for k in range(CLASSES)}
    assert card["classes"] == [f"class-{k}" for k in range(CLASSES)]


def test_audio_model_purified_by_every_defense_and_exported(audio_case):
    root, model, trigger, test = audio_case
    before = evaluate(model, test, trigger, target=TARGET, num_classes=CLASSES)
    assert before.acc > 0.9 and before.asr > 0.9
    example = clips(5, seed=9).x
    for defense in DEFENSES.names():
        summary, card = purify_and_reload(
            root, "tests.test_byo:audio_net", TinyAudioNet, defense, example,
            "--sample-rate", RATE, "--triggered", root / "triggered", "--target", TARGET,
        )  # fmt: skip
        assert summary["before"]["acc"] == pytest.approx(before.acc)
        # the triggered clips went through 16-bit WAV files: the same ASR up to rounding
        assert summary["before"]["asr"] == pytest.approx(before.asr, abs=0.05)
    assert card["clean"]["kind"] == "audio" and card["clean"]["sample_rate"] == RATE


def test_python_one_liner_takes_tensors_datasets_and_loaders(image_case):
    from torch.utils.data import DataLoader, TensorDataset

    _, model, _, test = image_case
    clean = images(80, seed=1)
    results = []
    for given in (
        (clean.x, clean.y),
        TensorDataset(clean.x, clean.y),
        DataLoader(TensorDataset(clean.x, clean.y), batch_size=16),
    ):
        purified, record = torchpurify.purify(
            model, given, "ft", epochs=1, batch_size=32, estimate=False
        )
        assert isinstance(purified, nn.Module) and purified is not model
        assert record.defense == "ft" and record.tune_size == 48 and record.holdout_size == 32
        assert record.forward_passes > 0 and record.estimate is None
        results.append(purified(test.x[:8]))
    assert torch.allclose(results[0], results[1]) and torch.allclose(results[0], results[2])
    with pytest.raises(UserError, match="must be \\(x, y\\) tensors"):
        torchpurify.purify(model, "data/", "ft")


def test_defender_estimate_is_in_the_record_without_a_trigger(image_case):
    _, model, _, _ = image_case
    clean = images(80, seed=1)
    quick = EstimateConfig(steps=40, capped_steps=40)
    _, record = torchpurify.purify(
        model, (clean.x, clean.y), "fine-pruning", prune_only=True, estimate=quick
    )
    assert record.estimate is not None
    assert record.estimate["before"]["label"] in range(CLASSES)
    assert "estimated ASR" in record.estimate["summary"]


def test_seed_draws_the_split(image_case):
    _, model, _, _ = image_case
    clean = images(40, seed=1)
    params = {"defense": "fine-pruning", "prune_only": True, "estimate": False}
    _, a = torchpurify.purify(model, (clean.x, clean.y), seed=0, **params)
    _, b = torchpurify.purify(model, (clean.x, clean.y), seed=1, **params)
    _, c = torchpurify.purify(model, (clean.x, clean.y), seed=0, **params)
    assert a.log["holdout_acc_before"] == c.log["holdout_acc_before"]
    assert a.log != b.log or a.log["holdout_acc_before"] != b.log["holdout_acc_before"]


def test_class_mapping_rules(tmp_path):
    data = images(8, seed=0)
    write_folder(data, tmp_path / "named", "images")
    own = read_own(tmp_path / "named", num_outputs=CLASSES)
    assert own.mapping == {f"class-{k}": k for k in range(CLASSES)}
    assert torch.equal(own.split.x.sort(0).values, data.x.sort(0).values)
    with pytest.raises(UserError, match="4 class folders but the model outputs 10"):
        read_own(tmp_path / "named", num_outputs=10)
    # the model's own class names win, whatever their order
    names = [f"class-{k}" for k in reversed(range(CLASSES))]
    assert read_own(tmp_path / "named", model_classes=names).mapping["class-0"] == 3
    # numbered folders are their index, and a subset of classes is allowed
    (tmp_path / "numbered" / "2").mkdir(parents=True)
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "numbered" / "2" / "a.png")
    assert read_own(tmp_path / "numbered", num_outputs=10).mapping == {"2": 2}
    with pytest.raises(UserError, match="label 2 but the model outputs only 2"):
        read_own(tmp_path / "numbered", num_outputs=2)
    np.savez(tmp_path / "d.npz", x=data.x.numpy(), y=data.y.numpy())
    assert torch.equal(read_own(tmp_path / "d.npz").split.x, data.x)


def test_audio_is_resampled_to_the_models_rate(tmp_path):
    (tmp_path / "yes").mkdir()
    t = np.arange(3200) / 3200
    soundfile.write(tmp_path / "yes" / "a.wav", np.sin(2 * np.pi * 100 * t), 3200)
    own = read_own(tmp_path, sample_rate=RATE)
    assert own.split.x.shape == (1, RATE)
    assert any("resampled from 3200 Hz" in note for note in own.notes)


def test_own_speech_commands_clips_are_split_by_speaker(tmp_path):
    """A user's clips named <speaker>_nohash_<n>.wav: the defender's holdout holds speakers the
    tune set does not; other names give no groups (a random split)."""
    from torchpurify.api import split_clean

    for word in ("yes", "no"):
        for speaker in "abcdefgh":
            for n in range(3):
                path = tmp_path / "sc" / word / f"{speaker}_nohash_{n}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                soundfile.write(path, np.zeros(RATE), RATE, subtype="PCM_16")
    own = read_own(tmp_path / "sc", sample_rate=RATE)
    assert sorted(set(own.split.groups[:, 0].tolist())) == list(range(8))
    clean = split_clean(own.split, seed=1)
    assert not set(clean.tune.groups[:, 0].tolist()) & set(clean.holdout.groups[:, 0].tolist())
    (tmp_path / "sc" / "no" / "odd.wav").write_bytes(
        (tmp_path / "sc/no/a_nohash_0.wav").read_bytes()
    )
    assert read_own(tmp_path / "sc", sample_rate=RATE).split.groups is None


def test_bad_byo_input_is_one_line(image_case, tmp_path):
    root, _, _, _ = image_case
    base = ["purify", "--model", root / "net.pt", "--defense", "ft", "--out", tmp_path / "o"]
    cases = [
        ([], "give your clean data with --clean"),
        (["--clean", root / "clean"], "name its architecture with --arch"),
        (["--clean", root / "clean", "--arch", "lenet5"], "do not fit the architecture"),
        (["--arch", "tests.test_byo:image_net", "--clean", root / "clean", "--num-classes", 3],
         "4 class folders but the model outputs 3"),
        (["--arch", "tests.test_byo:image_net", "--clean", root / "nope"], "does not exist"),
        (["--arch", "tests.test_byo:image_net", "--clean", root / "clean", "--test", root / "test",
          "--attack", "badnets"], "--attack needs --target"),
        (["--arch", "tests.test_byo:image_net", "--clean", root / "clean", "--export", "x.txt"],
         "must end in .safetensors"),
    ]  # fmt: skip
    for extra, message in cases:
        result = run(*base, *extra)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert message in lines[0], lines[0]
    model = build_model("tests.test_byo:image_net", SHAPE, CLASSES)
    directory = save_model(
        model, tmp_path / "m", {"input_shape": list(SHAPE), "classes": list("abcd")}
    )
    result = run("purify", "--model", directory, "--test", root / "test", "--defense", "ft",
                 "--out", tmp_path / "o")  # fmt: skip
    assert result.exit_code == 2 and "--test go with --clean PATH" in result.output
    assert not (tmp_path / "o").exists()


def test_detect_and_inspect_take_your_own_model(image_case, tmp_path):
    root, _, _, _ = image_case
    own = ["--model", root / "net.pt", "--arch", "tests.test_byo:image_net", "--clean",
           root / "clean"]  # fmt: skip
    result = run("detect", *own, "--steps", 5, "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output.strip().splitlines()[-1])["labels"]) == CLASSES
    result = run(
        "inspect", *own, "--attack", "badnets", "--set", "size=3", "--target", TARGET,
        "--out", tmp_path / "inspect",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "inspect" / "identification.json").is_file()


def test_normalize_wraps_the_model_and_the_export_leaves_it_out(image_case, tmp_path):
    root, _, _, _ = image_case
    result = run(
        "purify", "--model", root / "net.pt", "--arch", "tests.test_byo:image_net",
        "--clean", root / "clean", "--normalize", "0.5,0.25", "--defense", "fine-pruning",
        "--set", "prune_only=true", "--out", tmp_path / "n", "--export", tmp_path / "n.pt",
        "--no-estimate", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    purified, card = load_model(tmp_path / "n", "tests.test_byo:image_net")
    assert card["normalize"] == {"mean": [0.5], "std": [0.25]}
    fresh = TinyNet().eval()
    fresh.load_state_dict(torch.load(tmp_path / "n.pt"))  # the user's class, unwrapped
    x = torch.rand(4, *SHAPE)
    assert torch.allclose(fresh((x - 0.5) / 0.25), purified(x), atol=1e-5)
    result = run(
        "detect", "--model", tmp_path / "n", "--clean", root / "clean", "--normalize", "0.5,0.5",
        "--arch", "tests.test_byo:image_net",
    )  # fmt: skip
    assert result.exit_code == 2 and "records its own normalisation" in result.output


def test_purify_seed_draws_the_defender_split_of_a_trained_model(tmp_path):
    trained = tmp_path / "digits"
    result = run("train", "--dataset", "digits", "--model", "lenet5", "--attack", "badnets",
                 "--set", "size=2", "--epochs", 1, "--no-progress", "--out", trained)  # fmt: skip
    assert result.exit_code == 0, result.output
    logs = {}
    for seed in (0, 1):
        out = tmp_path / f"p{seed}"
        result = run("purify", "--model", trained, "--defense", "fine-pruning", "--set",
                     "prune_only=true", "--seed", seed, "--defender-fraction", 0.3,
                     "--no-progress", "--out", out)  # fmt: skip
        assert result.exit_code == 0, result.output
        record = json.loads((out / CARD).read_text())["defense"]
        assert record["split_seed"] == seed and record["split_by"] == "sample"
        logs[seed] = record["log"]["holdout_acc_before"]
    assert logs[0] != logs[1]  # another holdout
