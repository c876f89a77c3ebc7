"""Start-up time of the CLI's one-line answers — ``--help``, every ``<command> --help``,
``--version``, ``list`` of each kind and a refused spec — as a ratio to ``python -c "import
typer"`` (the CLI framework alone; target ≤ 3×), and which heavy packages each one imported.

    python benchmarks/cli_startup.py [--repeats 5] [--only list]

Each command runs ``--repeats`` times in a fresh interpreter, as the ``torchpurify`` script
does; the median wall time is reported. The heavy column comes from one more run that lists
the imported top-level packages among torch, ray, matplotlib, numpy, scipy and sklearn.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIST_KINDS = ("datasets", "models", "attacks", "defenses")
HEAVY = ("torch", "ray", "matplotlib", "numpy", "scipy", "sklearn")
# Runs the app as the console script does, then writes the heavy packages it imported.
PROBE = """
import atexit, json, os, sys
def heavy():
    names = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    with open(os.environ["HEAVY_OUT"], "w") as file:
        json.dump(names, file)
atexit.register(heavy)
from torchpurify.cli import app
sys.argv = ["torchpurify", *sys.argv[1:]]
app()
""".replace("set(HEAVY)", repr(set(HEAVY)))
MINIMAL_APP = """
import typer
app = typer.Typer()
@app.command()
def main(count: int = 1) -> None:
    pass
app()
"""
SPEC = "datasets: [digits]\nmodels: [small-cnn]\nattacks: [badnets]\ndefenses: [ft]\n"
# What a refused spec looks like: an unknown key, a value of the wrong kind, a value out of
# range, an unknown name, an unknown hyper-parameter.
BAD_SPECS = {
    "unknown-key": SPEC + "seedz: [0]\n",
    "bad-value": SPEC + "seeds: [-1]\n",
    "wrong-kind": SPEC + "defender_fraction: lots\n",
    "unknown-name": SPEC.replace("[ft]", "[gnf]"),
    "unknown-param": SPEC.replace("[ft]", "[{name: gnft, params: {alpah: 1}}]"),
}


def command_line() -> list[str]:
    """The installed ``torchpurify`` script beside this Python, else ``python -m``."""
    script = Path(sys.executable).with_name("torchpurify")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torchpurify.cli"]


def median_seconds(argv: list[str], repeats: int) -> tuple[float, int]:
    """Median wall time of ``argv`` over ``repeats`` runs, and its exit code."""
    times, code = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, timeout=300)
        times.append(time.perf_counter() - start)
        code = result.returncode
    return statistics.median(times), code


def heavy_imports(args: list[str], folder: Path) -> list[str]:
    out = folder / "heavy.json"
    environment = {**os.environ, "HEAVY_OUT": str(out)}
    subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, env=environment, timeout=300
    )
    return json.loads(out.read_text())


def commands(folder: Path) -> dict[str, list[str]]:
    """The label → arguments of every command measured."""
    from typer.main import get_command

    from torchpurify.cli import app

    names = sorted(get_command(app).commands)  # type: ignore[attr-defined]
    runs = {"--help": ["--help"], "--version": ["--version"]}
    runs |= {f"{name} --help": [name, "--help"] for name in names}
    runs |= {f"list {kind}": ["list", kind] for kind in LIST_KINDS}
    for label, text in BAD_SPECS.items():
        path = folder / f"{label}.yaml"
        path.write_text(text)
        runs[f"run ({label}).yaml"] = ["run", str(path)]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (median)")
    parser.add_argument("--only", default="", help="measure the commands containing this text")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    base, _ = median_seconds([sys.executable, "-c", "import typer"], args.repeats)
    print(f'python -c "import typer": {base:.3f} s (median of {args.repeats})')
    # The framework's own floor: typer builds a parameter's converter with pydantic on first use.
    floor, _ = median_seconds([sys.executable, "-c", MINIMAL_APP], args.repeats)
    print(f"a typer app running a one-option command: {floor:.3f} s ({floor / base:.1f}×)")
    print(f"{'command':<30}{'seconds':>9}{'ratio':>8}{'exit':>6}  heavy imports")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for label, argv in commands(Path(tmp)).items():
            if args.only not in label:
                continue
            seconds, code = median_seconds(command_line() + argv, args.repeats)
            heavy = ", ".join(heavy_imports(argv, Path(tmp))) or "none"
            worst = max(worst, seconds / base)
            print(f"{label:<30}{seconds:>9.3f}{seconds / base:>7.1f}×{code:>6}  {heavy}")
    print(f"worst ratio {worst:.1f}× (target ≤ 3×)")


if __name__ == "__main__":
    main()
