"""The defender-side backdoor estimate (methods.md §12): trigger inversion on the clean holdout
before and after purification."""

import copy
import dataclasses

import pytest
import torch

from tests.conftest import TINY_CLASSES, TINY_SHAPE, gratings
from tests.test_neurons_generator import warped  # noqa: F401 (a fixture)
from tests.test_neurons_perturbation import blended  # noqa: F401 (a fixture)
from torchpurify.data.base import Split
from torchpurify.errors import UserError
from torchpurify.estimate import (
    FAMILIES,
    Estimate,
    EstimateConfig,
    FamilyEstimate,
    compare,
    estimate_backdoor,
)
from torchpurify.metrics import evaluate
from torchpurify.models import build_model
from torchpurify.neurons import default_neuron_layer, invert_triggers, mask_channels
from torchpurify.neurons.inversion import invert_capped, trigger_success
from torchpurify.neurons.stats import activation_stats
from torchpurify.train import TrainConfig, fit

# The tiny task's 3×3 patch is 6 % of a 12×12 image (1 % of a 28×28 one): a wider budget.
CHEAP = EstimateConfig(steps=150, capped_steps=60, batch_size=32, budget=0.5, families=("mask",))
# The radius families with the test ladder of tests/test_neurons_perturbation.py (the tiny
# tasks' natural radii are ≈ 1: start at 1/8, 10 steps a rung, 128 fitting samples).
RADII = EstimateConfig(
    families=("perturbation", "generator"), ladder_start=1 / 8, ladder_steps=10, fit_samples=128
)


@pytest.fixture(scope="module")
def tiny_clean():
    """small-cnn trained on the clean gratings task of ``tiny_backdoor``, same recipe."""
    torch.manual_seed(0)
    model = build_model("small-cnn", TINY_SHAPE, TINY_CLASSES)
    fit(model, gratings(2000, seed=0), TrainConfig(epochs=4, batch_size=64, lr=0.05,
                                                   progress=False, device="cpu"))  # fmt: skip
    model.eval()
    assert evaluate(model, gratings(800, seed=1)).acc > 0.9
    return model, gratings(300, seed=2)


def remove_backdoor(tiny):
    """A defense that works, by construction: mask the channels the true trigger raises most
    (oracle pruning; the estimate never sees the trigger)."""
    model = copy.deepcopy(tiny.model)
    layer = default_neuron_layer(model, tiny.holdout.x[:1])
    clean = activation_stats(model, layer, tiny.holdout).mean
    rise = activation_stats(model, layer, tiny.holdout, transform=tiny.trigger).mean - clean
    mask_channels(model, layer, rise.argsort(descending=True)[: len(rise) // 2].tolist())
    return model


def test_estimate_finds_the_target_and_its_asr_drops_after_purification(tiny_backdoor):
    tiny = tiny_backdoor
    model = copy.deepcopy(tiny.model)
    before = estimate_backdoor(model, tiny.holdout, CHEAP)
    assert before.label == tiny.target and before.flagged and before.nc_target == tiny.target
    assert before.est_asr > 0.8 and before.anomaly_index > 2
    assert before.trigger_size < 0.5 * before.reference_size
    assert len(before.mask_norms) == TINY_CLASSES and before.seconds > 0
    for a, b in zip(model.state_dict().values(), tiny.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the estimate does not change the model

    purified = remove_backdoor(tiny)
    true_after = evaluate(purified, tiny.test, tiny.trigger, target=0, num_classes=TINY_CLASSES)
    assert true_after.asr < 0.2 and true_after.acc > 0.85  # the defense did work
    after = estimate_backdoor(purified, tiny.holdout, CHEAP, before=before)
    assert after.label == before.label and after.budget == before.budget
    assert after.reference_size == before.reference_size
    assert after.est_asr < 0.5 < before.est_asr and not after.flagged
    assert after.trigger_size > 2 * before.trigger_size
    record = compare(before, after)
    assert record["removed"] and record["size_growth"] > 2
    assert Estimate.from_dict(record["after"]) == after


def test_estimate_does_not_flag_a_clean_model(tiny_clean):
    model, holdout = tiny_clean
    estimate = estimate_backdoor(model, holdout, CHEAP)
    assert not estimate.flagged and estimate.est_asr < 0.5
    assert estimate.size_ratio > 0.5  # no shortcut much smaller than the other labels'


def test_capped_trigger_obeys_its_budget_and_the_estimate_sees_only_its_data(tiny_backdoor):
    tiny = tiny_backdoor
    trigger = invert_capped(tiny.model, tiny.holdout, 0, budget=5.0, steps=20, batch_size=32)
    assert float(trigger.mask.sum()) <= 5.0 + 1e-4 and trigger.mask.shape == (1, 12, 12)
    assert 0 <= float(trigger.pattern.min()) and float(trigger.pattern.max()) <= 1
    rate = trigger_success(tiny.model, tiny.holdout, 0, tiny.trigger)
    assert rate > 0.9  # the true trigger, measured on the holdout

    class Watched(Split):
        seen: list = []

        def subset(self, indices):
            Watched.seen.append(len(indices))
            return super().subset(indices)

    holdout = Watched(tiny.holdout.x, tiny.holdout.y)
    estimate_backdoor(tiny.model, holdout, dataclasses.replace(CHEAP, steps=5, capped_steps=5))
    assert Watched.seen == [len(holdout) // 2, len(holdout) - len(holdout) // 2]


def test_estimate_works_on_waveforms(wave_net):
    generator = torch.Generator().manual_seed(0)
    data = Split(torch.rand(60, 64, generator=generator) * 2 - 1, torch.arange(60) % 3)
    config = EstimateConfig(
        steps=10, capped_steps=10, ladder_steps=5, fit_samples=32, mask_steps=5
    )  # every family, a few steps each
    estimate = estimate_backdoor(wave_net, data, config)
    assert set(estimate.families) == set(FAMILIES) and estimate.family in FAMILIES
    mask = estimate.of("mask")
    assert mask.label in (0, 1, 2) and len(mask.sizes) == 3
    assert 0 <= estimate.est_asr <= 1 and mask.budget == pytest.approx(0.08 * mask.reference_size)
    assert estimate.est_asr == max(r["est_asr"] for r in estimate.families.values())
    after = estimate_backdoor(wave_net, data, config, before=estimate)
    same = estimate.in_family(after.family)  # every family that flagged is re-checked
    assert set(after.families) == set(estimate.rechecked) and after.family in estimate.rechecked
    assert after.label == same.label and after.reference_size == same.reference_size
    inversion = invert_triggers(wave_net, data, labels=[0], steps=5)
    assert inversion.masks.shape == (1, 64)


@pytest.mark.parametrize(
    ("field", "value"), [("steps", 0), ("capped_steps", -1), ("budget", 0.0), ("budget", 2.0)]
)
def test_bad_settings_are_one_clear_error(field, value):
    with pytest.raises(UserError, match=f"estimate {field}"):
        EstimateConfig(**{field: value})


def test_purify_model_records_the_estimate_on_the_holdout_and_reuses_the_one_before(
    tmp_path, monkeypatch
):
    from torchpurify import estimate as estimate_module
    from torchpurify import experiment
    from torchpurify.defenses import build_defense

    data = experiment.DataSpec("digits", seed=100)
    attack = experiment.AttackSpec("badnets")
    config = TrainConfig(epochs=3, batch_size=64, lr=0.05, progress=False, device="cpu")
    trained = experiment.train_model(data, "small-cnn", attack, config)
    seen = []

    def spy(real):
        def counted(model, holdout, *args, **kwargs):
            seen.append(len(holdout))
            return real(model, holdout, *args, **kwargs)

        return counted

    for name in ("estimate_before", "estimate_after"):  # as the runner calls them
        counted = spy(getattr(estimate_module, name))
        monkeypatch.setattr(experiment, name, counted)
        monkeypatch.setattr(estimate_module, name, counted)
    settings = EstimateConfig(steps=20, capped_steps=10, families=("mask",))
    cache = tmp_path / "estimate-before.json"
    for _ in range(2):
        result = experiment.purify_model(
            trained.model, trained.card, build_defense("ft", epochs=1, device="cpu"),
            defender_fraction=0.2, estimate=settings, estimate_cache=cache,
        )  # fmt: skip
    holdout = result.card["defense"]["holdout_size"]
    assert seen == [holdout] * 3  # before once (then read from the cache), after twice
    record = result.card["estimate"]
    assert record == result.estimate and record["config"] == settings.to_dict()
    assert record["before"]["label"] == record["after"]["label"]
    assert 0 <= record["after"]["est_asr"] <= 1 and cache.is_file()


def test_purify_command_prints_the_estimate_and_can_skip_it(tmp_path):
    import json

    from typer.testing import CliRunner

    from torchpurify.cli import app

    def run(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    model = tmp_path / "m"
    run("train", "--dataset", "digits", "--model", "small-cnn", "--attack", "badnets",
        "--epochs", 3, "--no-progress", "--out", model)  # fmt: skip
    common = ("--threads", 1, "purify", "--model", model, "--defense", "ft", "--set", "epochs=1",
              "--defender-fraction", 0.2, "--no-progress")  # fmt: skip
    text = run(*common, "--out", tmp_path / "a")
    assert "backdoor estimate (clean holdout only), before:" in text and "estimated ASR" in text
    card = json.loads((tmp_path / "a" / "model.json").read_text())
    assert set(card["estimate"]["before"]) >= {"label", "anomaly_index", "trigger_size", "est_asr"}
    quiet = run(*common, "--no-estimate", "--json", "--out", tmp_path / "b")
    assert json.loads(quiet.strip().splitlines()[-1])["estimate"] is None


def test_a_store_of_the_older_layout_gains_the_estimate_columns(tmp_path):
    import sqlite3

    from torchpurify.store import CELL_COLUMNS, SCHEMA, Store

    # The cells table as first released: without the last six columns (the estimate's three,
    # the weights' hash, then the run context and the guard settings).
    cells = SCHEMA.index("CREATE TABLE IF NOT EXISTS cells")
    head, tail = SCHEMA[:cells], SCHEMA[cells:]
    lines = [line for line in tail.splitlines() if "estimate TEXT" not in line
             and "est_asr_before REAL" not in line and "weights_sha256" not in line
             and "run_context" not in line and "guard_settings" not in line]  # fmt: skip
    old = head + "\n".join(lines).replace("finished_at TEXT NOT NULL,", "finished_at TEXT NOT NULL")
    connection = sqlite3.connect(tmp_path / "old.db")
    connection.executescript(old)
    connection.close()
    with Store(tmp_path / "old.db", readonly=True) as store:
        assert store.cells() == []  # read as it is, nothing written
    found = [r[1] for r in sqlite3.connect(tmp_path / "old.db").execute("PRAGMA table_info(cells)")]
    assert found == list(CELL_COLUMNS[:-6])
    with Store(tmp_path / "old.db"):
        pass
    found = [r[1] for r in sqlite3.connect(tmp_path / "old.db").execute("PRAGMA table_info(cells)")]
    assert found == list(CELL_COLUMNS)


def test_report_shows_the_tradeoff_and_the_estimate_against_the_true_asr(tmp_path):
    from tests.test_report import BADNETS, CLEAN, cell_row, make_store, model_row
    from torchpurify.report import estimate_points, false_alarms, write_report

    def guess(before, after, flagged):
        one = {"est_asr": before, "flagged": flagged}
        return {"before": one, "after": {"est_asr": after, "flagged": after >= 0.5}}

    bad = [model_row(f"bad-{s}", BADNETS, s, (0.95, 0.99, 0.01)) for s in (0, 1)]
    clean = [model_row(f"clean-{s}", CLEAN, s, (0.96, None, None)) for s in (0, 1)]
    cells = []
    for model, (true_after, est_after) in zip(bad * 2, [(0.9, 0.8), (0.1, 0.2), (0.5, 0.1),
                                                       (0.02, 0.0)], strict=True):  # fmt: skip
        label = "ft" if len(cells) < 2 else "gnft"
        row = cell_row(f"{label}-{model['key']}", model, label, (0.95, 0.99, 0.01),
                       (0.9, true_after, 0.1), 0.7, 1.0)  # fmt: skip
        cells.append({**row, "estimate": guess(1.0, est_after, True)})
    for i, model in enumerate(clean):
        row = cell_row(f"ft-{model['key']}", model, "ft", (0.96, None, None),
                       (0.95, None, None), None, 1.0)  # fmt: skip
        cells.append({**row, "estimate": guess(0.1, 0.1, i == 0)})
    store = make_store(tmp_path / "r.db", bad + clean, cells)
    assert sorted(p["asr"] for p in estimate_points(cells)) == [0.02, 0.1, 0.5, 0.9]
    assert false_alarms(cells) == (1, 2)
    markdown, _ = write_report(store, tmp_path / "report")
    text = markdown.read_text()
    assert "Spearman rank correlation of estimated and true ASR after purification: 0.800" in text
    assert "false all-clears (true ASR ≥ 0.5 after, verdict clean): 1 of 4 (25 %)" in text
    assert "false alarms on clean models before purification: 1 of 2 (50 %)" in text
    figures = tmp_path / "report" / "figures"
    assert (figures / "estimate-vs-true-asr-images.png").is_file()
    tradeoffs = sorted(p.name for p in figures.glob("*-tradeoff.png"))
    assert len(tradeoffs) == 1 and "badnets" in tradeoffs[0]  # none for the clean model
    assert text.index("tradeoff.png") < text.index("| defense |")  # the trade-off comes first


# ---------------------------------------------------------------- every trigger family (issue 28)


def family_rows(estimate) -> str:
    return "; ".join(
        f"{name}: label {r['label']} index {r['anomaly_index']:.2f} ratio {r['size_ratio']:.2f} "
        f"est. ASR {r['est_asr']:.3f}"
        for name, r in estimate.families.items()
    )


@pytest.fixture(scope="module")
def blend_estimate(blended):  # noqa: F811
    model, holdout = blended
    return estimate_backdoor(model, holdout, dataclasses.replace(RADII, families=("perturbation",)))


def test_a_blend_is_flagged_through_the_perturbation_family(blend_estimate):
    """Observed: label 0, index 3.52, ratio 0.29, est. ASR 0.930 (the mask family on these 12×12
    images sees it too: python -m tests.test_estimate)."""
    estimate = blend_estimate
    print(family_rows(estimate))
    assert estimate.flagged and estimate.family == "perturbation" and estimate.label == 0
    record = estimate.of("perturbation")
    assert record.flagged and record.target == 0 and record.size_ratio < 0.4
    assert record.est_asr == estimate.est_asr >= 0.8
    assert record.budget == pytest.approx(0.4 * min(record.reference_size, 1.0))
    assert len(record.sizes) == TINY_CLASSES and estimate.mask_norms == record.sizes
    assert set(estimate.families) == {"perturbation"}


def test_a_warp_is_flagged_through_the_generator_family(warped):  # noqa: F811
    """Observed: generator label 0, index 4.25, ratio 0.24, est. ASR 0.836; the additive
    family misses it (index 1.89, ratio 0.85, est. ASR 0.016): the verdict names the generator."""
    model, holdout = warped
    estimate = estimate_backdoor(model, holdout, RADII)
    print(family_rows(estimate))
    assert estimate.flagged and estimate.family == "generator" and estimate.label == 0
    assert not estimate.of("perturbation").flagged
    assert estimate.of("generator").size_ratio < 0.4 and estimate.est_asr >= 0.6
    assert "generator family" in estimate.describe()


def test_the_radius_families_do_not_flag_a_clean_model(tiny_clean):
    """Observed: see python -m tests.test_estimate (every estimated ASR well below 0.5)."""
    model, holdout = tiny_clean
    estimate = estimate_backdoor(model, holdout, RADII)
    print(family_rows(estimate))
    assert not estimate.flagged and estimate.reading != "backdoor"
    for name in ("perturbation", "generator"):
        record = estimate.of(name)
        assert not record.flagged and record.est_asr < 0.5 and record.size_ratio > 0.5


def test_after_purification_only_the_suspected_family_and_label_are_searched(
    blended,  # noqa: F811
    blend_estimate,
    monkeypatch,
):
    from torchpurify import estimate as module

    model, holdout = blended
    calls = []

    def spy(name, real):
        def wrapped(*args, **kwargs):
            calls.append((name, kwargs.get("labels")))
            return real(*args, **kwargs)

        return wrapped

    for name in ("invert_triggers", "invert_perturbations", "invert_generator"):
        monkeypatch.setattr(module, name, spy(name, getattr(module, name)))
    config = dataclasses.replace(RADII, families=FAMILIES)  # all three asked for: one re-run
    after = estimate_backdoor(model, holdout, config, before=blend_estimate)
    assert calls == [("invert_perturbations", [0])]
    assert (
        after.family == "perturbation"
        and after.label == 0
        and set(after.families) == {"perturbation"}
    )
    assert after.budget == blend_estimate.budget
    assert after.reference_size == blend_estimate.reference_size
    assert after.flagged  # nothing was removed
    record = compare(blend_estimate, after)
    assert not record["removed"] and "perturbation family" in record["summary"]


def test_estimate_settings_are_checked():
    assert EstimateConfig(families=["generator"]).families == ("generator",)
    for bad in ((), ("mask", "mask"), ("patch",)):
        with pytest.raises(UserError, match="estimate families"):
            EstimateConfig(families=bad)
    with pytest.raises(UserError, match="estimate radius_budget"):
        EstimateConfig(radius_budget=0)


def test_a_spec_names_the_families(tmp_path):
    from tests.test_spec import SPEC
    from torchpurify.spec import load_spec

    path = tmp_path / "s.yaml"
    path.write_text(SPEC + "estimate: {families: [mask, generator]}\n")
    assert load_spec(path).estimate_config().families == ("mask", "generator")
    path.write_text(SPEC + "estimate: {families: [patch]}\n")
    with pytest.raises(UserError, match="estimate families must be"):
        load_spec(path)


if __name__ == "__main__":  # python -m tests.test_estimate: every family on the tiny models
    import sys

    from tests.test_neurons_perturbation import blend_task, train_small_cnn
    from torchpurify.attacks import build_attack, poison_split

    torch.set_num_threads(1)
    every = dataclasses.replace(RADII, families=FAMILIES, steps=150, capped_steps=60, budget=0.5)
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    every = dataclasses.replace(every, seed=seed)

    def trained(data, attack=None, **settings):
        if attack is None:
            return train_small_cnn(data)
        trigger = build_attack(attack, TINY_SHAPE, **settings.pop("params"))
        return train_small_cnn(poison_split(data, trigger, target=0, seed=0, **settings).split)

    models = {
        "Blended": (trained(blend_task(2000, 0), "blended", params={"alpha": 0.2}, rate=0.15),
                    blend_task(300, 2)),
        "clean blend task": (trained(blend_task(2000, 0)), blend_task(300, 2)),
        "WaNet": (trained(gratings(2000, 0), "wanet", params={"s": 1.0}, rate=0.1),
                  gratings(300, 2)),
        "clean gratings": (trained(gratings(2000, 0)), gratings(300, 2)),
    }  # fmt: skip
    for name, (model, holdout) in models.items():
        estimate = estimate_backdoor(model, holdout, every)
        print(f"{name}: {estimate.describe()} [{estimate.seconds:.0f} s]")
        print(f"  {family_rows(estimate)}")


def _record(family: str, label: int, est_asr: float, size: float, anomaly: float = 0.0) -> dict:
    sizes = [1.0] * 3
    sizes[label] = size
    return FamilyEstimate(
        family, label, est_asr >= 0.5, None, anomaly, size, 1.0, est_asr, est_asr, 0.4, 0.0, sizes
    ).to_dict()


def test_every_family_that_flagged_before_is_rechecked_and_the_highest_decides(monkeypatch):
    """After GN-FT on the Blended development model the verdict's family (perturbation) read
    0.369 while the generator family still read 0.803 (true ASR 0.904, methods.md §12.2):
    so every family that flagged before is searched again, and the highest estimate after is
    the verdict, its numbers compared with that family's before."""
    from torchpurify import estimate as module

    families = {
        "mask": _record("mask", 2, 0.10, 0.9),  # did not flag: not searched again
        "perturbation": _record("perturbation", 0, 0.89, 0.30),
        "generator": _record("generator", 1, 0.87, 0.25),
    }
    before = Estimate(0, True, None, 0.0, 0.30, 1.0, 0.89, 0.89, 0.4, 0.0, [0.3, 1.0, 1.0],
                      family="perturbation", families=families)  # fmt: skip
    assert before.rechecked == ("perturbation", "generator")
    searched = []
    after_values = {"perturbation": (0.37, 0.57), "generator": (0.80, 0.44)}

    def radius_after(model, holdout, family, earlier, *args):
        searched.append((family, earlier.label))
        est_asr, size = after_values[family]
        return FamilyEstimate.from_dict(_record(family, earlier.label, est_asr, size))

    monkeypatch.setattr(module, "_radius_after", radius_after)
    monkeypatch.setattr(module, "_mask_after", lambda *a: pytest.fail("mask did not flag"))
    holdout = Split(torch.rand(8, 4), torch.arange(8) % 3)
    after = module.estimate_after(torch.nn.Linear(4, 3), holdout, before)
    assert searched == [("perturbation", 0), ("generator", 1)]
    assert after.family == "generator" and after.label == 1 and after.flagged
    assert set(after.families) == {"perturbation", "generator"}
    record = compare(before, after)
    assert record["size_growth"] == pytest.approx(0.44 / 0.25)  # against the generator's before
    assert "generator family" in record["summary"] and "0.25 → 0.44" in record["summary"]
    assert "likely still there" in record["summary"]
    # None flagged before: the verdict's family alone, as before this rule.
    quiet = {name: _record(name, 0, 0.2, 0.9) for name in ("perturbation", "generator")}
    calm = dataclasses.replace(before, flagged=False, est_asr=0.2, families=quiet)
    assert calm.rechecked == ("perturbation",)


def test_a_model_not_suspected_before_is_not_flagged_after(monkeypatch):
    """On the clean development model (seed 100, not suspected: 0.321) Fine-Pruning made label
    6 reachable by a capped perturbation (0.620 after; size ratio 0.54, which the size test
    alone already reads as natural — here 0.4): a defense that trains on clean data changes
    which labels are easy to reach but plants no trigger, so the after-check does not call that
    a backdoor; its numbers stay in the record and the line says what they mean."""
    from torchpurify import estimate as module

    quiet = {"perturbation": _record("perturbation", 0, 0.32, 0.66)}
    before = Estimate(0, False, None, 0.0, 0.66, 1.0, 0.32, 0.32, 0.4, 0.0, [0.66, 1.0, 1.0],
                      family="perturbation", families=quiet)  # fmt: skip
    monkeypatch.setattr(
        module, "_radius_after",
        lambda m, h, family, earlier, *a: FamilyEstimate.from_dict(
            _record(family, earlier.label, 0.62, 0.4)),
    )  # fmt: skip
    holdout = Split(torch.rand(8, 4), torch.arange(8) % 3)
    after = module.estimate_after(torch.nn.Linear(4, 3), holdout, before)
    assert after.est_asr == 0.62 and not after.flagged and after.suspected_before is False
    assert after.reading == "easier" and "plants no trigger" in after.describe()
    line = compare(before, after)["summary"]
    assert "no backdoor was suspected before" in line and "easier" in line
    assert Estimate.from_dict(after.to_dict()) == after  # the record keeps it
    # Suspected before: the same numbers after still flag.
    flagged = dataclasses.replace(
        before, flagged=True, est_asr=0.9, families={
            "perturbation": _record("perturbation", 0, 0.9, 0.3)})  # fmt: skip
    again = module.estimate_after(torch.nn.Linear(4, 3), holdout, flagged)
    assert again.flagged and again.reading == "backdoor" and again.suspected_before is True


def test_a_working_trigger_no_smaller_than_the_others_is_a_natural_shortcut():
    """The size test of the verdict (methods.md §12.2): a capped trigger that works is a
    backdoor only when the label's trigger is much smaller than the other labels' (or, for
    an outlier among them). The clean development kws-cnn reached "stop" with a capped
    mask (0.83, size ratio 0.47, anomaly index 1.1) and label 5 with a capped perturbation
    (0.69, ratio 0.61): natural shortcuts, no backdoor. The Blended development model's
    perturbation (0.89, ratio 0.31) is one, and it is the verdict even beside a higher
    estimate that is not."""
    from torchpurify.estimate import EstimateConfig, judge

    config = EstimateConfig()
    clean_audio = {
        "mask": FamilyEstimate.from_dict(_record("mask", 2, 0.83, 0.47, anomaly=1.1)),
        "perturbation": FamilyEstimate.from_dict(_record("perturbation", 1, 0.69, 0.61)),
    }
    found = judge(clean_audio, config, seconds=1.0)
    assert not found.flagged and found.family == "mask" and found.est_asr == 0.83
    assert found.reading == "natural" and "natural shortcut" in found.describe()
    assert not any(r["flagged"] for r in found.families.values())
    # the same mask as an outlier among the labels' masks (the tiny test task's patch: 5.9)
    # and a perturbation (the pitch-style kws-cnn's target: ratio 0.53, anomaly index 4.05)
    outlier = {"mask": FamilyEstimate.from_dict(_record("mask", 2, 0.83, 0.47, anomaly=3.5))}
    assert judge(outlier, config, seconds=1.0).flagged
    pitch = {"perturbation": FamilyEstimate.from_dict(_record("perturbation", 0, 0.59, 0.53, 4.05))}
    assert judge(pitch, config, seconds=1.0).flagged
    # a suspecting family is the verdict even beside a higher estimate that does not suspect
    both = {
        "mask": FamilyEstimate.from_dict(_record("mask", 2, 0.95, 0.4, anomaly=1.0)),
        "perturbation": FamilyEstimate.from_dict(_record("perturbation", 0, 0.89, 0.31)),
    }
    verdict = judge(both, config, seconds=1.0)
    assert verdict.flagged and verdict.family == "perturbation" and verdict.label == 0
    assert verdict.reading == "backdoor" and verdict.rechecked == ("perturbation",)
    # the thresholds are settings: a looser radius ratio reads the clean model as suspected
    loose = dataclasses.replace(config, radius_ratio=0.7)
    assert judge(clean_audio, loose, seconds=1.0).family == "perturbation"


def test_a_cached_estimate_is_judged_again_with_the_verdict_settings(tmp_path, monkeypatch):
    """The size test's thresholds change the verdict, not the searches: a cached estimate
    before purification is reused under other thresholds and judged again, not recomputed."""
    from torchpurify import estimate as module

    records = {"perturbation": FamilyEstimate.from_dict(_record("perturbation", 1, 0.69, 0.61))}
    stored = module.judge(records, module.EstimateConfig(), seconds=3.0)
    monkeypatch.setattr(module, "estimate_before", lambda *a, **k: stored)
    holdout = Split(torch.rand(8, 4), torch.arange(8) % 3)
    path = tmp_path / "estimate-before.json"
    first = module.estimate_cached(path, torch.nn.Linear(4, 3), holdout)
    assert not first.flagged and path.exists()

    def recompute(*args, **kwargs):
        raise AssertionError("the searches ran again")

    monkeypatch.setattr(module, "estimate_before", recompute)
    loose = module.EstimateConfig(radius_ratio=0.7)
    again = module.estimate_cached(path, torch.nn.Linear(4, 3), holdout, loose)
    assert again.flagged and again.family == "perturbation" and again.seconds == 3.0
    with pytest.raises(AssertionError, match="searches ran again"):  # a search setting changed
        module.estimate_cached(path, torch.nn.Linear(4, 3), holdout, module.EstimateConfig(steps=7))
