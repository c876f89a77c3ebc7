"""What the CLI tests share: invoking the app, and the one-line-error promise (exit 2)."""

from __future__ import annotations

from typer.testing import CliRunner

from torchpurify.cli import app


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments):
    """A user mistake ends in one line starting with 'error:', exit code 2; returns the line."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
