"""Where each default comes from (methods.md, "Where each default comes from").

Every hyper-parameter field of every registered defense and of the backdoor estimate
(:class:`~torchpurify.estimate.EstimateConfig`) names its source in its field metadata
(:func:`torchpurify.checks.default`). A source starts with its kind:

- ``paper:`` the method's paper or its authors' code (and the methods.md section that says so);
- ``dev:`` development cells (seeds ≥ 100, ``configs/dev-*.yaml``) and the methods.md section
  that reads them;
- ``protocol:`` a rule of the protocol, not tuned on any cell (the guard's budget, no rule
  reads the trigger, sizing for cost);
- ``run setting``: how a run is executed (device, seed, batch size, progress), not a
  hyper-parameter of the method;
- ``pending:`` the only evidence is an evaluation cell (seeds 0–2) or nothing: the default
  still has to be re-chosen on development cells. Every pending default is listed in
  :data:`PENDING_RECHOICE`, so the list is explicit and shrinks as defaults are re-chosen.

:func:`default_sources` gives the table; ``tests/test_default_sources.py`` checks it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torchpurify.checks import source_of
from torchpurify.defenses.base import DEFENSES, setting_fields
from torchpurify.estimate import EstimateConfig

KINDS = ("paper:", "dev:", "protocol:", "pending:", "run setting")

# The defaults whose only evidence is an evaluation cell (seed 0 of methods.md §11.1) or
# nothing (issue 29). A source that names an evaluation spec or seed is allowed only here; when
# a default is re-chosen on development cells, its source changes and its entry goes.
PENDING_RECHOICE: tuple[tuple[str, str], ...] = ()

ESTIMATE = "estimate"  # the owner name of the backdoor estimate's settings in the table


def kind_of(source: str | None) -> str | None:
    """The kind a source starts with (one of :data:`KINDS`), or None."""
    if source is None:
        return None
    return next((kind for kind in KINDS if source.startswith(kind)), None)


def owners() -> dict[str, type]:
    """Every dataclass whose fields carry sources: the registered defenses, the estimate, and
    ``auto`` (:mod:`torchpurify.auto`, which chooses among the defenses)."""
    from torchpurify.auto import AUTO, Auto  # it imports the defenses: here, not at the top

    return {
        **{name: DEFENSES.get(name) for name in DEFENSES.names()},
        ESTIMATE: EstimateConfig,
        AUTO: Auto,
    }


def default_sources() -> list[dict[str, Any]]:
    """One row per setting of every registered defense (its run context's and guard's too, as
    :func:`~torchpurify.defenses.base.setting_fields` lists them) and of the estimate's settings:
    ``{"owner", "field", "default", "kind", "source"}`` (``source`` None where none is named).
    """
    rows = []
    for owner, cls in owners().items():
        fields = dataclasses.fields(cls) if owner == ESTIMATE else setting_fields(cls)
        for field in fields:
            source = source_of(field)
            rows.append(
                {
                    "owner": owner,
                    "field": field.name,
                    "default": field.default,
                    "kind": kind_of(source),
                    "source": source,
                }
            )
    return rows


def sources_table(rows: list[dict[str, Any]] | None = None) -> str:
    """The rows as plain text, one field a line: ``owner.field = default  source``."""
    rows = default_sources() if rows is None else rows
    names = [f"{r['owner']}.{r['field']} = {r['default']!r}" for r in rows]
    width = max(map(len, names))
    return "\n".join(f"{name:<{width}}  {r['source']}" for name, r in zip(names, rows, strict=True))
