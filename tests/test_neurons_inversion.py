import copy

import pytest
import torch

from torchpurify.data.base import Split
from torchpurify.errors import UserError
from torchpurify.metrics import evaluate
from torchpurify.neurons import anomaly_index, invert_triggers


def test_inversion_finds_the_backdoor_target(tiny_backdoor):
    model = copy.deepcopy(tiny_backdoor.model).train()
    before = copy.deepcopy(model.state_dict())
    inversion = invert_triggers(model, tiny_backdoor.holdout, steps=150, batch_size=32)
    assert inversion.labels == list(range(tiny_backdoor.num_classes))
    assert inversion.target == tiny_backdoor.target
    assert inversion.anomaly_index[tiny_backdoor.target] > 2
    assert inversion.mask_norms.argmin() == tiny_backdoor.target
    assert inversion.masks.shape == (6, 1, 12, 12) and inversion.patterns.shape == (6, 1, 12, 12)

    assert inversion.mask_norms[tiny_backdoor.target] < 0.1 * 12 * 12  # a small patch
    trigger = inversion.trigger(tiny_backdoor.target)
    assert trigger(tiny_backdoor.test.x[0]).shape == (1, 12, 12)
    rates = evaluate(model, tiny_backdoor.test, trigger, target=0, num_classes=6)
    assert rates.asr > 0.8 and inversion.success[tiny_backdoor.target] > 0.8

    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_anomaly_index_is_positive_for_small_norms():
    index = anomaly_index(torch.tensor([1.0, 10.0, 11.0, 9.0, 10.0]))
    torch.testing.assert_close(index, torch.tensor([9.0, 0.0, -1.0, 1.0, 0.0]) / 1.4826)


def test_waveform_masks_have_the_input_shape(wave_net):
    generator = torch.Generator().manual_seed(0)
    data = Split(torch.rand(40, 64, generator=generator) * 2 - 1, torch.arange(40) % 3)
    inversion = invert_triggers(
        wave_net, data, labels=[1, 2], steps=10, batch_size=8, value_range=(-1.0, 1.0)
    )
    assert inversion.masks.shape == (2, 64) and inversion.patterns.shape == (2, 64)
    assert inversion.patterns.abs().max() <= 1 and inversion.success.shape == (2,)
    trigger = inversion.trigger(2)
    assert trigger(data.x[0]).shape == (64,) and trigger(data.x).shape == (40, 64)
    with pytest.raises(UserError, match="label must be one of"):
        inversion.trigger(0)
    with pytest.raises(UserError, match="labels"):
        invert_triggers(wave_net, data, labels=[3])
