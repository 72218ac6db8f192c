"""The three KV tiers: byte budgets, and block pools in memory (the disk tier is ``disk.py``).

A slot holds one KV block of one (sequence, kv_head): ``block_size`` tokens of K and of V,
each ``[block_size, head_dim]``. Memory tiers keep slots in two pool tensors that grow within
the tier's budget; the disk tier keeps them in a file unlinked at creation, K then V per
slot, each slot checksummed (``disk.DiskFile``).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .host_memory import host_empty

__all__ = ["Tier", "TierBudget", "BudgetExceeded", "BlockPool", "slot_bytes",
           # re-exported from disk.py (the disk tier's home), imported at the end
           "DiskFile", "KVDiskError", "KVIntegrityError", "IO_THREAD_PREFIX", "open_unlinked"]


class Tier(enum.IntEnum):
    DEVICE = 0
    HOST = 1
    DISK = 2


class BudgetExceeded(RuntimeError):
    pass


@dataclass
class TierBudget:
    """Bytes a tier may hold (``limit=None``: no limit); counts what is reserved now and at peak."""

    name: str
    limit: Optional[int]
    reserved: int = 0
    peak: int = 0
    pools: list = field(default_factory=list, repr=False)    # the BlockPools that share it

    def reclaim(self, nbytes: int, asking: "BlockPool") -> None:
        """Make ``nbytes`` of room, where it can, from the unused capacity of the other pools
        that share this budget (layers of another head_dim: Gemma 4's full and sliding layers):
        a pool reserves room for the slots it may take next, which another pool may need now."""
        for pool in self.pools:
            if self.room() is None or self.room() >= nbytes:
                return
            if pool is not asking:
                pool.shrink()

    def room(self) -> Optional[int]:
        return None if self.limit is None else self.limit - self.reserved

    def try_reserve(self, nbytes: int) -> bool:
        if self.limit is not None and self.reserved + nbytes > self.limit:
            return False
        self.reserved += nbytes
        self.peak = max(self.peak, self.reserved)
        return True

    def release(self, nbytes: int) -> None:
        self.reserved -= nbytes
        assert self.reserved >= 0, f"{self.name} tier released more bytes than it reserved"


def slot_bytes(block_size: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one slot: K and V blocks of ``[block_size, head_dim]``."""
    return 2 * block_size * head_dim * torch.empty((), dtype=dtype).element_size()


class BlockPool:
    """Slots on one torch device (the device tier, or host DRAM) within a byte budget.

    ``k``, ``v``: ``[capacity, block_size, head_dim]``. Capacity grows by doubling, never past
    the budget; freed slots are reused.
    """

    def __init__(self, budget: TierBudget, device: torch.device, dtype: torch.dtype,
                 block_size: int, head_dim: int, pin_memory: bool = False):
        self.budget, self.device, self.dtype = budget, device, dtype
        self.block_size, self.head_dim, self.pin_memory = block_size, head_dim, pin_memory
        self.slot_bytes = slot_bytes(block_size, head_dim, dtype)
        self.k = self._empty(0)
        self.v = self._empty(0)
        self.free: list[int] = []
        # moves the blocks in the highest slots down into free ones (set by the runtime, which
        # knows which blocks lie where: placement.pack_pool), so ``shrink`` frees the most
        self.pack: Optional[Callable[[], None]] = None
        budget.pools.append(self)

    @property
    def capacity(self) -> int:
        return self.k.shape[0]

    @property
    def used(self) -> int:
        return self.capacity - len(self.free)

    def _empty(self, n: int) -> torch.Tensor:
        shape = (n, self.block_size, self.head_dim)
        if self.device.type == "cpu" and not self.pin_memory:
            return host_empty(shape, self.dtype)              # huge pages: blocks are read at random
        t = torch.empty(shape, dtype=self.dtype, device=self.device)
        return t.pin_memory() if self.pin_memory and n else t

    def _grow(self, need: int) -> bool:
        # geometric growth, so filling a pool copies each slot O(1) times (a fixed 4,096-slot step
        # grew an 8K x 4 SmolLM2 prefill's pool ~45 times, each copying all of it so far); by half
        # on the CPU, where slots never written are virtual memory only (an anonymous mapping), by
        # a quarter in GPU or pinned memory
        cap = self.capacity
        virtual = self.device.type == "cpu" and not self.pin_memory
        want = max(cap + need, cap + max(4096, cap // (2 if virtual else 4)), 16)
        room = self.budget.room()
        if room is not None:       # sharing the budget (another head_dim): half its room at most
            share = 2 if len(self.budget.pools) > 1 else 1
            want = min(want, cap + max(need, room // self.slot_bytes // share))
        if want < cap + need or not self.budget.try_reserve((want - cap) * self.slot_bytes):
            return False
        for name in ("k", "v"):
            old = getattr(self, name)
            new = self._empty(want)
            new[:cap] = old
            setattr(self, name, new)
        self.free.extend(range(want - 1, cap - 1, -1))
        return True

    def _make_room(self, slots: int) -> None:
        """Room in the budget for ``slots`` more slots than are free, taken from other pools'
        unused capacity where the budget has too little."""
        room, short = self.budget.room(), (slots - len(self.free)) * self.slot_bytes
        if room is not None and short > room:
            self.budget.reclaim(short, self)

    def shrink(self) -> None:
        """Give the budget back the capacity above the highest slot in use (packed first)."""
        if self.pack is not None and self.free:
            self.pack()
        cap = self.capacity
        free = set(self.free)
        keep = cap
        while keep and keep - 1 in free:
            keep -= 1
        if keep == cap:
            return
        for name in ("k", "v"):
            new = self._empty(keep)
            new[:] = getattr(self, name)[:keep]
            setattr(self, name, new)
        self.free = [slot for slot in self.free if slot < keep]
        self.budget.release((cap - keep) * self.slot_bytes)

    def alloc(self, n: int) -> Optional[list[int]]:
        """``n`` free slots, or None when the budget has no room for them."""
        if len(self.free) < n and not self._grow(n - len(self.free)):
            return None
        out = self.free[-n:][::-1]
        del self.free[-n:]
        return out

    def alloc_upto(self, n: int, reclaim: bool = False) -> list[int]:
        """Up to ``n`` free slots: as many as the budget has room for. reclaim: slots that must
        be found (a layer's pinned blocks) take the room other pools hold unused; a copy that
        may be made or not does not, so pools do not hand capacity back and forth each step."""
        if n <= 0:
            return []
        if reclaim:
            self._make_room(n)
        room = self.budget.room()
        fit = n if room is None else min(n, len(self.free) + room // self.slot_bytes)
        return (self.alloc(fit) or []) if fit > 0 else []

    def release(self, slots: list[int]) -> None:
        self.free.extend(slots)

    def close(self) -> None:
        """Give the budget back all of the pool's capacity; the pool no longer shares it."""
        self.budget.release(self.capacity * self.slot_bytes)
        self.k = self.v = self._empty(0)
        self.free = []
        if self in self.budget.pools:
            self.budget.pools.remove(self)


# the disk tier moved to disk.py; these names stay importable from here
from .disk import DiskFile, KVDiskError, KVIntegrityError, IO_THREAD_PREFIX, open_unlinked  # noqa: E402,F401
