"""The three KV tiers: byte budgets, block pools in memory, block files on disk.

A slot holds one KV block of one (sequence, kv_head): ``block_size`` tokens of K and of V,
each ``[block_size, head_dim]``. Memory tiers keep slots in two pool tensors that grow within
the tier's budget; the disk tier keeps them in a file unlinked at creation, K then V per
slot, each slot checksummed.
"""
from __future__ import annotations

import enum
import errno
import os
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import xxhash

from .host_memory import host_empty


IO_THREAD_PREFIX = "kvdrive-io"          # the runtime's I/O threads are named so


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
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)          # Linux: a file that never has a name

Submit = Callable[..., Future]                    # submit(fn, *args) on the I/O threads


class KVDiskError(RuntimeError):
    """The disk tier could not write or read a generation's KV; that generation cannot go on.
    ``errno`` is the OS error number where one caused it."""

    def __init__(self, message: str, err: Optional[int] = None):
        super().__init__(message)
        self.errno = err


class KVIntegrityError(KVDiskError):
    """KV read back from disk is not what kvdrive wrote (checksum mismatch, or a short read)."""


def _raw(t: torch.Tensor):
    """A numpy uint8 view of a contiguous CPU tensor (any dtype, bf16 included)."""
    return t.contiguous().view(torch.uint8).numpy()


def open_unlinked(directory: str, name: str) -> int:
    """The fd of a new 0600 file in ``directory`` that no directory entry names, so nothing of
    it outlives the process, however it ends (SIGKILL included).

    O_TMPFILE makes it nameless; where the filesystem lacks that, ``name`` is created in a
    private 0700 directory and both are removed at once.
    """
    if _O_TMPFILE:
        try:
            return os.open(directory, os.O_RDWR | _O_TMPFILE | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    private = tempfile.mkdtemp(prefix="kvdrive-", dir=directory)              # mode 0700
    try:
        path = os.path.join(private, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.unlink(path)
        return fd
    finally:
        os.rmdir(private)


def _errno_text(err: Optional[int], text: str) -> str:
    return f"{text} ({errno.errorcode[err]})" if err in errno.errorcode else text


def _digest(slot: int, k, v) -> int:
    """Slot ``slot``'s checksum: xxh3-64 of its V bytes, seeded by the xxh3-64 of its K bytes,
    seeded by the slot (two one-shot calls on buffers: cheaper than a streaming hasher)."""
    return xxhash.xxh3_64_intdigest(v, seed=xxhash.xxh3_64_intdigest(k, seed=slot))


def _preadv_all(fd: int, views: list, offset: int) -> int:
    """Fill ``views`` from ``offset`` (preadv may return less than asked); the bytes read,
    fewer than asked only where the file ends."""
    total, i = 0, 0
    while i < len(views):
        got = os.preadv(fd, views[i:], offset + total)
        if got == 0:
            break
        total += got
        while i < len(views) and got >= len(views[i]):
            got -= len(views[i])
            i += 1
        if got:
            views[i] = views[i][got:]
    return total


class DiskFile:
    """Slots in one file: slot ``i`` at byte ``i * slot_bytes``, K block then V block.

    The file is unlinked when it is made (its fd keeps it), so it never outlives the process.
    Each slot's checksum (xxh3-64 seeded by the slot) stays in memory, indexed by slot, is set
    when the slot is written and checked on every read: bytes changed on disk (flipped, zeroed,
    cut off, or another slot's) raise ``KVIntegrityError``, never wrong KV. Reads and writes
    go out as one request per run of consecutive slots, through ``submit`` (the I/O threads).
    """

    def __init__(self, directory: str, name: str, dtype: torch.dtype, block_size: int, head_dim: int,
                 submit: Submit):
        self.directory, self.path, self.dtype = directory, os.path.join(directory, name), dtype
        self.block_size, self.head_dim = block_size, head_dim
        self.slot_bytes = slot_bytes(block_size, head_dim, dtype)
        self.half = self.slot_bytes // 2
        self.submit = submit
        try:
            self.fd = open_unlinked(directory, name)
        except OSError as e:
            raise KVDiskError(
                f"cannot make a KV file in disk_dir '{directory}': {_errno_text(e.errno, e.strerror)}; pass "
                "options={'disk_dir': ...} with a writable directory that has room", e.errno) from e
        self.unlinked = f"the file was unlinked at creation: no name on disk, only fd {self.fd} of this process"
        self.checksums = np.zeros(0, np.uint64)            # [slots]: xxh3-64 of each slot
        self.layer_of = np.zeros(0, np.int32)              # [slots]: the layer that owns it
        self.capacity = 0
        self.free: list[int] = []
        self.lock = threading.Lock()
        self.busy = 0                                      # calls of _run_io using self.fd now
        self.idle = threading.Condition(self.lock)
        self.bytes_written = 0
        self.bytes_read = 0

    @property
    def used(self) -> int:
        return self.capacity - len(self.free)

    def alloc(self, n: int, layer: int) -> list[int]:
        """``n`` slots for ``layer``, consecutive where the file can give them, so one block is one request."""
        if len(self.free) >= n:
            self.free.sort(reverse=True)
            out = self.free[-n:][::-1]
            del self.free[-n:]
        else:
            out = list(range(self.capacity, self.capacity + n))
            self.capacity += n
            if self.capacity > len(self.checksums):
                grown = max(self.capacity, 2 * len(self.checksums), 64)
                self.checksums = np.concatenate([self.checksums, np.zeros(grown - len(self.checksums), np.uint64)])
                self.layer_of = np.concatenate([self.layer_of, np.full(grown - len(self.layer_of), -1, np.int32)])
        self.layer_of[out] = layer
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

    def _run_io(self, calls: list[tuple]) -> None:
        """Run each ``(fn, *args)`` as ``fn(fd, *args)``: one call in this thread, more on the
        I/O threads, all finished before the first error is raised (close waits for them: no
        request may reach the fd's number once it is closed and perhaps reused)."""
        with self.lock:
            if self.fd < 0:
                raise KVDiskError(f"{self.path} was closed: its session was released")
            fd = self.fd
            self.busy += 1
        try:
            # inline on an I/O thread too: a read the prefetch put on the pool must not wait for
            # the pool (four such reads at once would wait for each other forever)
            if len(calls) == 1 or threading.current_thread().name.startswith(IO_THREAD_PREFIX):
                for fn, *args in calls:
                    fn(fd, *args)
                return
            jobs = []
            try:
                for fn, *args in calls:
                    jobs.append(self.submit(fn, fd, *args))
            finally:
                errors = [e for e in (j.exception() for j in jobs) if e is not None]
            if errors:
                raise errors[0]
        finally:
            with self.lock:
                self.busy -= 1
                self.idle.notify_all()

    def write(self, slots: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: ``[len(slots), block_size, head_dim]`` (any device)."""
        buf = _raw(torch.stack([k.cpu(), v.cpu()], dim=1))              # [n, 2, bs, D] bytes
        buf = buf.reshape(len(slots), self.slot_bytes)
        self._run_io([(self._pwrite_all, first, buf[pos:pos + n]) for first, pos, n in self._runs(slots)])
        flat, sb, h = memoryview(buf.reshape(-1)), self.slot_bytes, self.half
        self.checksums[slots] = [_digest(slot, flat[i * sb:i * sb + h], flat[i * sb + h:(i + 1) * sb])
                                 for i, slot in enumerate(slots)]
        self.bytes_written += len(slots) * self.slot_bytes

    def _pwrite_all(self, fd: int, first: int, data) -> None:
        """Write ``data`` (whole slots from slot ``first``) in full: pwrite may write less than asked."""
        view = memoryview(data).cast("B")
        base, done = first * self.slot_bytes, 0
        while done < len(view):
            slot = first + done // self.slot_bytes
            try:
                n = os.pwrite(fd, view[done:], base + done)
            except OSError as e:
                raise self._write_error(slot, e.errno, _errno_text(e.errno, e.strerror)) from e
            if n == 0:
                raise self._write_error(slot, None, f"the disk took 0 of {len(view) - done} bytes")
            done += n

    def _write_error(self, slot: int, err: Optional[int], text: str) -> KVDiskError:
        if err == errno.ENOSPC:
            hint = (f"the disk under disk_dir '{self.directory}' is full: pass options={{'disk_dir': ...}} "
                    "with room, or raise host_memory so less KV goes to disk")
        elif err == errno.EFBIG:
            hint = "the file reached this process's file size limit (ulimit -f): raise it, or raise host_memory"
        else:
            hint = (f"check the disk under disk_dir '{self.directory}', or pass options={{'disk_dir': ...}} "
                    "on another disk")
        return KVDiskError(f"writing KV to {self.path} (slot {slot}, layer {self.layer_of[slot]}) failed: "
                           f"{text}; {hint}. This generation cannot continue ({self.unlinked})", err)

    def write_tokens(self, slot: int, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k, v: [n, head_dim]`` at token ``offset`` of ``slot`` (the open block on disk).

        The slot is read (and checked), patched and written whole with its new checksum: a rare
        path (the device and host budgets hold less than a block), correct before fast.
        """
        k_slot, v_slot = self.read([slot])                            # [1, bs, D] each
        n = k.shape[0]
        k_slot[0, offset:offset + n] = k
        v_slot[0, offset:offset + n] = v
        self.write([slot], k_slot, v_slot)

    def read(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``slots`` as contiguous host tensors ``[len(slots), block_size, head_dim]``,
        each slot checked against its checksum.

        One scattered read per run of consecutive slots: K halves land in ``k``, V halves in ``v``.
        """
        n = len(slots)
        k = torch.empty((n, self.block_size, self.head_dim), dtype=self.dtype)
        v = torch.empty_like(k)
        k_raw = k.view(torch.uint8).numpy().reshape(n, self.half)
        v_raw = v.view(torch.uint8).numpy().reshape(n, self.half)
        per_call = _IOV_MAX // 2
        calls = []
        for first, pos, count in self._runs(slots):
            for start in range(0, count, per_call):
                rows = slice(pos + start, pos + min(count, start + per_call))
                calls.append((self._read_checked, first + start, k_raw[rows], v_raw[rows]))
        self._run_io(calls)
        self.bytes_read += n * self.slot_bytes
        return k, v

    def _read_checked(self, fd: int, first: int, k_rows, v_rows) -> None:
        """Slots ``first, first + 1, ...`` into the rows of ``k_rows, v_rows: [m, half]`` bytes, checked."""
        m = len(k_rows)
        k_flat, v_flat, h = memoryview(k_rows.reshape(-1)), memoryview(v_rows.reshape(-1)), self.half
        views = [x for i in range(m) for x in (k_flat[i * h:(i + 1) * h], v_flat[i * h:(i + 1) * h])]
        want = m * self.slot_bytes
        got = _preadv_all(fd, list(views), first * self.slot_bytes)
        if got < want:
            raise self._integrity_error(
                first + got // self.slot_bytes, f"is cut short: the file ends {got} bytes into a {want}-byte read")
        expected = self.checksums[first:first + m].tolist()
        for i in range(m):
            if _digest(first + i, views[2 * i], views[2 * i + 1]) != expected[i]:
                raise self._integrity_error(first + i, "does not match what kvdrive wrote there (its checksum differs)")

    def _integrity_error(self, slot: int, what: str) -> KVIntegrityError:
        return KVIntegrityError(
            f"KV block read back from {self.path} (slot {slot}, layer {self.layer_of[slot]}) {what}: the "
            "file was changed, or the disk returned bad data. This generation cannot continue (its KV is "
            f"released). Check the disk under disk_dir '{self.directory}', or pass options={{'disk_dir': ...}} "
            f"on another disk, or raise host_memory so less KV goes to disk ({self.unlinked})")

    def close(self) -> None:
        """Close the fd (which frees the unlinked file) once no I/O is in flight on it."""
        with self.lock:
            fd, self.fd = self.fd, -1
            self.idle.wait_for(lambda: self.busy == 0)
        if fd >= 0:
            os.close(fd)
