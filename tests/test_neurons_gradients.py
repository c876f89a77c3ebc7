import copy

import pytest
import torch
import torch.nn.functional as F

from torchpurify.errors import UserError
from torchpurify.neurons import (
    ActivationStats,
    BenignSalience,
    activation_stats,
    neuron_groups,
    weight_gradient_norms,
)


def test_weight_gradient_norms_match_manual_computation(tiny_backdoor):
    model = copy.deepcopy(tiny_backdoor.model).train()
    before = copy.deepcopy(model.state_dict())
    holdout = tiny_backdoor.holdout
    norms = weight_gradient_norms(model, holdout, batch_size=50)
    assert set(norms) == {"block1.0.0", "block2.0.0", "block3.0", "block4.0", "classifier"}
    assert norms["block4.0"].shape == (128,) and norms["classifier"].shape == (6,)

    reference = copy.deepcopy(model).eval()
    expected = torch.zeros(128)
    for x, y in holdout.batches(50):
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        expected += reference.block4[0].weight.grad.flatten(1).norm(dim=1)
    batches = -(-len(holdout) // 50)  # the mean over the batches
    torch.testing.assert_close(norms["block4.0"], expected / batches)

    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_triggered_batches_and_layer_choice(tiny_backdoor):
    model, holdout = tiny_backdoor.model, tiny_backdoor.holdout
    clean = weight_gradient_norms(model, holdout, ["block4.0"])
    triggered = weight_gradient_norms(model, holdout, ["block4.0"], transform=tiny_backdoor.trigger)
    # True labels on triggered inputs: the backdoor makes the loss, and its gradients, large.
    assert triggered["block4.0"].sum() > clean["block4.0"].sum()
    with pytest.raises(UserError, match="BatchNorm2d"):
        weight_gradient_norms(model, holdout, ["block4.1"])
    with pytest.raises(UserError, match="Split"):
        weight_gradient_norms(model, holdout.x, ["block4.0"])


def test_salience_ema_after_two_updates(tiny_backdoor):
    model = copy.deepcopy(tiny_backdoor.model)
    salience = BenignSalience(["block4.0", "classifier"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = torch.zeros_like(model.block4[0].weight)
    for x, y in tiny_backdoor.tune.subset(range(64)).batches(32):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        salience.update(model)
        w, g = model.block4[0].weight.detach(), model.block4[0].weight.grad
        expected = 0.9 * expected + 0.1 * (-g * w)
        optimizer.step()
    torch.testing.assert_close(salience.weight_salience("block4.0"), expected)
    torch.testing.assert_close(salience.neuron_salience("block4.0"), expected.flatten(1).sum(1))
    assert salience.neuron_salience("classifier").shape == (6,)


def test_warm_up_fills_salience_without_changing_the_model(tiny_backdoor):
    model = copy.deepcopy(tiny_backdoor.model).train()
    before = copy.deepcopy(model.state_dict())
    data = tiny_backdoor.tune.subset(range(64))
    salience = BenignSalience(["classifier"], decay=0.5).warm_up(model, data, batch_size=32)
    reference = copy.deepcopy(model).eval()
    expected = torch.zeros_like(reference.classifier.weight)
    for x, y in data.batches(32):
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        w = reference.classifier.weight
        expected = 0.5 * expected + 0.5 * (-w.grad * w.detach())
    torch.testing.assert_close(salience.weight_salience("classifier"), expected)
    assert model.training and all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_salience_errors(tiny_backdoor):
    model = copy.deepcopy(tiny_backdoor.model)
    salience = BenignSalience(["block4.0"])
    with pytest.raises(UserError, match="warm_up"):
        salience.neuron_salience("block4.0")
    with pytest.raises(UserError, match="after loss.backward"):
        salience.update(model)
    with pytest.raises(UserError, match="not tracked"):
        salience.neuron_salience("classifier")
    with pytest.raises(UserError, match="decay"):
        BenignSalience(["block4.0"], decay=1.0)
    with pytest.raises(UserError, match="ReLU"):
        BenignSalience(["block4.2"]).warm_up(model, tiny_backdoor.tune)


def stats(means):
    mean = torch.tensor(means, dtype=torch.float32)
    return ActivationStats(mean=mean, l1=mean, l2=mean, linf=mean, count=1)


def test_neuron_groups_from_z_scores():
    clean = stats([5.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    triggered = stats([0.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    groups = neuron_groups(clean, triggered)
    assert groups == ["clean", "backdoored", "hybrid"] + ["dormant"] * 5
    assert neuron_groups(clean, triggered, z=3.0) == ["dormant"] * 8
    assert neuron_groups(stats([1.0] * 4), stats([1.0] * 4)) == ["dormant"] * 4
    with pytest.raises(UserError, match="same layer"):
        neuron_groups(clean, stats([1.0, 2.0]))


def test_backdoored_neurons_exist_in_the_backdoored_model(tiny_backdoor):
    model, holdout = tiny_backdoor.model, tiny_backdoor.holdout
    clean = activation_stats(model, "block4.2", holdout)
    triggered = activation_stats(model, "block4.2", holdout, transform=tiny_backdoor.trigger)
    groups = neuron_groups(clean, triggered)
    rise = triggered.mean - clean.mean
    assert groups[int(rise.argmax())] == "backdoored"
