import copy

import pytest
import torch
from torch import nn

from torchpurify.errors import UserError
from torchpurify.models import build_model
from torchpurify.neurons import (
    attach_masks,
    fold_masks,
    mask_channels,
    masked_layers,
    unmask,
)
from torchpurify.train import TrainConfig, fit

PRUNED = [0, 5, 17, 100]


def block4_output(model, x):
    """small-cnn's neuron-layer output (the block4 Sequential returns its masked ReLU)."""
    outputs = []
    handle = model.block4.register_forward_hook(lambda m, args, out: outputs.append(out.detach()))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    return outputs[0], logits


def test_mask_zeroes_channels_and_adds_up(tiny_backdoor):
    model = copy.deepcopy(tiny_backdoor.model)
    x = tiny_backdoor.test.x[:64]
    original, _ = block4_output(model, x)
    mask_channels(model, "block4.2", PRUNED[:2])
    mask_channels(model, "block4.2", torch.tensor(PRUNED[2:]))
    masked, _ = block4_output(model, x)
    assert (masked[:, PRUNED] == 0).all()
    kept = [c for c in range(128) if c not in PRUNED]
    assert torch.equal(masked[:, kept], original[:, kept])
    assert masked_layers(model)["block4.2"].nonzero().numel() == 128 - len(PRUNED)
    assert len(model.block4[2]._forward_hooks) == 1
    unmask(model, "block4.2")
    assert torch.equal(block4_output(model, x)[0], original)
    assert masked_layers(model) == {} and not model.block4[2]._forward_hooks


def test_mask_is_exact_in_train_mode_with_channels_last(tiny_backdoor):
    model = copy.deepcopy(tiny_backdoor.model).train().to(memory_format=torch.channels_last)
    mask_channels(model, "block3", PRUNED)
    x = tiny_backdoor.test.x[:32].contiguous(memory_format=torch.channels_last)
    outputs = []
    model.block3.register_forward_hook(lambda m, args, out: outputs.append(out.detach()))
    model(x)
    assert (outputs[0][:, PRUNED] == 0).all() and outputs[0][:, 1].abs().sum() > 0


def test_pruned_channels_stay_zero_through_fit_and_save_load(tiny_backdoor):
    model = copy.deepcopy(tiny_backdoor.model)
    mask_channels(model, "block4.2", PRUNED)
    config = TrainConfig(epochs=1, batch_size=64, lr=0.05, progress=False, device="cpu")
    fit(model, tiny_backdoor.tune, config)
    new_data = tiny_backdoor.test.x[:128]
    masked, logits = block4_output(model, new_data)
    assert (masked[:, PRUNED] == 0).all()

    state = model.state_dict()
    assert "block4.2.neuron_mask" in state
    fresh = build_model("small-cnn", (1, 12, 12), tiny_backdoor.num_classes).eval()
    attach_masks(fresh, {name: len(mask) for name, mask in masked_layers(model).items()})
    fresh.load_state_dict(state)
    reloaded, reloaded_logits = block4_output(fresh, new_data)
    assert (reloaded[:, PRUNED] == 0).all()
    torch.testing.assert_close(reloaded_logits, logits)


def test_masks_survive_deepcopy_and_to(tiny_backdoor):
    model = copy.deepcopy(tiny_backdoor.model)
    mask_channels(model, "block4.2", PRUNED)
    twin = copy.deepcopy(model).to(torch.float64)
    assert twin.block4[2].neuron_mask.dtype == torch.float64
    masked, _ = block4_output(twin, tiny_backdoor.test.x[:16].double())
    assert (masked[:, PRUNED] == 0).all()
    unmask(twin, "block4.2")
    assert "block4.2" in masked_layers(model)  # the original keeps its mask


def test_fold_masks_gives_identical_outputs_without_hooks(tiny_backdoor):
    model = copy.deepcopy(tiny_backdoor.model)
    mask_channels(model, "block1.0.0", [1, 2])  # a conv followed by BatchNorm
    mask_channels(model, "block2", [3])  # a Sequential ending in a max-pool after a ReLU
    mask_channels(model, "block4.2", PRUNED)  # a ReLU after a BatchNorm
    mask_channels(model, "classifier", [4])  # a Linear
    folded = fold_masks(model)
    assert masked_layers(folded) == {}
    assert not any(m._forward_hooks for m in folded.modules())
    assert not any("neuron_mask" in key for key in folded.state_dict())
    assert len(masked_layers(model)) == 4  # the original is untouched
    x = tiny_backdoor.test.x[:64]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)
        train_a, train_b = copy.deepcopy(model).train(), copy.deepcopy(folded).train()
        torch.testing.assert_close(train_b(x), train_a(x), rtol=0, atol=0)


class Head(nn.Module):
    """A ReLU outside any Sequential: its mask cannot be moved into weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x)).mean((2, 3))


def test_mask_errors():
    model = Head()
    with pytest.raises(UserError, match="num_channels"):
        mask_channels(model, "relu", [0])
    mask_channels(model, "relu", [0], num_channels=4)
    assert (model(torch.rand(2, 1, 5, 5))[:, 0] == 0).all()
    with pytest.raises(UserError, match="cannot be folded"):
        fold_masks(model)
    with pytest.raises(UserError, match="already has a mask of 4"):
        mask_channels(model, "relu", [1], num_channels=5)
    with pytest.raises(UserError, match=r"0\.\.3"):
        mask_channels(model, "relu", [4])
    with pytest.raises(UserError, match="already has a mask of 4"):
        attach_masks(model, {"relu": 8})
    with pytest.raises(UserError, match="conv"):
        mask_channels(model, "cnv", [0])
    mask_channels(model, "conv", [1])  # a conv knows its own channel count
    assert masked_layers(model)["conv"].tolist() == [1, 0, 1, 1]
