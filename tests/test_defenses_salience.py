"""Salience-AR's parts (methods.md §4): what a unit is behind a BatchNorm, the scale-adaptive
penalty, the bias-corrected salience, and that the penalty silences a channel."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchpurify.data.base import Split
from torchpurify.defenses import Clean, build_defense
from torchpurify.defenses.salience_ar import (
    Group,
    Salience,
    adaptive_penalty,
    adaptive_penalty_grad,
    channel_normaliser,
)
from torchpurify.errors import UserError
from torchpurify.neurons import activation_stats
from torchpurify.train import FrozenRunningStats, TrainConfig, fit


def plain_cnn(seed=0):
    """A small CNN without BatchNorm, as a user writes one; its neuron layer is ``4`` (the
    ReLU after the conv ``3``)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, 6),  # 12×12 inputs
    )


def plain_backdoor(tiny):
    """``plain_cnn`` trained on tiny_backdoor's poisoned training split (ACC and ASR ≈ 1)."""
    model = plain_cnn()
    fit(model, tiny.train, TrainConfig(epochs=10, lr=0.05, batch_size=64, progress=False,
                                       device="cpu"))  # fmt: skip
    return model.eval()


def test_penalty_is_the_papers_at_unit_scale_and_scales_with_the_tensor():
    w = torch.tensor([-3.0, -1.0, -0.4, 0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    paper = torch.where(w.abs() > 1, torch.exp(w.abs() - 1), w.abs())
    assert torch.allclose(adaptive_penalty(w, 0.1), 0.1 * paper.sum())
    paper_grad = 0.1 * torch.sign(w) * torch.where(w.abs() > 1, torch.exp(w.abs() - 1), 1.0)
    assert torch.allclose(adaptive_penalty_grad(w, 0.1), paper_grad)
    # Scale-equivariant: the same weights at 1/20 the size, with τ at 1/20, are pushed the same
    # relative amount (the gradient shrinks with them, so SGD moves them the same fraction).
    c = 0.05
    assert torch.allclose(adaptive_penalty_grad(c * w, 0.1, c), c * adaptive_penalty_grad(w, 0.1))
    # The exponential branch acts past τ, not past 1: at τ = 0.05 a weight of 0.1 (far below 1)
    # is pushed e¹ times harder than one of 0.04.
    small = torch.tensor([0.04, 0.1])
    grad = adaptive_penalty_grad(small, 1.0, 0.05)
    assert grad[0] == pytest.approx(0.05) and grad[1] == pytest.approx(0.05 * torch.e.__float__())
    # The gradient is the penalty's derivative (autograd) below the cap.
    v = torch.tensor([-0.12, -0.03, 0.02, 0.09], dtype=torch.float64, requires_grad=True)
    adaptive_penalty(v, 0.3, 0.05).backward()
    assert torch.allclose(v.grad, adaptive_penalty_grad(v.detach(), 0.3, 0.05))


def test_salience_is_bias_corrected():
    weight = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
    group = Group("layer", "layer", [weight], per_channel=True, scales=[1.0])
    salience = Salience(decay=0.9)
    weight.grad = torch.tensor([[-1.0, 0.5], [0.0, 2.0]])
    salience.update([group])
    # After one update the reading is that batch's estimate, not 0.1× it.
    assert torch.allclose(salience["layer"], torch.tensor([0.0, 2.0]))
    salience.update([group])  # the same gradient again: a constant stays constant
    assert torch.allclose(salience["layer"], torch.tensor([0.0, 2.0]))
    weight.grad = torch.zeros_like(weight)
    salience.update([group])
    expected = torch.tensor([0.0, 2.0]) * (0.1 * 0.9 + 0.1 * 0.9**2) / (1 - 0.9**3)
    assert torch.allclose(salience["layer"], expected)


def test_behind_batchnorm_a_channel_is_its_bn_scale_and_shift(tiny_backdoor):
    """Conv weights feeding a BatchNorm: in training mode each channel's Σ −g ⊙ w is ≈ 0 (the
    loss is invariant to the channel's scale), so salience must be taken on the BN affine."""
    model = copy.deepcopy(tiny_backdoor.model).train()
    example = tiny_backdoor.holdout.x[:2]
    assert channel_normaliser(model, "block4.0", example) == "block4.1"
    assert channel_normaliser(model, "classifier", example) is None
    defense = build_defense("salience-ar", unit="channel", device="cpu")
    channels = defense.groups(model, ["block4.0"], example)[0]
    weights = build_defense("salience-ar", unit="weight").groups(model, ["block4.0"], example)[0]
    assert channels.owner == "block4.1" and channels.per_channel
    assert weights.owner == "block4.0" and not weights.per_channel
    x, y = tiny_backdoor.tune.x[:128], tiny_backdoor.tune.y[:128]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    weight_sums = weights.estimate().flatten(1).sum(1)  # per channel, over the conv fan-in
    affine = channels.estimate()
    # The affine salience is an ordinary first-order estimate; the weight sums are rounding noise.
    assert affine.abs().max() > 0
    assert weight_sums.abs().max() < 1e-3 * affine.abs().max()


def channel_means(model, layer, data):
    return activation_stats(model, layer, data).mean


@pytest.mark.parametrize("with_bn", [True, False])
def test_the_penalty_silences_the_channels_it_selects(with_bn, tiny_backdoor):
    """AR on the selected channels' controls drives their output to 0. With a BatchNorm the
    controls are γ, β; a penalty on the conv weights alone leaves the channels on (BN rescales)."""
    tiny = tiny_backdoor
    clean = Clean(tiny.tune, tiny.holdout)
    model = tiny.model if with_bn else plain_backdoor(tiny)
    layer = "block4.2" if with_bn else "4"
    producer = "block4.0" if with_bn else "3"
    recipe = dict(
        device="cpu", epochs=6, lr=0.05, alpha=3.0, beta=0.5, beta_final=0.5, unit="channel",
        layers=[producer], max_acc_drop=0.99, batch_size=64,
    )  # fmt: skip
    result = build_defense("salience-ar", **recipe).purify(model, clean)
    assert result.log["regularised"][producer] == ("block4.1" if with_bn else producer)
    before = channel_means(model, layer, tiny.holdout)
    after = channel_means(result.model, layer, tiny.holdout)
    quiet = 0.15 * before.abs().mean()
    silenced = (after.abs() < quiet).float().mean()
    was_quiet = (before.abs() < quiet).float().mean()
    print(f"silenced {silenced:.2f} (before {was_quiet:.2f})")
    assert silenced >= was_quiet + 0.2  # much of the selected half (β = 0.5) is off
    if with_bn:  # the paper's weight units: the same push on conv weights silences nothing
        weights = build_defense("salience-ar", **{**recipe, "unit": "weight"}).purify(model, clean)
        kept = channel_means(weights.model, layer, tiny.holdout)
        print(f"weight units: silenced {(kept.abs() < quiet).float().mean():.2f}")
        assert (kept.abs() < quiet).float().mean() <= was_quiet + 0.05


def test_unknown_unit_is_a_user_error():
    with pytest.raises(UserError, match="unit must be channel or weight"):
        build_defense("salience-ar", unit="neuron")
    with pytest.raises(UserError, match="beta_final must be in \\[beta, 1\\]"):
        build_defense("salience-ar", beta=0.5, beta_final=0.3)


def test_runs_on_a_model_without_batchnorm_and_keeps_it_working():
    torch.manual_seed(0)
    x = torch.rand(300, 1, 12, 12)
    y = (x[:, 0, :6].mean((1, 2)) > x[:, 0, 6:].mean((1, 2))).long()
    data = Split(x, y)
    model = plain_cnn()
    fit(model, data, TrainConfig(epochs=8, lr=0.05, progress=False, device="cpu"))
    holdout = data.subset(list(range(240, 300)))
    clean = Clean(data.subset(list(range(240))), holdout)
    result = build_defense("salience-ar", device="cpu", batch_size=64).purify(model, clean)
    assert result.log["guard"]["action"] == "kept"  # the defaults alone stay within the budget
    channels = build_defense("salience-ar", unit="channel", device="cpu", batch_size=64)
    result = channels.purify(model, clean)
    assert result.log["unit"] == {"3": "channel", "7": "weight"}  # the classifier: weights
    assert result.log["regularised"] == {"3": "3", "7": "7"}  # no BatchNorm: the conv itself
    assert result.log["guard"]["action"] == "kept"


@pytest.mark.parametrize("epochs", [1, 2, 5, 10])
def test_the_schedule_runs_from_beta_to_beta_final(epochs):
    """The share of units AR acts on is β in the first epoch and β_final in the last (the earlier
    e/E never reached β_final: 0.95 at E = 10); a single epoch is the last."""
    defense = build_defense("salience-ar", epochs=epochs, beta=0.5, beta_final=1.0)
    ratios = [defense.ratio(e) for e in range(epochs)]
    assert ratios[-1] == 1.0
    assert ratios == sorted(ratios)
    if epochs > 1:
        assert ratios[0] == 0.5
        assert ratios[1] - ratios[0] == pytest.approx(0.5 / (epochs - 1))


def test_the_last_epoch_regularises_beta_final_of_the_units(tiny_backdoor):
    """Through a whole run: with β_final = 1 the last epoch selects every unit."""
    clean = Clean(tiny_backdoor.tune, tiny_backdoor.holdout)
    defense = build_defense(
        "salience-ar", device="cpu", epochs=3, beta=0.5, beta_final=1.0, batch_size=64,
        max_acc_drop=0.99,
    )  # fmt: skip
    result = defense.purify(tiny_backdoor.model, clean)
    assert result.log["guard"]["action"] == "kept"
    assert result.log["ratios"] == pytest.approx([0.5, 0.75, 1.0])


def bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}


@pytest.mark.parametrize("freeze_bn_stats", [False, True])
def test_warm_up_salience_is_taken_in_the_mode_purification_trains_in(
    freeze_bn_stats, tiny_backdoor
):
    """The warm-up's salience estimates the loss the training steps estimate (training mode;
    BatchNorm on batch statistics unless frozen), not the evaluation-mode loss, and changes no
    weight, running statistic or mode. Behind a BatchNorm the conv channel's Σ −g ⊙ w is 0 in
    training mode (scale invariance) and not in evaluation mode, which tells the two apart."""
    model = copy.deepcopy(tiny_backdoor.model).eval()
    data = tiny_backdoor.tune.subset(list(range(64)))  # one whole batch
    conv = model.get_submodule("block4.0")
    group = Group("block4.0", "block4.0", [conv.weight], per_channel=True, scales=[1.0])
    weights, stats = copy.deepcopy(model.state_dict()), bn_state(model)

    warm = Salience(0.9).warm_up(model, data, [group], 64, freeze_bn_stats)["block4.0"]

    assert not model.training and all(not m.training for m in model.modules())
    for key, value in bn_state(model).items():
        assert torch.equal(value, stats[key]), key
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key

    def estimate(train_mode):
        model.train(train_mode)
        if freeze_bn_stats:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        model.zero_grad()
        with FrozenRunningStats(model):
            F.cross_entropy(model(data.x), data.y).backward()
        model.eval()
        return group.estimate()

    training, evaluation = estimate(True), estimate(False)
    assert torch.allclose(warm, training, atol=1e-7)
    if freeze_bn_stats:  # evaluation-mode BatchNorm in both, as the trainer runs it
        assert torch.allclose(warm, evaluation, atol=1e-7)
    else:
        assert warm.abs().max() < 1e-3 * evaluation.abs().max()
