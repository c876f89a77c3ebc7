"""The guard's back-off knows its method (issue 27 item 2; methods.md §0, the guard).

When a result misses the holdout budget, :meth:`Defense.purify` asks the defense for a gentler
version (:meth:`Defense.back_off`), and each defense says what gentler means: FST a smaller α and
more steps (not a smaller step), the pruning defenses a smaller cut (``cut_scale`` halved, then
no fine-tuning), I-BAU a smaller radius, the fine-tuning defenses a smaller step and, where it
is what costs accuracy, their own strength knob. Every registered defense must be listed in
:data:`BACK_OFFS`, so a new defense has to say what its back-off is.
"""

from __future__ import annotations

import pytest
import torch

from torchpurify.defenses import DEFENSES, Clean, build_defense
from torchpurify.defenses.mask_pruning import prune_by_mask_values
from torchpurify.defenses.pruning import MIN_CUT_SCALE
from torchpurify.neurons import masked_layers

HALVED, DOUBLED = 0.5, 2.0
# What each back-off changes, by what factor; then what comes after the cut is at its smallest
# (a dict of changed fields, or None: the input model comes back). None for the defenses whose
# back-off goes on halving.
BACK_OFFS: dict[str, tuple[dict[str, float], dict | None | str]] = {
    "ft": ({"lr": HALVED}, "endless"),
    "gnft": ({"lr": HALVED, "r": HALVED}, "endless"),
    "ft-sam": ({"lr": HALVED, "rho": HALVED}, "endless"),
    "salience-ar": ({"lr": HALVED, "alpha": HALVED}, "endless"),
    "nad": ({"lr": HALVED, "beta": HALVED}, "endless"),
    "fst": ({"alpha": HALVED, "epochs": DOUBLED}, "endless"),
    "i-bau": ({"max_norm": HALVED}, "endless"),
    "sau": ({"eps": HALVED}, "endless"),
    "bti-dbf": ({"radius": HALVED}, "endless"),
    "tsbd": ({"lr": HALVED, "cut_scale": HALVED}, "endless"),
    "fine-pruning": ({"cut_scale": HALVED}, {"prune_only": True}),
    "linf-pruning": ({"cut_scale": HALVED}, {"fine_tune": False}),
    "anp": ({"cut_scale": HALVED}, None),
    "rnp": ({"cut_scale": HALVED}, None),
    "clp": ({"cut_scale": HALVED}, None),
}
HALVINGS = 3  # 1 → 1/2 → 1/4 → 1/8 = MIN_CUT_SCALE


def test_every_defense_says_what_its_back_off_is():
    assert sorted(BACK_OFFS) == sorted(DEFENSES.names())
    assert 0.5**HALVINGS == MIN_CUT_SCALE


@pytest.mark.parametrize("name", sorted(BACK_OFFS))
def test_each_back_off_moves_its_own_knobs_only(name):
    knobs, after = BACK_OFFS[name]
    defense = build_defense(name)
    for _ in range(HALVINGS):
        gentler = defense.back_off()
        assert gentler is not None and type(gentler) is type(defense)
        before, now = defense.params(), gentler.params()
        changed = {k for k in now if now[k] != before[k]}
        assert changed == set(knobs), (name, changed)
        for knob, factor in knobs.items():
            assert now[knob] == pytest.approx(before[knob] * factor), (name, knob)
        assert "lr" in knobs or now.get("lr") == before.get("lr")  # FST, I-BAU, the pruners
        defense = gentler
    last = defense.back_off()
    if after == "endless":
        assert last is not None
    elif after is None:
        assert last is None
    else:
        before, now = defense.params(), last.params()
        assert {k: v for k, v in now.items() if before[k] != v} == after
        assert last.back_off() is None


def test_fst_backs_off_on_alpha_and_steps_not_the_step():
    fst = build_defense("fst")
    gentler = fst.back_off()
    assert (fst.alpha, fst.epochs) == (0.05, 30)  # the development default (methods.md §12.14)
    assert (gentler.alpha, gentler.epochs, gentler.lr) == (0.025, 60, fst.lr)


# --- on the tiny backdoored model: the guard's log shows the method's own change --------------


def clean_of(tiny) -> Clean:
    return Clean(tiny.tune, tiny.holdout)


def test_fst_guard_log_shows_alpha_halved_and_steps_doubled(tiny_backdoor):
    """An α that wrecks the new head misses a zero budget; the back-off halves α and doubles
    the epochs, at the same learning rate."""
    fst = build_defense("fst", device="cpu", batch_size=32, epochs=1, alpha=5.0, max_acc_drop=0.0)
    guard = fst.purify(tiny_backdoor.model, clean_of(tiny_backdoor)).log["guard"]
    assert [a["changed"] for a in guard["attempts"]] == [{}, {"alpha": 2.5, "epochs": 2}]
    assert guard["attempts"][0]["holdout_acc"] < guard["floor"]


def test_fine_pruning_guard_backs_off_to_half_the_cut(tiny_backdoor):
    """The cut chosen at the edge of the budget on the selection samples loses more on the
    guard's own (0.917 against a floor of 0.92, 107 channels); half of it (53) is kept."""
    defense = build_defense(
        "fine-pruning", device="cpu", batch_size=32, prune_only=True, max_acc_drop=0.08
    )
    result = defense.purify(tiny_backdoor.model, clean_of(tiny_backdoor))
    guard, log = result.log["guard"], result.log
    assert [a["changed"] for a in guard["attempts"]] == [{}, {"cut_scale": 0.5}]
    assert (
        guard["attempts"][0]["holdout_acc"] < guard["floor"] <= guard["attempts"][1]["holdout_acc"]
    )
    assert guard["action"] == "backed off: cut_scale=0.5"
    assert log["num_pruned"] == log["num_within_budget"] // 2 and log["num_pruned"] > 0
    assert len(log["pruned"]) == log["num_pruned"]


def test_clp_guard_backs_off_to_the_most_outlying_half(tiny_backdoor):
    """At u = 1 CLP prunes more than a zero budget allows; the back-off prunes half of those
    channels, the most outlying ones."""
    defense = build_defense("clp", device="cpu", batch_size=32, u=1.0, max_acc_drop=0.0)
    result = defense.purify(tiny_backdoor.model, clean_of(tiny_backdoor))
    guard = result.log["guard"]
    assert [a["changed"] for a in guard["attempts"]] == [{}, {"cut_scale": 0.5}]
    first, second = (a["holdout_acc"] for a in guard["attempts"])
    assert second > first
    log = result.log.get("rolled_back") or result.log
    assert log["num_pruned"] == log["num_within_threshold"] // 2
    outlying = []  # (z, layer, channel) of every channel over CLP's threshold mean + u·std
    for layer, scores in log["uclc"].items():
        bound = torch.tensor(scores)
        z = (bound - bound.mean()) / bound.std()
        outlying += [(float(z[c]), layer, c) for c in range(len(bound)) if z[c] > 1.0]
    pruned = {(layer, c) for layer, channels in log["pruned"].items() for c in channels}
    assert len(outlying) == log["num_within_threshold"]
    kept = [z for z, layer, c in outlying if (layer, c) in pruned]
    spared = [z for z, layer, c in outlying if (layer, c) not in pruned]
    assert len(kept) == len(pruned) and min(kept) >= max(spared) - 1e-3


# --- every pruning rule prunes the share cut_scale of what it chose ---------------------------


# RNP prunes by ANP's rule (MaskPruning.prune), tested here through ANP.
QUICK = {
    "fine-pruning": {"epochs": 1},
    "linf-pruning": {"epochs": 1, "trigger": "known"},
    "anp": {"iterations": 12},
    "tsbd": {"epochs": 1, "unlearn_epochs": 3, "unlearn_lr": 0.05, "fraction": 0.2},
}


@pytest.mark.parametrize("name", sorted(QUICK))
def test_half_the_cut_prunes_half_of_what_the_rule_chose(name, tiny_backdoor):
    clean = clean_of(tiny_backdoor)
    clean.known_trigger = tiny_backdoor.trigger
    runs = {}
    for scale in (1.0, 0.5):
        defense = build_defense(
            name, device="cpu", batch_size=32, max_acc_drop=0.5, guard_retries=0,
            cut_scale=scale, **QUICK[name],
        )  # fmt: skip
        runs[scale] = defense.purify(tiny_backdoor.model, clean)
    full, half = runs[1.0].log, runs[0.5].log
    assert half["cut_scale"] == 0.5
    if name == "tsbd":
        assert 0 < len(half["zeroed_neurons"]) == int(full["neurons"] * 0.2 * 0.5)
        assert len(full["zeroed_neurons"]) == int(full["neurons"] * 0.2)
        return
    within = full["num_within_budget"]
    assert within == full["num_pruned"] > 1
    assert half["num_within_budget"] == within and half["num_pruned"] == within // 2
    masks = masked_layers(runs[0.5].model)
    assert sum(int((mask == 0).sum()) for mask in masks.values()) == within // 2


def test_mask_pruning_keeps_the_smallest_mask_values(tiny_backdoor):
    """ANP's and RNP's rule at half the cut: of the neurons under the threshold, those with the
    smallest mask values, across layers."""
    model = tiny_backdoor.model
    import copy

    from torchpurify.neurons.units import mask_neurons

    layers = mask_neurons(model, tiny_backdoor.holdout.x[:2])
    values = {name: torch.ones(channels) for name, channels in layers}
    (first, _), (second, _) = layers[0], layers[-1]
    values[first][[0, 1, 2]] = torch.tensor([0.05, 0.0, 0.2])
    values[second][[3, 4]] = torch.tensor([0.1, 0.15])
    log = prune_by_mask_values(
        copy.deepcopy(model), values, tiny_backdoor.holdout, budget=lambda a, n: 1.0,
        pruning_max=0.9, threshold=0.2, batch_size=64, cut_scale=0.5,
    )  # fmt: skip
    assert log["num_within_budget"] == 5 and log["num_pruned"] == 2
    assert log["pruned"] == {first: [0, 1]} or log["pruned"] == {first: [0, 1], second: []}
