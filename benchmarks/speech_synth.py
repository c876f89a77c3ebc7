"""Speed of the offline speech data: plain espeak synthesis, full speech-synth generation
(augmentation and WAV writing) with 1 and 2 workers, and the Speech Commands loader.

    python benchmarks/speech_synth.py [--words 400] [--per-word 200]

Generation times include a fresh process per block of clips, but not the one-off start of the
server those processes fork from (a few seconds, to import torch), which a warm-up run pays.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from torchpurify.data.speech import KEYWORDS, read_speech_commands
from torchpurify.data.synth import TRAIN_VARIANTS, generate_speech_synth, speak


def speak_rate(words: int) -> float:
    """Words per second from :func:`speak` (16 kHz float output), one process."""
    speak("warm up")
    start = time.perf_counter()
    for i in range(words):
        voice = f"en-us+{TRAIN_VARIANTS[i % len(TRAIN_VARIANTS)]}"
        speak(KEYWORDS[i % len(KEYWORDS)], voice=voice)
    return words / (time.perf_counter() - start)


def generation_rate(folder: Path, per_word: int, workers: int) -> float:
    start = time.perf_counter()
    record = generate_speech_synth(folder, per_word=per_word, workers=workers, progress=False)
    return record["clips"] / (time.perf_counter() - start)


def loader_rate(folder: Path) -> float:
    start = time.perf_counter()
    ds = read_speech_commands(folder, name="speech-synth")
    return (len(ds.train) + len(ds.val) + len(ds.test)) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=400, help="words for plain synthesis")
    parser.add_argument("--per-word", type=int, default=200, help="clips per keyword generated")
    args = parser.parse_args()
    print(f"{'what':<44}{'clips/s':>10}")
    print(f"{'speak(), one process':<44}{speak_rate(args.words):>10.0f}")
    with tempfile.TemporaryDirectory() as tmp:
        generate_speech_synth(Path(tmp) / "warm-up", per_word=1, workers=1, progress=False)
        for workers in (1, 2):
            folder = Path(tmp) / f"workers-{workers}"
            rate = generation_rate(folder, args.per_word, workers)
            label = f"generate {args.per_word * len(KEYWORDS)} clips, {workers} worker(s)"
            print(f"{label:<44}{rate:>10.0f}")
        print(f"{'read_speech_commands (from page cache)':<44}{loader_rate(folder):>10.0f}")


if __name__ == "__main__":
    main()
