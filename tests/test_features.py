import numpy as np
import pytest
import scipy.fft
import torch

from torchpurify.errors import UserError
from torchpurify.features import MFCC, LogMel

SR, N_FFT, WIN, HOP, N_MELS, F_MIN, F_MAX = 16000, 512, 400, 160, 40, 20.0, 8000.0


def clips(length=16000):
    """White noise, a tone with a chirp, and a short burst in near silence (so MFCC's top_db
    floor is active), as float32 in [-1, 1]."""
    rng = np.random.default_rng(0)
    t = np.arange(length) / SR
    noise = 0.5 * rng.uniform(-1, 1, length)
    tone = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * (300 + 2000 * t) * t)
    burst = 1e-5 * rng.standard_normal(length)
    burst[length // 2 : length // 2 + 800] += 0.8 * np.sin(2 * np.pi * 1000 * t[:800])
    return np.stack([noise, tone, burst]).astype(np.float32)


def reference_power_mel(x: np.ndarray) -> np.ndarray:
    """Mel power spectrogram (bins × frames) of one clip, from the textbook definitions."""
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.stack([padded[i : i + N_FFT] for i in range(0, len(padded) - N_FFT + 1, HOP)])
    window = np.zeros(N_FFT)  # periodic Hann of WIN samples, centred in the FFT frame
    start = (N_FFT - WIN) // 2
    window[start : start + WIN] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN) / WIN)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # frames × FFT bins
    freqs = np.fft.rfftfreq(N_FFT, 1 / SR)

    def mel(f):
        return 2595 * np.log10(1 + f / 700)

    edges = 700 * (10 ** (np.linspace(mel(F_MIN), mel(F_MAX), N_MELS + 2) / 2595) - 1)
    bank = np.stack(
        [
            np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
            for lo, mid, hi in (edges[m : m + 3] for m in range(N_MELS))
        ]
    )
    return bank @ power.T


def reference_dct(n_mfcc: int, n_mels: int) -> np.ndarray:
    """Orthonormal DCT-II as an n_mfcc × n_mels matrix."""
    k, n = np.arange(n_mfcc)[:, None], np.arange(n_mels)[None, :]
    dct = np.sqrt(2 / n_mels) * np.cos(np.pi / n_mels * (n + 0.5) * k)
    dct[0] /= np.sqrt(2)
    return dct


def test_log_mel_matches_numpy_reference():
    x = clips()
    out = LogMel()(torch.from_numpy(x))
    assert out.shape == (3, N_MELS, 101)
    expected = np.stack([np.log(reference_power_mel(c) + 1e-6) for c in x])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_mfcc_matches_numpy_reference_with_per_clip_top_db():
    x = clips(12345)  # not a whole number of hops
    out = MFCC(n_mfcc=13)(torch.from_numpy(x))
    assert out.shape == (3, 13, 12345 // HOP + 1)
    dct = reference_dct(13, N_MELS)
    np.testing.assert_allclose(
        dct @ np.eye(N_MELS), scipy.fft.dct(np.eye(N_MELS), norm="ortho", axis=0)[:13], atol=1e-12
    )
    expected, floored = [], []
    for c in x:
        db = 10 * np.log10(np.maximum(reference_power_mel(c), 1e-10))
        floored.append(bool((db < db.max() - 80).any()))
        expected.append(dct @ np.maximum(db, db.max() - 80))
    expected = np.stack(expected)
    assert floored[2] and not floored[0]  # the burst clip exercises the top_db floor
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-3)


def test_a_clip_gets_the_same_features_alone_and_in_a_batch():
    x = torch.from_numpy(clips())
    x[2] *= 1e-3  # a quiet clip next to loud ones
    for front_end in (LogMel(), MFCC()):
        batch = front_end(x)
        for i in range(len(x)):
            torch.testing.assert_close(front_end(x[i]), batch[i], rtol=1e-5, atol=1e-4)


def test_leading_axes_dtype_and_buffers():
    x = torch.from_numpy(clips(4000))
    mfcc = MFCC()
    assert mfcc(x.view(3, 1, 4000)).shape == (3, 1, 40, 26)
    assert mfcc.state_dict() == {}  # window, filters and DCT are rebuilt, not saved
    double = mfcc.double()(x.double())
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), mfcc(x), rtol=1e-4, atol=1e-3)


def test_gradients_reach_a_silent_waveform():
    x = torch.zeros(2, 4000, requires_grad=True)
    LogMel()(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LogMel(win_length=600), "win_length"),
        (lambda: LogMel(f_max=9000), "f_max"),
        (lambda: LogMel(f_min=-1), "f_min"),
        (lambda: LogMel(n_mels=128, n_fft=256, win_length=256), "cover no frequency bin"),
        (lambda: MFCC(n_mfcc=41), "n_mfcc"),
        (lambda: LogMel(eps=0), "eps"),
    ],
)
def test_bad_hyper_parameters_name_the_parameter(make, message):
    with pytest.raises(UserError, match=message):
        make()


def test_too_short_clip_is_a_user_error():
    with pytest.raises(UserError, match="too short"):
        LogMel()(torch.zeros(2, 200))
