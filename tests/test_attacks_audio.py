import json
import math

import numpy as np
import pytest
import soundfile
import torch
from typer.testing import CliRunner

from tests.cli_helpers import one_line_error
from torchpurify.attacks import ATTACKS, build_attack, poison_split, trigger_from_dict
from torchpurify.attacks.audio import audio_attack_names, pitch_shift
from torchpurify.cli import app
from torchpurify.data.base import Split
from torchpurify.errors import UserError

AUDIO = [
    "blend",
    "high-tone",
    "noise-burst",
    "overlay",
    "pitch-mask",
    "pitch-style",
    "time-stretch",
]
RATE = 16000
T = 16000


def clips(n=3, length=T, seed=0):
    """Word-like clips: a harmonic tone under a smooth envelope in quiet noise; the last is loud."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / RATE
    pitch = 120 + 80 * torch.rand(n, 1, generator=generator)
    voice = sum(torch.sin(2 * math.pi * k * pitch * t) / k for k in range(1, 6))
    envelope = torch.exp(-(((t - 0.5 * length / RATE) / 0.12) ** 2))
    gain = torch.full((n, 1), 0.2)
    gain[-1] = 0.9
    noise = 0.005 * torch.randn(n, length, generator=generator)
    return (gain * envelope * voice / 2.3 + noise).clamp(-1, 1)


def tone(frequency, length=T, amplitude=0.5):
    return amplitude * torch.sin(2 * math.pi * frequency * torch.arange(length) / RATE)


def peak_hz(x, rate=RATE):
    return torch.fft.rfft(x.double()).abs().argmax().item() * rate / len(x)


def test_all_seven_registered():
    assert audio_attack_names() == AUDIO
    assert set(AUDIO) <= set(ATTACKS.names())
    assert all(ATTACKS.summary(name) for name in AUDIO)
    assert not any(build_attack(name, (T,)).clean_label for name in AUDIO)


@pytest.mark.parametrize("name", AUDIO)
def test_trigger_contract(name):
    trigger = build_attack(name, (T,), seed=3)
    x = clips()
    before = x.clone()
    out = trigger(x)
    assert torch.equal(x, before), "input was modified in place"
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= -1 and out.max() <= 1
    assert (out - x).abs().max() > 0.01
    assert torch.equal(build_attack(name, (T,), seed=3)(x), out)
    singles = torch.stack([trigger(sample) for sample in x])
    torch.testing.assert_close(singles, out)


@pytest.mark.parametrize("name", AUDIO)
def test_full_scale_input_stays_in_range(name):
    x = torch.sign(tone(300))[None]
    out = build_attack(name, (T,))(x)
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("name", AUDIO)
def test_round_trip_through_json(name):
    trigger = build_attack(name, (T,), seed=7)
    record = json.loads(json.dumps(trigger.to_dict()))
    assert record["attack"] == name and record["params"]["input_shape"] == [T]
    assert record["params"]["sample_rate"] == RATE
    rebuilt = trigger_from_dict(record)
    assert rebuilt.params == trigger.params
    x = clips(2)
    assert torch.equal(rebuilt(x), trigger(x))


@pytest.mark.parametrize("name", AUDIO)
def test_keeps_dtype_and_other_sample_rates(name):
    x = clips(1).double()
    assert build_attack(name, (T,))(x).dtype == torch.float64
    short = clips(2, length=11025)
    out = build_attack(name, (11025,), sample_rate=22050)(short)
    assert out.shape == short.shape and not torch.allclose(out, short)


@pytest.mark.parametrize("name", ["noise-burst", "blend", "pitch-mask", "overlay"])
def test_seed_changes_random_patterns(name):
    params = {"sound": "clicks"} if name == "overlay" else {}
    x = clips(1)
    first = build_attack(name, (T,), seed=1, **params)(x)
    assert not torch.allclose(first, build_attack(name, (T,), seed=2, **params)(x))


@pytest.mark.parametrize(("position", "start"), [(0.0, 0), (1.0, T - 960), (0.5, (T - 960) // 2)])
def test_noise_burst_touches_only_its_window(position, start):
    x = clips(2)
    out = build_attack("noise-burst", (T,), position=position)(x)
    window = slice(start, start + 960)  # 60 ms at 16 kHz
    outside = torch.ones(T, dtype=torch.bool)
    outside[window] = False
    assert torch.equal(out[:, outside], x[:, outside])
    assert torch.equal(out[0, window], out[1, window]), "the burst is written, not added"
    assert 0.15 < out[0, window].abs().max() <= 0.2


def test_blend_formula():
    x = clips(2)
    out = build_attack("blend", (T,), seed=1, alpha=0.3)(x)
    pattern = torch.rand(T, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(out, 0.7 * x + 0.3 * pattern)


def test_high_tone_adds_energy_at_7500_hz():
    x = clips(2)
    out = build_attack("high-tone", (T,))(x)
    spectrum, before = torch.fft.rfft(out).abs(), torch.fft.rfft(x).abs()
    assert (spectrum[:, 7500] > 50 * before[:, 7500]).all()
    assert peak_hz(out[0] - x[0]) == 7500
    assert peak_hz(build_attack("high-tone", (T,))(torch.zeros(T))) == 7500
    # Relative to Nyquist: 0.9375 of 22.05 kHz at 44.1 kHz.
    silence = torch.zeros(44100)
    assert peak_hz(build_attack("high-tone", (44100,), sample_rate=44100)(silence), 44100) == 20672


@pytest.mark.parametrize(("rate", "start", "end"), [(1.25, 0.26, 0.42), (0.8, 0.125, 0.375)])
def test_time_stretch_moves_onsets_around_the_centre(rate, start, end):
    x = torch.zeros(T)
    x[3200:6400] = tone(1000)[3200:6400]  # a burst from 0.2 s to 0.4 s
    out = build_attack("time-stretch", (T,), rate=rate)(x)
    envelope = torch.nn.functional.avg_pool1d(out.abs()[None, None], 81, 1, 40)[0, 0]
    loud = torch.nonzero(envelope > envelope.max() / 2).flatten() / RATE
    # A moment t moves to 0.5 + (t - 0.5) / rate.
    assert loud[0].item() == pytest.approx(start, abs=0.008)
    assert loud[-1].item() == pytest.approx(end, abs=0.008)
    assert peak_hz(out) == pytest.approx(1000, rel=0.01), "tempo changes, pitch does not"


@pytest.mark.parametrize(("name", "semitones"), [("pitch-style", 4.0), ("pitch-mask", 3.0)])
def test_pitch_shift_moves_a_tone_by_the_expected_ratio(name, semitones):
    out = build_attack(name, (T,))(tone(500))
    assert peak_hz(out) == pytest.approx(500 * 2 ** (semitones / 12), rel=0.005)
    down = build_attack(name, (T,), semitones=-5.0)(tone(500))
    assert peak_hz(down) == pytest.approx(500 * 2 ** (-5 / 12), rel=0.005)


def test_pitch_style_distorts():
    out = build_attack("pitch-style", (T,), semitones=0.0)(tone(500))
    spectrum = torch.fft.rfft(out).abs()
    assert spectrum[1500] > 0.05 * spectrum[500], "soft clipping adds a third harmonic"
    assert out.abs().max() == pytest.approx(0.5, abs=0.02), "the peak level is kept"


def test_pitch_mask_hides_its_sound_in_the_loudest_part():
    x = 0.01 * torch.randn(1, T, generator=torch.Generator().manual_seed(0))
    x[0, 9600:12800] += tone(200)[9600:12800]  # loud from 0.6 s to 0.8 s
    out = build_attack("pitch-mask", (T,))(x)
    added = (out - pitch_shift(x, 3.0, RATE))[0].abs()
    where = torch.nonzero(added > 1e-4).flatten()
    assert 9600 <= where[0] and where[-1] < 12800 and where[-1] - where[0] < 1600


@pytest.mark.parametrize("sound", ["chirp", "clicks"])
def test_overlay_matches_the_clip_loudness(sound):
    x = clips(3)[:2]  # the quiet ones: the loud one clips
    for level_db in (0.0, -10.0):
        out = build_attack("overlay", (T,), sound=sound, level_db=level_db)(x)
        added = out - x
        window = slice((T - 2400) // 2, (T - 2400) // 2 + 2400)  # 150 ms, centred
        outside = torch.ones(T, dtype=torch.bool)
        outside[window] = False
        assert torch.equal(out[:, outside], x[:, outside])
        loudness = added[:, window].pow(2).mean(-1).sqrt()
        expected = x.pow(2).mean(-1).sqrt() * 10 ** (level_db / 20)
        torch.testing.assert_close(loudness, expected, rtol=0.02, atol=0)


@pytest.mark.parametrize(
    ("name", "params", "words"),
    [
        ("noise-burst", {"duration_ms": 0}, "duration_ms must be a duration in ms"),
        ("noise-burst", {"duration_ms": 1500}, "at most the clip (1000 ms)"),
        ("noise-burst", {"position": 1.5}, "position must be a number in [0, 1]"),
        ("noise-burst", {"amplitude": 0}, "amplitude must be a number in (0, 1]"),
        ("noise-burst", {"sample_rate": 8000.5}, "sample_rate must be an integer >= 1000"),
        ("blend", {"alpha": 1.5}, "alpha must be a number in (0, 1]"),
        ("blend", {"alpha": "0.2"}, "alpha"),
        ("blend", {"alpah": 0.2}, "unknown parameter 'alpah'"),
        ("high-tone", {"nyquist_fraction": 1.0}, "nyquist_fraction must be a number in (0, 1)"),
        ("high-tone", {"amplitude": -0.1}, "amplitude must be"),
        ("pitch-style", {"semitones": 13}, "semitones must be a number in [-12, 12]"),
        ("pitch-style", {"drive": 0}, "drive must be a number in (0, 50]"),
        ("pitch-mask", {"mask_ms": -5}, "mask_ms must be"),
        ("pitch-mask", {"mask_db": 30}, "mask_db must be a number in [-60, 20]"),
        ("overlay", {"sound": "bell"}, "sound must be one of chirp, clicks"),
        ("overlay", {"level_db": True}, "level_db must be"),
        ("time-stretch", {"rate": 1}, "rate must be a number in [0.5, 2], not 1"),
        ("time-stretch", {"rate": 3.0}, "rate must be"),
    ],
)
def test_bad_parameters(name, params, words):
    with pytest.raises(UserError) as info:
        build_attack(name, (T,), **params)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_bad_shapes_and_inputs():
    with pytest.raises(UserError, match=r"input_shape must be positive integers \(T\)"):
        build_attack("blend", (1, T))
    trigger = build_attack("blend", (T,))
    with pytest.raises(UserError, match="shape"):
        trigger(torch.zeros(2, 8000))
    with pytest.raises(UserError, match="float"):
        trigger(torch.zeros(T, dtype=torch.int16))


@pytest.mark.parametrize("name", AUDIO)
def test_poison_split_on_waveforms(name):
    length = 4000
    x = clips(40, length=length)
    split = Split(x, torch.arange(40) % 4)
    trigger = build_attack(name, (length,), sample_rate=8000)
    result = poison_split(split, trigger, rate=0.1, target=1, seed=0)
    idx = result.poisoned
    assert len(idx) == 4 and (split.y[idx] != 1).all() and (result.split.y[idx] == 1).all()
    assert torch.equal(result.split.x[idx], trigger(x[idx]))
    others = torch.ones(40, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(result.split.x[others], x[others])
    assert torch.equal(split.x, x), "the clean split is untouched"


runner = CliRunner()


def test_trigger_demo_writes_four_files(tmp_path):
    # 0.7 s of stereo at 22.05 kHz: averaged, resampled to 16 kHz and padded to one second.
    wave = tone(300, length=15435, amplitude=0.3).numpy()
    soundfile.write(tmp_path / "in.wav", np.stack([wave, wave], axis=1), 22050)
    out = tmp_path / "demo"
    args = ["trigger-demo", "--attack", "pitch-style", "--out", str(out)]
    result = runner.invoke(app, [*args, "--input", str(tmp_path / "in.wav"), "--set", "drive=2"])
    assert result.exit_code == 0, result.output
    assert "resampled from 22050 Hz" in result.output and "averaged 2 channels" in result.output
    for name in ("clean", "triggered"):
        info = soundfile.info(out / f"{name}.wav")
        assert (info.samplerate, info.channels, info.frames) == (16000, 1, 16000)
        assert info.subtype == "PCM_16"
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"{name}.wav" in result.output and f"{name}.png" in result.output
    clean, _ = soundfile.read(out / "clean.wav")
    triggered, _ = soundfile.read(out / "triggered.wav")
    assert np.abs(clean - triggered).max() > 0.05


def test_trigger_demo_speaks_yes_by_default(tmp_path):
    pytest.importorskip("torchpurify.data.synth")
    result = runner.invoke(app, ["trigger-demo", "--attack", "noise-burst", "--out", tmp_path])
    assert result.exit_code == 0, result.output
    assert soundfile.info(tmp_path / "clean.wav").frames == 16000
    assert np.abs(soundfile.read(tmp_path / "clean.wav")[0]).max() > 0.01


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--attack", "pitch-styel"], ["unknown attack 'pitch-styel'", "pitch-style"]),
        (["--attack", "badnets"], ["image attack", "noise-burst"]),
        (["--attack", "blend", "--set", "alpha=2"], ["alpha must be a number in (0, 1]"]),
        (["--attack", "blend", "--set", "sample_rate=fast"], ["sample_rate must be an integer"]),
        (["--attack", "blend", "--set", "alpah=0.1"], ["unknown parameter 'alpah'"]),
        (["--attack", "blend", "--input", "missing.wav"], ["--input missing.wav does not exist"]),
    ],
)
def test_trigger_demo_errors_are_one_line(tmp_path, monkeypatch, extra, fragments):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["trigger-demo", "--out", "demo", *extra])
    one_line_error(result, *fragments)
    assert not (tmp_path / "demo").exists()


def test_trigger_demo_rejects_a_file_that_is_not_audio(tmp_path):
    (tmp_path / "notes.wav").write_text("not audio")
    result = runner.invoke(
        app,
        ["trigger-demo", "--attack", "blend", "--out", tmp_path / "demo",
         "--input", tmp_path / "notes.wav"],
    )  # fmt: skip
    one_line_error(result, "is not a readable audio file")
