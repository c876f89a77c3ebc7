"""Fetch files with a checksum, and unpack archives without letting them write outside.

A download goes to a temporary file beside its destination and is renamed into place only after
its md5 matches, so an interrupted or tampered download never looks like a finished one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from rich.progress import BarColumn, DownloadColumn, TransferSpeedColumn

from torchpurify.errors import UserError

CHUNK = 1 << 20
TIMEOUT_S = 60
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str, progress: bool = True) -> None:
    """Download ``url`` to ``dest``, checking its md5; nothing is left at ``dest`` on failure."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            from torchpurify.train import progress_bar  # plain lines when stderr is a log

            columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with progress_bar(*columns, transient=False, disable=not progress) as bar:
                task = bar.add_task(dest.name, total=total)
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    bar.advance(task, len(chunk))
        got = file_md5(tmp)
        if got != md5:
            raise UserError(
                f"{url} downloaded with md5 {got}, expected {md5}; the file is damaged or "
                "has changed upstream: retry, or download it by hand into "
                f"{dest.parent} and check it"
            )
        tmp.replace(dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        if isinstance(err, urllib.error.HTTPError):
            reason = f"HTTP {err.code} {err.reason}"
        else:
            reason = getattr(err, "reason", None) or err
        raise UserError(
            f"could not download {url}: {reason}; download it by hand into {dest.parent} "
            "or pass --data-root"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def is_archive(path: Path) -> bool:
    return path.name.endswith(ARCHIVE_SUFFIXES)


def _safe_member(archive: Path, name: str) -> PurePosixPath:
    """The member's relative path, or an error for absolute paths and ``..`` (path traversal)."""
    member = PurePosixPath(name.replace("\\", "/"))
    if member.is_absolute() or ".." in member.parts or (member.parts and ":" in member.parts[0]):
        raise UserError(
            f"refusing to unpack {archive}: member {name!r} would land outside the target "
            "folder; delete the archive and download it again"
        )
    return member


def extract(archive: Path, dest: Path) -> None:
    """Unpack a ``.tar.gz`` or ``.zip`` into ``dest``: plain files and folders only."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    _safe_member(archive, name)
                zf.extractall(dest)
            return
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                target = dest.joinpath(*_safe_member(archive, member.name).parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tf.extractfile(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                else:
                    raise UserError(
                        f"refusing to unpack {archive}: member {member.name!r} is a link or "
                        "device, not a plain file; delete the archive and download it again"
                    )
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(
            f"{archive} is not a readable archive ({err}); delete it and download again"
        ) from None


def fetch(files: list[tuple[str, str]], folder: Path, progress: bool = True) -> None:
    """Download each ``(url, md5)`` into ``folder``, unpacking archives there.

    Archives are unpacked into a staging folder and moved in only when all are done, so an
    interrupted run never leaves a half-unpacked dataset that looks complete.
    """
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / ".unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    for url, md5 in files:
        target = folder / url.rsplit("/", 1)[-1]
        if not is_archive(target):
            if not target.is_file():
                download(url, target, md5, progress)
            continue
        download(url, target, md5, progress)
        extract(target, staging)
        target.unlink()
    if staging.is_dir():
        for entry in staging.iterdir():
            done = folder / entry.name
            if done.is_dir():
                shutil.rmtree(done)  # left by an earlier, interrupted run
            entry.replace(done)
        staging.rmdir()
