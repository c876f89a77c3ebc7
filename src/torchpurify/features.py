"""Audio front ends as modules: waveforms (…×T) → log-mel or MFCC maps (…×bins×frames).

They follow torchaudio's definitions in plain torch (torchaudio is not a dependency):
``torchaudio.transforms.MelSpectrogram`` (``torch.stft`` with a periodic Hann window, centred
frames with reflect padding, power 2, HTK mel scale, filter banks without area normalisation as
``torchaudio.functional.melscale_fbanks``), then ``log(mel + eps)`` for :class:`LogMel` or
torchaudio's ``MFCC`` (dB with ``top_db=80``, then an orthonormal DCT-II) for :class:`MFCC`.
A front end sits inside a model, so triggers act on waveforms and gradients reach the waveform
(trigger inversion optimises through it).

Defaults for 16 kHz speech: 25 ms windows (400 samples) every 10 ms (160 samples), so a 1-s clip
gives 101 frames; ``n_fft=512`` (a power of two, and bins 31 Hz apart, so even the narrowest low
mel filter covers at least one bin); 40 mel bins from 20 Hz (below speech, above DC and hum) to
the Nyquist frequency.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchpurify.errors import check


def hz_to_mel(hz: float) -> float:
    """The HTK mel scale: ``2595 · log10(1 + f / 700)``."""
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def mel_filter_bank(
    n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int
) -> torch.Tensor:
    """Triangular HTK filters as an ``n_freqs × n_mels`` matrix (torchaudio's ``melscale_fbanks``
    with ``norm=None``): filter m rises from edge m to edge m+1 and falls to edge m+2, with
    ``n_mels + 2`` edges evenly spaced in mel between ``f_min`` and ``f_max``."""
    freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    mels = torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    widths = edges[1:] - edges[:-1]
    slopes = edges[None, :] - freqs[:, None]  # n_freqs × (n_mels + 2)
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0).float()


def dct_matrix(n_mfcc: int, n_mels: int) -> torch.Tensor:
    """The orthonormal DCT-II as an ``n_mels × n_mfcc`` matrix (torchaudio's ``create_dct`` with
    ``norm="ortho"``), so ``coefficients = bands @ dct``."""
    n = torch.arange(n_mels, dtype=torch.float64)
    k = torch.arange(n_mfcc, dtype=torch.float64)[:, None]
    dct = torch.cos(math.pi / n_mels * (n + 0.5) * k) * math.sqrt(2.0 / n_mels)
    dct[0] /= math.sqrt(2.0)
    return dct.t().float()


class MelSpectrogram(nn.Module):
    """Power mel spectrogram, ``…×T → …×n_mels×frames`` with ``frames = T // hop_length + 1``.

    The window and filter bank are non-persistent buffers: they follow ``.to()`` but are rebuilt
    from the hyper-parameters rather than stored with a model's weights.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 512,
        win_length: int = 400,
        hop_length: int = 160,
        n_mels: int = 40,
        f_min: float = 20.0,
        f_max: float | None = None,
    ) -> None:
        super().__init__()
        f_max = sample_rate / 2 if f_max is None else f_max
        check(sample_rate > 0, f"sample_rate must be positive, got {sample_rate}")
        check(
            0 < win_length <= n_fft,
            f"win_length must be in 1..n_fft ({n_fft}), got {win_length}",
        )
        check(hop_length > 0, f"hop_length must be positive, got {hop_length}")
        check(n_mels >= 1, f"n_mels must be at least 1, got {n_mels}")
        check(
            0 <= f_min < f_max <= sample_rate / 2,
            f"need 0 ≤ f_min < f_max ≤ sample_rate / 2 ({sample_rate / 2:g} Hz), "
            f"got f_min={f_min:g}, f_max={f_max:g}",
        )
        bank = mel_filter_bank(n_fft // 2 + 1, f_min, f_max, n_mels, sample_rate)
        empty = (bank.amax(0) == 0).nonzero().flatten().tolist()
        check(
            not empty,
            f"n_mels={n_mels} is too many for n_fft={n_fft} between {f_min:g} and {f_max:g} Hz: "
            f"mel filters {empty[:5]} cover no frequency bin; raise n_fft or lower n_mels",
        )
        self.sample_rate, self.n_fft, self.hop_length = sample_rate, n_fft, hop_length
        self.win_length, self.n_mels = win_length, n_mels
        window = torch.hann_window(win_length, periodic=True)
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("filter_bank", bank, persistent=False)

    def frames(self, length: int) -> int:
        """How many frames a clip of ``length`` samples gives."""
        return length // self.hop_length + 1

    def power_mel(self, x: torch.Tensor) -> torch.Tensor:
        check(
            x.shape[-1] > self.n_fft // 2,
            f"a clip of {x.shape[-1]} samples is too short for n_fft={self.n_fft}; it needs "
            f"more than {self.n_fft // 2}",
        )
        leading = x.shape[:-1]
        spec = torch.stft(
            x.reshape(-1, x.shape[-1]),
            self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window.to(x.dtype),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        # |z|² as re² + im²: torchaudio's |z|^2 without the square root, whose gradient is
        # undefined at 0 (a silent clip would give NaN gradients to trigger inversion).
        power = spec.real.square() + spec.imag.square()
        # Frames × bins order suits torch.stft's memory layout and leaves the mel axis
        # contiguous, so a model's frames × bins map needs no copy.
        mel = torch.matmul(power.transpose(-1, -2), self.filter_bank.to(power.dtype))
        return mel.transpose(-1, -2).reshape(*leading, *mel.shape[-1:], mel.shape[-2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.power_mel(x)


class LogMel(MelSpectrogram):
    """``log(mel + eps)`` of the power mel spectrogram; ``eps=1e-6`` as torchaudio's MFCC uses
    for ``log_mels`` (a silent band reads log(1e-6) ≈ −13.8 rather than −∞)."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check(eps > 0, f"eps must be positive, got {eps}")
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.power_mel(x) + self.eps)


class MFCC(MelSpectrogram):
    """torchaudio's MFCC (``log_mels=False``): ``10 · log10(max(mel, 1e-10))`` clamped to at
    most ``top_db`` below the clip's peak, then the first ``n_mfcc`` orthonormal DCT-II
    coefficients over the mel axis, ``…×T → …×n_mfcc×frames``.

    The ``top_db`` floor is per clip. (torchaudio takes the peak over the whole batch when it is
    given a plain ``N×T`` batch, which would let one clip change another's features; it is per
    clip for ``N×1×T``, which is what this matches.)
    """

    def __init__(self, *args, n_mfcc: int = 40, top_db: float | None = 80.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check(
            1 <= n_mfcc <= self.n_mels,
            f"n_mfcc must be in 1..n_mels ({self.n_mels}), got {n_mfcc}",
        )
        check(top_db is None or top_db > 0, f"top_db must be positive or None, got {top_db}")
        self.n_mfcc, self.top_db = n_mfcc, top_db
        self.register_buffer("dct", dct_matrix(n_mfcc, self.n_mels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        db = 10.0 * torch.log10(torch.clamp(self.power_mel(x), min=1e-10))
        if self.top_db is not None:
            peak = db.amax(dim=(-2, -1), keepdim=True)
            db = torch.maximum(db, peak - self.top_db)
        return torch.matmul(db.transpose(-1, -2), self.dct.to(db.dtype)).transpose(-1, -2)


__all__ = ["LogMel", "MFCC", "MelSpectrogram", "dct_matrix", "hz_to_mel", "mel_filter_bank"]
