"""The README's results tables are written from the committed stores (issue: numbers anyone
can rebuild): each marked table equals what ``torchpurify report --readme`` builds, and a
one-digit edit of a table is caught."""

import shutil
from pathlib import Path

import pytest

from torchpurify.errors import UserError
from torchpurify.report import readme_tables, sync_readme

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_every_readme_results_table_matches_its_store():
    text = README.read_text(encoding="utf-8")
    rebuilt, stores = readme_tables(README)
    assert {"docs/results/eval-image/results.db", "docs/results/eval-audio/results.db"} <= set(
        stores
    )
    assert rebuilt == text, (
        "README results tables differ: run torchpurify report --readme README.md"
    )


def test_a_one_digit_edit_of_a_table_fails_the_check(tmp_path):
    copy = tmp_path / "README.md"
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- results:")
    row = text.index("\n| ft |", start) + 1
    digit = next(i for i in range(row, len(text)) if text[i].isdigit() and text[i] != "0")
    edited = text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1 :]
    copy.write_text(edited, encoding="utf-8")
    for store in ("eval-image", "eval-audio"):
        (tmp_path / "docs" / "results" / store).mkdir(parents=True)
        shutil.copy(ROOT / "docs/results" / store / "results.db", tmp_path / "docs/results" / store)
    line = edited[:digit].count("\n") + 1
    with pytest.raises(UserError, match=rf"README.md:{line} differs from its results store"):
        sync_readme(copy, check_only=True)
    sync_readme(copy)  # rebuilding puts the store's number back
    assert copy.read_text(encoding="utf-8") == text


def test_the_cli_checks_the_readme_and_refuses_a_report_without_a_store():
    from typer.testing import CliRunner

    from torchpurify.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["report", "--readme", str(README), "--check"])
    assert result.exit_code == 0 and "2 table(s) matches" in result.output
    refused = runner.invoke(app, ["report"])
    assert refused.exit_code == 2 and "needs a results store and --out DIR" in refused.output
