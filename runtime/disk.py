"""The disk tier: KV slots in one unlinked file, read and written around the page cache.

A slot holds one KV block of one (sequence, KV head): K ``[block_size, head_dim]`` then V, at
byte ``slot * stride`` of the file. The file is opened O_DIRECT where its file system allows it
(every request then aligned: ``stride`` is the slot's size rounded up to ``align``, buffers are
aligned); elsewhere it is read and written through the page cache, dropped again after every
request (``posix_fadvise(DONTNEED)``). ``cache_bypass`` says which, and why.

Slots are handed out per (layer, KV-head row) in extents of consecutive slots, so a row's
successive blocks lie side by side and a run of them is one request. Reads and writes are cut
into requests (a run of adjacent slots, at most ``max_request`` bytes each) that several I/O
threads serve at once (``queue_depth``). Every job here can be run by whichever thread reaches it
first: the I/O thread it was queued on, or a thread that needs its outcome, so a thread never
blocks on a job no thread is running (an I/O thread may read, wait for a read, or wait for a
write, without deadlock).

Each slot's xxh3-64 checksum stays in memory, set from the bytes written and checked on every
read: bytes changed on disk raise ``KVIntegrityError``, never wrong KV.
"""
from __future__ import annotations

import copy
import errno
import fcntl
import heapq
import itertools
import os
import tempfile
import threading
import time
from concurrent.futures import Future
from typing import Callable, NoReturn, Optional, Sequence, Union

import numpy as np
import torch
import xxhash

IO_THREAD_PREFIX = "kvdrive-io"          # the runtime's I/O threads are named so

_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)          # Linux: a file that never has a name
_O_DIRECT = getattr(os, "O_DIRECT", 0)
MIN_ALIGN = 4096                                  # O_DIRECT alignment of offsets, lengths and buffers
MAX_ALIGN = 1 << 16

Submit = Callable[..., Future]                    # submit(fn, *args) on the I/O threads


class KVDiskError(RuntimeError):
    """The disk tier could not write or read a generation's KV; that generation cannot go on.
    ``errno`` is the OS error number where one caused it."""

    def __init__(self, message: str, err: Optional[int] = None):
        super().__init__(message)
        self.errno = err


class KVIntegrityError(KVDiskError):
    """KV read back from disk is not what kvdrive wrote (checksum mismatch, or a short read)."""


def raise_kept(error: BaseException) -> NoReturn:
    """Raise an error that something long-lived keeps (a file's failed background write, a
    future's outcome) as a new exception of its type and message, caused by it. Raising the kept
    one itself would add the raising thread's frames to its traceback, a generation's cache
    among them, and keep them as long as the error is kept: a file's error held the cache of
    the generation it ended, and so its KV, for good. Raised again, a copy is caused by the
    first error, which has the traceback of where it happened."""
    first = getattr(error, "_kvdrive_kept", error)
    try:
        again = copy.copy(error)
    except Exception:                    # noqa: BLE001 (a type that cannot be rebuilt from its args)
        again = RuntimeError(f"{type(error).__name__}: {error}")
    again._kvdrive_kept = first
    raise again.with_traceback(None) from first


def outcome(future: Future, timeout: Optional[float] = None):
    """``future.result(timeout)``, its exception raised anew (``raise_kept``): a future can
    outlive the step that waits for it. (Future's own methods: ``IOFuture.result`` is this.)"""
    error = Future.exception(future, timeout)
    if error is not None:
        raise_kept(error)
    return Future.result(future)


# -- files -----------------------------------------------------------------------------------

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


def _set_direct(fd: int) -> None:
    """Turn O_DIRECT on for ``fd``; OSError (EINVAL) where its file system refuses it."""
    if not _O_DIRECT:
        raise OSError(errno.EOPNOTSUPP, "this platform has no O_DIRECT")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | _O_DIRECT)


def fs_type(directory: str) -> str:
    """The type of the file system ``directory`` lies on (``/proc/self/mountinfo``), or "?"."""
    try:
        path = os.path.realpath(directory)
        best, kind = "", "?"
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                point = left.split()[4].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, right.split()[0]
        return kind
    except (OSError, IndexError):
        return "?"


def _alignment(fd: int) -> int:
    """Offsets, lengths and buffer addresses of O_DIRECT requests are multiples of this: the file
    system's block size, at least 4096 (and at most 64 KiB, beyond which 4096 is assumed)."""
    try:
        size = max(os.fstatvfs(fd).f_bsize, os.fstat(fd).st_blksize)
    except OSError:
        return MIN_ALIGN
    if size > MAX_ALIGN or size & (size - 1):
        return MIN_ALIGN
    return max(MIN_ALIGN, size)


def aligned_bytes(nbytes: int, align: int = MIN_ALIGN) -> np.ndarray:
    """An uninitialized ``uint8`` array of ``nbytes`` whose address is a multiple of ``align``."""
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes]


def aligned_empty(shape: Sequence[int], dtype: torch.dtype, align: int = MIN_ALIGN) -> torch.Tensor:
    """``torch.empty(shape, dtype)`` (CPU, contiguous) at an address that is a multiple of ``align``."""
    n = dtype.itemsize
    for x in shape:
        n *= x
    return torch.from_numpy(aligned_bytes(n, align)).view(dtype).reshape(tuple(shape))


_staging = threading.local()


def _staging_buffer(nbytes: int, align: int) -> np.ndarray:
    """This thread's aligned staging buffer, at least ``nbytes`` long (reused across requests)."""
    buf = getattr(_staging, "buf", None)
    if buf is None or len(buf) < nbytes or buf.ctypes.data % align:
        buf = _staging.buf = aligned_bytes(max(nbytes, 1 << 20), max(align, MIN_ALIGN))
    return buf[:nbytes]


def _errno_text(err: Optional[int], text: str) -> str:
    return f"{text} ({errno.errorcode[err]})" if err in errno.errorcode else text


def _digest(slot: int, k, v) -> int:
    """Slot ``slot``'s checksum: xxh3-64 of its V bytes, seeded by the xxh3-64 of its K bytes,
    seeded by the slot (two one-shot calls on buffers: cheaper than a streaming hasher)."""
    return xxhash.xxh3_64_intdigest(v, seed=xxhash.xxh3_64_intdigest(k, seed=slot))


def _preadv_all(fd: int, views: list, offset: int, size: int = -1) -> int:
    """Fill ``views`` (``size`` bytes in all, where known) from ``offset``: preadv may return less
    than asked. The bytes read, fewer than asked only where the file ends."""
    got = os.preadv(fd, views, offset)
    if got == size or got == 0:
        return got
    views = list(views)
    total, i = 0, 0
    while True:
        total += got
        while i < len(views) and got >= len(views[i]):
            got -= len(views[i])
            i += 1
        if i == len(views):
            return total
        if got:
            views[i] = views[i][got:]
        got = os.preadv(fd, views[i:], offset + total)
        if got == 0:
            return total


# -- jobs that whoever needs them runs -------------------------------------------------------

class _Task:
    """A job run by whichever thread reaches it first: the I/O thread it was queued on, or a
    thread that needs it done (``wait``), which so never waits for a job no thread runs."""

    __slots__ = ("fn", "started", "lock", "done")

    def __init__(self, fn: Callable[[], None]):
        self.fn, self.started = fn, False
        self.lock, self.done = threading.Lock(), threading.Event()

    def run(self) -> None:
        with self.lock:
            if self.started:
                return
            self.started = True
        try:
            self.fn()
        finally:
            self.done.set()

    def wait(self) -> None:
        self.run()
        self.done.wait()


class IOFuture(Future):
    """The outcome of one read or write. ``result()`` and ``exception()`` first run, in the
    calling thread, the jobs of it that no I/O thread has started yet: waiting for it never
    deadlocks, in an I/O thread included."""

    def __init__(self):
        super().__init__()
        self.tasks: list[_Task] = []

    def _help(self) -> None:
        if not self.done():                 # (done: its last job may still be on the stack here)
            for t in self.tasks:
                t.wait()

    def result(self, timeout=None):
        self._help()
        return outcome(self, timeout)

    def exception(self, timeout=None):
        self._help()
        return super().exception(timeout)


# -- the file --------------------------------------------------------------------------------

class DiskFile:
    """Slots in one file, unlinked when it is made (its fd keeps it): slot ``i`` at byte
    ``i * stride``, K block then V block (then zero padding up to ``stride``).

    ``alloc(layer, rows)`` gives one slot per KV-head row for a new block of ``layer``; each
    (layer, row) takes its slots from extents of ``extent_slots`` consecutive slots, so its
    blocks lie side by side. ``read``/``write`` are synchronous; ``read_async``/``write_async``
    return futures; reads of a slot wait for its writes in flight, writes for its reads and
    writes in flight. An asynchronous write that failed is raised by every later read, write
    and ``flush()`` of the file.

    ``bypass_cache``: O_DIRECT where the file system takes it, else buffered I/O with the
    written and read ranges dropped from the page cache after each request; False: plain
    buffered I/O (benchmarks). ``direct`` and ``cache_bypass`` say what was done.
    """

    def __init__(self, directory: str, name: str, dtype: torch.dtype, block_size: int, head_dim: int,
                 submit: Submit, *, bypass_cache: bool = True, queue_depth: int = 4,
                 extent_slots: int = 16, max_request: int = 1 << 20, read_into_rows: Optional[bool] = None):
        self.directory, self.path, self.dtype = directory, os.path.join(directory, name), dtype
        self.block_size, self.head_dim = block_size, head_dim
        self.half = block_size * head_dim * torch.empty((), dtype=dtype).element_size()
        self.slot_bytes = 2 * self.half                     # the payload of a slot: K then V
        self.submit = submit
        self.queue_depth = max(1, queue_depth)
        # on_request(kind, t0, t1, bytes, layer) after each request ("disk_read"/"disk_write"; layer:
        # what the caller tagged the read or write with, or None): the timeline
        self.on_request: Optional[Callable[[str, float, float, int, Optional[int]], None]] = None
        try:
            self.fd = open_unlinked(directory, name)
        except OSError as e:
            raise KVDiskError(
                f"cannot make a KV file in disk_dir '{directory}': {_errno_text(e.errno, e.strerror)}; pass "
                "options={'disk_dir': ...} with a writable directory that has room", e.errno) from e
        self.unlinked = f"the file was unlinked at creation: no name on disk, only fd {self.fd} of this process"
        self.fs_type = fs_type(directory)
        self.direct, self.fadvise = False, bypass_cache
        if not bypass_cache:
            self.cache_bypass = "none (page cache; bypass_cache=False)"
        else:
            try:
                _set_direct(self.fd)
                self.direct = True
                self.cache_bypass = "O_DIRECT" + (" (tmpfs: the file is memory)" if self.fs_type == "tmpfs" else "")
            except OSError as e:
                self.cache_bypass = (f"fadvise DONTNEED (O_DIRECT refused on {self.fs_type}: "
                                     f"{errno.errorcode.get(e.errno, e.errno)})")
        self.align = _alignment(self.fd) if self.direct else 1
        self.stride = -(-self.slot_bytes // self.align) * self.align     # bytes per slot on disk
        # reads go straight into the rows of k and v where each half is a whole number of
        # aligned blocks (always, without O_DIRECT); else through an aligned staging buffer
        can_split = not self.direct or (self.half % self.align == 0 and self.stride == self.slot_bytes)
        self.read_into_rows = can_split if read_into_rows is None else (read_into_rows and can_split)
        self.max_slots = max(1, max_request // self.stride)             # slots per request
        if self.read_into_rows:
            self.max_slots = min(self.max_slots, _IOV_MAX // 2)
        self._bfd = -1                                     # the same file without O_DIRECT (lazily)

        self.extent_slots = extent_slots
        self.checksums = np.zeros(0, np.uint64)            # [slots]: xxh3-64 of each slot
        self.layer_of = np.zeros(0, np.int32)              # [slots]: the layer that owns it
        self.capacity = 0                                  # slots the extents span
        self._used = 0
        self._owner: list[Optional[tuple]] = []            # [extent]: the (layer, row) it serves
        self._ext_free: list[set] = []                     # [extent]: its free slots
        self._key_exts: dict[tuple, set] = {}              # (layer, row) -> its extents with free slots
        self._free_exts: list[int] = []                    # heap of unowned, wholly free extents
        self._last: dict[tuple, int] = {}                  # (layer, row) -> the slot it took last

        self.slot_lock = threading.Lock()                  # extents, and growing checksums/layer_of
        self.lock = threading.Lock()
        self.busy = 0                                      # requests using self.fd now
        self.idle = threading.Condition(self.lock)
        self.pending: dict[int, IOFuture] = {}             # slot -> the last write of it in flight
        self.reading: dict[int, list[IOFuture]] = {}       # slot -> the reads of it in flight
        self.writes: set[IOFuture] = set()                 # asynchronous writes in flight
        self.reads_in_flight = 0
        self._deferred: list[int] = []                     # released while reads were in flight
        self.error: Optional[BaseException] = None         # the first failed asynchronous write
        self.read_requests = self.write_requests = 0
        self.bytes_read = self.bytes_written = 0

    # -- slots -------------------------------------------------------------------------------

    @property
    def used(self) -> int:
        return self._used

    def offset(self, slot: int) -> int:
        """Where slot ``slot`` starts in the file."""
        return slot * self.stride

    def alloc(self, layer: int, rows: Union[int, Sequence[int]]) -> list[int]:
        """One slot for each KV-head row of a new block of ``layer``: rows ``0 .. rows-1`` (an
        int), or the rows listed (a block whose other rows live elsewhere), in that order. A
        (layer, row)'s successive blocks get consecutive slots where its extent has room; freed
        slots are reused."""
        rows = range(rows) if isinstance(rows, int) else [int(r) for r in rows]
        with self.slot_lock:
            out = [self._alloc_one((layer, r)) for r in rows]
            self.layer_of[out] = layer
            self._used += len(out)
        return out

    def _alloc_one(self, key: tuple) -> int:
        e_size, last = self.extent_slots, self._last.get(key)
        if last is not None and (last + 1) % e_size:                # the next slot of its extent
            e = (last + 1) // e_size
            if self._owner[e] == key and last + 1 in self._ext_free[e]:
                return self._take(key, e, last + 1)
        exts = self._key_exts.get(key)
        if exts:
            e = min(exts)
            return self._take(key, e, min(self._ext_free[e]))
        if self._free_exts:
            e = heapq.heappop(self._free_exts)
        else:
            e = len(self._owner)
            self._owner.append(None)
            self._ext_free.append(set())
            self.capacity += e_size
            if self.capacity > len(self.checksums):
                grown = max(self.capacity, 2 * len(self.checksums), 64)
                self.checksums = np.concatenate([self.checksums, np.zeros(grown - len(self.checksums), np.uint64)])
                self.layer_of = np.concatenate([self.layer_of, np.full(grown - len(self.layer_of), -1, np.int32)])
        self._owner[e] = key
        self._ext_free[e] = set(range(e * e_size, (e + 1) * e_size))
        self._key_exts.setdefault(key, set()).add(e)
        return self._take(key, e, e * e_size)

    def _take(self, key: tuple, e: int, slot: int) -> int:
        free = self._ext_free[e]
        free.remove(slot)
        if not free:
            self._key_exts[key].discard(e)
        self._last[key] = slot
        return slot

    def release(self, slots: Sequence[int]) -> None:
        """Give ``slots`` back (reused once no read that started before is in flight)."""
        with self.lock:
            if self.reads_in_flight:
                self._deferred.extend(slots)
                return
        self._free(slots)

    def _free(self, slots: Sequence[int]) -> None:
        with self.slot_lock:
            self._free_locked(slots)

    def _free_locked(self, slots: Sequence[int]) -> None:
        e_size = self.extent_slots
        for s in slots:
            e = s // e_size
            free, key = self._ext_free[e], self._owner[e]
            assert key is not None and s not in free, f"slot {s} released twice"
            free.add(s)
            if len(free) == e_size:                          # wholly free: any row may take it
                self._owner[e] = None
                self._key_exts[key].discard(e)
                heapq.heappush(self._free_exts, e)
            else:
                self._key_exts[key].add(e)
        self._used -= len(slots)

    # -- running requests ----------------------------------------------------------------------

    def _enter(self) -> int:
        with self.lock:
            if self.fd < 0:
                raise KVDiskError(f"{self.path} was closed: its session was released")
            self.busy += 1
            return self.fd

    def _leave(self, read: bool, nbytes: int) -> None:
        with self.lock:
            self.busy -= 1
            if read:
                self.read_requests += 1
                self.bytes_read += nbytes
            else:
                self.write_requests += 1
                self.bytes_written += nbytes
            if self.fd < 0:
                self.idle.notify_all()

    def buffered_fd(self) -> int:
        """An fd on the same file without O_DIRECT (unaligned requests: a write the kernel cut
        short, tools, tests); ``self.fd`` itself where the file is not O_DIRECT. Buffered and
        direct requests on one file see each other's bytes (the kernel writes back and drops
        the cached range around each direct request)."""
        if not self.direct:
            return self.fd
        with self.lock:
            if self.fd < 0:
                raise KVDiskError(f"{self.path} was closed: its session was released")
            if self._bfd < 0:
                self._bfd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
            return self._bfd

    def _check(self) -> None:
        if self.error is not None:
            raise_kept(self.error)

    def _spawn(self, task: _Task) -> None:
        try:
            self.submit(task.run)
        except RuntimeError:                  # a pool that was shut down: run it here
            task.run()

    def _start(self, op: IOFuture, chunks: list, do_chunk: Callable, finish: Callable, inline: bool,
               layer: Optional[int] = None) -> IOFuture:
        """Run ``do_chunk(*chunk)`` for each chunk on up to ``queue_depth`` jobs at once, each taking
        the next chunk not yet taken; when all ran, ``finish(first error or None)`` gives the
        result of ``op`` (or raises its exception). ``inline``: the calling thread runs the first
        job and helps with the rest (a synchronous call). Each request is reported to
        ``on_request``, tagged with ``layer``."""
        taken, errors = itertools.count(), []
        kind = "disk_read" if do_chunk == self._read_chunk else "disk_write"
        left = [min(self.queue_depth, len(chunks))]
        guard = threading.Lock()

        def request(chunk) -> None:
            t0 = time.perf_counter()
            try:
                do_chunk(*chunk)
            finally:
                if self.on_request is not None:
                    self.on_request(kind, t0, time.perf_counter(), len(chunk[1]) * self.stride, layer)

        def job():
            try:
                while not errors:
                    i = next(taken)
                    if i >= len(chunks):
                        break
                    try:
                        request(chunks[i])
                    except BaseException as e:
                        errors.append(e)
            finally:
                with guard:
                    left[0] -= 1
                    last = left[0] == 0
                if last:
                    try:
                        value = finish(errors[0] if errors else None)
                    except BaseException as e:
                        op.set_exception(e)
                    else:
                        op.set_result(value)

        if not chunks or (len(chunks) == 1 and inline):   # no request, or one asked for here: no jobs
            try:
                for c in chunks:
                    request(c)
            except BaseException as e:
                errors.append(e)
            try:
                op.set_result(finish(errors[0] if errors else None))
            except BaseException as e:
                op.set_exception(e)
            return op
        op.tasks = [_Task(job) for _ in range(left[0])]
        for t in op.tasks[1:] if inline else op.tasks:
            self._spawn(t)
        if inline:
            op.tasks[0].run()
        return op

    def _chunks(self, slots: Sequence[int]):
        """The sorted slots as (first slot, positions in ``slots``) per request: runs of
        consecutive slots, at most ``max_slots`` each."""
        if len(slots) <= 2:                              # the common tiny reads, without numpy
            pos = np.arange(len(slots))
            if len(slots) == 2 and slots[0] + 1 == slots[1] and self.max_slots > 1:
                return [(int(slots[0]), pos)], np.asarray(slots, np.int64)
            order = pos[::-1] if len(slots) == 2 and slots[1] < slots[0] else pos
            return [(int(slots[i]), order[j:j + 1]) for j, i in enumerate(order.tolist())], \
                np.asarray(slots, np.int64)[order]
        arr = np.asarray(slots, np.int64).reshape(-1)
        order = np.argsort(arr, kind="stable")
        srt = arr[order]
        cuts = np.flatnonzero(np.diff(srt) != 1) + 1
        out = []
        for a, b in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [len(srt)]]).tolist()):
            for s in range(a, b, self.max_slots):
                e = min(b, s + self.max_slots)
                out.append((int(srt[s]), order[s:e]))
        return out, srt

    def _deps(self, first: int, m: int, reads: bool = False) -> list:
        """The writes in flight of slots ``first .. first+m-1``, and with ``reads`` their reads
        in flight too (call with the lock held): a read waits for the writes issued before it,
        a write for the reads and writes issued before it (else a read could get some of the
        new bytes and check them against the old checksum, or the reverse)."""
        ops = {id(op): op for s in range(first, first + m) if (op := self.pending.get(s)) is not None} \
            if self.pending else {}
        if reads and self.reading:
            ops.update((id(op), op) for s in range(first, first + m) for op in self.reading.get(s, ()))
        return list(ops.values())

    # -- writes --------------------------------------------------------------------------------

    def write(self, slots: Sequence[int], k: torch.Tensor, v: torch.Tensor, layer: Optional[int] = None) -> None:
        """Write ``k, v: [len(slots), block_size, head_dim]`` (any device) to ``slots``; returns
        once every byte is on the file (or raises ``KVDiskError``)."""
        self._write(slots, k, v, inline=True, layer=layer).result()

    def write_async(self, slots: Sequence[int], k: torch.Tensor, v: torch.Tensor, layer: Optional[int] = None) -> IOFuture:
        """``write`` on the I/O threads: k and v are copied to host memory first (the caller may
        reuse them at once); the future resolves to None once written. Reads of these slots wait
        for it; if it fails, the error is also raised by the file's next read, write or flush."""
        return self._write(slots, k, v, inline=False, layer=layer)

    def _write(self, slots, k, v, inline: bool, layer: Optional[int] = None) -> IOFuture:
        self._check()
        n = len(slots)
        if n == 0:
            op = IOFuture()
            op.set_result(None)
            return op
        chunks, srt = self._chunks(slots)
        if n > 1 and (srt[1:] == srt[:-1]).any():
            raise ValueError("a write names a slot twice")
        buf = aligned_bytes(n * self.stride, max(self.align, 64)).reshape(n, self.stride)
        tb, h = torch.from_numpy(buf), self.half
        kk, vv = k.reshape(n, -1), v.reshape(n, -1)
        if n > 1 and (np.diff(np.asarray(slots, np.int64)) < 0).any():     # not sorted: rows in slot order
            idx = torch.from_numpy(np.argsort(np.asarray(slots, np.int64), kind="stable")).to(k.device)
            kk, vv = kk[idx], vv[idx]
        tb[:, :h].view(self.dtype).copy_(kk)
        tb[:, h:2 * h].view(self.dtype).copy_(vv)
        if self.stride > self.slot_bytes:
            buf[:, self.slot_bytes:] = 0
        op = IOFuture()
        work, at = [], 0
        with self.lock:
            for first, pos in chunks:
                m = len(pos)
                work.append((first, buf[at:at + m], self._deps(first, m, reads=True)))
                at += m
            for s in srt.tolist():
                self.pending[s] = op
            if not inline:
                self.writes.add(op)

        def finish(error):
            with self.lock:
                for s in srt.tolist():
                    if self.pending.get(s) is op:
                        del self.pending[s]
                self.writes.discard(op)
                if error is not None and not inline and self.error is None:
                    self.error = error
            if error is not None:
                raise error

        return self._start(op, work, self._write_chunk, finish, inline, layer)

    def _write_chunk(self, first: int, rows: np.ndarray, deps: list) -> None:
        """Slots ``first ..`` from ``rows: [m, stride]`` bytes, after the earlier writes of them."""
        for d in deps:
            d.exception()
        m = len(rows)
        fd = self._enter()
        try:
            self._pwrite_all(fd, first, rows)
            if self.fadvise and not self.direct:
                os.posix_fadvise(fd, first * self.stride, m * self.stride, os.POSIX_FADV_DONTNEED)
        finally:
            self._leave(False, m * self.stride)
        h, sb, stride = self.half, self.slot_bytes, self.stride
        flat = memoryview(rows.reshape(-1))
        sums = [_digest(first + i, flat[i * stride:i * stride + h], flat[i * stride + h:i * stride + sb])
                for i in range(m)]
        with self.slot_lock:                      # not into an array alloc is replacing
            self.checksums[first:first + m] = sums

    def _pwrite_all(self, fd: int, first: int, data) -> None:
        """Write ``data`` (whole slots from slot ``first``) in full: pwrite may write less than
        asked. A direct write the kernel refuses as unaligned (EINVAL: it was cut short at the
        file size limit, say) goes on through the buffered fd, which reports the real cause."""
        view = memoryview(data).cast("B")
        base, done = first * self.stride, 0
        while done < len(view):
            slot = first + done // self.stride
            try:
                n = os.pwrite(fd, view[done:], base + done)
            except OSError as e:
                if e.errno == errno.EINVAL and self.direct and fd != self._bfd:
                    try:
                        fd = self.buffered_fd()
                    except OSError:
                        pass
                    else:
                        continue
                raise self._write_error(slot, e.errno, _errno_text(e.errno, e.strerror)) from e
            if n == 0:
                raise self._write_error(slot, None, f"the disk took 0 of {len(view) - done} bytes")
            done += n
        if fd == self._bfd and self.fadvise:
            os.posix_fadvise(fd, base, len(view), os.POSIX_FADV_DONTNEED)

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
        layer = int(self.layer_of[slot])
        k_slot, v_slot = self.read([slot], layer)                     # [1, bs, D] each
        n = k.shape[0]
        k_slot[0, offset:offset + n] = k
        v_slot[0, offset:offset + n] = v
        self.write([slot], k_slot, v_slot, layer)

    def flush(self) -> None:
        """Wait for every asynchronous write in flight; raise the first that failed."""
        with self.lock:
            ops = list(self.writes)
        for op in ops:
            op.exception()
        self._check()

    # -- reads ---------------------------------------------------------------------------------

    def read(self, slots: Sequence[int], layer: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``slots`` (any order, in that order) as contiguous host tensors
        ``[len(slots), block_size, head_dim]``, each slot checked against its checksum."""
        return self._read(slots, inline=True, layer=layer).result()

    def read_async(self, slots: Sequence[int], layer: Optional[int] = None) -> IOFuture:
        """``read`` on the I/O threads: a future of ``(k, v)``. Its requests are separate jobs
        (up to ``queue_depth`` at once); no I/O thread waits on another's job."""
        return self._read(slots, inline=False, layer=layer)

    def _read(self, slots, inline: bool, layer: Optional[int] = None) -> IOFuture:
        self._check()
        n = len(slots)
        chunks, srt = self._chunks(slots)
        if n > 1 and (srt[1:] == srt[:-1]).any():               # a slot twice: read it once
            uniq, inverse = np.unique(np.asarray(slots, np.int64), return_inverse=True)
            inner = self._read(uniq.tolist(), inline, layer)
            op = IOFuture()
            op.tasks = inner.tasks
            idx = torch.from_numpy(inverse.reshape(-1))

            def done(f):
                if f.exception() is not None:
                    op.set_exception(f.exception())
                else:
                    k, v = f.result()
                    op.set_result((k[idx], v[idx]))
            inner.add_done_callback(done)
            return op
        shape = (n, self.block_size, self.head_dim)
        if self.direct and self.read_into_rows:         # requests land in k and v: aligned
            k, v = aligned_empty(shape, self.dtype, self.align), aligned_empty(shape, self.dtype, self.align)
        else:
            k, v = torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)
        k_rows = k.view(torch.uint8).numpy().reshape(n, self.half)
        v_rows = v.view(torch.uint8).numpy().reshape(n, self.half)
        out = (memoryview(k_rows.reshape(-1)), memoryview(v_rows.reshape(-1)), k_rows, v_rows)
        op = IOFuture()
        with self.lock:
            work = [(first, pos, self._deps(first, len(pos)), out) for first, pos in chunks]
            self.reads_in_flight += 1
            for s in srt.tolist():
                self.reading.setdefault(s, []).append(op)

        def finish(error):
            with self.lock:
                self.reads_in_flight -= 1
                for s in srt.tolist():
                    ops = self.reading[s]
                    ops.remove(op)
                    if not ops:
                        del self.reading[s]
                freed, self._deferred = (self._deferred, []) if not self.reads_in_flight else ([], self._deferred)
            if freed:
                self._free(freed)
            if error is not None:
                raise error
            return k, v

        return self._start(op, work, self._read_chunk, finish, inline, layer)

    def _read_chunk(self, first: int, pos: np.ndarray, deps: list, out: tuple) -> None:
        """Slots ``first ..`` into rows ``pos`` of k and v, checked; after their writes in flight.
        ``out``: flat memoryviews of k's and v's bytes, and ``[n, half]`` arrays of them."""
        for d in deps:
            d.exception()
        if self.error is not None:
            raise_kept(self.error)
        m, h, sb, stride = len(pos), self.half, self.slot_bytes, self.stride
        k_flat, v_flat, k_rows, v_rows = out
        want, offset, got = (m - 1) * stride + sb, first * stride, 0
        fd = self._enter()
        try:
            if self.read_into_rows:                             # stride == slot_bytes here
                views = [x for r in pos.tolist() for x in (k_flat[r * h:(r + 1) * h], v_flat[r * h:(r + 1) * h])]
                size = m * sb
                got = _preadv_all(fd, views, offset, size)
            else:
                size = m * stride
                stage = _staging_buffer(size, self.align)
                got = _preadv_all(fd, [stage], offset, size)
                flat = memoryview(stage)
                views = [x for i in range(m)
                         for x in (flat[i * stride:i * stride + h], flat[i * stride + h:i * stride + sb])]
            if self.fadvise and not self.direct:
                os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise KVDiskError(
                f"reading KV from {self.path} (slot {first}, layer {self.layer_of[first]}) failed: "
                f"{_errno_text(e.errno, e.strerror)}; check the disk under disk_dir '{self.directory}', or pass "
                f"options={{'disk_dir': ...}} on another disk. This generation cannot continue ({self.unlinked})",
                e.errno) from e
        finally:
            self._leave(True, got)
        if got < want:
            raise self._integrity_error(
                first + got // stride, f"is cut short: the file ends {got} bytes into a {want}-byte read")
        expected = self.checksums[first:first + m].tolist()
        for i in range(m):
            if _digest(first + i, views[2 * i], views[2 * i + 1]) != expected[i]:
                raise self._integrity_error(first + i, "does not match what kvdrive wrote there (its checksum differs)")
        if not self.read_into_rows:
            st = stage.reshape(m, stride)
            if m == 1 or (np.diff(pos) == 1).all():
                r = int(pos[0])
                k_rows[r:r + m] = st[:, :h]
                v_rows[r:r + m] = st[:, h:sb]
            else:
                k_rows[pos] = st[:, :h]
                v_rows[pos] = st[:, h:sb]

    def _integrity_error(self, slot: int, what: str) -> KVIntegrityError:
        return KVIntegrityError(
            f"KV block read back from {self.path} (slot {slot}, layer {self.layer_of[slot]}) {what}: the "
            "file was changed, or the disk returned bad data. This generation cannot continue (its KV is "
            f"released). Check the disk under disk_dir '{self.directory}', or pass options={{'disk_dir': ...}} "
            f"on another disk, or raise host_memory so less KV goes to disk ({self.unlinked})")

    # -- the end -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the fd (which frees the unlinked file) once no request is running on it; jobs
        not started yet fail ("was closed")."""
        with self.lock:
            fd, self.fd = self.fd, -1
            bfd, self._bfd = self._bfd, -1
            self.idle.wait_for(lambda: self.busy == 0)
        for x in (bfd, fd):
            if x >= 0:
                os.close(x)
