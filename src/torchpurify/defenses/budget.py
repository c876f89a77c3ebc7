"""The largest setting within the holdout budget: the one search of every defense that chooses
how much to prune or zero on the defender's holdout — Fine-Pruning's and ℓ∞ pruning's cut,
ANP's and RNP's mask threshold, TSBD's fraction of neurons.

The settings are numbered from the gentlest to the strongest, k = low … high, and ``passes(k)``
says whether the model at setting k is acceptable (its holdout accuracy at least the budget's
floor; for ℓ∞ pruning also: the trigger still works). The search takes no view of its own on
whether that curve is monotone; each caller states its assumption with ``search``:

``"binary"``
    **assumes a monotone curve**: passing up to some k, failing after it. O(log n)
    evaluations. On a curve that is not monotone it returns *a* k that passes with k + 1
    failing (an edge), not necessarily the largest passing k.
``"until-failure"``
    assumes nothing: it scans up from ``low`` and stops before the first failing setting —
    the end of the passing run that starts at ``low``, never past a setting that failed.
    At most n evaluations.
``"every"``
    assumes nothing: it evaluates every setting, in increasing order, and returns the largest
    that passes, even past settings that failed. Exactly n evaluations.

On a monotone curve the three give the same k. ``"binary"`` and ``"until-failure"`` return None
when ``passes(low)`` fails; ``"every"`` returns None only when no setting passes.
"""

from __future__ import annotations

from collections.abc import Callable

SEARCHES = ("binary", "until-failure", "every")


def largest_passing(
    low: int, high: int, passes: Callable[[int], bool], *, search: str
) -> int | None:
    """The largest k in [low, high] with ``passes(k)``, found as ``search`` says (see the
    module docstring: only ``"binary"`` assumes the curve is monotone)."""
    if search == "every":
        passing = [k for k in range(low, high + 1) if passes(k)]
        return passing[-1] if passing else None
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    if not passes(low):
        return None
    if search == "until-failure":
        return next((k - 1 for k in range(low + 1, high + 1) if not passes(k)), high)
    while low < high:
        middle = (low + high + 1) // 2
        if passes(middle):
            low = middle
        else:
            high = middle - 1
    return low
