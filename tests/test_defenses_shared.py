"""The machinery several defenses share (issue 31): the budget search (defenses/budget.py), the
two-pass step's gradient at perturbed weights (defenses/two_pass.py) and unlearning
(defenses/unlearning.py)."""

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.data.base import Split
from torchpurify.defenses.budget import SEARCHES, largest_passing
from torchpurify.defenses.two_pass import perturbed_gradient, trainable
from torchpurify.defenses.unlearning import Unlearning, unlearn
from torchpurify.train import TrainConfig, Trainer


def curve_of(passing: list[bool]):
    """``passes`` for a curve given by its values, recording the k it is asked about."""
    asked: list[int] = []

    def passes(k: int) -> bool:
        asked.append(k)
        return passing[k]

    return passes, asked


def test_every_search_finds_the_edge_of_a_monotone_curve():
    n = 33
    for low in (0, 5):
        for edge in range(low - 1, n):  # edge: the last passing k (low − 1: none passes)
            monotone = [k <= edge for k in range(n)]
            found = {}
            for search in SEARCHES:
                passes, asked = curve_of(monotone)
                found[search] = largest_passing(low, n - 1, passes, search=search)
                if search == "binary":
                    assert len(asked) <= 1 + math.ceil(math.log2(n - low)), (edge, asked)
            expected = None if edge < low else edge
            assert found == dict.fromkeys(SEARCHES, expected), (low, edge)


def test_a_curve_that_is_not_monotone_is_searched_as_each_search_says():
    # Passing at 0, failing at 1, passing again at 2-3 and at 6.
    bumpy = [True, False, True, True, False, False, True]
    results = {}
    for search in SEARCHES:
        passes, asked = curve_of(bumpy)
        results[search] = (largest_passing(0, 6, passes, search=search), asked)
    # The scan to the first failure stops before the first failing setting, past none.
    assert results["until-failure"] == (0, [0, 1])
    # The full scan tries every setting once, in order, and keeps the largest passing one.
    assert results["every"] == (6, list(range(7)))
    # Binary search assumes a monotone curve: it returns an edge, a passing k followed by a
    # failing one, here neither of the others.
    k, _ = results["binary"]
    assert bumpy[k] and not bumpy[k + 1] and k == 3


def test_a_failing_first_setting_ends_the_searches_that_start_from_it():
    passes = [False, True, True, False].__getitem__
    assert largest_passing(0, 3, passes, search="binary") is None
    assert largest_passing(0, 3, passes, search="until-failure") is None
    assert largest_passing(0, 3, passes, search="every") == 2
    assert largest_passing(0, 3, lambda k: False, search="every") is None
    with pytest.raises(ValueError, match="search must be one of"):
        largest_passing(0, 3, passes, search="sweep")


def small_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )


def test_perturbed_gradient_is_the_gradient_there_and_leaves_the_model_as_it_was():
    model = small_bn_net().train()
    unused = nn.Parameter(torch.ones(2))
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    params = [*trainable(model), unused]
    offsets = [0.1 * torch.randn_like(p) for p in params]
    before = copy.deepcopy(model.state_dict())
    grads = perturbed_gradient(model, params, offsets, lambda: F.cross_entropy(model(x), y))
    for key, value in model.state_dict().items():  # weights and running statistics alike
        assert torch.equal(value, before[key]), key
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, offset in zip(trainable(shifted), offsets, strict=False):
            p.add_(offset)
    expected = torch.autograd.grad(F.cross_entropy(shifted(x), y), trainable(shifted))
    for g, e in zip(grads, expected, strict=False):
        assert torch.allclose(g, e, atol=1e-6)
    assert torch.equal(grads[-1], torch.zeros(2))  # the loss does not reach it


def separable(n: int, seed: int) -> Split:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return Split(x, (x[:, 0] > 0).long())


def trained_linear() -> tuple[nn.Module, Split]:
    data = separable(64, seed=1)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    with Trainer(model, data, TrainConfig(epochs=20, batch_size=16, lr=0.5, device="cpu",
                                          progress=False)) as trainer:  # fmt: skip
        for _ in range(20):
            trainer.epoch()
    return model, data


def sgd(epochs: int, lr: float = 0.5, seed: int = 3) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=16, lr=lr, weight_decay=0.0,
                       schedule="constant", seed=seed, device="cpu", progress=False)  # fmt: skip


def test_unlearning_judged_on_its_batches_stops_at_the_first_batch_at_the_target():
    model, data = trained_linear()
    before = copy.deepcopy(model.state_dict())
    # Every batch is at or under an accuracy of 1: the first takes no step and ends it all.
    history = unlearn(model, data, Unlearning(sgd(epochs=3), target=1.0))
    assert len(history) == 1 and history[0]["stopped_at_batch"] == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unlearning_ascends_until_the_holdout_falls_to_the_target():
    model, data = trained_linear()
    holdout = separable(64, seed=2)
    history = unlearn(model, data, Unlearning(sgd(epochs=50), target=0.3), holdout=holdout)
    accuracies = [record["holdout_acc"] for record in history]
    assert accuracies[0] > 0.3 >= accuracies[-1]  # an ascent: it got there, and then stopped
    assert all(acc > 0.3 for acc in accuracies[:-1])
    assert [record["epoch"] for record in history] == list(range(1, len(history) + 1))


def test_unlearning_rate_milestones_and_restarts():
    model, data = trained_linear()
    never = Unlearning(sgd(epochs=3, lr=0.01), target=-1.0, milestones=(1,))
    history = unlearn(copy.deepcopy(model), data, never)
    assert [record["lr"] for record in history] == pytest.approx([0.01, 0.001, 0.001])
    # restart: each epoch a run of its own, seeded seed + epoch, momentum not carried over.
    restarted = copy.deepcopy(model)
    unlearn(restarted, data, Unlearning(sgd(epochs=2), target=-1.0, restart=True), holdout=data)
    by_hand = copy.deepcopy(model)
    for epoch in (1, 2):
        config = replace(sgd(epochs=1), seed=3 + epoch)
        with Trainer(by_hand, data, config, step=ascent_only) as trainer:
            trainer.epoch()
    for key, value in restarted.state_dict().items():
        assert torch.equal(value, by_hand.state_dict()[key]), key


def ascent_only(model, x, y, optimizer, cost):
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    (-loss).backward()
    optimizer.step()
    return loss.detach()
