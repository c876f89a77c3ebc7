"""Every default names its source (issue 29; methods.md, "Where each default comes from").

Walks every field of every registered defense and of the backdoor estimate's settings. A source
must exist, be of a known kind, name only configs that exist, name only methods.md sections
that exist, and name no evaluation spec or seed (0–2) unless the field is on the explicit
PENDING_RECHOICE list of defaults still to be re-chosen on development cells. Run with ``-s``
to see the table of every field and its source, and the pending list.
"""

import re
from pathlib import Path

import pytest

from torchpurify.checks import default, source_of
from torchpurify.defenses import PENDING_RECHOICE, default_sources
from torchpurify.defenses.sources import KINDS, kind_of, sources_table

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"

CONFIG = re.compile(r"configs/[\w.-]+\.yaml")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)")
# What names an evaluation cell: an evaluation spec, the word, or a seed 0, 1 or 2 (not 100).
EVALUATION = re.compile(r"\beval-[\w-]+|\bevaluation\b|\bseeds? [0-2](?![\d.])")


def methods_sections() -> set[str]:
    """The numbers of methods.md's section headings: '0', '11.1', ..."""
    headings = re.findall(r"^#{2,4} (\d+(?:\.\d+)?)[.\s]", METHODS.read_text(), re.M)
    return set(headings)


def problems(row: dict, sections: set[str], pending: set[tuple[str, str]]) -> list[str]:
    """What is wrong with one row's source (empty when nothing is)."""
    where = f"{row['owner']}.{row['field']}"
    source = row["source"]
    if source is None:
        return [f"{where}: no source (use torchpurify.checks.default(value, source))"]
    found = []
    kind = kind_of(source)
    if kind is None:
        found.append(f"{where}: source of unknown kind {source!r}; kinds: {', '.join(KINDS)}")
    if kind not in (None, "run setting") and "§" not in source:
        found.append(f"{where}: names no methods.md section (§…) for {source!r}")
    for number in SECTION.findall(source):
        if number not in sections:
            found.append(f"{where}: methods.md has no section §{number} ({source!r})")
    for config in CONFIG.findall(source):
        if not (ROOT / config).is_file():
            found.append(f"{where}: {config} does not exist")
        elif kind == "dev:" and not Path(config).name.startswith("dev-"):
            found.append(f"{where}: a dev: source names {config}, not a development spec")
    names_evaluation = EVALUATION.search(source) is not None
    listed = (row["owner"], row["field"]) in pending
    if names_evaluation and not listed:
        found.append(
            f"{where}: names an evaluation spec or seed but is not on PENDING_RECHOICE ({source!r})"
        )
    if (kind == "pending:") != listed:
        found.append(
            f"{where}: a pending: source and a PENDING_RECHOICE entry go together ({source!r})"
        )
    return found


def test_every_default_names_a_true_kind_of_source():
    rows = default_sources()
    print("\nEvery default and its source:\n" + sources_table(rows))
    print("\nPENDING_RECHOICE (still to be re-chosen on development cells):")
    for owner, field in PENDING_RECHOICE:
        print(f"  {owner}.{field}")
    sections = methods_sections()
    found = [p for row in rows for p in problems(row, sections, set(PENDING_RECHOICE))]
    assert not found, "\n".join(found) + "\n\nThe table:\n" + sources_table(rows)


def test_pending_list_names_real_fields_once():
    fields = {(row["owner"], row["field"]) for row in default_sources()}
    assert len(set(PENDING_RECHOICE)) == len(PENDING_RECHOICE)
    assert set(PENDING_RECHOICE) <= fields


def test_every_registered_defense_the_estimate_and_auto_are_walked():
    from torchpurify.defenses import DEFENSES

    owners = {row["owner"] for row in default_sources()}
    assert owners == {*DEFENSES.names(), "estimate", "auto"}


def test_the_checker_catches_what_it_should():
    sections = methods_sections()
    assert {"0", "4", "11.1", "12.1", "6.9"} <= sections and "99.9" not in sections

    def check(source, owner_field=("x", "y"), pending=()):
        row = {"owner": owner_field[0], "field": owner_field[1], "default": 0, "source": source}
        return problems(row, sections, set(pending))

    assert check("paper: somebody's code, methods.md §6.2") == []
    assert check("run setting") == []
    assert check(None)  # missing
    assert check("folklore: methods.md §0")  # unknown kind
    assert check("paper: somebody's code")  # no section
    assert check("dev: methods.md §99.9")  # no such section
    assert check("dev: configs/dev-nothing.yaml, methods.md §11.5")  # no such config
    assert check("dev: configs/eval-image.yaml, methods.md §12.3")  # an evaluation spec
    assert check("dev: chosen on seed 0, methods.md §11.1")  # an evaluation seed
    assert check("dev: chosen on seeds 0-2, methods.md §11.2")
    assert check("dev: the evaluation grid, methods.md §12.3")
    assert check("dev: seeds 100-102, methods.md §11.5") == []  # development seeds are fine
    pending = "pending: chosen on evaluation seed 0 (methods.md §11.1)"
    assert check(pending)  # pending but not listed
    assert check(pending, pending=[("x", "y")]) == []
    assert check("paper: code, methods.md §2", pending=[("x", "y")])  # listed but not pending


def test_default_puts_the_source_in_the_field_metadata():
    from dataclasses import dataclass, fields

    @dataclass
    class Settings:
        alpha: float = default(0.2, "paper: code, methods.md §6.2")

    assert Settings().alpha == 0.2
    assert source_of(fields(Settings)[0]) == "paper: code, methods.md §6.2"
    with pytest.raises(ValueError):  # a mutable default is refused, as by dataclasses

        @dataclass
        class Bad:
            layers: list = default([], "protocol: methods.md §0")
