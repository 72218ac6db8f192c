"""Paged sparse decode attention: a Triton kernel for CUDA, the numba kernel on the CPU, and a
plain torch implementation (the reference, any device).

Layout (shared with kernels/cpu_attention.py): ``k_pool, v_pool: [num_slots, block_size, D]``;
``block_table, block_lens: int32 [B, Hkv, NB]`` list, per (sequence, KV head), the slots it
attends (``-1`` = unused entry) and how many leading tokens of each are valid.

The Triton path (kernels/triton_paged.py) is flash-decoding: ``split_kernel`` runs one program per (sequence, KV head,
split of its block list), with all the query rows of that KV head (GQA group x query tokens)
packed into one ``tl.dot`` operand, reading K/V straight from the pools through the block
table; ``merge_kernel`` combines the splits' partial results by their log-sum-exp, a chunk of
splits at a time (so any number of splits fits in registers).
Triton is imported on first use, so this module imports where Triton is missing.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .cpu_attention import cpu_partial_attention
from .launch_utils import multiprocessors, next_pow2
from .masked_attention import soft_cap
from .paged_layout import POISON_ENV, check_paged_args
from .triton_launcher import CachedLauncher, launcher_for

__all__ = ["paged_attention", "paged_attention_torch", "paged_attention_triton", "LaunchConfig",
           "DEFAULT_LAUNCH", "POISON_ENV"]

_LOG2E = 1.4426950408889634
_MIN_DOT = 16               # tl.dot wants K >= 16 (and M >= 16 on some targets and versions)
_MIN_BLOCKS_PER_SPLIT = 4   # below this a split's fixed cost outweighs the parallelism
_MERGE_FLOATS = 4096        # partial outputs the merge holds at a time: splits x head_dim


@dataclass(frozen=True)
class LaunchConfig:
    """How the Triton kernel is launched (benchmarks/tune_gpu_attention.py sweeps these).

    tile_bytes: bytes of K read per loop step, in whole blocks (16 KiB = 64 tokens of fp16 x 128);
    programs_per_sm: the block list of each (sequence, KV head) is split until about this many
    programs per multiprocessor run; num_warps / num_stages: as Triton takes them (num_warps
    None: 4 up to head_dim 128, else 8; num_stages None: Triton's default).
    """
    tile_bytes: int = 32768
    programs_per_sm: int = 16
    num_warps: Optional[int] = None
    num_stages: Optional[int] = 2


# the best of benchmarks/tune_gpu_attention.py's sweeps on an H100 (fp16, block 16, head_dim 128;
# 2026-11-27): 0.65/0.87/0.97/0.97 of copy bandwidth at 8x4K/8x16K/8x64K/32x16K, per call from
# Python; the GPU time alone (CUDA graph) gives 0.78 at 8x4K.
DEFAULT_LAUNCH = LaunchConfig()


# -- plain torch: the reference and the CPU-device path --

def paged_attention_torch(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    block_lens: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged attention by gathering the listed blocks; same contract as ``paged_attention``.

    q: ``[B, Hq, D]`` or ``[B, Hq, Q, D]``; k_pool, v_pool: ``[num_slots, block_size, D]``;
    block_table, block_lens: int32 ``[B, Hkv, NB]``. Returns fp32 ``out`` shaped like q and
    fp32 natural-log ``lse`` ``[B, Hq(, Q)]``; nothing selected gives out 0, lse -inf.
    """
    check_paged_args(q, k_pool, v_pool, block_table, block_lens)
    one_token = q.dim() == 3
    q4 = q.unsqueeze(2) if one_token else q                               # [B, Hq, Q, D]
    b, hq, nq, d = q4.shape
    hkv, nb = block_table.shape[1:]
    bs = k_pool.shape[1]
    g = hq // hkv
    slots = block_table.long()
    pos = torch.arange(bs, device=q.device)
    valid = (slots >= 0).unsqueeze(-1) & (pos < block_lens.unsqueeze(-1))    # [B, Hkv, NB, BS]
    valid = valid.reshape(b, hkv, nb * bs)
    # where(): unlisted slots and the tails of partly filled blocks may hold anything
    k = torch.where(valid.unsqueeze(-1), k_pool[slots.clamp_min(0)].reshape(b, hkv, nb * bs, d).float(), 0.0)
    v = torch.where(valid.unsqueeze(-1), v_pool[slots.clamp_min(0)].reshape(b, hkv, nb * bs, d).float(), 0.0)
    qf = q4.float().reshape(b, hkv, g * nq, d)                              # [B, Hkv, G*Q, D]
    s = soft_cap(torch.matmul(qf, k.transpose(-1, -2)) * scale, softcap)   # [B, Hkv, G*Q, S]
    s = s.masked_fill(~valid.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                        # [B, Hkv, G*Q]
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    out = torch.matmul(p, v)                                                # 0 where lse = -inf
    out, lse = out.reshape(b, hq, nq, d), lse.reshape(b, hq, nq)
    if one_token:
        return out.squeeze(2), lse.squeeze(2)
    return out, lse


# -- Triton --

def _plan_splits(bh: int, nb: int, blocks_per_step: int, device: torch.device,
                 programs_per_sm: int) -> tuple[int, int]:
    """(number of splits, blocks per split): about ``programs_per_sm`` programs per SM, whole
    steps per split."""
    units = multiprocessors(device)
    want = max(1, -(-programs_per_sm * units // bh))
    most = max(1, nb // _MIN_BLOCKS_PER_SPLIT)
    per = -(-nb // min(want, most))
    per = -(-per // blocks_per_step) * blocks_per_step
    return -(-nb // per), per


def _out_and_lse(shape: tuple, device: torch.device, poison: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 out ``[*shape]`` and lse ``[*shape[:-1]]``; NaN-filled when ``poison``."""
    if poison:
        return torch.full(shape, float("nan"), device=device), torch.full(shape[:-1], float("nan"), device=device)
    return torch.empty(shape, device=device), torch.empty(shape[:-1], device=device)


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


@functools.cache
def _launchers() -> tuple[CachedLauncher, CachedLauncher]:
    """The split and merge kernels' launchers (importing triton is slow: on first use)."""
    from .triton_paged import merge_kernel, split_kernel
    return launcher_for(split_kernel), launcher_for(merge_kernel)


@dataclass
class _Plan:
    """Everything about a launch that follows from the shapes, worked out once per shape: a
    decode step calls with the same shapes every layer, and each Python step here is host time
    the GPU may wait for."""
    r: int
    nsplit: int
    split_grid: tuple
    split_ints: tuple               # R, D, BS, NB, BLOCKS_PER_SPLIT
    split_constexprs: dict
    split_options: dict
    merge_grid: tuple
    merge_ints: tuple               # R, D, NSPLIT
    merge_constexprs: dict
    merge_options: dict
    scratch_shape: tuple            # the splits' partial out: [B*Hkv, NSPLIT, R, D]


@functools.lru_cache(maxsize=256)
def _plan(q_shape: torch.Size, pool_shape: torch.Size, pool_dtype: torch.dtype, table_shape: torch.Size,
          launch: LaunchConfig, device: torch.device, interpreted: bool) -> _Plan:
    b, hq, d = q_shape[0], q_shape[1], q_shape[-1]
    nq = q_shape[2] if len(q_shape) == 4 else 1
    hkv, nb = table_shape[1:]
    bs = pool_shape[1]
    r = hq // hkv * nq                                       # query rows per KV head
    block, head_dim = next_pow2(bs), max(_MIN_DOT, next_pow2(d))
    blocks_per_step = max(1, launch.tile_bytes // (head_dim * pool_dtype.itemsize * block))
    nsplit, per_split = _plan_splits(b * hkv, max(nb, 1), blocks_per_step, device, launch.programs_per_sm)
    options = {"num_warps": launch.num_warps or (4 if head_dim <= 128 else 8)}
    if launch.num_stages is not None:
        options["num_stages"] = launch.num_stages
    return _Plan(
        r=r, nsplit=nsplit, split_grid=(b * hkv, nsplit), split_ints=(r, d, bs, nb, per_split),
        split_constexprs={"ROWS": max(_MIN_DOT, next_pow2(r)), "HEAD_DIM": head_dim, "BLOCK": block,
                          "BLOCKS_PER_STEP": blocks_per_step, "DOT_PRECISION": "ieee",
                          "UPCAST_DOTS": pool_dtype == torch.bfloat16 and interpreted},
        split_options=options, merge_grid=(b * hkv * r,), merge_ints=(r, d, nsplit),
        merge_constexprs={"SPLITS": min(next_pow2(nsplit), max(1, _MERGE_FLOATS // head_dim)), "HEAD_DIM": head_dim},
        merge_options={"num_warps": 1 if head_dim <= 128 else 2}, scratch_shape=(b * hkv, nsplit, r, d))


def paged_attention_triton(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    block_lens: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    launch: LaunchConfig = DEFAULT_LAUNCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged attention read straight from the pools; same contract as ``paged_attention``.

    q: ``[B, Hq, D]`` or ``[B, Hq, Q, D]``; k_pool, v_pool: ``[num_slots, block_size, D]``
    fp32/fp16/bf16 (fp32 accumulation; q and the probabilities are rounded to the pool dtype
    for the tensor cores); block_table, block_lens: int32 ``[B, Hkv, NB]``.
    Returns fp32 ``out`` shaped like q and fp32 natural-log ``lse`` ``[B, Hq(, Q)]``.
    ``launch`` tunes the launch (tiles, splits, warps, stages), never the result.
    """
    check_paged_args(q, k_pool, v_pool, block_table, block_lens)
    split, merge = _launchers()
    plan = _plan(q.shape, k_pool.shape, k_pool.dtype, block_table.shape, launch, q.device,
                 os.environ.get("TRITON_INTERPRET") == "1")
    q_rows = q.reshape(plan.split_grid[0], plan.r, q.shape[-1])        # [B*Hkv, R, D]
    if not q_rows.is_contiguous():
        q_rows = q_rows.contiguous()
    table, lens = _int32(block_table), _int32(block_lens)
    poison = os.environ.get(POISON_ENV) == "1"
    # out [B, Hq, (Q,) D] has the kernels' row order (sequence, KV head, group member, token)
    out, lse = _out_and_lse(q.shape, q.device, poison)
    if plan.nsplit == 1:                                     # same layout: write the result directly
        part_out, part_lse = out, lse
    else:
        part_out, part_lse = _out_and_lse(plan.scratch_shape, q.device, poison)
    split(plan.split_grid, (q_rows, k_pool, v_pool, table, lens, part_out, part_lse, scale * _LOG2E,
                            float(softcap or 1.0), *plan.split_ints),
          {**plan.split_constexprs, "SOFTCAP": bool(softcap)}, plan.split_options)
    if plan.nsplit > 1:
        merge(plan.merge_grid, (part_out, part_lse, out, lse, *plan.merge_ints),
              plan.merge_constexprs, plan.merge_options)
    return out, lse


# -- dispatch --

def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    block_lens: torch.Tensor,
    scale: float,
    backend: Optional[str] = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over the K/V blocks listed in ``block_table``.

    q: ``[B, Hq, D]`` (one decode token) or ``[B, Hq, Q, D]`` (every query token sees every
    listed token; no causal mask), any float dtype; query head ``h`` reads KV head
    ``h // (Hq // Hkv)``.
    k_pool, v_pool: ``[num_slots, block_size, D]`` fp32/fp16/bf16, contiguous.
    block_table: int32 ``[B, Hkv, NB]``, slot per entry, ``-1`` = unused (anywhere);
    block_lens: int32 ``[B, Hkv, NB]``, valid leading tokens of each listed block.
    scale: softmax scale. softcap: logit soft-capping, ``softcap * tanh(scale * q.k / softcap)``
    (Gemma 2); 0: none.
    backend: None picks Triton for CUDA tensors and the numba kernel of kernels/cpu_attention.py
    for CPU tensors (5-6x faster than the torch gather on this project's CPU at SmolLM2's decode
    shapes); "triton", "numba" or "torch" forces one.
    Returns ``out`` fp32 shaped like q and ``lse`` fp32 natural-log ``[B, Hq]`` /
    ``[B, Hq, Q]``; a (sequence, KV head) with nothing selected gives out 0, lse -inf.
    """
    if backend is None:
        backend = "triton" if q.is_cuda else "numba"
    if backend == "triton":
        return paged_attention_triton(q, k_pool, v_pool, block_table, block_lens, scale, softcap)
    if backend == "numba":
        return cpu_partial_attention(q, k_pool, v_pool, block_table, block_lens, scale, softcap=softcap)
    if backend == "torch":
        return paged_attention_torch(q, k_pool, v_pool, block_table, block_lens, scale, softcap)
    raise ValueError(f"backend={backend!r} is not known: use None, 'triton', 'numba' or 'torch'")
