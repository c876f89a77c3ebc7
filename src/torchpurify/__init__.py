"""torchpurify: find and remove backdoors in trained neural networks, neuron by neuron.

``torchpurify.purify(model, clean, defense="gnft", **params)`` purifies any ``nn.Module`` with
clean data (see :func:`torchpurify.api.purify`); it is imported on first use, so
``import torchpurify`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "purify"]


def __getattr__(name: str) -> Any:
    if name == "purify":
        from torchpurify.api import purify

        return purify
    raise AttributeError(f"module 'torchpurify' has no attribute {name!r}")
