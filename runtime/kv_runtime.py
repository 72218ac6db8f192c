"""The KV runtime: sessions of paged KV over three tiers, the moves between them, and the
per-step plan.

Every completed block has one *home*: the device when the device tier has no budget (nothing
ever moves then), else host memory while the host budget has room, else disk; it is written
there once, when it completes. The device tier (and host memory, for disk-homed blocks) holds
*copies*: dropping one costs nothing. Which copies are kept between steps is the cache
policy's choice (``placement.py``); this module does the moves it decides.
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import itertools
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .block_attention import StepMask, attend, attend_gathered, attend_part, empty_partial, gather_part
from .layer_kv import NONE, Fresh, LayerKV
from .placement import CACHE_POLICIES, DEFAULT_REUSE_WINDOW, Entries, choose, warm_order
from .planner import Plan, TierPart, tier_part
from .selection import EXACT, SelectionPolicy, block_scores, scored, select_scored, window_blocks
from .standins import StandIns
from .stats import RuntimeStats, TierStats
from .disk import IO_THREAD_PREFIX, DiskFile, KVDiskError
from .tiers import BlockPool, Tier, TierBudget, slot_bytes
from ..kernels.cpu_attention import cpu_partial_attention
from ..kernels.merge import merge_partials
from ..kernels.paged_attention import paged_attention

log = logging.getLogger(__name__)

# wall time per stage of the scheduled graph (CUDA work is asynchronous: device stages are
# counted where they block)
STAGES = ("append", "select", "prefetch", "io_wait", "cpu_attention", "device_attention", "merge", "write_home")
# queries of a prefill's last tokens that score its blocks for their first placement
WARM_QUERIES = 16


class KVBudgetError(ValueError):
    """A byte budget cannot hold what a step must keep in place."""


@dataclass
class Session:
    """The KV of one generation: one ``LayerKV`` per attention layer, and its disk files."""

    id: int
    layers: dict[int, LayerKV] = field(default_factory=dict)
    disk_files: dict[tuple, DiskFile] = field(default_factory=dict)
    plans: dict[int, Plan] = field(default_factory=dict)
    sites: int = 1                     # attention layers of the model (the graph says; at least)
    closed: bool = False


class KVRuntime:
    """Owns KV data: tier budgets and pools, sessions, placement, and step plans."""

    def __init__(self, block_size: int = 16, device_memory: Optional[int] = None,
                 host_memory: Optional[int] = None, disk_dir: Optional[str] = None,
                 io_threads: int = 4, cache_policy: str = "attention",
                 reuse_window: int = DEFAULT_REUSE_WINDOW):
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
        self._io_lock = threading.Lock()
        self.lock = threading.RLock()
        self._ids = itertools.count(1)
        self.disk_bypass = ""                               # how the last disk file avoids the page cache
        self.host_homes = 0                                 # host slots holding homes (the rest: copies)
        self.moved = {"device->host": 0, "host->disk": 0, "disk->host": 0, "host->device": 0}
        self.selected_blocks = {"device": 0, "host": 0, "disk": 0}
        self.served = {"device": 0, "host": 0, "disk": 0}
        self.admitted = {"device": 0, "host": 0}
        self.evicted = {"device": 0, "host": 0}
        self.stage_seconds = {s: 0.0 for s in STAGES}
        self.sessions_closed = 0
        self.steps = 0
        self.standins = StandIns(self.release, self.lock)
        atexit.register(self.close)

    @contextlib.contextmanager
    def timed(self, stage: str, session_id: Optional[int] = None):
        """Time a stage; if it fails, release the session's KV (blocks, files, plans) before
        the error leaves, so a failed generation holds nothing after its error."""
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            if session_id is not None:
                self.release(session_id)
            raise
        finally:
            self.stage_seconds[stage] += time.perf_counter() - t0

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
                self._free(kv, np.ones(kv.num_blocks, np.bool_))
            for f in session.disk_files.values():
                f.close()
            session.plans.clear()
            session.closed = True
            del self.sessions[session_id]
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

    # -- pools and files -------------------------------------------------------------------

    def _pool(self, tier: Tier, kv: LayerKV) -> BlockPool:
        device = torch.device("cpu") if tier == Tier.HOST else kv.device
        key = (tier, device, kv.dtype, kv.head_dim)
        pool = self.pools.get(key)
        if pool is None:
            pin = tier == Tier.HOST and torch.cuda.is_available()
            pool = BlockPool(self.budgets[tier], device, kv.dtype, self.block_size, kv.head_dim, pin)
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

    def _disk(self, kv: LayerKV) -> DiskFile:
        session = self.sessions[kv.session_id]
        key = (kv.dtype, kv.head_dim)
        f = session.disk_files.get(key)
        if f is None:
            name = f"session{kv.session_id}-{str(kv.dtype).split('.')[-1]}-d{kv.head_dim}.kv"
            f = DiskFile(self.disk_dir(), name, kv.dtype, self.block_size, kv.head_dim, self.submit_io,
                         queue_depth=self.io_threads)
            session.disk_files[key] = f
            self.disk_bypass = getattr(f, "cache_bypass", "")
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

    def _alloc_upto(self, tier: Tier, kv: LayerKV, n: int) -> list[int]:
        """Up to ``n`` slots of a memory tier, as many as its budget has room for."""
        pool = self._pool(tier, kv)
        got = pool.alloc(n) if n else []
        if got is not None:
            return got
        room = pool.budget.room()
        fit = len(pool.free) + (0 if room is None else room // pool.slot_bytes)
        got = pool.alloc(min(n, fit)) if fit > 0 else None
        return got or []

    # -- where blocks go -------------------------------------------------------------------

    def _device_share(self, kv: LayerKV) -> int:
        """Device slots this layer may keep (its share of the device budget)."""
        limit = self.budgets[Tier.DEVICE].limit or 0
        sites = self.sessions[kv.session_id].sites
        return limit // slot_bytes(self.block_size, kv.head_dim, kv.dtype) // max(1, sites)

    def _host_share(self, kv: LayerKV) -> int:
        """Host slots this layer may use for copies of disk-homed blocks: the host budget
        homes leave free, shared by the layers."""
        limit = self.budgets[Tier.HOST].limit
        if limit is None or self.device_home:
            return 0
        sb = slot_bytes(self.block_size, kv.head_dim, kv.dtype)
        sites = self.sessions[kv.session_id].sites
        return max(0, limit // sb - self.host_homes) // max(1, sites)

    def _place(self, kv: LayerKV, fresh: Fresh, scores: Optional[np.ndarray]) -> None:
        """Give new blocks their homes and device copies. scores ``[rows, count]`` (None:
        recency alone): the best-scored go up first."""
        count, rows = fresh.k.shape[0], kv.rows
        ids = np.arange(fresh.first, fresh.first + count)
        kv.grow(ids[-1] + 1)
        kv.changed()
        if self.device_home:
            slots = self._device_slots(kv, rows * count)
            self._write_copies(Tier.DEVICE, kv, np.repeat(np.arange(rows), count), np.tile(ids, rows), slots,
                               fresh.k.transpose(0, 1).reshape(-1, *fresh.k.shape[2:]),
                               fresh.v.transpose(0, 1).reshape(-1, *fresh.v.shape[2:]), home=True)
            return
        score = np.zeros((rows, count), np.float32) if scores is None else scores
        open_id = kv.open_block()
        homed = [i for i in ids if i != open_id or not self.device_cache]
        # homes, per logical block: the best-scored (by their best row) get host memory
        order = sorted(homed, key=lambda i: (-float(score[:, i - fresh.first].max()), -i))
        self._write_homes(kv, order, lambda i: (fresh.k[i - fresh.first], fresh.v[i - fresh.first]))
        if not self.device_cache:
            return
        pinned = kv.pinned_blocks()[ids]
        must = np.zeros((rows, count), np.bool_)
        must[:, pinned] = True
        chosen = np.flatnonzero(must.reshape(-1))                    # pinned first: they must fit
        if self.cache_policy != "none":                      # then the best of the rest, up to the share
            room = self._device_share(kv) - int((kv.dev >= 0).sum()) - chosen.size
            flat = warm_order(score.reshape(-1), np.tile(ids, rows))
            chosen = np.concatenate([chosen, flat[~must.reshape(-1)[flat]][:max(0, room)]])
        slots = self._device_slots(kv, chosen.size, required=int(must.sum()))
        r, j = np.divmod(chosen[:len(slots)], count)
        self._write_copies(Tier.DEVICE, kv, r, ids[j], slots, fresh.k[j, r], fresh.v[j, r])
        self.admitted["device"] += len(slots)

    def _write_homes(self, kv: LayerKV, ids: list[int], data) -> None:
        """Write blocks ``ids`` (all rows) to their homes: host memory while it has room, then
        disk (in the background). data(i) -> k, v ``[rows, bs, D]``."""
        if not ids:
            return
        t0 = time.perf_counter()
        rows = kv.rows
        slots = self._alloc_upto(Tier.HOST, kv, rows * len(ids))
        n_host = len(slots) // rows
        if len(slots) > n_host * rows:
            self._pool(Tier.HOST, kv).release(slots[n_host * rows:])
        self.host_homes += n_host * rows
        host_ids, disk_ids = ids[:n_host], sorted(ids[n_host:])     # on disk in token order: reads coalesce
        sb = slot_bytes(self.block_size, kv.head_dim, kv.dtype)
        if host_ids:
            k = torch.stack([data(i)[0] for i in host_ids])                  # [n, rows, bs, D]
            v = torch.stack([data(i)[1] for i in host_ids])
            r = np.tile(np.arange(rows), n_host)
            b = np.repeat(np.array(host_ids), rows)
            self._write_copies(Tier.HOST, kv, r, b, slots[:n_host * rows], k.reshape(-1, *k.shape[2:]),
                               v.reshape(-1, *v.shape[2:]), home=True)
            self.moved["device->host"] += n_host * rows * sb
        if disk_ids:
            disk = self._disk(kv)
            for i in disk_ids:
                k, v = data(i)
                slots = disk.alloc(kv.layer, rows)
                disk.write_async(slots, k, v)                 # off the critical path; a failure is raised later
                kv.home[:, i], kv.home_slot[:, i] = int(Tier.DISK), slots
            self.moved["device->host"] += len(disk_ids) * rows * sb
            self.moved["host->disk"] += len(disk_ids) * rows * sb
        kv.changed()
        self.stage_seconds["write_home"] += time.perf_counter() - t0

    def _write_copies(self, tier: Tier, kv: LayerKV, rows: np.ndarray, blocks: np.ndarray, slots: list[int],
                      k: torch.Tensor, v: torch.Tensor, home: bool = False) -> None:
        """Entries (rows[i], blocks[i]) get ``slots[i]`` of a memory tier holding k[i], v[i] ``[bs, D]``."""
        if not len(slots):
            return
        pool = self._pool(tier, kv)
        index = torch.tensor(slots, device=pool.device)
        pool.k.index_copy_(0, index, k.to(pool.device))
        pool.v.index_copy_(0, index, v.to(pool.device))
        target = kv.dev if tier == Tier.DEVICE else kv.host
        target[rows, blocks] = slots
        if home:
            kv.home[rows, blocks] = int(tier)
            kv.home_slot[rows, blocks] = slots
        kv.changed()

    def _device_slots(self, kv: LayerKV, n: int, required: Optional[int] = None) -> list[int]:
        """``n`` device slots, at least ``required`` (default all) of them: making room by
        dropping unpinned copies where the budget is full; a clear error if it cannot."""
        required = n if required is None else required
        slots = self._alloc_upto(Tier.DEVICE, kv, n)
        if len(slots) >= required or self.device_home:
            return slots
        self._drop_copies(kv, required - len(slots))
        slots += self._alloc_upto(Tier.DEVICE, kv, n - len(slots))
        if len(slots) < required:                  # generations whose cache is garbage not yet collected
            gc.collect()
            self.sweep()
            self._drop_copies(kv, required - len(slots))
            slots += self._alloc_upto(Tier.DEVICE, kv, n - len(slots))
        if len(slots) < required:
            self._pool(Tier.DEVICE, kv).release(slots)
            raise self._budget_error(kv)
        return slots

    def _budget_error(self, kv: LayerKV) -> KVBudgetError:
        sb = slot_bytes(self.block_size, kv.head_dim, kv.dtype)
        per_layer = (kv.pinned_front + kv.pinned_back) * kv.rows * sb
        sites = self.sessions[kv.session_id].sites
        return KVBudgetError(
            f"device_memory={self.budgets[Tier.DEVICE].limit} bytes cannot hold the blocks each attention layer "
            f"keeps on the device (sink, local window, open block: {kv.pinned_front + kv.pinned_back} blocks x "
            f"{kv.rows} rows x {sb} bytes = {per_layer} bytes per layer; layer {kv.layer} of at least {sites}). "
            + (f"{len(self.sessions) - 1} other generation(s) sharing this runtime hold theirs too. "
               if len(self.sessions) > 1 else "")
            + f"Pass device_memory >= {per_layer * sites} bytes (more, so blocks attention reuses can stay), "
            "device_memory=0 (no device tier: attend everything where it lies), or None (no limit)")

    def _drop_copies(self, kv: LayerKV, n: int) -> None:
        """Drop ``n`` unpinned device copies to make room: this layer's lowest-scored first,
        then other layers' (any session's)."""
        layers = [kv] + [other for s in self.sessions.values() for other in s.layers.values() if other is not kv]
        for layer in layers:
            if n <= 0:
                return
            nb = layer.num_blocks
            pinned = layer.pinned_blocks()[None, :] | (layer.pins[:, :nb] > 0)
            cand = np.flatnonzero(((layer.dev[:, :nb] >= 0) & ~pinned).reshape(-1))
            sc, ls = layer.score[:, :nb].reshape(-1)[cand], layer.last_selected[:, :nb].reshape(-1)[cand]
            victims = cand[np.lexsort((ls, sc))][:n]
            self._evict(layer, Tier.DEVICE, victims)
            n -= victims.size

    def _evict(self, kv: LayerKV, tier: Tier, flat: np.ndarray) -> None:
        """Drop the copies of flat (row, block) entries from ``tier`` (their homes keep the bytes)."""
        if not flat.size:
            return
        nb = kv.num_blocks
        r, b = np.divmod(flat, nb)
        copies = kv.dev if tier == Tier.DEVICE else kv.host
        assert not (kv.home[r, b] == tier).any(), "a home is never evicted"
        self._pool(tier, kv).release(copies[r, b].tolist())
        copies[r, b] = NONE
        self.evicted[tier.name.lower()] += flat.size
        kv.changed()

    def _free(self, kv: LayerKV, blocks: np.ndarray) -> None:
        """Free every copy and home of the logical blocks where ``blocks`` (bool ``[nb]``) is set."""
        nb = min(kv.num_blocks, kv.home.shape[1])
        blocks = blocks[:nb]
        if not blocks.any():
            return
        sel = np.zeros(kv.home.shape, np.bool_)
        sel[:, :nb] = blocks[None, :]
        dev = sel & (kv.dev >= 0)
        if dev.any():
            self._pool(Tier.DEVICE, kv).release(kv.dev[dev].tolist())
        host = sel & (kv.host >= 0)
        if host.any():
            self._pool(Tier.HOST, kv).release(kv.host[host].tolist())
            self.host_homes -= int((host & (kv.home == Tier.HOST)).sum())
        disk = sel & (kv.home == Tier.DISK)
        if disk.any() and kv.session_id in self.sessions:
            files = self.sessions[kv.session_id].disk_files
            f = files.get((kv.dtype, kv.head_dim))
            if f is not None:
                f.release(kv.home_slot[disk].tolist())
        for arr in (kv.dev, kv.host, kv.home_slot):
            arr[sel] = NONE
        kv.home[sel] = NONE
        kv.changed()

    # -- append ----------------------------------------------------------------------------

    def drop_before(self, kv: LayerKV, position: int) -> None:
        """Free the blocks that hold only positions before ``position`` (outside a window)."""
        with self.lock:
            first = position // self.block_size
            if kv.first < first:
                self.place_fresh(kv)
                drop = np.zeros(kv.num_blocks, np.bool_)
                drop[kv.first:first] = True
                self._free(kv, drop)
                kv.first = first

    def append(self, kv: LayerKV, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k, v: [B, Hkv, n, D]`` at the end of the layer's KV. With a device cache, new
        blocks are placed by the step's plan (``place_fresh``), which scores them with the
        step's queries; else here."""
        with self.lock:
            self.place_fresh(kv)
            n = k.shape[2]
            bs = self.block_size
            k = k.reshape(kv.rows, n, kv.head_dim)                        # [rows, n, D]
            v = v.reshape(kv.rows, n, kv.head_dim)
            pos, done = kv.length, 0
            kv.summaries.update(pos, k)
            if n and pos % bs:                             # fill the open block where it lies
                done = min(n, bs - pos % bs)
                self._write_tokens(kv, pos // bs, pos % bs, k[:, :done], v[:, :done])
            kv.length = pos + n
            if done and (pos + done) % bs == 0:
                self._completed(kv, pos // bs)
            if done < n:
                rest_k, rest_v = k[:, done:], v[:, done:]
                count = -(-(n - done) // bs)
                pad = count * bs - (n - done)
                if pad:
                    rest_k = torch.nn.functional.pad(rest_k, (0, 0, 0, pad))
                    rest_v = torch.nn.functional.pad(rest_v, (0, 0, 0, pad))
                # [rows, count*bs, D] -> [count, rows, bs, D]
                shape = (kv.rows, count, bs, kv.head_dim)
                kv.fresh = Fresh((pos + done) // bs, rest_k.reshape(shape).transpose(0, 1),
                                 rest_v.reshape(shape).transpose(0, 1))
                kv.grow(kv.num_blocks)
                if not self.device_cache:                 # no copies to choose: placed by recency now
                    self.place_fresh(kv)

    def place_fresh(self, kv: LayerKV, scores: Optional[np.ndarray] = None) -> None:
        """Place the blocks the last append made (scores ``[rows, count]`` rank them; None: recency)."""
        fresh, kv.fresh = kv.fresh, None
        if fresh is not None:
            self._place(kv, fresh, scores)

    def _completed(self, kv: LayerKV, idx: int) -> None:
        """Block ``idx`` was just filled: write it home if it has none yet (an open block lives
        only on the device)."""
        if (kv.home[:, idx] >= 0).all():
            return
        pool = self._pool(Tier.DEVICE, kv)
        index = torch.tensor(kv.dev[:, idx].tolist(), device=pool.device)
        k, v = pool.k.index_select(0, index), pool.v.index_select(0, index)
        self._write_homes(kv, [idx], lambda i: (k, v))

    def _write_tokens(self, kv: LayerKV, idx: int, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: ``[rows, t, D]`` into block ``idx`` at token ``offset``, in every copy and its home."""
        t = k.shape[1]
        for tier, slots in ((Tier.DEVICE, kv.dev[:, idx]), (Tier.HOST, kv.host[:, idx])):
            if (slots >= 0).any():
                pool = self._pool(tier, kv)
                index = torch.tensor(slots.tolist(), device=pool.device)
                pool.k[index, offset:offset + t] = k.to(pool.device)
                pool.v[index, offset:offset + t] = v.to(pool.device)
        if (kv.home[:, idx] == Tier.DISK).any():
            disk = self._disk(kv)
            for row, slot in enumerate(kv.home_slot[:, idx].tolist()):
                disk.write_tokens(slot, offset, k[row], v[row])

    # -- one step of one site --------------------------------------------------------------

    def plan(self, kv: LayerKV, past_len: int, new_len: int, q: torch.Tensor,
             policy: SelectionPolicy = EXACT, scale: float = 1.0) -> Plan:
        """Select what the site attends in the window ``[length - past - new, length)``, and
        move copies as the cache policy says."""
        start, end = kv.length - past_len - new_len, kv.length
        bs = self.block_size
        with self.lock:
            kv.pinned_front = -(-policy.sink_tokens // bs) if policy.sink_tokens else 0
            kv.pinned_back = -(-policy.local_window // bs) + 1
            self.place_fresh(kv, self._warm_scores(kv, policy, q, scale))
            if past_len == 0:
                selected = window_blocks(kv, start, end).expand(kv.rows, -1)
                return Plan(kv, (start, end), selected, fresh_only=True)
            selected, scores = select_scored(kv, policy, q, start, end, scale)
            plan = Plan(kv, (start, end), selected, fresh_only=False, fetch=policy.attention == "fetch")
            self._count_served(kv, selected)
            if not self.device_home:
                self._cache_step(kv, plan, scores, window_blocks(kv, start, end))
            for tier in Tier:
                part = plan.part(tier)
                self.selected_blocks[tier.name.lower()] += 0 if part is None else int(part.valid.sum())
            self._pin(plan)
            return plan

    def _warm_scores(self, kv: LayerKV, policy: SelectionPolicy, q: torch.Tensor, scale: float) -> Optional[np.ndarray]:
        """Scores of the fresh blocks from the queries of the step's last tokens (None when the
        layer does not rank blocks, or there is no device cache to place them in)."""
        fresh = kv.fresh
        if fresh is None or not self.device_cache or not scored(kv, policy):
            return None
        ids = torch.arange(fresh.first, fresh.first + fresh.k.shape[0])
        return block_scores(kv, policy, q[:, :, -WARM_QUERIES:], ids, scale).numpy()

    def _count_served(self, kv: LayerKV, selected: torch.Tensor) -> None:
        tier, _ = kv.where()
        lay = np.take_along_axis(tier, selected.numpy(), axis=1)
        sb = slot_bytes(self.block_size, kv.head_dim, kv.dtype)
        for t in Tier:
            self.served[t.name.lower()] += int((lay == int(t)).sum()) * sb

    def _cache_step(self, kv: LayerKV, plan: Plan, scores: Optional[torch.Tensor], window: torch.Tensor) -> None:
        """The cache policy's moves at this step: drop victims, copy admitted misses up (from
        host now; from disk when the plan's read lands), remember what was selected."""
        nb = kv.num_blocks
        kv.step += 1
        if scores is not None:
            kv.score[:, window.numpy()] = scores.numpy()
        selected = np.zeros((kv.rows, nb), np.bool_)
        np.put_along_axis(selected, plan.selected.numpy(), True, axis=1)
        tier, _ = kv.where()
        pinned = kv.pinned_blocks()[None, :] | (kv.pins[:, :nb] > 0)
        if self.device_cache:
            e = Entries(cached=(kv.dev[:, :nb] >= 0).reshape(-1), pinned=pinned.reshape(-1),
                        last_selected=kv.last_selected[:, :nb].reshape(-1), score=kv.score[:, :nb].reshape(-1),
                        selected=selected.reshape(-1), eligible=(tier >= 0).reshape(-1))
            room = self._device_share(kv) - int(e.cached.sum())
            admit, evict = choose(self.cache_policy, self.reuse_window, kv.step, e, room, plan.fetch)
            self._evict(kv, Tier.DEVICE, evict)
            self._admit(kv, plan, Tier.DEVICE, admit, tier.reshape(-1))
        if self.budgets[Tier.HOST].limit is not None:
            tier, _ = kv.where()
            on_disk = tier == Tier.DISK
            for _, r, b, _ in plan.fills:                 # on their way to the device already
                on_disk[r, b] = False
            copy = (kv.host[:, :nb] >= 0) & (kv.home[:, :nb] == Tier.DISK)
            e = Entries(cached=copy.reshape(-1), pinned=(kv.pins[:, :nb] > 0).reshape(-1),
                        last_selected=kv.last_selected[:, :nb].reshape(-1), score=kv.score[:, :nb].reshape(-1),
                        selected=(selected & (on_disk | copy)).reshape(-1), eligible=on_disk.reshape(-1))
            room = self._host_share(kv) - int(copy.sum())
            admit, evict = choose(self.cache_policy, self.reuse_window, kv.step, e, room, False)
            self._evict(kv, Tier.HOST, evict)
            self._admit(kv, plan, Tier.HOST, admit, tier.reshape(-1))
        kv.last_selected[:, :nb][selected] = kv.step

    def _admit(self, kv: LayerKV, plan: Plan, tier: Tier, flat: np.ndarray, lies: np.ndarray) -> None:
        """Copy admitted entries up to ``tier``: at once from a memory tier above disk; from
        disk once the plan's read lands (``_fill_from_disk``)."""
        if not flat.size:
            return
        slots = self._alloc_upto(tier, kv, flat.size)
        flat = flat[:len(slots)]
        if not len(slots):
            return
        nb = kv.num_blocks
        r, b = np.divmod(flat, nb)
        slots = np.asarray(slots)
        from_disk = lies[flat] == Tier.DISK
        if (~from_disk).any():                            # host -> device, now: attended there this step
            src = self._pool(Tier.HOST, kv)
            index = torch.from_numpy(kv.host[r[~from_disk], b[~from_disk]])
            self._write_copies(tier, kv, r[~from_disk], b[~from_disk], slots[~from_disk].tolist(),
                               src.k.index_select(0, index), src.v.index_select(0, index))
            self.moved["host->device"] += int((~from_disk).sum()) * src.slot_bytes
        if from_disk.any():
            plan.fills.append((tier, r[from_disk], b[from_disk], slots[from_disk]))
            # reserved now, held by no entry until filled: pinned so no one takes them
            kv.pins[r[from_disk], b[from_disk]] += 1
        self.admitted[tier.name.lower()] += len(slots)

    def _fill_from_disk(self, plan: Plan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy admitted disk blocks from the plan's staged read (k, v ``[n, bs, D]`` by
        ``plan.disk_slots``) into their new slots."""
        kv = plan.layer
        with self.lock:
            fills, plan.fills = plan.fills, []
            for tier, r, b, slots in fills:
                kv.pins[r, b] -= 1
                at = torch.searchsorted(plan.disk_slots, torch.from_numpy(kv.home_slot[r, b]))
                self._write_copies(tier, kv, r, b, slots.tolist(), k[at], v[at])
                if tier == Tier.DEVICE:
                    self.moved["host->device"] += len(slots) * slot_bytes(self.block_size, kv.head_dim, kv.dtype)

    def _pin(self, plan: Plan) -> None:
        """Keep the plan's device and host blocks where they are until its merge: another
        thread's step sharing this runtime may not evict them and reuse their slots while
        this step's attention reads them outside the lock."""
        kv = plan.layer
        rows, cols = [], []
        for tier in (Tier.DEVICE, Tier.HOST):
            part = plan.part(tier)
            if part is not None:
                r, c = torch.nonzero(part.valid, as_tuple=True)
                rows.append(r.numpy())
                cols.append(part.ids[r, c].numpy())
        if rows:
            r, c = np.concatenate(rows), np.concatenate(cols)
            np.add.at(kv.pins, (r, c), 1)
            plan.pinned = (r, c)

    def unpin(self, plan: Plan) -> None:
        """The plan is done (merged, or its step failed): its blocks may move again."""
        with self.lock:
            kv = plan.layer
            if plan.pinned:
                np.subtract.at(kv.pins, plan.pinned, 1)
                plan.pinned = ()
            for _, r, b, slots in plan.fills:            # a read that never landed: give the slots back
                kv.pins[r, b] -= 1
            for tier, _, _, slots in plan.fills:
                self._pool(tier, kv).release(slots.tolist())
            plan.fills = []

    def prefetch(self, plan: Plan) -> None:
        """Start reading the plan's disk blocks into host memory, one request per run of slots."""
        part = None if plan.fresh_only else plan.part(Tier.DISK)
        if part is None:
            return
        needed = torch.unique(part.slots[part.valid])                        # sorted
        disk = self._disk(plan.layer)
        plan.disk_slots = needed
        plan.disk_read = disk.read_async(needed.tolist())            # adjacent slots coalesced, several in flight
        self.moved["disk->host"] += needed.numel() * disk.slot_bytes

    def host_attention(self, plan: Plan, q: torch.Tensor, step: StepMask, scale: float):
        """Host- and disk-resident blocks, on the CPU. q: ``[B, Hq, Q, D]``; returns fp32 (out, lse)."""
        kv = plan.layer
        if plan.fetch:
            return empty_partial(q)                   # everything is attended on the device
        parts = []
        host = None if plan.fresh_only else plan.part(Tier.HOST)
        if host is not None:
            pool = self._pool(Tier.HOST, kv)
            parts.append(attend_part(q.cpu(), pool.k, pool.v, host, kv, _on(step, "cpu"), scale,
                                     cpu_partial_attention))
        if plan.disk_read is not None:
            k, v, staged = self._staged_disk(plan)
            parts.append(attend_part(q.cpu(), k, v, staged, kv, _on(step, "cpu"), scale, cpu_partial_attention))
        if not parts:
            return empty_partial(q)
        out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
        return out.to(q.device), lse.to(q.device)

    def device_attention(self, plan: Plan, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                         step: StepMask, scale: float):
        """Device-resident blocks (or, on a prefill, this step's new tokens as they are)."""
        if plan.fresh_only:                        # the window is exactly the new tokens
            bias = None if step.bias is None else step.bias[..., : k_new.shape[2]]
            return attend(q, k_new, v_new, scale, bias, step.is_causal)
        if plan.fetch:
            return self._fetch_attention(plan, q, step, scale)
        part = plan.part(Tier.DEVICE)
        if part is None:
            return empty_partial(q)
        pool = self._pool(Tier.DEVICE, plan.layer)
        return attend_part(q, pool.k, pool.v, part, plan.layer, step, scale, paged_attention)

    def _staged_disk(self, plan: Plan):
        """The plan's disk blocks once read: staging k, v ``[n, bs, D]`` and their TierPart."""
        if plan.staged is None:
            t0 = time.perf_counter()
            k, v = plan.disk_read.result()
            waited = time.perf_counter() - t0
            self.stage_seconds["io_wait"] += waited
            # the stage that waited (its own time counts the rest)
            self.stage_seconds["device_attention" if plan.fetch else "cpu_attention"] -= waited
            if plan.fills:
                self._fill_from_disk(plan, k, v)
            disk = plan.part(Tier.DISK)
            index = torch.where(disk.valid, torch.searchsorted(plan.disk_slots, disk.slots), 0)
            plan.staged = (k, v, TierPart(disk.ids, index, disk.valid))
        return plan.staged

    def _fetch_attention(self, plan: Plan, q: torch.Tensor, step: StepMask, scale: float):
        """Copy every selected block to the device and attend there (the baselines' design)."""
        kv = plan.layer
        pieces = []
        for tier in Tier:
            part = plan.part(tier)
            if part is None:
                continue
            if tier == Tier.DISK:
                k_pool, v_pool, part = self._staged_disk(plan)
            else:
                pool = self._pool(tier, kv)
                k_pool, v_pool = pool.k, pool.v
            k, v, pos = gather_part(k_pool, v_pool, part, kv)
            if tier != Tier.DEVICE:
                self.moved["host->device"] += 2 * int(part.valid.sum()) * self.block_size * kv.head_dim * k.element_size()
            pieces.append((k.to(q.device), v.to(q.device), pos.to(q.device)))
        if not pieces:
            return empty_partial(q)
        k, v, pos = (torch.cat(x, dim=d) for x, d in zip(zip(*pieces), (2, 2, 1)))
        return attend_gathered(q, k, v, pos, kv, step, scale)

    # -- the slow, exact path: a layer's values for code that must see them ----------------

    def read_window(self, kv: LayerKV, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token of positions ``[start, end)`` of a layer, gathered from whatever tier
        each block lies on: k, v ``[B, Hkv, end - start, D]`` on the layer's device."""
        with self.lock:
            self.place_fresh(kv)
            if start < kv.first * self.block_size or end > kv.length:
                raise RuntimeError(f"layer {kv.layer}: tokens [{start}, {end}) are not all held "
                                   f"(held: [{kv.first * self.block_size}, {kv.length}))")
            blocks = window_blocks(kv, start, end)
            first, bs, d = int(blocks[0]) if len(blocks) else 0, self.block_size, kv.head_dim
            k_out = torch.zeros((kv.rows, len(blocks), bs, d), dtype=kv.dtype, device=kv.device)
            v_out = torch.zeros_like(k_out)
            for tier in Tier:
                part = tier_part(kv, blocks.expand(kv.rows, -1), tier) if len(blocks) else None
                if part is None:
                    continue
                rows, cols = torch.nonzero(part.valid, as_tuple=True)
                slots = part.slots[rows, cols]
                if tier == Tier.DISK:
                    k, v = self._disk(kv).read(slots.tolist())
                else:
                    pool = self._pool(tier, kv)
                    k, v = pool.k[slots.to(pool.device)], pool.v[slots.to(pool.device)]
                at = (rows.to(kv.device), (part.ids[rows, cols] - first).to(kv.device))
                k_out[at], v_out[at] = k.to(kv.device), v.to(kv.device)
            offset = start - first * bs
            shape = (kv.batch, kv.kv_heads, end - start, d)
            return tuple(t.reshape(kv.rows, -1, d)[:, offset:offset + end - start].reshape(shape)
                         for t in (k_out, v_out))

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
                bypass.update(getattr(f, "cache_bypass", "") for f in session.disk_files.values())
            disk = tiers["disk"]
            disk.reserved_bytes = sum(f.capacity * f.stride for s in self.sessions.values()
                                      for f in s.disk_files.values())
            total = sum(self.served.values())
            return RuntimeStats(tiers=tiers, moved_bytes=dict(self.moved), selected_blocks=dict(self.selected_blocks),
                                stage_seconds=dict(self.stage_seconds), sessions_open=len(self.sessions),
                                sessions_closed=self.sessions_closed, steps=self.steps,
                                served=dict(self.served), hit_rate=self.served["device"] / total if total else 0.0,
                                admitted=dict(self.admitted), evicted=dict(self.evicted),
                                disk_cache_bypass=", ".join(sorted(b for b in bypass if b)) or self.disk_bypass)


def _on(step: StepMask, device: str) -> StepMask:
    bias = None if step.bias is None else step.bias.to(device)
    return StepMask(step.start, step.end, bias, step.is_causal)
