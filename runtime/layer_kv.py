"""The paged KV of one attention layer of one session: which logical block lives where."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

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

    def blocks_in(self, tier: Tier, start: int, end: int) -> list[int]:
        """Logical blocks of ``tier`` that hold a token of ``[start, end)``, in order."""
        return [i for i in self.block_range(start, end) if self.blocks[i].tier == tier]

    def slot_table(self, block_ids: list[int]) -> torch.Tensor:
        """int64 ``[rows, len(block_ids)]``: the slot of each (sequence, kv_head) and block."""
        if not block_ids:
            return torch.empty((self.rows, 0), dtype=torch.int64)
        return torch.tensor([self.blocks[i].slots for i in block_ids], dtype=torch.int64).T

    def bytes_per_block(self, slot_bytes: int) -> int:
        return self.rows * slot_bytes
