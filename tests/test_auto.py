"""``purify --defense auto`` (issue 28 item 3, torchpurify.auto): the estimate decides whether to
purify and which defenses to try."""

import dataclasses

import pytest
import torch

from tests.conftest import TINY_CLASSES, gratings
from tests.test_defenses import TINY, measure
from tests.test_estimate import CHEAP, tiny_clean  # noqa: F401 (a fixture)
from torchpurify import catalogue
from torchpurify.api import purify
from torchpurify.auto import ORDER, Auto, build_defense, describe, estimate_record
from torchpurify.defenses import Clean
from torchpurify.errors import UserError


def test_a_clean_model_comes_back_unchanged_and_the_log_says_why(tiny_clean):  # noqa: F811
    model, _ = tiny_clean
    data = gratings(400, seed=5)
    purified, record = purify(model, (data.x, data.y), "auto", device="cpu", estimate=CHEAP)
    for a, b in zip(purified.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    log = record.log["auto"]
    assert record.defense == "auto" and record.chosen is None and not log["suspected"]
    assert log["tried"] == [] and log["stopped"].startswith("nothing suspected")
    assert record.forward_passes == 0 and record.backward_passes == 0  # no defense ran
    assert record.estimate["summary"].endswith("no backdoor was suspected before or after")
    assert record.estimate["holdout"] == "selection" and not record.estimate["removed"]
    assert "chose none" in describe(record.log)


def test_a_patch_backdoor_is_removed_by_the_first_defense_of_the_mask_family(tiny_backdoor):
    tiny = tiny_backdoor
    auto = build_defense("auto", device="cpu", settings=TINY)
    auto.estimate_config = CHEAP
    result = auto.purify(tiny.model, Clean(tiny.tune, tiny.holdout))
    log = result.log["auto"]
    assert log["suspected"] and log["family"] == "mask" and log["label"] == tiny.target
    assert log["order"] == list(ORDER["mask"]) and log["chosen"] == "linf-pruning"
    (tried,) = log["tried"]  # the first one worked: nothing else was tried
    assert tried["guard"] == "kept" and tried["est_asr_after"] < 0.5
    assert "no longer suspects a backdoor" in log["stopped"]
    before, after = measure(tiny.model, tiny), measure(result.model, tiny)
    assert after.asr < 0.2 < 0.9 < before.asr and after.acc > before.acc - 0.05
    assert log["estimate_holdout"] == len(tiny.holdout) // 2  # the guard's half is not read
    record = estimate_record(result.log)
    assert record["removed"] and record["chosen"] == "linf-pruning"
    assert result.log["guard"]["action"] == "kept"  # the chosen defense's own log is kept


def test_when_nothing_works_the_best_kept_result_is_returned(tiny_backdoor, monkeypatch):
    """A defense that changes nothing leaves the estimate flagged: every one in the order is
    tried, and the best (lowest estimated ASR, then holdout accuracy) is returned."""
    from torchpurify.defenses.gnft import FineTuning

    tiny = tiny_backdoor
    monkeypatch.setattr(FineTuning, "run", lambda self, model, clean: _unchanged(model))
    auto = build_defense("auto", device="cpu", order="ft, ft")
    auto.estimate_config = dataclasses.replace(CHEAP, steps=60)
    result = auto.purify(tiny.model, Clean(tiny.tune, tiny.holdout))
    log = result.log["auto"]
    assert [t["defense"] for t in log["tried"]] == ["ft", "ft"]
    assert log["chosen"] == "ft" and log["stopped"].startswith("no defense tried took")


def _unchanged(model):
    from torchpurify.defenses import Purified

    return Purified(model, {})


def test_auto_is_listed_and_checked():
    assert "auto" in catalogue.listed("defenses") and "auto" not in catalogue.names("defenses")
    assert isinstance(build_defense("auto"), Auto)
    assert build_defense("auto", order="gnft").tried_names("mask") == ["gnft"]
    with pytest.raises(UserError, match="unknown defense 'nope'"):
        build_defense("auto", order="nope")
    with pytest.raises(UserError, match="unknown parameter 'epochs' for defense 'auto'"):
        build_defense("auto", epochs=3)
    assert build_defense("ft").name == "ft"  # every other name: the registry's
    assert TINY_CLASSES == 6


def test_auto_built_directly_takes_the_run_settings_by_name_as_a_registered_defense_does():
    """``Auto(seed=3, max_acc_drop=0.02)`` routes them to its run context and guard, as
    ``GradientNormFineTuning(seed=3)`` does; its hyper-parameters stay apart."""
    from torchpurify.auto import Auto

    auto = Auto(seed=3, max_acc_drop=0.02, order="ft")
    assert (auto.seed, auto.max_acc_drop) == (3, 0.02)
    assert auto.params() == {"order": "ft", "settings": {}}
    assert auto.params() == build_defense("auto", seed=3, max_acc_drop=0.02, order="ft").params()
