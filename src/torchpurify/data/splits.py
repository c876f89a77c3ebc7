"""Deterministic index splits (methods.md §0): validation, and the defender's clean data.

Every split is drawn from ``numpy.random.default_rng(seed)`` and returned sorted, so the same
seed gives the same indices whatever order the inputs came in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from torchpurify.errors import UserError, check


def train_val_split(
    n: int, val_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into sorted, disjoint train and validation indices (int64); a
    ``val_fraction`` of 0 keeps every index for training."""
    check(0 <= val_fraction < 1, f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return np.arange(n, dtype=np.int64), np.array([], dtype=np.int64)
    n_val = round(val_fraction * n)
    check(
        0 < n_val < n,
        f"a validation fraction of {val_fraction} of {n} samples leaves an empty part; "
        "use more samples or another val_fraction",
    )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)


def defender_split(
    candidates: Sequence[int] | np.ndarray,
    n_train: int,
    fraction: float = 0.05,
    tune_fraction: float = 0.8,
    seed: int = 0,
    pool_size: int | None = None,
    groups: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The defender's clean ``(tune, holdout)`` indices into its pool: the training set
    (``pool_size`` None) or a held-out split of ``pool_size`` samples.

    Draws ``round(fraction * n_train)`` indices from ``candidates`` only — in the training set,
    the indices that were not poisoned, so the defender never holds a poisoned sample — and
    splits them ``tune_fraction`` / rest.

    ``groups`` (one id per pool index, e.g. a clip's speaker) makes the split group-disjoint:
    the holdout takes whole groups in a random order until it holds its share (so it may hold a
    few samples more), the tune set its share of the groups that remain (fewer only when the
    pool runs out) — so the holdout measures the model on groups it was not tuned on, as the
    test split does (methods.md §0).
    """
    check(0 < fraction <= 1, f"defender fraction must be in (0, 1], got {fraction}")
    check(0 < tune_fraction < 1, f"tune_fraction must be in (0, 1), got {tune_fraction}")
    pool = np.unique(np.asarray(candidates, dtype=np.int64))
    size = n_train if pool_size is None else pool_size
    if len(pool) and (pool[0] < 0 or pool[-1] >= size):
        raise UserError(f"candidate indices must lie in 0..{size - 1} (the defender's pool)")
    n_defender = round(fraction * n_train)
    if n_defender > len(pool):
        raise UserError(
            f"the defender needs {n_defender} clean samples ({fraction} of {n_train}) but only "
            f"{len(pool)} unpoisoned candidates exist; lower the defender fraction"
        )
    n_tune = round(tune_fraction * n_defender)
    check(
        0 < n_tune < n_defender,
        f"{n_defender} defender samples split {tune_fraction} / {1 - tune_fraction:.2g} leave "
        "tune or holdout empty; raise the defender fraction",
    )
    rng = np.random.default_rng(seed)
    if groups is not None:
        return _group_split(pool, np.asarray(groups), size, n_tune, n_defender - n_tune, rng)
    chosen = pool[rng.permutation(len(pool))[:n_defender]]
    return np.sort(chosen[:n_tune]), np.sort(chosen[n_tune:])


def _group_split(
    pool: np.ndarray, groups: np.ndarray, size: int, n_tune: int, n_holdout: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Tune and holdout indices of ``pool`` with no group in both (see :func:`defender_split`):
    whole groups until the holdout has ``n_holdout``, then up to ``n_tune`` from the others."""
    if groups.shape != (size,):
        raise UserError(f"groups must give one id per pool sample ({size}), got {groups.shape}")
    ids = groups[pool]
    order = rng.permutation(np.unique(ids))
    shuffled = pool[rng.permutation(len(pool))]
    by_group = {g: shuffled[groups[shuffled] == g] for g in order.tolist()}
    holdout: list[np.ndarray] = []
    held = 0
    rest = iter(order.tolist())
    for g in rest:
        holdout.append(by_group[g])
        held += len(by_group[g])
        if held >= n_holdout:
            break
    others = [by_group[g] for g in rest]
    tune = np.concatenate(others)[:n_tune] if others else np.array([], dtype=np.int64)
    if held < n_holdout or len(tune) == 0:
        raise UserError(
            f"{len(pool)} samples of {len(order)} groups (speakers) cannot give a holdout of "
            f"{n_holdout} and a tune set from other groups; give clean data of more groups"
        )
    return np.sort(tune), np.sort(np.concatenate(holdout))
