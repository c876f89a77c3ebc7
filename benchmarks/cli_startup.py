"""Start-up time of the CLI's one-line answers — ``--help``, every ``<command> --help``,
``--version``, ``list`` of each kind and a refused spec — as a ratio to ``python -c "import
typer"`` (the CLI framework alone; target ≤ 3×), and which heavy packages each one imported.

    python benchmarks/cli_startup.py [--repeats 5] [--only list]

Each command runs ``--repeats`` times in a fresh interpreter, as the ``torchpurify`` script
does, each run paired with one of ``python -c "import typer"`` so that both see the same load
on a shared machine; the ratios are of the medians, of wall time and of CPU time (user + system,
which other processes disturb less). The heavy column comes from one more run that lists the
imported top-level packages among torch, ray, matplotlib, numpy, scipy and sklearn.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
BASELINE = [sys.executable, "-c", "import typer"]
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


def timed(argv: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and exit code of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, timeout=300)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, result.returncode


def paired(argv: list[str], repeats: int) -> dict[str, float]:
    """Medians of ``argv`` and of the baseline, run in turns; the exit code of ``argv``."""
    runs = [(timed(BASELINE), timed(argv)) for _ in range(repeats)]
    return {
        "base": statistics.median(base[0] for base, _ in runs),
        "base_cpu": statistics.median(base[1] for base, _ in runs),
        "wall": statistics.median(run[0] for _, run in runs),
        "cpu": statistics.median(run[1] for _, run in runs),
        "code": runs[-1][1][2],
    }


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
    # The framework's own floor: typer builds a parameter's converter with pydantic on first use.
    floor = paired([sys.executable, "-c", MINIMAL_APP], args.repeats)
    print(
        f'python -c "import typer": {floor["base"]:.3f} s wall, {floor["base_cpu"]:.3f} s CPU '
        f"(medians of {args.repeats}); a typer app running a one-int-option command: "
        f"{floor['wall'] / floor['base']:.1f}× wall, {floor['cpu'] / floor['base_cpu']:.1f}× CPU"
    )
    print(f"{'command':<30}{'wall s':>8}{'ratio':>7}{'CPU s':>8}{'ratio':>7}{'exit':>6}  heavy")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for label, argv in commands(Path(tmp)).items():
            if args.only not in label:
                continue
            m = paired(command_line() + argv, args.repeats)
            ratio, cpu_ratio = m["wall"] / m["base"], m["cpu"] / m["base_cpu"]
            heavy = ", ".join(heavy_imports(argv, Path(tmp))) or "none"
            worst = max(worst, ratio)
            print(
                f"{label:<30}{m['wall']:>8.3f}{ratio:>6.1f}×{m['cpu']:>8.3f}{cpu_ratio:>6.1f}×"
                f"{m['code']:>6}  {heavy}"
            )
    print(f"worst wall ratio {worst:.1f}× (target ≤ 3×)")


if __name__ == "__main__":
    main()
