"""Every defense against a real (tiny) backdoor, and the contract they all keep."""

import copy
from functools import partial

import pytest
import torch
from torch import nn

from torchpurify.data.base import Split
from torchpurify.data.splits import split_guard
from torchpurify.defenses import DEFENSES, Clean, build_defense
from torchpurify.defenses.base import holdout_budget
from torchpurify.defenses.budget import largest_passing as search_budget
from torchpurify.defenses.linf_pruning import TriggerSuccess
from torchpurify.defenses.pruning import HoldoutProbe, fine_tune_if_no_worse, prune_first
from torchpurify.errors import UserError
from torchpurify.metrics import evaluate
from torchpurify.models import build_model
from torchpurify.models.io import load_model, save_model
from torchpurify.neurons import masked_layers
from torchpurify.train import TrainConfig, fit

from .test_defense_contract import quick

# The pruners' two searches for the cut (defenses/budget.py): binary, for a monotone curve, and
# the scan up to the first failure that Fine-Pruning's search="sweep" runs.
largest_passing = partial(search_budget, search="binary")
first_failing = partial(search_budget, search="until-failure")

# Recipes sized for the tiny task (a few hundred clean samples): enough steps to matter.
TINY = {
    "ft": {"epochs": 10, "lr": 0.05},
    "gnft": {"epochs": 10, "lr": 0.05, "r": 0.5, "alpha": 0.9},
    "fine-pruning": {"epochs": 5, "lr": 0.01, "max_acc_drop": 0.08},
    # The tiny task's 3×3 patch is 6 % of a 12×12 image: a wider capped-trigger budget.
    "linf-pruning": {"inversion_steps": 150, "capped_budget": 0.5},
    "salience-ar": {"epochs": 10, "lr": 0.05, "alpha": 3.0},
}


def measure(model, tiny):
    return evaluate(
        model, tiny.test, tiny.trigger, target=tiny.target, num_classes=tiny.num_classes
    )


REMOVES = {
    "gnft": {},
    "fine-pruning": {},
    "linf-pruning": {"trigger": "known"},
    "salience-ar": {},
}


# Fine-Pruning on the 24×24 task: on 12×12 its cut, read on the selection half, decides the
# result, and the seed decides the cut (ASR after 0.002 / 0.485 / 0.746 / 0.824 for seeds 0-3 at
# this recipe); on 24×24 0.000 on each of them.
WIDE = {"fine-pruning"}


@pytest.mark.parametrize(("name", "extra"), sorted(REMOVES.items()))
def test_defense_lowers_asr_keeps_acc_and_leaves_the_input_alone(name, extra, request):
    tiny = request.getfixturevalue("wide_backdoor" if name in WIDE else "tiny_backdoor")
    original = copy.deepcopy(tiny.model)
    before = measure(tiny.model, tiny)
    defense = build_defense(name, device="cpu", batch_size=64, **{**TINY[name], **extra})
    clean = Clean(tiny.tune, tiny.holdout, known_trigger=tiny.trigger if extra else None)
    result = defense.purify(tiny.model, clean)
    after = measure(result.model, tiny)
    assert after.asr < 0.2 < 0.9 < before.asr, (name, before, after)
    assert after.acc > before.acc - 0.05, (name, before, after)
    assert result.cost.seconds > 0 and result.cost.forward > 0
    for a, b in zip(original.state_dict().values(), tiny.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not masked_layers(tiny.model)


def test_gnft_removes_what_plain_fine_tuning_with_the_same_recipe_keeps(tiny_backdoor):
    """GN-FT's key ablation (methods.md §5): α = 0 is FT, and FT leaves this backdoor in place."""
    tiny = tiny_backdoor
    clean = Clean(tiny.tune, tiny.holdout)
    recipe = {"epochs": 10, "lr": 0.05, "device": "cpu", "batch_size": 64}
    plain = measure(build_defense("ft", **recipe).purify(tiny.model, clean).model, tiny)
    penalised = build_defense("gnft", r=0.5, alpha=0.9, **recipe).purify(tiny.model, clean)
    assert plain.asr > 0.9 and plain.acc > 0.95
    assert measure(penalised.model, tiny).asr < 0.2


def test_linf_pruning_with_an_inverted_trigger_finds_the_target_and_lowers_asr(tiny_backdoor):
    tiny = tiny_backdoor
    defense = build_defense("linf-pruning", device="cpu", **TINY["linf-pruning"])
    result = defense.purify(tiny.model, Clean(tiny.tune, tiny.holdout))
    assert result.log["trigger"]["target"] == tiny.target == result.log["trigger"]["suspected"]
    assert result.log["trigger"]["nc_target"] == tiny.target  # Neural Cleanse agrees here
    assert result.log["trigger"]["capped_success"] >= 0.5
    assert measure(result.model, tiny).asr < 0.2
    assert len(result.log["rounds"]) >= 1


class SealedClean(Clean):
    """Defender data that raise on any attribute but the defender's splits (and the test split
    a careless caller might attach): a defense can read ``tune`` and ``holdout``, nothing else."""

    ALLOWED = frozenset({"tune", "holdout", "guard", "known_trigger", "for_selection"})

    def __getattribute__(self, name):
        if name.startswith("__") or name in SealedClean.ALLOWED:
            return super().__getattribute__(name)
        raise AssertionError(f"a defense read clean.{name}")

    @property
    def test(self):
        raise AssertionError("a defense read the test split")


@pytest.mark.parametrize("name", DEFENSES.names())  # every registered defense, by construction
def test_no_defense_reads_test_data(name, tiny_backdoor, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a defense loaded a dataset")

    # experiment first: importing it while data.load_dataset is patched would bind the fake.
    monkeypatch.setattr("torchpurify.experiment.load_dataset", forbidden)
    monkeypatch.setattr("torchpurify.data.load_dataset", forbidden)
    clean = SealedClean(tiny_backdoor.tune, tiny_backdoor.holdout)
    build_defense(name, **quick(name)).purify(tiny_backdoor.model, clean)


def test_fine_pruned_channels_stay_zero_after_fine_tuning_and_reload(tiny_backdoor, tmp_path):
    defense = build_defense("fine-pruning", device="cpu", epochs=3)
    result = defense.purify(tiny_backdoor.model, Clean(tiny_backdoor.tune, tiny_backdoor.holdout))
    layer, pruned = result.log["layer"], result.log["pruned"]
    assert layer == "block4.2" and len(pruned) == result.log["num_pruned"] > 0

    def channel_outputs(model):
        seen = {}
        module = dict(model.named_modules())[layer]
        handle = module.register_forward_hook(lambda m, i, o: seen.update(out=o.detach()))
        model(tiny_backdoor.test.x[:64])
        handle.remove()
        return seen["out"][:, pruned]

    assert torch.count_nonzero(channel_outputs(result.model)) == 0
    fit(result.model, tiny_backdoor.tune, TrainConfig(epochs=2, lr=0.1, progress=False))
    assert torch.count_nonzero(channel_outputs(result.model)) == 0
    save_model(
        result.model,
        tmp_path / "m",
        {"input_shape": [1, 12, 12], "classes": list("abcdef"), "attack": None},
    )
    reloaded, card = load_model(tmp_path / "m")
    assert card["masks"] == {layer: 128}
    assert torch.count_nonzero(channel_outputs(reloaded)) == 0


def test_binary_search_cut_equals_full_sweep_when_monotone():
    for cut in range(0, 40):
        accuracy = [1.0 - (0.0 if k <= cut else 0.01 * (k - cut)) for k in range(40)]
        calls = []

        def passes(k, accuracy=accuracy, calls=calls):
            calls.append(k)
            return accuracy[k] >= 1.0

        assert largest_passing(0, 39, passes) == first_failing(0, 39, passes) == cut
    assert len(set(calls)) <= 40
    # The precondition is checked, not assumed: nothing passes, no k is returned.
    assert largest_passing(3, 39, lambda k: False) is None


def test_fine_pruning_binary_and_sweep_agree_on_the_tiny_model(tiny_backdoor):
    clean = Clean(tiny_backdoor.tune, tiny_backdoor.holdout)
    runs = {
        search: build_defense("fine-pruning", device="cpu", prune_only=True, search=search)
        .purify(tiny_backdoor.model, clean)
        .log
        for search in ("binary", "sweep")
    }
    sweep, binary = runs["sweep"], runs["binary"]
    curve = dict(sweep["curve"])
    cut = sweep["num_pruned"]
    # The sweep stops at the first count that breaks the tolerance.
    assert all(curve[k] >= sweep["threshold"] for k in range(cut + 1))
    assert cut == 127 or curve[cut + 1] < sweep["threshold"]
    assert dict(binary["curve"])[binary["num_pruned"]] >= binary["threshold"]
    assert binary["holdout_evaluations"] <= 9 < sweep["holdout_evaluations"]


def tiny_task(shape, n=400, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.rand(n, *shape, generator=g) * 0.3
    flat = x.view(n, -1)
    width = flat.shape[1] // classes
    for k in range(classes):
        flat[y == k, k * width : (k + 1) * width] += 0.6
    return Split(x, y)


def wave_model():
    return nn.Sequential(
        nn.Unflatten(1, (1, -1)),
        nn.Conv1d(1, 8, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(8, 16, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("kind", ["lenet5-no-batchnorm", "conv1d-waveform"])
def test_defenses_run_without_batchnorm_and_on_1d_convolutions(name, kind):
    torch.manual_seed(0)
    if kind == "conv1d-waveform":
        shape, model = (48,), wave_model()
    else:
        shape, model = (1, 8, 8), build_model("lenet5", (1, 8, 8), 3)
    data = tiny_task(shape)
    fit(model, data, TrainConfig(epochs=2, batch_size=32, progress=False))
    params = {**TINY[name], "epochs": 1} if "epochs" in TINY[name] else {"inversion_steps": 20}
    result = build_defense(name, device="cpu", batch_size=32, **params).purify(
        model, Clean(tiny_task(shape, 200, seed=1), tiny_task(shape, 100, seed=2))
    )
    assert result.model(data.x[:4]).shape == (4, 3)


@pytest.mark.parametrize("floor", [0.0, 1.01])
def test_pruned_fine_tuning_is_kept_only_when_no_worse_on_holdout(floor, tiny_backdoor):
    tiny = tiny_backdoor
    model = copy.deepcopy(tiny.model)
    prune_first(model, "block4.2", torch.arange(128), 5)
    pruned = copy.deepcopy(model.state_dict())
    config = TrainConfig(epochs=1, lr=0.05, batch_size=64, device="cpu", progress=False)
    log = fine_tune_if_no_worse(model, tiny.tune, tiny.holdout, config, floor, "ft")
    state = model.state_dict()
    unchanged = all(torch.equal(pruned[k], state[k]) for k in pruned)
    assert log["fine_tune_kept"] is (floor == 0.0)
    assert unchanged is (floor > 1)  # restored exactly when the holdout says no
    assert 0 <= log["holdout_acc_fine_tuned"] <= 1
    assert int((masked_layers(model)["block4.2"] == 0).sum()) == 5


def test_diverging_fine_tuning_of_a_pruned_model_rolls_back_to_the_pruned_weights(tiny_backdoor):
    model = copy.deepcopy(tiny_backdoor.model)
    prune_first(model, "block4.2", torch.arange(128), 5)
    pruned = copy.deepcopy(model.state_dict())
    config = TrainConfig(epochs=1, lr=1e30, batch_size=64, device="cpu", progress=False)
    log = fine_tune_if_no_worse(model, tiny_backdoor.tune, tiny_backdoor.holdout, config, 0, "ft")
    assert log["fine_tune_kept"] is False and "diverged" in log["fine_tune_diverged"]
    assert all(torch.equal(pruned[k], v) for k, v in model.state_dict().items())


def test_fine_pruning_keeps_the_better_of_pruned_and_fine_tuned(tiny_backdoor):
    tiny = tiny_backdoor
    clean = Clean(tiny.tune, tiny.holdout)
    log = build_defense("fine-pruning", device="cpu", epochs=2).purify(tiny.model, clean).log
    selection, _ = split_guard(len(tiny.holdout), seed=0)  # what the selection rules read
    kept = log["holdout_acc_fine_tuned"] >= log["holdout_acc_pruned"]
    assert log["fine_tune_kept"] is kept
    # Its budget is the holdout-noise rule (3 standard errors), not a fixed 8 points.
    assert log["threshold"] == pytest.approx(
        log["holdout_acc_before"] - holdout_budget(log["holdout_acc_before"], len(selection))
    )


def test_linf_pruning_abstains_without_a_small_working_trigger():
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 8, 8), 3)
    fit(model, tiny_task((1, 8, 8)), TrainConfig(epochs=2, batch_size=32, progress=False))
    clean = Clean(tiny_task((1, 8, 8), 200, seed=1), tiny_task((1, 8, 8), 100, seed=2))
    result = build_defense("linf-pruning", device="cpu", inversion_steps=20).purify(model, clean)
    assert result.log["trigger"]["target"] is None
    assert result.log["trigger"]["capped_success"] < 0.5
    assert "abstained" in result.log and not masked_layers(result.model)
    # Prune-only: every backward pass counted is the trigger inversion's.
    assert result.cost.backward > 0 and result.cost.forward > result.cost.backward


def test_linf_pruning_acts_on_a_small_working_trigger_even_without_a_nc_outlier(
    tiny_backdoor, monkeypatch
):
    """Neural Cleanse's anomaly index can stay under 2 for the true target (another label a
    natural low outlier); the capped-trigger test of the backdoor estimate still flags it."""
    import dataclasses

    from torchpurify.defenses import linf_pruning

    real = linf_pruning.invert_triggers

    def no_outlier(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), target=None)

    monkeypatch.setattr(linf_pruning, "invert_triggers", no_outlier)
    tiny = tiny_backdoor
    # The tiny task's 3×3 patch is 6 % of a 12×12 image: a wider budget (as in test_estimate).
    defense = build_defense("linf-pruning", device="cpu", inversion_steps=150, capped_budget=0.5)
    result = defense.purify(tiny.model, Clean(tiny.tune, tiny.holdout))
    found = result.log["trigger"]
    assert found["nc_target"] is None and "abstained" not in result.log
    assert found["suspected"] == found["target"] == tiny.target
    assert found["capped_success"] >= 0.5
    assert measure(result.model, tiny).asr < 0.2


def test_linf_unlearning_stamps_the_trigger_on_a_fraction_of_tune_with_true_labels(tiny_backdoor):
    tiny = tiny_backdoor
    defense = build_defense(
        "linf-pruning", device="cpu", unlearn=0.25, seed=3, **TINY["linf-pruning"]
    )
    stamped = defense.stamped(tiny.tune, tiny.trigger)
    changed = (stamped.x != tiny.tune.x).flatten(1).any(1)
    assert int(changed.sum()) == round(0.25 * len(tiny.tune))
    assert torch.equal(stamped.y, tiny.tune.y)
    assert torch.allclose(stamped.x[changed], tiny.trigger(tiny.tune.x[changed]))
    assert torch.equal(stamped.x[~changed], tiny.tune.x[~changed])
    result = defense.purify(tiny.model, Clean(tiny.tune, tiny.holdout))
    assert result.log["unlearn"] == {"samples": round(0.25 * len(tiny.tune)), "of": len(tiny.tune)}
    assert "fine_tune_kept" in result.log and measure(result.model, tiny).asr < 0.2


def test_linf_cut_prunes_nothing_more_once_the_trigger_already_fails(tiny_backdoor):
    tiny = tiny_backdoor
    model = copy.deepcopy(tiny.model)
    defense = build_defense("linf-pruning", device="cpu", trigger="known")
    probe = HoldoutProbe(model, "block4.2", torch.arange(128), tiny.holdout, 64)
    no_op = TriggerSuccess(probe, lambda x: x, 0, tiny.holdout)  # "trigger" that does nothing
    assert no_op(0) < defense.stop_asr
    assert defense.cut(probe, no_op, 0, threshold=0.0) == (0, False)
    works = TriggerSuccess(probe, tiny.trigger, 0, tiny.holdout)
    cut, exhausted = defense.cut(probe, works, 0, threshold=0.0)
    assert works(cut - 1) >= defense.stop_asr > works(cut) and not exhausted


def test_gnft_half_second_pass_counts_fewer_passes_than_a_full_one(tiny_backdoor):
    clean = Clean(tiny_backdoor.tune, tiny_backdoor.holdout)
    costs = {
        share: build_defense("gnft", device="cpu", epochs=1, second_pass=share, distill=0.0)
        .purify(tiny_backdoor.model, clean)
        .cost
        for share in (0.5, 1.0)
    }
    assert costs[0.5].forward < costs[1.0].forward and costs[0.5].backward < costs[1.0].backward
    batches = len(tiny_backdoor.tune) // 128
    # Per batch of 128: 1 + 1 passes (full), 1 + 0.5 (half); plus two holdout passes (guard).
    assert costs[1.0].backward == 2 * 128 * batches
    assert costs[0.5].backward == 192 * batches
    # Distillation (the default) adds one forward and backward of the model and one forward of
    # the frozen input model per batch.
    distilled = build_defense("gnft", device="cpu", epochs=1).purify(tiny_backdoor.model, clean)
    assert distilled.cost.backward == 3 * 128 * batches
    assert distilled.cost.forward == costs[1.0].forward + 2 * 128 * batches


def test_a_defense_built_directly_is_checked_like_one_built_by_name():
    from torchpurify.defenses.gnft import GradientNormFineTuning

    with pytest.raises(UserError, match=r"^gnft: alpha must be a number, got 'x' \(default"):
        GradientNormFineTuning(alpha="x")
    assert GradientNormFineTuning(alpha=1).alpha == 1.0 and isinstance(
        GradientNormFineTuning(alpha=1).alpha, float
    )
