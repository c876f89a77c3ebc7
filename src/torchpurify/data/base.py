"""The in-memory shapes every loader returns.

A :class:`Split` is a pair of tensors: inputs as float32 (images N×C×H×W in [0, 1], waveforms
N×T in [-1, 1]) and int64 labels. A :class:`Dataset` is a named train split and test split with
class names. Everything downstream (attacks, training, defenses, metrics) works on these.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from torchpurify.errors import UserError


@dataclass
class Split:
    """Inputs ``x`` (float32) and labels ``y`` (int64) of the same length.

    ``groups`` (int64, optional; one id per sample, or one row of factor ids) says which
    samples are related — a speech clip's speaker, or a synthetic voice's accent and variant —
    so that the defender's holdout shares none with its tune set
    (:func:`~torchpurify.data.splits.defender_split`); ids are only compared within one split.
    """

    x: torch.Tensor
    y: torch.Tensor
    groups: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} inputs but {len(self.y)} labels")
        if self.groups is not None and len(self.groups) != len(self.y):
            raise ValueError(f"{len(self.groups)} group ids but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> Split:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        groups = None if self.groups is None else self.groups[idx]
        return Split(self.x[idx], self.y[idx], groups)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive batches in stored order (for evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.x[start : start + batch_size], self.y[start : start + batch_size]


@dataclass
class Dataset:
    """A dataset as loaded: the official train and test splits and the class names.

    ``val`` is set when the dataset defines its own validation split (Speech Commands'
    ``validation_list.txt``, speaker-disjoint); otherwise validation data is cut from ``train``.
    """

    name: str
    train: Split
    test: Split
    classes: list[str]
    val: Split | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def images_to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    """uint8 images (N×H×W or N×H×W×C or N×C×H×W given as ``channels_first``) → a float Split.

    Accepts N×H×W (grey) and N×H×W×C; returns N×C×H×W float32 in [0, 1].
    """
    if images.ndim == 3:
        images = images[:, None, :, :]
    elif images.ndim == 4:
        images = images.transpose(0, 3, 1, 2)
    else:
        raise UserError(f"expected images of 3 or 4 dimensions, got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    y = torch.from_numpy(np.asarray(labels).astype(np.int64))
    return Split(x, y)
