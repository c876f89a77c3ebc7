"""IDX files (MNIST, Fashion-MNIST): read, validate, and turn a folder of them into a Dataset.

The format is a 4-byte magic (two zero bytes, a dtype code, the number of dimensions), one
big-endian uint32 per dimension, then the raw values. Every length is checked, so a truncated
download ends in a clear message instead of a short or garbled array.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from torchpurify.data.base import Dataset, images_to_split
from torchpurify.errors import UserError

IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# The four files of MNIST and Fashion-MNIST, by split: (images, labels).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """The array stored in an IDX file, gzipped (``.gz``) or raw, in native byte order."""
    path = Path(path)
    fix = "delete it and download again"
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise UserError(f"IDX file {path} does not exist; check the path") from None
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"{path} is not a readable gzip file ({err}); {fix}") from None
    if len(raw) < 4:
        raise UserError(f"{path} is too short to be an IDX file ({len(raw)} bytes); {fix}")
    zero1, zero2, code, ndim = raw[:4]
    if zero1 or zero2 or ndim == 0:
        raise UserError(f"{path} has a bad IDX magic number {raw[:4].hex()}; {fix}")
    if code not in IDX_DTYPES:
        raise UserError(f"{path} has an unknown IDX dtype code 0x{code:02x}; {fix}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated inside its header; {fix}")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise UserError(
            f"{path} has {len(raw)} bytes but its header (shape {shape}, {dtype.name}) says "
            f"{expected}; {fix}"
        )
    values = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # a writable copy in native order


def idx_path(folder: Path, stem: str) -> Path | None:
    """The gzipped or raw file named ``stem`` in ``folder``, or None."""
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.is_file():
            return path
    return None


def missing_idx(folder: Path) -> str | None:
    """What ``folder`` lacks to be an MNIST-style folder, or None when complete."""
    absent = [s for pair in IDX_FILES.values() for s in pair if idx_path(folder, s) is None]
    return f"missing {', '.join(f'{s}[.gz]' for s in absent)}" if absent else None


def read_idx_dataset(folder: Path, name: str, classes: list[str]) -> Dataset:
    """The train and test splits of an MNIST-style folder of four IDX files."""
    splits = {}
    for split, (images_stem, labels_stem) in IDX_FILES.items():
        images_file, labels_file = idx_path(folder, images_stem), idx_path(folder, labels_stem)
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1:
            raise UserError(
                f"{images_file} and {labels_file} hold shapes {images.shape} and "
                f"{labels.shape}, not N×H×W uint8 images and N labels; check the files"
            )
        if len(images) != len(labels):
            raise UserError(
                f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} "
                "labels; delete both and download again"
            )
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(classes):
            raise UserError(f"{labels_file} has labels outside 0..{len(classes) - 1}")
        splits[split] = images_to_split(images, labels)
    return Dataset(name, splits["train"], splits["test"], classes)
