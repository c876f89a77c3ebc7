"""ANP, CLP and RNP: the defense contract, the behaviour each paper claims, and the cases the
reference code gets wrong (CLP without BatchNorm, 1-D convolutions)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchpurify.data.base import Split
from torchpurify.defenses import Clean, build_defense
from torchpurify.defenses.rnp import WeightGates, switches_off
from torchpurify.errors import UserError
from torchpurify.metrics import evaluate
from torchpurify.models import build_model
from torchpurify.models.io import load_model, save_model
from torchpurify.neurons import masked_layers
from torchpurify.neurons.units import mask_neurons

# Sized for the tiny task (432 tune images, 6 classes). RNP stops unlearning at 0.4 accuracy:
# the paper's 0.2 is twice chance on 10 classes but chance itself on 6.
TINY = {
    # A 5-point budget: the tiny task's perfect 120-sample guard half allows under 3 errors by
    # the noise rule, which the selection, made on the other half, can miss by one sample.
    "anp": {"iterations": 120, "max_acc_drop": 0.05},
    "clp": {},
    "rnp": {"clean_threshold": 0.4, "recovering_epochs": 5, "max_acc_drop": 0.05},
}


def measure(model, tiny):
    return evaluate(model, tiny.test, tiny.trigger, target=tiny.target, num_classes=6)


@pytest.fixture(scope="module")
def runs(tiny_backdoor):
    """Each defense once on the tiny backdoored model, and the input's state before it ran."""
    state = copy.deepcopy(tiny_backdoor.model.state_dict())
    out = {}
    for name, params in TINY.items():
        defense = build_defense(name, device="cpu", batch_size=64, **params)
        out[name] = (defense, defense.purify(tiny_backdoor.model, clean_of(tiny_backdoor)))
    return state, out


def clean_of(tiny):
    return Clean(tiny.tune, tiny.holdout)


@pytest.mark.parametrize("name", sorted(TINY))
def test_contract_input_untouched_params_round_trip_passes_counted(name, runs, tiny_backdoor):
    state, results = runs
    defense, result = results[name]
    for key, value in tiny_backdoor.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not masked_layers(tiny_backdoor.model)
    assert build_defense(name, **defense.params()).params() == defense.params()
    assert result.cost.seconds > 0 and result.cost.forward > 0
    # CLP is data-free: it runs two holdout inputs to see the layers and the guard's probes.
    assert (result.cost.backward > 0) is (name != "clp")
    assert result.log["num_pruned"] == sum(
        int((mask == 0).sum()) for mask in masked_layers(result.model).values()
    )


def test_anp_asr_falls_and_accuracy_stays_on_the_tiny_backdoor(runs, tiny_backdoor):
    """ANP at this recipe removes the tiny backdoor on each of the defense's seeds 0-3 (ASR
    0.000, ACC ≥ 0.967, 2026-12-07); seed 0 runs here."""
    before = measure(tiny_backdoor.model, tiny_backdoor)
    after = measure(runs[1]["anp"][1].model, tiny_backdoor)
    assert before.asr > 0.9 and after.asr < 0.2, (before, after)
    assert after.acc > before.acc - 0.05, (before, after)


def test_rnp_removes_the_tiny_backdoor_on_some_seeds_and_never_costs_accuracy(tiny_backdoor):
    """RNP is seed-sensitive (methods.md §6.8, known failure modes): on the tiny task its
    recovered masks pass the threshold that removes the backdoor on seeds 0 and 2 (ASR 0.005,
    0.017) and on 1 and 3 leave it (1.000; on 24×24 three of four leave it; with other
    convolution kernels, one of four on 12×12). A single seed would pass or fail with the
    machine's arithmetic: over four, it removes the backdoor at least once and never costs
    more than its budget."""
    before = measure(tiny_backdoor.model, tiny_backdoor)
    removed = 0
    for seed in range(4):
        defense = build_defense("rnp", device="cpu", batch_size=64, seed=seed, **TINY["rnp"])
        after = measure(defense.purify(tiny_backdoor.model, clean_of(tiny_backdoor)).model,
                        tiny_backdoor)  # fmt: skip
        removed += after.asr < 0.2
        assert after.acc > before.acc - 0.05, (seed, before, after)
    assert before.asr > 0.9 and removed >= 1, removed


@pytest.mark.parametrize("name", ["anp", "rnp"])
def test_threshold_is_the_largest_within_the_holdout_budget(name, runs):
    log = runs[1][name][1].log
    curve = {t: acc for t, acc in log["curve"] if t is not None}
    assert log["holdout_acc_pruned"] >= log["floor"]
    assert log["threshold"] in curve and curve[log["threshold"]] >= log["floor"]
    assert all(acc < log["floor"] for t, acc in curve.items() if t > log["threshold"])
    values = torch.tensor(sum(log["mask_values"].values(), []))
    assert log["num_pruned"] == int((values <= log["threshold"]).sum())


@pytest.mark.parametrize("name", sorted(TINY))
def test_masks_survive_save_and_load(name, runs, tiny_backdoor, tmp_path):
    model = runs[1][name][1].model
    masks = masked_layers(model)
    if not masks:
        pytest.skip(f"{name} pruned nothing here")
    card = {"input_shape": [1, 12, 12], "classes": list("abcdef"), "attack": None}
    save_model(model, tmp_path / "m", card)
    reloaded, saved = load_model(tmp_path / "m")
    assert saved["masks"] == {layer: len(mask) for layer, mask in masks.items()}
    for layer, mask in masked_layers(reloaded).items():
        assert torch.equal(mask, masks[layer])
    x = tiny_backdoor.test.x[:32]
    with torch.no_grad():
        assert torch.allclose(reloaded(x), model(x), atol=1e-5)


def test_rnp_prunes_without_switching_a_layer_off(runs, tiny_backdoor):
    """Issue 27 item 3: the recovery masked whole channels of small-cnn's last feature layer,
    which nothing bypasses, and switched it off; now that layer is left out, the masks scale γ
    only, and the unlearning stops at its target within the epoch."""
    log = runs[1]["rnp"][1].log
    assert log["left_out"] == "block4.1"
    assert "block4.1" not in log["mask_values"]
    assert log["num_pruned"] > 0
    assert log["zeroed_layers"] == []
    for layer, values in log["mask_values"].items():
        assert max(values) > 0, layer
    last = log["unlearning"][-1]
    threshold = TINY["rnp"]["clean_threshold"]
    assert "stopped_at_batch" in last or last["train_acc"] <= threshold
    assert all("stopped_at_batch" not in record for record in log["unlearning"][:-1])


class Residual(nn.Module):
    """conv → BN → ReLU with an identity path around the BN: the reference ResNet's last block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        features = self.conv(x)
        out = torch.relu(self.bn(features) + features)
        return self.head(out.mean((2, 3)))


def test_rnp_leaves_out_a_last_layer_only_when_nothing_bypasses_it():
    x = torch.rand(8, 1, 8, 8)
    plain = conv_net(2, batchnorm=True)
    last = mask_neurons(plain, x[:2])[-1]
    assert last == ("7", 16) and switches_off(plain, last, x)
    torch.manual_seed(0)
    residual = Residual().eval()
    assert mask_neurons(residual, x[:2]) == [("bn", 4)]
    assert not switches_off(residual, ("bn", 4), x)


def test_rnp_masks_scale_gamma_and_keep_beta():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, 3.0, 4.0]))
        bn.bias.copy_(torch.tensor([0.5, -1.0, 1.5]))
    model = nn.Sequential(bn)
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        plain = bn(x)
    gates = WeightGates(model, [("0", 3)])
    with torch.no_grad():
        gates.masks[0].copy_(torch.tensor([0.0, 0.5, 1.0]))
        out = model(x)
    gates.remove()
    assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], 0.5))
    assert torch.allclose(out[:, 1] - (-1.0), 0.5 * (plain[:, 1] - (-1.0)), atol=1e-6)
    assert torch.allclose(out[:, 2], plain[:, 2])


def conv_net(dims: int, batchnorm: bool) -> nn.Module:
    """Three convs (1-D on N×T waveforms, or 2-D on images), with or without BatchNorm."""
    conv, norm, pool = {
        1: (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d),
        2: (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d),
    }[dims]
    layers: list[nn.Module] = [nn.Unflatten(1, (1, -1))] if dims == 1 else []
    cin = 1
    for cout in (8, 16, 16):
        layers += [conv(cin, cout, 3, padding=1)]
        layers += [norm(cout)] if batchnorm else []
        layers += [nn.ReLU()]
        cin = cout
    layers += [pool(1), nn.Flatten(), nn.Linear(cin, 3)]
    torch.manual_seed(0)
    return nn.Sequential(*layers).eval()


def few(shape, n=16):
    g = torch.Generator().manual_seed(0)
    return Split(torch.rand(n, *shape, generator=g), torch.arange(n) % 3)


@pytest.mark.parametrize(
    ("dims", "batchnorm", "shape"),
    [(1, False, (40,)), (1, True, (40,)), (2, False, (1, 8, 8)), (2, True, (1, 8, 8))],
)
def test_clp_prunes_the_channel_with_an_outlying_lipschitz_bound(dims, batchnorm, shape):
    """The reference pairs every BatchNorm with the conv registered before it and breaks without
    one (rkteddy/channel-Lipschitzness-based-pruning#2): here a conv's own weights bound it."""
    model = conv_net(dims, batchnorm)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    target = convs[1]
    with torch.no_grad():
        if batchnorm:  # the BatchNorm's scale makes the outlier: σ_max(W_k)·|γ_k|/σ_k
            bn = model[int(target) + 1]
            bn.weight[5] = 50.0
        else:
            model.get_submodule(target).weight[5] *= 50
    data = few(shape)
    result = build_defense("clp", device="cpu").purify(model, Clean(data, data))
    masked_at = str(int(target) + 1) if batchnorm else target
    assert result.log["pruned"] == {masked_at: [5]}
    module = dict(result.model.named_modules())[masked_at]
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.update(out=o))
    result.model(data.x)
    handle.remove()
    assert torch.count_nonzero(seen["out"][:, 5]) == 0
    assert torch.count_nonzero(seen["out"][:, 4]) > 0


def test_clp_on_a_model_without_convolutions_scores_its_hidden_linear_units():
    torch.manual_seed(0)
    model = build_model("lstm", (8000,), 4).eval()
    with torch.no_grad():
        model.features[0].weight[7] *= 50
    data = few((8000,), n=4)
    result = build_defense("clp", device="cpu").purify(model, Clean(data, data))
    assert result.log["pruned"] == {"features.0": [7]}
    none = build_defense("clp", device="cpu", layers="conv").purify(model, Clean(data, data))
    assert none.log["num_pruned"] == 0


IMAGE = {"small-cnn": (1, 12, 12), "lenet5": (1, 12, 12), "preact-resnet18": (3, 8, 8),
         "vgg11-bn": (3, 8, 8)}  # fmt: skip
AUDIO = {name: (8000,) for name in ("kws-cnn", "res8", "ds-cnn", "lstm", "m5")}


@pytest.mark.parametrize("architecture", sorted({**IMAGE, **AUDIO}))
def test_every_defense_runs_on_every_registered_model(architecture):
    shape = {**IMAGE, **AUDIO}[architecture]
    torch.manual_seed(0)
    model = build_model(architecture, shape, 3).eval()
    data = few(shape, n=24)
    neurons = mask_neurons(model, data.x[:2])
    assert neurons and all(channels > 1 for _, channels in neurons)
    clean = Clean(data.subset(range(16)), data.subset(range(16, 24)))
    for name in sorted(TINY):
        quick = build_defense(name).quick
        result = build_defense(name, device="cpu", batch_size=8, **quick).purify(model, clean)
        assert result.model(data.x[:2]).shape == (2, 3), (architecture, name)


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("anp", {"eps": 1.5}, "anp: eps must be in [0, 1)"),
        ("anp", {"iterations": 0}, "anp: iterations must be at least 1"),
        ("anp", {"threshold": 2.0}, "anp: threshold must be"),
        ("anp", {"eps": "big"}, "anp: eps must be a number"),
        ("clp", {"u": -1}, "clp: u must be ≥ 0"),
        ("clp", {"layers": "all"}, "clp: layers must be auto, conv or conv+linear"),
        ("rnp", {"clean_threshold": 2}, "rnp: clean_threshold must be in [0, 1]"),
        ("rnp", {"pruning_max": 0}, "rnp: pruning_max must be in (0, 1]"),
    ],
)
def test_bad_hyper_parameters_are_one_line_errors(name, params, fragment):
    with pytest.raises(UserError) as error:
        build_defense(name, **params)
    assert fragment in str(error.value) and "\n" not in str(error.value)
