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

# Scores of one query chunk are materialised: keep them under this many bytes.
_SCORE_BYTES = 256 << 20


@dataclass(frozen=True)
class StepMask:
    """How the queries of one step see the window.

    bias: additive fp32 (``-inf`` = masked), broadcastable to ``[B, Hq, Q, window]``, or None;
    is_causal: SDPA's convention, query ``i`` sees window column ``j <= i``.
    """

    start: int
    end: int
    bias: Optional[torch.Tensor] = None
    is_causal: bool = False


def to_bias(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A bool mask (True = attend) or float mask as an additive fp32 bias."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.float()


def column_bias(step: StepMask, positions: torch.Tensor, num_queries: int) -> Optional[torch.Tensor]:
    """The bias for keys at ``positions`` ([S] int64): the mask's columns, window and causality.

    Returns fp32 broadcastable to ``[B, Hq, Q, S]``, or None when every key is visible.
    """
    col = positions - step.start                                          # [S]
    outside = (positions < step.start) | (positions >= step.end)
    bias = None
    if step.bias is not None:
        width = step.bias.shape[-1]
        picked = step.bias.index_select(-1, col.clamp(0, width - 1).to(step.bias.device))
        bias = picked.to(positions.device)
    if step.is_causal:
        q = torch.arange(num_queries, device=positions.device)
        causal = torch.zeros((num_queries, positions.shape[0]), dtype=torch.float32, device=positions.device)
        causal.masked_fill_(col[None, :] > q[:, None], float("-inf"))
        bias = causal if bias is None else bias + causal
    if bool(outside.any()):
        edge = torch.zeros(positions.shape, dtype=torch.float32, device=positions.device)
        edge.masked_fill_(outside, float("-inf"))
        bias = edge if bias is None else bias + edge
    return bias


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           bias: Optional[torch.Tensor], is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_with_lse``, in query chunks that bound the score matrix off the CPU
    (the CPU path is a fused kernel that never materialises it).

    q: ``[B, Hq, Q, D]``; k, v: ``[B, Hkv, S, D]``; bias broadcastable to ``[B, Hq, Q, S]``.
    """
    b, hq, nq, _ = q.shape
    s = k.shape[2]
    chunk = max(1, _SCORE_BYTES // max(1, b * hq * s * 4))
    if nq <= chunk or q.device.type == "cpu":
        return attention_with_lse(q, k, v, scale, bias, is_causal)
    outs, lses = [], []
    for i in range(0, nq, chunk):
        rows = torch.arange(i, min(i + chunk, nq), device=q.device)
        sub = None if bias is None else (bias if bias.shape[-2] == 1 else bias[..., i:i + chunk, :])
        if is_causal:
            causal = torch.zeros((rows.shape[0], s), dtype=torch.float32, device=q.device)
            causal.masked_fill_(torch.arange(s, device=q.device)[None, :] > rows[:, None], float("-inf"))
            sub = causal if sub is None else sub + causal
        o, l = attention_with_lse(q[:, :, i:i + chunk], k, v, scale, sub)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def empty_partial(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial result of attending nothing: out 0, lse -inf."""
    b, hq, nq, d = q.shape
    return (torch.zeros((b, hq, nq, d), dtype=torch.float32, device=q.device),
            torch.full((b, hq, nq), float("-inf"), dtype=torch.float32, device=q.device))


def attend_blocks(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                  block_ids: list[int], block_size: int, step: StepMask, scale: float,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over gathered blocks.

    q: ``[B, Hq, Q, D]`` on the blocks' device; k_blocks, v_blocks: ``[B, Hkv, nb, bs, D]``;
    block_ids: the logical index of each of the ``nb`` blocks. Returns fp32 ``(out, lse)``.
    """
    if not block_ids:
        return empty_partial(q)
    b, hkv, nb, bs, d = k_blocks.shape
    ids = torch.tensor(block_ids, dtype=torch.int64, device=q.device)
    positions = (ids[:, None] * block_size + torch.arange(bs, device=q.device)).reshape(-1)
    bias = column_bias(step, positions, q.shape[2])
    k = k_blocks.reshape(b, hkv, nb * bs, d)
    v = v_blocks.reshape(b, hkv, nb * bs, d)
    return attend(q, k, v, scale, bias)
