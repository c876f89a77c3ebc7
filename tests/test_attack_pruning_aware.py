"""The pruning-aware attacker of the Fine-Pruning paper: its decoys come first in the pruning
order, pruning alone leaves its backdoor, and it trains from the CLI and rebuilds from the card."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import TINY_CLASSES, TINY_SHAPE, gratings
from torchpurify.attacks import build_attack, poison_split, trigger_from_dict
from torchpurify.cli import app
from torchpurify.data.splits import defender_split
from torchpurify.defenses import Clean, build_defense
from torchpurify.errors import UserError
from torchpurify.metrics import evaluate
from torchpurify.models import build_model
from torchpurify.models.io import load_model
from torchpurify.neurons import activation_stats, masked_layers
from torchpurify.train import TrainConfig


@pytest.fixture(scope="module")
def attacked():
    """small-cnn on 1,500 gratings, 10 % poisoned by the pruning-aware BadNets attacker."""
    clean = gratings(1500, seed=0)
    trigger = build_attack("pruning-aware", TINY_SHAPE, base_params={"size": 3})
    poisoned = poison_split(clean, trigger, rate=0.1, target=0, seed=0)
    torch.manual_seed(0)
    model = build_model("small-cnn", TINY_SHAPE, TINY_CLASSES)
    config = TrainConfig(epochs=3, batch_size=64, lr=0.05, progress=False, device="cpu")
    result, log = trigger.train_backdoored(
        model, clean=clean, poisoned=poisoned.split, val=gratings(300, seed=2), config=config
    )
    unpoisoned = sorted(set(range(len(clean))) - set(poisoned.poisoned.tolist()))
    tune, holdout = defender_split(unpoisoned, len(clean), fraction=0.3, seed=0)
    defender = Clean(clean.subset(tune), clean.subset(holdout))
    return model, trigger, result, log, defender


def measure(model, trigger):
    return evaluate(model, gratings(600, seed=1), trigger, target=0, num_classes=TINY_CLASSES)


def test_the_backdoor_works_and_the_model_keeps_its_accuracy(attacked):
    model, trigger, result, log, _ = attacked
    metrics = measure(model, trigger)
    assert metrics.acc > 0.9 and metrics.asr > 0.9, metrics
    assert [r["phase"] for r in result.history] == ["clean"] * 3 + ["poisoned, pruned"] * 3
    assert not masked_layers(model), "the decoys are restored, not masked"


def test_decoys_are_dormant_and_first_in_the_defenders_pruning_order(attacked):
    model, _, _, log, defender = attacked
    assert log["layer"] == "block4.2" and log["bias_module"] == "block4.1"
    assert 0 < log["num_decoys"] < log["channels"]
    # The defender ranks by mean activation on its own clean holdout (Fine-Pruning's rule).
    stats = activation_stats(model, log["layer"], defender.holdout)
    first = stats.mean.argsort()[: log["num_decoys"]]
    assert set(first.tolist()) == set(log["decoys"])
    assert torch.all(stats.mean[log["decoys"]] == 0)
    assert torch.all(stats.mean[[c for c in range(128) if c not in log["decoys"]]] > 0)


def test_pruning_alone_spends_itself_on_the_decoys_and_leaves_the_backdoor(attacked):
    """The paper's finding for its adaptive attacker: 'Pruning' does not remove this backdoor."""
    model, trigger, _, log, defender = attacked
    original = copy.deepcopy(model.state_dict())
    pruned = build_defense("fine-pruning", device="cpu", prune_only=True).purify(model, defender)
    assert set(log["decoys"]) <= set(pruned.log["pruned"])
    assert measure(pruned.model, trigger).asr > 0.5
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_triggered_inputs_are_the_base_triggers_and_the_record_rebuilds_it(attacked):
    _, trigger, _, _, _ = attacked
    x = gratings(4, seed=5).x
    badnets = build_attack("badnets", TINY_SHAPE, size=3)
    assert torch.equal(trigger(x), badnets(x))
    rebuilt = trigger_from_dict(trigger.to_dict())
    assert rebuilt.params == trigger.params and torch.equal(rebuilt(x), trigger(x))


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"base": "pruning-aware"}, "base must be the name of another attack"),
        ({"base": "nope"}, "nope"),
        ({"max_acc_drop": 1.5}, "max_acc_drop must be in [0, 1)"),
        ({"decoy_margin": -1}, "decoy_margin must be ≥ 0"),
        ({"base_params": {"size": 99}}, "badnets: size must be"),
    ],
)
def test_bad_parameters_are_one_line_errors(params, fragment):
    with pytest.raises(UserError) as error:
        build_attack("pruning-aware", TINY_SHAPE, **params)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_train_from_the_cli_records_the_decoys_in_the_card(tmp_path):
    out = tmp_path / "pa"
    result = CliRunner().invoke(
        app,
        ["train", "--dataset", "digits", "--model", "small-cnn", "--attack", "pruning-aware",
         "--set", "base_params={size: 2}", "--epochs", "2", "--no-progress", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "(poisoned, pruned)" in result.output
    model, card = load_model(out)
    procedure = card["attack"]["procedure"]
    assert card["attack"]["trigger"]["attack"] == "pruning-aware"
    assert procedure["num_decoys"] == len(procedure["decoys"]) > 0
    assert not card.get("masks")
