"""Model artifacts: a directory with ``model.safetensors`` and ``model.json``.

Models under test are untrusted, so loading never runs code from the model file:

- weights come from safetensors, or from a ``.pt``/``.pth`` state dict through
  ``torch.load(weights_only=True)`` — never an unpickled object;
- the card is checked field by field (:class:`~torchpurify.card.ModelCard`), its architecture
  arguments must be plain JSON values that the architecture's signature accepts, and a model
  that would hold far more values than its weights file is refused before it is allocated;
- a card naming a registered architecture builds it; a card naming a ``module:function``
  reference is refused unless the caller names the same reference (``arch=``, ``--arch``) or
  passes ``trust_code=True`` (``--trust-code``): only then is that module imported.

Saving writes a temporary directory and renames it into place, so an interrupted save leaves
nothing behind. :func:`export_weights` writes a plain state dict (masks folded into the
weights) that loads into the user's own class without torchpurify.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import platform
import subprocess
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from torchpurify.card import FORMAT, FORMAT_VERSION, Architecture, ModelCard
from torchpurify.errors import UserError, check
from torchpurify.models import architecture_of, build_architecture, is_reference
from torchpurify.models.image import Normalize
from torchpurify.neurons.masks import attach_masks, fold_masks, masked_layers
from torchpurify.outputs import check_writable, record_written, staged_output

WEIGHTS = "model.safetensors"
CARD = "model.json"
MAX_CARD_BYTES = 64 << 20
# A zip (a .pt, an .npz) whose directory says it unpacks to more than MAX_UNPACKED bytes, or to
# more than MAX_INFLATION times its size once past FREE_UNPACKED, is refused before inflating.
MAX_UNPACKED = 8 << 30  # 2**30 float64 values
MAX_INFLATION = 100  # stored or real data: 1-10×; a file of zeros: up to 1000×
FREE_UNPACKED = 64 << 20

__all__ = [
    "CARD",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS",
    "Normalized",
    "allow_architecture",
    "check_export",
    "check_unpacked",
    "export_weights",
    "is_export",
    "load_model",
    "read_card",
    "read_weights",
    "save_model",
    "versions",
    "weights_sha256",
]


def versions() -> dict[str, str]:
    """What made a result: the package versions and, when torchpurify runs from a git
    checkout, its commit (``-dirty`` when tracked files under src/ differ from it)."""
    from torchpurify import __version__

    found = {
        "torchpurify": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    commit = source_commit()
    if commit is not None:
        found["commit"] = commit
    return found


@functools.cache
def source_commit() -> str | None:
    """The git commit of the checkout this package is imported from (an editable install or
    ``src`` on the path), with ``-dirty`` when src/ has uncommitted changes; None for an
    installed package or where git is not at hand."""
    package = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10,
            check=True,
        )  # fmt: skip
        return done.stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top / "src" / "torchpurify" != package:
            return None  # installed inside some other repository (a venv in a checkout)
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def weights_sha256(directory: str | Path) -> str:
    """SHA-256 of a model folder's weights file: the identity of the weights a result used
    (``sha256sum DIR/model.safetensors`` gives the same)."""
    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Normalized(nn.Module):
    """A user's image model behind its input normalisation (``--normalize MEAN,STD``).

    ``model`` is the user's own module unchanged, so ``wrapped.model.state_dict()`` loads into
    the user's class.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module inside a :class:`Normalized` wrapper (the model itself otherwise)."""
    return model.model if isinstance(model, Normalized) else model


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone each tensor on the CPU.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_model(
    model: nn.Module, directory: str | Path, card: Mapping[str, Any], *, force: bool = True
) -> Path:
    """Write ``model`` and its card atomically to ``directory``: a new or empty folder, or an
    existing model artifact (replaced, unless ``force`` is False: then an artifact there is
    refused — a command that checked ``--out`` before its work keeps a concurrent run's
    result); anything else there is refused (outputs.py)."""
    directory = Path(directory)
    architecture = card.get("architecture") or architecture_of(unwrap(model))
    if architecture is None:
        raise UserError("cannot save a model without its architecture; build it with build_model")
    if isinstance(architecture, Architecture):
        architecture = architecture.to_dict()
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **dict(card),
        "architecture": architecture,
        # Masked layers and their channel counts, so loading can re-create the mask buffers.
        "masks": {name: mask.numel() for name, mask in masked_layers(model).items()},
        "versions": versions(),
    }
    if isinstance(model, Normalized):
        record["normalize"] = {
            "mean": model.normalize.mean.flatten().tolist(),
            "std": model.normalize.std.flatten().tolist(),
        }
    checked = ModelCard.from_dict(record, source=f"the card for {directory}").to_dict()
    # Written beside the target and renamed into place; only an artifact is ever replaced.
    with staged_output(directory, "model", force) as staging:
        save_file(_plain_state(model), str(staging / WEIGHTS))
        (staging / CARD).write_text(json.dumps(checked, indent=2, sort_keys=True) + "\n")
    return directory


def read_card(directory: str | Path) -> ModelCard:
    """The checked card of a model directory (:class:`~torchpurify.card.ModelCard`)."""
    path = Path(directory) / CARD
    if not path.is_file():
        raise UserError(f"{directory} is not a torchpurify model: {CARD} is missing")
    if path.stat().st_size > MAX_CARD_BYTES:
        raise UserError(f"{path} is larger than {MAX_CARD_BYTES >> 20} MiB: not a model card")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise UserError(
            f"{path} is not valid JSON ({str(error)[:200]}); retrain or restore the file"
        ) from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise UserError(f"{path} is not a torchpurify model card")
    return ModelCard.from_dict(card, source=str(path))


def check_unpacked(path: Path, members: Iterable[zipfile.ZipInfo]) -> None:
    """Refuse the zip at ``path`` when ``members`` would unpack to more than
    :data:`MAX_UNPACKED` bytes, or to more than :data:`MAX_INFLATION` times the file's size
    (past :data:`FREE_UNPACKED`): sizes read from the zip directory, before anything inflates."""
    unpacked = sum(member.file_size for member in members)
    held = path.stat().st_size
    limit = min(MAX_UNPACKED, max(MAX_INFLATION * held, FREE_UNPACKED))
    check(
        unpacked <= limit,
        f"{path} would unpack to {unpacked:,} bytes from {held:,} on disk, over its limit of "
        f"{limit:,} (at most {MAX_INFLATION}× the file and {MAX_UNPACKED >> 30} GiB); save real "
        "data uncompressed (numpy.savez, torch.save)",
    )


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a ``.pt``/``.pth`` state dict, without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"{path} is not a readable safetensors file ({error})") from None
    if path.suffix in (".pt", ".pth"):
        try:
            if zipfile.is_zipfile(path):  # torch.save's format: sizes checked before inflating
                with zipfile.ZipFile(path) as archive:
                    check_unpacked(path, archive.infolist())
            with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
                warnings.simplefilter("ignore")
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except UserError:
            raise
        except Exception as error:  # the unpickler raises many types; none may leak as a traceback
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(
                f"refusing to load {path}: it is not a plain state dict of tensors ({reason}); "
                "save it with torch.save(model.state_dict(), ...) or as safetensors"
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
        sparse = [key for key, value in state.items() if value.layout != torch.strided]
        if sparse:
            raise UserError(
                f"{path}: {sparse[0]!r} is a sparse tensor; save dense weights (tensor.to_dense())"
            )
        return state
    raise UserError(
        f"unsupported weights file {path.name}: use a model directory, .safetensors, .pt or .pth"
    )


def weights_size(path: str | Path) -> int | None:
    """Values held by a safetensors file, read from its header only (None when unreadable)."""
    try:
        with safe_open(str(path), "pt") as file:
            return sum(math.prod(file.get_slice(key).get_shape()) for key in file.keys())
    except Exception:  # a corrupt file is reported when it is read
        return None


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` strictly into ``model``, refusing mismatches and non-finite weights."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(
            f"the weights in {source} do not fit the architecture ({detail}); "
            "check the architecture name and its arguments"
        )
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise UserError(
                f"the weights in {source} do not fit the architecture: {key} has shape "
                f"{tuple(value.shape)}, the model expects {tuple(own[key].shape)} "
                "(is the input shape or class count different?)"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise UserError(f"the weights in {source} contain NaN or infinity in {key}")
    model.load_state_dict(state)
    return model


def allow_architecture(
    recorded: str, source: str, arch: str | None = None, trust_code: bool = False
) -> None:
    """Refuse to build a card's ``module:function`` architecture the user did not name.

    A registered name is always allowed. A reference is allowed only when ``arch`` names the
    same reference or ``trust_code`` is set; ``arch`` naming a different architecture is refused.
    """
    if arch is not None and arch != recorded:
        raise UserError(
            f"{source} records the architecture {recorded!r} but --arch is {arch!r}; "
            "leave out --arch for a model directory, or give the same name"
        )
    if is_reference(recorded) and arch != recorded and not trust_code:
        raise UserError(
            f"{source} asks to run Python code: its card names the architecture {recorded!r}, "
            "a function that would be imported and called. Only if you trust this model, name "
            f"it yourself with --arch {recorded} or pass --trust-code (Python: "
            f"arch={recorded!r} or trust_code=True)"
        )


def load_model(
    path: str | Path,
    arch: str | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    trust_code: bool = False,
    architecture: str | None = None,
) -> tuple[nn.Module, ModelCard]:
    """Load a model artifact directory, or a bare weights file given its architecture.

    For a directory, the card says how to build the model; a ``module:function`` architecture in
    it is built only when ``arch`` names the same reference or ``trust_code`` is True. For a bare
    ``.safetensors``, ``.pt`` or ``.pth`` file pass ``arch`` (a registered name or your own
    ``module:function``), ``input_shape`` and ``num_classes`` (and ``kwargs``, and ``normalize``
    as ``(mean, std)`` to wrap an image model in its input normalisation); the returned card
    then holds just that. ``architecture`` is the older name of ``arch``.
    """
    arch = arch if arch is not None else architecture
    path = Path(path)
    if path.is_dir():
        card = read_card(path)
        allow_architecture(card.architecture.name, str(path), arch, trust_code)
        held = weights_size(path / WEIGHTS)
        limit = {} if held is None else {"max_elements": 2 * held + (1 << 22)}
        try:
            model = build_architecture(
                card.architecture.name,
                card.input_shape,
                card.num_classes,
                card.architecture.kwargs,
                **limit,
            )
        except UserError as error:
            raise UserError(f"{path / CARD}: {error}") from None
        if card.normalize is not None:
            model = Normalized(model, card.normalize["mean"], card.normalize["std"])
        attach_masks(model, card.masks)
        load_state(model, read_weights(path / WEIGHTS), str(path))
        return model.eval(), card
    if not path.exists():
        raise UserError(f"model {path} does not exist")
    missing = [
        option
        for option, value in (
            ("--arch", arch),
            ("input shape", input_shape),
            ("classes", num_classes),
        )
        if value is None
    ]
    if missing:
        raise UserError(
            f"{path.name} is a bare weights file: also give {', '.join(missing)} "
            "(--arch NAME or module:function, and --clean or --dataset for the data)"
        )
    state = read_weights(path)
    held = sum(t.numel() for t in state.values())
    kwargs = dict(kwargs or {})
    model = build_architecture(
        arch, tuple(input_shape), num_classes, kwargs, max_elements=2 * held + (1 << 22)
    )
    record: dict[str, Any] = {
        "format": FORMAT,
        "architecture": {"name": arch, "kwargs": kwargs},
        "input_shape": list(input_shape),
        "classes": [str(i) for i in range(num_classes)],
        "attack": None,
    }
    if normalize is not None:
        check(len(input_shape) == 3, "--normalize applies to image models (C×H×W inputs)")
        mean, std = normalize
        model = Normalized(model, mean, std)
        record["normalize"] = {"mean": list(mean), "std": list(std)}
    load_state(unwrap(model), state, str(path))
    return model.eval(), ModelCard.from_dict(record, source=str(path))


EXPORT_SUFFIXES = (".safetensors", ".pt", ".pth")
# The mark that says "torchpurify --export wrote this file": a safetensors metadata entry, or
# an entry of a .pt state dict's root ``_metadata`` (which load_state_dict passes over).
EXPORT_MARK = ("torchpurify", "export")


def is_export(path: str | Path) -> bool:
    """True for a file that :func:`export_weights` wrote (it carries :data:`EXPORT_MARK`)."""
    path = Path(path)
    key, value = EXPORT_MARK
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                return (f.metadata() or {}).get(key) == value
        # mmap: the tensors are not read; weights_only: no code runs.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        root = getattr(state, "_metadata", None) or {}
        return isinstance(root.get(""), dict) and root[""].get(key) == value
    except Exception:  # any file that is not a readable export is not one of ours
        return False


def check_export(
    path: str | Path,
    *,
    force: bool = False,
    inputs: Sequence[str | Path] = (),
    out: str | Path | None = None,
) -> Path:
    """Refuse, before any work, an ``--export`` file that would lose something or cannot be
    written (the rule of outputs.py for files): a new file, or — with ``force`` — a file an
    earlier export wrote. Never an input (``inputs``: the user's model), never a file that
    torchpurify did not write, never a place inside the ``--out`` folder (replaced whole)."""
    path = Path(path)
    check(
        path.suffix in EXPORT_SUFFIXES,
        f"--export {path} must end in .safetensors, .pt or .pth",
    )
    check(not path.is_symlink(), f"--export {path} is a link; name a new file")
    check(not path.is_dir(), f"--export {path} is a folder; give a file name")
    resolved = path.resolve()

    def within(place: Path) -> bool:
        return resolved == place.resolve() or place.resolve() in resolved.parents

    for given in map(Path, inputs):
        if within(given) or (path.exists() and given.exists() and path.samefile(given)):
            raise UserError(
                f"--export {path} is (inside) the input {given}; torchpurify never overwrites "
                "its input — name a new file"
            )
    if out is not None and within(Path(out)):
        raise UserError(
            f"--export {path} is inside --out {out}, which is written whole; name a file elsewhere"
        )
    if path.exists():
        if not is_export(path):
            raise UserError(
                f"--export {path} exists and was not written by torchpurify; name a new file — "
                "torchpurify never replaces files it did not write"
            )
        if not force:
            raise UserError(
                f"--export {path} holds an earlier torchpurify export; pass --force to replace "
                "it, or name a new file"
            )
    check_writable(resolved.parent, "--export", shown=path)
    return path


def export_weights(model: nn.Module, path: str | Path, *, force: bool = True) -> Path:
    """Write the weights of ``model`` for the user's own class: masks folded into the weights,
    no mask buffers, no normalisation wrapper. ``.safetensors`` or ``.pt``/``.pth`` by suffix;
    load it with ``YourNet(...).load_state_dict(torch.load(path))``.

    The file is checked by :func:`check_export` (callers with inputs to protect check first,
    before their work) and replaces only an earlier export — with ``force``, the default for
    library callers; it is written beside the target and renamed into place."""
    path = check_export(path, force=force)
    state = _plain_state(unwrap(fold_masks(model)))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    key, value = EXPORT_MARK
    try:
        if path.suffix == ".safetensors":
            save_file(state, str(staging), metadata={key: value})
        else:
            marked = OrderedDict(state)
            marked._metadata = OrderedDict({"": {key: value}})  # type: ignore[attr-defined]
            torch.save(marked, staging)
        if path.exists() and not is_export(path):  # appeared while we wrote: never replace it
            raise UserError(
                f"--export {path} appeared while the export was written and is not a "
                "torchpurify export; it was left alone"
            )
        staging.replace(path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    record_written(path)
    return path
