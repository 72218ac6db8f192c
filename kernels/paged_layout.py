"""The paged KV layout both attention kernels read, and the checks of its arguments.

``k_pool, v_pool: [num_slots, block_size, D]`` (contiguous, fp32/fp16/bf16);
``block_table, block_lens: int32 [B, Hkv, NB]``: per (sequence, KV head) the slots it attends
(-1 = unused) and how many leading tokens of each are valid; q ``[B, Hq, (Q,) D]``.
"""
import torch

POISON_ENV = "KVDRIVE_POISON_OUTPUTS"   # "1": outputs start as NaN, so unwritten elements show


def check_paged_args(q, k_pool, v_pool, block_table, block_lens) -> None:
    if k_pool.shape != v_pool.shape or k_pool.dtype != v_pool.dtype or k_pool.dim() != 3:
        raise ValueError(f"k_pool and v_pool must both be [num_slots, block_size, head_dim] of one dtype "
                         f"(got {tuple(k_pool.shape)} {k_pool.dtype}, {tuple(v_pool.shape)} {v_pool.dtype})")
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("k_pool and v_pool must be contiguous (a copy of a whole pool per call is "
                         "never what the caller wants): pass the pools themselves, not views")
    if k_pool.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"K/V pool dtype {k_pool.dtype} is not supported: use float32, float16 or bfloat16")
    if block_table.shape != block_lens.shape or block_table.dim() != 3:
        raise ValueError(f"block_table and block_lens must both be [B, Hkv, NB] "
                         f"(got {tuple(block_table.shape)}, {tuple(block_lens.shape)})")
    b, hkv = block_table.shape[:2]
    if q.dim() not in (3, 4) or q.shape[0] != b or q.shape[1] % hkv or q.shape[-1] != k_pool.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit block_table {tuple(block_table.shape)} "
                         f"and head_dim {k_pool.shape[2]}: need [B, Hq, (Q,) D] with Hq a multiple of Hkv")
