"""Datasets by name, found on disk or downloaded once, loaded as tensors.

``load_dataset(name)`` looks in this order: an explicit ``root``; ``$TORCHPURIFY_DATA/<name>``;
the Debian package ``dataset-fashion-mnist`` (Fashion-MNIST only); the user cache
``$XDG_CACHE_HOME/torchpurify/<name>``, downloading into it from the official source (md5
checked) when it is incomplete, or generating it there for synthetic data (speech-synth).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torchpurify.data.base import Dataset, Split, images_to_split
from torchpurify.data.cifar import missing_cifar, read_cifar
from torchpurify.data.digits import read_digits
from torchpurify.data.download import fetch
from torchpurify.data.folder import (
    missing_gtsrb,
    missing_image_folder,
    read_gtsrb,
    read_image_folder,
)
from torchpurify.data.idx import missing_idx, read_idx_dataset
from torchpurify.data.speech import OFFICIAL_URL, missing_speech_commands, read_speech_commands
from torchpurify.data.splits import defender_split, train_val_split
from torchpurify.errors import UserError
from torchpurify.registry import Registry

__all__ = [
    "DATASETS",
    "Dataset",
    "Split",
    "defender_split",
    "images_to_split",
    "load_dataset",
    "resolve_root",
    "split_groups",
    "train_val_split",
]

ENV_VAR = "TORCHPURIFY_DATA"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_GTSRB = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"

# name → the official files as (url, md5); archives are unpacked where they land.
DOWNLOADS: dict[str, list[tuple[str, str]]] = {
    "fashion-mnist": [
        (_FASHION + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        (_FASHION + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        (_FASHION + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        (_FASHION + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
    ],
    "mnist": [
        (_MNIST + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        (_MNIST + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        (_MNIST + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        (_MNIST + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    ],
    "cifar10": [
        (
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
        )
    ],
    "cifar100": [
        (
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "eb9058c3a382ffc7106e4002c42a8d85",
        )
    ],
    "gtsrb": [
        (_GTSRB + "GTSRB-Training_fixed.zip", "513f3c79a4c5141765e10e952eaa2478"),
        (_GTSRB + "GTSRB_Final_Test_Images.zip", "c7e4e6327067d32654124b0fe9e82185"),
        (_GTSRB + "GTSRB_Final_Test_GT.zip", "fe31e9c9270bbcd7b84b7f21a9d9d9e5"),
    ],
}


@dataclass(frozen=True)
class Source:
    """How to check and read one dataset's folder; ``missing`` is None for bundled data.

    ``folder`` names the dataset's folder under ``$TORCHPURIFY_DATA`` and the cache when several
    datasets read the same files (default: the dataset's name). ``generate(folder, progress)``
    builds a missing folder for synthetic data; ``manual`` says where to get files that cannot be
    downloaded here. ``groups`` names what the loader's group ids are (``"speaker"``), empty when
    it gives none: the defender's tune and holdout are then split by group (methods.md §0).
    """

    read: Callable[[Path | None], Dataset]
    missing: Callable[[Path], str | None] | None
    expected: str = ""
    folder: str | None = None
    generate: Callable[[Path, bool], object] | None = None
    manual: str = ""
    groups: str = ""


DATASETS: Registry[Source] = Registry("dataset")

_IDX_EXPECTED = "train-/t10k-images-idx3-ubyte and train-/t10k-labels-idx1-ubyte (.gz or raw)"
_register = DATASETS.register
_register("fashion-mnist", "Zalando clothing, 28×28 grey, 10 classes, 60k/10k")(
    Source(
        partial(read_idx_dataset, name="fashion-mnist", classes=FASHION_MNIST_CLASSES),
        missing_idx,
        _IDX_EXPECTED,
    )
)
_register("mnist", "handwritten digits, 28×28 grey, 10 classes, 60k/10k")(
    Source(
        partial(read_idx_dataset, name="mnist", classes=[str(d) for d in range(10)]),
        missing_idx,
        _IDX_EXPECTED,
    )
)
_register("cifar10", "32×32 colour objects, 10 classes, 50k/10k")(
    Source(
        partial(read_cifar, name="cifar10"),
        partial(missing_cifar, name="cifar10"),
        "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)",
    )
)
_register("cifar100", "32×32 colour objects, 100 fine classes, 50k/10k")(
    Source(
        partial(read_cifar, name="cifar100"),
        partial(missing_cifar, name="cifar100"),
        "cifar-100-python/ (train, test, meta)",
    )
)
_register("gtsrb", "German traffic signs cropped to their ROI, 32×32 colour, 43 classes")(
    Source(
        read_gtsrb,
        missing_gtsrb,
        "GTSRB/Final_Training/Images/, GTSRB/Final_Test/Images/ and GT-final_test.csv",
    )
)
_register("digits", "scikit-learn's 8×8 grey digits, 10 classes, fixed 80/20 split, no download")(
    Source(lambda _: read_digits(), None)
)
_register("image-folder", "your images: ROOT/train/<class>/*.png|jpg|ppm|bmp, ROOT/test/<class>/*")(
    Source(read_image_folder, missing_image_folder, "train/<class>/ and test/<class>/")
)


def missing_speech_synth(root: Path) -> str | None:
    """What ``root`` lacks to be a finished speech-synth folder, or None when complete."""
    problem = missing_speech_commands(root)
    if problem is None and not (root / "manifest.json").is_file():
        problem = "missing manifest.json (write the folder with `torchpurify make-speech`)"
    return problem


def generate_speech_synth(folder: Path, progress: bool = True) -> None:
    """The default speech-synth set (imported late: it loads espeak and multiprocessing)."""
    from torchpurify.data.synth import generate_speech_synth as generate

    generate(folder, progress=progress)


_SPEECH_EXPECTED = (
    "one folder per word of 16 kHz WAV clips, validation_list.txt and testing_list.txt "
    "(Speech Commands layout)"
)
_SPEECH_MANUAL = f"download and unpack {OFFICIAL_URL} (or v0.01) there"
_register("speech-synth", "espeak keywords, 10 classes, noisy 1-s 16 kHz clips, made offline")(
    Source(
        partial(read_speech_commands, name="speech-synth"),
        missing_speech_synth,
        _SPEECH_EXPECTED + " and manifest.json, as `torchpurify make-speech` writes",
        generate=generate_speech_synth,
        groups="speaker",
    )
)
_SPEECH_TASKS = {
    "speech-commands": ("Google Speech Commands, the 10 keywords", {}),
    "speech-commands-12": (
        "Google Speech Commands, 10 keywords + silence + unknown (12 classes)",
        {"silence": True, "unknown": True},
    ),
    "speech-commands-35": ("Google Speech Commands, all words (35 in v0.02)", {"words": None}),
}
for _name, (_summary, _task) in _SPEECH_TASKS.items():
    _register(_name, _summary)(
        Source(
            partial(read_speech_commands, name=_name, **_task),
            missing_speech_commands,
            _SPEECH_EXPECTED,
            folder="speech-commands",
            manual=_SPEECH_MANUAL,
            groups="speaker",
        )
    )


def cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/torchpurify/<name>``, by default under ``~/.cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "torchpurify" / name


def resolve_root(
    name: str, root: Path | str | None = None, download: bool = True, progress: bool = True
) -> Path:
    """The folder holding dataset ``name``'s files, downloading them into the cache if needed."""
    source = DATASETS.get(name)
    if source.missing is None:
        raise UserError(f"{name} is bundled with its library and has no data folder to resolve")
    if root is not None:
        root = Path(root).expanduser()
        if root.is_dir():
            problem = source.missing(root)
        else:
            problem = "is a file, not a folder" if root.exists() else "does not exist"
        if problem:
            raise UserError(
                f"--data-root {root} {problem}; point it at the folder holding {source.expected}"
            )
        return root
    folder_name = source.folder or name
    obtainable = name in DOWNLOADS or source.generate is not None
    candidates = []
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]).expanduser() / folder_name)
    if name == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    cache = cache_dir(folder_name)
    if obtainable:
        candidates.append(cache)
    for folder in candidates:
        if folder.is_dir() and source.missing(folder) is None:
            return folder
    if not obtainable:
        raise UserError(
            f"{name} needs --data-root or {ENV_VAR} (looked for ${ENV_VAR}/{folder_name}/): "
            f"a folder holding {source.expected}" + (f"; {source.manual}" if source.manual else "")
        )
    making = "generating" if source.generate is not None else "downloading"
    if not download:
        raise UserError(
            f"{name} not found (looked in {', '.join(map(str, candidates))}) and {making} is "
            f"off; pass --data-root, set {ENV_VAR} to a folder holding {folder_name}/, allow "
            f"{making}"
            + (", or apt-get install dataset-fashion-mnist" if name == "fashion-mnist" else "")
        )
    if source.generate is not None:
        source.generate(cache, progress)
    else:
        fetch(DOWNLOADS[name], cache, progress)
    problem = source.missing(cache)
    if problem:
        raise UserError(
            f"{making} {name} into {cache} left it incomplete ({problem}); "
            "delete that folder and try again"
        )
    return cache


def split_groups(name: str) -> str:
    """What the defender's tune and holdout of dataset ``name`` are split by: ``"speaker"`` for
    speech, ``""`` (single samples) for the rest (:attr:`Source.groups`)."""
    return DATASETS.get(name).groups if name in DATASETS.names() else ""


def load_dataset(
    name: str, root: Path | str | None = None, download: bool = True, progress: bool = True
) -> Dataset:
    """Dataset ``name`` (one of ``DATASETS.names()``), found or fetched as the module says."""
    source = DATASETS.get(name)
    folder = None if source.missing is None else resolve_root(name, root, download, progress)
    dataset = source.read(folder)
    for split in ("train", "test"):
        if len(getattr(dataset, split)) == 0:
            raise UserError(f"{name} has an empty {split} split; check the files in its folder")
    return dataset
