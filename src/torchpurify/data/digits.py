"""scikit-learn's 8×8 digits: a dataset that needs no download, for quick runs and tests."""

from __future__ import annotations

import numpy as np

from torchpurify.data.base import Dataset, images_to_split
from torchpurify.errors import UserError

DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def read_digits() -> Dataset:
    """1797 grey 8×8 digits, split 80/20 into train/test by a fixed seed (the same every time)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the digits dataset needs scikit-learn; pip install scikit-learn") from None
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
    order = np.random.default_rng(DIGITS_SEED).permutation(len(images))
    n_test = round(DIGITS_TEST_FRACTION * len(images))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return Dataset(
        "digits",
        images_to_split(images[train], bunch.target[train]),
        images_to_split(images[test], bunch.target[test]),
        [str(d) for d in range(10)],
    )
