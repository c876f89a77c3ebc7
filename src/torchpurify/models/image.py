"""Image classifiers: small, readable, and adapting to the input's channels and size.

Every model maps raw images (N×C×H×W in [0, 1]) to logits; per-channel normalisation is the
model's first module so that triggers, defenses and metrics all work on raw pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from torchpurify.models.registry import MODELS


class Normalize(nn.Module):
    """``(x − mean) / std`` per channel; the statistics are architecture arguments, not weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _stats(channels: int, mean: Sequence[float] | None, std: Sequence[float] | None):
    mean = list(mean) if mean is not None else [0.5] * channels
    std = list(std) if std is not None else [0.5] * channels
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} values, one per input channel")
    return mean, std


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Four 3×3 conv + BN + ReLU blocks (32, 64, 128, 128 channels), pooling after the first two.

    About 0.24M parameters. Pooling early keeps it fast on a laptop CPU; the last block's
    128 channels on a 7×7 map (for 28×28 input) are the default neuron layer.
    """

    def __init__(self, input_shape, num_classes, mean=None, std=None, width: int = 32) -> None:
        super().__init__()
        c, h, w = input_shape
        self.normalize = Normalize(*_stats(c, mean, std))
        pool = [nn.MaxPool2d(2) if min(h, w) >= 2 * k else nn.Identity() for k in (1, 2)]
        self.block1 = nn.Sequential(conv_bn_relu(c, width), pool[0])
        self.block2 = nn.Sequential(conv_bn_relu(width, 2 * width), pool[1])
        self.block3 = conv_bn_relu(2 * width, 4 * width)
        self.block4 = conv_bn_relu(4 * width, 4 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(self.normalize(x)))))
        return self.classifier(torch.flatten(self.pool(x), 1))


class LeNet5(nn.Module):
    """LeCun et al. 1998 with ReLU and max-pooling; 'same' padding so it fits inputs down to 8×8."""

    def __init__(self, input_shape, num_classes, mean=None, std=None) -> None:
        super().__init__()
        c, h, w = input_shape
        self.normalize = Normalize(*_stats(c, mean, std))
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        flat = 16 * (h // 4) * (w // 4)
        self.classifier = nn.Sequential(
            nn.Linear(flat, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(self.normalize(x)), 1))


class PreActBlock(nn.Module):
    """He et al. 2016 pre-activation basic block; ``relu`` is the block's output activation."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct-ResNet18 as in BackdoorBench; the final BN + ReLU output is the neuron layer."""

    channels_last = False  # 0.7× the contiguous speed on CPU (benchmarks/train_throughput.py)

    def __init__(self, input_shape, num_classes, mean=None, std=None) -> None:
        super().__init__()
        c, h, w = input_shape
        self.normalize = Normalize(*_stats(c, mean, std))
        self.conv1 = nn.Conv2d(c, 64, 3, padding=1, bias=False)
        stages, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 or min(h, w) < 2 ** (i + 1) else 2
            stages.append(nn.Sequential(PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(512)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu(self.bn(x))
        return self.linear(torch.flatten(self.pool(x), 1))


VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11BN(nn.Module):
    """VGG-11 with BatchNorm; a pooling step is skipped once the map is 1 pixel wide."""

    def __init__(self, input_shape, num_classes, mean=None, std=None) -> None:
        super().__init__()
        c, h, w = input_shape
        self.normalize = Normalize(*_stats(c, mean, std))
        layers: list[nn.Module] = []
        cin, size = c, min(h, w)
        for item in VGG11:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            else:
                layers.extend(conv_bn_relu(cin, item))
                cin = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(self.normalize(x))), 1))


MODELS.register("small-cnn", "4 conv + BN blocks, ~0.24M parameters (fast on CPU)")(SmallCNN)
MODELS.register("lenet5", "LeNet-5 with ReLU, ~60k parameters")(LeNet5)
MODELS.register("preact-resnet18", "PreAct-ResNet18, ~11M parameters")(PreActResNet18)
MODELS.register("vgg11-bn", "VGG-11 with BatchNorm, ~9M parameters")(VGG11BN)
