"""Shared fixtures.

``tiny_backdoor`` is a backdoored small-cnn on a synthetic 6-class task, trained once per test
session in a few seconds on CPU, for any test that needs a real backdoor (neuron tools,
defenses). Tests must ``copy.deepcopy(tiny_backdoor.model)`` before changing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from torchpurify.attacks import Trigger, build_attack, poison_split
from torchpurify.data.base import Split
from torchpurify.data.splits import defender_split, split_guard
from torchpurify.metrics import evaluate
from torchpurify.models import build_model
from torchpurify.train import TrainConfig, fit

TINY_SHAPE = (1, 12, 12)
TINY_CLASSES = 6


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests use tiny models, where one thread is as fast as many; on a shared machine, several
    threads per process spin-wait on each other and run up to 100× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gratings(n: int, seed: int, size: int = TINY_SHAPE[1]) -> Split:
    """Class k: a sinusoidal grating at k·30° (period 4 pixels, random phase) plus noise, on
    ``size``×``size`` images (12 by default).

    Every class covers the whole image, so only a large mask makes an image look like another
    class, while the backdoor needs a 3×3 patch: the separation trigger inversion relies on.
    """
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % TINY_CLASSES
    angle = y.double() * math.pi / TINY_CLASSES
    phase = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
    grid = torch.arange(size, dtype=torch.float64)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    along = angle.cos()[:, None, None] * rows + angle.sin()[:, None, None] * cols
    wave = torch.sin(math.pi / 2 * along + phase[:, None, None])
    x = 0.5 + 0.25 * wave + 0.1 * torch.randn(wave.shape, generator=generator, dtype=torch.float64)
    return Split(x.clamp(0, 1).float()[:, None], y)


@dataclass
class TinyBackdoor:
    """A BadNets-backdoored model and its data (methods.md §0 threat model).

    ``train`` is the poisoned training split the model learnt; ``tune`` and ``holdout`` are the
    defender's clean data, drawn only from unpoisoned training samples; ``test`` is clean and
    separate. ``trigger`` maps clean inputs (one sample or a batch) to triggered ones.
    """

    model: nn.Module
    train: Split
    tune: Split
    holdout: Split
    test: Split
    trigger: Trigger
    target: int
    num_classes: int
    poisoned: torch.Tensor  # indices into ``train``


def defender_holdout(unpoisoned, n: int) -> tuple[np.ndarray, np.ndarray]:
    """480 tune samples and a holdout of 240 whose selection half (``split_guard``, seed 0) is
    the 120-sample holdout the tiny recipes were written against and whose guard half is 120
    further unpoisoned samples, so the guard checks data no selection rule read."""
    tune, first = defender_split(unpoisoned, n, fraction=0.3, tune_fraction=0.8, seed=0)
    same, larger = defender_split(unpoisoned, n, fraction=0.36, tune_fraction=2 / 3, seed=0)
    assert np.array_equal(same, tune)
    extra = np.setdiff1d(larger, first)
    selection, guard = split_guard(len(first) + len(extra), seed=0)
    holdout = np.empty(len(selection) + len(guard), dtype=np.int64)
    holdout[selection], holdout[guard] = first, extra
    return tune, holdout


@pytest.fixture(scope="session")
def tiny_backdoor() -> TinyBackdoor:
    """small-cnn trained on 2,000 gratings, 10 % poisoned with a 3×3 BadNets patch to label 0."""
    return make_tiny_backdoor()


@pytest.fixture(scope="session")
def wide_backdoor() -> TinyBackdoor:
    """The tiny task on 24×24 images: the same gratings, the same 3×3 patch to label 0 and the
    same recipe, but the patch is 1.6 % of the image (6 % at 12×12) — closer to a real BadNets
    trigger (1.1 % of a 28×28 Fashion-MNIST image), where the methods' own assumptions (a small
    trigger, dormant or trigger-peaked neurons) hold. Results on the 12×12 task that sit near a
    threshold (a pruning cut, a size test) vary with the seed and with the machine's arithmetic;
    on this task they do not (tests/test_defenses.py, tests/test_defenses_sau_bti_dbf.py)."""
    return make_tiny_backdoor(size=24)


def make_tiny_backdoor(size: int = TINY_SHAPE[1]) -> TinyBackdoor:
    """The :func:`tiny_backdoor` fixture's model and data, built afresh (also for
    benchmarks/tiny_defense.py); ``size`` 24 gives the same task on 24×24 images, where the
    3×3 patch is 1.6 % of the image (6 % at 12×12)."""
    shape = (1, size, size)
    clean = gratings(2000, seed=0, size=size)
    trigger = build_attack("badnets", shape, size=3)
    result = poison_split(clean, trigger, rate=0.1, target=0, seed=0)
    unpoisoned = sorted(set(range(len(clean))) - set(result.poisoned.tolist()))
    tune, holdout = defender_holdout(unpoisoned, len(clean))
    torch.manual_seed(0)
    model = build_model("small-cnn", shape, TINY_CLASSES)
    config = TrainConfig(epochs=4, batch_size=64, lr=0.05, progress=False, device="cpu")
    fit(model, result.split, config)
    model.eval()
    test = gratings(800, seed=1, size=size)
    metrics = evaluate(model, test, trigger, target=0, num_classes=TINY_CLASSES)
    assert metrics.acc > 0.9 and metrics.asr > 0.9, f"tiny_backdoor did not train: {metrics}"
    return TinyBackdoor(
        model=model,
        train=result.split,
        tune=clean.subset(tune),
        holdout=clean.subset(holdout),
        test=test,
        trigger=trigger,
        target=0,
        num_classes=TINY_CLASSES,
        poisoned=result.poisoned,
    )


@pytest.fixture
def wave_net() -> nn.Module:
    """A fresh, untrained 1-D conv net on N×T waveforms (T = 64), 3 classes; the default
    neuron layer is its last ReLU (``5``), made by the Conv1d ``3``."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, -1)),
        nn.Conv1d(1, 8, 9, stride=2, padding=4),
        nn.ReLU(),
        nn.Conv1d(8, 16, 5, stride=2, padding=2),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
