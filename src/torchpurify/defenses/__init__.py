"""Defenses by name: ``build_defense("gnft", alpha=0.9).purify(model, Clean(tune, holdout))``."""

from torchpurify.defenses import gnft  # noqa: F401  (registers ft and gnft)
from torchpurify.defenses.base import DEFENSES, Clean, Defense, Purified, build_defense

__all__ = ["DEFENSES", "Clean", "Defense", "Purified", "build_defense"]
