"""Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018; methods.md §2).

Prune the neuron layer's channels in increasing order of mean activation on the clean holdout,
as many as keep holdout accuracy within the budget of the unpruned model's, then fine-tune on
``tune`` with the masks in place, keeping the fine-tuned model only if it is no worse on holdout
than the pruned one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from torchpurify.checks import default
from torchpurify.defenses.base import Clean, Purified, register_defense
from torchpurify.defenses.budget import largest_passing
from torchpurify.defenses.pruning import HoldoutProbe, PruningDefense, prune_first, scaled_count
from torchpurify.logs import FinePruningLog
from torchpurify.neurons import activation_stats

# Where the fine-tuning step comes from (methods.md, "Where each default comes from").
FP_LR = (
    "dev: configs/dev-image-sweep-4.yaml and configs/dev-audio-sweep-2.yaml (four small-cnn and "
    "four kws-cnn, seed 100) by the development rule: 0.005 within budget on images (-0.3 / "
    "-0.3 guard-half points, backdoored / clean, against -2.5 / -3.9 at 0.01) and the least "
    "over it on audio (-1.2 / -2.1 against -3.1 / -1.0; no backdoored model suspected after "
    "against one), notebook §12.15"
)
FP_EPOCHS = (
    "dev: the same sweeps: 20 epochs not chosen (images -2.2 / -3.9, audio -3.1 / -1.0 at lr "
    "0.01), notebook §12.15"
)


@register_defense
@dataclass
class FinePruning(PruningDefense):
    name = "fine-pruning"
    summary = "prune channels dormant on clean data, then fine-tune (Liu et al. 2018)"

    epochs: int = default(10, FP_EPOCHS)
    lr: float = default(0.005, FP_LR)
    freeze_bn_stats: bool = default(
        True, "dev: configs/dev-image.yaml seed 100 BadNets, single runs (methods.md §2)"
    )
    search: str = default(
        "binary", "protocol: binary search for the cut, O(log C) evaluations (methods.md §2)"
    )
    prune_only: bool = default(
        False, "paper: Fine-Pruning fine-tunes after pruning (methods.md §2)"
    )

    def validate(self) -> None:
        super().validate()
        self.require("search", self.search in ("binary", "sweep"), "binary or sweep")

    @property
    def fine_tunes(self) -> bool:
        return not self.prune_only

    def without_fine_tuning(self) -> FinePruning:
        return dataclasses.replace(self, prune_only=True)

    def run(self, model: nn.Module, clean: Clean) -> Purified:
        layer = self.neuron_layer(model, clean)
        # 1. Rank channels by mean activation on clean holdout data, most dormant first.
        stats = activation_stats(model, layer, clean.holdout, batch_size=self.batch_size)
        order = stats.mean.argsort()
        # 2. Prune as many as keep holdout accuracy within the budget.
        probe = HoldoutProbe(model, layer, order, clean.holdout, self.batch_size)
        base = probe.accuracy(0)
        threshold = base - self.budget(base, len(clean.holdout))
        # "binary" assumes holdout accuracy falls monotonically in k; "sweep" scans up to the
        # first count that fails (defenses/budget.py).
        search = "binary" if self.search == "binary" else "until-failure"
        within = largest_passing(
            0, len(order) - 1, lambda k: probe.accuracy(k) >= threshold, search=search
        )
        # The guard's back-off prunes a share of that (cut_scale, methods.md §0).
        cut = scaled_count(within, self.cut_scale)
        pruned_acc = probe.accuracy(cut)
        prune_first(model, layer, order, cut)
        log = FinePruningLog(
            layer=layer,
            channels=len(order),
            pruned=order[:cut].tolist(),
            num_pruned=cut,
            num_within_budget=within,
            cut_scale=self.cut_scale,
            holdout_acc_before=base,
            holdout_acc_pruned=pruned_acc,
            threshold=threshold,
            search=self.search,
            holdout_evaluations=len(probe.curve),
            curve=probe.sorted_curve(),
        )
        # 3. Fine-tune with the masks in place; keep the better of pruned and fine-tuned.
        log = dataclasses.replace(log, **self.fine_tune_pruned(model, clean, pruned_acc))
        return Purified(model, log.to_dict())
