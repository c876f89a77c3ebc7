"""Backdoor attacks: triggers (a registry of kebab-case names) and training-set poisoning."""

from torchpurify.attacks import audio, image, pruning_aware  # noqa: F401  (register them)
from torchpurify.attacks.base import ATTACKS, Trigger, build_attack, trigger_from_dict
from torchpurify.attacks.poison import Poisoned, poison_split, target_labels

__all__ = [
    "ATTACKS",
    "Poisoned",
    "Trigger",
    "build_attack",
    "poison_split",
    "target_labels",
    "trigger_from_dict",
]
