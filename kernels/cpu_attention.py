"""Paged partial attention on the CPU (numba), reading K/V where they lie in the host pools.

Layout (shared with kernels/paged_attention.py): ``k_pool, v_pool: [num_slots, block_size, D]``;
``block_table, block_lens: int32 [B, Hkv, NB]`` list, per (sequence, KV head), the slots it
attends (``-1`` = unused entry) and how many leading tokens of each are valid.

How it is fast:
- GQA packing: all query rows that share a KV head (GQA group x query tokens) are computed in
  one pass over that head's blocks, so each K/V byte is read once per call.
- Work items: every (sequence, KV head) block list is cut into ranges holding equal numbers
  of valid blocks, about four per thread, so that all cores stay busy at batch 1; each range
  keeps an online softmax and the ranges are merged by their log-sum-exp.
- Register blocking, K/V read where they lie: scores and the value sum take four query rows x
  four tokens per pass over head_dim, so each K/V value is loaded and widened once per four
  rows straight from the pool (no widened copy), each query vector once per four tokens, and
  sixteen independent sums hide the FMA latency. numba has neither fp16 nor bf16: fp16 goes
  through LLVM's ``half`` (vcvtph2ps), bf16 by moving its bits to the high half of a float32.
- Prefetch: the blocks are at random places, so the hardware prefetcher cannot guess them.
  While a block is computed, eight blocks ahead are hinted at once, round robin one line at a
  time, each over eight block times (``_plan_hints``), spread between the compute steps.
  Measured, that reads ~20 % (fp16) to ~25 % (fp32) faster than hinting one block at a time;
  the likely reason is that the L2 streamer follows the eight pages read in ascending order and
  fetches ahead in them, more bytes in flight than the core's line fill buffers allow hints.
  Each thread takes one contiguous chunk of work items and its hints run on across them (the
  next item's first blocks are hinted while this one ends), so no item starts cold.
- 512-bit vectors where the CPU has them (``_wide_vectors``).
- Exp: a float32 polynomial that LLVM vectorizes (kernels/numba_math.py).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.extending import intrinsic

from .numba_math import FASTMATH as _FASTMATH, exp_f32, parallel_launch, start_thread_pool, wide_vectors as _wide_vectors
from .paged_layout import POISON_ENV, check_paged_args

__all__ = ["cpu_partial_attention", "warm_up", "POISON_ENV"]

_MIN_BLOCKS_PER_ITEM = 8       # a work item smaller than this costs more to merge than it saves
_ITEMS_PER_THREAD = 4          # equal-sized items per thread, so a static schedule balances
_PREFETCH_DISTANCE = 2         # blocks: the nearest block being hinted is this far ahead
_PREFETCH_STREAMS = 8          # blocks hinted at once, round robin, each over this many block times
_LINE = 64                     # bytes per cache line
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_NEG_INF = np.float32(-np.inf)


# -- register-level helpers (LLVM intrinsics numba does not expose) --

@intrinsic
def _widen(typingctx, x):
    """One stored K/V value to float32: float32 as is, uint16 = fp16 bits, int16 = bf16 bits."""
    if x not in (types.float32, types.uint16, types.int16):
        return None

    def codegen(context, builder, sig, args):
        (v,) = args
        if x == types.float32:
            return v
        if x == types.uint16:
            return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())
        high = builder.shl(builder.zext(v, ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(high, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _prefetch(typingctx, address):
    """Hint the cache to fetch the line holding byte ``address``; never faults."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [ptr.type], fnty)
        # read, low temporal locality (prefetcht2: the block is used once, soon), data cache
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 1), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(address), codegen


# -- planning: cut every (sequence, KV head) block list into equal work items --

@njit(cache=True, nogil=True)
def _plan_items(block_table, target_items, min_blocks):
    """block_table: [B, Hkv, NB] int32. Returns ``first [B*Hkv + 1]`` (items of row bh are
    ``first[bh]:first[bh+1]``), ``lo, hi [n_items]``: each item's entry range in its row, and the
    largest slot listed (-1 if none), which the caller checks against the pools' size."""
    b_, hkv, nb = block_table.shape
    valid = np.zeros(b_ * hkv, np.int64)
    top = -1
    for bh in range(b_ * hkv):
        for j in range(nb):
            slot = block_table[bh // hkv, bh % hkv, j]
            valid[bh] += slot >= 0
            top = max(top, slot)
    chunk = max(min_blocks, -(-valid.sum() // target_items))
    first = np.zeros(b_ * hkv + 1, np.int64)
    for bh in range(b_ * hkv):
        first[bh + 1] = first[bh] + max(1, -(-valid[bh] // chunk))
    lo = np.zeros(first[-1], np.int64)
    hi = np.full(first[-1], nb, np.int64)
    for bh in range(b_ * hkv):
        item, seen = first[bh], 0
        for j in range(nb):
            if block_table[bh // hkv, bh % hkv, j] < 0:
                continue
            if seen == chunk:                                   # close this item at entry j
                hi[item] = j
                item += 1
                lo[item] = j
                seen = 0
            seen += 1
    return first, lo, hi, top


# -- the work: one item = one (sequence, KV head) entry range, all its query rows --

@njit(inline="always")
def _plan_hints(i, slots, ns, count, pools, runs, cursor):
    """Plan the cache-line hints to give while block ``i`` of ``slots[:count]`` is computed
    (the blocks of a thread's whole chunk of work items, in the order it computes them, so
    the hints run on from one item into the next).

    Round robin over ``_PREFETCH_STREAMS`` (W) blocks: block ``i + _PREFETCH_DISTANCE + w``
    gives segment ``W - 1 - w`` of its lines (K's, then V's, cut in W; at block 0 also the
    segments before it), and the segments' lines are hinted in turn, one line each. So each
    block is hinted over W block times and W pages are read at once, each in ascending order:
    measured ~20-25 % faster than one block at a time (likely the L2 streamer following the W
    pages and fetching ahead in them, which needs none of the core's few line fill buffers).

    pools = (K base address, V base address, bytes per slot, bytes per token). Writes
    runs [2, 2W] (a segment's start address and its length in lines, split where it crosses
    from K to V) and cursor = [next round, rounds, rounds per call, runs]."""
    k_base, v_base, slot_bytes, token_bytes = pools
    w_ = _PREFETCH_STREAMS
    nr, longest = 0, 0
    for w in range(w_):
        j = i + _PREFETCH_DISTANCE + w
        if j >= count:
            break
        half = -(-ns[j] * token_bytes // _LINE)                  # lines of K (and of V)
        seg = w_ - 1 - w
        a, b = seg * 2 * half // w_, (seg + 1) * 2 * half // w_
        if i == 0:                                        # and what earlier times would have given
            a = 0
        base = slots[j] * slot_bytes
        if a < half and a < b:                                    # its K lines
            runs[0, nr], runs[1, nr] = k_base + base + a * _LINE, min(b, half) - a
            longest = max(longest, runs[1, nr])
            nr += 1
        if b > half and b > a:                                    # its V lines
            a = max(a, half)
            runs[0, nr], runs[1, nr] = v_base + base + (a - half) * _LINE, b - a
            longest = max(longest, runs[1, nr])
            nr += 1
    cursor[0], cursor[1], cursor[3] = 0, longest, nr


@njit(inline="always")
def _prefetch_some(ahead):
    """Give the next rounds of planned hints (see _plan_hints): a round hints line ``k`` of every
    run. ahead = (runs, cursor). Called between the compute loops' steps, so the hints are
    spread over the block's compute (a burst in one place stalls on the line fill buffers)."""
    runs, cursor = ahead
    k = cursor[0]
    end = min(k + cursor[2], cursor[1])
    while k < end:
        for r in range(cursor[3]):
            if k < runs[1, r]:
                _prefetch(runs[0, r] + k * _LINE)
        k += 1
    cursor[0] = k


@njit(inline="always", fastmath=_FASTMATH)
def _scores(q, blk, n, p, ahead):
    """p[:, :n] = q @ widen(blk[:n]).T. q: [R, D]; blk: [BS, D] as stored; p: [R, BS].

    Register blocking: four query rows x four tokens per pass over D (the 1-3 tokens left of
    a partial block one at a time), so each K value is loaded and widened once per four rows, each query value once per four
    tokens, and sixteen independent sums hide the FMA latency (two tokens per pass, as before,
    read fp16 ~10 % slower cold)."""
    r_, d_ = q.shape
    r4, n4 = r_ - r_ % 4, n - n % 4
    for r in range(0, r4, 4):
        for t in range(0, n4, 4):
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = _ZERO
            s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = _ZERO
            for d in range(d_):
                k0, k1 = _widen(blk[t, d]), _widen(blk[t + 1, d])
                k2, k3 = _widen(blk[t + 2, d]), _widen(blk[t + 3, d])
                x0, x1, x2, x3 = q[r, d], q[r + 1, d], q[r + 2, d], q[r + 3, d]
                s00 += x0 * k0
                s01 += x0 * k1
                s02 += x0 * k2
                s03 += x0 * k3
                s10 += x1 * k0
                s11 += x1 * k1
                s12 += x1 * k2
                s13 += x1 * k3
                s20 += x2 * k0
                s21 += x2 * k1
                s22 += x2 * k2
                s23 += x2 * k3
                s30 += x3 * k0
                s31 += x3 * k1
                s32 += x3 * k2
                s33 += x3 * k3
            p[r, t], p[r, t + 1], p[r, t + 2], p[r, t + 3] = s00, s01, s02, s03
            p[r + 1, t], p[r + 1, t + 1], p[r + 1, t + 2], p[r + 1, t + 3] = s10, s11, s12, s13
            p[r + 2, t], p[r + 2, t + 1], p[r + 2, t + 2], p[r + 2, t + 3] = s20, s21, s22, s23
            p[r + 3, t], p[r + 3, t + 1], p[r + 3, t + 2], p[r + 3, t + 3] = s30, s31, s32, s33
            _prefetch_some(ahead)
        for t in range(n4, n):                                 # 1-3 tokens left (a partial block)
            s0 = s1 = s2 = s3 = _ZERO
            for d in range(d_):
                k0 = _widen(blk[t, d])
                s0 += q[r, d] * k0
                s1 += q[r + 1, d] * k0
                s2 += q[r + 2, d] * k0
                s3 += q[r + 3, d] * k0
            p[r, t], p[r + 1, t], p[r + 2, t], p[r + 3, t] = s0, s1, s2, s3
    for r in range(r4, r_):                                    # a last single row: 4 tokens per pass
        for t in range(0, n4, 4):
            s0 = s1 = s2 = s3 = _ZERO
            for d in range(d_):
                x = q[r, d]
                s0 += x * _widen(blk[t, d])
                s1 += x * _widen(blk[t + 1, d])
                s2 += x * _widen(blk[t + 2, d])
                s3 += x * _widen(blk[t + 3, d])
            p[r, t], p[r, t + 1], p[r, t + 2], p[r, t + 3] = s0, s1, s2, s3
            _prefetch_some(ahead)
        for t in range(n4, n):
            s0 = _ZERO
            for d in range(d_):
                s0 += q[r, d] * _widen(blk[t, d])
            p[r, t] = s0


@njit(inline="always", fastmath=_FASTMATH)
def _accumulate(p, blk, n, acc, ahead):
    """acc += p[:, :n] @ widen(blk[:n]). p: [R, BS]; blk: [BS, D] as stored; acc: [R, D].

    Register blocking: four rows x four tokens per pass over D: each V value is loaded and
    widened once per four rows, each accumulator loaded and stored once per four tokens."""
    r_, d_ = acc.shape
    r4, n4 = r_ - r_ % 4, n - n % 4
    for r in range(0, r4, 4):
        for t in range(0, n4, 4):
            w00, w01, w02, w03 = p[r, t], p[r, t + 1], p[r, t + 2], p[r, t + 3]
            w10, w11, w12, w13 = p[r + 1, t], p[r + 1, t + 1], p[r + 1, t + 2], p[r + 1, t + 3]
            w20, w21, w22, w23 = p[r + 2, t], p[r + 2, t + 1], p[r + 2, t + 2], p[r + 2, t + 3]
            w30, w31, w32, w33 = p[r + 3, t], p[r + 3, t + 1], p[r + 3, t + 2], p[r + 3, t + 3]
            for d in range(d_):
                v0, v1 = _widen(blk[t, d]), _widen(blk[t + 1, d])
                v2, v3 = _widen(blk[t + 2, d]), _widen(blk[t + 3, d])
                acc[r, d] += w00 * v0 + w01 * v1 + w02 * v2 + w03 * v3
                acc[r + 1, d] += w10 * v0 + w11 * v1 + w12 * v2 + w13 * v3
                acc[r + 2, d] += w20 * v0 + w21 * v1 + w22 * v2 + w23 * v3
                acc[r + 3, d] += w30 * v0 + w31 * v1 + w32 * v2 + w33 * v3
            _prefetch_some(ahead)
        for t in range(n4, n):
            w0, w1, w2, w3 = p[r, t], p[r + 1, t], p[r + 2, t], p[r + 3, t]
            for d in range(d_):
                v0 = _widen(blk[t, d])
                acc[r, d] += w0 * v0
                acc[r + 1, d] += w1 * v0
                acc[r + 2, d] += w2 * v0
                acc[r + 3, d] += w3 * v0
    for r in range(r4, r_):                                    # a last single row: 4 tokens per pass
        for t in range(0, n4, 4):
            w0, w1, w2, w3 = p[r, t], p[r, t + 1], p[r, t + 2], p[r, t + 3]
            for d in range(d_):
                acc[r, d] += (w0 * _widen(blk[t, d]) + w1 * _widen(blk[t + 1, d])
                              + w2 * _widen(blk[t + 2, d]) + w3 * _widen(blk[t + 3, d]))
            _prefetch_some(ahead)
        for t in range(n4, n):
            w0 = p[r, t]
            for d in range(d_):
                acc[r, d] += w0 * _widen(blk[t, d])


@njit(inline="always", fastmath=_FASTMATH)
def _softmax_update(p, n, m, l, acc):
    """Online softmax over one block's scores p[:, :n] (in place: p becomes exp(p - m_new)).
    m, l: [R] running max and sum of exp; acc: [R, D], rescaled when m grows."""
    r_, d_ = acc.shape
    for r in range(r_):
        mx = _NEG_INF
        for t in range(n):
            mx = max(mx, p[r, t])
        m_new = max(m[r], mx)
        total = _ZERO
        for t in range(n):
            e = exp_f32(p[r, t] - m_new)
            p[r, t] = e
            total += e
        if m_new > m[r]:                                       # m = -inf at first: acc is 0 anyway
            alpha = exp_f32(m[r] - m_new) if m[r] > _NEG_INF else _ZERO
            l[r] *= alpha
            for d in range(d_):
                acc[r, d] *= alpha
            m[r] = m_new
        l[r] += total


@njit(inline="always", fastmath=_FASTMATH)
def _soft_cap(p, n, softcap):
    """p[:, :n] = softcap * tanh(p[:, :n] / softcap) (logit soft-capping, Gemma 2)."""
    inv = _ONE / softcap
    for r in range(p.shape[0]):
        for t in range(n):
            p[r, t] = softcap * np.tanh(p[r, t] * inv)


@njit(inline="always", fastmath=_FASTMATH)
def _attend_item(q_rows, scale, softcap, k_pool, v_pool, slots, ns, start, end, count, out, lse):
    """q_rows: [R, D] fp32; slots, ns: the valid blocks (slot, tokens) of the thread's chunk,
    ``count`` of them, this item's being ``start:end``; softcap > 0: the scores are soft-capped
    to ``softcap * tanh(s / softcap)``.
    Writes out [R, D] (normalized) and lse [R] over this item's blocks."""
    _wide_vectors()
    rows, d_ = q_rows.shape
    bs = k_pool.shape[1]
    r_ = rows + (4 - rows % 4) % 4 if rows % 4 >= 2 else rows   # 2-3 spare rows: pad to a quad
    q = np.zeros((r_, d_), np.float32)                         # scaled once, stays in L1
    for r in range(rows):
        for d in range(d_):
            q[r, d] = q_rows[r, d] * scale
    p = np.empty((r_, bs), np.float32)                         # scores, then probabilities
    acc = np.zeros((r_, d_), np.float32)
    m = np.full(r_, _NEG_INF, np.float32)                      # running max per row
    l = np.zeros(r_, np.float32)                               # running sum of exp per row
    r4 = r_ - r_ % 4
    slot_bytes, token_bytes = bs * d_ * k_pool.itemsize, d_ * k_pool.itemsize
    pools = (k_pool.ctypes.data, v_pool.ctypes.data, slot_bytes, token_bytes)
    runs = np.empty((2, 2 * _PREFETCH_STREAMS), np.int64)
    cursor = np.zeros(4, np.int64)
    ahead = (runs, cursor)
    for i in range(start, end):
        slot, n = slots[i], ns[i]
        # -- the hints of this block's time, spread over its compute steps --
        _plan_hints(i, slots, ns, count, pools, runs, cursor)
        steps = 2 * (n // 4) * (r4 // 4 + r_ - r4)            # _prefetch_some calls per block
        cursor[2] = -(-cursor[1] // max(1, steps))
        _scores(q, k_pool[slot], n, p, ahead)
        if softcap > _ZERO:
            _soft_cap(p, n, softcap)
        _softmax_update(p, n, m, l, acc)
        _accumulate(p, v_pool[slot], n, acc, ahead)
    for r in range(rows):                                      # the padding rows are dropped
        if l[r] > _ZERO:
            inv = _ONE / l[r]
            for d in range(d_):
                out[r, d] = acc[r, d] * inv
            lse[r] = m[r] + np.log(l[r])
        else:
            out[r, :] = _ZERO
            lse[r] = _NEG_INF


@njit(parallel=True, nogil=True, cache=True, fastmath=_FASTMATH)
def _attend_items(q, scale, softcap, k_pool, v_pool, block_table, block_lens, first, lo, hi, part_out, part_lse,
                  chunks):
    """q: [B, Hkv, R, D] fp32; part_out: [n_items, R, D]; part_lse: [n_items, R]; chunks: the
    number of threads (numba's ``get_num_threads`` in here would keep the function out of the
    cache).

    The items are cut in one contiguous chunk per thread (a static schedule, as prange's), and
    each thread lists its chunk's valid blocks once, so that its prefetch hints run on from
    one item into the next instead of starting cold at every item."""
    hkv = q.shape[1]
    bs = k_pool.shape[1]
    n_items = lo.shape[0]
    chunks = min(chunks, n_items)
    for c in prange(chunks):
        a, b = c * n_items // chunks, (c + 1) * n_items // chunks
        size = 0
        for item in range(a, b):
            size += hi[item] - lo[item]
        slots = np.empty(size, np.int64)
        ns = np.empty(size, np.int64)
        ends = np.empty(b - a, np.int64)
        rows = np.empty(b - a, np.int64)                   # each item's (sequence, KV head)
        count = 0
        for item in range(a, b):
            bh = np.searchsorted(first, item, side="right") - 1
            rows[item - a] = bh
            table, lens = block_table[bh // hkv, bh % hkv], block_lens[bh // hkv, bh % hkv]
            for j in range(lo[item], hi[item]):
                n = min(max(lens[j], 0), bs)
                if table[j] >= 0 and n > 0:
                    slots[count], ns[count] = table[j], n
                    count += 1
            ends[item - a] = count
        start = 0
        for item in range(a, b):
            bh = rows[item - a]
            _attend_item(q[bh // hkv, bh % hkv], scale, softcap, k_pool, v_pool, slots, ns, start, ends[item - a], count,
                         part_out[item], part_lse[item])
            start = ends[item - a]


@njit(parallel=True, nogil=True, cache=True)
def _merge_items(first, part_out, part_lse, out, lse):
    """Log-sum-exp merge of each row's items. out: [B*Hkv, R, D]; lse: [B*Hkv, R]."""
    r_, d_ = part_out.shape[1], part_out.shape[2]
    for bh in prange(first.shape[0] - 1):
        for r in range(r_):
            m = _NEG_INF
            for i in range(first[bh], first[bh + 1]):
                m = max(m, part_lse[i, r])
            out[bh, r, :] = _ZERO
            if m == _NEG_INF:
                lse[bh, r] = _NEG_INF
                continue
            total = _ZERO
            for i in range(first[bh], first[bh + 1]):
                if part_lse[i, r] > _NEG_INF:
                    w = np.exp(part_lse[i, r] - m)
                    total += w
                    for d in range(d_):
                        out[bh, r, d] += w * part_out[i, r, d]
            for d in range(d_):
                out[bh, r, d] /= total
            lse[bh, r] = m + np.log(total)


start_thread_pool()


# -- public wrapper --

def _pool_as_numpy(pool: torch.Tensor) -> np.ndarray:
    """A pool's memory as the numpy type the kernel dispatches on (no copy)."""
    if pool.dtype == torch.float32:
        return pool.numpy()
    if pool.dtype == torch.float16:
        return pool.view(torch.int16).numpy().view(np.uint16)
    if pool.dtype == torch.bfloat16:
        return pool.view(torch.int16).numpy()
    raise TypeError(f"K/V pool dtype {pool.dtype} is not supported: use float32, float16 or bfloat16")


def _as_numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """``t`` as a C-contiguous numpy array of ``dtype``: a view when it already is one."""
    if t.dtype != dtype or not t.is_contiguous():
        t = t.to(dtype).contiguous()
    return t.numpy()


def _check_devices(q, k_pool, v_pool, block_table, block_lens) -> None:
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool),
                    ("block_table", block_table), ("block_lens", block_lens)):
        if t.device.type != "cpu":
            raise ValueError(f"cpu_partial_attention: {name} is on {t.device}; move it to the CPU "
                             f"or call kernels.paged_attention.paged_attention for device tensors")


def cpu_partial_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    block_lens: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over the blocks listed in ``block_table``, on CPU tensors.

    q: ``[B, Hq, D]`` or ``[B, Hq, Q, D]``, any float dtype (query head ``h`` reads KV head
    ``h // (Hq // Hkv)``; every query token sees every listed token, no causal mask);
    k_pool, v_pool: ``[num_slots, block_size, D]`` fp32/fp16/bf16;
    block_table: int32 ``[B, Hkv, NB]``, ``-1`` = unused; block_lens: int32 ``[B, Hkv, NB]``,
    valid leading tokens of each listed block (1..block_size). softcap: logit soft-capping
    (``softcap * tanh(scale * q.k / softcap)``, Gemma 2); 0: none.
    Returns ``out`` fp32 ``[B, Hq, D]`` / ``[B, Hq, Q, D]`` and ``lse`` fp32 natural-log
    ``[B, Hq]`` / ``[B, Hq, Q]``; a (sequence, KV head) with no block gives out 0, lse -inf.

    The preparation is numpy views rather than torch ops (a decode step calls this once per
    layer): ~70 instead of ~90 us for a small call here.
    """
    _check_devices(q, k_pool, v_pool, block_table, block_lens)
    check_paged_args(q, k_pool, v_pool, block_table, block_lens)
    b, hq, d = q.shape[0], q.shape[1], q.shape[-1]
    nq = 1 if q.dim() == 3 else q.shape[2]
    hkv = block_table.shape[1]
    rows = hq // hkv * nq
    qn = _as_numpy(q, torch.float32).reshape(b, hkv, rows, d)            # [B, Hkv, R, D] view
    table, lens = _as_numpy(block_table, torch.int32), _as_numpy(block_lens, torch.int32)
    threads = get_num_threads()
    first, lo, hi, top = _plan_items(table, _ITEMS_PER_THREAD * threads, _MIN_BLOCKS_PER_ITEM)
    if top >= k_pool.shape[0]:       # numba does not check bounds: a bad slot would read outside the pool
        raise ValueError(f"block_table lists slot {top} but the pools have {k_pool.shape[0]} slots")
    kp, vp = _pool_as_numpy(k_pool), _pool_as_numpy(v_pool)
    make = np.empty if os.environ.get(POISON_ENV) != "1" else (lambda s, t: np.full(s, np.nan, t))
    out, lse = make((b * hkv, rows, d), np.float32), make((b * hkv, rows), np.float32)
    with parallel_launch():
        if lo.shape[0] == b * hkv:                                      # one item per row: write in place
            _attend_items(qn, np.float32(scale), np.float32(softcap), kp, vp, table, lens, first, lo, hi, out, lse,
                          threads)
        else:
            part_out = make((lo.shape[0], rows, d), np.float32)
            part_lse = make((lo.shape[0], rows), np.float32)
            _attend_items(qn, np.float32(scale), np.float32(softcap), kp, vp, table, lens, first, lo, hi, part_out,
                          part_lse, threads)
            _merge_items(first, part_out, part_lse, out, lse)
    shape = (b, hq, d) if q.dim() == 3 else (b, hq, nq, d)
    return torch.from_numpy(out.reshape(shape)), torch.from_numpy(lse.reshape(shape[:-1]))


def warm_up() -> None:
    """Compile (or load from numba's cache) every dtype variant; a tiny call per pool dtype."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        pool = torch.zeros(2, 16, 64, dtype=dtype)
        table = torch.tensor([[[0] * 8 + [1] * 8]], dtype=torch.int32)    # 16 blocks: split path
        lens = torch.full_like(table, 16)
        cpu_partial_attention(torch.zeros(1, 1, 64), pool, pool, table, lens, 1.0)
