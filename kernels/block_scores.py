"""Block scores from 2-bit quantized keys, on the CPU (numba): the "qkeys" block summary.

Every key of a complete block is stored as 2-bit codes per channel within the block's own
per-channel range ``[kmin, kmax]`` (4 codes per byte, channel ``4 * j + i`` in bits ``2i..2i+1``
of byte ``j``). For each query row the score of a block is the log-sum-exp over its tokens of
``scale * q . k^`` with ``k^ = kmin + code * (kmax - kmin) / 3``: the block's estimated log
attention mass. Computed as ``q . kmin + sum_c (q_c * step_c) * code_c``, so no dequantized key
is ever materialized; one pass over the packed codes, which are read once for all query rows
of a KV head. Single-threaded on purpose: it runs inside the decode step next to torch, and
starting numba's thread pool there changes torch's thread count (and with it Dynamo's guards).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import njit

__all__ = ["qkeys_log_mass", "qkeys_log_mass_torch", "qkeys_log_mass_triton", "pack_codes", "unpack_codes",
           "CODE_BITS", "LEVELS"]

CODE_BITS = 2
LEVELS = (1 << CODE_BITS) - 1          # codes 0..3
_PER_BYTE = 8 // CODE_BITS


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 3], ``[..., D]`` (D % 4 == 0) -> packed bytes ``[..., D // 4]``."""
    shifts = torch.arange(0, 8, CODE_BITS, dtype=torch.uint8, device=codes.device)
    c = codes.reshape(*codes.shape[:-1], -1, _PER_BYTE) << shifts
    return c.sum(-1, dtype=torch.uint8)          # the 2-bit fields do not overlap: sum == or


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes ``[..., D // 4]`` -> uint8 codes ``[..., D]``."""
    shifts = torch.arange(0, 8, CODE_BITS, dtype=torch.uint8, device=packed.device)
    c = (packed.unsqueeze(-1) >> shifts) & LEVELS
    return c.reshape(*packed.shape[:-1], -1)


@njit(nogil=True, cache=True, fastmath=True)
def _log_mass(packed, kmin, kmax, q, ids, scale, out):
    rows, nrows_q, d = q.shape
    bs, d4 = packed.shape[2], packed.shape[3]
    dp = 4 * d4
    w = np.zeros((nrows_q, dp), np.float32)
    base = np.zeros(nrows_q, np.float32)
    codes = np.zeros(dp, np.float32)
    m = np.zeros(nrows_q, np.float32)
    ssum = np.zeros(nrows_q, np.float32)
    for r in range(rows):
        for j in range(ids.shape[0]):
            blk = ids[j]
            for g in range(nrows_q):
                acc = np.float32(0.0)
                for c in range(d):
                    lo = kmin[r, blk, c]
                    w[g, c] = q[r, g, c] * ((kmax[r, blk, c] - lo) / LEVELS)
                    acc += q[r, g, c] * lo
                base[g] = acc
                m[g] = -np.inf
                ssum[g] = 0.0
            for t in range(bs):
                for b in range(d4):
                    byte = packed[r, blk, t, b]
                    codes[4 * b] = byte & 3
                    codes[4 * b + 1] = (byte >> 2) & 3
                    codes[4 * b + 2] = (byte >> 4) & 3
                    codes[4 * b + 3] = byte >> 6
                for g in range(nrows_q):
                    s = base[g]
                    for c in range(dp):
                        s += w[g, c] * codes[c]
                    s *= scale
                    if s > m[g]:
                        ssum[g] = ssum[g] * math.exp(m[g] - s) + 1.0
                        m[g] = s
                    else:
                        ssum[g] += math.exp(s - m[g])
            for g in range(nrows_q):
                out[r, g, j] = m[g] + math.log(ssum[g])


def qkeys_log_mass(packed: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, q: torch.Tensor,
                   ids: torch.Tensor, scale: float) -> torch.Tensor:
    """Estimated log attention mass of complete blocks ``ids`` per query row.

    packed: uint8 ``[rows, capacity, block_size, ceil(D / 4)]`` (padding channels coded 0);
    kmin, kmax: fp32 ``[rows, capacity, D]``; q: fp32 ``[rows, R, D]`` (R query rows per KV
    head); ids: int64 ``[n]`` block ids, each a complete block. Returns fp32 ``[rows, R, n]``.
    CPU tensors; ``qkeys_log_mass_torch`` is the same on any device.
    """
    rows, nq, d = q.shape
    if packed.dim() != 4 or packed.dtype != torch.uint8 or packed.shape[0] != rows or 4 * packed.shape[3] < d:
        raise ValueError(f"packed codes {tuple(packed.shape)} {packed.dtype} do not fit q {tuple(q.shape)}")
    if kmin.shape != kmax.shape or kmin.shape[0] != rows or kmin.shape[2] != d:
        raise ValueError(f"kmin {tuple(kmin.shape)} / kmax {tuple(kmax.shape)} do not fit q {tuple(q.shape)}")
    out = torch.empty((rows, nq, ids.numel()), dtype=torch.float32)
    if ids.numel() and rows and nq:
        _log_mass(packed.contiguous().numpy(), kmin.contiguous().numpy(), kmax.contiguous().numpy(),
                  q.float().contiguous().numpy(), ids.long().contiguous().numpy(), np.float32(scale), out.numpy())
    return out


def qkeys_log_mass_torch(packed: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, q: torch.Tensor,
                         ids: torch.Tensor, scale: float) -> torch.Tensor:
    """``qkeys_log_mass`` in torch ops (the GPU path, and the reference of the numba kernel)."""
    d = q.shape[-1]
    codes = unpack_codes(packed[:, ids])[..., :d].float()                        # [rows, n, bs, D]
    lo, hi = kmin[:, ids], kmax[:, ids]                                          # [rows, n, D]
    qf = q.float()
    base = torch.einsum("rgd,rnd->rgn", qf, lo)
    w = qf[:, :, None, :] * ((hi - lo) / LEVELS)[:, None]                       # [rows, R, n, D]
    s = base[..., None] + torch.einsum("rgnd,rntd->rgnt", w, codes)              # [rows, R, n, bs]
    return torch.logsumexp(s * scale, dim=-1)


# -- Triton (CUDA): one program per (row, block), all query rows of the KV head at once --

@functools.cache
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _qkeys_kernel(packed_ptr, kmin_ptr, kmax_ptr, q_ptr, ids_ptr, out_ptr, scale,
                      CAP, BS, D, D4, R, N,
                      ROWS: tl.constexpr, TOKENS: tl.constexpr, DIMS: tl.constexpr, USE_DOT: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        blk = tl.load(ids_ptr + j).to(tl.int64)
        rows = tl.arange(0, ROWS)
        toks = tl.arange(0, TOKENS)
        dims = tl.arange(0, DIMS)
        row_ok, tok_ok, dim_ok = rows < R, toks < BS, dims < D
        lo = tl.load(kmin_ptr + (r * CAP + blk) * D + dims, mask=dim_ok, other=0.0)
        hi = tl.load(kmax_ptr + (r * CAP + blk) * D + dims, mask=dim_ok, other=0.0)
        q = tl.load(q_ptr + (r * R + rows[:, None]) * D + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)               # [ROWS, DIMS]
        w = q * ((hi - lo) / 3.0)[None, :]
        base = tl.sum(q * lo[None, :], axis=1)                                     # [ROWS]
        byte = tl.load(packed_ptr + ((r * CAP + blk) * BS + toks[:, None]) * D4 + dims[None, :] // 4,
                       mask=tok_ok[:, None] & dim_ok[None, :], other=0)            # [TOKENS, DIMS]
        codes = ((byte >> ((dims[None, :] % 4) * 2).to(tl.uint8)) & 3).to(tl.float32)
        if USE_DOT:     # [ROWS >= 16, DIMS] x [DIMS, TOKENS >= 16] on the tensor cores' fp32 path
            s = base[:, None] + tl.dot(w, tl.trans(codes), input_precision="ieee")
        else:
            s = base[:, None] + tl.sum(w[:, None, :] * codes[None, :, :], axis=2)  # [ROWS, TOKENS]
        s = tl.where(tok_ok[None, :], s * scale, float("-inf"))
        m = tl.max(s, axis=1)
        lse = m + tl.log(tl.sum(tl.exp(s - m[:, None]), axis=1))
        tl.store(out_ptr + (r * R + rows) * N + j, lse, mask=row_ok)

    return _qkeys_kernel


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def qkeys_log_mass_triton(packed: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, q: torch.Tensor,
                          ids: torch.Tensor, scale: float, use_dot: bool = False) -> torch.Tensor:
    """``qkeys_log_mass`` as a Triton kernel (CUDA; the interpreter elsewhere): one pass over the
    packed codes, nothing unpacked in memory. use_dot: the scores as one ``tl.dot`` (rows and
    tokens padded to 16) instead of a broadcast multiply-and-sum; slower on an H200 (1.2 against
    0.76 ms per layer at 128K tokens, benchmarks/bench_block_scores.py), so off by default."""
    rows, nq, d = q.shape
    cap, bs, d4 = packed.shape[1:]
    out = torch.empty((rows, nq, ids.numel()), dtype=torch.float32, device=q.device)
    if ids.numel() and rows and nq:
        _triton_kernel()[(rows, ids.numel())](
            packed.contiguous(), kmin.contiguous(), kmax.contiguous(), q.float().contiguous(),
            ids.contiguous(), out, float(scale), cap, bs, d, d4, nq, ids.numel(),
            ROWS=max(16, _pow2(nq)) if use_dot else _pow2(nq), TOKENS=max(16, _pow2(bs)) if use_dot else _pow2(bs),
            DIMS=max(16, _pow2(d)), USE_DOT=use_dot, num_warps=4)
    return out
