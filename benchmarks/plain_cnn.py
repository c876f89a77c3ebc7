"""A small CNN without BatchNorm, as a user would write one: the development model that keeps the
defenses' defaults from fitting only BatchNorm networks (issue 9; docs/methods.md §4, §5, §11).

Two 3×3 conv + ReLU + max-pool stages (32 and 64 channels), then a 128-unit hidden layer and the
classifier; no normalisation layer anywhere. Loaded by reference, as a user's own architecture::

    PYTHONPATH=. torchpurify train --arch benchmarks.plain_cnn:plain_cnn --dataset fashion-mnist ...

and named the same way in ``configs/dev-nobn.yaml``.
"""

from __future__ import annotations

import torch
from torch import nn


class PlainCNN(nn.Module):
    def __init__(self, input_shape, num_classes, width: int = 32) -> None:
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * (h // 4) * (w // 4), 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(2 * x - 1))


def plain_cnn(input_shape, num_classes, width: int = 32) -> nn.Module:
    """The architecture for ``module:function`` loading: ``benchmarks.plain_cnn:plain_cnn``."""
    return PlainCNN(tuple(input_shape), num_classes, width)
