"""Deterministic splits (methods.md §0): validation and the defender's clean tune/holdout."""

from __future__ import annotations

import numpy as np
import pytest

from torchpurify.data.splits import (
    GUARD_SHARE,
    TUNE_FRACTION,
    defender_split,
    split_guard,
    train_val_split,
)
from torchpurify.errors import UserError


def test_train_val_split():
    train, val = train_val_split(1000, val_fraction=0.1, seed=3)
    assert train.dtype == val.dtype == np.int64 and len(val) == 100
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    same = train_val_split(1000, val_fraction=0.1, seed=3)
    assert np.array_equal(same[1], val)
    assert not np.array_equal(train_val_split(1000, val_fraction=0.1, seed=4)[1], val)


@pytest.mark.parametrize("n, fraction", [(1000, -0.1), (1000, 1.0), (3, 0.1)])
def test_train_val_split_rejects(n, fraction):
    with pytest.raises(UserError):
        train_val_split(n, val_fraction=fraction)


def test_defender_split_avoids_poisoned():
    n_train = 2000
    poisoned = np.random.default_rng(0).choice(n_train, 200, replace=False)
    clean = np.setdiff1d(np.arange(n_train), poisoned)
    tune, holdout = defender_split(clean, n_train, fraction=0.05, tune_fraction=0.8, seed=1)
    assert len(tune) == 80 and len(holdout) == 20
    assert not np.intersect1d(tune, holdout).size
    assert not np.isin(np.concatenate([tune, holdout]), poisoned).any()
    again = defender_split(
        clean[::-1].copy(), n_train, fraction=0.05, tune_fraction=0.8, seed=1
    )  # order-free
    assert np.array_equal(again[0], tune) and np.array_equal(again[1], holdout)
    other = defender_split(clean, n_train, fraction=0.05, tune_fraction=0.8, seed=2)
    assert not np.array_equal(other[0], tune)


@pytest.mark.parametrize(
    "candidates, fraction, message",
    [
        (range(100), 0.0, r"\(0, 1\]"),
        (range(100), 1.5, r"\(0, 1\]"),
        (range(10), 0.5, "only 10 unpoisoned"),
        (range(100), 0.01, "empty"),
        ([0, 5000], 0.01, "0..99"),
    ],
)
def test_defender_split_rejects(candidates, fraction, message):
    with pytest.raises(UserError, match=message):
        defender_split(list(candidates), 100, fraction=fraction)


def _rows(split) -> set[bytes]:
    return {row.numpy().tobytes() for row in split.x}


@pytest.mark.parametrize("fraction, pool", [(0.05, "heldout"), (0.3, "train")])
def test_defender_data_comes_from_samples_the_model_never_trained_on(fraction, pool):
    """The defender's data are the held-out validation split when it is large enough (the
    model never trained on it, so holdout accuracy is an honest stand-in for test accuracy);
    otherwise unpoisoned training samples — never a poisoned one — and the card says which."""
    from torchpurify.attacks import build_attack
    from torchpurify.experiment import (
        AttackSpec,
        DataSpec,
        defender_data,
        defender_pool,
        poison_with,
        prepare_data,
    )

    spec = DataSpec(dataset="digits", seed=0)
    prepared = prepare_data(spec, progress=False)
    assert defender_pool(prepared, fraction) == pool
    attack = AttackSpec("badnets", poison_rate=0.2)
    trigger = build_attack("badnets", prepared.dataset.input_shape, seed=0)
    poisoned = poison_with(prepared.train, trigger, attack, 10, spec.seed)
    card = {"data": spec.to_dict(), "attack": {
        "trigger": trigger.to_dict(), "poison_rate": 0.2, "target": 0,
        "target_mode": "all-to-one", "clean_label": False,
        "poisoned_sha256": poisoned.indices_sha256(),
    }}  # fmt: skip
    tune, holdout, _ = defender_data(card, fraction=fraction, progress=False)
    n = round(fraction * len(prepared.train))
    assert len(tune) + len(holdout) == n
    given = _rows(tune) | _rows(holdout)
    assert len(given) == n  # tune and holdout disjoint (digits rows are distinct)
    trained = _rows(prepared.train)
    if pool == "heldout":
        assert given <= _rows(prepared.val) and not given & trained
    else:
        bad = set(np.union1d(poisoned.poisoned.numpy(), poisoned.noise.numpy()).tolist())
        assert given <= trained
        assert not given & _rows(prepared.train.subset(np.array(sorted(bad))))


def test_a_grouped_defender_split_keeps_every_group_on_one_side():
    """Speech (methods.md §0): whole speakers go to the holdout, so it measures the model on
    speakers the defense was not tuned on, as the test split does."""
    groups = np.repeat(np.arange(90), 13)[:1100]  # 85 speakers of 13 clips, one of 5
    tune, holdout = defender_split(range(1100), 9000, fraction=0.1, tune_fraction=0.8, seed=7,
                                   pool_size=1100, groups=groups)  # fmt: skip
    assert len(tune) == 720 and 180 <= len(holdout) < 180 + 13
    assert not set(groups[tune]) & set(groups[holdout])
    holdout_groups = set(groups[holdout])
    assert len(holdout) == sum((groups == g).sum() for g in holdout_groups)  # whole groups
    again = defender_split(
        range(1100), 9000, fraction=0.1, tune_fraction=0.8, seed=7, pool_size=1100, groups=groups
    )
    assert np.array_equal(again[0], tune) and np.array_equal(again[1], holdout)
    plain = defender_split(
        range(1100), 9000, fraction=0.1, tune_fraction=0.8, seed=7, pool_size=1100
    )
    assert set(groups[plain[0]]) & set(groups[plain[1]])  # a random split shares speakers


def test_a_grouped_split_of_all_the_data_and_its_errors():
    groups = np.repeat(np.arange(10), 10)
    tune, holdout = defender_split(
        range(100), 100, fraction=1.0, tune_fraction=0.8, seed=0, groups=groups
    )
    assert len(tune) + len(holdout) == 100 and len(holdout) == 20
    assert not set(groups[tune]) & set(groups[holdout])
    with pytest.raises(UserError, match="groups"):
        defender_split(range(100), 100, fraction=1.0, groups=np.zeros(100, dtype=int))
    with pytest.raises(UserError, match=r"one id \(or row\) per pool sample"):
        defender_split(range(100), 100, fraction=1.0, groups=groups[:50])


def test_voices_of_two_factors_share_neither_between_tune_and_holdout():
    """speech-synth's validation voices (methods.md §0): a held-out accent A × the training
    variants, the training accents × held-out variants, and A × the held-out variants. A holdout
    sharing an accent or a variant with the tune set would see fine-tuning adapt to it; the
    split keeps them apart, dropping the bridging voices rather than sharing a factor."""
    train_accents, train_variants, held_variants = range(1, 7), range(10, 40), range(90, 97)
    voices = [(0, v) for v in train_variants] + [
        (a, v) for a in train_accents for v in held_variants
    ]
    voices += [(0, v) for v in held_variants]
    groups = np.array([voice for voice in voices for _ in range(12)])  # 12 clips per voice
    n = len(groups)
    for seed in range(3):
        tune, holdout = defender_split(
            range(n), n, fraction=0.6, tune_fraction=0.8, seed=seed, groups=groups
        )
        for k in range(2):
            assert not set(groups[tune, k]) & set(groups[holdout, k])
        assert len(holdout) >= round(0.2 * round(0.6 * n)) and len(tune) >= 0.8 * 42 * 12
    one_factor = defender_split(
        range(n),
        n,
        fraction=0.6,
        tune_fraction=0.8,
        seed=0,
        groups=groups[:, 0] * 100 + groups[:, 1],
    )
    assert set(map(tuple, groups[one_factor[0]])) & set(map(tuple, groups[one_factor[1]])) == set()


def test_the_guard_gets_its_own_share_of_the_holdout():
    """methods.md §0: the guard checks samples no selection rule read; by default the tune set is
    60 % of the defender's data and the holdout is halved between selection and guard."""
    tune, holdout = defender_split(range(2000), 2000, fraction=0.9, seed=3)
    assert len(tune) == round(TUNE_FRACTION * 1800) and len(holdout) == 1800 - len(tune)
    selection, guard = split_guard(len(holdout), seed=3)
    assert len(guard) == round(GUARD_SHARE * len(holdout))
    assert not set(selection) & set(guard) and len(selection) + len(guard) == len(holdout)
    again = split_guard(len(holdout), seed=3)
    assert np.array_equal(again[0], selection) and np.array_equal(again[1], guard)
    assert not np.array_equal(split_guard(len(holdout), seed=4)[1], guard)
    assert [len(part) for part in split_guard(2)] == [1, 1]
    with pytest.raises(UserError, match="at least 2"):
        split_guard(1)
