"""The step plan of one attention site: which blocks each (sequence, kv_head) attends, on
which tier each lies, and the disk reads that must land before the CPU part runs.

Plan once on the host, run the attention ops from it (the FlashInfer split).
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from numba import njit

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
    pinned: tuple = ()                     # (rows, blocks) of device/host entries held in place until the merge
    fills: list = field(default_factory=list)   # admitted disk blocks: (tier, rows, blocks, slots), filled when read
    staged: Optional[tuple] = None         # the disk read once landed: k, v and its TierPart

    @property
    def tokens_attended(self) -> int:
        return self.selected.shape[1] * self.layer.block_size

    def part(self, tier: Tier) -> Optional[TierPart]:
        if tier not in self.parts:
            self.parts[tier] = tier_part(self.layer, self.selected, tier)
        return self.parts[tier]


@njit(cache=True, nogil=True)
def _split_by_tier(tier_of, slot_of, selected, tier):
    """Row by row, the selected blocks on ``tier`` first (in their order), then the others, cut
    to the longest row's count m: ids, slots (0 where not on the tier), valid ``[rows, m]``.
    tier_of, slot_of: ``[rows, nblocks]`` (tier -1: not held); selected: ``[rows, n]``."""
    rows, n = selected.shape
    nblocks = tier_of.shape[1]
    m = 0
    for r in range(rows):
        c = 0
        for j in range(n):
            b = selected[r, j]
            if b < 0 or b >= nblocks:                # numba does not check bounds
                raise IndexError("a selected block id is outside the layer's block table")
            c += tier_of[r, b] == tier
        m = max(m, c)
    ids = np.empty((rows, m), np.int64)
    slots = np.zeros((rows, m), np.int64)
    valid = np.zeros((rows, m), np.bool_)
    for r in range(rows):
        k = 0
        for j in range(n):
            b = selected[r, j]
            if tier_of[r, b] == tier and k < m:
                ids[r, k], slots[r, k], valid[r, k] = b, slot_of[r, b], True
                k += 1
        for j in range(n):                    # padding: the other blocks, as a stable sort puts them
            b = selected[r, j]
            if tier_of[r, b] != tier and k < m:
                ids[r, k] = b
                k += 1
    return ids, slots, valid


def tier_part(kv: LayerKV, selected: torch.Tensor, tier: Tier) -> Optional[TierPart]:
    """The blocks of ``selected`` (int64 ``[rows, n]``, CPU) that lie on ``tier``, or None.
    One numba pass (this runs for every tier of every layer of every step: as torch ops it was
    ~35 us per tier on this project's CPU)."""
    tiers, slots = kv.table()
    if selected.numel() == 0:
        return None
    ids, where, valid = _split_by_tier(tiers.numpy(), slots.numpy(), selected.cpu().contiguous().numpy(), int(tier))
    if ids.shape[1] == 0:
        return None
    return TierPart(torch.from_numpy(ids), torch.from_numpy(where), torch.from_numpy(valid))
