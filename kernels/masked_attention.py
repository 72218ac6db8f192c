"""Attention over gathered K/V with an additive bias, returning the log-sum-exp.

The general (any mask, several query tokens) path of the runtime, and the reference the
paged kernels are tested against.
"""
from __future__ import annotations

from typing import Optional

import torch


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over ``k, v`` with fp32 accumulation.

    q: ``[B, Hq, Q, D]``; k, v: ``[B, Hkv, S, D]`` with ``Hq % Hkv == 0`` (GQA/MQA: query head
    ``h`` reads KV head ``h // (Hq // Hkv)``); bias: additive fp32, broadcastable to
    ``[B, Hq, Q, S]``, ``-inf`` where a key is masked, or None.
    Returns ``out [B, Hq, Q, D]`` fp32 and ``lse [B, Hq, Q]`` fp32 (natural log); a row that
    sees no key gets ``out = 0``, ``lse = -inf``.
    """
    b, hq, nq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    g = hq // hkv
    qf = q.float().reshape(b, hkv, g * nq, d)                              # [B, Hkv, G*Q, D]
    scores = torch.matmul(qf, k.float().transpose(-1, -2)) * scale        # [B, Hkv, G*Q, S]
    scores = scores.reshape(b, hq, nq, s)
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)                                  # [B, Hq, Q]
    finite = torch.isfinite(lse)
    p = torch.exp(scores - torch.where(finite, lse, 0.0).unsqueeze(-1))
    p = torch.where(finite.unsqueeze(-1), p, 0.0)
    out = torch.matmul(p.reshape(b, hkv, g * nq, s), v.float()).reshape(b, hq, nq, d)
    return out, lse
