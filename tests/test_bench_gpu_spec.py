"""configs/bench-gpu.yaml: BackdoorBench's CIFAR-10 PreAct-ResNet18 protocol. The spec is
validated as shipped, then run end to end, shrunk, on a tiny CIFAR-10 folder on the CPU."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml

from torchpurify import runner
from torchpurify.defenses import DEFENSES
from torchpurify.spec import cell_jobs, load_spec, model_jobs

SPEC = Path(__file__).resolve().parents[1] / "configs" / "bench-gpu.yaml"


def test_the_spec_is_backdoorbenchs_protocol_with_every_defense():
    spec = load_spec(SPEC)
    models = model_jobs(spec)
    assert {job.model for job in models} == {"preact-resnet18"}
    assert {job.attack.name for job in models} == {"badnets", "blended", "sig", "wanet"}
    assert all(job.attack.poison_rate == 0.1 and job.attack.target == 0 for job in models)
    assert {job.data_spec().dataset for job in models} == {"cifar10"}
    assert all(job.data_spec().val_fraction == 0 for job in models)
    training = models[0].train_config()
    assert (training.epochs, training.batch_size, training.lr) == (100, 128, 0.01)
    assert (training.momentum, training.weight_decay, training.schedule) == (0.9, 5e-4, "cosine")
    assert training.augment
    assert spec.defender_fraction == 0.05
    assert sorted({cell.defense.name for cell in cell_jobs(spec, models)}) == DEFENSES.names()
    assert len(cell_jobs(spec, models)) == len(models) * len(DEFENSES.names())


def write_cifar10(root: Path, per_batch: int = 40, test: int = 60) -> Path:
    """A CIFAR-10 python-version folder with ``5 × per_batch`` training images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict:
        labels = np.arange(n) % 10
        # Each class brightens its own band of rows, so a model can learn something in one epoch.
        images = rng.integers(0, 120, (n, 3, 32, 32), dtype=np.uint8)
        for k in range(10):
            images[labels == k, :, 3 * k : 3 * k + 3, :] += 120
        return {b"batch_label": b"tiny", b"data": images.reshape(n, -1), b"labels": labels.tolist()}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(test)))
    names = [n.encode() for n in "plane car bird cat deer dog frog horse ship truck".split()]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return root


def shrunk(root: Path, tmp_path: Path) -> Path:
    """The same spec with one attack, one seed, one epoch, small-cnn for PreAct-ResNet18 (every
    defense runs on PreAct-ResNet18 in their own tests), the CPU, every defense at its quick
    settings, and a defender share large enough for 200 images."""
    data = yaml.safe_load(SPEC.read_text())
    dataset = data["datasets"][0]
    dataset["root"] = str(root)
    dataset["attacks"] = dataset["attacks"][:1]
    dataset["models"] = ["small-cnn"]
    dataset["training"].update(epochs=1, batch_size=32)
    data.update(seeds=[0], device="cpu", diagnostics=False, defender_fraction=0.4)
    # The backdoor estimate every cell records inverts triggers: two steps suffice here.
    data["estimate"] = {"steps": 2, "capped_steps": 2, "families": ["mask"]}
    defenses = []
    for name in data["defenses"]:
        cls = DEFENSES.get(name)
        params = dict(cls.quick)
        if "epochs" in {f.name for f in dataclasses.fields(cls)}:
            params["epochs"] = 1
        defenses.append({"name": name, "params": {**params, "batch_size": 16}})
    data["defenses"] = defenses
    path = tmp_path / "bench-gpu-tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_spec_runs_end_to_end_on_a_tiny_cifar_folder(tmp_path):
    root = write_cifar10(tmp_path / "data")
    spec = load_spec(shrunk(root, tmp_path))
    rows = runner.run_experiment(spec, tmp_path / "results.db", tmp_path / "cache", progress=False)
    assert sorted(row["defense"] for row in rows) == DEFENSES.names()
    for row in rows:
        assert row["attack"] == "badnets" and row["model"] == "small-cnn"
        assert 0 <= row["acc_after"] <= 1 and 0 <= row["asr_after"] <= 1
