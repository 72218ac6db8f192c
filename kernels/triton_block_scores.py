"""The Triton kernel of kernels/block_scores.py (imported on first use: importing triton is slow
and may fail where it is not installed). See that module for the qkeys summary and the contract.

One program per (KV head, range of listed blocks), looping over its blocks one at a time (Triton
pipelines the loop's loads, so the next blocks are in flight while one is scored). Per block it
dequantizes the keys in registers (``kmin + code * (kmax - kmin) / 3``), scores all query rows of
the KV head with one ``tl.dot`` and reduces the block's tokens to its log-sum-exp.
"""
import triton
import triton.language as tl


@triton.jit
def qkeys_kernel(
    packed_ptr,             # uint8 [rows, CAP, BS, D4]: 2-bit codes, 4 channels per byte
    kmin_ptr, kmax_ptr,     # fp16 [rows, CAP, D] (block_scores.RANGE_DTYPE)
    q_ptr,                  # fp32 [rows, R, D]
    ids_ptr,                # int64 [N]: the blocks to score
    out_ptr,                # fp32 [rows, R, N]
    scale,
    CAP, BS, D, D4, R, N, BLOCKS_PER_PROGRAM,
    ROWS: tl.constexpr,         # R padded to a power of two >= 16 (tl.dot)
    BLOCK: tl.constexpr,        # BS padded to a power of two >= 16 (tl.dot)
    DIMS: tl.constexpr,         # D padded to a power of two >= 16
    PRECISION: tl.constexpr,    # tl.dot input_precision: "ieee" (exact fp32) or "tf32"
):
    r = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * BLOCKS_PER_PROGRAM
    last = tl.minimum(first + BLOCKS_PER_PROGRAM, N)
    rows = tl.arange(0, ROWS)
    toks = tl.arange(0, BLOCK)
    dims = tl.arange(0, DIMS)
    row_ok, tok_ok, dim_ok = rows < R, toks < BS, dims < D
    q = tl.load(q_ptr + (r * R + rows[:, None]) * D + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)                 # [ROWS, DIMS]
    shift = ((dims % 4) * 2).to(tl.uint8)
    code_mask = tok_ok[:, None] & dim_ok[None, :]
    for j in range(first, last):
        at = r * CAP + tl.load(ids_ptr + j).to(tl.int64)                           # the block's row
        lo = tl.load(kmin_ptr + at * D + dims, mask=dim_ok, other=0.0).to(tl.float32)     # [DIMS]
        hi = tl.load(kmax_ptr + at * D + dims, mask=dim_ok, other=0.0).to(tl.float32)
        byte = tl.load(packed_ptr + (at * BS + toks[:, None]) * D4 + dims[None, :] // 4,
                       mask=code_mask, other=0)                                    # [BLOCK, DIMS]
        k = lo[None, :] + ((byte >> shift[None, :]) & 3).to(tl.float32) * ((hi - lo) / 3.0)[None, :]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale              # [ROWS, BLOCK]
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        lse = m + tl.log(tl.sum(tl.exp(s - m[:, None]), axis=1))
        tl.store(out_ptr + (r * R + rows) * N + j, lse, mask=row_ok)
