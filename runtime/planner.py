"""The step plan of one attention site: which blocks each (sequence, kv_head) attends, on
which tier each lies, and the disk reads that must land before the CPU part runs.

Plan once on the host, run the attention ops from it (the FlashInfer split).
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

import torch

from .layer_kv import LayerKV
from .tiers import Tier


@dataclass
class TierPart:
    """The selected blocks of one tier, per row (one row per (sequence, kv_head)).

    ids: logical block ids ``[rows, m]``; slots: where they lie in the tier's pool (or staging
    buffer, for disk) ``[rows, m]``; valid: which entries are real (rows select different
    numbers of blocks per tier; the rest is padding).
    """

    ids: torch.Tensor
    slots: torch.Tensor
    valid: torch.Tensor


@dataclass
class Plan:
    """What one site attends this step.

    selected: int64 ``[rows, n]`` logical block ids, ascending (the explicit selection the
    runtime moves and reuses blocks by). fresh_only: every attended token is among the step's
    new tokens (a prefill), attended from where they are. fetch: host and disk blocks are
    copied to the device and attended there, instead of on the CPU.
    """

    layer: LayerKV
    window: tuple[int, int]
    selected: torch.Tensor
    fresh_only: bool
    fetch: bool = False
    parts: dict[Tier, Optional[TierPart]] = field(default_factory=dict)
    disk_read: Optional[Future] = None
    disk_slots: Optional[torch.Tensor] = None

    @property
    def tokens_attended(self) -> int:
        return self.selected.shape[1] * self.layer.block_size

    def part(self, tier: Tier) -> Optional[TierPart]:
        if tier not in self.parts:
            self.parts[tier] = tier_part(self.layer, self.selected, tier)
        return self.parts[tier]


def tier_part(kv: LayerKV, selected: torch.Tensor, tier: Tier) -> Optional[TierPart]:
    tiers, slots = kv.table()
    in_tier = tiers[selected] == tier                                         # [rows, n]
    m = int(in_tier.sum(1).max()) if in_tier.numel() else 0
    if m == 0:
        return None
    order = torch.argsort((~in_tier).to(torch.int8), dim=1, stable=True)[:, :m]
    ids = selected.gather(1, order)
    valid = in_tier.gather(1, order)
    return TierPart(ids, torch.where(valid, slots.gather(1, ids), 0), valid)
