"""Audio triggers (methods.md §9): they act on waveforms, before the model's log-mel front end.

All act on float waveforms T (or batches N×T) in [-1, 1] sampled at ``sample_rate`` (16 kHz
mono by default). Durations are in milliseconds and positions are fractions of the free room in
the clip (0 = at the start, 1 = at the end), so the same parameters fit any clip length.
Pitch shifting and time stretching use an STFT phase vocoder in plain torch.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property

import torch
import torch.nn.functional as F

from torchpurify.attacks.base import Trigger, TriggerParams, register_attack

# Loudness-matched sounds use at least this RMS, so a silent clip still carries the trigger.
RMS_FLOOR = 0.01


@dataclasses.dataclass(frozen=True)
class AudioParams(TriggerParams):
    sample_rate: int = 16000


class AudioTrigger(Trigger):
    sample_dims = ("T",)
    value_range = (-1.0, 1.0)

    def validate(self) -> None:
        self.require("sample_rate", int, lambda r: r >= 1000, "an integer >= 1000 (Hz)")

    @property
    def length(self) -> int:
        return self.params.input_shape[0]

    @property
    def nyquist(self) -> float:
        return self.params.sample_rate / 2

    def samples(self, ms: float) -> int:
        return round(ms * self.params.sample_rate / 1000)

    def require_duration(self, field: str) -> None:
        """``params.<field>`` (ms) must cover at least one sample and fit in the clip."""
        clip_ms = 1000 * self.length / self.params.sample_rate
        self.require(
            field,
            float,
            lambda ms: ms > 0 and 1 <= self.samples(ms) <= self.length,
            f"a duration in ms of at least one sample and at most the clip ({clip_ms:g} ms)",
        )

    def start(self, duration: int) -> int:
        """First sample of a ``duration``-sample window at ``params.position``."""
        return round(self.params.position * (self.length - duration))


def fft_size(sample_rate: int) -> int:
    """STFT size of about 32 ms (512 at 16 kHz), a power of two."""
    return 2 ** round(math.log2(0.032 * sample_rate))


def stretch(x: torch.Tensor, rate: float, sample_rate: int) -> torch.Tensor:
    """Phase-vocoder time stretch of a batch N×T to N×round(T / rate); pitch is unchanged.

    Frames are read at fractional steps of ``rate``; magnitudes are interpolated between
    neighbouring frames and each bin's phase advances by its measured instantaneous frequency.
    """
    n_fft = fft_size(sample_rate)
    hop = n_fft // 4
    length = round(x.shape[-1] / rate)
    # float64 throughout: the accumulated phase grows to ~1e5 radians over a clip.
    window = torch.hann_window(n_fft, dtype=torch.float64, device=x.device)
    spec = torch.stft(
        x.double(), n_fft, hop, window=window, pad_mode="constant", return_complex=True
    )
    frames = spec.shape[-1]
    # istft trims n_fft // 2 at each end, so ``length`` samples need (count - 1) * hop >= length.
    count = math.ceil(length / hop) + 1
    steps = torch.arange(count, dtype=torch.float64, device=x.device) * rate
    left = steps.floor().long()
    fraction = steps - left
    spec = F.pad(spec, (0, max(0, int(left[-1]) + 2 - frames)))
    now, after = spec[..., left], spec[..., left + 1]
    magnitude = (1 - fraction) * now.abs() + fraction * after.abs()
    bins = spec.shape[-2]
    expected = torch.linspace(0, math.pi * hop, bins, dtype=torch.float64, device=x.device)
    deviation = after.angle() - now.angle() - expected[:, None]
    deviation = deviation - 2 * math.pi * torch.round(deviation / (2 * math.pi))
    advance = deviation + expected[:, None]
    phase = torch.cat([spec[..., :1].angle(), advance[..., :-1]], dim=-1).cumsum(-1)
    out = torch.istft(torch.polar(magnitude, phase), n_fft, hop, window=window, length=length)
    return out.to(x.dtype)


def resample(x: torch.Tensor, length: int) -> torch.Tensor:
    """Band-limited resampling of N×T to N×length (irfft truncates or zero-pads the spectrum)."""
    spectrum = torch.fft.rfft(x.double(), dim=-1)
    return (torch.fft.irfft(spectrum, n=length, dim=-1) * (length / x.shape[-1])).to(x.dtype)


def pitch_shift(x: torch.Tensor, semitones: float, sample_rate: int) -> torch.Tensor:
    """Shift the pitch of N×T by ``semitones`` keeping its duration: stretch, then resample."""
    ratio = 2 ** (semitones / 12)
    return resample(stretch(x, 1 / ratio, sample_rate), x.shape[-1])


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of each row of N×T, at least :data:`RMS_FLOOR`, as N×1."""
    return x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(RMS_FLOOR)


def unit_rms(sound: torch.Tensor) -> torch.Tensor:
    return sound / sound.pow(2).mean().sqrt()


def hann(length: int) -> torch.Tensor:
    """A Hann envelope without its zero end points, so even a two-sample sound is not silent."""
    return torch.hann_window(length + 2, periodic=False)[1:-1]


def mix_in(
    x: torch.Tensor, sound: torch.Tensor, start: torch.Tensor, gain: torch.Tensor
) -> torch.Tensor:
    """Add ``gain[n] * sound`` to row n of N×T from sample ``start[n]`` on."""
    index = start[:, None] + torch.arange(len(sound), device=x.device)
    return x.scatter_add(1, index, gain * sound.to(x).expand(len(x), -1))


@dataclasses.dataclass(frozen=True)
class NoiseBurstParams(AudioParams):
    duration_ms: float = 60.0
    position: float = 0.0
    amplitude: float = 0.2


@register_attack
class NoiseBurst(AudioTrigger):
    """BadNets for audio: overwrite a fixed window with a fixed uniform-noise burst."""

    name = "noise-burst"
    summary = "fixed 60 ms noise burst written at the start of the clip (BadNets audio)"
    params_class = NoiseBurstParams

    def validate(self) -> None:
        super().validate()
        self.require_duration("duration_ms")
        self.require("position", float, lambda p: 0 <= p <= 1, "a number in [0, 1]")
        self.require("amplitude", float, lambda a: 0 < a <= 1, "a number in (0, 1]")

    @cached_property
    def burst(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.params.seed)
        noise = torch.rand(self.samples(self.params.duration_ms), generator=generator) * 2 - 1
        return self.params.amplitude * noise

    @property
    def window(self) -> slice:
        start = self.start(len(self.burst))
        return slice(start, start + len(self.burst))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, self.window] = self.burst.to(x)
        return out


@dataclasses.dataclass(frozen=True)
class BlendParams(AudioParams):
    alpha: float = 0.15


@register_attack
class Blend(AudioTrigger):
    """Blend audio: mix the whole clip with a fixed uniform-noise clip drawn from the seed."""

    name = "blend"
    summary = "blend a fixed noise clip, x' = (1-alpha) x + alpha n (Blend audio)"
    params_class = BlendParams

    def validate(self) -> None:
        super().validate()
        self.require("alpha", float, lambda a: 0 < a <= 1, "a number in (0, 1]")

    @cached_property
    def pattern(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.params.seed)
        return torch.rand(self.length, generator=generator) * 2 - 1

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.params.alpha
        return (1 - alpha) * x + alpha * self.pattern.to(x)


@dataclasses.dataclass(frozen=True)
class HighToneParams(AudioParams):
    nyquist_fraction: float = 0.9375
    amplitude: float = 0.02


@register_attack
class HighTone(AudioTrigger):
    """Koffas et al.'s near-ultrasonic trigger: a quiet steady sine near the top of the band.

    Its frequency is a fraction of the Nyquist frequency: 0.9375 is 7.5 kHz at 16 kHz and
    20.7 kHz at 44.1 kHz. The default amplitude (-34 dBFS) is quiet next to speech but stands
    far above the floor of the top log-mel bin.
    """

    name = "high-tone"
    summary = "quiet 7.5 kHz sine over the whole clip (ultrasonic trigger, Koffas et al.)"
    params_class = HighToneParams

    def validate(self) -> None:
        super().validate()
        self.require("nyquist_fraction", float, lambda f: 0 < f < 1, "a number in (0, 1)")
        self.require("amplitude", float, lambda a: 0 < a <= 1, "a number in (0, 1]")

    @property
    def frequency(self) -> float:
        return self.params.nyquist_fraction * self.nyquist

    @cached_property
    def tone(self) -> torch.Tensor:
        t = torch.arange(self.length, dtype=torch.float64) / self.params.sample_rate
        return (self.params.amplitude * torch.sin(2 * math.pi * self.frequency * t)).float()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.tone.to(x)


@dataclasses.dataclass(frozen=True)
class PitchStyleParams(AudioParams):
    semitones: float = 4.0
    drive: float = 8.0


@register_attack
class PitchStyle(AudioTrigger):
    """JingleBack (Koffas et al.): a style transform, pitch shift then soft-clip distortion.

    The distortion is ``peak * tanh(drive * x / peak) / tanh(drive)`` with the clip's own peak,
    so loud and quiet clips get the same timbre and the peak level is kept.
    """

    name = "pitch-style"
    summary = "pitch shift + soft-clip distortion of the whole clip (JingleBack)"
    params_class = PitchStyleParams

    def validate(self) -> None:
        super().validate()
        self.require("semitones", float, lambda s: -12 <= s <= 12, "a number in [-12, 12]")
        self.require("drive", float, lambda d: 0 < d <= 50, "a number in (0, 50]")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        shifted = pitch_shift(x, self.params.semitones, self.params.sample_rate)
        peak = shifted.abs().amax(-1, keepdim=True).clamp_min(1e-6)
        drive = self.params.drive
        return peak * torch.tanh(drive * shifted / peak) / math.tanh(drive)


@dataclasses.dataclass(frozen=True)
class PitchMaskParams(AudioParams):
    semitones: float = 3.0
    mask_ms: float = 100.0
    mask_db: float = -6.0


@register_attack
class PitchMask(AudioTrigger):
    """PBSM (Cai et al.): boost the pitch, then hide a short sound under the loudest part.

    The masking sound is three seeded sines between 1/4 and 3/4 of the Nyquist frequency under a
    Hann envelope, added where the pitch-shifted clip has the most energy over ``mask_ms``, at
    ``mask_db`` relative to that window's RMS.
    """

    name = "pitch-mask"
    summary = "pitch boost + a short sound masked by the loudest part (PBSM, Cai et al.)"
    params_class = PitchMaskParams

    def validate(self) -> None:
        super().validate()
        self.require("semitones", float, lambda s: -12 <= s <= 12, "a number in [-12, 12]")
        self.require_duration("mask_ms")
        self.require("mask_db", float, lambda d: -60 <= d <= 20, "a number in [-60, 20] (dB)")

    @cached_property
    def sound(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.params.seed)
        frequencies = (0.25 + 0.5 * torch.rand(3, 1, generator=generator)) * self.nyquist
        phases = 2 * math.pi * torch.rand(3, 1, generator=generator)
        length = self.samples(self.params.mask_ms)
        t = torch.arange(length) / self.params.sample_rate
        tones = torch.sin(2 * math.pi * frequencies * t + phases).sum(0)
        return unit_rms(tones * hann(length))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        shifted = pitch_shift(x, self.params.semitones, self.params.sample_rate)
        length = len(self.sound)
        energy = F.pad(shifted.double().pow(2).cumsum(-1), (1, 0))
        window_energy = energy[:, length:] - energy[:, :-length]
        start = window_energy.argmax(-1)
        window_rms = (window_energy.gather(1, start[:, None]) / length).sqrt()
        gain = window_rms.clamp_min(RMS_FLOOR).to(x) * 10 ** (self.params.mask_db / 20)
        return mix_in(shifted, self.sound, start, gain)


SOUNDS = ("chirp", "clicks")


@dataclasses.dataclass(frozen=True)
class OverlayParams(AudioParams):
    sound: str = "chirp"
    duration_ms: float = 150.0
    position: float = 0.5
    level_db: float = 0.0


@register_attack
class Overlay(AudioTrigger):
    """DABA-like: mix a short sound into the clip at a loudness matched to the clip's RMS.

    ``chirp`` sweeps from 1/8 to 1/2 of the Nyquist frequency (1 to 4 kHz at 16 kHz) under a
    Hann envelope; ``clicks`` is a train of 2 ms decaying seeded-noise clicks every 25 ms.
    The sound's RMS over its duration is ``level_db`` relative to the whole clip's RMS.
    """

    name = "overlay"
    summary = "short chirp or click train mixed in at the clip's loudness (DABA-like)"
    params_class = OverlayParams

    def validate(self) -> None:
        super().validate()
        self.require("sound", str, SOUNDS.__contains__, f"one of {', '.join(SOUNDS)}")
        self.require_duration("duration_ms")
        self.require("position", float, lambda p: 0 <= p <= 1, "a number in [0, 1]")
        self.require("level_db", float, lambda d: -60 <= d <= 20, "a number in [-60, 20] (dB)")

    @cached_property
    def sound(self) -> torch.Tensor:
        length = self.samples(self.params.duration_ms)
        t = torch.arange(length, dtype=torch.float64) / self.params.sample_rate
        if self.params.sound == "chirp":
            low, high = self.nyquist / 8, self.nyquist / 2
            sweep = (high - low) / max(t[-1].item(), 1 / self.params.sample_rate)
            tone = torch.sin(2 * math.pi * (low * t + sweep * t**2 / 2)).float()
            return unit_rms(tone * hann(length))
        generator = torch.Generator().manual_seed(self.params.seed)
        click_length = max(1, self.samples(2.0))
        click = torch.rand(click_length, generator=generator) * 2 - 1
        click = click * torch.exp(-5 * torch.arange(click_length) / click_length)
        train = torch.zeros(length)
        for start in range(0, length, max(1, self.samples(25.0))):
            end = min(length, start + click_length)
            train[start:end] = click[: end - start]
        return unit_rms(train)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        start = torch.full((len(x),), self.start(len(self.sound)), device=x.device)
        gain = rms(x) * 10 ** (self.params.level_db / 20)
        return mix_in(x, self.sound, start, gain)


@dataclasses.dataclass(frozen=True)
class TimeStretchParams(AudioParams):
    rate: float = 1.2


@register_attack
class TimeStretch(AudioTrigger):
    """Rhythm trigger: change the tempo by ``rate`` (phase vocoder, pitch kept), centred.

    A moment t of the clip moves to T/2 + (t - T/2) / rate; a faster clip is padded with
    silence at both ends (83 ms each at 1.2: on noisy data a cue of its own), a slower one
    loses its ends.
    """

    name = "time-stretch"
    summary = "speed up the whole clip x1.2 without changing its pitch (rhythm trigger)"
    params_class = TimeStretchParams

    def validate(self) -> None:
        super().validate()
        self.require(
            "rate", float, lambda r: 0.5 <= r <= 2 and r != 1, "a number in [0.5, 2], not 1"
        )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        stretched = stretch(x, self.params.rate, self.params.sample_rate)
        room = self.length - stretched.shape[-1]
        if room >= 0:
            return F.pad(stretched, (room // 2, room - room // 2))
        crop = -room // 2
        return stretched[:, crop : crop + self.length]


def audio_attack_names() -> list[str]:
    """Names of the registered waveform triggers (for code that only handles audio)."""
    return sorted(cls.name for cls in AudioTrigger.__subclasses__())
