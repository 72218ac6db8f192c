"""Partial attention over a set of KV blocks, with the step's mask mapped onto their tokens.

The attended window is token positions ``[start, end)`` of a layer; column ``j`` of the
model's mask is position ``start + j``. Blocks may hold positions outside the window (the
unfilled tail of the last block, tokens before a sliding window): those get ``-inf``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels.masked_attention import attention_with_lse
from .device_copies import to_device

# Scores of one query chunk are materialised: keep them under this many bytes.
_SCORE_BYTES = 256 << 20


def _query_chunk(batch: int, q_heads: int, keys: int) -> int:
    """Queries per chunk whose fp32 ``[B, Hq, chunk, S]`` scores (or bias) fit ``_SCORE_BYTES``."""
    return max(1, _SCORE_BYTES // max(1, batch * q_heads * keys * 4))


@dataclass(frozen=True)
class StepMask:
    """How the queries of one step see the window.

    bias: additive fp32 (``-inf`` = masked), broadcastable to ``[B, Hq, Q, window]``, or None;
    is_causal: SDPA's convention, query ``i`` sees window column ``j <= i``; softcap: the scores
    ``scale * q.k`` are soft-capped to ``softcap * tanh(s / softcap)`` before the bias (Gemma 2's
    logit soft-capping), 0: not.
    """

    start: int
    end: int
    bias: Optional[torch.Tensor] = None
    is_causal: bool = False
    softcap: float = 0.0


def to_bias(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A bool mask (True = attend) or float mask as an additive fp32 bias."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.float()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: Optional[torch.Tensor],
           is_causal: bool = False, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_with_lse``, in query chunks that bound the score matrix off the CPU
    (the CPU path is a fused kernel that never materialises it).

    q: ``[B, Hq, Q, D]``; k, v: ``[B, Hkv, S, D]``; bias broadcastable to ``[B, Hq, Q, S]``.
    """
    b, hq, nq, _ = q.shape
    s = k.shape[2]
    chunk = _query_chunk(b, hq, s)
    if nq <= chunk or q.device.type == "cpu":
        return attention_with_lse(q, k, v, scale, bias, is_causal, softcap)
    outs, lses = [], []
    for i in range(0, nq, chunk):
        rows = torch.arange(i, min(i + chunk, nq), device=q.device)
        sub = None if bias is None else (bias if bias.shape[-2] == 1 else bias[..., i:i + chunk, :])
        if is_causal:
            causal = torch.zeros((rows.shape[0], s), dtype=torch.float32, device=q.device)
            causal.masked_fill_(torch.arange(s, device=q.device)[None, :] > rows[:, None], float("-inf"))
            sub = causal if sub is None else sub + causal
        o, l = attention_with_lse(q[:, :, i:i + chunk], k, v, scale, sub, softcap=softcap)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def empty_partial(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial result of attending nothing: out 0, lse -inf."""
    b, hq, nq, d = q.shape
    return (torch.zeros((b, hq, nq, d), dtype=torch.float32, device=q.device),
            torch.full((b, hq, nq), float("-inf"), dtype=torch.float32, device=q.device))


def row_bias(step: StepMask, positions: torch.Tensor, batch: int, kv_heads: int, q_heads: int,
             num_queries: int, first_query: int = 0) -> Optional[torch.Tensor]:
    """The bias for keys at per-row ``positions`` (``[rows, S]`` int64, -1 for padding) of
    queries ``first_query .. first_query + num_queries - 1`` of the step.

    A row is a (sequence, kv_head). Maps the mask's columns, the window edges and causality
    onto each row's keys. Returns fp32 ``[B, Hq, Q, S]`` (or broadcastable), or None.
    """
    rows, s = positions.shape
    g = q_heads // kv_heads
    dev = positions.device
    col = (positions - step.start).view(batch, kv_heads, 1, 1, s)                  # [B, Hkv, 1, 1, S]
    bias = None
    if step.bias is not None:
        mask = step.bias.to(dev)
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))            # [Bm, Hm, Qm, W]
        if mask.shape[2] > 1:                                                      # a row per query: these ones
            mask = mask[:, :, first_query:first_query + num_queries]
        bm, hm, qm, width = mask.shape
        mask = mask.expand(batch, hm, qm, width).reshape(batch, 1 if hm == 1 else kv_heads, 1 if hm == 1 else g, qm, width)
        mask = mask.expand(batch, kv_heads, mask.shape[2], qm, width)
        index = col.clamp(0, width - 1).expand(batch, kv_heads, mask.shape[2], qm, s)
        bias = torch.gather(mask, 4, index)                                        # [B, Hkv, G|1, Q|1, S]
    if step.is_causal:
        q = torch.arange(first_query, first_query + num_queries, device=dev).view(1, 1, 1, num_queries, 1)
        causal = torch.zeros(()).to(dev).expand(batch, kv_heads, 1, num_queries, s).masked_fill(col > q, float("-inf"))
        bias = causal if bias is None else bias + causal
    outside = (positions < step.start) | (positions >= step.end)
    # nothing outside: the edge adds 0, so it is left out where checking is free (on a GPU the
    # check would make the host wait for the device: there it is always added)
    if dev.type != "cpu" or bool(outside.any()):
        edge = torch.zeros((rows, s), device=dev).masked_fill_(outside, float("-inf")).view(batch, kv_heads, 1, 1, s)
        bias = edge if bias is None else bias + edge
    if bias is None:
        return None
    bias = bias.expand(batch, kv_heads, g, bias.shape[3], s)
    return bias.reshape(batch, q_heads, bias.shape[3], s)


def gather_part(k_pool: torch.Tensor, v_pool: torch.Tensor, part, kv) -> tuple[torch.Tensor, ...]:
    """One tier's selected blocks copied out of its pool, on the pool's device.

    part: a ``TierPart`` (ids, slots, valid ``[rows, m]``). Returns k, v ``[B, Hkv, m*bs, D]``
    and the token positions ``[rows, m*bs]`` (-1 for padding entries).
    """
    bs, dev = kv.block_size, k_pool.device
    slots = to_device(part.slots, dev)
    m = slots.shape[1]
    k = k_pool[slots].reshape(kv.batch, kv.kv_heads, m * bs, kv.head_dim)
    v = v_pool[slots].reshape(kv.batch, kv.kv_heads, m * bs, kv.head_dim)
    positions = part.ids[:, :, None] * bs + torch.arange(bs, device=part.ids.device)  # [rows, m, bs]
    positions = torch.where(part.valid[:, :, None], positions, -1).reshape(kv.rows, m * bs)
    return k, v, to_device(positions, dev)


def attend_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kv,
                    step: StepMask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q: [B, Hq, Q, D]`` over gathered keys at per-row ``positions``: in chunks
    of queries whose bias ``[B, Hq, chunk, S]`` stays under ``_SCORE_BYTES`` (a prompt fed in
    chunks attends every earlier token with a mask and causality per query)."""
    b, hq, nq, _ = q.shape
    chunk = _query_chunk(b, hq, positions.shape[1])
    parts = [attend(q[:, :, i:i + chunk], k, v, scale,
                    row_bias(step, positions, b, kv.kv_heads, hq, min(chunk, nq - i), i), softcap=step.softcap)
             for i in range(0, max(nq, 1), chunk)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([o for o, _ in parts], dim=2), torch.cat([l for _, l in parts], dim=2)


def paged_tables(part, kv, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A part as the paged kernels take it: int32 ``block_table`` (-1 = padding) and
    ``block_lens`` (valid leading tokens of each block, the last one partly filled), ``[B, Hkv, m]``."""
    bs = kv.block_size
    table = torch.where(part.valid, part.slots, -1)
    lens = torch.where(part.valid, (end - part.ids * bs).clamp(0, bs), 0)
    shape = (kv.batch, kv.kv_heads, table.shape[1])
    return table.to(torch.int32).view(shape), lens.to(torch.int32).view(shape)


def kernel_fits(step: StepMask, part, kv, num_queries: int) -> bool:
    """Whether the paged kernels compute this part exactly: no mask, every query token sees
    every listed token, and no listed block holds tokens before the window."""
    if step.bias is not None or (step.is_causal and num_queries > 1):
        return False
    return step.start == 0 or bool((part.ids[part.valid] * kv.block_size >= step.start).all())


def attend_part(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, part, kv,
                step: StepMask, scale: float, kernel=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` (on the pool's device) over one tier's selected blocks. fp32 (out, lse).

    kernel: a paged kernel ``(q, k_pool, v_pool, block_table, block_lens, scale, softcap=)`` that reads
    the blocks where they lie; used when it computes the part exactly, else gather + attend.
    """
    if kernel is not None and kernel_fits(step, part, kv, q.shape[2]):
        table, lens = paged_tables(part, kv, step.end)
        dev = k_pool.device
        return kernel(q, k_pool, v_pool, to_device(table, dev), to_device(lens, dev), scale, softcap=step.softcap)
    return attend_gathered(q, *gather_part(k_pool, v_pool, part, kv), kv, step, scale)
