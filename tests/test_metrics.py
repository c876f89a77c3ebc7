import pytest
import torch
from torch import nn

from torchpurify.attacks import target_labels
from torchpurify.data.base import Split
from torchpurify.errors import UserError
from torchpurify.metrics import attack_rates, der, evaluate


class LookupModel(nn.Module):
    """Predicts the label stored in the input's first element (so tests control every output)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0].long(), 4).float() + 0 * self.dummy


def add_one(x):
    out = x.clone()
    out[:, 0] = (out[:, 0] + 1) % 4
    return out


def test_target_labels_all_to_one_and_all_to_all():
    y = torch.tensor([0, 1, 2, 3])
    assert target_labels(y, 2, "all-to-one", 4).tolist() == [2, 2, 2, 2]
    assert target_labels(y, 2, "all-to-all", 4).tolist() == [1, 2, 3, 0]


def test_attack_rates_hand_computed_all_to_one():
    # True labels 0..3 twice; target 0, so the two label-0 samples are excluded.
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    predicted = torch.tensor([0, 0, 0, 3, 1, 1, 0, 2])
    asr, ra = attack_rates(predicted, y, target=0, mode="all-to-one", num_classes=4)
    # eligible: indices 1,2,3,5,6,7 → predicted 0,0,3,1,0,2 → target hits 3/6, correct 2/6
    assert asr == pytest.approx(3 / 6)
    assert ra == pytest.approx(2 / 6)


def test_attack_rates_hand_computed_all_to_all():
    y = torch.tensor([0, 1, 2, 3])
    predicted = torch.tensor([1, 2, 2, 1])  # targets 1,2,3,0 → hits at 0,1; correct at 2
    asr, ra = attack_rates(predicted, y, target=0, mode="all-to-all", num_classes=4)
    assert asr == pytest.approx(0.5)
    assert ra == pytest.approx(0.25)


def test_evaluate_applies_trigger_only_to_non_target_samples():
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    x = torch.zeros(6, 3)
    x[:, 0] = labels.float()
    x[4, 0] = 0  # one clean mistake: label 1 predicted 0
    test = Split(x, labels)
    m = evaluate(LookupModel(), test, add_one, target=0, mode="all-to-one", num_classes=4)
    assert m.acc == pytest.approx(5 / 6)
    # triggered predictions for non-target samples (1,2,3,1→0+1,2): 2,3,0,1,3 → one hit of target 0
    assert m.asr == pytest.approx(1 / 5)
    assert m.ra == pytest.approx(1 / 5)  # only sample 4 (x=0 → 1) is predicted as its label 1
    m = evaluate(LookupModel(), test, add_one, mode="all-to-all", num_classes=4)
    assert m.asr == pytest.approx(5 / 6)


def test_evaluate_without_trigger_reports_acc_only():
    test = Split(torch.zeros(2, 3), torch.tensor([0, 1]))
    m = evaluate(LookupModel(), test)
    assert (m.acc, m.asr, m.ra) == (0.5, None, None)


def test_empty_split_is_a_user_error():
    with pytest.raises(UserError, match="empty"):
        evaluate(LookupModel(), Split(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ((0.90, 1.00), (0.90, 0.00), 1.0),  # backdoor gone, no cost
        ((0.90, 1.00), (0.90, 1.00), 0.5),  # nothing happened
        ((0.90, 1.00), (0.80, 0.20), (0.8 - 0.1 + 1) / 2),
        ((0.90, 0.10), (0.95, 0.30), 0.5),  # gains never count; ASR rising is not penalised
        ((0.90, 0.00), (0.00, 0.00), 0.05),
    ],
)
def test_der(before, after, expected):
    assert der(before[0], before[1], after[0], after[1]) == pytest.approx(expected)
