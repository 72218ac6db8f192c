"""The KV runtime: sessions of paged KV, the three tiers' stores (device and host block pools
within their byte budgets, a disk file per session) and the counters a user reads.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import logging
import os
import tempfile
import threading
import time
import types
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from . import layer_kv, placement
from ..kernels import block_scores
from ..kernels.numba_math import concurrent_launch_safe
from .disk import IO_THREAD_PREFIX, DiskFile, KVDiskError
from .layer_kv import LayerKV
from .placement import CACHE_POLICIES, DEFAULT_REUSE_WINDOW
from .standins import StandIns
from .stats import RuntimeStats, TierStats
from .tiers import BlockPool, Tier, TierBudget, slot_bytes
from .trace import tracer_for

if TYPE_CHECKING:
    from .site_step import Plan

log = logging.getLogger(__name__)

# wall time per stage of the scheduled graph on the calling thread: the step's critical path
# (CUDA work is asynchronous: device stages are counted where they block). ``cpu_attention``
# is the time the merge waited for the CPU part (all of it when it ran inline).
STAGES = ("append", "select", "prefetch", "io_wait", "cpu_attention", "device_attention", "merge", "write_home")
# time spent off the critical path, on the CPU-attention worker (its own io_wait included in
# cpu_attention there) and the I/O threads: overlapped with the stages above
BACKGROUND = ("cpu_attention", "io_wait", "disk_read", "disk_write")
CPU_WORKER_PREFIX = "kvdrive-cpu-attention"


@dataclass
class Session:
    """The KV of one generation: one ``LayerKV`` per attention layer, and its disk files."""

    id: int
    layers: dict[int, LayerKV] = field(default_factory=dict)
    disk_files: dict[tuple, DiskFile] = field(default_factory=dict)
    plans: dict[int, Plan] = field(default_factory=dict)
    sites: int = 1                     # attention layers of the model (the graph says; at least)
    step: int = 0                      # the runtime's number of this session's current step (forward call)
    phase: str = "prefill"             # this step's: "prefill" (no cached KV before it) or "decode"
    typical_demand: int = 0            # entries a ranked layer selects per step (for layers not seen yet)
    closed: bool = False


_kernel_loading: list[threading.Thread] = []
_kernel_loading_lock = threading.Lock()


def load_kernels_in_background() -> threading.Thread:
    """Once per process, load the numba kernels that only decode steps run (block ranking, the
    tier split) on a thread of their own: a prefill (seconds to minutes at long contexts) hides
    it, where the first decode step that ranks blocks waited for it (~0.15-0.6 s). A call that
    needs one meanwhile waits for numba's compiler lock, as it would have anyway. Not a daemon:
    a process that ends sooner waits for it (at most one compile, where numba has no cache yet)
    instead of being torn down inside LLVM."""
    with _kernel_loading_lock:
        if not _kernel_loading:
            t = threading.Thread(target=_load_kernels, name="kvdrive-kernel-load", daemon=False)
            t.start()
            _kernel_loading.append(t)
        return _kernel_loading[0]


def _load_kernels() -> None:
    try:
        block_scores.load_kernel()
        layer_kv.load_kernel()
        placement.load_kernels()
    except Exception:                     # noqa: BLE001 (the decode step loads them itself, and says why)
        log.debug("kvdrive: loading the decode kernels ahead failed", exc_info=True)


class KVRuntime:
    """Owns KV data: sessions, tier budgets, memory pools and disk files, and the counters.
    Where blocks go is ``placement``'s job; a step is ``site_step``'s."""

    def __init__(self, block_size: int = 16, device_memory: Optional[int] = None,
                 host_memory: Optional[int] = None, disk_dir: Optional[str] = None,
                 io_threads: int = 4, cache_policy: str = "attention",
                 reuse_window: int = DEFAULT_REUSE_WINDOW, trace: Optional[str] = None,
                 async_cpu: Optional[bool] = None, ahead_reads: bool = True):
        if cache_policy not in CACHE_POLICIES:
            raise ValueError(f"cache_policy {cache_policy!r}: choose one of {list(CACHE_POLICIES)}")
        self.block_size = block_size
        self.budgets = {Tier.DEVICE: TierBudget("device", device_memory),
                        Tier.HOST: TierBudget("host", host_memory)}
        self.device_home = device_memory is None          # no device budget: the device is every block's home
        self.device_cache = device_memory is not None and device_memory > 0
        self.cache_policy, self.reuse_window = cache_policy, reuse_window
        self._disk_parent = disk_dir
        self.pools: dict[tuple, BlockPool] = {}
        self.sessions: dict[int, Session] = {}
        self.io_threads = io_threads
        self.io_pool = ThreadPoolExecutor(io_threads, thread_name_prefix=IO_THREAD_PREFIX)
        # the CPU part of a step's attention runs on a worker while the calling thread goes on to
        # the device part (the numba kernel releases the GIL). None: where the device part runs on
        # a GPU (on a CPU-only machine both parts compete for the same cores: measured 1.3x slower
        # per step on the disk preset, README); True: always; False: never. Never where numba's
        # threading layer cannot take two launches at once.
        self.async_cpu = async_cpu if concurrent_launch_safe() else False
        self.ahead_reads = ahead_reads                      # prefetch_ahead reads (prefetch_depth > 0)
        self.cpu_worker: Optional[ThreadPoolExecutor] = None
        self.tracer = tracer_for(trace)
        load_kernels_in_background()
        self._io_lock = threading.Lock()
        self.lock = threading.RLock()
        # notified (under the lock) whenever device room may have come free: a step's plan
        # unpinned its blocks, a session was released. A step short of room waits on it, which
        # lets go of the lock: the other thread's step can then reach its merge
        self.room = threading.Condition(self.lock)
        self._ids = itertools.count(1)
        self.disk_bypass = ""                               # how the last disk file avoids the page cache
        self.host_homes = 0                                 # host slots holding homes (the rest: copies)
        self.moved = {"device->host": 0, "host->disk": 0, "disk->host": 0, "host->device": 0}
        self.selected_blocks = {"device": 0, "host": 0, "disk": 0}
        self.rankings = {"scored": 0, "kept": 0}           # (row, step)s ranked afresh / by a kept ranking
        self.served = {"device": 0, "host": 0, "disk": 0}
        self.admitted = {"device": 0, "host": 0}
        self.evicted = {"device": 0, "host": 0}
        self.cropped_tokens = 0                             # layer tokens forgotten by crops (speculative decoding)
        self.admission = None                               # placement.AdmissionModel, at the first decode step
        self.stage_seconds = {s: 0.0 for s in STAGES}
        self.background_seconds = {s: 0.0 for s in BACKGROUND}
        # disk misses of decode steps by whether an ahead-of-need read had them: "landed" (read
        # before the step asked), "in_flight" (asked while being read), "missed"; "unused": blocks
        # read ahead that the step did not select (bandwidth spent on a wrong prediction)
        self.prefetch = {"landed": 0, "in_flight": 0, "missed": 0, "unused": 0}
        self._stat_lock = threading.Lock()
        self.sessions_closed = 0
        self.steps = 0
        self.standins = StandIns(self.release, self.lock)
        self.layer_names: dict[int, str] = {}        # layer number -> the module path it was found at
        atexit.register(self.close)

    def layer_label(self, layer: int) -> str:
        """``layer 3 (model.layers.3.self_attn)``: for messages (the numbers run on across the
        models that share this runtime's options)."""
        name = self.layer_names.get(layer)
        return f"layer {layer}" + (f" ({name})" if name else "")

    @contextlib.contextmanager
    def timed(self, stage: str, session_id: Optional[int] = None, layer: Optional[int] = None,
              event: Optional[str] = None):
        """Time a stage (and put it on the timeline, as ``event`` if given); if it fails, release
        the session's KV (blocks, files, plans) before the error leaves, so a failed generation
        holds nothing after its error. Yields the span: a stage that learns its session inside
        (opening a step) sets ``span.session_id``; ``span.args`` go on its event."""
        t0 = time.perf_counter()
        span = types.SimpleNamespace(session_id=session_id, args={})
        try:
            yield span
        except BaseException:
            if span.session_id is not None:
                self.release(span.session_id)
            raise
        finally:
            t1 = time.perf_counter()
            self.add_seconds(stage, t1 - t0)
            if self.tracer.enabled:
                self.trace(event or stage, t0, t1, span.session_id, layer, **span.args)

    def add_seconds(self, stage: str, seconds: float, background: bool = False) -> None:
        """Count ``seconds`` of ``stage``: on the critical path, or in the background (the
        CPU-attention worker, the I/O threads)."""
        with self._stat_lock:
            counters = self.background_seconds if background else self.stage_seconds
            counters[stage] = counters.get(stage, 0.0) + seconds

    def trace(self, name: str, t0: float, t1: float, session_id: Optional[int] = None,
              layer: Optional[int] = None, **args) -> None:
        """One event on the timeline, on the calling thread, tagged with its session's step."""
        session = self.sessions.get(session_id) if session_id is not None else None
        if session is not None:
            args.update(session=session_id, step=session.step, phase=session.phase)
        if layer is not None:
            args["layer"] = layer
        self.tracer.complete(name, t0, t1, **args)

    def _on_disk_request(self, session_id: int, kind: str, t0: float, t1: float, nbytes: int,
                         layer: Optional[int] = None) -> None:
        self.add_seconds(kind, t1 - t0, background=True)
        if kind == "disk_read" and self.admission is not None:
            self.admission.measured("disk_read", nbytes, t1 - t0)
        if self.tracer.enabled:
            self.trace(kind, t0, t1, session_id, layer, bytes=nbytes)

    def submit_cpu(self, fn, *args) -> Future:
        """``fn(*args)`` on the CPU-attention worker (one thread: a step's CPU parts run in
        layer order while the calling thread goes on)."""
        with self._io_lock:
            if self.cpu_worker is None:
                self.cpu_worker = ThreadPoolExecutor(1, thread_name_prefix=CPU_WORKER_PREFIX)
            try:
                return self.cpu_worker.submit(fn, *args)
            except RuntimeError:                          # shut down: replace it
                self.cpu_worker = ThreadPoolExecutor(1, thread_name_prefix=CPU_WORKER_PREFIX)
                return self.cpu_worker.submit(fn, *args)

    # -- sessions --------------------------------------------------------------------------

    def open_session(self, sites: int = 1) -> Session:
        with self.lock:
            session = Session(next(self._ids), sites=max(1, sites))
            self.sessions[session.id] = session
            return session

    def session(self, session_id: int) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.closed:
            raise RuntimeError(
                f"kvdrive session {session_id} was released; its KV is gone. Start a new generation "
                "(a fresh cache) instead of reusing a released one.")
        return session

    def layer(self, session: Session, layer: int, like: torch.Tensor, keeps_last: bool) -> LayerKV:
        """The session's KV of ``layer``, created to match ``like: [B, Hkv, n, D]``."""
        kv = session.layers.get(layer)
        if kv is None:
            b, hkv, _, d = like.shape
            kv = LayerKV(session.id, layer, b, hkv, d, like.dtype, self.block_size, like.device, keeps_last)
            session.layers[layer] = kv
            session.sites = max(session.sites, len(session.layers))
        elif (kv.batch, kv.kv_heads, kv.head_dim, kv.dtype) != (like.shape[0], like.shape[1], like.shape[3], like.dtype):
            raise RuntimeError(
                f"layer {layer}: new keys {tuple(like.shape)} {like.dtype} do not match the cached "
                f"[{kv.batch}, {kv.kv_heads}, *, {kv.head_dim}] {kv.dtype}; a cache is bound to one batch")
        return kv

    def sweep(self) -> None:
        """Release the sessions whose stand-ins are all gone (their cache was dropped)."""
        with self.lock:
            self.standins.settle()
            for sid in self.standins.sessions():
                if not self.standins.prune(sid):
                    self.release(sid)

    def release(self, session_id: int) -> None:
        """Free every block of a session and remove its disk files."""
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None or session.closed:
                return
            for kv in session.layers.values():
                kv.fresh = None
                placement.free(self, kv, np.ones(kv.num_blocks, np.bool_))
            for f in session.disk_files.values():
                f.close()
            for plan in session.plans.values():       # slots a pending fill would write are given back
                for tier, _, _, slots in plan.fills:
                    self.pool(tier, plan.layer).release(slots.tolist())
                plan.fills = []
            session.plans.clear()
            session.closed = True
            del self.sessions[session_id]
            self.room.notify_all()
            # an empty pool gives its reserved bytes back: a tier's budget is shared by the pools
            # of every shape, and the next model may have another head_dim or dtype
            for key, pool in list(self.pools.items()):
                if pool.used == 0:
                    pool.close()
                    del self.pools[key]
            self.standins.forget(session_id)
            self.sessions_closed += 1

    def close(self) -> None:
        """Release every session (closing its disk files) and the pools."""
        with self.lock:
            for sid in list(self.sessions):
                self.release(sid)
            for pool in self.pools.values():
                pool.close()
            self.pools.clear()
        self.tracer.flush()

    # -- stores: memory pools and disk files ------------------------------------------------

    @staticmethod
    def pool_key(tier: Tier, kv: LayerKV) -> tuple:
        """Which pool of ``self.pools`` holds ``kv``'s blocks on a memory tier."""
        return tier, torch.device("cpu") if tier == Tier.HOST else kv.device, kv.dtype, kv.head_dim

    def pool(self, tier: Tier, kv: LayerKV) -> BlockPool:
        key = self.pool_key(tier, kv)
        pool = self.pools.get(key)
        if pool is None:
            pin = tier == Tier.HOST and torch.cuda.is_available()
            pool = BlockPool(self.budgets[tier], key[1], kv.dtype, self.block_size, kv.head_dim, pin)
            pool.pack = functools.partial(placement.pack_pool, self, tier, pool)
            self.pools[key] = pool
        return pool

    def disk_dir(self) -> str:
        """Where KV files are made, checked each time: each file is unlinked at creation, so
        nothing made earlier (no private directory) is relied on."""
        directory = self._disk_parent or tempfile.gettempdir()
        if not os.path.isdir(directory):
            raise KVDiskError(
                f"disk_dir '{directory}' is gone (it existed when the model was compiled; a temp cleaner "
                "may have removed it): create it again, or compile with options={'disk_dir': ...} naming "
                "an existing writable directory with room")
        return directory

    def disk(self, kv: LayerKV) -> DiskFile:
        session = self.sessions[kv.session_id]
        key = (kv.dtype, kv.head_dim)
        f = session.disk_files.get(key)
        if f is None:
            name = f"session{kv.session_id}-{str(kv.dtype).split('.')[-1]}-d{kv.head_dim}.kv"
            f = DiskFile(self.disk_dir(), name, kv.dtype, self.block_size, kv.head_dim, self.submit_io,
                         queue_depth=self.io_threads)
            session.disk_files[key] = f
            f.on_request = functools.partial(self._on_disk_request, session.id)
            self.disk_bypass = f.cache_bypass
        return f

    def submit_io(self, fn, *args) -> Future:
        """``fn(*args)`` on the I/O threads (every disk request goes through here); a pool that
        was shut down (``io_pool.shutdown()``) is replaced first."""
        with self._io_lock:
            try:
                return self.io_pool.submit(fn, *args)
            except RuntimeError:                          # "cannot schedule new futures after shutdown"
                self.io_pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix=IO_THREAD_PREFIX)
                return self.io_pool.submit(fn, *args)

    def alloc_upto(self, tier: Tier, kv: LayerKV, n: int, reclaim: bool = False) -> list[int]:
        """Up to ``n`` slots of a memory tier, as many as its budget has room for (reclaim:
        ``BlockPool.alloc_upto``)."""
        return self.pool(tier, kv).alloc_upto(n, reclaim)

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> RuntimeStats:
        with self.lock:
            tiers = {}
            for tier in Tier:
                limit = self.budgets[tier].limit if tier in self.budgets else None
                ts = TierStats(limit=limit)
                if tier in self.budgets:
                    ts.reserved_bytes = self.budgets[tier].reserved
                    ts.peak_reserved_bytes = self.budgets[tier].peak
                tiers[tier.name.lower()] = ts
            bypass = set()
            for session in self.sessions.values():
                for kv in session.layers.values():
                    sb = slot_bytes(self.block_size, kv.head_dim, kv.dtype)
                    nb = kv.num_blocks
                    for name, held in (("device", kv.dev[:, :nb] >= 0), ("host", kv.host[:, :nb] >= 0),
                                       ("disk", kv.home[:, :nb] == Tier.DISK)):
                        n = int(held.sum())
                        tiers[name].resident_blocks += n
                        tiers[name].resident_bytes += n * sb
                bypass.update(f.cache_bypass for f in session.disk_files.values())
            disk = tiers["disk"]
            disk.reserved_bytes = sum(f.capacity * f.stride for s in self.sessions.values()
                                      for f in s.disk_files.values())
            total = sum(self.served.values())
            p = self.prefetch
            asked = p["landed"] + p["in_flight"] + p["missed"]
            return RuntimeStats(background_seconds=dict(self.background_seconds), prefetch=dict(p),
                                prefetch_hit_rate=(p["landed"] + p["in_flight"]) / asked if asked else 0.0,
                                tiers=tiers, moved_bytes=dict(self.moved), selected_blocks=dict(self.selected_blocks),
                                rankings=dict(self.rankings),
                                stage_seconds=dict(self.stage_seconds), sessions_open=len(self.sessions),
                                sessions_closed=self.sessions_closed, steps=self.steps,
                                served=dict(self.served), hit_rate=self.served["device"] / total if total else 0.0,
                                admitted=dict(self.admitted), evicted=dict(self.evicted),
                                cropped_tokens=self.cropped_tokens,
                                admission=self.admission.summary() if self.admission is not None else {},
                                disk_cache_bypass=", ".join(sorted(b for b in bypass if b)) or self.disk_bypass)
