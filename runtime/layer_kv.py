"""The paged KV of one attention layer of one session: which logical block lives where."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .summaries import BlockSummaries
from .tiers import Tier


@dataclass
class Block:
    """One logical block: ``block_size`` token positions of every (sequence, kv_head).

    slots: one slot per (sequence, kv_head), row-major over ``[batch, kv_heads]``, in the pool
    (or file) of ``tier``. created: global creation order; placement keeps the newest up.
    """

    tier: Tier
    slots: list[int]
    created: int


@dataclass
class LayerKV:
    """KV of one layer of one session: ``length`` tokens in blocks ``first .. last``.

    Blocks before ``first`` were dropped (a sliding-window layer no longer attends them).
    """

    session_id: int
    layer: int
    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int
    device: torch.device
    keeps_last: bool = False
    length: int = 0
    first: int = 0
    blocks: dict[int, Block] = field(default_factory=dict)
    summaries: Optional[BlockSummaries] = None
    pins: dict[int, int] = field(default_factory=dict)     # block id -> live plans reading it
    _table: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)

    def __post_init__(self):
        if self.summaries is None:
            self.summaries = BlockSummaries(self.rows, self.head_dim, self.block_size, self.device)

    def __hash__(self):                   # identity: one object per (session, layer)
        return id(self)

    def __eq__(self, other):
        return self is other

    @property
    def rows(self) -> int:
        """Slots per logical block: one per (sequence, kv_head)."""
        return self.batch * self.kv_heads

    @property
    def num_blocks(self) -> int:
        return -(-self.length // self.block_size)

    def block_range(self, start: int, end: int) -> range:
        """Logical blocks holding token positions ``[start, end)``."""
        return range(start // self.block_size, -(-end // self.block_size))

    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tier [nblocks], slot [rows, nblocks])`` by logical block id (tier -1: dropped)."""
        if self._table is None:
            n = self.num_blocks
            tiers = torch.full((n,), -1, dtype=torch.int64)
            slots = torch.zeros((self.rows, n), dtype=torch.int64)
            ids = sorted(self.blocks)
            if ids:
                index = torch.tensor(ids)
                tiers[index] = torch.tensor([int(self.blocks[i].tier) for i in ids])
                slots[:, index] = torch.tensor([self.blocks[i].slots for i in ids]).T
            self._table = (tiers, slots)
        return self._table

    def changed(self) -> None:
        """Blocks were added, moved or dropped: the cached table is stale."""
        self._table = None
