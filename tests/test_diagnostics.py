"""Research diagnostics (methods.md §7, §8) on the tiny BadNets backdoor."""

import copy

import pytest
import torch

from torchpurify.data.base import Split
from torchpurify.diagnostics import (
    RULES,
    TABLE_KEYS,
    detect,
    neuron_identification,
    neuron_table,
    plot_bias,
    plot_gradient_groups,
    plot_pruning_curve,
    precision_at_k,
    pruning_curve,
    roc_auc,
    write_csv,
)
from torchpurify.errors import UserError
from torchpurify.metrics import accuracy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_unchanged(model, before):
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.fixture(scope="module")
def table(tiny_backdoor):
    return neuron_table(tiny_backdoor.model, tiny_backdoor.holdout, tiny_backdoor.trigger)


@pytest.fixture(scope="module")
def curve(tiny_backdoor):
    tiny = tiny_backdoor
    return pruning_curve(tiny.model, tiny.holdout, tiny.trigger, tiny.target)


def test_roc_auc_on_hand_computed_cases():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # Positives {1, 3}, negatives {1, 2}: pairs 0.5 (tie) + 0 + 1 + 1 of 4.
    assert roc_auc(torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([0, 1, 0, 1])) == 0.625
    assert roc_auc([5.0, 5.0, 5.0], [True, False, True]) == 0.5
    assert roc_auc([3.0, 2.0, 1.0], [1, 0, 0]) == 1.0 and roc_auc([3.0, 2.0], [0, 1]) == 0.0
    with pytest.raises(UserError, match="positives and negatives"):
        roc_auc([1.0, 2.0], [1, 1])
    with pytest.raises(UserError, match="NaN"):
        roc_auc([float("nan"), 2.0], [1, 0])


def test_precision_at_k_shares_ties_at_the_cut():
    scores, labels = [3.0, 2.0, 2.0, 1.0], [1, 0, 1, 0]
    assert precision_at_k(scores, labels, 1) == 1.0
    assert precision_at_k(scores, labels, 2) == 0.75  # 1 + half of the tied positive
    assert precision_at_k(scores, labels, 3) == pytest.approx(2 / 3)
    assert precision_at_k(scores, labels, 4) == 0.5
    with pytest.raises(UserError, match="k must be"):
        precision_at_k(scores, labels, 5)


def test_neuron_identification_scores_every_rule(tiny_backdoor):
    tiny = tiny_backdoor
    model = copy.deepcopy(tiny.model).train()
    before = copy.deepcopy(model.state_dict())
    result = neuron_identification(model, tiny.holdout, tiny.trigger)
    channels = result["channels"]
    assert result["k"] == channels // 10 and len(result["ground_truth"]) == result["k"]
    assert result["ground_truth_trigger"] == "true" and result["bias_trigger"] == "true"
    assert list(result["rules"]) == list(RULES)
    for rule in result["rules"].values():
        assert 0 <= rule["auc"] <= 1 and 0 <= rule["precision_at_k"] <= 1
    assert result["rules"]["linf-bias"]["auc"] > 0.8
    assert result["rules"]["linf-bias"]["trigger"] == "true"
    assert result["rules"]["mean-activation"]["trigger"] == "none"
    assert model.training
    assert_unchanged(model, before)


def test_neuron_identification_records_an_inverted_trigger(tiny_backdoor):
    tiny = tiny_backdoor
    result = neuron_identification(
        tiny.model, tiny.holdout, tiny.trigger, k=5, inverted_trigger=lambda x: x.flip(-1)
    )
    assert result["bias_trigger"] == "inverted" and result["rules"]["l2-bias"]["trigger"] == (
        "inverted"
    )
    assert len(result["ground_truth"]) == 5


def test_user_mistakes_are_one_line_errors(tiny_backdoor):
    tiny = tiny_backdoor
    with pytest.raises(UserError, match="not a module"):
        neuron_identification(tiny.model, tiny.holdout, tiny.trigger, layer="block9")
    empty = Split(tiny.holdout.x[:0], tiny.holdout.y[:0])
    with pytest.raises(UserError, match="non-empty"):
        neuron_table(tiny.model, empty, tiny.trigger)
    with pytest.raises(UserError, match="order"):
        pruning_curve(tiny.model, tiny.holdout, tiny.trigger, 0, order="random")
    with pytest.raises(UserError, match="empty"):
        plot_bias([], "unused.png")


def test_neuron_table_has_a_row_per_channel(table):
    assert len(table) == 128  # small-cnn's block4.2
    assert all(tuple(row) == TABLE_KEYS for row in table)
    assert {row["group"] for row in table} <= {"backdoored", "hybrid", "clean", "dormant"}
    assert sum(row["backdoor"] for row in table) == 12
    assert all(row["trigger"] == "true" and row["layer"] == "block4.2" for row in table)
    row = table[0]
    assert row["linf_bias"] == pytest.approx(row["triggered_linf"] - row["clean_linf"])
    # The backdoor neurons' gradients on triggered batches exceed the typical neuron's.
    backdoor = torch.tensor([r["grad_norm_triggered"] for r in table if r["backdoor"]])
    everyone = torch.tensor([r["grad_norm_triggered"] for r in table])
    assert backdoor.median() > everyone.median()


def test_pruning_curve_starts_at_the_models_accuracy_and_leaves_it_alone(tiny_backdoor, curve):
    tiny = tiny_backdoor
    assert curve[0]["k"] == 0 and curve[-1]["k"] == 128 and len(curve) == 20
    assert curve[0]["acc"] == pytest.approx(accuracy(tiny.model, tiny.holdout))
    assert curve[0]["asr"] > 0.9
    assert all(row["order"] == "mean-activation" and row["trigger"] == "true" for row in curve)
    before = copy.deepcopy(tiny.model.state_dict())
    explicit = pruning_curve(
        tiny.model, tiny.holdout, tiny.trigger, 0, order=torch.arange(128), steps=3
    )
    assert [row["k"] for row in explicit] == [0, 64, 128]
    assert_unchanged(tiny.model, before)
    assert not any(name.endswith("neuron_mask") for name, _ in tiny.model.named_buffers())


@pytest.mark.parametrize(
    ("plot", "rows"),
    [(plot_bias, "table"), (plot_gradient_groups, "table"), (plot_pruning_curve, "curve")],
)
def test_each_plot_writes_a_png(plot, rows, request, tmp_path):
    path = plot(request.getfixturevalue(rows), tmp_path / "figures" / "plot.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and 5_000 < len(data) < 300_000


def test_write_csv_round_trips_the_table(table, tmp_path):
    path = write_csv(table, tmp_path / "table.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(TABLE_KEYS) and len(lines) == len(table) + 1
    with pytest.raises(UserError, match="no rows"):
        write_csv([], tmp_path / "empty.csv")


def test_detect_names_the_backdoor_target(tiny_backdoor):
    result = detect(tiny_backdoor.model, tiny_backdoor.holdout, steps=150, batch_size=32, seed=0)
    assert result["target"] == tiny_backdoor.target == result["most_anomalous"]
    assert result["trigger"] == "inverted" and result["value_range"] == [0.0, 1.0]
    assert [entry["label"] for entry in result["labels"]] == list(range(6))
    assert result["labels"][0]["anomaly_index"] > 2 and result["labels"][0]["success"] > 0.8
