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


# What a grouped defender split guarantees; part of a grid cell's key (a changed rule reruns).
GROUP_RULE = "whole units in the holdout, no factor shared with tune"

# The defender's clean data (methods.md §0): TUNE_FRACTION trains; the rest is the holdout, whose
# GUARD_SHARE is the guard's own (split_guard): no selection rule reads it. Part of a grid
# cell's key, so a store never reuses a cell of an earlier split.
TUNE_FRACTION = 0.6
GUARD_SHARE = 0.5
GUARD_RULE = (
    f"tune {TUNE_FRACTION}; the guard checks {GUARD_SHARE} of the holdout, unread by selection"
)


def split_guard(n: int, seed: int = 0, share: float = GUARD_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint ``(selection, guard)`` indices of a holdout of ``n`` samples: the guard
    takes ``round(share × n)`` (at least one), drawn by ``seed``; every stopping or selection
    rule of a defense reads only the rest, so the guard's check is not optimistic."""
    check(0 < share < 1, f"the guard's share of the holdout must be in (0, 1), got {share}")
    check(
        n >= 2,
        f"the holdout has {n} sample(s): it needs at least 2, one for the defense's selection "
        "rules and one for its guard",
    )
    n_guard = min(max(1, round(share * n)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_guard:]).astype(np.int64), np.sort(order[:n_guard]).astype(np.int64)


def defender_split(
    candidates: Sequence[int] | np.ndarray,
    n_train: int,
    fraction: float = 0.05,
    tune_fraction: float = TUNE_FRACTION,
    seed: int = 0,
    pool_size: int | None = None,
    groups: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The defender's clean ``(tune, holdout)`` indices into its pool: the training set
    (``pool_size`` None) or a held-out split of ``pool_size`` samples.

    Draws ``round(fraction * n_train)`` indices from ``candidates`` only — in the training set,
    the indices that were not poisoned, so the defender never holds a poisoned sample — and
    splits them ``tune_fraction`` / rest.

    ``groups`` (one id or one row of factor ids per pool index: a clip's speaker, a synthetic
    voice's accent and variant) makes the split group-disjoint (:func:`_group_split`): the
    holdout takes whole groups until it holds its share (so it may hold a few samples more),
    the tune set its share of the groups sharing no factor with them (fewer when the pool runs
    out) — so the holdout measures the model on speakers it was not tuned on, as the test split
    does (methods.md §0).
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
    """Tune and holdout indices of ``pool`` sharing no group factor (see :func:`defender_split`).

    ``groups`` is one id per sample (a speaker) or one row of F factor ids per sample (a
    synthetic voice: accent, variant); two samples are related when any factor is equal. A
    *unit* is a distinct row. The holdout takes whole units until it holds ``n_holdout``; the
    tune set takes up to ``n_tune`` from the units that share no factor with it. With one
    factor per unit that is any order; with shared factors the holdout grows greedily, each
    time by the unit that makes the fewest other samples ineligible for tune (ties in the
    seed's order), from the start unit — of the first 64 in the seed's order — that leaves
    the tune set largest.
    """
    if groups.ndim == 1:
        groups = groups[:, None]
    if groups.ndim != 2 or len(groups) != size:
        raise UserError(
            f"groups must give one id (or row) per pool sample ({size}), got {groups.shape}"
        )
    rows, unit_of = np.unique(groups[pool], axis=0, return_inverse=True)
    unit_of = unit_of.reshape(-1)
    order = rng.permutation(len(rows)).tolist()
    shuffled = rng.permutation(len(pool))
    members = {u: pool[shuffled[unit_of[shuffled] == u]] for u in order}
    sizes = {u: len(members[u]) for u in order}
    factors = {u: {(k, int(v)) for k, v in enumerate(rows[u])} for u in order}
    carriers: dict[tuple[int, int], list[int]] = {}
    for u in order:
        for f in factors[u]:
            carriers.setdefault(f, []).append(u)

    shared = any(len(units) > 1 for units in carriers.values())

    def grow(start: int) -> tuple[list[int], int]:
        """The holdout's units from ``start``, and how many samples the tune set can have."""
        if not shared:  # every unit costs nothing: the greedy takes them in the seed's order
            held = np.cumsum([sizes[u] for u in order])
            count = int(np.searchsorted(held, n_holdout)) + 1
            if count > len(order):
                return order, -1
            return order[:count], int(held[-1] - held[count - 1])
        chosen, held, taken = [start], sizes[start], set(factors[start])
        ineligible = {v for f in factors[start] for v in carriers[f]}
        while held < n_holdout:
            best, best_cost = None, None
            for u in order:
                if u in ineligible and u not in chosen and not factors[u] - taken:
                    best, best_cost = u, 0  # adds no new factor: free
                    break
                if u in chosen:
                    continue
                lost = {v for f in factors[u] - taken for v in carriers[f]} - ineligible - {u}
                cost = sum(sizes[v] for v in lost)
                if best_cost is None or cost < best_cost:
                    best, best_cost = u, cost
            if best is None:
                break
            chosen.append(best)
            held += sizes[best]
            taken |= factors[best]
            ineligible |= {v for f in factors[best] for v in carriers[f]}
        if held < n_holdout:
            return chosen, -1
        return chosen, sum(sizes[u] for u in order if u not in ineligible)

    starts = order[:64] if shared else order[:1]
    chosen, room = max((grow(start) for start in starts), key=lambda result: result[1])
    if room <= 0:
        raise UserError(
            f"{len(pool)} samples of {len(rows)} groups (speakers) cannot give a holdout of "
            f"{n_holdout} and a tune set from other groups; give clean data of more groups"
        )
    taken = {f for u in chosen for f in factors[u]}
    tune = np.concatenate([members[u] for u in order if not factors[u] & taken])[:n_tune]
    return np.sort(tune), np.sort(np.concatenate([members[u] for u in chosen]))
