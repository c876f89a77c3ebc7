"""Images on disk: a generic ``train/<class>/`` + ``test/<class>/`` folder, and GTSRB.

Both decode with pillow and resize to one size, so every split is a single N×C×H×W tensor.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from torchpurify.data.base import Dataset, Split, images_to_split
from torchpurify.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".bmp"}
GTSRB_CLASSES = [f"{i:05d}" for i in range(43)]
GTSRB_SIZE = (32, 32)
GTSRB_TEST_CSV = "GT-final_test.csv"
# Pixels of one image file, read from its header before decoding (8192×4096; 100 MB as RGB).
MAX_IMAGE_PIXELS = 1 << 25


def _open(path: Path, decode: bool = True) -> Image.Image:
    """The image at ``path``; with ``decode=False`` only its header is read (mode and size).
    An image of more than :data:`MAX_IMAGE_PIXELS` pixels is refused from its header."""
    try:
        image = Image.open(path)
        if image.width * image.height > MAX_IMAGE_PIXELS:
            image.close()
            raise UserError(
                f"image {path} is {image.width}×{image.height}, over the {MAX_IMAGE_PIXELS:,} "
                "pixels torchpurify decodes; resize it to the model's input size or delete it"
            )
        if decode:
            image.load()
    except UserError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path} ({err}); replace or delete it") from None
    return image


def image_headers(paths: Iterable[Path]) -> list[tuple[str, tuple[int, int]]]:
    """The mode and (H, W) of each image, read from its header: nothing is decoded."""
    headers = []
    for path in paths:
        with _open(path, decode=False) as image:
            headers.append((image.mode, (image.height, image.width)))
    return headers


def common_size(sizes: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """The most common (H, W), the smallest of a tie: one odd image never sets the size of all."""
    counts = Counter(sizes)
    return min(counts, key=lambda size: (-counts[size], size[0] * size[1], size))


def _to_array(image: Image.Image, mode: str, size: tuple[int, int]) -> np.ndarray:
    """``size`` is (H, W), pillow wants (W, H)."""
    image = image.convert(mode)
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _stack(images: list[np.ndarray], labels: list[int], mode: str, size: tuple[int, int]) -> Split:
    shape = (0, *size) if mode == "L" else (0, *size, 3)
    stacked = np.stack(images) if images else np.zeros(shape, np.uint8)
    return images_to_split(stacked, np.asarray(labels, dtype=np.int64))


def check_name(path: Path) -> Path:
    """``path``, refused in one printable line when its name is not valid UTF-8 (it could be
    neither printed, nor hashed, nor recorded in a card)."""
    try:
        path.name.encode()
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode(errors="backslashreplace")
        raise UserError(f"{shown}: the name is not valid UTF-8; rename it") from None
    return path


def _image_files(folder: Path) -> list[Path]:
    return sorted(check_name(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


# ---------------------------------------------------------------- generic image folder


def missing_image_folder(root: Path) -> str | None:
    """What ``root`` lacks to be an image folder, or None when complete."""
    absent = [s for s in ("train", "test") if not (root / s).is_dir()]
    return f"missing {' and '.join(absent)}/ with one subfolder per class" if absent else None


def read_image_folder(root: Path, size: tuple[int, int] | None = None) -> Dataset:
    """``root/train/<class>/*`` and ``root/test/<class>/*``; classes are the sorted folder names.

    Images are resized to ``size`` (H, W), by default the most common size (:func:`common_size`),
    and kept grey only when every image is mode L.
    """
    root = Path(root)
    classes = sorted(check_name(p).name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{root / 'train'} has no class subfolders; put images in train/<class>/")
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in ("train", "test"):
        unknown = {check_name(p).name for p in (root / split).iterdir() if p.is_dir()}
        unknown -= set(classes)
        if unknown:
            raise UserError(
                f"{root / split} has classes {sorted(unknown)} that train/ lacks; "
                "give both splits the same class folders"
            )
        files[split] = [
            (path, label)
            for label, name in enumerate(classes)
            if (root / split / name).is_dir()
            for path in _image_files(root / split / name)
        ]
    headers = image_headers(path for path, _ in files["train"] + files["test"])
    if not headers:
        raise UserError(f"{root} holds no {'/'.join(sorted(IMAGE_SUFFIXES))} images")
    mode = "L" if all(m == "L" for m, _ in headers) else "RGB"
    size = size or common_size(s for _, s in headers)
    splits = {}
    for split, pairs in files.items():
        images = [_to_array(_open(path), mode, size) for path, _ in pairs]
        splits[split] = _stack(images, [label for _, label in pairs], mode, size)
    return Dataset(root.name, splits["train"], splits["test"], classes)


# ---------------------------------------------------------------- GTSRB


def _gtsrb_dir(root: Path) -> Path:
    """Accept both the folder holding ``GTSRB/`` and ``GTSRB/`` itself."""
    return root / "GTSRB" if (root / "GTSRB").is_dir() else root


def _gtsrb_train_dir(gtsrb: Path) -> Path | None:
    # Final_Training/Images: the original archive; Training: GTSRB-Training_fixed.zip.
    for folder in (gtsrb / "Final_Training" / "Images", gtsrb / "Training"):
        if folder.is_dir():
            return folder
    return None


def _gtsrb_test_csv(root: Path, gtsrb: Path) -> Path | None:
    """``GT-final_test.csv`` comes in its own zip, so look beside the images and above them."""
    for folder in (root, gtsrb.parent, gtsrb, gtsrb / "Final_Test" / "Images"):
        if (folder / GTSRB_TEST_CSV).is_file():
            return folder / GTSRB_TEST_CSV
    return None


def missing_gtsrb(root: Path) -> str | None:
    """What ``root`` lacks to be a GTSRB folder, or None when complete."""
    gtsrb = _gtsrb_dir(root)
    if _gtsrb_train_dir(gtsrb) is None:
        return "missing GTSRB/Final_Training/Images/ or GTSRB/Training/ (training archive)"
    if not (gtsrb / "Final_Test" / "Images").is_dir():
        return "missing GTSRB/Final_Test/Images/ (from GTSRB_Final_Test_Images.zip)"
    if _gtsrb_test_csv(root, gtsrb) is None:
        return (
            f"missing {GTSRB_TEST_CSV} (from GTSRB_Final_Test_GT.zip) in {root} or "
            "GTSRB/Final_Test/Images/"
        )
    return None


def _read_rois(csv_path: Path, folder: Path) -> Iterable[tuple[np.ndarray, int]]:
    """Each row of a GTSRB annotation file as (32×32×3 image cropped to its ROI, class id)."""
    try:
        with open(csv_path, newline="") as file:
            rows = list(csv.DictReader(file, delimiter=";"))
        for row in rows:
            box = tuple(int(row[k]) for k in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
            label = int(row["ClassId"])
            path = folder / row["Filename"]
            image = _open(path)
            x1, y1, x2, y2 = box
            if not (0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height):
                raise UserError(f"{csv_path}: ROI {box} lies outside {path} ({image.size})")
            if not 0 <= label < len(GTSRB_CLASSES):
                raise UserError(f"{csv_path}: ClassId {label} is outside 0..42")
            yield _to_array(image.crop(box), "RGB", GTSRB_SIZE), label
    except UserError:
        raise
    except (KeyError, ValueError) as err:
        raise UserError(
            f"{csv_path} is not a GTSRB annotation file ({type(err).__name__}: {err}); "
            "expected columns Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
        ) from None


def _collect(rows: Iterable[tuple[np.ndarray, int]]) -> Split:
    pairs = list(rows)
    return _stack([x for x, _ in pairs], [y for _, y in pairs], "RGB", GTSRB_SIZE)


def read_gtsrb(root: Path) -> Dataset:
    """GTSRB's official train and test sets, each sign cropped to its ROI, resized to 32×32."""
    root = Path(root)
    problem = missing_gtsrb(root)
    if problem:
        raise UserError(f"{root} is not a complete GTSRB folder: {problem}; download it again")
    gtsrb = _gtsrb_dir(root)
    train_dir = _gtsrb_train_dir(gtsrb)
    class_dirs = sorted(p for p in train_dir.iterdir() if p.is_dir())
    for class_dir in class_dirs:
        if not (class_dir / f"GT-{class_dir.name}.csv").is_file():
            raise UserError(
                f"{class_dir} has no GT-{class_dir.name}.csv with the signs' ROIs; "
                "download the GTSRB training archive again"
            )
    train = _collect(row for d in class_dirs for row in _read_rois(d / f"GT-{d.name}.csv", d))
    test = _collect(_read_rois(_gtsrb_test_csv(root, gtsrb), gtsrb / "Final_Test" / "Images"))
    return Dataset("gtsrb", train, test, GTSRB_CLASSES)
