"""One step of one attention site, as the custom ops run it (the only module they call):
open, append, ahead-of-need reads, select (plan: which blocks, where each lies, the cache
policy's moves), prefetch, attend on each side (the CPU part inline or on the worker), merge. Each returns what the next stage needs, so the graph
can carry the order as data. Plan once on the host, run the attention from it (FlashInfer's
split).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
import torch

from . import placement
from .block_attention import StepMask, attend, attend_gathered, attend_part, empty_partial, gather_part, to_bias
from .device_copies import HostCopy, to_device, to_host
from .disk import outcome, raise_kept
from .kv_runtime import CPU_WORKER_PREFIX, KVRuntime, Session
from .layer_kv import LayerKV, TierPart, flat_entries, tier_part
from .selection import EXACT, SelectionPolicy, scored, select_scored, window_blocks
from .standins import StandInKey, is_standin_like, token_span
from .tiers import Tier, slot_bytes
from ..kernels.cpu_attention import cpu_partial_attention
from ..kernels.merge import merge_partials
from ..kernels.paged_attention import paged_attention

_plan_ids = itertools.count(1)

OUTSIDE_READ = (
    "the KV cache handed to the compiled model holds values that were read or rewritten outside "
    "the compiled graph (beam search reorders the cache; editing it, or slicing it other than "
    "cropping its last tokens, does the same); kvdrive keeps the KV in its runtime and cannot "
    "follow such changes. Use greedy or sampling decoding (num_beams=1; assisted and "
    "prompt-lookup decoding, which crop, are fine), and do not edit the cache between steps.")


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
    disk_reads: list = field(default_factory=list)   # (sorted slots, future of their k, v), as started
    disk_slots: Optional[torch.Tensor] = None        # every disk slot the plan reads, sorted (once staged)
    host_part: Optional[Union[Future, Callable]] = None   # the CPU part: on the worker, or deferred inline
    pinned: tuple = ()                     # (rows, blocks) of device/host entries held in place until the merge
    fills: list = field(default_factory=list)   # admitted disk blocks: (tier, rows, blocks, slots), filled when read
    staged: Optional[tuple] = None         # the disk read once landed: k, v and its TierPart
    # the thread whose step made the plan (another thread short of device room waits for its merge)
    thread: threading.Thread = field(default_factory=threading.current_thread)

    @property
    def tokens_attended(self) -> int:
        return self.selected.shape[1] * self.layer.block_size

    def part(self, tier: Tier) -> Optional[TierPart]:
        if tier not in self.parts:
            self.parts[tier] = tier_part(self.layer, self.selected, tier)
        return self.parts[tier]


@dataclass
class Ahead:
    """A read started before a layer's step asked for it (``prefetch_ahead``): ``slots`` sorted,
    and the (row, block) each held when read; a slot reused since is not taken from it."""

    slots: torch.Tensor
    rows: np.ndarray
    blocks: np.ndarray
    read: Future


def open_step(rt: KVRuntime, past_k: torch.Tensor, sites: int = 1) -> Session:
    """The session this forward call belongs to, from the first site's past keys. sites: the
    graph's attention sites (a model split into several graphs has at least that many)."""
    key = rt.standins.lookup(past_k)
    with rt.lock:
        rt.steps += 1
        if key is None:
            rt.sweep()
            session = rt.open_session(sites)
            session.step = rt.steps
            return session
        session = rt.session(key.session_id)
        session.sites = max(session.sites, sites)
        session.step, session.phase = rt.steps, "decode"
        for f in session.disk_files.values():      # a background home write that failed: say so now
            if f.error is not None:                # and give the generation's KV back (it cannot go on)
                rt.release(session.id)
                raise_kept(f.error)
        for pid in list(session.plans):         # left by a step that did not finish
            end_plan(rt, session, pid)
        return session


def _past_span(rt: KVRuntime, session: Session, kv: LayerKV, past: torch.Tensor, kind: str) -> Optional[tuple[int, int]]:
    """(first layer token, count) that ``past`` stands for; None if it is real KV to import.

    The past must end at or before the layer's last token: ending before it, the cache was
    cropped (speculative decoding drops the draft tokens it rejected) and the caller forgets the
    rest. It starts at token 0, or for a layer that keeps only its last tokens (a sliding
    window) at a token still held.
    """
    if past.numel() == 0:
        if kv.length:
            raise RuntimeError(f"{rt.layer_label(kv.layer)}: the cache was emptied outside the compiled graph. {OUTSIDE_READ}")
        return 0, 0
    key = rt.standins.lookup(past)
    if key is None:
        if is_standin_like(past) or bool(torch.isnan(past).any()):   # e.g. a reordered stand-in
            raise RuntimeError(f"{rt.layer_label(kv.layer)}: the cache holds a {tuple(past.shape)} stand-in of KV that "
                               f"no kvdrive session holds (released, or made from one outside the graph). {OUTSIDE_READ}")
        if kv.length:
            raise RuntimeError(f"{rt.layer_label(kv.layer)}: got real KV for a layer the runtime already holds. {OUTSIDE_READ}")
        return None
    if key != StandInKey(session.id, kv.layer, kind):
        raise RuntimeError(f"{rt.layer_label(kv.layer)}: the cache holds the {key.kind} of layer {key.layer} of session "
                           f"{key.session_id}, not this layer's. {OUTSIDE_READ}")
    span = token_span(past)
    p = past.shape[-2]
    if span is not None and (past.shape[0], past.shape[1]) == (kv.batch, kv.kv_heads):
        check_not_cropped(rt, past, kv.layer, span)
        first, _ = span
        end = first + p
        if end <= kv.length and (first == 0 or (kv.keeps_last and first >= kv.first * rt.block_size)):
            return first, p
    raise RuntimeError(f"{rt.layer_label(kv.layer)}: the cache holds tokens {_describe(span, p)} of a "
                       f"[{past.shape[0]}, {past.shape[1]}] batch; the runtime holds [{kv.first * rt.block_size}, "
                       f"{kv.length}) of [{kv.batch}, {kv.kv_heads}]. {OUTSIDE_READ}")


def check_not_cropped(rt: KVRuntime, standin: torch.Tensor, layer: int, span: tuple[int, int]) -> None:
    """A clear error if ``standin`` (tokens ``span``: first, count) was made before its layer
    was cropped at or before the span's end: the tokens there now are others."""
    limit = rt.standins.end_limit(standin)
    first, n = span
    if limit is not None and first + n > limit:
        raise RuntimeError(f"{rt.layer_label(layer)}: the cache holds tokens [{first}, {first + n}) of a stand-in made "
                           f"before the layer was cropped at token {limit}; the tokens there now are others. "
                           f"{OUTSIDE_READ}")


def _describe(span: Optional[tuple[int, int]], p: int) -> str:
    return f"[{span[0]}, {span[0] + p})" if span is not None else f"(a slice kvdrive cannot place, {p} long)"


def append(rt: KVRuntime, session: Session, layer: int, past_k: torch.Tensor, past_v: torch.Tensor,
           k_new: torch.Tensor, v_new: torch.Tensor, keeps_last: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Store the new K/V; returns the stand-ins for ``cat([past, new])`` and the past length.

    k_new, v_new: ``[B, Hkv, n, D]``; past_k, past_v: stand-ins from the last step, empty, or
    real KV from outside (imported once).
    """
    kv = rt.layer(session, layer, k_new, keeps_last)
    span = _past_span(rt, session, kv, past_k, "k")
    if span != _past_span(rt, session, kv, past_v, "v"):
        raise RuntimeError(f"{rt.layer_label(layer)}: keys and values of the cache disagree. {OUTSIDE_READ}")
    if span is None:                                                  # real KV: import it
        placement.append(rt, kv, past_k.to(k_new.dtype), past_v.to(v_new.dtype))
        p = past_k.shape[-2]
    else:
        first, p = span
        if first + p < kv.length:                                     # cropped: forget the rest
            crop(rt, kv, first + p)
    placement.drop_before(rt, kv, kv.length - p)
    placement.append(rt, kv, k_new, v_new)
    total = p + k_new.shape[2]
    k_out = rt.standins.make(StandInKey(session.id, layer, "k"), k_new, total, kv.length - total)
    v_out = rt.standins.make(StandInKey(session.id, layer, "v"), v_new, total, kv.length - total)
    return k_out, v_out, p


def crop(rt: KVRuntime, kv: LayerKV, length: int) -> None:
    """Forget the layer's tokens from ``length`` on (Hugging Face's ``cache.crop``: assisted and
    prompt-lookup decoding drop the draft tokens the model rejected): their blocks, their
    summaries, and what stand-ins made before may stand for. Later tokens take their places."""
    bs = rt.block_size
    with rt.lock:
        _drop_ahead(rt, kv)                  # a read started for blocks that may be gone
        start = length - length % bs
        keys = read_window(rt, kv, start, length)[0].reshape(kv.rows, -1, kv.head_dim) if length % bs else None
        removed = kv.length - length
        placement.truncate(rt, kv, length)
        kv.summaries.truncate(length, keys)
        rt.standins.cut(kv.session_id, kv.layer, length)
        rt.cropped_tokens += removed


def select(rt: KVRuntime, session: Session, layer: int, past_len: int, new_len: int,
           q: torch.Tensor, policy: SelectionPolicy = EXACT, scale: float = 1.0, shared: bool = False) -> int:
    """Plan what the site attends this step (q: ``[B, Hq, Q, D]``, scale: the softmax scale);
    shared: the site attends ``layer``'s KV but is another layer (``plan_step``). Returns the
    plan id."""
    plan = plan_step(rt, session.layers[layer], past_len, new_len, q, policy, scale, shared)
    pid = next(_plan_ids)
    session.plans[pid] = plan
    return pid


def end_plan(rt: KVRuntime, session: Session, plan_id: int) -> None:
    """Forget a plan once merged; its blocks may move again."""
    plan = session.plans.pop(plan_id, None)
    if plan is not None:
        unpin(rt, plan)


def plan_of(rt: KVRuntime, session_id: int, plan_id: int) -> Plan:
    plan = rt.session(session_id).plans.get(plan_id)
    if plan is None:
        raise RuntimeError(f"kvdrive plan {plan_id} of session {session_id} is gone: a step's ops ran out of order")
    return plan


def step_mask(plan: Plan, mask: Optional[torch.Tensor], is_causal: bool, softcap: float = 0.0) -> StepMask:
    start, end = plan.window
    if mask is not None and 1 < mask.shape[-1] < end - start:
        raise RuntimeError(f"attention mask covers {mask.shape[-1]} keys, the cache holds {end - start}: the model "
                           f"masks fewer keys than it attends, which kvdrive cannot line up with its cache")
    bias = to_bias(mask)
    if bias is not None and bias.shape[-1] == 1:        # one value for every key: broadcast, as SDPA does
        bias = bias.expand(*bias.shape[:-1], end - start)
    elif bias is not None and bias.shape[-1] > end - start:
        bias = bias[..., : end - start]
    return StepMask(start, end, bias, is_causal, softcap)


def merge(parts: list[Optional[tuple[torch.Tensor, torch.Tensor]]], dtype: torch.dtype) -> torch.Tensor:
    """The attention output in ``dtype`` from fp32 partial results (out, lse); None: a part that
    attended nothing (a CPU decode step with every block on the device tier has one part)."""
    parts = [p for p in parts if p is not None]
    out, _ = merge_partials([o for o, _ in parts], [l for _, l in parts])
    return out.to(dtype)


def sink_part(sinks: Optional[torch.Tensor], out: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Attention sinks (gpt-oss) as a partial result: a logit per (sequence, head, query)
    ``[B, Hq, Q, 1]`` that joins the softmax's denominator and attends nothing (out 0)."""
    if sinks is None:
        return None
    lse = sinks.to(device=out.device, dtype=torch.float32).squeeze(-1).expand(out.shape[:-1])
    return torch.zeros_like(out, dtype=torch.float32), lse


def plan_step(rt: KVRuntime, kv: LayerKV, past_len: int, new_len: int, q: torch.Tensor,
              policy: SelectionPolicy = EXACT, scale: float = 1.0, shared: bool = False) -> Plan:
    """Select what the site attends in the window ``[length - past - new, length)``, and
    move copies as the cache policy says.

    shared: the site is a layer that attends ``kv`` (an earlier layer's KV: Gemma 3n's and
    Gemma 4's KV-sharing layers) with its own queries. It selects with the same policy and
    budget, and reads each block where it lies: the cache policy's moves, its demand and the
    kept ranking stay those of the layer that owns the KV, which planned this step already."""
    start, end = kv.length - past_len - new_len, kv.length
    bs = rt.block_size
    with rt.lock:
        kv.pinned_front = -(-policy.sink_tokens // bs) if policy.sink_tokens else 0
        kv.pinned_back = -(-policy.local_window // bs) + 1
        if not shared:
            _expect_demand(rt, kv, policy)
        placement.place_fresh(rt, kv, placement.warm_scores(rt, kv, policy, q, scale))
        if past_len == 0:
            selected = window_blocks(kv, start, end).expand(kv.rows, -1)
            return Plan(kv, (start, end), selected, fresh_only=True)
        # the token budget is a decode step's: a step that brings several tokens (a prompt fed
        # in chunks, a conversation continued on its cache) attends every token, as a prefill does
        selected, _ = select_scored(kv, policy if new_len == 1 else EXACT, q, start, end, scale, rt.rankings,
                                    remember=not shared)
        plan = Plan(kv, (start, end), selected, fresh_only=False, fetch=policy.attention == "fetch")
        t0 = time.perf_counter()                  # the rest: the cache policy's moves (timeline: "plan")
        served = placement.count_served(rt, kv, selected)
        if rt.device_home or shared:            # nothing moves: a tier serving none needs no split
            plan.parts.update({tier: None for tier in Tier if not served[tier]})
        else:                                   # the policy's moves change where blocks lie
            placement.cache_step(rt, kv, plan)
        for tier in Tier:
            part = plan.part(tier)
            rt.selected_blocks[tier.name.lower()] += 0 if part is None else int(part.valid.sum())
        _pin(rt, plan)
        if rt.tracer.enabled:
            rt.trace("plan", t0, time.perf_counter(), kv.session_id, kv.layer)
        return plan


def _expect_demand(rt: KVRuntime, kv: LayerKV, policy: SelectionPolicy) -> None:
    """How many (row, block) entries the layer's decode steps select (its share of the device
    cache follows it): every block of a layer that is not ranked, the budget's of one that is."""
    nb = kv.num_blocks - kv.first
    budget = policy.budget_tokens(kv.length)
    ranked = None if budget is None else min(nb, max(1, budget // kv.block_size))
    kv.demand = kv.rows * (ranked if ranked is not None and scored(kv, policy) else nb)
    session = rt.sessions[kv.session_id]
    session.typical_demand = kv.rows * (nb if ranked is None else ranked)


def _pin(rt: KVRuntime, plan: Plan) -> None:
    """Keep the plan's device and host blocks where they are until its merge: another
    thread's step sharing this runtime may not evict them and reuse their slots while
    this step's attention reads them outside the lock. Without a device budget nothing is
    ever evicted: nothing to hold."""
    if rt.device_home:
        return
    kv = plan.layer
    selected = plan.selected.numpy()
    rows = np.broadcast_to(np.arange(kv.rows)[:, None], selected.shape)
    table = kv.where()[0]
    tier = np.take(table, flat_entries(selected, table.shape[1]))   # where the step reads each selected block
    held = (tier == Tier.DEVICE) | (tier == Tier.HOST)
    if held.any():
        r, c = rows[held], selected[held]
        kv.pins[r, c] += 1          # a row selects a block once: no pair repeats (no np.add.at)
        plan.pinned = (r, c)


def unpin(rt: KVRuntime, plan: Plan) -> None:
    """The plan is done (merged, or its step failed): its blocks may move again."""
    with rt.lock:
        kv = plan.layer
        if plan.pinned:
            kv.pins[plan.pinned] -= 1
            plan.pinned = ()
        for tier, _, _, slots in plan.fills:         # a read that never landed: give the slots back
            rt.pool(tier, kv).release(slots.tolist())
        plan.fills = []
        rt.room.notify_all()


def prefetch_ahead(rt: KVRuntime, session: Session, layer: int) -> None:
    """Start reading, before the layer's step asks, the disk blocks its last decode step
    selected that are cached nowhere (consecutive steps select largely the same blocks). A
    wrong guess costs bandwidth, never correctness: the step's own selection decides what
    is attended, and takes from this read only the blocks it selected."""
    kv = session.layers.get(layer)
    if kv is None or session.phase != "decode" or kv.step == 0 or rt.device_home or not rt.ahead_reads:
        return
    with rt.lock:
        # complete blocks only: the open one gets this step's token (written in place on disk
        # where it lives there), so a copy read now would be stale, and the read would race
        # that write
        first, nb = kv.first, min(kv.num_blocks, kv.length // kv.block_size)
        pick = kv.last_pick                         # the entries the layer's last step selected
        if nb <= first or pick is None or pick.step != kv.step:
            return
        inside = (pick.blocks >= first) & (pick.blocks < nb)
        rows, blocks = pick.rows[inside], pick.blocks[inside]
        want = (kv.home[rows, blocks] == Tier.DISK) & (kv.dev[rows, blocks] < 0) & (kv.host[rows, blocks] < 0)
        rows, blocks = rows[want], blocks[want]
        if not rows.size:
            return
        slots = kv.home_slot[rows, blocks].astype(np.int64)
        order = np.argsort(slots, kind="stable")
        disk = rt.disk(kv)
        ahead = Ahead(torch.from_numpy(slots[order]), rows[order], blocks[order], disk.read_async(slots[order].tolist(), layer=kv.layer))
        rt.moved["disk->host"] += rows.size * disk.slot_bytes
        _drop_ahead(rt, kv)
        kv.ahead = ahead


def _drop_ahead(rt: KVRuntime, kv: LayerKV, used: int = 0) -> None:
    if kv.ahead is not None:
        rt.prefetch["unused"] += len(kv.ahead.rows) - used
        kv.ahead = None


def prefetch(rt: KVRuntime, plan: Plan) -> None:
    """Start reading the plan's disk blocks into host memory, one request per run of slots,
    except those an ahead-of-need read (``prefetch_ahead``) has or is bringing."""
    kv = plan.layer
    part = None if plan.fresh_only else plan.part(Tier.DISK)
    if part is None:
        with rt.lock:
            _drop_ahead(rt, kv)
        return
    rows, cols = torch.nonzero(part.valid, as_tuple=True)
    slots, blocks = part.slots[rows, cols], part.ids[rows, cols]
    needed = torch.ones(len(slots), dtype=torch.bool)
    with rt.lock:
        ahead, used = kv.ahead, 0
        if ahead is not None and len(ahead.rows):
            at = torch.searchsorted(ahead.slots, slots).clamp_(max=len(ahead.rows) - 1)
            hit = ((ahead.slots[at] == slots) & (torch.from_numpy(ahead.rows)[at] == rows)
                   & (torch.from_numpy(ahead.blocks)[at] == blocks))
            took = torch.unique(at[hit])
            used = len(took)
            if used:
                landed = ahead.read.done()
                rt.prefetch["landed" if landed else "in_flight"] += int(hit.sum())
                plan.disk_reads.append((ahead.slots, ahead.read, took))
            needed = ~hit
        _drop_ahead(rt, kv, used)
        rt.prefetch["missed"] += int(needed.sum())
    need = torch.unique(slots[needed])                        # sorted
    if len(need):
        disk = rt.disk(kv)
        plan.disk_reads.append((need, disk.read_async(need.tolist(), layer=kv.layer), None))   # adjacent slots coalesced
        rt.moved["disk->host"] += need.numel() * disk.slot_bytes


def start_host_attention(rt: KVRuntime, plan: Plan, q: torch.Tensor, step: StepMask, scale: float) -> None:
    """Start the CPU part (``host_attention``) on the worker, so the caller goes on to the
    device part; ``finish_host_attention`` awaits it. Where it runs inline (no worker: the
    default on a CPU, where the "device" part is CPU work too), it is deferred to
    ``finish_host_attention``, after the device part: the disk reads ``prefetch`` started
    have the device part's time to land before the CPU part waits for them. Nothing to do
    where there is nothing to attend on the CPU."""
    if plan.fetch or plan.fresh_only or (plan.part(Tier.HOST) is None and not plan.disk_reads):
        return                                    # nothing on the CPU
    # q and the mask go to the host without waiting (from a GPU); the CPU part waits for them alone.
    # Inline, it runs after this op has returned and the graph may have reused their memory: copies
    worker = rt.async_cpu or (rt.async_cpu is None and q.device.type != "cpu")
    q_host, bias = to_host(q, own=not worker), to_host(step.bias, own=not worker)
    if worker:
        plan.host_part = rt.submit_cpu(_timed_host_attention, rt, plan, q_host, step, bias, scale)
    else:
        plan.host_part = functools.partial(_host_attention_of, rt, plan, q_host, step, bias, scale)


def host_part_deferred(plan: Plan) -> bool:
    """Whether the plan's CPU part waits to run inline in ``finish_host_attention``."""
    return plan.host_part is not None and not isinstance(plan.host_part, Future)


def finish_host_attention(rt: KVRuntime, plan: Plan, q: torch.Tensor):
    """The CPU part's fp32 (out, lse) on q's device (None if there was none): waits for the
    worker's, or runs a deferred inline one now."""
    part = plan.host_part
    if part is None:
        return None
    plan.host_part = None
    out, lse = outcome(part) if isinstance(part, Future) else part()
    return to_device(out, q.device), to_device(lse, q.device)


def _host_attention_of(rt: KVRuntime, plan: Plan, q: HostCopy, step: StepMask, bias: Optional[HostCopy],
                       scale: float):
    """``host_attention`` once q and the mask's bias have reached the host."""
    return host_attention(rt, plan, q.get(), dataclasses.replace(step, bias=None if bias is None else bias.get()),
                          scale)


def _timed_host_attention(rt: KVRuntime, plan: Plan, q: HostCopy, step: StepMask, bias: Optional[HostCopy],
                          scale: float):
    t0 = time.perf_counter()
    try:
        return _host_attention_of(rt, plan, q, step, bias, scale)
    finally:
        t1 = time.perf_counter()
        rt.add_seconds("cpu_attention", t1 - t0, background=True)
        if rt.tracer.enabled:
            rt.trace("cpu_attention", t0, t1, plan.layer.session_id, plan.layer.layer)


def host_attention(rt: KVRuntime, plan: Plan, q: torch.Tensor, step: StepMask, scale: float):
    """Host- and disk-resident blocks, on the CPU. q: ``[B, Hq, Q, D]`` and step on the CPU;
    returns fp32 (out, lse) on the CPU."""
    kv = plan.layer
    if plan.fetch or plan.fresh_only:
        return empty_partial(q)                   # attended on the device
    parts = []
    host = plan.part(Tier.HOST)
    if host is not None:
        pool = rt.pool(Tier.HOST, kv)
        parts.append(_measured(rt, "cpu_attention", kv, host, attend_part, q, pool.k, pool.v, host, kv, step, scale,
                               cpu_partial_attention))
    if plan.disk_reads:
        k, v, staged = _staged_disk(rt, plan)
        parts.append(_measured(rt, "cpu_attention", kv, staged, attend_part, q, k, v, staged, kv, step, scale,
                               cpu_partial_attention))
    if not parts:
        return empty_partial(q)
    return merge_partials([p[0] for p in parts], [p[1] for p in parts])


def device_attention(rt: KVRuntime, plan: Plan, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     step: StepMask, scale: float):
    """Device-resident blocks (or, on a prefill, this step's new tokens as they are)."""
    if plan.fresh_only:                        # the window is exactly the new tokens
        bias = None if step.bias is None else step.bias[..., : k_new.shape[2]]
        return attend(q, k_new, v_new, scale, bias, step.is_causal, step.softcap)
    if plan.fetch:
        return _fetch_attention(rt, plan, q, step, scale)
    part = plan.part(Tier.DEVICE)
    if part is None:
        return empty_partial(q)
    pool = rt.pool(Tier.DEVICE, plan.layer)
    return _measured(rt, "device_attention", plan.layer, part, attend_part, q, pool.k, pool.v, part, plan.layer,
                     step, scale, paged_attention)


def _measured(rt: KVRuntime, name: str, kv, part, fn, *args):
    """``fn(*args)``, its time and the bytes of ``part``'s blocks given to the admission model."""
    model = placement.admission_model(rt, kv)
    if model is None or not model.measures(name):
        return fn(*args)
    t0 = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - t0
    model.measured(name, int(part.valid.sum()) * slot_bytes(rt.block_size, kv.head_dim, kv.dtype), seconds)
    return out


def _staged_disk(rt: KVRuntime, plan: Plan):
    """The plan's disk blocks once read: staging k, v ``[n, bs, D]`` and their TierPart."""
    if plan.staged is None:
        t0 = time.perf_counter()
        pieces = []
        for slots, read, take in plan.disk_reads:
            k, v = read.result()
            pieces.append((slots, k, v) if take is None else (slots[take], k[take], v[take]))
        t1 = time.perf_counter()
        background = threading.current_thread().name.startswith(CPU_WORKER_PREFIX)
        # the stage that waited counts the rest of its time
        rt.add_seconds("io_wait", t1 - t0, background)
        rt.add_seconds("device_attention" if plan.fetch else "cpu_attention", t0 - t1, background)
        if rt.tracer.enabled:
            rt.trace("io_wait", t0, t1, plan.layer.session_id, plan.layer.layer)
        slots, k, v = (torch.cat(x) for x in zip(*pieces)) if len(pieces) > 1 else pieces[0]
        order = torch.argsort(slots)
        plan.disk_slots, k, v = slots[order], k[order], v[order]
        if plan.fills:
            placement.fill_from_disk(rt, plan, k, v)
        disk = plan.part(Tier.DISK)
        index = torch.where(disk.valid, torch.searchsorted(plan.disk_slots, disk.slots), 0)
        plan.staged = (k, v, TierPart(disk.ids, index, disk.valid))
    return plan.staged


def _fetch_attention(rt: KVRuntime, plan: Plan, q: torch.Tensor, step: StepMask, scale: float):
    """Copy every selected block to the device and attend there (the baselines' design)."""
    kv = plan.layer
    pieces = []
    for tier in Tier:
        part = plan.part(tier)
        if part is None:
            continue
        if tier == Tier.DISK:
            k_pool, v_pool, part = _staged_disk(rt, plan)
        else:
            pool = rt.pool(tier, kv)
            k_pool, v_pool = pool.k, pool.v
        k, v, pos = gather_part(k_pool, v_pool, part, kv)
        if tier != Tier.DEVICE:
            rt.moved["host->device"] += 2 * int(part.valid.sum()) * rt.block_size * kv.head_dim * k.element_size()
        pieces.append((k.to(q.device), v.to(q.device), pos.to(q.device)))
    if not pieces:
        return empty_partial(q)
    k, v, pos = (torch.cat(x, dim=d) for x, d in zip(zip(*pieces), (2, 2, 1)))
    return attend_gathered(q, k, v, pos, kv, step, scale)


def read_window(rt: KVRuntime, kv: LayerKV, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token of positions ``[start, end)`` of a layer, gathered from whatever tier
    each block lies on: k, v ``[B, Hkv, end - start, D]`` on the layer's device."""
    with rt.lock:
        placement.place_fresh(rt, kv)
        if start < kv.first * rt.block_size or end > kv.length:
            raise RuntimeError(f"{rt.layer_label(kv.layer)}: tokens [{start}, {end}) are not all held "
                               f"(held: [{kv.first * rt.block_size}, {kv.length}))")
        blocks = window_blocks(kv, start, end)
        first, bs, d = int(blocks[0]) if len(blocks) else 0, rt.block_size, kv.head_dim
        k_out = torch.zeros((kv.rows, len(blocks), bs, d), dtype=kv.dtype, device=kv.device)
        v_out = torch.zeros_like(k_out)
        for tier in Tier:
            part = tier_part(kv, blocks.expand(kv.rows, -1), tier) if len(blocks) else None
            if part is None:
                continue
            rows, cols = torch.nonzero(part.valid, as_tuple=True)
            slots = part.slots[rows, cols]
            if tier == Tier.DISK:
                k, v = rt.disk(kv).read(slots.tolist(), layer=kv.layer)
            else:
                pool = rt.pool(tier, kv)
                k, v = pool.k[slots.to(pool.device)], pool.v[slots.to(pool.device)]
            at = (rows.to(kv.device), (part.ids[rows, cols] - first).to(kv.device))
            k_out[at], v_out[at] = k.to(kv.device), v.to(kv.device)
        offset = start - first * bs
        shape = (kv.batch, kv.kv_heads, end - start, d)
        return tuple(t.reshape(kv.rows, -1, d)[:, offset:offset + end - start].reshape(shape)
                     for t in (k_out, v_out))

