"""The Triton kernels of kernels/paged_attention.py (imported on first use: importing triton is
slow and may fail where it is not installed). See that module for the layout and the contract.

``split_kernel``: one program per (sequence, KV head, split of its block list), flash-decoding
style; ``merge_kernel``: the splits' log-sum-exp merge, one program per query row.
"""
import triton
import triton.language as tl


@triton.jit
def split_kernel(
    q_ptr,                  # [B*Hkv, R, D], any float dtype
    k_ptr, v_ptr,           # [num_slots, BS, D]
    table_ptr, lens_ptr,    # int32 [B*Hkv, NB]
    out_ptr, lse_ptr,       # fp32 [B*Hkv, NSPLIT, R, D], [B*Hkv, NSPLIT, R]
    qk_scale,               # softmax scale * log2(e): scores are kept in base 2
    softcap,                # logit soft-capping's cap (natural-log units), read where SOFTCAP
    R, D, BS, NB, BLOCKS_PER_SPLIT,
    ROWS: tl.constexpr,         # R padded to a power of two >= 16
    HEAD_DIM: tl.constexpr,     # D padded to a power of two
    BLOCK: tl.constexpr,        # BS padded to a power of two
    BLOCKS_PER_STEP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee": fp32 pools get exact dots, not tf32
    UPCAST_DOTS: tl.constexpr,    # dot in fp32 (the interpreter cannot dot bf16: triton#11584)
    SOFTCAP: tl.constexpr = False,  # scores softcap * tanh(s / softcap) (Gemma 2), s in natural log units
):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < R
    dim_ok = dims < D
    # -- q rows of this KV head, in the pool dtype for the tensor cores --
    q = tl.load(q_ptr + (bh * R + rows[:, None]) * D + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    if UPCAST_DOTS:
        q = q.to(tl.float32)
    # -- token t of a step: block t // BLOCK of the step, position t % BLOCK in it --
    TOKENS: tl.constexpr = BLOCK * BLOCKS_PER_STEP
    tok = tl.arange(0, TOKENS)
    blk = tok // BLOCK
    pos = tok % BLOCK
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    lo = split * BLOCKS_PER_SPLIT
    hi = tl.minimum(lo + BLOCKS_PER_SPLIT, NB)
    for j in range(lo, hi, BLOCKS_PER_STEP):
        entry = j + blk
        slot = tl.load(table_ptr + bh * NB + entry, mask=entry < hi, other=-1)
        n = tl.load(lens_ptr + bh * NB + entry, mask=entry < hi, other=0)
        tok_ok = (slot >= 0) & (pos < n) & (pos < BS)
        offs = (slot.to(tl.int64) * BS + pos)[:, None] * D + dims[None, :]     # [TOKENS, HEAD_DIM]
        kv_mask = tok_ok[:, None] & dim_ok[None, :]
        # -- compute qk --
        k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)
        if UPCAST_DOTS:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale        # [ROWS, TOKENS]
        if SOFTCAP:         # in base 2: cap * log2(e) * tanh(s / (cap * log2(e))); tanh(x) = 2 sigmoid(2x) - 1
            cap2 = softcap * 1.4426950408889634
            s = cap2 * (2.0 * tl.sigmoid(2.0 * s / cap2) - 1.0)
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        # -- update m_i and l_i --
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)               # all masked so far
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # -- acc += p @ v --
        v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0)
        p = p.to(v.dtype)                                                   # as the tensor cores see it
        if UPCAST_DOTS:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
    # -- normalize; an empty split gives out 0, lse -inf --
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    part = bh * nsplit + split
    tl.store(out_ptr + (part * R + rows[:, None]) * D + dims[None, :], out,
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + part * R + rows, lse, mask=row_ok)


@triton.jit
def merge_kernel(
    part_out_ptr, part_lse_ptr,     # fp32 [B*Hkv, NSPLIT, R, D], [B*Hkv, NSPLIT, R]
    out_ptr, lse_ptr,               # fp32 [B*Hkv*R, D], [B*Hkv*R]
    R, D, NSPLIT,
    SPLITS: tl.constexpr,           # splits read at a time (power of two)
    HEAD_DIM: tl.constexpr,
):
    """One query row: the log-sum-exp merge of its NSPLIT partial results, SPLITS at a time (an
    online merge, so any number of splits fits in registers)."""
    row = tl.program_id(0).to(tl.int64)       # = bh * R + r
    bh = row // R
    r = row % R
    sp = tl.arange(0, SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    dim_ok = dims < D
    m = tl.full([1], float("-inf"), tl.float32)
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(0, NSPLIT, SPLITS):
        part = (bh * NSPLIT + s0 + sp) * R + r                                 # [SPLITS]
        lse = tl.load(part_lse_ptr + part, mask=s0 + sp < NSPLIT, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp(lse - m_use)                                                # 0 for empty splits
        o = tl.load(part_out_ptr + part[:, None] * D + dims[None, :],
                    mask=(w > 0.0)[:, None] & dim_ok[None, :], other=0.0)
        alpha = tl.exp(m - m_use)
        total = total * alpha + tl.sum(w, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        m = m_new
    safe = tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * D + dims, acc / safe, mask=dim_ok)
    tl.store(lse_ptr + row + tl.arange(0, 1), tl.where(total > 0.0, m + tl.log(safe), float("-inf")))
