"""Defenses by name: ``build_defense("gnft", alpha=0.9).purify(model, Clean(tune, holdout))``."""

# Importing the modules registers their defenses.
from torchpurify.defenses import (  # noqa: F401
    anp,
    bti_dbf,
    clp,
    fine_pruning,
    fst,
    ft_sam,
    gnft,
    ibau,
    linf_pruning,
    nad,
    rnp,
    salience_ar,
    sau,
    tsbd,
)
from torchpurify.defenses.base import DEFENSES, Clean, Defense, Purified, build_defense
from torchpurify.defenses.sources import PENDING_RECHOICE, default_sources

__all__ = [
    "DEFENSES",
    "PENDING_RECHOICE",
    "Clean",
    "Defense",
    "Purified",
    "build_defense",
    "default_sources",
]
