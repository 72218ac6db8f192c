"""The three KV tiers: byte budgets, block pools in memory, block files on disk.

A slot holds one KV block of one (sequence, kv_head): ``block_size`` tokens of K and of V,
each ``[block_size, head_dim]``. Memory tiers keep slots in two pool tensors that grow within
the tier's budget; the disk tier keeps them in a private file, K then V per slot.
"""
from __future__ import annotations

import enum
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch

from .host_memory import host_empty


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
        cap = self.capacity
        want = max(cap + need, min(2 * cap, cap + 4096), 16)
        room = self.budget.room()
        if room is not None:
            want = min(want, cap + room // self.slot_bytes)
        if want < cap + need or not self.budget.try_reserve((want - cap) * self.slot_bytes):
            return False
        for name in ("k", "v"):
            old = getattr(self, name)
            new = self._empty(want)
            new[:cap] = old
            setattr(self, name, new)
        self.free.extend(range(want - 1, cap - 1, -1))
        return True

    def alloc(self, n: int) -> Optional[list[int]]:
        """``n`` free slots, or None when the budget has no room for them."""
        if len(self.free) < n and not self._grow(n - len(self.free)):
            return None
        out = self.free[-n:][::-1]
        del self.free[-n:]
        return out

    def release(self, slots: list[int]) -> None:
        self.free.extend(slots)

    def close(self) -> None:
        self.budget.release(self.capacity * self.slot_bytes)
        self.k = self.v = self._empty(0)
        self.free = []


_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024


def _raw(t: torch.Tensor):
    """A numpy uint8 view of a contiguous CPU tensor (any dtype, bf16 included)."""
    return t.contiguous().view(torch.uint8).numpy()


class DiskFile:
    """Slots in one private file: slot ``i`` at byte ``i * slot_bytes``, K block then V block.

    Reads and writes go out as one request per run of consecutive slots, through a thread pool.
    """

    def __init__(self, path: str, dtype: torch.dtype, block_size: int, head_dim: int,
                 io_pool: ThreadPoolExecutor):
        self.path, self.dtype = path, dtype
        self.block_size, self.head_dim = block_size, head_dim
        self.slot_bytes = slot_bytes(block_size, head_dim, dtype)
        self.half = self.slot_bytes // 2
        self.io_pool = io_pool
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.capacity = 0
        self.free: list[int] = []
        self.bytes_written = 0
        self.bytes_read = 0

    @property
    def used(self) -> int:
        return self.capacity - len(self.free)

    def alloc(self, n: int) -> list[int]:
        """``n`` slots, consecutive where the file can give them, so one block is one request."""
        if len(self.free) >= n:
            self.free.sort(reverse=True)
            out = self.free[-n:][::-1]
            del self.free[-n:]
            return out
        out = list(range(self.capacity, self.capacity + n))
        self.capacity += n
        return out

    def release(self, slots: list[int]) -> None:
        self.free.extend(slots)

    @staticmethod
    def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
        """(first slot, position in ``slots``, length) for each run of consecutive slots."""
        runs, start = [], 0
        for i in range(1, len(slots) + 1):
            if i == len(slots) or slots[i] != slots[i - 1] + 1:
                runs.append((slots[start], start, i - start))
                start = i
        return runs

    def write(self, slots: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: ``[len(slots), block_size, head_dim]`` (any device)."""
        buf = _raw(torch.stack([k.cpu(), v.cpu()], dim=1))              # [n, 2, bs, D] bytes
        buf = buf.reshape(len(slots), self.slot_bytes)
        jobs = [self.io_pool.submit(os.pwrite, self.fd, buf[pos:pos + n].data, first * self.slot_bytes)
                for first, pos, n in self._runs(slots)]
        for j in jobs:
            j.result()
        self.bytes_written += len(slots) * self.slot_bytes

    def write_tokens(self, slot: int, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k, v: [n, head_dim]`` at token ``offset`` of ``slot`` (the open block on disk)."""
        base = slot * self.slot_bytes
        row = self.half // self.block_size
        os.pwrite(self.fd, _raw(k.cpu()).data, base + offset * row)
        os.pwrite(self.fd, _raw(v.cpu()).data, base + self.half + offset * row)
        self.bytes_written += 2 * k.numel() * k.element_size()

    def read(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``slots`` as contiguous host tensors ``[len(slots), block_size, head_dim]``.

        One scattered read per run of consecutive slots: K halves land in ``k``, V halves in ``v``.
        """
        n = len(slots)
        k = torch.empty((n, self.block_size, self.head_dim), dtype=self.dtype)
        v = torch.empty_like(k)
        k_raw = k.view(torch.uint8).numpy().reshape(n, self.half)
        v_raw = v.view(torch.uint8).numpy().reshape(n, self.half)
        per_call = _IOV_MAX // 2

        def read_run(first: int, pos: int, count: int) -> None:
            for start in range(0, count, per_call):
                m = min(per_call, count - start)
                views = []
                for i in range(pos + start, pos + start + m):
                    views += [memoryview(k_raw[i]), memoryview(v_raw[i])]
                got = os.preadv(self.fd, views, (first + start) * self.slot_bytes)
                if got != m * self.slot_bytes:
                    raise IOError(f"short read from {self.path}: {got} of {m * self.slot_bytes} bytes")

        jobs = [self.io_pool.submit(read_run, *run) for run in self._runs(slots)]
        for j in jobs:
            j.result()
        self.bytes_read += n * self.slot_bytes
        return k, v

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
