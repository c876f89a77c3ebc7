"""Experiment specs: validation with the place of each mistake, the grid, and its keys."""

import textwrap

import pytest

from torchpurify.errors import UserError
from torchpurify.spec import cell_jobs, load_spec, model_jobs

SPEC = """
datasets:
  - name: digits
    train_size: 600
models: [small-cnn, lenet5]
attacks:
  - none
  - name: badnets
    params: {size: 2}
    poison_rate: 0.1
defenses:
  - name: ft
    params: {epochs: 1}
  - name: fine-pruning
    label: pruning
    params: {prune_only: true}
  - name: gnft
    params: {alpha: 0.5, epochs: 1}
seeds: [0, 1]
training: {epochs: 1, batch_size: 64}
defender_fraction: 0.2
"""


def write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path, text) -> tuple[str, str]:
    path = write(tmp_path, text)
    with pytest.raises(UserError) as caught:
        load_spec(path)
    return str(caught.value), str(path)


def replace(old, new, text=SPEC):
    assert old in text
    return text.replace(old, new)


def test_a_valid_spec_loads_with_defaults_filled_in(tmp_path):
    spec = load_spec(write(tmp_path, SPEC))
    assert [d.name for d in spec.datasets] == ["digits"] and spec.datasets[0].train_size == 600
    assert spec.models == ("small-cnn", "lenet5")
    assert spec.attacks[0] is None  # 'none': a clean model
    badnets = spec.attacks[1]
    assert badnets.params == {"size": 2, "position": "bottom-right"}
    assert (badnets.target, badnets.target_mode) == (0, "all-to-one")
    assert [d.label for d in spec.defenses] == ["ft", "pruning", "gnft"]
    assert spec.seeds == (0, 1) and spec.defender_fraction == 0.2 and not spec.diagnostics


def test_the_grid_is_datasets_models_attacks_seeds_times_defenses(tmp_path):
    spec = load_spec(write(tmp_path, SPEC))
    models = model_jobs(spec)
    cells = cell_jobs(spec)
    assert len(models) == 1 * 2 * 2 * 2 and len(cells) == len(models) * 3
    assert len({m.key for m in models}) == len(models)
    assert len({c.key for c in cells}) == len(cells)
    cell = cells[0]
    assert cell.params["seed"] == cell.model.seed  # the defense follows the model's seed
    assert cell.params["epochs"] == 1 and "progress" not in cell.params


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("seeds: [0, 1]", "seeds: [0, 1]\nfoo: 1", ": unknown key 'foo' (allowed: datasets,"),
        ("seeds: [0, 1]", "seed: [0, 1]", ": unknown key 'seed' (did you mean seeds?)"),
        (
            "alpha: 0.5",
            "alpah: 0.5",
            ": defenses[2].params: unknown parameter 'alpah' for gnft (did you mean alpha?)",
        ),
        ("name: badnets", "name: badnet", ": attacks[1].name: unknown attack 'badnet' (did you "
         "mean badnets?)"),
        ("name: ft", "name: gnf", ": defenses[0].name: unknown defense 'gnf' (did you mean gnft?)"),
        ("[small-cnn, lenet5]", "[small-cnn, lenet]", ": models[1]: unknown model 'lenet'"),
        ("epochs: 1, batch", "epochs: two, batch", ": training.epochs: must be an integer, "
         "got 'two'"),
        ("epochs: 1, batch", "epochs: 0, batch", ": training: --epochs must be at least 1"),
        ("seeds: [0, 1]", "seeds: [0, x]", ": seeds[1]: must be an integer in 0..4294967295, "
         "got 'x'"),
        ("seeds: [0, 1]", "seeds: [-1]", ": seeds[0]: must be an integer in 0..4294967295, "
         "got -1"),
        ("seeds: [0, 1]", f"seeds: [0, {2**64}]", ": seeds[1]: must be an integer in "
         "0..4294967295, got 18446744073709551616"),
        ("poison_rate: 0.1", "poison_rate: 2", ": attacks[1].poison_rate: must be in (0, 1]"),
        ("{prune_only: true}", "{prune_only: 3}", ": defenses[1].params.prune_only: must be "
         "true or false, got 3"),
        ("{alpha: 0.5,", "{mode: fast,", ": defenses[2].params: gnft: mode must be"),
        ("{size: 2}", "{sise: 2}", ": attacks[1].params: unknown parameter 'sise' for badnets "
         "(did you mean size?)"),
        ("- none", "- {name: none, poison_rate: 0.1}", ": attacks[0]: attack 'none' (a clean "
         "model) takes no 'poison_rate'"),
        ("train_size: 600", "train_size: 600\n    trainsize: 5", ": datasets[0]: unknown key "
         "'trainsize' (did you mean train_size?)"),
        ("defender_fraction: 0.2", "defender_fraction: 1.5", ": defender_fraction: must be in "
         "(0, 1)"),
        ("label: pruning", "label: ft", ": defenses[1]: repeats the label of defenses[0]"),
        ("[0, 1]", "[0, 0]", ": seeds[1]: repeats the entry of seeds[0]"),
        ("models: [small-cnn, lenet5]\n", "", ": datasets[0]: no models: give 'models'"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line_with_their_place(tmp_path, old, new, expected):
    message, path = error_of(tmp_path, replace(old, new))
    assert message.startswith(path + ":"), message
    assert expected in message, message
    assert "\n" not in message


def test_yaml_syntax_errors_name_the_line(tmp_path):
    message, path = error_of(tmp_path, "datasets: [digits\nmodels: x\n")
    assert message.startswith(f"{path}: not valid YAML") and "line" in message


def test_a_missing_file_and_a_non_mapping_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    message, _ = error_of(tmp_path, "- digits\n")
    assert "must be a mapping" in message


def keys(tmp_path, text, name):
    spec = load_spec(write(tmp_path, text, name))
    return [m.key for m in model_jobs(spec)], [c.key for c in cell_jobs(spec)]


def test_the_same_spec_gives_the_same_keys_whatever_its_spelling(tmp_path):
    models, cells = keys(tmp_path, SPEC, "a.yaml")
    respelled = replace("{size: 2}", "{position: bottom-right, size: 2}")  # a default, spelled out
    respelled = replace("{alpha: 0.5, epochs: 1}", "{epochs: 1, alpha: 0.50}", respelled)
    respelled = replace("training: {epochs: 1, batch_size: 64}",
                        "training: {batch_size: 64, epochs: 1, lr: 0.05}", respelled)  # fmt: skip
    assert keys(tmp_path, respelled, "b.yaml") == (models, cells)
    # The device decides where, not what: it is not part of any key.
    assert keys(tmp_path, SPEC + "device: cpu\n", "c.yaml") == (models, cells)


def test_a_changed_defense_parameter_changes_only_that_cells_key(tmp_path):
    models, cells = keys(tmp_path, SPEC, "a.yaml")
    changed_models, changed_cells = keys(tmp_path, replace("alpha: 0.5", "alpha: 0.6"), "b.yaml")
    assert changed_models == models
    differ = [i for i, (a, b) in enumerate(zip(cells, changed_cells, strict=True)) if a != b]
    assert differ == list(range(2, len(cells), 3))  # the gnft cell of every model, nothing else


def test_a_changed_training_epoch_changes_the_model_keys(tmp_path):
    models, cells = keys(tmp_path, SPEC, "a.yaml")
    changed_models, changed_cells = keys(tmp_path, replace("epochs: 1, batch", "epochs: 2, batch"),
                                         "b.yaml")  # fmt: skip
    assert not set(models) & set(changed_models)
    assert not set(cells) & set(changed_cells)  # cells follow their model


def test_a_per_dataset_recipe_overrides_the_global_one(tmp_path):
    spec = load_spec(
        write(tmp_path, replace("train_size: 600", "train_size: 600\n    training: {epochs: 3}"))
    )
    job = model_jobs(spec)[0]
    assert job.recipe["epochs"] == 3 and job.recipe["batch_size"] == 64
    assert job.train_config().epochs == 3


def test_a_dataset_may_name_its_own_models_and_attacks(tmp_path):
    text = """
    datasets:
      - name: digits
        models: [lenet5]
        attacks: [{name: badnets, params: {size: 2}}]
      - name: fashion-mnist
    models: [small-cnn]
    attacks: [blended]
    defenses: [ft]
    """
    jobs = model_jobs(load_spec(write(tmp_path, text)))
    assert [(j.dataset.name, j.model, j.attack.name) for j in jobs] == [
        ("digits", "lenet5", "badnets"),
        ("fashion-mnist", "small-cnn", "blended"),
    ]


def test_a_dataset_without_models_anywhere_is_reported_with_its_place(tmp_path):
    text = """
    datasets:
      - {name: digits, attacks: [badnets]}
    defenses: [ft]
    """
    message, path = error_of(tmp_path, text)
    assert message == f"{path}: datasets[0]: no models: give 'models' at the top or in the entry"


def test_an_unknown_attack_inside_a_dataset_entry_is_reported_with_its_place(tmp_path):
    text = """
    datasets:
      - {name: digits, models: [lenet5], attacks: [badnet]}
    defenses: [ft]
    """
    message, _ = error_of(tmp_path, text)
    assert "datasets[0].attacks[0].name: unknown attack 'badnet'" in message


def test_the_estimate_is_configured_or_turned_off_and_is_part_of_the_cell_keys(tmp_path):
    models, cells = keys(tmp_path, SPEC, "a.yaml")
    spelled = keys(tmp_path, SPEC + "estimate: {steps: 100}\n", "b.yaml")  # the default
    assert spelled == (models, cells)
    fewer = keys(tmp_path, SPEC + "estimate: {steps: 20}\n", "c.yaml")
    off = keys(tmp_path, SPEC + "estimate: false\n", "d.yaml")
    for changed in (fewer, off):
        assert changed[0] == models and not set(changed[1]) & set(cells)
    assert load_spec(write(tmp_path, SPEC + "estimate: false\n")).estimate_config() is None
    fewer_spec = load_spec(write(tmp_path, SPEC + "estimate: {steps: 20}\n"))
    assert fewer_spec.estimate_config().steps == 20
    message, _ = error_of(tmp_path, SPEC + "estimate: {stepz: 20}\n")
    assert "estimate" in message and "did you mean steps" in message
    message, _ = error_of(tmp_path, SPEC + "estimate: {steps: 0}\n")
    assert "positive integer" in message


def test_speech_cells_record_the_speaker_split_and_images_keep_their_keys(tmp_path, monkeypatch):
    """The defender's split of speech is by speaker: its cells' keys say so, so a store never
    reuses a cell measured with the earlier random split; image keys are untouched."""
    import torchpurify.spec as spec_module

    speech = replace("name: digits", "name: speech-synth").replace("small-cnn, lenet5", "kws-cnn")
    speech = speech.replace("params: {size: 2}", "params: {}")
    models, cells = keys(tmp_path, speech, "speech.yaml")
    image = keys(tmp_path, SPEC, "image.yaml")
    monkeypatch.setattr(spec_module, "split_groups", lambda name: "")  # the rule before
    old_models, old_cells = keys(tmp_path, speech, "speech.yaml")
    assert old_models == models and not set(old_cells) & set(cells)
    assert keys(tmp_path, SPEC, "image.yaml") == image


def test_a_parameter_added_later_keeps_the_keys_at_its_neutral_value(tmp_path):
    """augment: false (the behaviour before the parameter existed) leaves every key as it was;
    augment: true changes only that defense's cells."""
    models, cells = keys(tmp_path, SPEC, "a.yaml")
    neutral = replace("params: {epochs: 1}", "params: {epochs: 1, augment: false}")
    assert keys(tmp_path, neutral, "b.yaml") == (models, cells)
    on = keys(tmp_path, replace("params: {epochs: 1}", "params: {epochs: 1, augment: true}"),
              "c.yaml")  # fmt: skip
    differ = [i for i, (a, b) in enumerate(zip(cells, on[1], strict=True)) if a != b]
    assert differ == list(range(0, len(cells), 3))  # the ft cell of every model
    for neutral in ("distill: 0", "distill: 0.0"):
        spelled = replace("params: {epochs: 1}", f"params: {{epochs: 1, {neutral}}}")
        assert keys(tmp_path, spelled, "d.yaml") == (models, cells)
    on = keys(tmp_path, replace("params: {epochs: 1}", "params: {epochs: 1, distill: 2}"),
              "e.yaml")  # fmt: skip
    assert on[0] == models and on[1] != cells


def test_distillation_is_a_defense_setting_not_a_training_setting(tmp_path):
    """distill holds a defense's fine-tuning near the model it was given; an attacker's training
    recipe has no model to hold to, so a spec's ``training`` may not set it."""
    message, _ = error_of(tmp_path, SPEC + "training: {distill: 1.0}\n")
    assert "distill" in message


def test_auto_is_a_defense_of_a_grid(tmp_path):
    """`auto` (issue 28 item 4) is a chooser, not a registry defense: a spec takes it like one,
    with its own settings, and its cells carry them in their keys."""
    text = replace(
        "  - name: gnft\n", "  - name: auto\n    params: {order: 'gnft,ft'}\n  - name: gnft\n"
    )
    spec = load_spec(write(tmp_path, text))
    assert [d.label for d in spec.defenses] == ["ft", "pruning", "auto", "gnft"]
    auto = [c for c in cell_jobs(spec) if c.label == "auto"]
    assert len(auto) == len(model_jobs(spec)) and auto[0].params["order"] == "gnft,ft"
    assert auto[0].defense.build(0).name == "auto"
    other = load_spec(write(tmp_path, text.replace("gnft,ft", "ft"), "other.yaml"))
    others = {c.key for c in cell_jobs(other) if c.label == "auto"}
    assert len(others) == len(auto) and others.isdisjoint(c.key for c in auto)
    same = {c.key for c in cell_jobs(other) if c.label != "auto"}
    assert same == {c.key for c in cell_jobs(spec) if c.label != "auto"}
    message, path = error_of(tmp_path, text.replace("gnft,ft", "gnft,fft"))
    assert message == f"{path}: defenses[2].params: auto: order names an unknown defense 'fft'"


def test_cell_keys_are_those_of_the_stores_written_before_run_settings_moved_apart(tmp_path):
    """The run context and the guard's settings are no longer hyper-parameters (params()), but
    a cell's key hashes them (seed, batch size, max_acc_drop, guard_retries; not the device) as
    before: these digests of SPEC's 24 cell keys were computed by the code of 2026-12-06. The
    estimate's size test (2026-12-07) changes what a cell stores, hence its key; at its neutral
    thresholds (ratios 1: it never acts) the keys are those of before. Fine-Pruning's and
    GN-FT's step were re-chosen since (0.01 -> 0.005, notebook §12.15): spelled out at their old
    value, the keys are those of before too."""
    import hashlib

    old = replace("{prune_only: true}", "{prune_only: true, lr: 0.01}")
    old = replace("{alpha: 0.5, epochs: 1}", "{alpha: 0.5, epochs: 1, lr: 0.01}", old)
    run = replace("params: {alpha: 0.5, epochs: 1, lr: 0.01}", "params: {alpha: 0.5, epochs: 1, "
                  "lr: 0.01, max_acc_drop: 0.02, batch_size: 64, device: cpu, seed: 7}",
                  old)  # fmt: skip
    expected = {
        old: "343c4e3ccaf3176af3439be110b0559fe59f336629b2f44e6acaa86abb602ac6",
        run: "23e61edad25795f2a549da1b571d7cc4aabeec8feffcb38f2bb3e13cd390ee38",
    }
    neutral = "estimate: {mask_ratio: 1.0, radius_ratio: 1.0}\n"
    for i, (text, digest) in enumerate(expected.items()):
        _, cells = keys(tmp_path, text + neutral, f"{i}.yaml")
        assert len(cells) == 24
        assert hashlib.sha256("".join(cells).encode()).hexdigest() == digest
        models, today = keys(tmp_path, text, f"today{i}.yaml")  # the size test at its defaults
        assert len(today) == 24 and not set(today) & set(cells)
        assert models == keys(tmp_path, text + neutral, f"{i}.yaml")[0]  # models keep theirs
