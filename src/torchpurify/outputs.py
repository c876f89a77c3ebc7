"""Output folders: never lose what was there, fail before the work.

Every command that writes a folder (``train``/``purify`` a model, ``report``, ``inspect``,
``trigger-demo``) goes through here:

- :func:`check_output` runs *before* any work. It refuses, in one line, a path that is a file,
  the current folder or one above it, a folder holding anything that is not a torchpurify
  artifact, and an existing artifact unless ``force``; and it proves the place writable by
  creating (and removing) a temporary folder there.
- :func:`staged_output` writes the folder under a temporary name beside it and renames it into
  place, replacing an earlier artifact only then: an interrupted or failed command leaves what
  was there untouched, and never leaves half a folder.

An artifact is recognised by what torchpurify writes into it: a model folder by its card
(``model.json`` of format ``torchpurify-model``), any other output folder by its marker file
:data:`MARKER`. A stale staging folder (``.NAME.<random>`` beside the output) is named by
:func:`is_staging`, so a later run can sweep it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torchpurify.errors import UserError

MARKER = ".torchpurify-output.json"
MODEL_CARD = "model.json"
MODEL_FORMAT = "torchpurify-model"
KINDS = ("model", "report", "inspect", "trigger-demo")

# What this process has finished writing (folders renamed into place, exported files), in
# order: an interrupted command says exactly what exists (cli.command).
WRITTEN: list[Path] = []


def record_written(path: str | Path) -> None:
    """Note that ``path`` is complete on disk (see :data:`WRITTEN`)."""
    WRITTEN.append(Path(path))


def interrupted_message() -> str:
    """What an interrupted command leaves: the outputs it finished, or that nothing was written."""
    if not WRITTEN:
        return "interrupted; nothing was written"
    done = ", ".join(str(path) for path in WRITTEN)
    return f"interrupted; already written and complete: {done}; nothing else was written"


def artifact_kind(path: str | Path) -> str | None:
    """``model``, ``report``, … for a folder torchpurify wrote; None for anything else."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return None
    card = path / MODEL_CARD
    if card.is_file() and _json_field(card, "format") == MODEL_FORMAT:
        return "model"
    marker = path / MARKER
    if marker.is_file():
        kind = _json_field(marker, "kind")
        return kind if kind in KINDS else None
    return None


def _json_field(path: Path, key: str) -> object:
    try:
        data = json.loads(path.read_text(encoding="utf-8")[:1_000_000])
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def _describe(path: Path) -> str:
    names = sorted(entry.name for entry in path.iterdir())
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return shown


def check_output(path: str | Path, kind: str, force: bool = False, option: str = "--out") -> Path:
    """Refuse an output place that would lose something, or that cannot be written; the path.

    Allowed: a new path (its parents are created later), an empty folder, and — with
    ``force`` — a folder holding a torchpurify artifact, which is then replaced whole.
    """
    assert kind in KINDS, kind
    path = Path(path)
    resolved = path.resolve()
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UserError(
            f"{option} {path} is the current folder{'' if resolved == here else ' or above it'}; "
            f"name a new folder, such as {option} {kind}-out"
        )
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(
            f"{option} {path} is a file (or link), not a folder; name a new folder — "
            "nothing was changed"
        )
    if path.is_dir():
        found = artifact_kind(path)
        if found is not None:
            if not force:
                raise UserError(
                    f"{option} {path} already holds a torchpurify {found}; pass --force to "
                    "replace it, or name a new folder"
                )
        elif any(path.iterdir()):
            raise UserError(
                f"{option} {path} is a folder with other files ({_describe(path)}); name a new "
                "or empty folder — torchpurify never replaces files it did not write"
            )
    check_writable(resolved.parent, option, shown=path)
    return path


def check_writable(folder: str | Path, option: str, shown: str | Path | None = None) -> None:
    """Prove that files can be made in ``folder`` (or, where it does not exist yet, in its
    nearest existing parent) by creating and removing a temporary folder there."""
    place = Path(folder).resolve()
    while not place.exists():
        place = place.parent
    shown = folder if shown is None else shown
    if not place.is_dir():
        raise UserError(f"{option} {shown}: {place} is a file; no folder can be made under it")
    try:
        Path(tempfile.mkdtemp(prefix=".torchpurify-check.", dir=place)).rmdir()
    except OSError as error:
        raise UserError(
            f"{option} {shown}: cannot write in {place} ({error.strerror or error}); choose "
            "a writable place"
        ) from None


STAGING = re.compile(r"^\.(?P<name>.+?)\.(?:old\.)?[A-Za-z0-9_]{8}$")


def is_staging(name: str) -> str | None:
    """The output name a staging folder ``.NAME.xxxxxxxx`` belongs to, or None."""
    found = STAGING.match(name)
    return found["name"] if found else None


def sweep_staging(
    folder: str | Path, keep: set[str] | frozenset[str] = frozenset(), only: str | None = None
) -> list[Path]:
    """Remove staging folders under ``folder`` left by killed saves (those of output ``only``
    when given; never those of the outputs in ``keep``, which a live process may be writing);
    the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        name = is_staging(entry.name)
        if name is None or name in keep or not entry.is_dir() or entry.is_symlink():
            continue
        if only is not None and name != only:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextmanager
def staged_output(path: str | Path, kind: str, force: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the block succeeds, mark it as a ``kind``
    artifact and rename it to ``path``, replacing an earlier artifact there (never anything
    else). On any failure the temporary folder is removed and ``path`` is left as it was.

    ``force`` is False for callers that checked with :func:`check_output` and want a refusal
    if an artifact appeared since; library callers replacing their own artifact keep True.
    """
    path = Path(path)
    check_output(path, kind, force=force, option="output")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        if kind != "model":
            (staging / MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")
        replace_folder(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    record_written(path)


def replace_folder(staging: Path, path: Path) -> None:
    """Rename ``staging`` to ``path``: an empty folder or an artifact there is replaced."""
    if path.is_dir() and (artifact_kind(path) is not None or not any(path.iterdir())):
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.replace(path, old / "previous")
        os.replace(staging, path)
        shutil.rmtree(old, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        raise UserError(
            f"{path} appeared while the output was written and is not a torchpurify artifact; "
            f"it was left alone and the output discarded"
        )
    else:
        os.replace(staging, path)
