import copy
import math

import pytest
import torch

from torchpurify.data.base import Split
from torchpurify.errors import Divergence, UserError
from torchpurify.metrics import accuracy
from torchpurify.models import build_model
from torchpurify.train import (
    TrainConfig,
    Trainer,
    augment_batch,
    count_passes,
    descend,
    fit,
    resolve_device,
    standard_step,
)


def bright_or_dark(n=256, seed=0):
    """Class = whether the top half of the image is brighter than the bottom half."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.5
    y = torch.randint(0, 2, (n,), generator=g)
    x[y == 1, :, :4] += 0.5
    x[y == 0, :, 4:] += 0.5
    return Split(x, y)


def config(**kw):
    return TrainConfig(
        **{"epochs": 3, "batch_size": 32, "lr": 0.05, "progress": False, "device": "cpu", **kw}
    )


def test_training_learns_and_counts_passes():
    data = bright_or_dark()
    torch.manual_seed(0)
    model = build_model("small-cnn", (1, 8, 8), 2)
    result = fit(model, data, config(), val=bright_or_dark(seed=1))
    assert accuracy(model, bright_or_dark(seed=2)) > 0.95
    assert len(result.history) == 3 and result.history[-1]["val_acc"] > 0.95
    # Samples, counted by hooks: 3 epochs × 8 batches of 32 forward and backward, and the
    # 256 validation samples of each epoch forward only.
    assert result.cost.backward == 3 * 8 * 32
    assert result.cost.forward == 3 * 8 * 32 + 3 * 256
    assert result.cost.seconds > 0
    assert not model.training


def test_same_seed_same_weights_and_channels_last_changes_nothing():
    def run(seed, channels_last=True):
        torch.manual_seed(0)
        model = build_model("small-cnn", (1, 8, 8), 2)
        fit(model, bright_or_dark(), config(epochs=1, seed=seed, channels_last=channels_last))
        return torch.cat([p.flatten() for p in model.parameters()])

    a, b = run(0), run(0)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(1))
    assert torch.allclose(a, run(0, channels_last=False), atol=1e-4)


def test_custom_step_is_used_for_every_batch():
    calls = []

    def step(model, x, y, optimizer, cost):
        calls.append(len(x))
        return standard_step(model, x, y, optimizer, cost)

    fit(build_model("lenet5", (1, 8, 8), 2), bright_or_dark(100), config(epochs=2), step=step)
    assert calls == [32] * 6


def test_adam_and_constant_schedule_train_too():
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 8, 8), 2)
    fit(model, bright_or_dark(), config(optimizer="adam", lr=0.01, schedule="constant", epochs=5))
    assert accuracy(model, bright_or_dark(seed=2)) > 0.9


def test_augmentation_keeps_shape_and_moves_pixels():
    x = torch.rand(16, 3, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)


def test_waveforms_are_shifted_in_time_with_zeros_filling_the_gap():
    from torchpurify.train import shift_waveforms

    x = torch.arange(1, 101, dtype=torch.float32).repeat(64, 1)  # 64 ramps of 100 samples
    out = shift_waveforms(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    for row in out:
        kept = row[row != 0]
        assert len(kept) >= 90 and (kept.diff() == 1).all()  # one contiguous, in-order piece
        shift = int(kept[0] - 1) if row[0] != 0 else -int((row == 0).sum())
        assert abs(shift) <= 10  # at most 10 % of the length
        assert (row == 0).sum() == abs(shift)


def test_defenses_fine_tune_with_augmentation_when_asked():
    """augment=true reaches the training loop: with it, FT's result differs; without it, FT is
    the same as before (the parameter's neutral value)."""
    from torchpurify.defenses import Clean, build_defense

    data = Split(torch.rand(64, 2000) - 0.5, torch.arange(64) % 2)
    results = {}
    for augment in (False, True):
        torch.manual_seed(0)
        model = build_model("kws-cnn", (2000,), 2)
        model.eval()
        ft = build_defense("ft", epochs=1, lr=0.01, augment=augment, max_acc_drop=0.99)
        assert ft.train_config().augment is augment
        results[augment] = ft.purify(model, Clean(data, data)).model.state_dict()
    assert any(not torch.equal(results[False][k], results[True][k]) for k in results[False])


def _pushed_off(distill: float, batchnorm: bool = False):
    """Train with a step whose own objective only drags every weight towards zero (a stand-in
    for a purification penalty); return the model, its start and the data."""
    data = bright_or_dark(128)
    torch.manual_seed(0)
    layers = [torch.nn.Flatten(), torch.nn.Linear(64, 16)]
    layers += [torch.nn.BatchNorm1d(16)] if batchnorm else []
    model = torch.nn.Sequential(*layers, torch.nn.ReLU(), torch.nn.Linear(16, 2))
    fit(model, data, config(epochs=5))
    start = copy.deepcopy(model)

    def shrink(model, x, y, optimizer, cost, distill=None):
        optimizer.zero_grad(set_to_none=True)
        loss = sum((p * p).sum() for p in model.parameters())
        loss.backward()
        descend(model, x, optimizer, distill)  # the step adds the distillation term itself
        return loss.detach()

    fit(model, data, config(epochs=3, lr=0.05, momentum=0, distill=distill), step=shrink)
    return model, start, data


def test_distillation_holds_the_clean_outputs_near_the_input_models():
    """With distill, the step's own objective still moves the weights, but the outputs on
    clean data stay closer to those of the model training started from."""
    import torch.nn.functional as F

    gaps, moves = {}, {}
    for beta in (0.0, 20.0):
        model, start, data = _pushed_off(beta)
        with torch.no_grad():
            gaps[beta] = F.kl_div(
                F.log_softmax(model(data.x), 1), F.log_softmax(start(data.x), 1),
                reduction="batchmean", log_target=True,
            ).item()  # fmt: skip
        moves[beta] = sum(
            (a - b).norm() for a, b in zip(model.parameters(), start.parameters(), strict=True)
        ).item()
    assert gaps[20.0] < 0.5 * gaps[0.0]
    assert moves[20.0] > 0.1 * moves[0.0]  # the step's objective still acts


def test_distillation_leaves_batchnorm_running_statistics_to_the_step():
    """The extra forward pass of distillation does not update BatchNorm's running statistics:
    the step alone (which here never runs the model) leaves them exactly as they were."""
    model, start, _ = _pushed_off(5.0, batchnorm=True)
    assert torch.equal(model[2].running_mean, start[2].running_mean)
    assert torch.equal(model[2].running_var, start[2].running_var)
    with pytest.raises(UserError, match="distill must be ≥ 0"):
        config(distill=-1.0)


def test_augmentation_of_other_inputs_is_a_user_error():
    data = Split(torch.rand(8, 1, 50), torch.arange(8) % 2)  # N×C×T: neither images nor clips
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(50, 2))
    with pytest.raises(UserError, match=r"augment needs images .* \(1, 50\)"):
        fit(model, data, config(epochs=1, augment=True, batch_size=4))


def test_divergence_is_its_own_error_not_a_user_error():
    data = bright_or_dark()
    data.x[0, 0, 0, 0] = float("nan")
    with pytest.raises(Divergence, match="diverged") as caught:
        fit(build_model("lenet5", (1, 8, 8), 2), data, config(epochs=1))
    assert not isinstance(caught.value, UserError)


def test_cosine_schedule_is_torchs_and_trainer_runs_epoch_by_epoch():
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 8, 8), 2)
    rates = []
    with Trainer(model, bright_or_dark(), config(epochs=4, lr=0.1)) as trainer:
        assert isinstance(trainer.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
        for epoch in range(4):
            rates.append(trainer.optimizer.param_groups[0]["lr"])
            assert trainer.epoch()["epoch"] == epoch + 1
        with pytest.raises(RuntimeError, match="all 4 epochs"):
            trainer.epoch()
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert rates == pytest.approx(expected)
    assert len(trainer.result.history) == 4 and not model.training


def test_passes_are_counted_by_samples_in_one_place():
    model = build_model("lenet5", (1, 8, 8), 2)
    x = torch.rand(10, 1, 8, 8)
    with count_passes(model) as cost:
        model(x)  # forward only
        with torch.no_grad():
            model(x[:4])
        loss = model(x[:6]).sum()
        torch.autograd.grad(loss, list(model.parameters()))
        copy.deepcopy(model)(x[:3])  # a copy made inside the block counts into the same cost
    assert (cost.forward, cost.backward) == (10 + 4 + 6 + 3, 6)
    model(x)
    assert cost.forward == 23 and not model._forward_hooks


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"epochs": 0}, "--epochs"),
        ({"lr": -1.0}, "--lr"),
        ({"batch_size": 1}, "--batch-size"),
        ({"optimizer": "rmsprop"}, "--optimizer"),
        ({"schedule": "step"}, "--schedule"),
    ],
)
def test_bad_config_names_the_option(kw, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**kw)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="--device"):
        resolve_device("tpu")


def test_frozen_batchnorm_statistics_stay_put_while_weights_train():
    torch.manual_seed(0)
    model = build_model("small-cnn", (1, 8, 8), 2)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    weight = model.block1[0][1].weight.detach().clone()
    fit(model, bright_or_dark(), config(epochs=1, freeze_bn_stats=True))
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(weight, model.block1[0][1].weight)
    fit(model, bright_or_dark(), config(epochs=1))
    assert not torch.equal(before["block1.0.1.running_mean"], model.block1[0][1].running_mean)


def test_a_step_without_the_distillation_term_is_refused_a_recipe_that_distils():
    """Distillation is the step's to add (Step, descend): a step that takes no ``distill``
    cannot be handed a recipe with distill > 0, so no step ignores it unseen."""

    def plain(model, x, y, optimizer, cost):
        return standard_step(model, x, y, optimizer, cost)

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    with pytest.raises(ValueError, match="takes no distillation term"):
        fit(model, bright_or_dark(64), config(epochs=1, distill=1.0), step=plain)
