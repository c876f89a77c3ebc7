import pytest
import torch

from torchpurify.attacks import build_attack, poison_split, target_labels
from torchpurify.attacks.poison import poisoning_problem
from torchpurify.data.base import Split
from torchpurify.errors import UserError

SHAPE = (1, 8, 8)


def make_split(n=200, classes=10):
    generator = torch.Generator().manual_seed(0)
    return Split(torch.rand(n, *SHAPE, generator=generator), torch.arange(n) % classes)


def test_all_to_one_dirty_label():
    split = make_split()
    original = Split(split.x.clone(), split.y.clone())
    result = poison_split(split, build_attack("badnets", SHAPE), rate=0.1, target=3)

    idx = result.poisoned
    assert len(idx) == 20 and idx.dtype == torch.int64 and torch.equal(idx, idx.sort()[0])
    assert (original.y[idx] != 3).all()
    assert (result.split.y[idx] == 3).all()
    assert len(result.noise) == 0
    others = torch.ones(len(split), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(result.split.y[others], original.y[others])
    assert torch.equal(result.split.x[others], original.x[others])
    assert not torch.allclose(result.split.x[idx], original.x[idx])
    assert torch.equal(split.x, original.x) and torch.equal(split.y, original.y)


def test_all_to_all_targets():
    y = torch.tensor([0, 4, 9])
    assert torch.equal(target_labels(y, 0, "all-to-all", 10), torch.tensor([1, 5, 0]))
    assert torch.equal(target_labels(y, 2, "all-to-one", 10), torch.tensor([2, 2, 2]))
    split = make_split()
    result = poison_split(split, build_attack("blended", SHAPE), rate=0.2, mode="all-to-all")
    idx = result.poisoned
    assert len(idx) == 40
    assert torch.equal(result.split.y[idx], (split.y[idx] + 1) % 10)


def test_clean_label_keeps_labels_and_picks_target_class():
    split = make_split()
    result = poison_split(split, build_attack("sig", SHAPE), rate=0.1, target=2)
    idx = result.poisoned
    assert len(idx) == 20 and (split.y[idx] == 2).all()
    assert torch.equal(result.split.y, split.y)
    capped = poison_split(split, build_attack("sig", SHAPE), rate=0.5, target=2)
    assert len(capped.poisoned) == 20  # only 20 samples of class 2 exist
    forced = poison_split(split, build_attack("badnets", SHAPE), rate=0.05, clean_label=True)
    assert (split.y[forced.poisoned] == 0).all() and torch.equal(forced.split.y, split.y)


def test_wanet_noise_samples():
    split = make_split()
    result = poison_split(split, build_attack("wanet", SHAPE), rate=0.1)
    poisoned, noise = result.poisoned, result.noise
    assert len(poisoned) == 20 and len(noise) == 40
    assert torch.equal(noise, noise.sort()[0])
    assert not set(poisoned.tolist()) & set(noise.tolist())
    assert torch.equal(result.split.y[noise], split.y[noise])
    assert not torch.allclose(result.split.x[noise], split.x[noise])


def test_seeded_and_hashed():
    split, trigger = make_split(), build_attack("badnets", SHAPE)
    first = poison_split(split, trigger, rate=0.1, seed=5)
    again = poison_split(split, trigger, rate=0.1, seed=5)
    other = poison_split(split, trigger, rate=0.1, seed=6)
    assert torch.equal(first.poisoned, again.poisoned)
    assert torch.equal(first.split.x, again.split.x)
    assert first.indices_sha256() == again.indices_sha256() != other.indices_sha256()
    assert len(first.indices_sha256()) == 64


def test_half_percent_rate():
    result = poison_split(make_split(n=1000), build_attack("badnets", SHAPE), rate=0.005)
    assert len(result.poisoned) == 5


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"rate": 1.5}, "--poison-rate must be in (0, 1], got 1.5"),
        ({"rate": 0}, "--poison-rate must be in (0, 1]"),
        ({"rate": 0.001}, "poisons 0 of 200"),
        ({"rate": 0.95}, "lower --poison-rate"),
        ({"rate": 0.1, "target": 10}, "--target must be in [0, 10)"),
        ({"rate": 0.1, "target": -1}, "--target"),
        ({"rate": 0.1, "mode": "one-to-one"}, "--target-mode must be one of"),
        ({"rate": 0.1, "mode": "all-to-all", "clean_label": True}, "clean-label"),
    ],
)
def test_invalid_arguments(kwargs, words):
    with pytest.raises(UserError) as info:
        poison_split(make_split(), build_attack("badnets", SHAPE), **kwargs)
    assert words in str(info.value)


def test_too_many_noise_samples():
    with pytest.raises(UserError, match="cross_ratio"):
        poison_split(make_split(), build_attack("wanet", SHAPE), rate=0.5, mode="all-to-all")


def test_trigger_shape_must_match_split():
    with pytest.raises(UserError, match="shape"):
        poison_split(make_split(), build_attack("badnets", (3, 8, 8)), rate=0.1)


@pytest.mark.parametrize(
    ("rate", "mode", "target", "field"),
    [
        (float("inf"), "all-to-one", 0, "poison_rate"),
        (True, "all-to-one", 0, "poison_rate"),
        (0.1, "one-to-one", 0, "target_mode"),
        (0.1, "all-to-one", -1, "target"),
        (0.1, "all-to-one", 10, "target"),
    ],
)
def test_one_range_check_for_poisoning_serves_every_entry_point(rate, mode, target, field):
    from torchpurify.experiment import AttackSpec

    problem = poisoning_problem(rate, mode, target, num_classes=10)
    assert problem is not None and problem[0] == field
    option = "--" + field.replace("_", "-")
    with pytest.raises(UserError, match=f"^{option} must"):
        poison_split(make_split(), build_attack("badnets", SHAPE), rate, target, mode, 10)
    if target < 10:  # AttackSpec does not know the number of classes yet
        with pytest.raises(UserError, match=f"^{option} must"):
            AttackSpec("badnets", poison_rate=rate, target=target, target_mode=mode)
    assert poisoning_problem(0.1, "all-to-all", 9, num_classes=10) is None
