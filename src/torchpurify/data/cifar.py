"""CIFAR-10 and CIFAR-100 from the official "python version" pickles, read safely.

Those files are pickles, and unpickling runs whatever the file asks for. The unpickler here
resolves only the few names a pickled numpy array needs, so a hostile or foreign file is refused
before any of it runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from torchpurify.data.base import Dataset, images_to_split
from torchpurify.errors import UserError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it, limited to latin-1."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# What a pickled numpy array references (Python 2 and numpy 1.x, or numpy 2.x), and nothing else.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class CifarLayout(NamedTuple):
    folder: str
    train_files: list[str]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes


LAYOUTS = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": CifarLayout(
        "cifar-100-python", ["train"], "test", "meta", b"fine_labels", b"fine_label_names"
    ),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # the files were written by Python 2
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[module, name]
        raise UserError(
            f"refusing to unpickle {self.path}: it references {module}.{name}, not plain "
            "arrays; this is not a CIFAR batch file"
        )


def load_cifar_pickle(path: Path) -> dict:
    """The dict stored in one CIFAR pickle, unpickled without running foreign code."""
    try:
        with open(path, "rb") as file:
            content = _ArraysOnlyUnpickler(file, path).load()
    except FileNotFoundError:
        raise UserError(f"CIFAR file {path} does not exist; check the path") from None
    except UserError:
        raise
    except Exception as err:  # a damaged pickle can fail in many ways; all mean the same here
        raise UserError(
            f"{path} is not a readable CIFAR pickle ({type(err).__name__}: {err}); "
            "delete it and download again"
        ) from None
    if not isinstance(content, dict):
        raise UserError(f"{path} holds a {type(content).__name__}, not a CIFAR dict")
    return content


def _read_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images N×32×32×3 uint8 and labels N of one batch file, after checking their shapes."""
    batch = load_cifar_pickle(path)
    data, labels = batch.get(b"data"), batch.get(label_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise UserError(f"{path} has no N×3072 uint8 array under b'data'; not a CIFAR batch")
    if data.shape[1] != 3072:
        raise UserError(f"{path} has rows of {data.shape[1]} values, not 3072 (3×32×32)")
    if labels is None or len(labels) != len(data):
        found = "no" if labels is None else len(labels)
        raise UserError(f"{path} has {len(data)} images but {found} {label_key!r} labels")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise UserError(f"{path} has labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _batches_dir(root: Path, folder: str) -> Path:
    """Accept both the folder holding ``cifar-10-batches-py`` and that folder itself."""
    return root / folder if (root / folder).is_dir() else root


def missing_cifar(root: Path, name: str) -> str | None:
    """What ``root`` lacks to be a CIFAR folder, or None when complete."""
    layout = LAYOUTS[name]
    where = _batches_dir(root, layout.folder)
    files = [*layout.train_files, layout.test_file, layout.meta_file]
    absent = [f for f in files if not (where / f).is_file()]
    return f"missing {layout.folder}/{', '.join(absent)}" if absent else None


def read_cifar(root: Path, name: str) -> Dataset:
    """CIFAR-10 (``name="cifar10"``) or CIFAR-100 fine labels (``"cifar100"``)."""
    layout = LAYOUTS[name]
    where = _batches_dir(root, layout.folder)
    meta = where / layout.meta_file
    names = load_cifar_pickle(meta).get(layout.names_key)
    if not isinstance(names, list) or not names:
        raise UserError(f"{meta} has no class names under {layout.names_key!r}")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    train = [_read_batch(where / f, layout.label_key, len(classes)) for f in layout.train_files]
    test = _read_batch(where / layout.test_file, layout.label_key, len(classes))
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    return Dataset(
        name, images_to_split(train_images, train_labels), images_to_split(*test), classes
    )
