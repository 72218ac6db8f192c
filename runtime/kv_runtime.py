"""The KV runtime: sessions of paged KV over three tiers, placement, and the per-step plan.

Placement: a new block goes to the device tier; when the device budget is full the oldest
device block moves to host, and when the host budget is full the oldest host block moves to
disk. So the newest blocks are on the device, older ones on host, the rest on disk.
"""
from __future__ import annotations

import atexit
import contextlib
import heapq
import itertools
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import torch

from .block_attention import StepMask, attend, attend_gathered, attend_part, empty_partial, gather_part
from .layer_kv import Block, LayerKV
from .planner import Plan, TierPart, tier_part
from .selection import EXACT, SelectionPolicy, select_blocks, window_blocks
from .standins import StandIns
from .stats import RuntimeStats, TierStats
from .tiers import IO_THREAD_PREFIX, BlockPool, DiskFile, KVDiskError, Tier, TierBudget, slot_bytes
from ..kernels.cpu_attention import cpu_partial_attention
from ..kernels.merge import merge_partials
from ..kernels.paged_attention import paged_attention

log = logging.getLogger(__name__)

# wall time per stage of the scheduled graph (CUDA work is asynchronous: device stages are
# counted where they block)
STAGES = ("append", "select", "prefetch", "io_wait", "cpu_attention", "device_attention", "merge")


@dataclass
class Session:
    """The KV of one generation: one ``LayerKV`` per attention layer, and its disk files."""

    id: int
    layers: dict[int, LayerKV] = field(default_factory=dict)
    disk_files: dict[tuple, DiskFile] = field(default_factory=dict)
    plans: dict[int, Plan] = field(default_factory=dict)
    closed: bool = False


class KVRuntime:
    """Owns KV data: tier budgets and pools, sessions, placement, and step plans."""

    def __init__(self, block_size: int = 16, device_memory: Optional[int] = None,
                 host_memory: Optional[int] = None, disk_dir: Optional[str] = None,
                 io_threads: int = 4):
        self.block_size = block_size
        self.budgets = {Tier.DEVICE: TierBudget("device", device_memory),
                        Tier.HOST: TierBudget("host", host_memory)}
        self._disk_parent = disk_dir
        self.pools: dict[tuple, BlockPool] = {}
        self.sessions: dict[int, Session] = {}
        self.io_threads = io_threads
        self.io_pool = ThreadPoolExecutor(io_threads, thread_name_prefix=IO_THREAD_PREFIX)
        self._io_lock = threading.Lock()
        self.lock = threading.RLock()
        self._ids = itertools.count(1)
        self._created = itertools.count()
        self._lru: dict[Tier, list] = {Tier.DEVICE: [], Tier.HOST: []}
        self.moved = {"device->host": 0, "host->disk": 0, "disk->host": 0, "host->device": 0}
        self.selected_blocks = {"device": 0, "host": 0, "disk": 0}
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

    def open_session(self) -> Session:
        with self.lock:
            session = Session(next(self._ids))
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
                for i in list(kv.blocks):
                    self._free_block(kv, i)
            for f in session.disk_files.values():
                f.close()
            session.plans.clear()
            # the placement heaps drop stale entries lazily, at eviction; without a budget
            # nothing is ever evicted, so drop this session's here, or they keep its layers
            # (and their block summaries) alive for as long as the runtime lives
            for tier, heap in self._lru.items():
                kept = [e for e in heap if e[1].session_id != session_id]
                heapq.heapify(kept)
                self._lru[tier] = kept
            session.closed = True
            del self.sessions[session_id]
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
            f = DiskFile(self.disk_dir(), name, kv.dtype, self.block_size, kv.head_dim, self.submit_io)
            session.disk_files[key] = f
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

    def _store(self, tier: Tier, kv: LayerKV):
        return self._disk(kv) if tier == Tier.DISK else self._pool(tier, kv)

    # -- placement -------------------------------------------------------------------------

    def _alloc(self, tier: Tier, kv: LayerKV) -> Optional[list[int]]:
        """``kv.rows`` slots in ``tier``, evicting that tier's oldest blocks downwards if needed."""
        if tier == Tier.DISK:
            return self._disk(kv).alloc(kv.rows, kv.layer)
        pool = self._pool(tier, kv)
        while True:
            slots = pool.alloc(kv.rows)
            if slots is not None:
                return slots
            if not self._evict_oldest(tier, pool):
                return None

    def _evict_oldest(self, tier: Tier, pool: BlockPool) -> bool:
        """Move the oldest block held in ``pool`` one tier down. False if there is none."""
        heap = self._lru[tier]
        skipped = []
        found = False
        while heap:
            created, kv, idx = heapq.heappop(heap)
            block = kv.blocks.get(idx)
            if block is None or block.tier != tier or block.created != created:
                continue                                                   # stale entry
            if self._pool(tier, kv) is not pool or idx in kv.pins:       # pinned: a step reads it
                skipped.append((created, kv, idx))
                continue
            self._demote(kv, idx)
            found = True
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    def _demote(self, kv: LayerKV, idx: int) -> None:
        block = kv.blocks[idx]
        src = self._pool(block.tier, kv)
        lower = Tier(block.tier + 1)
        slots = self._alloc(lower, kv) if lower == Tier.HOST else None
        if slots is None:
            lower = Tier.DISK
            slots = self._alloc(lower, kv)
        index = torch.tensor(block.slots, device=src.device)
        k, v = src.k.index_select(0, index), src.v.index_select(0, index)
        self._write_slots(lower, kv, slots, k, v)
        nbytes = len(slots) * src.slot_bytes
        self.moved["device->host" if block.tier == Tier.DEVICE else "host->disk"] += nbytes
        if block.tier == Tier.DEVICE and lower == Tier.DISK:
            self.moved["host->disk"] += nbytes
        src.release(block.slots)
        kv.blocks[idx] = Block(lower, slots, block.created)
        kv.changed()
        self._track(kv, idx)

    def _track(self, kv: LayerKV, idx: int) -> None:
        block = kv.blocks[idx]
        if block.tier != Tier.DISK:
            heapq.heappush(self._lru[block.tier], (block.created, kv, idx))

    def _write_slots(self, tier: Tier, kv: LayerKV, slots: list[int], k: torch.Tensor,
                     v: torch.Tensor) -> None:
        """Write whole blocks ``k, v: [len(slots), bs, D]`` into ``tier``."""
        store = self._store(tier, kv)
        if tier == Tier.DISK:
            store.write(slots, k, v)
            return
        index = torch.tensor(slots, device=store.device)
        store.k.index_copy_(0, index, k.to(store.device))
        store.v.index_copy_(0, index, v.to(store.device))

    def _free_block(self, kv: LayerKV, idx: int) -> None:
        block = kv.blocks.pop(idx)
        kv.changed()
        if block.tier == Tier.DISK:
            self._disk(kv).release(block.slots)
        else:
            self._pool(block.tier, kv).release(block.slots)

    # -- append ----------------------------------------------------------------------------

    def drop_before(self, kv: LayerKV, position: int) -> None:
        """Free the blocks that hold only positions before ``position`` (outside a window)."""
        with self.lock:
            while kv.first < position // self.block_size:
                if kv.first in kv.blocks:
                    self._free_block(kv, kv.first)
                kv.first += 1

    def append(self, kv: LayerKV, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k, v: [B, Hkv, n, D]`` at the end of the layer's KV."""
        with self.lock:
            n = k.shape[2]
            bs = self.block_size
            k = k.reshape(kv.rows, n, kv.head_dim)                        # [rows, n, D]
            v = v.reshape(kv.rows, n, kv.head_dim)
            pos, done = kv.length, 0
            kv.summaries.update(pos, k)
            if n and pos % bs:                             # fill the open block where it lies
                done = min(n, bs - pos % bs)
                self._write_tokens(kv, pos // bs, pos % bs, k[:, :done], v[:, :done])
            if done < n:
                self._append_blocks(kv, (pos + done) // bs, k[:, done:], v[:, done:])
            kv.length += n

    def _write_tokens(self, kv: LayerKV, idx: int, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: ``[rows, t, D]`` into block ``idx`` at token ``offset``."""
        block = kv.blocks[idx]
        store = self._store(block.tier, kv)
        if block.tier == Tier.DISK:
            for row, slot in enumerate(block.slots):
                store.write_tokens(slot, offset, k[row], v[row])
            return
        index = torch.tensor(block.slots, device=store.device)
        t = k.shape[1]
        store.k[index, offset:offset + t] = k.to(store.device)
        store.v[index, offset:offset + t] = v.to(store.device)

    def _append_blocks(self, kv: LayerKV, first_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """New blocks from ``first_idx`` holding ``k, v: [rows, n, D]``, zero-padded."""
        bs = self.block_size
        n = k.shape[1]
        count = -(-n // bs)
        pad = count * bs - n
        if pad:
            k = torch.nn.functional.pad(k, (0, 0, 0, pad))
            v = torch.nn.functional.pad(v, (0, 0, 0, pad))
        # [rows, count*bs, D] -> [count, rows, bs, D]
        k = k.reshape(kv.rows, count, bs, kv.head_dim).transpose(0, 1)
        v = v.reshape(kv.rows, count, bs, kv.head_dim).transpose(0, 1)
        created = [next(self._created) for _ in range(count)]
        placed: dict[Tier, list[tuple[int, list[int]]]] = {Tier.DEVICE: [], Tier.HOST: [], Tier.DISK: []}
        for j in reversed(range(count)):                   # newest first: they get the device
            for tier in (Tier.DEVICE, Tier.HOST, Tier.DISK):
                slots = self._alloc(tier, kv)
                if slots is not None:
                    placed[tier].append((j, slots))
                    kv.blocks[first_idx + j] = Block(tier, slots, created[j])
                    break
        kv.changed()
        for tier, items in placed.items():
            if not items:
                continue
            items.sort()
            js = torch.tensor([j for j, _ in items], device=k.device)
            slots = [s for _, ss in items for s in ss]
            self._write_slots(tier, kv, slots, k.index_select(0, js).reshape(-1, bs, kv.head_dim),
                              v.index_select(0, js).reshape(-1, bs, kv.head_dim))
            for j, _ in items:
                self._track(kv, first_idx + j)

    # -- one step of one site --------------------------------------------------------------

    def plan(self, kv: LayerKV, past_len: int, new_len: int, q: torch.Tensor,
             policy: SelectionPolicy = EXACT, scale: float = 1.0) -> Plan:
        """Select what the site attends in the window ``[length - past - new, length)``."""
        start, end = kv.length - past_len - new_len, kv.length
        if past_len == 0:
            selected = window_blocks(kv, start, end).expand(kv.rows, -1)
            return Plan(kv, (start, end), selected, fresh_only=True)
        with self.lock:
            selected = select_blocks(kv, policy, q, start, end, scale)
            plan = Plan(kv, (start, end), selected, fresh_only=False, fetch=policy.attention == "fetch")
            for tier in Tier:
                part = plan.part(tier)
                self.selected_blocks[tier.name.lower()] += 0 if part is None else int(part.valid.sum())
            self._pin(plan)
            return plan

    def _pin(self, plan: Plan) -> None:
        """Keep the plan's device and host blocks where they are until its merge: another
        thread's step sharing this runtime may not evict them and reuse their slots while
        this step's attention reads them outside the lock."""
        kv = plan.layer
        ids = set()
        for tier in (Tier.DEVICE, Tier.HOST):
            part = plan.part(tier)
            if part is not None:
                ids.update(part.ids[part.valid].tolist())
        plan.pinned = tuple(ids)
        for idx in ids:
            kv.pins[idx] = kv.pins.get(idx, 0) + 1

    def unpin(self, plan: Plan) -> None:
        """The plan is done (merged, or its step failed): its blocks may move again."""
        with self.lock:
            pins = plan.layer.pins
            for idx in plan.pinned:
                if pins.get(idx, 0) > 1:
                    pins[idx] -= 1
                else:
                    pins.pop(idx, None)
            plan.pinned = ()

    def prefetch(self, plan: Plan) -> None:
        """Start reading the plan's disk blocks into host memory, one request per run of slots."""
        part = None if plan.fresh_only else plan.part(Tier.DISK)
        if part is None:
            return
        needed = torch.unique(part.slots[part.valid])                        # sorted
        disk = self._disk(plan.layer)
        plan.disk_slots = needed
        plan.disk_read = self.submit_io(disk.read, needed.tolist())
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
        t0 = time.perf_counter()
        k, v = plan.disk_read.result()
        waited = time.perf_counter() - t0
        self.stage_seconds["io_wait"] += waited
        # the stage that waited (its own time counts the rest)
        self.stage_seconds["device_attention" if plan.fetch else "cpu_attention"] -= waited
        disk = plan.part(Tier.DISK)
        index = torch.where(disk.valid, torch.searchsorted(plan.disk_slots, disk.slots), 0)
        return k, v, TierPart(disk.ids, index, disk.valid)

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
                self.moved["host->device"] += 2 * k.numel() * k.element_size()
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
            for session in self.sessions.values():
                for kv in session.layers.values():
                    sb = slot_bytes(self.block_size, kv.head_dim, kv.dtype)
                    for block in kv.blocks.values():
                        ts = tiers[block.tier.name.lower()]
                        ts.resident_blocks += 1
                        ts.resident_bytes += kv.rows * sb
            disk = tiers["disk"]
            disk.reserved_bytes = sum(f.capacity * f.slot_bytes for s in self.sessions.values()
                                      for f in s.disk_files.values())
            return RuntimeStats(tiers, dict(self.moved), dict(self.selected_blocks), dict(self.stage_seconds),
                                len(self.sessions), self.sessions_closed, self.steps)


def _on(step: StepMask, device: str) -> StepMask:
    bias = None if step.bias is None else step.bias.to(device)
    return StepMask(step.start, step.end, bias, step.is_causal)
