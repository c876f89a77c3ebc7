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


def _targets_module():
    import importlib.util

    path = SCRIPT.with_name("targets.py")
    spec = importlib.util.spec_from_file_location("targets", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["targets"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def _cell(attack, seed, label, dacc, asr, *, dataset="fashion-mnist", model="small-cnn",
          rolled=False, est=None):  # fmt: skip
    clean = attack == "none"
    guard = {"action": "rolled back to the input model" if rolled else "kept",
             "holdout_acc_input": 0.9, "attempts": [{"holdout_acc": 0.89}]}  # fmt: skip
    row = {
        "dataset": dataset, "model": model, "attack": attack, "attack_params": {},
        "poison_rate": None if clean else 0.1, "target_mode": None if clean else "all-to-one",
        "seed": seed, "label": label, "defense": label, "model_key": f"{attack}-{seed}",
        "finished_at": f"2026-12-0{seed + 1}T12:00:00", "acc_before": 0.9,
        "acc_after": 0.9 + dacc / 100, "asr_before": None if clean else 1.0,
        "asr_after": None if clean else asr, "der": None if clean else (1 - asr) / 2 + 0.5,
        "seconds": 10.0, "log": {"guard": guard},
    }  # fmt: skip
    if est is not None:
        flag = lambda v: {"est_asr": v, "flagged": v >= 0.5, "family": "mask",  # noqa: E731
                          "label": 0, "families": {}}  # fmt: skip
        row["estimate"] = {"before": flag(est[0]), "after": flag(est[1])}
    return row


def test_targets_read_a_store_by_its_rules():
    """The acceptance targets (benchmarks/targets.py): the best default is the lowest ASR within
    2 points (a cheaper-looking removal over budget does not count); a clean model's costs, the
    guard's rollbacks and the estimate's false all-clears decide their targets."""
    targets = _targets_module().targets
    cells = []
    for seed in (0, 1):
        cells += [
            _cell("badnets", seed, "ft", -0.5, 0.90, est=(0.9, 0.8)),
            _cell("badnets", seed, "gnft", -1.5, 0.02 + 0.02 * seed, est=(0.9, 0.1)),
            _cell("badnets", seed, "linf-pruning", -3.0, 0.0, rolled=seed == 0, est=(0.9, 0.1)),
            _cell("blended", seed, "ft", -0.5, 0.95, est=(0.2, 0.1)),  # a false all-clear
            _cell("none", seed, "ft", -0.5, None),
            _cell("none", seed, "gnft", -1.5, None),
        ]
    found = {t.name: t for t in targets([], cells)}
    best = next(t for t in targets([], cells) if "badnets" in t.name and "best default" in t.name)
    assert best.met and best.value.startswith("gnft 0.030 at -1.5")
    blended = next(t for t in targets([], cells) if "blended" in t.name and "best" in t.name)
    assert not blended.met and "ft 0.950" in blended.value
    assert not found["small-cnn clean model: every default costs ≤ 1 test point"].met
    rollbacks = found["no default rolled back on more than a quarter of its cells"]
    assert not rollbacks.met and "linf-pruning 1/2" in rollbacks.value
    clears = found["false all-clears ≤ 5 % of backdoored cells"]
    assert clears.value == "2 of 8" and not clears.met
    # auto's runs are not a "default": the best default stays gnft
    cells += [_cell("badnets", s, "auto", -0.1, 0.0) for s in (0, 1)]
    best = next(t for t in targets([], cells) if "badnets" in t.name and "best default" in t.name)
    assert best.value.startswith("gnft")
    auto = next(t for t in targets([], cells) if "auto's mean DER" in t.name)
    assert auto.met


def test_targets_compare_the_estimate_with_the_median_defense_of_its_model():
    """The estimate before ÷ the median defense seconds on its model (auto left out)."""
    module = _targets_module()
    cells = []
    for label, seconds in (("ft", 10.0), ("gnft", 30.0), ("linf-pruning", 50.0), ("auto", 900.0)):
        cell = _cell("badnets", 0, label, -1.0, 0.1, est=(0.9, 0.1))
        cell["seconds"] = seconds
        cell["estimate"]["before"]["seconds"] = 60.0
        cell["estimate"]["after"]["seconds"] = 3.0
        cells.append(cell)
    before, after = module.cost_targets("images", cells)
    assert before.value.startswith("median 2.00") and not before.met  # 60 s ÷ median 30 s
    assert after.value == "median 0.10 over 3 cells"
