"""The contract every registered defense keeps, checked over the registry (in the style of
scikit-learn's ``check_estimator``): a defense added to ``DEFENSES`` is covered without a line
here. Each runs with its ``quick`` settings (and one epoch where it trains) so the whole file
takes seconds per defense.

- its parameters round-trip through JSON and ``build_defense``;
- ``purify`` leaves the input model alone, counts its passes, returns a JSON-able log, puts the
  result on its device and computes there (every module sees inputs on its own device);
- a wrong kind of value for any hyper-parameter is one line naming it, however it is built;
- the guard: a result below the holdout budget, or a divergence, is backed off and rolled back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing

import pytest
import torch

from torchpurify.checks import kind_problem
from torchpurify.data.base import Split
from torchpurify.data.splits import split_guard
from torchpurify.defenses import DEFENSES, Clean, Purified, build_defense
from torchpurify.errors import Divergence, UserError
from torchpurify.metrics import accuracy
from torchpurify.models import build_model
from torchpurify.neurons.masks import _apply_mask
from torchpurify.train import TrainConfig, fit

NAMES = DEFENSES.names()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]  # fmt: skip


def quick(name: str, **extra) -> dict:
    """Settings that make ``name`` run in seconds on the tiny task."""
    cls = DEFENSES.get(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    params = {"device": "cpu", "batch_size": 32, **({"epochs": 1} if "epochs" in fields else {})}
    return {**params, **cls.quick, **extra}


def clean_of(tiny) -> Clean:
    return Clean(tiny.tune, tiny.holdout)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def on_own_device(module, args) -> None:
    """Forward pre-hook: every tensor a module is called with lives where its weights do."""
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if not tensors:
        return
    for arg in args:
        if isinstance(arg, torch.Tensor):
            assert arg.device == tensors[0].device, (type(module).__name__, arg.device)


@pytest.mark.parametrize("name", NAMES)
def test_params_round_trip_through_json_and_build_defense(name):
    defense = build_defense(name, **quick(name))
    params = defense.params()
    assert json.loads(json.dumps(params)) == params
    again = build_defense(name, **json.loads(json.dumps(params)))
    assert type(again) is type(defense) and again.params() == params
    assert build_defense(name).params() == DEFENSES.get(name)().params()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_purify_keeps_the_contract(name, device, tiny_backdoor, monkeypatch):
    model = copy.deepcopy(tiny_backdoor.model).eval()
    before = state_of(model)
    for module in model.modules():  # copied into the defense's copy with the model
        module.register_forward_pre_hook(on_own_device)
    hooks = {id(m): len(m._forward_hooks) for m in model.modules()}
    defense = build_defense(name, **quick(name, device=device))
    clean = Clean(tiny_backdoor.tune, tiny_backdoor.holdout, known_trigger=tiny_backdoor.trigger)
    torch.manual_seed(1234)
    expected = torch.rand(3)  # what the caller's generator gives next, untouched by a defense
    torch.manual_seed(1234)
    given = []  # the data every attempt's run received
    run = type(defense).run
    monkeypatch.setattr(
        type(defense), "run", lambda self, m, data: given.append(data) or run(self, m, data)
    )

    result = defense.purify(model, clean)

    assert torch.equal(torch.rand(3), expected), "the defense reseeded its caller's generator"
    # The input is untouched: weights, buffers, hooks, mode, device.
    assert result.model is not model and same_state(before, model.state_dict())
    assert {id(m): len(m._forward_hooks) for m in model.modules()} == hooks
    assert not model.training and next(model.parameters()).device.type == "cpu"
    # Everything of the result is on the defense's device; no counting hook is left on it.
    tensors = [*result.model.parameters(), *result.model.buffers()]
    assert all(t.device.type == device for t in tensors)
    for module in result.model.modules():
        assert all(hook is _apply_mask for hook in module._forward_hooks.values())
    # Passes are counted (by samples), time is measured, the log is JSON with the guard's record.
    json.dumps(result.log)
    # The guard checks its own share of the holdout, which no run (no selection rule) received.
    selection, kept_apart = split_guard(len(clean.holdout), defense.seed)
    checked = clean.holdout.subset(kept_apart)
    assert result.cost.forward >= 2 * len(checked) and result.cost.seconds > 0
    guard = result.log["guard"]
    assert guard["samples"] == len(checked) and guard["selection_samples"] == len(selection)
    assert guard["holdout_acc_input"] == pytest.approx(accuracy(model, checked))
    assert accuracy(result.model, checked) >= guard["floor"]
    assert given and all(data.guard is None for data in given)
    unseen = {row.numpy().tobytes() for row in checked.x}
    for data in given:
        assert all(
            data.holdout.x[i].numpy().tobytes() not in unseen for i in range(len(data.holdout))
        )
        assert torch.equal(data.holdout.x, clean.holdout.subset(selection).x)
    assert not result.model.training


def wrong_value(hint):
    """A value of a kind ``hint`` does not allow."""
    for value in ("x", 1.5, ["x"], {"x": 1}):
        if kind_problem(value, hint) is not None:
            return value
    raise AssertionError(f"no wrong value for {hint}")


@pytest.mark.parametrize("name", NAMES)
def test_bad_hyper_parameters_are_rejected_in_one_line(name):
    cls = DEFENSES.get(name)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        bad = wrong_value(hints[field.name])
        for build in (build_defense, lambda _, **params: cls(**params)):
            with pytest.raises(UserError) as caught:
                build(name, **{field.name: bad})
            message = str(caught.value)
            assert "\n" not in message and field.name in message and name in message, message
    with pytest.raises(UserError, match="unknown parameter 'not_a_parameter'"):
        build_defense(name, not_a_parameter=1)
    with pytest.raises(UserError, match="max_acc_drop"):
        build_defense(name, max_acc_drop=1.5)


@pytest.mark.parametrize("failure", ["collapse", "divergence"])
@pytest.mark.parametrize("name", NAMES)
def test_guard_backs_off_then_rolls_back(name, failure, tiny_backdoor, monkeypatch):
    """Whatever the defense, a result far below the holdout budget (all weights zero) or a
    divergence is never returned: the guard tries the gentler version, then the input."""
    cls = DEFENSES.get(name)
    tried = []

    def broken(self, model, clean):
        tried.append(self.params())
        if failure == "divergence":
            raise Divergence("training diverged (loss is nan in epoch 1); lower --lr")
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return Purified(model, {"note": "broken"})

    monkeypatch.setattr(cls, "run", broken)
    defense = build_defense(name, **quick(name))
    gentler = defense.back_off()
    assert gentler is None or (type(gentler) is cls and gentler.params() != defense.params())
    model = tiny_backdoor.model
    result = defense.purify(model, clean_of(tiny_backdoor))
    guard = result.log["guard"]
    assert guard["action"] == "rolled back to the input model"
    assert len(tried) == len(guard["attempts"]) == (1 if gentler is None else 2)
    assert same_state(state_of(model), result.model.state_dict())
    for attempt in guard["attempts"]:
        if failure == "divergence":
            assert "diverged" in attempt["diverged"] and attempt["holdout_acc"] is None
        else:
            assert attempt["holdout_acc"] < guard["floor"]
    if gentler is not None:
        assert tried[1] == gentler.params()


# --- A model without BatchNorm (issue 9: defaults were fitted to one family) ---------------------


def stripes(n: int, seed: int) -> Split:
    """Three classes: which third of an 8×8 image is bright, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    for k in range(3):
        x[y == k, :, :, 3 * k : 3 * k + 2] += 0.6
    return Split(x, y)


@pytest.fixture(scope="module")
def no_batchnorm():
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 8, 8), 3)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    fit(model, stripes(600, 0), TrainConfig(epochs=3, batch_size=32, progress=False, device="cpu"))
    clean = Clean(stripes(200, 1), stripes(150, 2))
    assert accuracy(model, clean.holdout) > 0.9
    return model, clean


@pytest.mark.parametrize("name", NAMES)
def test_no_defense_loses_more_than_its_budget_without_batchnorm(name, no_batchnorm):
    model, clean = no_batchnorm
    result = build_defense(name, **quick(name)).purify(model, clean)
    guard = result.log["guard"]
    assert accuracy(result.model, clean.holdout) >= guard["floor"], guard


@pytest.mark.parametrize("name", ["ft", "gnft", "salience-ar"])
def test_a_huge_learning_rate_is_backed_off_then_rolled_back_without_batchnorm(name, no_batchnorm):
    model, clean = no_batchnorm
    result = build_defense(name, **quick(name, lr=1e4)).purify(model, clean)
    guard = result.log["guard"]
    assert guard["action"] == "rolled back to the input model", guard
    # The step is halved whatever else the method's back-off halves (tests/test_back_off.py).
    assert [a["changed"].get("lr") for a in guard["attempts"]] == [None, 5e3]
    assert all(
        a["holdout_acc"] is None or a["holdout_acc"] < guard["floor"] for a in guard["attempts"]
    )
    assert same_state(state_of(model), result.model.state_dict())
    assert "rolled_back" in result.log


def test_a_result_with_non_finite_weights_is_never_returned(no_batchnorm, monkeypatch):
    """Training can end in NaN weights without a NaN loss (the last step blows up): even a
    budget that allows anything does not let such a result through."""
    model, clean = no_batchnorm
    cls = DEFENSES.get("ft")
    run = cls.run

    def nan_at_the_end(self, model, clean):
        result = run(self, model, clean)
        with torch.no_grad():
            next(result.model.parameters()).view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(cls, "run", nan_at_the_end)
    result = build_defense("ft", **quick("ft", max_acc_drop=0.99)).purify(model, clean)
    guard = result.log["guard"]
    assert [a.get("diverged") for a in guard["attempts"]] == [
        "the result has non-finite weights"
    ] * 2
    assert guard["action"] == "rolled back to the input model"
    assert same_state(state_of(model), result.model.state_dict())


@pytest.mark.parametrize("module", ["torchpurify.defenses", "torchpurify.metrics"])
def test_imports_on_its_own_in_a_fresh_interpreter(module):
    """The CLI imports the defenses first; an import cycle through the attacks package (an
    attack that trains imports metrics) broke `torchpurify purify` once."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-500:]


def test_the_guard_says_when_its_samples_cannot_vouch_for_every_class(tiny_backdoor):
    """A one-class holdout cannot vouch for a model that collapsed onto that class: the guard
    says how many of the model's classes its samples hold."""
    one = tiny_backdoor.holdout.subset((tiny_backdoor.holdout.y == 1).nonzero().flatten())
    defense = build_defense("clp", device="cpu")
    guard = defense.purify(tiny_backdoor.model, Clean(tiny_backdoor.tune, one)).log["guard"]
    assert guard["note"].startswith("the guard's samples hold 1 of the model's 6 classes")
    full = defense.purify(tiny_backdoor.model, Clean(tiny_backdoor.tune, tiny_backdoor.holdout))
    assert "note" not in full.log["guard"]


@pytest.mark.parametrize("name", ["gnft", "clp"])
def test_run_settings_by_name_go_to_the_context_and_the_guard(name):
    """``seed``, ``batch_size``, ``device``, ``max_acc_drop``... are taken by name as before,
    held apart from the hyper-parameters (``params()``), and checked in one line each."""
    defense = build_defense(name, seed=4, batch_size=16, device="cpu", max_acc_drop=0.02)
    assert (defense.context.seed, defense.context.batch_size) == (4, 16)
    assert defense.guard.max_acc_drop == 0.02 and defense.guard_retries == 1
    assert not {"seed", "batch_size", "device", "progress", "max_acc_drop"} & set(defense.params())
    assert defense.keyed_settings()["seed"] == 4 and "device" not in defense.keyed_settings()
    direct = DEFENSES.get(name)(seed=4, batch_size=16, device="cpu", max_acc_drop=0.02)
    assert direct.params() == defense.params() and direct.context == defense.context
    for setting in ("device", "seed", "batch_size", "progress", "max_acc_drop", "guard_retries"):
        with pytest.raises(UserError) as caught:
            build_defense(name, **{setting: ["x"]})
        assert "\n" not in str(caught.value) and setting in str(caught.value)
