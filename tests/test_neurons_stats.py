import copy

import pytest
import torch

from torchpurify.errors import UserError
from torchpurify.neurons import activation_stats


def full_output(model, layer, x):
    """The layer's whole output on ``x`` in one batch (what streaming must not need)."""
    outputs = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, args, output: outputs.append(output.detach().clone())
    )
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return outputs[0]


def test_streaming_stats_equal_direct_computation(tiny_backdoor):
    model, holdout = tiny_backdoor.model, tiny_backdoor.holdout
    a = full_output(model, "block4.2", holdout.x).flatten(2)  # N × C × positions
    stats = activation_stats(model, "block4.2", holdout, batch_size=7)
    assert stats.count == len(holdout)
    torch.testing.assert_close(stats.mean, a.mean((0, 2)))
    torch.testing.assert_close(stats.l1, a.abs().mean((0, 2)))
    torch.testing.assert_close(stats.l2, a.square().mean(2).sqrt().mean(0))
    torch.testing.assert_close(stats.linf, a.amax(2).mean(0))
    whole = activation_stats(model, "block4.2", holdout.x, batch_size=len(holdout))
    for field in ("mean", "l1", "l2", "linf"):
        torch.testing.assert_close(getattr(whole, field), getattr(stats, field))


def test_transform_and_flat_layers(tiny_backdoor):
    model, holdout, trigger = tiny_backdoor.model, tiny_backdoor.holdout, tiny_backdoor.trigger
    triggered = activation_stats(model, "block4.2", holdout, transform=trigger)
    direct = full_output(model, "block4.2", trigger(holdout.x))
    torch.testing.assert_close(triggered.linf, direct.flatten(2).amax(2).mean(0))
    logits = activation_stats(model, "classifier", holdout, batch_size=50)
    direct = full_output(model, "classifier", holdout.x)
    torch.testing.assert_close(logits.mean, direct.mean(0))
    torch.testing.assert_close(logits.linf, logits.mean)  # one position per sample


def test_model_left_unchanged(tiny_backdoor):
    model = copy.deepcopy(tiny_backdoor.model).train()
    before = copy.deepcopy(model.state_dict())
    activation_stats(model, "block2", tiny_backdoor.holdout)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not model.block2._forward_hooks


def test_stats_errors(tiny_backdoor):
    with pytest.raises(UserError, match="block4.2"):
        activation_stats(tiny_backdoor.model, "block4.9", tiny_backdoor.holdout)
    with pytest.raises(UserError, match="batch_size"):
        activation_stats(tiny_backdoor.model, "block4", tiny_backdoor.holdout, batch_size=0)
