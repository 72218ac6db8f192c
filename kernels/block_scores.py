"""Block scores from 2-bit quantized keys: the "qkeys" block summary, on the CPU (numba), on CUDA
(Triton, kernels/triton_block_scores.py) and in torch ops (anywhere; the reference).

Every key of a complete block is stored as 2-bit codes per channel within the block's own
per-channel range ``[kmin, kmax]`` (4 codes per byte, channel ``4 * j + i`` in bits ``2i..2i+1``
of byte ``j``); the range is kept in fp16, widened to the fp16 values just outside it
(``round_range``: every key stays within its block's stored range, the codes are taken against
it, and Quest's min/max bound stays a bound), which makes a block's summary 2 x D x 2 + bs x D / 4
bytes to read (768 -> 512 at D 64, bs 16; the ranking is mostly reading them: a decode step ranks
every layer's summaries, which do not stay in the CPU's caches from one step to the next).
For each query row the score of a block is the log-sum-exp over its tokens of
``scale * q . k^`` with ``k^ = kmin + code * (kmax - kmin) / 3``: the block's estimated log
attention mass. Computed as ``q . kmin + sum_c (q_c * step_c) * code_c``, so no dequantized key
is ever materialized; one pass over the packed codes, which are read once for all query rows
of a KV head. The (row, block) pairs are split over numba's threads (its pool is started at
import, keeping torch's thread count: ``numba_math.start_thread_pool``); the select stage of a
CPU decode step was mostly this kernel, single-threaded. ``qkeys_top_blocks`` is a CPU decode
step's whole ranking in one call: the scores, their max over a KV head's query rows and the top
k (the torch ops it replaced took ~6 ms of a 8K x 4 SmolLM2 step).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from numba import get_num_threads, njit, prange

from .launch_utils import multiprocessors, next_pow2
from .numba_math import exp_f32, f16_to_f32, f32_to_f16, parallel_launch, start_thread_pool, wide_vectors
from .triton_launcher import launcher_for

__all__ = ["RANGE_DTYPE", "round_range", "fold_open_key", "load_kernel", "qkeys_log_mass", "qkeys_log_mass_or_bound",
           "qkeys_log_mass_torch", "qkeys_log_mass_triton", "qkeys_top_blocks", "pack_codes", "unpack_codes",
           "CODE_BITS", "LEVELS"]

CODE_BITS = 2
LEVELS = (1 << CODE_BITS) - 1          # codes 0..3
RANGE_DTYPE = torch.float16            # the blocks' per-channel key ranges, as stored and read
_PER_BYTE = 8 // CODE_BITS
# (row, block) pairs below which a thread is not worth starting: ~1 us of work each
_MIN_BLOCKS_PER_CHUNK = 64

start_thread_pool()


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 3], ``[..., D]`` (D % 4 == 0) -> packed bytes ``[..., D // 4]``."""
    shifts = torch.arange(0, 8, CODE_BITS, dtype=torch.uint8, device=codes.device)
    c = codes.reshape(*codes.shape[:-1], -1, _PER_BYTE) << shifts
    return c.sum(-1, dtype=torch.uint8)          # the 2-bit fields do not overlap: sum == or


def round_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-channel key range ``[lo, hi]`` (fp32) as the kernels read it: ``RANGE_DTYPE``, ``lo``
    rounded down and ``hi`` up (the range only widens: the keys it was taken from stay inside),
    clamped to fp16's finite values (a key beyond +-65504 is coded as if at that limit: its
    block's estimate is off, never the attention, which reads the keys themselves)."""
    return _rounded(lo, down=True), _rounded(hi, down=False)


def _rounded(x: torch.Tensor, down: bool) -> torch.Tensor:
    limit = torch.finfo(RANGE_DTYPE).max
    x = x.float().clamp(-limit, limit)
    y = x.to(RANGE_DTYPE)
    wrong = y.float() > x if down else y.float() < x
    return torch.where(wrong, _next_half(y, down), y)


def _next_half(y: torch.Tensor, down: bool) -> torch.Tensor:
    """The fp16 value next to each finite ``y`` toward -inf (``down``) or +inf, from its bits (a
    sign and a magnitude: one step of the magnitude away from or toward zero). Not
    ``torch.nextafter``, which some torch builds do not have for fp16 on CUDA."""
    bits = y.view(torch.int16)
    away, toward = (y < 0, y > 0) if down else (y > 0, y < 0)
    zero = -32767 if down else 1                       # the smallest subnormal, negative or positive
    step = torch.where(away, bits + 1, torch.where(toward, bits - 1, torch.full_like(bits, zero)))
    return step.view(RANGE_DTYPE)


_HALF_MAX = np.float32(torch.finfo(RANGE_DTYPE).max)


@njit(inline="always")
def _outward(x, down):
    """``_rounded`` of one float32 as fp16 bits (int16): ``x`` clamped to the finite halves, to
    the nearest half, then one step down (``down``) or up if that half lies on the wrong side
    of ``x`` (``_next_half``'s steps on the bits). NaN stays NaN."""
    x = min(max(x, -_HALF_MAX), _HALF_MAX)
    y = f32_to_f16(x)
    yf = f16_to_f32(y)
    if not (yf > x if down else yf < x):
        return y
    bits = np.int32(y)
    if yf == 0.0:                                 # the smallest subnormal of the right sign
        return np.int16(-32767 if down else 1)
    away = yf < 0.0 if down else yf > 0.0         # the step grows the magnitude
    return np.int16(bits + 1 if away else bits - 1)


@njit(nogil=True, cache=True)
def _fold_key(k, kmin, kmax, ksum, tail, blk, slot):
    rows, d = k.shape
    for r in range(rows):
        for c in range(d):
            x = k[r, c]
            lo, hi = _outward(x, True), _outward(x, False)
            lof, hif = f16_to_f32(lo), f16_to_f32(hi)
            # torch.minimum / maximum: NaN wins on either side
            if np.isnan(lof) or lof < f16_to_f32(kmin[r, blk, c]):
                kmin[r, blk, c] = lo
            if np.isnan(hif) or hif > f16_to_f32(kmax[r, blk, c]):
                kmax[r, blk, c] = hi
            ksum[r, blk, c] += x
            tail[r, slot, c] = x


def fold_open_key(k: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, ksum: torch.Tensor, tail: torch.Tensor,
                  blk: int, slot: int) -> None:
    """Fold one key per row into block ``blk``, which it leaves open: ``kmin[:, blk]`` and
    ``kmax[:, blk]`` (``RANGE_DTYPE``) widen to ``round_range(k, k)``, ``ksum[:, blk] += k``,
    ``tail[:, slot] = k``. k: fp32 ``[rows, D]``; every tensor contiguous on the CPU, updated in
    place. One numba call per decode step and layer: the ~20 small torch ops it stands for took
    ~100 us."""
    if not (kmin.is_contiguous() and kmax.is_contiguous() and ksum.is_contiguous() and tail.is_contiguous()):
        raise ValueError("fold_open_key updates its tensors in place: they must be contiguous")
    if kmin.dtype != RANGE_DTYPE or kmax.dtype != RANGE_DTYPE or ksum.dtype != torch.float32 or tail.dtype != torch.float32:
        raise ValueError(f"fold_open_key: kmin/kmax must be {RANGE_DTYPE}, ksum and tail float32")
    rows, d = k.shape
    if (kmin.shape != kmax.shape or kmin.shape != ksum.shape or kmin.shape[::2] != (rows, d)
            or tail.shape[::2] != (rows, d) or not 0 <= blk < kmin.shape[1] or not 0 <= slot < tail.shape[1]):
        # numba does not check bounds: a wrong index would write outside the tensors
        raise ValueError(f"fold_open_key: key {tuple(k.shape)}, block {blk} of {tuple(kmin.shape)}, tail slot {slot} "
                         f"of {tuple(tail.shape)} do not fit")
    _fold_key(k.float().contiguous().numpy(), kmin.view(torch.int16).numpy(), kmax.view(torch.int16).numpy(),
              ksum.numpy(), tail.numpy(), blk, slot)


def _bits(t: torch.Tensor) -> np.ndarray:
    """An fp16 tensor's bits as a numpy int16 array (numba reads them with ``f16_to_f32``)."""
    return t.contiguous().view(torch.int16).numpy()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes ``[..., D // 4]`` -> uint8 codes ``[..., D]``."""
    shifts = torch.arange(0, 8, CODE_BITS, dtype=torch.uint8, device=packed.device)
    c = (packed.unsqueeze(-1) >> shifts) & LEVELS
    return c.reshape(*packed.shape[:-1], -1)


@njit(nogil=True, cache=True, fastmath=True)
def _log_mass_rows(packed, kmin, kmax, q, ids, quantized, log_count, scale, out, todo, cols, first, last):
    """Pairs ``first .. last - 1`` of the flattened (row ``todo[i]``, block ``cols[i, j]``) range, one block at a
    time: decode its codes once into ``codes [bs, Dp]`` (channels in the order 0, 4, 8, .., 1,
    5, .., which decodes with unit strides; q is put in that order once per row and the block's
    step once per block), score every (query row, token) pair with four tokens per pass over
    the channels (vectorized over channels, four independent sums), then a two-pass log-sum-exp
    over the block's tokens per row. A block not ``quantized`` (the open one) gets Quest's bound
    ``scale * sum_c max(q_c kmin_c, q_c kmax_c) + log_count`` instead."""
    wide_vectors()
    nrows_q, d = q.shape[1], q.shape[2]
    bs, d4 = packed.shape[2], packed.shape[3]
    m = cols.shape[1]
    dp = 4 * d4
    w = np.zeros((nrows_q, dp), np.float32)                  # scale * q_c * step_c (0 on padding), codes' order
    base = np.zeros(nrows_q, np.float32)                     # scale * q . kmin
    lo = np.zeros(d, np.float32)                             # the block's kmin, kmax as fp32
    hi = np.zeros(d, np.float32)
    codes = np.zeros((bs, dp), np.float32)
    qp = np.zeros((nrows_q, dp), np.float32)                 # q in the codes' channel order (0 on padding)
    step = np.zeros(dp, np.float32)                          # scale * (kmax - kmin) / 3, codes' order
    s = np.empty(bs, np.float32)
    bs4 = bs - bs % 4
    r_done = -1
    for item in range(first, last):
        r, j = todo[item // m], cols[item // m, item % m]
        if r != r_done:
            r_done = r
            for g in range(nrows_q):
                for i in range(4):
                    for b in range(d4):
                        c = 4 * b + i
                        qp[g, i * d4 + b] = q[r, g, c] if c < d else np.float32(0.0)
        blk = ids[j]
        for c in range(d):
            lo[c] = f16_to_f32(kmin[r, blk, c])
            hi[c] = f16_to_f32(kmax[r, blk, c])
        if not quantized[j]:
            for g in range(nrows_q):
                acc = np.float32(0.0)
                for c in range(d):
                    acc += max(q[r, g, c] * lo[c], q[r, g, c] * hi[c])
                out[r, g, j] = acc * scale + log_count[j]
            continue
        for t in range(bs):                  # channel 4b + i is column i * d4 + b: unit strides
            for i in range(4):
                for b in range(d4):
                    codes[t, i * d4 + b] = (packed[r, blk, t, b] >> (2 * i)) & 3
        for i in range(4):
            for b in range(d4):
                c = 4 * b + i
                step[i * d4 + b] = (hi[c] - lo[c]) * (scale / LEVELS) if c < d else np.float32(0.0)
        for g in range(nrows_q):
            acc = np.float32(0.0)
            for c in range(d):
                acc += q[r, g, c] * lo[c]
            base[g] = acc * scale
            for c in range(dp):
                w[g, c] = qp[g, c] * step[c]
        for g in range(nrows_q):
            for t in range(0, bs4, 4):
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for c in range(dp):
                    x = w[g, c]
                    s0 += x * codes[t, c]
                    s1 += x * codes[t + 1, c]
                    s2 += x * codes[t + 2, c]
                    s3 += x * codes[t + 3, c]
                s[t], s[t + 1], s[t + 2], s[t + 3] = s0, s1, s2, s3
            for t in range(bs4, bs):
                s0 = np.float32(0.0)
                for c in range(dp):
                    s0 += w[g, c] * codes[t, c]
                s[t] = s0
            mx = s[0]
            for t in range(1, bs):
                mx = max(mx, s[t])
            total = np.float32(0.0)
            for t in range(bs):
                total += exp_f32(s[t] - mx)
            out[r, g, j] = base[g] + mx + math.log(total)


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _log_mass(packed, kmin, kmax, q, ids, quantized, log_count, scale, out, todo, cols, chunks):
    """Every (row ``todo[i]``, block ``cols[i, j]``) pair, cut into ``chunks`` equal contiguous
    ranges, one per thread of numba's pool (``chunks``: its thread count, passed in so that the
    function stays cacheable); a range may span rows, so a batch of one sequence with few KV
    heads still splits evenly. todo: int64 row indices (the rows of ``out`` written); cols:
    int64 ``[len(todo), m]``, positions in ``ids`` (ascending per row: the blocks scored)."""
    total = todo.shape[0] * cols.shape[1]
    chunks = max(1, min(chunks, total // _MIN_BLOCKS_PER_CHUNK))
    for c in prange(chunks):
        _log_mass_rows(packed, kmin, kmax, q, ids, quantized, log_count, scale, out, todo, cols,
                       c * total // chunks, (c + 1) * total // chunks)


@njit(nogil=True, cache=True)
def _every_block(rows, n):
    """``cols`` for ``_log_mass`` scoring every one of ``n`` blocks in ``rows`` rows."""
    cols = np.empty((rows, n), np.int64)
    for i in range(rows):
        for j in range(n):
            cols[i, j] = j
    return cols


def qkeys_log_mass(packed: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, q: torch.Tensor,
                   ids: torch.Tensor, scale: float) -> torch.Tensor:
    """Estimated log attention mass of complete blocks ``ids`` per query row.

    packed: uint8 ``[rows, capacity, block_size, ceil(D / 4)]`` (padding channels coded 0);
    kmin, kmax: ``RANGE_DTYPE`` ``[rows, capacity, D]`` (``round_range``); q: fp32 ``[rows, R, D]`` (R query rows per KV
    head); ids: int64 ``[n]`` block ids, each a complete block. Returns fp32 ``[rows, R, n]``.
    CPU tensors; ``qkeys_log_mass_torch`` is the same on any device.
    """
    quantized = np.ones(ids.numel(), np.bool_)
    return _scores(packed, kmin, kmax, q, ids, quantized, np.zeros(ids.numel(), np.float32), scale)


def load_kernel() -> None:
    """Load (or compile) the numba kernels now, on two blocks, rather than at the first decode
    step that ranks blocks (~0.15 s from numba's cache; the first numba kernel of a process
    also sets numba's target up, ~0.5 s more). Their types do not depend on the model's."""
    packed = torch.zeros((1, 2, 4, 1), dtype=torch.uint8)
    lo, hi = torch.zeros((1, 2, 4), dtype=RANGE_DTYPE), torch.ones((1, 2, 4), dtype=RANGE_DTYPE)
    args = (packed, lo, hi, torch.ones((1, 1, 4)), torch.arange(2), torch.tensor([True, False]), torch.zeros(2))
    qkeys_log_mass_or_bound(*args, 1.0)
    qkeys_top_blocks(*args, 1.0, np.array([True, False]), 1)
    fold_open_key(torch.zeros((1, 4)), lo.clone(), hi.clone(), torch.zeros((1, 2, 4)), torch.zeros((1, 4, 4)), 0, 0)


def qkeys_log_mass_or_bound(packed: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, q: torch.Tensor,
                            ids: torch.Tensor, quantized: torch.Tensor, log_count: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """``qkeys_log_mass`` where ``quantized`` (bool ``[n]``), Quest's min/max bound plus
    ``log_count`` (fp32 ``[n]``) elsewhere (the open block, whose keys are not coded yet), in one
    call: the CPU path of ``BlockSummaries.scores``, which runs every layer of every step."""
    _check_per_block(ids, quantized, log_count)
    return _scores(packed, kmin, kmax, q, ids, quantized.to(torch.bool).contiguous().numpy(),
                   log_count.float().contiguous().numpy(), scale)


def _check_per_block(ids, quantized, log_count) -> None:
    if quantized.shape != ids.shape or log_count.shape != ids.shape:
        raise ValueError(f"quantized {tuple(quantized.shape)} and log_count {tuple(log_count.shape)} "
                         f"must both be shaped like ids {tuple(ids.shape)}")


def _check_shapes(packed, kmin, kmax, q) -> None:
    rows, _, d = q.shape
    if kmin.dtype != RANGE_DTYPE or kmax.dtype != RANGE_DTYPE:
        raise ValueError(f"kmin / kmax are {kmin.dtype} / {kmax.dtype}: the kernels read block ranges in "
                         f"{RANGE_DTYPE} (make them with round_range)")
    if packed.dim() != 4 or packed.dtype != torch.uint8 or packed.shape[0] != rows or 4 * packed.shape[3] < d:
        raise ValueError(f"packed codes {tuple(packed.shape)} {packed.dtype} do not fit q {tuple(q.shape)}")
    if kmin.shape != kmax.shape or kmin.shape[0] != rows or kmin.shape[2] != d:
        raise ValueError(f"kmin {tuple(kmin.shape)} / kmax {tuple(kmax.shape)} do not fit q {tuple(q.shape)}")


def _scores(packed, kmin, kmax, q, ids, quantized: np.ndarray, log_count: np.ndarray, scale: float) -> torch.Tensor:
    rows, nq, d = q.shape
    _check_shapes(packed, kmin, kmax, q)
    out = torch.empty((rows, nq, ids.numel()), dtype=torch.float32)
    if ids.numel() and rows and nq:
        args = (packed.contiguous().numpy(), _bits(kmin), _bits(kmax),
                q.float().contiguous().numpy(), ids.long().contiguous().numpy(), quantized, log_count,
                np.float32(scale), out.numpy(), np.arange(rows, dtype=np.int64), _every_block(rows, ids.numel()))
        with parallel_launch():
            _log_mass(*args, get_num_threads())
    return out


@njit(nogil=True, cache=True, fastmath=False)      # set, not left out: a callee inherits its caller's
def _row_max(per_query, scores):
    """One (sequence, KV head): ``scores`` = the max over its query rows of ``per_query [R, n]``
    (NaN if any is NaN, as ``torch.amax``). Not fastmath: NaN must compare as IEEE says."""
    nq, n = per_query.shape
    for j in range(n):
        best = per_query[0, j]
        for g in range(1, nq):
            x = per_query[g, j]
            if not np.isnan(best) and (np.isnan(x) or x > best):
                best = x
        scores[j] = best


@njit(nogil=True, cache=True, fastmath=False)
def _top_row(scores, forced, bonus, k, chosen, keys):
    """One (sequence, KV head): ``chosen`` = the positions of the ``forced`` blocks and of the
    ``k`` best others by ``scores + bonus`` (``bonus [n]``, or empty: none), ascending. A NaN
    ranks above everything (as in ``torch.topk``); ties at the k-th key go to the lowest
    positions. O(n): the k-th best is found by ``np.partition``. Not fastmath: NaN and
    infinities must compare as IEEE says."""
    n = scores.shape[0]
    has_bonus = bonus.shape[0] > 0
    m = 0
    for j in range(n):
        if not forced[j]:
            best = scores[j]
            keys[m] = np.inf if np.isnan(best) else (best + bonus[j] if has_bonus else best)
            m += 1
    kth = np.partition(keys[:m], m - k)[m - k] if k > 0 else np.inf
    above = 0
    for j in range(m):
        if keys[j] > kth:
            above += 1
    ties = k - above
    out = 0
    for j in range(n):
        if forced[j]:
            take = True
        else:
            x = np.inf if np.isnan(scores[j]) else (scores[j] + bonus[j] if has_bonus else scores[j])
            take = x > kth
            if not take and x == kth and ties > 0:
                take = True
                ties -= 1
        if take:
            chosen[out] = j
            out += 1


@njit(nogil=True, cache=True, fastmath=True)
def _bound_row(kmin, kmax, q, ids, log_count, scale, r, out):
    """Row ``r``'s Quest bound of every listed block, the max over its query rows:
    ``scale * sum_c max(q_c kmin_c, q_c kmax_c) + log_count`` (``out [n]``), as
    ``q+ . kmax + q- . kmin`` (q's positive and negative parts; kmin <= kmax): two FMAs per
    channel, which vectorize."""
    nq, d = q.shape[1], q.shape[2]
    pos = np.empty((nq, d), np.float32)
    neg = np.empty((nq, d), np.float32)
    for g in range(nq):
        for c in range(d):
            pos[g, c] = max(q[r, g, c], np.float32(0.0))
            neg[g, c] = min(q[r, g, c], np.float32(0.0))
    lo = np.empty(d, np.float32)
    hi = np.empty(d, np.float32)
    for j in range(ids.shape[0]):
        blk = ids[j]
        for c in range(d):
            lo[c] = f16_to_f32(kmin[r, blk, c])
            hi[c] = f16_to_f32(kmax[r, blk, c])
        best = np.float32(-np.inf)
        for g in range(nq):
            acc = np.float32(0.0)
            for c in range(d):
                acc += pos[g, c] * hi[c] + neg[g, c] * lo[c]
            best = max(best, acc)
        out[j] = best * scale + log_count[j]


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _candidates(kmin, kmax, q, ids, log_count, scale, forced, bonus, n_cand, todo):
    """Per row of ``todo``: the positions of the ``forced`` blocks and of the ``n_cand`` others
    with the best Quest bound (plus ``bonus``), ascending: ``[len(todo), forced.sum() + n_cand]``."""
    n = ids.shape[0]
    cols = np.empty((todo.shape[0], int(forced.sum()) + n_cand), np.int64)
    for i in prange(todo.shape[0]):
        bound = np.empty(n, np.float32)
        _bound_row(kmin, kmax, q, ids, log_count, scale, todo[i], bound)
        _top_row(bound, forced, bonus[todo[i]], n_cand, cols[i], np.empty(n, np.float32))
    return cols


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _top_blocks(packed, kmin, kmax, q, ids, quantized, log_count, scale, forced, bonus, k, n_cand, scores,
                chosen, rank, chunks):
    """``_log_mass`` of the rows ``rank`` says (bool ``[rows]``) into a scratch ``[rows, R, n]``
    and their max over query rows into ``scores``, then ``_top_row`` per (sequence, KV head) on
    numba's threads: a layer's whole ranking in one call from Python. The other rows rank by
    the ``scores`` they come with. bonus: ``[rows, n]`` added to the scores for the ranking
    only, or ``[rows, 0]``: none. n_cand > 0: two stages, only the forced blocks and the
    ``n_cand`` others with the best Quest bound (plus bonus) are scored, the rest get -inf."""
    rows, nq, n = q.shape[0], q.shape[1], ids.shape[0]
    todo = np.flatnonzero(rank)
    per_query = np.empty((rows, nq, n), np.float32)
    if n_cand > 0:
        cols = _candidates(kmin, kmax, q, ids, log_count, scale, forced, bonus, n_cand, todo)
        for i in range(todo.shape[0]):
            per_query[todo[i]] = -np.inf
    else:
        cols = _every_block(todo.shape[0], n)
    _log_mass(packed, kmin, kmax, q, ids, quantized, log_count, scale, per_query, todo, cols, chunks)
    for r in prange(rows):
        if rank[r]:
            _row_max(per_query[r], scores[r])
        _top_row(scores[r], forced, bonus[r], k, chosen[r], np.empty(n, np.float32))


def qkeys_top_blocks(packed: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, q: torch.Tensor,
                     ids: torch.Tensor, quantized: torch.Tensor, log_count: torch.Tensor, scale: float,
                     forced: np.ndarray, k: int, bonus: Optional[np.ndarray] = None,
                     kept: Optional[tuple[np.ndarray, np.ndarray]] = None, candidates: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks a layer attends, ranked by ``qkeys_log_mass_or_bound`` aggregated by the max
    over each KV head's query rows, in one numba call (the CPU decode step's select stage).

    forced: bool ``[n]``, the blocks attended whatever their score (sink, local window); k: how
    many of the others to take, the best-scored (0 <= k <= their number); bonus: fp32
    ``[rows, n]`` added to the scores for the ranking only (None: nothing); kept: ``(keep,
    given)``, bool ``[rows]`` and fp32 ``[rows, n]``: the rows ``keep`` marks are not scored but
    ranked by their ``given`` scores (None: every row is scored). Returns ``chosen``,
    int64 ``[rows, forced.sum() + k]``, the ids of the attended blocks in the order of ``ids``
    (ascending for the runtime's window), and
    ``scores``, fp32 ``[rows, n]``: what ``qkeys_log_mass_or_bound(...).amax(1)`` gives (the
    given scores in kept rows). candidates: 0, every block is scored; else ranking runs in two
    stages: Quest's bound (the ``minmax`` summary, max over query rows, plus bonus) picks that
    many blocks besides the forced ones, and only those (and the forced) are scored by their
    2-bit keys; the others' scores are -inf (ranked below every scored block).
    """
    rows, nq, d = q.shape
    n = ids.numel()
    _check_per_block(ids, quantized, log_count)
    forced = np.ascontiguousarray(forced, dtype=np.bool_)
    n_forced = int(forced.sum())
    if forced.shape != (n,) or not 0 <= k <= n - n_forced:
        raise ValueError(f"forced {forced.shape} and k={k} do not fit {n} blocks")
    if candidates and not k <= candidates:
        raise ValueError(f"{candidates} candidates cannot hold the k={k} blocks to choose")
    candidates = 0 if candidates >= n - n_forced else int(candidates)      # all of them: one stage
    if nq == 0:
        raise ValueError("q has no query rows: there is nothing to rank the blocks by")
    _check_shapes(packed, kmin, kmax, q)
    if bonus is None:
        bonus = np.zeros((rows, 0), np.float32)
    elif bonus.shape != (rows, n):
        raise ValueError(f"bonus {bonus.shape} does not fit {rows} rows x {n} blocks")
    scores = torch.empty((rows, n), dtype=torch.float32)
    rank = np.ones(rows, np.bool_)
    if kept is not None:
        keep, given = kept
        if keep.shape != (rows,) or given.shape != (rows, n):
            raise ValueError(f"kept rows {keep.shape} / scores {given.shape} do not fit {rows} rows x {n} blocks")
        rank = ~np.asarray(keep, np.bool_)
        scores.numpy()[~rank] = given[~rank]
    chosen = torch.empty((rows, n_forced + k), dtype=torch.int64)
    if rows and n:
        args = (packed.contiguous().numpy(), _bits(kmin), _bits(kmax),
                q.float().contiguous().numpy(), ids.long().contiguous().numpy(),
                quantized.to(torch.bool).contiguous().numpy(), log_count.float().contiguous().numpy(),
                np.float32(scale), forced, np.ascontiguousarray(bonus, np.float32), k, candidates, scores.numpy(),
                chosen.numpy(), rank)
        with parallel_launch():
            _top_blocks(*args, get_num_threads())
    return ids[chosen], scores


def qkeys_log_mass_torch(packed: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, q: torch.Tensor,
                         ids: torch.Tensor, scale: float) -> torch.Tensor:
    """``qkeys_log_mass`` in torch ops (the GPU path, and the reference of the numba kernel)."""
    d = q.shape[-1]
    codes = unpack_codes(packed[:, ids])[..., :d].float()                        # [rows, n, bs, D]
    lo, hi = kmin[:, ids].float(), kmax[:, ids].float()                          # [rows, n, D]
    qf = q.float()
    base = torch.einsum("rgd,rnd->rgn", qf, lo)
    w = qf[:, :, None, :] * ((hi - lo) / LEVELS)[:, None]                       # [rows, R, n, D]
    s = base[..., None] + torch.einsum("rgnd,rntd->rgnt", w, codes)              # [rows, R, n, bs]
    return torch.logsumexp(s * scale, dim=-1)


# -- Triton (CUDA): kernels/triton_block_scores.py --

_PROGRAMS_PER_SM = 8


def qkeys_log_mass_triton(packed: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, q: torch.Tensor,
                          ids: torch.Tensor, scale: float, precision: str = "tf32",
                          programs_per_sm: int = _PROGRAMS_PER_SM, num_stages: int = 3) -> torch.Tensor:
    """``qkeys_log_mass`` as a Triton kernel (CUDA; the interpreter elsewhere): each program loops
    over a range of the listed blocks, dequantizing a block's keys in registers and scoring all
    query rows with one ``tl.dot``. precision: the dot's input precision, "tf32" (the tensor
    cores; ~1e-3 relative error, enough to rank blocks) or "ieee" (exact fp32, ~1.7x slower on an
    H100); programs_per_sm, num_stages: the launch (benchmarks/bench_block_scores.py)."""
    from .triton_block_scores import qkeys_kernel

    _check_shapes(packed, kmin, kmax, q)
    launch = launcher_for(qkeys_kernel)         # kept kernels launched directly: less host time per layer
    rows, nq, d = q.shape
    cap, bs, d4 = packed.shape[1:]
    n = ids.numel()
    out = torch.empty((rows, nq, n), dtype=torch.float32, device=q.device)
    if n and rows and nq:
        want = max(1, -(-programs_per_sm * multiprocessors(q.device) // rows))      # programs per row
        per = -(-n // want)
        launch((rows, -(-n // per)),
               (packed.contiguous(), kmin.contiguous(), kmax.contiguous(), q.float().contiguous(),
                ids.contiguous(), out, float(scale), cap, bs, d, d4, nq, n, per),
               {"ROWS": max(16, next_pow2(nq)), "BLOCK": max(16, next_pow2(bs)), "DIMS": max(16, next_pow2(d)),
                "PRECISION": precision},
               {"num_warps": 4, "num_stages": num_stages})
    return out
