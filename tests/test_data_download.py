"""Downloads against a local HTTP server, safe unpacking, and where load_dataset looks."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import torchpurify.data as data
from torchpurify.data import load_dataset, resolve_root
from torchpurify.data.download import download, extract, fetch
from torchpurify.errors import UserError

FASHION_FILES = {
    "train-images-idx3-ubyte.gz": (4, 28, 28),
    "train-labels-idx1-ubyte.gz": (4,),
    "t10k-images-idx3-ubyte.gz": (2, 28, 28),
    "t10k-labels-idx1-ubyte.gz": (2,),
}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """(folder, base URL) of an HTTP server on 127.0.0.1 serving the folder's files."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_fashion(folder: Path, label: int) -> None:
    """Four tiny gzipped IDX files whose labels are all ``label``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, shape in FASHION_FILES.items():
        array = np.full(shape, label, np.uint8)
        header = struct.pack(">BBBB", 0, 0, 0x08, len(shape)) + struct.pack(
            f">{len(shape)}I", *shape
        )
        (folder / name).write_bytes(gzip.compress(header + array.tobytes()))


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No environment folder, no Debian package, an empty cache, downloads that cannot work."""
    monkeypatch.delenv("TORCHPURIFY_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    bogus = [("http://127.0.0.1:9/nothing.gz", "0" * 32)]
    monkeypatch.setattr(data, "DOWNLOADS", {"fashion-mnist": bogus})
    return tmp_path


# ---------------------------------------------------------------- download


def test_download_good_md5(served, tmp_path):
    folder, url = served
    (folder / "file.bin").write_bytes(b"payload" * 1000)
    dest = tmp_path / "out" / "file.bin"
    download(url + "file.bin", dest, md5(folder / "file.bin"), progress=True)
    assert dest.read_bytes() == b"payload" * 1000
    assert [p.name for p in dest.parent.iterdir()] == ["file.bin"]


def test_download_bad_md5_leaves_nothing(served, tmp_path):
    folder, url = served
    (folder / "file.bin").write_bytes(b"payload")
    dest = tmp_path / "out" / "file.bin"
    with pytest.raises(UserError, match=f"{url}file.bin.*md5 {md5(folder / 'file.bin')}.*0000"):
        download(url + "file.bin", dest, "0" * 32, progress=False)
    assert list(dest.parent.iterdir()) == []


def test_download_failures(served, tmp_path):
    _, url = served
    with pytest.raises(UserError, match="could not download .*HTTP 404.*by hand into"):
        download(url + "absent.bin", tmp_path / "a.bin", "0" * 32, progress=False)
    with pytest.raises(UserError, match="could not download .*--data-root"):
        download("http://127.0.0.1:9/x.bin", tmp_path / "x.bin", "0" * 32, progress=False)
    assert list(tmp_path.glob("*.bin*")) == []


def tar_with(path: Path, members: list[tarfile.TarInfo]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for member in members:
            tf.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)


def file_member(name: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.size = 1
    return member


def test_extract_good_archives(tmp_path):
    tar_with(tmp_path / "a.tar.gz", [file_member("top/inner/f.txt")])
    with zipfile.ZipFile(tmp_path / "b.zip", "w") as zf:
        zf.writestr("top/z.txt", "z")
    extract(tmp_path / "a.tar.gz", tmp_path / "out")
    extract(tmp_path / "b.zip", tmp_path / "out")
    assert (tmp_path / "out/top/inner/f.txt").read_bytes() == b"x"
    assert (tmp_path / "out/top/z.txt").read_text() == "z"


def test_extract_refuses_escapes(tmp_path):
    link = tarfile.TarInfo("top/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    cases = {
        "dotdot.tar.gz": [file_member("top/../../evil.txt")],
        "absolute.tar.gz": [file_member("/tmp/evil.txt")],
        "link.tar.gz": [link],
    }
    for name, members in cases.items():
        tar_with(tmp_path / name, members)
        with pytest.raises(UserError, match="refusing to unpack"):
            extract(tmp_path / name, tmp_path / "out")
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as zf:
        zf.writestr("../evil.txt", "z")
    with pytest.raises(UserError, match="refusing to unpack"):
        extract(tmp_path / "c.zip", tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not list((tmp_path / "out").iterdir())
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable archive"):
        extract(tmp_path / "broken.zip", tmp_path / "out")


def test_fetch_unpacks_archives(served, tmp_path):
    folder, url = served
    tar_with(folder / "set.tar.gz", [file_member("set/data")])
    fetch([(url + "set.tar.gz", md5(folder / "set.tar.gz"))], tmp_path / "cache", progress=False)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["set"]


# ---------------------------------------------------------------- where load_dataset looks


def test_fashion_mnist_downloads_into_cache(isolated, served, monkeypatch):
    folder, url = served
    write_fashion(folder, label=3)
    table = [(url + name, md5(folder / name)) for name in FASHION_FILES]
    monkeypatch.setattr(data, "DOWNLOADS", {"fashion-mnist": table})
    ds = load_dataset("fashion-mnist", progress=False)
    cache = isolated / "cache" / "torchpurify" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(FASHION_FILES)
    assert ds.train.x.shape == (4, 1, 28, 28) and ds.test.x.shape == (2, 1, 28, 28)
    assert ds.train.y.tolist() == [3] * 4 and ds.classes[3] == "Dress"
    for path in folder.iterdir():  # the second load uses the cache, not the network
        path.unlink()
    assert resolve_root("fashion-mnist") == cache


def test_precedence(isolated, monkeypatch):
    write_fashion(isolated / "no-debian", label=1)
    assert load_dataset("fashion-mnist").train.y[0] == 1  # Debian package
    write_fashion(isolated / "env" / "fashion-mnist", label=2)
    monkeypatch.setenv("TORCHPURIFY_DATA", str(isolated / "env"))
    assert load_dataset("fashion-mnist").train.y[0] == 2  # TORCHPURIFY_DATA beats Debian
    write_fashion(isolated / "mine", label=4)
    assert load_dataset("fashion-mnist", root=isolated / "mine").train.y[0] == 4  # explicit root


def test_cache_used_before_download(isolated):
    write_fashion(isolated / "cache" / "torchpurify" / "fashion-mnist", label=5)
    assert load_dataset("fashion-mnist").train.y[0] == 5


def test_nothing_found_without_download(isolated):
    with pytest.raises(UserError) as err:
        load_dataset("fashion-mnist", download=False)
    message = str(err.value)
    assert "no-debian" in message and "cache" in message
    assert "--data-root" in message and "TORCHPURIFY_DATA" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_explicit_root_must_hold_the_files(isolated):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("fashion-mnist", root=isolated / "absent")
    write_fashion(isolated / "partial", label=0)
    (isolated / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="missing t10k-labels-idx1-ubyte.*folder holding"):
        load_dataset("fashion-mnist", root=isolated / "partial")


def test_unknown_dataset_lists_choices():
    with pytest.raises(UserError, match="choose one of: .*fashion-mnist.*gtsrb"):
        load_dataset("imagenet")


def test_real_fashion_mnist(monkeypatch, tmp_path):
    if not data.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    monkeypatch.delenv("TORCHPURIFY_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ds = load_dataset("fashion-mnist", download=False)
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert ds.train.y.bincount().tolist() == [6000] * 10
    assert ds.classes[0] == "T-shirt/top" and 0 <= ds.train.x.min() < ds.train.x.max() <= 1
