"""Model artifacts: a directory with ``model.safetensors`` and ``model.json``.

Models under test are untrusted, so loading never unpickles: weights come from safetensors,
or from a ``.pt``/``.pth`` state dict through ``torch.load(weights_only=True)``. Saving writes a
temporary directory and renames it into place, so an interrupted save leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from torchpurify.errors import UserError
from torchpurify.models import architecture_of, build_model
from torchpurify.neurons.masks import attach_masks, masked_layers

WEIGHTS = "model.safetensors"
CARD = "model.json"
FORMAT = "torchpurify-model"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    from torchpurify import __version__

    return {
        "torchpurify": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone each tensor on the CPU.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: nn.Module, directory: str | Path, card: dict[str, Any]) -> Path:
    """Write ``model`` and its card atomically to ``directory`` (replacing an existing artifact)."""
    directory = Path(directory)
    architecture = card.get("architecture") or architecture_of(model)
    if architecture is None:
        raise UserError("cannot save a model without its architecture; build it with build_model")
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **card,
        "architecture": architecture,
        # Masked layers and their channel counts, so loading can re-create the mask buffers.
        "masks": {name: mask.numel() for name, mask in masked_layers(model).items()},
        "versions": versions(),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(_plain_state(model), str(staging / WEIGHTS))
        (staging / CARD).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old / "artifact")
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_card(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CARD
    if not path.is_file():
        raise UserError(f"{directory} is not a torchpurify model: {CARD} is missing")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(
            f"{path} is not valid JSON ({error}); retrain or restore the file"
        ) from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise UserError(f"{path} is not a torchpurify model card")
    if card.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer torchpurify; upgrade torchpurify")
    return card


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
            with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
                warnings.simplefilter("ignore")
                state = torch.load(str(path), map_location="cpu", weights_only=True)
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
        return state
    raise UserError(
        f"unsupported weights file {path.name}: use a model directory, .safetensors, .pt or .pth"
    )


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


def load_model(path: str | Path, **build: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model artifact directory, or a bare weights file given its architecture.

    For a directory, the card says how to build the model. For a bare ``.safetensors``,
    ``.pt`` or ``.pth`` file pass ``architecture=``, ``input_shape=``, ``num_classes=`` (and
    ``kwargs=``); the returned card then holds just that.
    """
    path = Path(path)
    if path.is_dir():
        card = read_card(path)
        spec = card["architecture"]
        model = build_model(
            spec["name"], card["input_shape"], len(card["classes"]), **spec.get("kwargs", {})
        )
        attach_masks(model, card.get("masks") or {})
        load_state(model, read_weights(path / WEIGHTS), str(path))
        return model.eval(), card
    if not path.exists():
        raise UserError(f"model {path} does not exist")
    missing = [k for k in ("architecture", "input_shape", "num_classes") if build.get(k) is None]
    if missing:
        raise UserError(
            f"{path.name} is a bare weights file: also give {', '.join(missing)} "
            "(--arch NAME or module:function, and --dataset)"
        )
    kwargs = build.get("kwargs") or {}
    model = build_model(build["architecture"], build["input_shape"], build["num_classes"], **kwargs)
    load_state(model, read_weights(path), str(path))
    card = {
        "architecture": {"name": build["architecture"], "kwargs": kwargs},
        "input_shape": list(build["input_shape"]),
        "classes": [str(i) for i in range(build["num_classes"])],
        "attack": None,
    }
    return model.eval(), card
