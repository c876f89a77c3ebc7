"""Offline speech: espeak-ng through ctypes, and the ``speech-synth`` keyword-spotting dataset.

:func:`speak` turns text into a 16 kHz waveform with the libespeak-ng that the
``espeakng-loader`` wheel ships. :func:`generate_speech_synth` writes the ten Speech Commands
keywords, spoken by many espeak voices (accent + variant), perturbed and mixed with noise until a
small CNN finds them about as hard as real recordings, into a folder in the Speech Commands
layout that :mod:`torchpurify.data.speech` reads.

Determinism: espeak keeps state between utterances (its pitch-flutter phase, for one), so the
same text spoken twice in one process can differ in the last bits. The generator therefore
synthesises fixed blocks of clips, each in a freshly forked process that has never spoken
before, and draws every clip's randomness from a seed made of (seed, clip index): the same seed
gives byte-identical files whatever the number of workers.
"""

from __future__ import annotations

import ctypes
import functools
import json
import multiprocessing
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from math import gcd
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
from scipy.signal import butter, fftconvolve, firwin, resample_poly, sosfilt

from torchpurify.data.speech import KEYWORDS, LISTS, SAMPLE_RATE
from torchpurify.errors import UserError

ESPEAK_RATE = 22050
VERSION = 1

# espeak_SetParameter codes and the ranges espeak accepts.
_RATE, _PITCH, _RANGE = 1, 3, 4
_LIMITS = {"rate": (80, 450), "pitch": (0, 99), "pitch_range": (0, 99)}

# Speakers are (accent, variant) pairs. One accent and some variants of each family (male,
# female, klatt, whisper, named) are held out for validation and others for testing, so no
# voice of the held-out splits is ever heard in training.
TRAIN_ACCENTS = ("en", "en-us", "en-gb-x-rp", "en-gb-x-gbclan", "en-029", "en-us-nyc")
VALIDATION_ACCENT = "en-gb-x-gbcwmd"
TEST_ACCENT = "en-gb-scotland"
TRAIN_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "klatt", "klatt2", "klatt3",
    "croak", "whisper", "Alex", "Andy", "Annie", "Denis", "Gene", "Jacky", "Lee", "Mario",
    "Michael", "adam", "aunty", "belinda", "benjamin", "boris", "david", "ed", "grandma",
    "gustave", "iven", "john", "linda", "max", "paul", "quincy", "rob", "shelby", "steph",
    "travis", "victor", "zac",
)  # fmt: skip
VALIDATION_VARIANTS = ("m7", "f4", "klatt4", "Andrea", "edward", "marcelo", "Gene2")
TEST_VARIANTS = ("m8", "f5", "klatt5", "whisperf", "grandpa", "robert", "ian", "Mike")
SPLITS = ("training", "validation", "testing")

# Background talkers: voices and words that never appear in the foreground.
BABBLE_VARIANTS = (
    "Hugo", "Henrique", "Diogo", "Marco", "Nguyen", "kaukovalta", "michel", "miguel",
    "norbert", "pablo", "pedro", "antonio", "anika", "steph2", "iven2", "mike2", "caleb",
)  # fmt: skip
BABBLE_WORDS = (
    "bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin", "nine",
    "one", "seven", "sheila", "six", "three", "tree", "two", "wow", "zero", "backward",
    "forward", "follow", "learn", "visual", "morning", "water", "table", "people", "little",
)  # fmt: skip
BABBLE_POOL = 12  # phrases synthesised per block, mixed into each clip's babble
BLOCK = 200  # clips per fresh process: part of what the output depends on


@dataclass(frozen=True)
class Augmentation:
    """Ranges of every random choice per clip (uniform unless said otherwise).

    Calibrated so that the default set is a real benchmark, where plain espeak clips let a
    small CNN reach 0.99 on held-out voices: kws-cnn trained with the CLI's defaults scores
    0.917 and 0.924 on the test split after 8 epochs (two seeds) and 0.931 after 20. Harder
    noise (SNR from -5 to 20 dB, low-pass from 2.5 kHz, 50 ms edge cuts) gave 0.84.
    """

    rate: tuple[int, int] = (120, 260)  # espeak words per minute
    pitch: tuple[int, int] = (15, 85)  # espeak base pitch, 0–99
    pitch_range: tuple[int, int] = (10, 95)  # espeak intonation range, 0–99
    speed: tuple[float, float] = (0.85, 1.15)  # resampling: tempo and formants together
    edge_cut_s: float = 0.03  # the word may start or end this far outside the second
    reverb_p: float = 0.5
    rt60_s: tuple[float, float] = (0.1, 0.7)  # exponentially decaying noise impulse response
    drr_db: tuple[float, float] = (-3.0, 12.0)  # direct-to-reverberant ratio
    filter_p: float = 0.4  # a random band limit: low-pass or high-pass Butterworth
    lowpass_hz: tuple[float, float] = (3500.0, 7500.0)
    highpass_hz: tuple[float, float] = (100.0, 500.0)
    noise_p: float = 0.85
    noise_kinds: tuple[str, ...] = ("white", "pink", "brown", "babble")
    snr_db: tuple[float, float] = (5.0, 30.0)  # speech power over the word / noise power
    babble_talkers: tuple[int, int] = (3, 7)
    peak_db: tuple[float, float] = (-30.0, -1.0)  # final gain, as peak level in dBFS


AUGMENTATION = Augmentation()


# ---------------------------------------------------------------- espeak-ng


def _data_path() -> Path:
    import espeakng_loader

    return Path(espeakng_loader.get_data_path())


def voice_variants() -> list[str]:
    """The variant names (``m1``, ``f3``, ``klatt``, ``whisper``, …) espeak's data provides."""
    return sorted(p.name for p in (_data_path() / "voices" / "!v").iterdir() if p.is_file())


def english_accents() -> list[str]:
    """The English accents espeak's data provides (``en`` is British English)."""
    names = (p.name.lower() for p in (_data_path() / "lang").rglob("en*") if p.is_file())
    return sorted(n for n in names if n != "en-shaw")  # Shavian alphabet, not an accent


class _Espeak:
    """libespeak-ng in synchronous mode; one per process, as the library is a singleton."""

    _CALLBACK = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
    )

    def __init__(self) -> None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        rate = lib.espeak_Initialize(2, 0, str(espeakng_loader.get_data_path()).encode(), 0)
        if rate != ESPEAK_RATE:
            raise RuntimeError(f"espeak-ng initialised at {rate} Hz, expected {ESPEAK_RATE}")
        self._chunks: list[np.ndarray] = []
        self._callback = self._CALLBACK(self._collect)  # kept alive as long as the library
        lib.espeak_SetSynthCallback(self._callback)
        self._lib = lib
        self._libc = ctypes.CDLL(None)
        self._lock = threading.Lock()
        self._variants = set(voice_variants())

    def _collect(self, wav, count, events) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (count,)).copy())
        return 0

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int):
        """int16 samples at 22 050 Hz."""
        accent, _, variant = voice.partition("+")
        if variant and variant not in self._variants:
            raise UserError(
                f"unknown espeak voice variant {variant!r} in {voice!r}; "
                f"choose one of: {', '.join(sorted(self._variants))}"
            )
        data = text.encode()
        with self._lock:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise UserError(
                    f"unknown espeak voice {accent!r}; English accents are: "
                    f"{', '.join(english_accents())} (add +VARIANT, e.g. en-us+f3)"
                )
            for code, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
                self._lib.espeak_SetParameter(code, int(value), 0)
            # Breath and klatt noise draw from espeak's generator and libc's rand().
            self._lib.espeak_ng_SetRandSeed(0)
            self._libc.srand(0)
            self._chunks.clear()
            status = self._lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)
            if status != 0:
                raise RuntimeError(f"espeak_Synth failed with status {status} on {text!r}")
            self._lib.espeak_Synchronize()
            samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
            self._chunks.clear()
        return samples


_ENGINE: _Espeak | None = None


def _engine() -> _Espeak:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Espeak()
    return _ENGINE


def _check_range(name: str, value: int) -> None:
    low, high = _LIMITS[name]
    if not low <= value <= high:
        raise UserError(f"{name} must be in {low}..{high}, got {value}")


def speak(
    text: str,
    voice: str = "en-us",
    rate: int = 175,
    pitch: int = 50,
    pitch_range: int = 50,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """``text`` spoken by espeak-ng: float32 mono samples in [-1, 1] at ``sample_rate``.

    ``voice`` is an accent, optionally with a variant (``"en-gb-scotland+f3"``; see
    :func:`english_accents` and :func:`voice_variants`); ``rate`` is in words per minute,
    ``pitch`` and ``pitch_range`` are espeak's 0–99 scales. espeak keeps some state between
    utterances, so a second call with the same arguments may differ in the last bits.
    """
    for name, value in (("rate", rate), ("pitch", pitch), ("pitch_range", pitch_range)):
        _check_range(name, value)
    if sample_rate <= 0:
        raise UserError(f"sample_rate must be positive, got {sample_rate}")
    samples = _engine().synthesize(text, voice, rate, pitch, pitch_range)
    common = gcd(sample_rate, ESPEAK_RATE)
    audio = resample_poly(samples / 32768.0, sample_rate // common, ESPEAK_RATE // common)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- one clip


@functools.cache
def speakers(split: str) -> list[tuple[str, str]]:
    """The (accent, variant) pairs whose voices belong to ``split``."""
    accents = (*TRAIN_ACCENTS, VALIDATION_ACCENT, TEST_ACCENT)
    variants = TRAIN_VARIANTS + VALIDATION_VARIANTS + TEST_VARIANTS
    return [(a, v) for a in accents for v in variants if speaker_split(a, v) == split]


def speaker_split(accent: str, variant: str) -> str:
    """A held-out accent or variant puts the voice in its split; test outranks validation."""
    if accent == TEST_ACCENT or variant in TEST_VARIANTS:
        return "testing"
    if accent == VALIDATION_ACCENT or variant in VALIDATION_VARIANTS:
        return "validation"
    return "training"


def clip_split(position: int) -> str:
    """The split of a word's ``position``-th clip: 1 in 10 validation, 1 in 10 testing."""
    return {1: "validation", 2: "testing"}.get(position % 10, "training")


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def _integer(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    """Uniform over ``bounds``, both ends included."""
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _trim(samples: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """``samples`` without the leading and trailing silence espeak adds around a word."""
    loud = np.flatnonzero(np.abs(samples) > threshold * max(np.abs(samples).max(), 1))
    return samples[loud[0] : loud[-1] + 1] if len(loud) else samples


def _place(word: np.ndarray, rng: np.random.Generator, aug: Augmentation):
    """The word at a random start in one silent second, and the span it covers there."""
    cut = int(aug.edge_cut_s * SAMPLE_RATE)
    start = int(rng.integers(-cut, max(SAMPLE_RATE - len(word), 0) + cut + 1))
    canvas = np.zeros(SAMPLE_RATE)
    lo, hi = max(start, 0), min(start + len(word), SAMPLE_RATE)
    canvas[lo:hi] = word[lo - start : hi - start]
    return canvas, (lo, max(hi, lo + 1))


def _reverberate(audio: np.ndarray, rng: np.random.Generator, aug: Augmentation) -> np.ndarray:
    """A room: the direct sound plus an exponentially decaying noise tail (60 dB at RT60)."""
    rt60 = _uniform(rng, aug.rt60_s)
    t = np.arange(1, int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    tail = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60)
    tail *= 10 ** (-_uniform(rng, aug.drr_db) / 20) / np.sqrt(np.sum(tail**2))
    response = np.concatenate([[1.0], tail])
    return fftconvolve(audio, response)[: len(audio)]


@functools.lru_cache(maxsize=512)
def _butterworth(cutoff_hz: int, kind: str) -> np.ndarray:
    return butter(4, cutoff_hz, kind, fs=SAMPLE_RATE, output="sos")


def _band_limit(audio: np.ndarray, rng: np.random.Generator, aug: Augmentation) -> np.ndarray:
    """A cheap microphone or channel: 4th-order low-pass or high-pass (cutoff to 10 Hz)."""
    if rng.random() < 0.5:
        kind, bounds = "lowpass", aug.lowpass_hz
    else:
        kind, bounds = "highpass", aug.highpass_hz
    return sosfilt(_butterworth(round(_uniform(rng, bounds), -1), kind), audio)


def coloured_noise(rng: np.random.Generator, exponent: float, n: int = SAMPLE_RATE) -> np.ndarray:
    """Unit-variance noise with power ∝ 1/f^exponent (0 white, 1 pink, 2 brown) above 20 Hz."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)
    noise = np.fft.irfft(spectrum / freqs ** (exponent / 2), n)
    return noise / noise.std()


def _babble(rng: np.random.Generator, pool: list[np.ndarray], aug: Augmentation) -> np.ndarray:
    """Several background talkers: random one-second stretches of the block's phrase pool."""
    mix = np.zeros(SAMPLE_RATE)
    for _ in range(_integer(rng, aug.babble_talkers)):
        phrase = pool[int(rng.integers(len(pool)))]
        looped = np.resize(phrase, max(len(phrase), SAMPLE_RATE))  # repeats short phrases
        start = int(rng.integers(len(looped) - SAMPLE_RATE + 1))
        mix += looped[start : start + SAMPLE_RATE] * rng.uniform(0.3, 1.0)
    return mix / max(mix.std(), 1e-9)


def _noise(rng: np.random.Generator, pool: list[np.ndarray], aug: Augmentation) -> np.ndarray:
    kind = aug.noise_kinds[int(rng.integers(len(aug.noise_kinds)))]
    if kind == "babble":
        return _babble(rng, pool, aug)
    return coloured_noise(rng, {"white": 0.0, "pink": 1.0, "brown": 2.0}[kind])


@functools.lru_cache(maxsize=256)
def _lowpass(up: int, down: int) -> np.ndarray:
    """The anti-aliasing filter ``resample_poly`` would design, kept for the next clip."""
    rate = max(up, down)
    return firwin(20 * rate + 1, 1.0 / rate, window=("kaiser", 5.0))


def _speed(samples: np.ndarray, speed: float) -> np.ndarray:
    """22 050 Hz int16 → 16 kHz float, played ``speed`` times faster (polyphase filter)."""
    down = round(441 * speed)
    up, down = 320 // gcd(320, down), down // gcd(320, down)
    return resample_poly(samples / 32768.0, up, down, window=_lowpass(up, down))


def render_clip(
    engine: _Espeak,
    word: str,
    split: str,
    rng: np.random.Generator,
    pool: list[np.ndarray],
    aug: Augmentation = AUGMENTATION,
) -> tuple[np.ndarray, str]:
    """One augmented one-second clip of ``word`` as int16, and the voice that spoke it.

    ``pool`` holds the background phrases babble is mixed from (see :func:`_babble_pool`).
    """
    voices = speakers(split)
    accent, variant = voices[int(rng.integers(len(voices)))]
    voice = f"{accent}+{variant}"
    rate, pitch, spread = (_integer(rng, r) for r in (aug.rate, aug.pitch, aug.pitch_range))
    samples = _trim(engine.synthesize(word, voice, rate, pitch, spread))
    audio, (lo, hi) = _place(_speed(samples, _uniform(rng, aug.speed)), rng, aug)
    if rng.random() < aug.reverb_p:
        audio = _reverberate(audio, rng, aug)
    if rng.random() < aug.filter_p:
        audio = _band_limit(audio, rng, aug)
    if rng.random() < aug.noise_p:
        noise = _noise(rng, pool, aug)
        speech_power = max(np.mean(audio[lo:hi] ** 2), 1e-12)
        audio = audio + noise * np.sqrt(speech_power / 10 ** (_uniform(rng, aug.snr_db) / 10))
    peak = 10 ** (_uniform(rng, aug.peak_db) / 20)
    audio *= peak / max(np.abs(audio).max(), 1e-9)
    return np.round(audio * 32767).astype(np.int16), voice


# ---------------------------------------------------------------- the dataset


def _babble_pool(engine: _Espeak, seed: int) -> list[np.ndarray]:
    """Phrases of non-keyword words by background voices; the same for every block."""
    rng = np.random.default_rng((seed, 1))
    accents = (*TRAIN_ACCENTS, VALIDATION_ACCENT, TEST_ACCENT)
    pool = []
    for _ in range(BABBLE_POOL):
        words = rng.choice(BABBLE_WORDS, size=int(rng.integers(4, 9)))
        voice = f"{rng.choice(accents)}+{rng.choice(BABBLE_VARIANTS)}"
        samples = engine.synthesize(" ".join(words), voice, int(rng.integers(140, 230)), 50, 50)
        pool.append(_speed(samples, 1.0))
    return pool


def clip_path(index: int, voice: str) -> str:
    """``<word>/<speaker>_nohash_<n>.wav``, the Speech Commands naming."""
    return f"{KEYWORDS[index % len(KEYWORDS)]}/{voice}_nohash_{index // len(KEYWORDS)}.wav"


def _render_block(job: tuple[Path, int, int, int]) -> list[tuple[str, str]]:
    """Clips ``start``..``stop`` written under ``folder``; runs in a process of its own."""
    import soundfile

    folder, seed, start, stop = job
    engine = _engine()
    pool = _babble_pool(engine, seed)
    written = []
    for index in range(start, stop):
        word = KEYWORDS[index % len(KEYWORDS)]
        split = clip_split(index // len(KEYWORDS))
        rng = np.random.default_rng((seed, 0, index))
        audio, voice = render_clip(engine, word, split, rng, pool)
        path = clip_path(index, voice)
        soundfile.write(folder / path, audio, SAMPLE_RATE, subtype="PCM_16")
        written.append((path, split))
    return written


def _fresh_processes(workers: int):
    """A pool whose every task runs in a new process forked from a clean server.

    A process that has spoken before would change the next clips' last bits (see the module
    docstring), and so would forking the caller, which may have used espeak itself.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context.Pool(workers, maxtasksperchild=1)


def manifest(per_word: int, seed: int) -> dict:
    """Everything the files depend on, written beside them as ``manifest.json``."""
    return {
        "name": "speech-synth",
        "version": VERSION,
        "seed": seed,
        "per_word": per_word,
        "clips": per_word * len(KEYWORDS),
        "words": list(KEYWORDS),
        "sample_rate": SAMPLE_RATE,
        "accents": {
            "training": list(TRAIN_ACCENTS),
            "validation": [VALIDATION_ACCENT],
            "testing": [TEST_ACCENT],
        },
        "variants": {
            "training": list(TRAIN_VARIANTS),
            "validation": list(VALIDATION_VARIANTS),
            "testing": list(TEST_VARIANTS),
        },
        "speakers": {split: [f"{a}+{v}" for a, v in speakers(split)] for split in SPLITS},
        "split_rule": "clip n of a word: n % 10 == 1 validation, n % 10 == 2 testing, "
        "else training; its speaker is drawn from that split's speakers",
        "babble": {"variants": list(BABBLE_VARIANTS), "words": list(BABBLE_WORDS)},
        "augmentation": asdict(AUGMENTATION),
        "synthesis_block": BLOCK,
    }


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the speech-synth dataset")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another folder or empty it")


def generate_speech_synth(
    out: Path | str,
    per_word: int = 1200,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the speech-synth dataset to ``out`` and return its manifest.

    ``out`` gets ``<word>/<speaker>_nohash_<n>.wav`` (16 kHz, 16-bit PCM, one second),
    ``validation_list.txt``, ``testing_list.txt`` and ``manifest.json``. Files are made in a
    hidden folder beside ``out`` and renamed into place at the end, so an interrupted run
    leaves nothing that looks finished.
    """
    if per_word < 1:
        raise UserError(f"per_word must be at least 1, got {per_word}")
    workers = multiprocessing.cpu_count() if workers is None else workers
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    out = Path(out).expanduser()
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        for word in KEYWORDS:
            (staging / word).mkdir()
        total = per_word * len(KEYWORDS)
        jobs = [(staging, seed, s, min(s + BLOCK, total)) for s in range(0, total, BLOCK)]
        lists: dict[str, list[str]] = {split: [] for split in SPLITS}
        columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        processes = _fresh_processes(min(workers, len(jobs)))
        from torchpurify.train import progress_bar  # plain lines when stderr is a log

        bar = progress_bar(*columns, transient=False, disable=not progress)
        with bar, processes as pool:
            task = bar.add_task("speech-synth", total=total)
            for written in pool.imap(_render_block, jobs):
                for path, split in written:
                    lists[split].append(path)
                bar.advance(task, len(written))
        for split, name in LISTS.items():
            (staging / name).write_text("".join(f"{p}\n" for p in sorted(lists[split])))
        record = manifest(per_word, seed)
        (staging / "manifest.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record
