"""``--export`` never hurts a user's files: never the input model, never a file torchpurify did
not write, an earlier export only with ``--force``, every output checked before any work, and an
interrupted command says exactly what exists (issue: a user's files cannot hurt them)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from tests.cli_helpers import one_line_error
from tests.test_byo import TinyNet, image_net, images, run, write_folder
from torchpurify.errors import UserError
from torchpurify.models.io import check_export, export_weights, is_export
from torchpurify.train import TrainConfig, fit

ARCH = "tests.test_byo:image_net"


@pytest.fixture()
def own(tmp_path):
    """A user model (trained a little: purify refuses one at chance) saved as a plain .pt and a
    folder of clean images."""
    torch.manual_seed(0)
    model = TinyNet()
    fit(model, images(200, seed=2), TrainConfig(epochs=2, batch_size=32, progress=False))
    torch.save(model.eval().state_dict(), tmp_path / "mine.pt")
    write_folder(images(40, seed=0), tmp_path / "clean", "images")
    return tmp_path


def purify(root, *extra):
    return run(
        "purify", "--model", root / "mine.pt", "--arch", ARCH, "--clean", root / "clean",
        "--defense", "clp", "--no-estimate", "--no-progress", *extra,
    )  # fmt: skip


def test_export_never_replaces_the_input_model(own):
    before = (own / "mine.pt").read_bytes()
    result = purify(own, "--out", own / "o", "--export", own / "mine.pt", "--force")
    one_line_error(result, "is (inside) the input", "never overwrites")
    assert (own / "mine.pt").read_bytes() == before
    assert not (own / "o").exists()  # refused before any work


def test_export_never_replaces_a_file_torchpurify_did_not_write(own):
    for name, write in (
        ("notes.pt", lambda p: torch.save({"w": torch.ones(2)}, p)),
        ("notes.safetensors", lambda p: save_file({"w": torch.ones(2)}, str(p))),
        ("text.pth", lambda p: p.write_text("my notes")),
    ):
        write(own / name)
        before = (own / name).read_bytes()
        for force in ([], ["--force"]):
            result = purify(own, "--out", own / "o", "--export", own / name, *force)
            one_line_error(result, "was not written by torchpurify")
            assert (own / name).read_bytes() == before
            assert not (own / "o").exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_an_earlier_export_is_replaced_only_with_force(own, suffix):
    export = own / f"clean{suffix}"
    assert purify(own, "--out", own / "o1", "--export", export).exit_code == 0
    assert is_export(export)
    fresh = TinyNet()
    state = torch.load(export) if suffix == ".pt" else None
    if state is not None:
        fresh.load_state_dict(state)  # the mark does not get in the way of the user's class
    first = export.read_bytes()
    one_line_error(purify(own, "--out", own / "o2", "--export", export), "earlier", "--force")
    assert export.read_bytes() == first and not (own / "o2").exists()
    assert purify(own, "--out", own / "o2", "--export", export, "--force").exit_code == 0
    assert is_export(export)


def test_export_places_are_checked_before_any_work(own):
    (own / "afile").write_text("x")
    (own / "folder.pt").mkdir()
    cases = [
        (own / "afile" / "w.pt", "is a file"),  # a parent that is a file
        (own / "o" / "w.pt", "inside --out"),  # --out is replaced whole
        (own / "clean" / "w.pt", "is (inside) the input"),
        (own / "folder.pt", "is a folder"),
        (own / "w.txt", "must end in"),
    ]
    for export, fragment in cases:
        one_line_error(purify(own, "--out", own / "o", "--export", export), fragment)
        assert not (own / "o").exists(), fragment
    link = own / "link.pt"
    link.symlink_to(own / "mine.pt")
    one_line_error(purify(own, "--out", own / "o", "--export", link), "is a link")
    # A missing folder is made.
    assert purify(own, "--out", own / "o", "--export", own / "new" / "dir" / "w.pt").exit_code == 0
    assert is_export(own / "new" / "dir" / "w.pt")


def test_a_hard_link_to_the_input_is_refused(own):
    (own / "hard.pt").hardlink_to(own / "mine.pt")
    with pytest.raises(UserError, match="is \\(inside\\) the input"):
        check_export(own / "hard.pt", force=True, inputs=[own / "mine.pt"])


def test_interrupted_export_says_what_exists(own, monkeypatch):
    import torchpurify.models.io as io

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io.torch, "save", interrupted)
    result = purify(own, "--out", own / "o", "--export", own / "w.pt")
    assert result.exit_code == 130, result.output
    last = result.output.strip().splitlines()[-1]
    assert "interrupted" in last and str(own / "o") in last and "w.pt" not in last, last
    assert (own / "o" / "model.json").is_file()
    assert not (own / "w.pt").exists()
    assert not [p for p in own.iterdir() if p.name.endswith(".partial")]


def test_interrupt_before_anything_is_written_says_nothing_was_written(own, monkeypatch):
    import torchpurify.api as api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "run_defense", interrupted)
    result = purify(own, "--out", own / "o", "--export", own / "w.pt")
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == "interrupted; nothing was written"
    assert not (own / "o").exists() and not (own / "w.pt").exists()


def test_a_result_that_appeared_in_out_during_the_run_is_not_replaced(own, monkeypatch):
    """Two runs into one --out: the second refuses at save time instead of silently
    replacing the first (without --force)."""
    import torchpurify.api as api

    real = api.run_defense

    def meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        shutil.copytree(own / "first", own / "o")  # another run finished into --out
        return result

    assert purify(own, "--out", own / "first").exit_code == 0
    monkeypatch.setattr(api, "run_defense", meanwhile)
    first = (own / "first" / "model.json").read_text()
    one_line_error(purify(own, "--out", own / "o"), "already holds a torchpurify model")
    assert (own / "o" / "model.json").read_text() == first


def test_library_export_replaces_only_its_own_files(tmp_path):
    model = image_net(4)
    path = export_weights(model, tmp_path / "w.safetensors")
    export_weights(model, path)  # the library default replaces an earlier export
    with pytest.raises(UserError, match="earlier"):
        export_weights(model, path, force=False)
    torch.save(model.state_dict(), tmp_path / "user.pt")
    assert not is_export(tmp_path / "user.pt")
    with pytest.raises(UserError, match="not written by torchpurify"):
        export_weights(model, tmp_path / "user.pt")


def test_error_messages_keep_bracketed_values(own):
    """Rich markup must not swallow a bracketed value in an error line."""
    result = purify(own, "--out", own / "o", "--set", "[bold]=1")
    line = one_line_error(result)
    assert "[bold]" in line, line
