"""Attention over gathered K/V with an additive bias, returning the log-sum-exp.

The general (any mask, several query tokens) path of the runtime. On the CPU it runs
PyTorch's fused flash-attention kernel, which also returns the log-sum-exp (and computes
exactly what ``scaled_dot_product_attention`` does in eager mode); elsewhere plain matmuls.
"""
from __future__ import annotations

from typing import Optional

import torch


def _as_4d(bias: torch.Tensor) -> torch.Tensor:
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)) if bias.dim() < 4 else bias


def _causal_bias(nq: int, s: int, device: torch.device) -> torch.Tensor:
    """SDPA's ``is_causal``: query ``i`` sees key ``j <= i`` (aligned top-left)."""
    keep = torch.ones((nq, s), dtype=torch.bool, device=device).tril()
    return torch.zeros((nq, s), dtype=torch.float32, device=device).masked_fill_(~keep, float("-inf"))


def soft_cap(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """Logit soft-capping (Gemma 2): ``softcap * tanh(scores / softcap)``; 0 leaves the scores."""
    return scores if not softcap else torch.tanh(scores / softcap) * softcap


def _fused_cpu(q, k, v, scale, bias, is_causal):
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    mask = None if bias is None else _as_4d(bias.float())
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.float(), k.float(), v.float(), 0.0, is_causal, attn_mask=mask, scale=scale)
    return out, lse


def _matmul(q, k, v, scale, bias, is_causal, softcap=0.0):
    b, hq, nq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    qf = q.float().reshape(b, hkv, g * nq, d)                              # [B, Hkv, G*Q, D]
    scores = torch.matmul(qf, k.float().transpose(-1, -2)) * scale        # [B, Hkv, G*Q, S]
    scores = soft_cap(scores, softcap).reshape(b, hq, nq, s)
    if is_causal:
        bias = _causal_bias(nq, s, q.device) if bias is None else bias + _causal_bias(nq, s, q.device)
    if bias is not None:
        scores = (scores + bias).masked_fill(bias == float("-inf"), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                  # [B, Hq, Q]
    p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    out = torch.matmul(p.reshape(b, hkv, g * nq, s), v.float()).reshape(b, hq, nq, d)
    return out, lse


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over ``k, v`` with fp32 accumulation.

    q: ``[B, Hq, Q, D]``; k, v: ``[B, Hkv, S, D]`` with ``Hq % Hkv == 0`` (GQA/MQA: query head
    ``h`` reads KV head ``h // (Hq // Hkv)``); bias: additive fp32, broadcastable to
    ``[B, Hq, Q, S]``, ``-inf`` where a key is masked, or None; is_causal: query ``i`` also
    sees only keys ``j <= i``; softcap: the scores (``scale * q @ k^T``) are soft-capped to
    ``softcap * tanh(s / softcap)`` before the bias (0: not). Returns ``out [B, Hq, Q, D]`` fp32 and ``lse [B, Hq, Q]`` fp32
    (natural log); a row that sees no key gets ``out = 0``, ``lse = -inf``.
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if k.shape[2] == 0 or q.shape[2] == 0:          # no key, or no query (the fused CPU kernel would divide by 0)
        b, _, nq, d = q.shape
        return (torch.zeros((b, hq, nq, d), dtype=torch.float32, device=q.device),
                torch.full((b, hq, nq), float("-inf"), dtype=torch.float32, device=q.device))
    if q.device.type == "cpu" and q.dtype != torch.float64 and not softcap:
        out, lse = _fused_cpu(q, k, v, scale, bias, is_causal)
    else:
        out, lse = _matmul(q, k, v, scale, bias, is_causal, softcap)
    finite = torch.isfinite(lse)
    if bias is not None:                      # rows with no visible key (the fused kernel gives lse 0)
        visible = bias > float("-inf")
        if is_causal:
            visible = visible & _causal_bias(q.shape[2], k.shape[2], q.device).isfinite()
        finite = finite & _as_4d(visible).any(-1).expand_as(finite)
    out = torch.where(finite.unsqueeze(-1), out.float(), 0.0)
    return out, torch.where(finite, lse.float(), float("-inf"))
