"""Speech: espeak synthesis, the speech-synth generator, and the Speech Commands loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
from typer.testing import CliRunner

from torchpurify.cli import app
from torchpurify.data import load_dataset, synth
from torchpurify.data.speech import KEYWORDS, OFFICIAL_URL, read_speech_commands
from torchpurify.errors import UserError

# ---------------------------------------------------------------- speak


def test_speak_gives_float_samples_at_the_asked_rate():
    yes = synth.speak("yes")
    assert yes.dtype == np.float32 and yes.ndim == 1
    assert 0.2 * 16000 < len(yes) < 16000 and 0.05 < np.abs(yes).max() <= 1.0
    slow = synth.speak("yes", voice="en-gb-scotland+f3", rate=100, sample_rate=8000)
    assert np.abs(len(slow) / 8000 - len(yes) / 16000) < 0.4 and len(slow) / 8000 > len(yes) / 16000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"voice": "en-us+nosuchvoice"}, "unknown espeak voice variant 'nosuchvoice'.*m1"),
        ({"voice": "xx-nowhere"}, "unknown espeak voice 'xx-nowhere'.*en-gb-scotland"),
        ({"rate": 10}, "rate must be in 80..450, got 10"),
        ({"pitch": 100}, "pitch must be in 0..99"),
    ],
)
def test_speak_rejects_bad_voices_and_parameters(kwargs, message):
    with pytest.raises(UserError, match=message):
        synth.speak("no", **kwargs)


def test_held_out_voices_exist_in_espeak():
    variants, accents = set(synth.voice_variants()), set(synth.english_accents())
    used = synth.TRAIN_VARIANTS + synth.VALIDATION_VARIANTS + synth.TEST_VARIANTS
    assert set(used + synth.BABBLE_VARIANTS) <= variants
    assert {*synth.TRAIN_ACCENTS, synth.VALIDATION_ACCENT, synth.TEST_ACCENT} <= accents


# ---------------------------------------------------------------- speech-synth

PER_WORD = 3  # one clip per split and word: positions 0, 1, 2 are training, validation, testing


def wav_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Tiny sets in blocks of 8 clips: seed 0 with 1 and with 2 workers, and seed 1."""
    base = tmp_path_factory.mktemp("synth")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synth, "BLOCK", 8)
        synth.speak("warm up")  # a process that has spoken before must not change the files
        for name, seed, workers in (("one", 0, 1), ("two", 0, 2), ("other", 1, 2)):
            synth.generate_speech_synth(base / name, PER_WORD, seed, workers, progress=False)
    return base


def test_generation_is_deterministic_whatever_the_workers(generated):
    one, two = wav_bytes(generated / "one"), wav_bytes(generated / "two")
    assert len(one) == 10 * PER_WORD + 3 and one == two
    other = wav_bytes(generated / "other")
    same = [p for p in one if p.endswith(".wav") and other.get(p) == one[p]]
    assert not same


def test_clips_are_one_second_of_16k_pcm(generated):
    paths = sorted((generated / "one").glob("*/*.wav"))
    assert len(paths) == 10 * PER_WORD
    for path in paths:
        info = soundfile.info(path)
        assert (info.samplerate, info.frames, info.channels) == (16000, 16000, 1)
        assert info.subtype == "PCM_16"
        audio, _ = soundfile.read(path)
        assert 1e-3 < np.abs(audio).max() <= 1.0


def test_layout_lists_and_manifest(generated):
    root = generated / "one"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(KEYWORDS)
    validation = (root / "validation_list.txt").read_text().splitlines()
    testing = (root / "testing_list.txt").read_text().splitlines()
    assert len(validation) == len(testing) == 10
    assert all((root / p).is_file() and p.endswith("_nohash_1.wav") for p in validation)
    assert all((root / p).is_file() and p.endswith("_nohash_2.wav") for p in testing)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["per_word"] == PER_WORD
    assert manifest["clips"] == 30 and manifest["words"] == list(KEYWORDS)
    assert manifest["augmentation"]["snr_db"] == list(synth.AUGMENTATION.snr_db)


def test_splits_are_speaker_disjoint(generated):
    root = generated / "one"
    manifest = json.loads((root / "manifest.json").read_text())
    speakers = {split: set(voices) for split, voices in manifest["speakers"].items()}
    assert not speakers["training"] & (speakers["validation"] | speakers["testing"])
    assert not speakers["validation"] & speakers["testing"]
    train_accents = {v.split("+")[0] for v in speakers["training"]}
    train_variants = {v.split("+")[1] for v in speakers["training"]}
    for held_out in ("validation", "testing"):
        assert not set(manifest["accents"][held_out]) & train_accents
        assert not set(manifest["variants"][held_out]) & train_variants
    lists = {
        "validation": set((root / "validation_list.txt").read_text().split()),
        "testing": set((root / "testing_list.txt").read_text().split()),
    }
    for path in root.glob("*/*.wav"):
        name = f"{path.parent.name}/{path.name}"
        split = next((s for s, names in lists.items() if name in names), "training")
        assert path.name.split("_nohash_")[0] in speakers[split], name


def test_load_dataset_reads_a_generated_folder(generated):
    ds = load_dataset("speech-synth", root=generated / "one")
    assert ds.classes == list(KEYWORDS) and ds.input_shape == (16000,)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.shape == (10, 16000) and sorted(split.y.tolist()) == list(range(10))
        assert split.x.abs().max() <= 1


def test_speech_synth_is_generated_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHPURIFY_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(UserError, match="generating is off"):
        load_dataset("speech-synth", download=False)
    made, generate = [], synth.generate_speech_synth

    def tiny(folder, progress=True):
        made.append(folder)
        return generate(folder, PER_WORD, seed=0, workers=1, progress=progress)

    monkeypatch.setattr(synth, "generate_speech_synth", tiny)
    ds = load_dataset("speech-synth", progress=False)
    assert made == [tmp_path / "torchpurify" / "speech-synth"] and len(ds.test) == 10
    load_dataset("speech-synth")  # found in the cache: not generated again
    assert len(made) == 1


def test_generation_refuses_a_folder_in_use(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        synth.generate_speech_synth(tmp_path / "full", 1, progress=False)
    with pytest.raises(UserError, match="per_word must be at least 1"):
        synth.generate_speech_synth(tmp_path / "new", 0, progress=False)


def test_make_speech_command(tmp_path):
    runner = CliRunner()
    args = ["make-speech", "--out", str(tmp_path / "set"), "--per-word", "3", "--workers", "1"]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "wrote 30 clips" in result.output
    assert len(list((tmp_path / "set").glob("*/*.wav"))) == 30
    again = runner.invoke(app, [*args, "--no-progress"])
    assert again.exit_code == 2 and "not empty" in again.output


# ---------------------------------------------------------------- Speech Commands folders

OTHERS = ("bed", "cat")


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, rate, subtype="PCM_16")


@pytest.fixture
def commands(tmp_path) -> Path:
    """Every word with speakers a (training), b (validation), c (testing); clip values encode
    the word; yes/c is half a second long and no/b one and a half; 3 s of background noise."""
    root = tmp_path / "speech_commands"
    for number, word in enumerate(KEYWORDS + OTHERS):
        for speaker in "abc":
            write_wav(root / word / f"{speaker}_nohash_0.wav", np.full(16000, number / 20))
    write_wav(root / "yes" / "c_nohash_0.wav", np.full(8000, 0.5))
    write_wav(root / "no" / "b_nohash_0.wav", np.linspace(-0.5, 0.5, 24000))
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 48000)
    write_wav(root / "_background_noise_" / "white_noise.wav", noise)
    words = KEYWORDS + OTHERS
    (root / "validation_list.txt").write_text("".join(f"{w}/b_nohash_0.wav\n" for w in words))
    (root / "testing_list.txt").write_text("".join(f"{w}/c_nohash_0.wav\n" for w in words))
    return root


def test_keywords_task_reads_splits_by_the_lists(commands):
    ds = read_speech_commands(commands, noise_fraction=0.0)
    assert ds.classes == list(KEYWORDS)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.shape == (10, 16000) and split.y.tolist() == list(range(10))
    expected = np.arange(10)[:, None] / 20
    assert np.allclose(ds.train.x.numpy(), expected, atol=1e-4)
    short = ds.test.x[0].numpy()
    assert np.allclose(short[:8000], 0.5, atol=1e-4) and not short[8000:].any()
    long = ds.val.x[1].numpy()
    assert np.allclose(long, np.linspace(-0.5, 0.5, 24000)[:16000], atol=1e-4)


def test_background_noise_augments_a_fraction_of_training_clips(commands):
    plain = read_speech_commands(commands, noise_fraction=0.0)
    noisy = read_speech_commands(commands, noise_fraction=0.5, seed=3)
    changed = (noisy.train.x - plain.train.x).abs().amax(1) > 1e-3
    assert 0 < changed.sum() < 10
    again = read_speech_commands(commands, noise_fraction=0.5, seed=3)
    assert (noisy.train.x == again.train.x).all()
    assert (noisy.test.x == plain.test.x).all() and (noisy.val.x == plain.val.x).all()


def test_twelve_class_task_has_silence_and_unknown(commands):
    ds = load_dataset("speech-commands-12", root=commands)
    assert ds.classes == [*KEYWORDS, "silence", "unknown"]
    for split in (ds.train, ds.val, ds.test):
        assert split.y.tolist() == list(range(12))
    silence, unknown = ds.test.x[10].numpy(), ds.test.x[11].numpy()
    assert 0 < np.abs(silence).max() <= 0.5
    assert np.allclose(unknown, 10 / 20, atol=1e-4) or np.allclose(unknown, 11 / 20, atol=1e-4)


def test_silence_without_background_noise_is_quiet_noise(commands):
    for path in (commands / "_background_noise_").iterdir():
        path.unlink()
    ds = read_speech_commands(commands, silence=True)
    silence = ds.train.x[ds.train.y == 10]
    assert len(silence) == 1 and 0 < silence.abs().max() < 0.1


def test_all_words_task(commands):
    ds = load_dataset("speech-commands-35", root=commands)
    assert ds.classes == sorted(KEYWORDS + OTHERS) and len(ds.train) == 12


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "testing_list.txt").unlink(), "missing testing_list.txt"),
        (lambda root: shutil.rmtree(root / "go"), "missing the word folders go"),
        (lambda root: (root / "up" / "b_nohash_0.wav").unlink(),
         "validation_list.txt names 1 clips that are missing .*up/b_nohash_0.wav"),
        (lambda root: write_wav(root / "left" / "a_nohash_0.wav", np.zeros(8000), rate=8000),
         "left/a_nohash_0.wav is sampled at 8000 Hz"),
    ],
)  # fmt: skip
def test_damaged_folders_say_what_is_wrong(commands, damage, message):
    damage(commands)
    with pytest.raises(UserError, match=message):
        load_dataset("speech-commands", root=commands)


def test_unknown_needs_other_words(commands):
    for word in OTHERS:
        shutil.rmtree(commands / word)
    with pytest.raises(UserError, match="no words besides"):
        read_speech_commands(commands, unknown=True)


def test_real_speech_commands_needs_a_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHPURIFY_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(UserError) as err:
        load_dataset("speech-commands-12")
    assert "--data-root" in str(err.value) and OFFICIAL_URL in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("speech-commands", root=tmp_path / "absent")


def test_speech_commands_found_under_torchpurify_data(commands, monkeypatch):
    monkeypatch.setenv("TORCHPURIFY_DATA", str(commands.parent))
    commands.rename(commands.parent / "speech-commands")
    assert load_dataset("speech-commands-35").classes == sorted(KEYWORDS + OTHERS)


def test_clips_carry_their_speaker_and_silence_is_a_group_of_its_own(commands):
    write_wav(commands / "yes" / "d_nohash_1.wav", np.zeros(16000))
    ds = load_dataset("speech-commands-12", root=commands)
    assert ds.train.groups is not None and len(ds.train.groups) == len(ds.train)
    groups = ds.train.groups[:, 0]  # one factor: the speaker
    words = (ds.train.y > 0) & (ds.train.y < 10)  # speakers are numbered in sorted name order
    assert ds.train.groups.shape == (len(ds.train), 1)
    assert groups[words].tolist() == [0] * 9  # "a"
    assert sorted(groups[ds.train.y == 0].tolist()) == [0, 1]
    silence = groups[ds.train.y == 10].tolist()
    assert len(set(silence)) == len(silence) and not set(silence) & {0, 1}
    assert ds.train.subset([0, 1]).groups.tolist() == ds.train.groups[:2].tolist()


def test_synthetic_voices_have_two_factors():
    from torchpurify.data.speech import Clip, speaker_ids

    names = ["en+m1", "en+f2", "fr+m1", "en+m1", None]
    clips = [Clip(None if n is None else Path(f"yes/{n}_nohash_0.wav"), 0) for n in names]
    ids = speaker_ids(clips).tolist()
    assert ids[:4] == [[0, 1], [0, 0], [1, 1], [0, 1]]  # accents en, fr; variants f2, m1
    assert ids[4][0] not in (0, 1) and ids[4][1] not in (0, 1)  # silence: related to none


def test_the_defender_split_of_speech_is_by_speaker(tmp_path):
    """defender_data on a Speech Commands folder: no holdout speaker is in the tune set."""
    from torchpurify.experiment import DataSpec, defender_data

    root = tmp_path / "sc"
    for word in KEYWORDS:
        for split, count in (("t", 3), ("v", 8), ("c", 1)):
            for k in range(count):
                for n in range(2):
                    write_wav(root / word / f"{split}{k}_nohash_{n}.wav", np.zeros(16000))
    names = lambda prefix, count: "".join(  # noqa: E731
        f"{w}/{prefix}{k}_nohash_{n}.wav\n" for w in KEYWORDS for k in range(count)
        for n in range(2)
    )  # fmt: skip
    (root / "validation_list.txt").write_text(names("v", 8))
    (root / "testing_list.txt").write_text(names("c", 1))
    card = {"data": DataSpec(dataset="speech-commands", root=str(root), seed=3).to_dict()}
    tune, holdout, prepared = defender_data(card, root=str(root), fraction=1.0, progress=False)
    assert len(prepared.train) == 60 and len(tune) == 36 and len(holdout) >= 24
    assert not set(tune.groups[:, 0].tolist()) & set(holdout.groups[:, 0].tolist())
