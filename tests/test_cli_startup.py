"""The CLI's one-line answers (``--help``, every ``<command> --help``, ``--version``, ``list``
of each kind, a refused spec) import no torch, Ray, numpy-heavy stack or matplotlib; the
catalogue they read instead equals the live registries; the light pass of a spec refuses a
mistake with the full pass's own words and accepts every committed spec."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from torchpurify import catalogue
from torchpurify.cli import app
from torchpurify.spec import Reader, SpecError, read_yaml

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "ray", "matplotlib", "numpy", "scipy", "sklearn", "pandas", "soundfile"]
SPEC = "datasets: [digits]\nmodels: [small-cnn]\nattacks: [badnets]\ndefenses: [ft]\n"
# Mistakes the first (light) pass refuses, with a fragment of each one's line.
BAD_SPECS = {
    "unknown-key": (SPEC + "seedz: [0]\n", "unknown key 'seedz' (did you mean seeds?)"),
    "bad-seed": (SPEC + "seeds: [-1]\n", "seeds[0]: must be an integer in 0.."),
    "bad-fraction": (SPEC + "defender_fraction: 2\n", "defender_fraction: must be in (0, 1)"),
    "wrong-kind": (SPEC + "defender_fraction: lots\n", "must be a number, got 'lots'"),
    "bad-device": (SPEC + "device: tpu\n", "device: must be auto, cpu or cuda[:N]"),
    "unknown-dataset": (SPEC.replace("[digits]", "[digitz]"), "unknown dataset 'digitz'"),
    "unknown-model": (SPEC.replace("[small-cnn]", "[smal-cnn]"), "unknown model 'smal-cnn'"),
    "unknown-attack": (SPEC.replace("[badnets]", "[badnet]"), "unknown attack 'badnet'"),
    "unknown-defense": (SPEC.replace("[ft]", "[gnf]"), "unknown defense 'gnf'"),
    "unknown-param": (
        SPEC.replace("[ft]", "[{name: gnft, params: {alpah: 1}}]"),
        "defenses[0].params: unknown parameter 'alpah' for gnft (did you mean alpha?)",
    ),
    "param-kind": (
        SPEC.replace("[ft]", "[{name: gnft, params: {alpha: high}}]"),
        "defenses[0].params.alpha: must be a number, got 'high'",
    ),
    "auto-param": (  # the auto chooser (issue 28) is a defense of a spec, its settings checked
        SPEC.replace("[ft]", "[{name: auto, params: {ordr: ft}}]"),
        "defenses[0].params: unknown parameter 'ordr' for auto (did you mean order?)",
    ),
    "trigger-param": (
        SPEC.replace("[badnets]", "[{name: badnets, params: {sise: 3}}]"),
        "attacks[0].params: unknown parameter 'sise' for badnets",
    ),
    "training": (SPEC + "training: {epochz: 2}\n", "unknown training setting 'epochz'"),
    "estimate": (SPEC + "estimate: {steps: many}\n", "estimate.steps: must be an integer"),
}
# Runs each command through the app in one fresh interpreter, in order, and records its exit
# code, its output and the heavy packages imported so far; then reads every committed spec
# with the light pass. Prints the records as JSON.
PROBE = """
import json, sys
from pathlib import Path
from typer.testing import CliRunner
from torchpurify.cli import app
from torchpurify.spec import Reader, read_yaml
heavy, commands, configs = json.loads(sys.argv[1])
def loaded():
    return sorted({name.split(".")[0] for name in sys.modules} & set(heavy))
records = []
for args in commands:
    result = CliRunner().invoke(app, args)
    records.append({"args": args, "code": result.exit_code, "output": result.output,
                    "heavy": loaded()})
for path in configs:
    Reader(path, light=True).spec(read_yaml(Path(path).read_text(), path))
records.append({"args": ["light pass of configs/*.yaml"], "code": 0, "output": "",
                "heavy": loaded()})
print(json.dumps(records))
"""


def command_names() -> list[str]:
    return sorted(get_command(app).commands)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """What each one-line answer printed and imported, from one fresh interpreter."""
    folder = tmp_path_factory.mktemp("specs")
    commands = [["--help"], ["--version"]]
    commands += [[name, "--help"] for name in command_names()]
    commands += [["list", kind] for kind in catalogue.KINDS]
    for label, (text, _) in BAD_SPECS.items():
        (folder / f"{label}.yaml").write_text(text)
        commands.append(["run", str(folder / f"{label}.yaml")])
    configs = [str(path) for path in sorted((ROOT / "configs").glob("*.yaml"))]
    argument = json.dumps([HEAVY, commands, configs])
    result = subprocess.run(
        [sys.executable, "-c", PROBE, argument],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {" ".join(record["args"]): record for record in json.loads(result.stdout)}


def test_no_one_line_answer_imports_torch_or_another_heavy_stack(records):
    assert len(records) == 2 + len(command_names()) + len(catalogue.KINDS) + len(BAD_SPECS) + 1
    for command, record in records.items():
        assert record["heavy"] == [], f"{command!r} imported {record['heavy']}"


def test_help_version_and_list_answer(records):
    assert records["--help"]["code"] == 0 and "list" in records["--help"]["output"]
    for name in command_names():
        assert records[f"{name} --help"]["code"] == 0, records[f"{name} --help"]["output"]
    assert records["--version"]["code"] == 0
    assert records["--version"]["output"].strip() == f"torchpurify {version('torchpurify')}"
    for kind in catalogue.KINDS:
        record = records[f"list {kind}"]
        assert record["code"] == 0
        for name in catalogue.static()[kind]:
            assert name in record["output"], f"list {kind} lacks {name}"


def test_a_refused_spec_is_one_line_and_exit_code_2(records):
    for label, (_, fragment) in BAD_SPECS.items():
        (record,) = [r for c, r in records.items() if c.endswith(f"{label}.yaml")]
        lines = [line for line in record["output"].splitlines() if line.strip()]
        assert record["code"] == 2, record["output"]
        assert len(lines) == 1 and lines[0].startswith("error:"), record["output"]
        assert fragment in " ".join(record["output"].split()), record["output"]


def test_the_catalogue_equals_the_live_registries():
    """catalogue.json is a copy of the registries: after adding or changing a dataset, model,
    attack, defense or setting, rewrite it with `python -m torchpurify.catalogue`."""
    stored, live = catalogue.static(), catalogue.live()
    hint = "catalogue.json is stale: run `python -m torchpurify.catalogue`"
    assert list(stored) == list(live), hint
    for part in live:
        assert stored[part] == live[part], f"{hint} ({part} differ)"
        assert list(stored[part]) == list(live[part]), f"{hint} (the order of {part})"


@pytest.mark.parametrize("label", sorted(BAD_SPECS))
def test_the_light_pass_refuses_in_the_full_pass_words(label):
    """The first pass (no torch) finds the mistake the full pass would, and says it the same
    way; here the registries are loaded, so both passes read them — the fresh interpreter
    above reads the catalogue."""
    text, fragment = BAD_SPECS[label]
    data = read_yaml(text, "bad.yaml")
    with pytest.raises(SpecError) as light:
        Reader("bad.yaml", light=True).spec(data)
    with pytest.raises(SpecError) as full:
        Reader("bad.yaml").spec(data)
    assert str(light.value) == str(full.value)
    assert fragment in str(light.value)


def test_the_light_pass_leaves_ranges_of_the_live_classes_to_the_full_pass():
    """A defense's own range, the poisoning's and the training recipe's need their classes: the
    light pass lets them through and the full pass refuses them."""
    for text in (
        SPEC.replace("[ft]", "[{name: gnft, params: {lr: -1}}]"),
        SPEC.replace("[badnets]", "[{name: badnets, poison_rate: 2}]"),
        SPEC + "training: {epochs: 0}\n",
    ):
        data = read_yaml(text, "spec.yaml")
        assert Reader("spec.yaml", light=True).spec(data) is None
        with pytest.raises(SpecError):
            Reader("spec.yaml").spec(data)


# Runs the app as the console script does; at exit, writes the top-level packages it loaded.
LOADED_PROBE = """
import atexit, sys
def loaded():
    names = sorted({name.split(".")[0] for name in sys.modules})
    sys.__stderr__.write("\\nloaded: " + " ".join(names) + "\\n")
atexit.register(loaded)
from torchpurify.cli import app
sys.argv = ["torchpurify", *sys.argv[1:]]
app()
"""


@pytest.mark.parametrize("kind", ["defenses", "run"])
def test_the_quick_answers_skip_pydantic_and_say_what_typer_says(tmp_path, kind):
    """`list KIND` and a refused `run SPEC` are answered before typer converts an option (its
    converters import pydantic): no pydantic is loaded, and the answer is the one typer's path
    gives to the same line spelled otherwise (`list -- KIND`, `run --progress SPEC`)."""
    spec = tmp_path / "bad.yaml"
    spec.write_text(BAD_SPECS["unknown-key"][0])
    quick = ["list", kind] if kind != "run" else ["run", str(spec)]
    spelled = ["list", "--", kind] if kind != "run" else ["run", "--progress", str(spec)]
    result = subprocess.run(
        [sys.executable, "-c", LOADED_PROBE, *quick], capture_output=True, text=True, timeout=300
    )
    loaded = result.stderr.rsplit("loaded: ", 1)[1].split()
    assert "typer" in loaded and "pydantic" not in loaded, result.stderr
    answers = [CliRunner().invoke(app, args) for args in (quick, spelled)]
    assert answers[0].exit_code == answers[1].exit_code == (2 if kind == "run" else 0)
    assert answers[0].output == answers[1].output and answers[0].output.strip()
