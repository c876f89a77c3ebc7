"""Every default names its source (issue 29; methods.md, "Where each default comes from").

Walks every field of every registered defense and of the backdoor estimate's settings. A source
must exist, be of a known kind, name only configs that exist, name only methods.md sections
that exist, and name no evaluation spec or seed (0–2) unless the field is on the explicit
PENDING_RECHOICE list of defaults still to be re-chosen on development cells. Run with ``-s``
to see the table of every field and its source, and the pending list.

How "methods.md §N" resolves (docs/methods.md, "Where each section is now"): the methods
specification is split into one page per method, so a cited §N is the numbered heading
("## N. Title", "### N.M Title") of docs/methods.md, docs/methods/*.md or docs/notebook.md, and
each number is a heading in exactly one of those files.
"""

import re
from pathlib import Path

import pytest

from torchpurify.checks import default, source_of
from torchpurify.defenses import PENDING_RECHOICE, default_sources
from torchpurify.defenses.sources import KINDS, kind_of, sources_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Where a "methods.md §N" may live: the index, the per-method pages and the dated notebook.
METHODS_PAGES = ("methods.md", "methods/*.md", "notebook.md")

CONFIG = re.compile(r"configs/[\w.-]+\.yaml")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)")
# What names an evaluation cell: an evaluation spec, the word, or a seed 0, 1 or 2 (not 100).
EVALUATION = re.compile(r"\beval-[\w-]+|\bevaluation\b|\bseeds? [0-2](?![\d.])")


HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)?)[.\s]", re.M)


def section_pages() -> dict[str, list[str]]:
    """Each numbered section heading ('0', '11.1', ...) and the docs pages that hold it."""
    found: dict[str, list[str]] = {}
    for pattern in METHODS_PAGES:
        for page in sorted(DOCS.glob(pattern)):
            for number in HEADING.findall(page.read_text(encoding="utf-8")):
                found.setdefault(number, []).append(page.relative_to(DOCS).as_posix())
    return found


def methods_sections() -> set[str]:
    """The numbers a "methods.md §N" may cite: the numbered headings of METHODS_PAGES."""
    return set(section_pages())


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


def test_every_section_number_lives_on_one_page_and_the_index_lists_it():
    pages = section_pages()
    twice = {number: where for number, where in pages.items() if len(where) > 1}
    assert not twice, f"a § number is a heading on more than one page: {twice}"
    moved = {n for n, where in pages.items() if where != ["methods.md"]}
    index = (DOCS / "methods.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| (\d+(?:\.\d+)?) \| \[", index, re.M))
    assert moved <= listed, f"docs/methods.md lacks {sorted(moved - listed)}: make docs-pages"
    # the sections the code cites most sit where the index says
    assert pages["12.2"] == ["methods/estimate.md"] and pages["12.11"] == ["notebook.md"]


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
