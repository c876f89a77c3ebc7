"""The benchmark scripts' own arguments: a mistake is one line and exit code 2, before any
model is trained."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "defense_cost.py"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "anp"], "NAME.KEY=VALUE"),
        (["--set", "fst.alpha=0.1"], "NAME one of ft, anp"),  # not among --defenses
        (["--set", "anp.iterations=0"], "iterations must be at least 1"),
        (["--set", "anp.bogus=1"], "unknown parameter 'bogus'"),
    ],
)
def test_defense_cost_rejects_a_bad_setting_in_one_line(args, message):
    command = [sys.executable, str(SCRIPT), "--quick", "--parts", "d", "--defenses", "ft,anp"]
    result = subprocess.run(command + args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in result.stderr
    assert "(d) each defense" not in result.stdout  # it stopped before training


@pytest.mark.parametrize(
    "args, message",
    [
        (["--families", "mask,patch"], "estimate families must be"),
        (["--defenses", "ft,nope"], "--defenses must name defenses"),
    ],
)
def test_estimate_cost_rejects_a_bad_argument_in_one_line(args, message):
    script = SCRIPT.with_name("estimate_cost.py")
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and result.stdout == ""  # nothing was trained
