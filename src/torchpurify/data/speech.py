"""Speech Commands folders: Google's v0.01 / v0.02 releases and the offline speech-synth set.

The layout: one folder per word of one-second 16 kHz WAV clips, ``validation_list.txt`` and
``testing_list.txt`` naming the held-out clips by path (``yes/0a7c2a8d_nohash_0.wav``, split by
speaker), every other clip for training, and optionally ``_background_noise_/`` with long noise
recordings. :func:`read_speech_commands` builds the usual tasks from it: the ten keywords, the
twelve-class task (keywords + ``silence`` + ``unknown``) and all words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch

from torchpurify.data.base import Dataset, Split
from torchpurify.errors import UserError

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SAMPLE_RATE = 16000
VALIDATION_LIST = "validation_list.txt"
TESTING_LIST = "testing_list.txt"
BACKGROUND = "_background_noise_"
SILENCE, UNKNOWN = "silence", "unknown"
OFFICIAL_URL = "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
SPLITS = ("training", "validation", "testing")
LISTS = {"validation": VALIDATION_LIST, "testing": TESTING_LIST}


@dataclass(frozen=True)
class Clip:
    """One clip to load: a file, or a synthetic silence (``path`` None) cut from noise."""

    path: Path | None
    label: int


def word_folders(root: Path) -> list[str]:
    """The word folders of ``root``, sorted (``_background_noise_`` and hidden ones excluded)."""
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
    )


def missing_speech_commands(root: Path) -> str | None:
    """What ``root`` lacks to be a Speech Commands folder, or None when complete."""
    lists = [name for name in LISTS.values() if not (root / name).is_file()]
    if lists:
        return f"missing {' and '.join(lists)}"
    absent = sorted(set(KEYWORDS) - set(word_folders(root)), key=KEYWORDS.index)
    return f"missing the word folders {', '.join(absent)}" if absent else None


def read_wav(path: Path, frames: int = -1) -> np.ndarray:
    """The first ``frames`` samples (all by default) of a 16 kHz WAV file as float32 in [-1, 1],
    channels averaged."""
    try:
        audio, rate = soundfile.read(path, frames=frames, dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise UserError(f"cannot read audio file {path} ({err}); replace or delete it") from None
    if rate != SAMPLE_RATE:
        raise UserError(
            f"{path} is sampled at {rate} Hz but Speech Commands clips are {SAMPLE_RATE} Hz; "
            "resample the folder to 16 kHz"
        )
    return audio.mean(axis=1)


def _read_list(root: Path, name: str) -> set[str]:
    lines = (root / name).read_text().splitlines()
    return {line.strip().replace("\\", "/") for line in lines if line.strip()}


def _split_files(root: Path, words: list[str]) -> dict[str, dict[str, list[Path]]]:
    """split → word → sorted clip paths, by the two list files; the rest is training."""
    held_out = {split: _read_list(root, name) for split, name in LISTS.items()}
    files: dict[str, dict[str, list[Path]]] = {split: {} for split in SPLITS}
    found = set()
    for word in words:
        for path in sorted((root / word).glob("*.wav")):
            name = f"{word}/{path.name}"
            split = next((s for s, names in held_out.items() if name in names), "training")
            files[split].setdefault(word, []).append(path)
            found.add(name)
    for split, names in held_out.items():
        absent = sorted(n for n in names - found if n.split("/")[0] in words)
        if absent:
            raise UserError(
                f"{root / LISTS[split]} names {len(absent)} clips that are missing (first: "
                f"{absent[0]}); unpack the dataset again"
            )
    return files


def _background(root: Path) -> list[np.ndarray]:
    """The long noise recordings of ``_background_noise_/``, if the folder has them."""
    folder = root / BACKGROUND
    if not folder.is_dir():
        return []
    noises = [read_wav(path) for path in sorted(folder.glob("*.wav"))]
    return [noise for noise in noises if len(noise) >= SAMPLE_RATE]


def _noise_crop(noises: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One second of a random noise recording, or quiet white noise when there is none."""
    if not noises:
        return rng.standard_normal(SAMPLE_RATE).astype(np.float32) * 10 ** rng.uniform(-4, -2)
    noise = noises[int(rng.integers(len(noises)))]
    start = int(rng.integers(len(noise) - SAMPLE_RATE + 1))
    return noise[start : start + SAMPLE_RATE]


def _load(
    clips: list[Clip], noises: list[np.ndarray], rng: np.random.Generator, augment: float,
    volume: float,
) -> Split:  # fmt: skip
    """The clips padded or cut to one second; with ``augment`` > 0, that fraction of the
    spoken clips gets a noise crop mixed in at a random level up to ``volume``."""
    x = np.zeros((len(clips), SAMPLE_RATE), dtype=np.float32)
    for row, clip in zip(x, clips, strict=True):
        if clip.path is None:
            row[:] = _noise_crop(noises, rng) * rng.uniform(0, 1)
            continue
        audio = read_wav(clip.path, SAMPLE_RATE)
        row[: len(audio)] = audio
        if noises and rng.random() < augment:
            row += _noise_crop(noises, rng) * rng.uniform(0, volume)
    np.clip(x, -1.0, 1.0, out=x)
    y = torch.tensor([clip.label for clip in clips], dtype=torch.int64)
    return Split(torch.from_numpy(x), y, speaker_ids(clips))


def speaker(path: Path) -> str:
    """The speaker of a clip from its file name, ``<speaker>_nohash_<n>.wav`` (the whole stem
    when the name has no ``_nohash_``)."""
    return path.stem.split("_nohash_")[0]


def speaker_ids(clips: list[Clip]) -> torch.Tensor:
    """The clips' speakers as int64 factor ids, one row per clip: a speaker's name split at
    ``+`` (speech-synth's voices are ``<accent>+<variant>``: two factors; a Speech Commands
    speaker, one), each column numbered in sorted name order. Two clips are related when any
    factor is equal (:func:`~torchpurify.data.splits.defender_split`); each synthetic silence
    clip, and a missing factor, gets an id of its own."""
    names = [None if clip.path is None else speaker(clip.path).split("+") for clip in clips]
    width = max((len(parts) for parts in names if parts), default=1)
    ids = np.zeros((len(clips), width), dtype=np.int64)
    for k in range(width):
        values = sorted({parts[k] for parts in names if parts and len(parts) > k})
        number = {value: i for i, value in enumerate(values)}
        fresh = len(values)
        for row, parts in zip(ids, names, strict=True):
            if parts and len(parts) > k:
                row[k] = number[parts[k]]
            else:
                row[k], fresh = fresh, fresh + 1
    return torch.from_numpy(ids)


def read_speech_commands(
    root: Path,
    words: tuple[str, ...] | None = KEYWORDS,
    silence: bool = False,
    unknown: bool = False,
    name: str = "speech-commands",
    seed: int = 0,
    noise_fraction: float = 0.8,
    noise_volume: float = 0.1,
) -> Dataset:
    """The train, validation and test splits of a Speech Commands folder.

    ``words`` are the classes (None: every word folder, 35 in v0.02). ``silence`` adds a class of
    one-second noise crops from ``_background_noise_/`` (quiet white noise without it) and
    ``unknown`` a class of the other words' clips, each the size of an average word class in
    its split, drawn with ``seed``. Classes are the words in order, then ``silence``, then
    ``unknown``. Clips are padded with zeros or cut at the end to one second, as in
    TensorFlow's reference pipeline. When ``_background_noise_/`` exists, ``noise_fraction`` of
    the training clips get a noise crop mixed in at a random level up to ``noise_volume``.
    """
    root = Path(root)
    if root.is_dir():
        problem = missing_speech_commands(root)
    else:
        problem = "it is a file" if root.exists() else "it does not exist"
    if problem:
        raise UserError(f"{root} is not a Speech Commands folder: {problem}")
    present = word_folders(root)
    classes = list(words) if words is not None else present
    others = [w for w in present if w not in classes] if unknown else []
    if unknown and not others:
        raise UserError(f"{root} has no words besides {', '.join(classes)} for the unknown class")
    files = _split_files(root, classes + others)
    noises = _background(root)
    splits = {}
    for code, split in enumerate(SPLITS):
        rng = np.random.default_rng((seed, code))
        clips = [Clip(p, classes.index(w)) for w in classes for p in files[split].get(w, [])]
        share = len(clips) // max(len(classes), 1)
        if silence:
            clips += [Clip(None, len(classes))] * share
        if unknown:
            pool = [p for w in others for p in files[split].get(w, [])]
            chosen = sorted(rng.choice(len(pool), min(share, len(pool)), replace=False))
            clips += [Clip(pool[i], len(classes) + silence) for i in chosen]
        augment = noise_fraction if split == "training" else 0.0
        splits[split] = _load(clips, noises, rng, augment, noise_volume)
    classes += [SILENCE] * silence + [UNKNOWN] * unknown
    return Dataset(name, splits["training"], splits["testing"], classes, val=splits["validation"])
