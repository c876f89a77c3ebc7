"""Your own data for your own model: an image folder, a folder of WAVs, or an ``.npz``.

:func:`read_own` reads one of

- an image folder ``ROOT/<class>/*.png|jpg|jpeg|ppm|bmp``: float32 C×H×W in [0, 1], resized to
  the model's input size (or to the most common size when the model does not say), grey when
  the model takes one channel (or every image is grey), RGB otherwise;
- a Speech Commands-style folder ``ROOT/<word>/*.wav`` (``_background_noise_`` and hidden folders
  are skipped): mono float32 at the model's sample rate — several channels are averaged, another
  rate is resampled (with a note) — padded with zeros or cut at the end to the model's length;
- an ``.npz`` with ``x`` (N×… inputs, as the model takes them) and ``y`` (N integer labels).

How folder names become the model's output indices, in this order:

0. the user's mapping (``--classes a,b,c`` in output order, or a JSON file: a list in output
   order or an object ``{"name": index}``, :func:`parse_classes`): every folder must be in it;
1. every folder name is one of the model's class names (a torchpurify model card lists them):
   that class's index;
2. every folder name is a whole number (``0``, ``1``, …, ``9``): that number;
3. numbered and named folders mixed: refused — no rule can say where ``three`` goes;
4. otherwise the folder names sorted alphabetically are 0, 1, …, K−1, and K must equal the
   number of classes the model outputs.

A label outside the model's outputs, or a class count that does not match, is one clear line.
A wrong order is caught later, by the model's own accuracy (:func:`torchpurify.api.load_own`).

Memory follows what the files hold, never what their headers declare: sizes are checked from
headers before anything is decoded (:data:`MAX_VALUES`, :data:`MAX_SAMPLE_RATE`,
:data:`~torchpurify.data.folder.MAX_IMAGE_PIXELS`, :func:`~torchpurify.models.io.check_unpacked`).
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchpurify.card import MAX_CLASSES, MAX_INPUT_VALUES
from torchpurify.checks import shown
from torchpurify.data.base import Split
from torchpurify.data.folder import (
    IMAGE_SUFFIXES,
    _open,
    _stack,
    _to_array,
    check_name,
    common_size,
    image_headers,
)
from torchpurify.data.speech import Clip, speaker_ids
from torchpurify.errors import UserError, check
from torchpurify.models.io import check_unpacked

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}
# The highest sample rate read, from the file's header or --sample-rate: resampling between
# rates with no common factor builds a filter 20× the larger rate (0.2 GB and 1 s a clip here;
# a 244-byte WAV declaring 5 MHz took 4.8 GiB and 35 s).
MAX_SAMPLE_RATE = 192_000
MAX_VALUES = 1 << 30  # values of one data set held in memory: 4 GiB as float32


@dataclass
class OwnData:
    """Inputs and labels read from a user's path, how they were mapped, and where they came from.

    ``classes`` names the folder (or label) behind each index that occurs; ``source`` is what a
    model card records: the path, its kind, the number of files and one SHA-256 over them.
    """

    split: Split
    kind: str  # "images", "audio" or "npz"
    mapping: dict[str, int]
    source: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.split.x.shape[1:])


def class_folders(root: Path) -> list[Path]:
    return sorted(
        check_name(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
    )


def _check_size(shape: Sequence[int], where: str) -> None:
    """Refuse data of ``shape`` (N samples × one input) before it is decoded: a sample larger
    than a model input may be, or more than :data:`MAX_VALUES` values in all."""
    sample = math.prod(shape[1:])
    check(
        sample <= MAX_INPUT_VALUES,
        f"{where}: one sample of shape {tuple(shape[1:])} has more than the "
        f"{MAX_INPUT_VALUES:,} values a model input may have; give smaller samples",
    )
    check(
        shape[0] * sample <= MAX_VALUES,
        f"{where} holds {shape[0]:,} samples of {sample:,} values, more than the "
        f"{MAX_VALUES:,} torchpurify holds in memory; give fewer or smaller samples",
    )


def _check_rate(rate: int, what: str, fix: str) -> None:
    """Refuse a sample rate above :data:`MAX_SAMPLE_RATE`, before any audio is decoded."""
    check(
        0 < rate <= MAX_SAMPLE_RATE,
        f"{what} is {rate} Hz; torchpurify reads rates of 1 to {MAX_SAMPLE_RATE} Hz: {fix}",
    )


def folder_kind(root: Path) -> str:
    """``images`` or ``audio``, by the files in the class folders; a UserError otherwise."""
    suffixes = {
        f.suffix.lower() for folder in class_folders(root) for f in folder.iterdir() if f.is_file()
    }
    images, audio = suffixes & IMAGE_SUFFIXES, suffixes & AUDIO_SUFFIXES
    if images and audio:
        raise UserError(f"{root} mixes images and audio files; give one kind of data")
    if images:
        return "images"
    if audio:
        return "audio"
    raise UserError(
        f"{root} has no class folders of images ({'/'.join(sorted(IMAGE_SUFFIXES))}) or audio "
        "(.wav): lay it out as ROOT/<class>/<file>"
    )


def parse_classes(given: str | Sequence[str] | Mapping[str, int] | None) -> dict[str, int] | None:
    """The user's class mapping, name → output index: ``"yes,no,up"`` (output order), a path to
    a JSON file holding a list in output order or an object ``{"yes": 0, ...}``, or the same as
    a Python list or dict. Names must be distinct and indices distinct integers ≥ 0."""
    if given is None:
        return None
    where = "--classes"
    if isinstance(given, str):
        if given.lower().endswith(".json"):
            path, where = Path(given), f"--classes {given}"
            check(path.is_file(), f"{where} does not exist; give NAME,NAME,... or a JSON file")
            check(
                path.stat().st_size <= 1 << 20,
                f"{where} is over 1 MB; a class mapping is a short list",
            )
            try:
                given = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise UserError(
                    f"{where} is not readable JSON ({error}); give a list of class names in "
                    'output order, or an object {"name": index, ...}'
                ) from None
        else:
            given = [name.strip() for name in given.split(",")]
    if isinstance(given, Mapping):
        mapping = dict(given)
    elif isinstance(given, (list, tuple)):
        check(
            all(isinstance(name, str) for name in given),
            f"{where}: class names must be strings, got {shown(list(given))}",
        )
        repeated = sorted({name for name in given if list(given).count(name) > 1})
        check(not repeated, f"{where} names {shown(repeated)} more than once")
        mapping = {name: index for index, name in enumerate(given)}
    else:
        raise UserError(
            f"{where} must be a list of class names in output order or an object "
            f'{{"name": index}}, got {type(given).__name__}'
        )
    check(0 < len(mapping) <= MAX_CLASSES, f"{where} must name 1 to {MAX_CLASSES:,} classes")
    for name, index in mapping.items():
        check(
            isinstance(name, str) and name != "",
            f"{where}: every class name must be a non-empty string, got {shown(name)}",
        )
        check(
            isinstance(index, int) and not isinstance(index, bool) and 0 <= index < MAX_CLASSES,
            f"{where}: class {name!r} must map to an output index 0 or more, got {shown(index)}",
        )
    twice = sorted({i for i in mapping.values() if list(mapping.values()).count(i) > 1})
    check(not twice, f"{where} maps several names to output index {shown(twice)}")
    return mapping


def map_classes(
    names: Sequence[str],
    model_classes: Sequence[str] | None,
    num_outputs: int | None,
    where: str,
    classes: dict[str, int] | None = None,
) -> dict[str, int]:
    """Folder names → output indices by the rules of this module's docstring."""
    check(len(names) > 0, f"{where} has no class folders; lay it out as ROOT/<class>/<file>")
    numbered = [name for name in names if name.isdigit()]
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        check(
            not unknown,
            f"{where} has class folders {shown(unknown)} that --classes does not name; "
            "name every folder in --classes",
        )
        mapping = {name: classes[name] for name in names}
    elif model_classes is not None and set(names) <= set(model_classes):
        mapping = {name: list(model_classes).index(name) for name in names}
    elif len(numbered) == len(names):
        mapping = {name: int(name) for name in names}
    elif numbered:
        named = sorted(set(names) - set(numbered))
        raise UserError(
            f"{where} mixes numbered class folders ({shown(sorted(numbered, key=int))}) and "
            f"named ones ({shown(named)}), so no rule says which output each is; rename them, "
            "or give the model's classes in output order with --classes NAME,NAME,... (or a "
            "JSON file)"
        )
    else:
        mapping = {name: i for i, name in enumerate(sorted(names))}
        check(
            num_outputs is None or len(names) == num_outputs,
            f"{where} has {len(names)} class folders but the model outputs {num_outputs} "
            "classes; give one folder per class, or name the folders by their output index "
            "(0, 1, ...)",
        )
    top = max(mapping.values())
    check(
        num_outputs is None or top < num_outputs,
        f"{where}: class {max(mapping, key=mapping.get)!r} is label {top} but the model outputs "
        f"only {num_outputs} classes{_range(num_outputs)}",
    )
    return mapping


def _range(count: int | None) -> str:
    """`` (0..K-1)`` for a count of at least one class, else nothing (never "0..0" or "0..-1")."""
    return f" (0..{count - 1})" if count is not None and count > 1 else ""


def _digest(files: Sequence[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def read_audio(path: Path, rate: int, length: int, notes: set[str]) -> np.ndarray:
    """One clip as mono float32 at ``rate``, padded or cut to ``length`` samples. The file's
    rate is checked from its header, and only the frames that make ``length`` samples are read."""
    import soundfile
    from scipy.signal import resample_poly

    try:
        with soundfile.SoundFile(path) as file:
            file_rate = file.samplerate
            _check_rate(file_rate, f"the sample rate of {path}", "resample it, or delete it")
            needed = math.ceil(length * file_rate / rate)
            if file.frames > needed:
                notes.add(f"cut clips longer than {length} samples")
            audio = file.read(needed, dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as error:
        raise UserError(f"cannot read audio file {path} ({error}); replace or delete it") from None
    check(
        bool(np.isfinite(audio).all()),
        f"{path}: the audio contains NaN or infinity; replace or delete it",
    )
    if audio.shape[1] > 1:
        notes.add("averaged several channels to mono")
    clip = audio.mean(axis=1)
    if file_rate != rate:
        common = math.gcd(rate, file_rate)
        clip = resample_poly(clip, rate // common, file_rate // common).astype(np.float32)
        notes.add(f"resampled from {file_rate} Hz to the model's {rate} Hz")
    if len(clip) < length:
        notes.add(f"padded clips shorter than {length} samples with silence")
    out = np.zeros(length, np.float32)
    out[: min(length, len(clip))] = clip[:length]
    return np.clip(out, -1.0, 1.0)


def read_own(
    path: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    model_classes: Sequence[str] | None = None,
    num_outputs: int | None = None,
    sample_rate: int = 16000,
    mapping: dict[str, int] | None = None,
    classes: dict[str, int] | None = None,
    progress: bool = False,
) -> OwnData:
    """Read a user's data at ``path`` for a model taking ``input_shape`` with ``num_outputs``
    classes (either may be None when the model does not say yet). ``mapping`` reuses the class
    mapping of the clean data for a test folder; ``classes`` is the user's own mapping
    (:func:`parse_classes`), which folder names must follow and which names an .npz's labels.
    ``progress``: a bar (plain lines in a log) while the files are decoded."""
    path = Path(path)
    check(path.exists(), f"{path} does not exist; give a folder ROOT/<class>/<file> or an .npz")
    if path.is_file():
        own = _read_npz(path, input_shape, num_outputs)
        if classes is not None:
            labels = set(own.mapping.values())
            unnamed = sorted(labels - set(classes.values()))
            check(not unnamed, f"{path} has labels {shown(unnamed)} that --classes does not name")
            own.mapping = {name: index for name, index in classes.items() if index in labels}
        return own
    kind = folder_kind(path)
    folders = class_folders(path)
    names = [f.name for f in folders]
    if mapping is not None:
        unknown = sorted(set(names) - set(mapping))
        check(not unknown, f"{path} has classes {unknown} that the clean data does not have")
    else:
        mapping = map_classes(names, model_classes, num_outputs, str(path), classes)
    suffixes = IMAGE_SUFFIXES if kind == "images" else AUDIO_SUFFIXES
    files = [
        (check_name(f), mapping[folder.name])
        for folder in folders
        for f in sorted(folder.iterdir())
        if f.is_file() and f.suffix.lower() in suffixes
    ]
    check(len(files) > 0, f"{path} holds no {kind} files in its class folders")
    notes: set[str] = set()
    if kind == "images":
        split = _read_images(files, input_shape, notes, path, progress)
    else:
        if input_shape is not None:
            check(
                len(input_shape) == 1,
                f"{path} holds audio but the model takes inputs of shape {tuple(input_shape)}",
            )
        _check_rate(sample_rate, "--sample-rate (the model's rate)", "give the model's own rate")
        length = input_shape[0] if input_shape is not None else sample_rate
        _check_size((len(files), length), str(path))
        clips = [
            read_audio(f, sample_rate, length, notes)
            for f, _ in _reading(files, f"reading {path.name}", progress)
        ]
        # Speech Commands names (<speaker>_nohash_<n>.wav): the defender's split is by speaker.
        named = all("_nohash_" in f.stem for f, _ in files)
        split = Split(
            torch.from_numpy(np.stack(clips)),
            torch.tensor([label for _, label in files], dtype=torch.int64),
            speaker_ids([Clip(f, label) for f, label in files]) if named else None,
        )
    source = {
        "path": str(path.resolve()),
        "kind": kind,
        "files": len(files),
        "sha256": _digest([f for f, _ in files], path),
        "classes": mapping,
    }
    if kind == "audio":
        source["sample_rate"] = sample_rate
    return OwnData(split, kind, mapping, source, sorted(notes))


def _reading(files: list, description: str, progress: bool):
    """``files``, one by one, with a progress bar (:func:`torchpurify.train.progress_bar`)."""
    from torchpurify.train import progress_bar

    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(description, total=len(files))
        for item in files:
            yield item
            bar.advance(task)


def _read_images(
    files: list[tuple[Path, int]],
    input_shape: Sequence[int] | None,
    notes: set[str],
    root: Path,
    progress: bool = False,
) -> Split:
    """Images at the model's input size, else at the most common size (:func:`common_size`)."""
    headers = image_headers(path for path, _ in files)
    if input_shape is not None:
        check(
            len(input_shape) == 3 and input_shape[0] in (1, 3),
            f"the images need a model taking 1×H×W or 3×H×W inputs, not {tuple(input_shape)}",
        )
        mode, size = ("L" if input_shape[0] == 1 else "RGB"), tuple(input_shape[1:])
    else:
        mode = "L" if all(m == "L" for m, _ in headers) else "RGB"
        size = common_size(s for _, s in headers)
    _check_size((len(files), 1 if mode == "L" else 3, *size), str(root))
    if any(h[1] != size for h in headers):
        notes.add(f"resized images to {size[0]}×{size[1]}")
    if any((m == "L") != (mode == "L") for m, _ in headers):
        notes.add("converted images to grey" if mode == "L" else "converted images to RGB")
    images = [
        _to_array(_open(path), mode, size)
        for path, _ in _reading(files, f"reading {root.name}", progress)
    ]
    return _stack(images, [label for _, label in files], mode, size)


def _npy_header(archive: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array ``name`` in an .npz, from its .npy header alone; refused when
    the header declares more data than the member holds."""
    info = archive.getinfo(f"{name}.npy")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"{name}.npy has .npy format version {version}, not 1.0 or 2.0")
        shape, _, dtype = read_header(member)
    check(
        math.prod(shape) * dtype.itemsize <= info.file_size,
        f"{archive.filename}: {name} declares shape {shape} of {dtype} but holds only "
        f"{info.file_size:,} bytes; the file is cut short or forged",
    )
    return shape, dtype


def _check_headers(
    path: Path,
    x: tuple[tuple[int, ...], np.dtype],
    y: tuple[tuple[int, ...], np.dtype],
    input_shape: Sequence[int] | None,
) -> None:
    """Refuse an .npz by the (shape, dtype) of its ``x`` and ``y``, before they are decoded."""
    (x_shape, x_dtype), (y_shape, y_dtype) = x, y
    check(len(x_shape) >= 1, f"{path}: x must be N samples (N×...), got a 0-dimensional array")
    check(
        np.issubdtype(x_dtype, np.number) and not np.issubdtype(x_dtype, np.complexfloating),
        f"{path}: x must hold numbers, got {x_dtype}",
    )
    check(
        np.issubdtype(y_dtype, np.integer) and y_shape == x_shape[:1] and x_shape[0] > 0,
        f"{path}: y must be {x_shape[0]} integer labels (one per row of x), got "
        f"{y_dtype} {y_shape}",
    )
    if input_shape is not None:
        check(
            tuple(x_shape[1:]) == tuple(input_shape),
            f"{path}: x has samples of shape {tuple(x_shape[1:])} but the model takes "
            f"{tuple(input_shape)}",
        )
    _check_size(x_shape, str(path))


def _read_npz(path: Path, input_shape: Sequence[int] | None, num_outputs: int | None) -> OwnData:
    """``x`` and ``y`` of an .npz, their sizes checked from the zip directory and the .npy
    headers before either is decoded."""
    check(path.suffix == ".npz", f"{path} is a file: give an .npz with x and y, or a folder")
    try:
        with zipfile.ZipFile(path) as archive:
            members = ["x.npy", "y.npy"]
            check(set(members) <= set(archive.namelist()), f"{path} needs arrays named x and y")
            check_unpacked(path, map(archive.getinfo, members))
            _check_headers(path, *(_npy_header(archive, name) for name in "xy"), input_shape)
            x, y = (
                np.lib.format.read_array(archive.open(member), allow_pickle=False)
                for member in members
            )
    except UserError:
        raise
    except (
        zipfile.BadZipFile,
        OSError,
        ValueError,
        EOFError,
        NotImplementedError,
        zlib.error,
    ) as error:
        raise UserError(
            f"{path} is not a readable .npz without pickles ({error}); save it with "
            "numpy.savez(PATH, x=..., y=...)"
        ) from None
    check(int(y.min()) >= 0, f"{path}: labels must be 0 or more, got {int(y.min())}")
    outputs = num_outputs if num_outputs is not None else MAX_CLASSES
    check(
        int(y.max()) < outputs,
        f"{path}: label {int(y.max())} is not one of the model's {outputs} output "
        f"indices{_range(outputs)}",
    )
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    check(bool(torch.isfinite(x).all()), f"{path}: x contains NaN or infinity")
    labels = sorted({int(v) for v in y})
    source = {
        "path": str(path.resolve()),
        "kind": "npz",
        "files": 1,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    return OwnData(
        Split(x, torch.from_numpy(y.astype(np.int64))), "npz", {str(v): v for v in labels}, source
    )


__all__ = ["OwnData", "map_classes", "parse_classes", "read_audio", "read_own"]
