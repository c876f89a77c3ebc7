"""Write (or, with --check, verify) the generated parts of the docs pages.

Two kinds of block, each between an opening and a closing HTML comment:

- ``<!-- defaults: OWNER -->`` … ``<!-- /defaults -->`` in docs/methods/*.md: the table of every
  field of OWNER (a registered defense, ``estimate`` or ``auto``) with its default and its
  source, from ``torchpurify.defenses.default_sources()`` — the same table
  ``pytest tests/test_default_sources.py -s`` prints;
- ``<!-- sections -->`` … ``<!-- /sections -->`` in docs/methods.md: where each numbered section
  ("methods.md §N" in code, tests and docs) lives now, read from the numbered headings of
  docs/methods/*.md and docs/notebook.md;

and docs/index.md, the site's home page: README.md with its links made relative to docs/.

    python docs/tools/pages.py           # rewrite the blocks
    python docs/tools/pages.py --check   # change nothing; exit 1 naming the first stale block

``make docs`` runs the check before building the site; ``make docs-pages`` rewrites.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
PAGES = sorted((DOCS / "methods").glob("*.md")) + [DOCS / "notebook.md"]
INDEX = DOCS / "methods.md"
README = DOCS.parent / "README.md"
HOME = DOCS / "index.md"
HOME_NOTE = "<!-- generated from README.md by `make docs-pages`: edit the README, not this -->\n"

DEFAULTS = re.compile(
    r"(<!-- defaults: (?P<owner>[\w-]+) -->\n)(?P<body>.*?)(<!-- /defaults -->)", re.S
)
SECTIONS = re.compile(r"(<!-- sections -->\n)(?P<body>.*?)(<!-- /sections -->)", re.S)
HEADING = re.compile(r"^#{2,4} (?P<num>\d+(?:\.\d+)?)[.\s]\s*(?P<title>.*)$", re.M)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def shown(value) -> str:
    if value is dataclasses.MISSING:
        return "(empty: built per run)"
    return f"`{value!r}`"


def defaults_table(owner: str, rows: list[dict]) -> str:
    mine = [r for r in rows if r["owner"] == owner]
    if not mine:
        raise SystemExit(f"docs: no fields for {owner!r} in torchpurify.defenses.default_sources")
    hyper = [r for r in mine if r["kind"] != "run setting"]
    runs = [r for r in mine if r["kind"] == "run setting"]
    lines = ["| field | default | source |", "|---|---|---|"]
    for r in hyper:
        source = cell(r["source"] or "—")
        lines.append(f"| `{r['field']}` | {cell(shown(r['default']))} | {source} |")
    if runs:
        listed = ", ".join(f"`{r['field']}` {shown(r['default'])}" for r in runs)
        lines += ["", f"Run settings (how a run is executed, not hyper-parameters): {listed}."]
    return "\n".join(lines) + "\n"


def sections() -> list[tuple[str, str, Path]]:
    found = []
    for page in PAGES:
        for m in HEADING.finditer(page.read_text(encoding="utf-8")):
            found.append((m["num"], m["title"].strip(), page))
    return sorted(found, key=lambda s: [int(p) for p in s[0].split(".")])


def sections_table() -> str:
    lines = ["| § | section | page |", "|---|---|---|"]
    for num, title, page in sections():
        rel = page.relative_to(DOCS).as_posix()
        anchor = "s" + num.replace(".", "-")
        lines.append(f"| {num} | [{cell(title)}]({rel}#{anchor}) | `docs/{rel}` |")
    return "\n".join(lines) + "\n"


def home() -> str:
    """README.md as the site's home page: links into docs/ lose their prefix, links to files
    outside docs/ (configs/...) become code, and the README's own name points home."""
    text = README.read_text(encoding="utf-8")
    text = text.replace("](docs/", "](")
    text = re.sub(r"\[`([^`]+)`\]\((?!https?:)(?!#)([^)]+)\)", _outside, text)
    return HOME_NOTE + text


def _outside(m: re.Match) -> str:
    target = m.group(2).split("#")[0]
    return m.group(0) if (DOCS / target).exists() else f"`{m.group(1)}`"


def rebuilt(path: Path, rows: list[dict] | None) -> str:
    if path == HOME:
        return home()
    text = path.read_text(encoding="utf-8")
    if rows is not None:
        text = DEFAULTS.sub(
            lambda m: m.group(1) + defaults_table(m["owner"], rows) + m.group(4), text
        )
    if path == INDEX:
        text = SECTIONS.sub(lambda m: m.group(1) + sections_table() + m.group(3), text)
    return text


def main(argv: list[str]) -> int:
    check = "--check" in argv
    sys.path.insert(0, str(DOCS.parent / "src"))
    from torchpurify.defenses import default_sources

    rows = default_sources()
    stale = []
    for path in [HOME, INDEX, *PAGES]:
        new = rebuilt(path, rows)
        if not path.exists() or new != path.read_text(encoding="utf-8"):
            stale.append(path)
            if not check:
                path.write_text(new, encoding="utf-8")
    rel = [p.relative_to(DOCS.parent).as_posix() for p in stale]
    if check and stale:
        print(f"docs: generated tables are stale in {', '.join(rel)}; run `make docs-pages`")
        return 1
    if check:
        print(f"docs: the generated tables of {2 + len(PAGES)} pages are up to date")
    else:
        print(f"docs: rewrote {len(rel)} of {2 + len(PAGES)} pages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
