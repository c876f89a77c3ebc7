"""A user's files cannot hurt them: memory follows what a file holds, not what its header
declares, and a malformed file ends in one line (a UserError naming it), never a traceback.

Peak memory is measured with tracemalloc where numpy and scipy allocate, and as the growth of
the peak resident size (VmHWM) of a fresh process where pillow or torch allocate (tracemalloc
does not see those)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.signal  # noqa: F401  (imported before any peak is traced)
import soundfile  # noqa: F401
import torch
from PIL import Image

from tests.cli_helpers import one_line_error, run
from torchpurify.data.byo import MAX_SAMPLE_RATE, read_own
from torchpurify.data.folder import MAX_IMAGE_PIXELS, read_image_folder
from torchpurify.errors import UserError
from torchpurify.models.io import read_weights

BOUND_MB = 200
ROOT = Path(__file__).resolve().parents[1]


def wav(path: Path, samples, rate: int, *, floats: bool = False) -> Path:
    """A plain PCM-16 (or IEEE float) WAV written byte by byte: the header says what we want."""
    width = 4 if floats else 2
    data = np.asarray(samples).astype("<f4" if floats else "<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 3 if floats else 1, 1, rate, rate * width, width, 8 * width)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
        + fmt + b"data" + struct.pack("<I", len(data)) + data
    )  # fmt: skip
    return path


def png(path: Path, height: int, width: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((height, width), np.uint8), mode="L").save(path)
    return path


def traced_peak_mb(read) -> tuple[float, UserError | object]:
    """Peak of Python/numpy allocations while ``read()`` runs, and what it returned or raised."""
    tracemalloc.start()
    try:
        outcome = read()
    except UserError as error:
        outcome = error
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 1e6, outcome


# VmHWM, not ru_maxrss: the latter carries the parent's peak across exec.
PROBE = """
import torch
from torchpurify.data.byo import read_own
from torchpurify.errors import UserError
from torchpurify.models.io import read_weights
def peak():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0])
before = peak()
try:
    result = {call}
    outcome = tuple(result.split.x.shape) if hasattr(result, "split") else "read"
except UserError as error:
    outcome = str(error)
print((peak() - before) / 1024)
print(outcome)
"""


def rss_growth_mb(call: str) -> tuple[float, str]:
    """Growth of the peak resident size of a fresh process while it runs ``call``, and the
    shape it read or the UserError's message."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(call=call)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=True,
    )  # fmt: skip
    growth, outcome = done.stdout.strip().splitlines()[-2:]
    return float(growth), outcome


# ---------------------------------------------------------------- audio


@pytest.mark.parametrize("declared", [250_007, 4_999_999])
def test_a_wav_declaring_a_huge_sample_rate_is_refused_from_its_header(tmp_path, declared):
    """244 bytes that declare 4,999,999 Hz took 4.8 GiB and 35 s to resample."""
    clip = wav(tmp_path / "yes" / "a.wav", np.zeros(100), declared)
    assert clip.stat().st_size == 244
    peak, outcome = traced_peak_mb(lambda: read_own(tmp_path, sample_rate=16000))
    assert isinstance(outcome, UserError) and str(clip) in str(outcome)
    assert f"{MAX_SAMPLE_RATE} Hz" in str(outcome)
    assert peak < BOUND_MB


def test_a_sample_rate_above_the_limit_is_one_line(tmp_path):
    wav(tmp_path / "clean" / "yes" / "a.wav", np.zeros(1600), 16000)
    with pytest.raises(UserError, match="--sample-rate"):
        read_own(tmp_path / "clean", sample_rate=2_000_000)
    (tmp_path / "net.pt").write_bytes(b"")
    result = run("purify", "--model", tmp_path / "net.pt", "--arch", "tests.test_byo:audio_net",
                 "--clean", tmp_path / "clean", "--sample-rate", 2_000_000, "--defense", "ft",
                 "--out", tmp_path / "out")  # fmt: skip
    one_line_error(result, "--sample-rate", "2000000")


def test_the_largest_allowed_rate_is_resampled_within_the_bound(tmp_path):
    """The worst ratio allowed (no common factor with the model's rate) stays bounded."""
    wav(tmp_path / "yes" / "a.wav", np.zeros(MAX_SAMPLE_RATE - 1), MAX_SAMPLE_RATE - 1)
    peak, own = traced_peak_mb(lambda: read_own(tmp_path, sample_rate=16000))
    assert own.split.x.shape == (1, 16000)
    assert peak < BOUND_MB


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinity_in_a_wav_is_refused(tmp_path, bad):
    clip = wav(tmp_path / "yes" / "a.wav", [0.0, bad, 0.5], 16000, floats=True)
    with pytest.raises(UserError, match="contains NaN or infinity") as error:
        read_own(tmp_path, sample_rate=16000)
    assert str(clip) in str(error.value)


# ---------------------------------------------------------------- .npz


def npz_of_zeros(path: Path, shape: tuple[int, ...], labels: int) -> Path:
    """An .npz whose ``x`` is float32 zeros of ``shape``, deflated while it is written (never
    held in memory), with ``labels`` zero labels."""
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            chunk, left = bytes(1 << 20), 4 * int(np.prod(shape))
            while left > 0:
                member.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
        with archive.open("y.npy", "w") as member:
            np.lib.format.write_array(member, np.zeros(labels, np.int64))
    return path


def test_an_npz_that_inflates_far_beyond_its_size_is_refused_before_decoding(tmp_path):
    """240 MB of zeros in a 0.25 MB file: refused from the zip directory, nothing decoded."""
    path = npz_of_zeros(tmp_path / "bomb.npz", (60_000, 1000), 60_000)
    assert path.stat().st_size < 1 << 20
    peak, outcome = traced_peak_mb(lambda: read_own(path))
    assert isinstance(outcome, UserError) and str(path) in str(outcome), outcome
    assert peak < BOUND_MB


def test_an_npz_header_declaring_a_trillion_values_is_one_line(tmp_path):
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        with archive.open("x.npy", "w") as member:
            header = {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)}
            np.lib.format.write_array_header_1_0(member, header)
        with archive.open("y.npy", "w") as member:
            np.lib.format.write_array(member, np.zeros(10**6, np.int64))
    peak, outcome = traced_peak_mb(lambda: read_own(path))
    assert isinstance(outcome, UserError) and str(path) in str(outcome), outcome
    assert peak < BOUND_MB


def test_an_ordinary_compressed_npz_still_reads(tmp_path):
    x = np.zeros((500, 1, 12, 12), np.float32)  # zeros deflate 1000×, but they are small
    x[:, 0, 0, 0] = np.arange(500)
    np.savez_compressed(tmp_path / "d.npz", x=x, y=np.arange(500) % 4)
    own = read_own(tmp_path / "d.npz", num_outputs=4)
    assert torch.equal(own.split.x, torch.from_numpy(x))


# ---------------------------------------------------------------- images


def test_one_large_image_does_not_set_the_size_of_all(tmp_path):
    """Without the model's input shape, images took the first image's size: a 1500×1500 PNG
    sorted first made every image 1500×1500 (4.5 GiB for a few hundred files)."""
    png(tmp_path / "a" / "0000.png", 1500, 1500)
    for i in range(40):
        png(tmp_path / "ab"[i % 2] / f"{i + 1:04d}.png", 12, 12)
    growth, outcome = rss_growth_mb(f"read_own({str(tmp_path)!r})")
    assert outcome == str((41, 1, 12, 12)), outcome
    assert growth < BOUND_MB


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    side = int(MAX_IMAGE_PIXELS**0.5) + 64
    big = png(tmp_path / "clean" / "a" / "big.png", side, side)
    with pytest.raises(UserError, match=f"{MAX_IMAGE_PIXELS:,} pixels") as error:
        read_own(tmp_path / "clean")
    assert str(big) in str(error.value)
    png(tmp_path / "folder" / "train" / "a" / "0.png", 12, 12)
    png(tmp_path / "folder" / "test" / "a" / "0.png", 12, 12)
    big.rename(tmp_path / "folder" / "train" / "a" / "big.png")
    with pytest.raises(UserError, match="big.png"):
        read_image_folder(tmp_path / "folder")


def test_the_image_folder_dataset_takes_the_most_common_size(tmp_path):
    png(tmp_path / "train" / "a" / "0.png", 64, 48)
    for i in range(1, 4):
        png(tmp_path / "train" / "ab"[i % 2] / f"{i}.png", 12, 10)
    png(tmp_path / "test" / "a" / "0.png", 12, 10)
    dataset = read_image_folder(tmp_path)
    assert dataset.train.x.shape == (4, 1, 12, 10)


# ---------------------------------------------------------------- weights


def test_a_pt_with_a_deflated_giant_tensor_is_refused_before_loading(tmp_path):
    """A 0.25 MB .pt holding 256 MB of deflated zeros was inflated before any check."""
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.empty(64 << 20)}, plain)  # untouched pages: no memory spent here
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            deflated = zipfile.ZipInfo(info.filename)
            deflated.compress_type = zipfile.ZIP_DEFLATED
            with source.open(info) as read, target.open(deflated, "w", force_zip64=True) as write:
                while chunk := read.read(1 << 20):
                    write.write(chunk)
    plain.unlink()
    growth, outcome = rss_growth_mb(f"read_weights({str(path)!r})")
    assert str(path) in outcome, outcome
    assert growth < BOUND_MB


def test_a_sparse_tensor_in_a_state_dict_is_one_line(tmp_path):
    path = tmp_path / "sparse.pt"
    torch.save({"w": torch.eye(3).to_sparse()}, path)
    with pytest.raises(UserError, match="sparse") as error:
        read_weights(path)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- malformed files


def test_a_corrupt_npz_is_one_line(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(UserError, match="not a readable .npz") as error:
        read_own(path)
    assert str(path) in str(error.value)


def test_a_zero_dimensional_x_is_one_line(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.float32(1), y=np.array([0]))
    with pytest.raises(UserError, match="x must be"):
        read_own(tmp_path / "d.npz")


@pytest.mark.parametrize("outputs", [None, 4])
def test_labels_must_fit_the_class_range(tmp_path, outputs):
    np.savez(tmp_path / "d.npz", x=np.zeros((1, 2), np.float32), y=np.array([2**63], np.uint64))
    with pytest.raises(UserError, match=str(2**63)):
        read_own(tmp_path / "d.npz", num_outputs=outputs)


@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_name_that_is_not_utf8_is_one_printable_line(tmp_path, where):
    clean = tmp_path / "clean"
    png(clean / "a" / "0.png", 12, 12)
    png(clean / "b" / "0.png", 12, 12)
    if where == "file":
        os.rename(clean / "b" / "0.png", os.fsencode(clean / "b") + b"/\xff.png")
    else:
        os.rename(clean / "b", os.fsencode(clean) + b"/\xff")
    with pytest.raises(UserError, match="not valid UTF-8") as error:
        read_own(clean)
    assert "\\xff" in str(error.value).encode("utf-8").decode()
    (tmp_path / "net.pt").write_bytes(b"")
    result = run("purify", "--model", tmp_path / "net.pt", "--arch", "tests.test_byo:image_net",
                 "--clean", clean, "--defense", "ft", "--out", tmp_path / "out")  # fmt: skip
    one_line_error(result, "not valid UTF-8")
