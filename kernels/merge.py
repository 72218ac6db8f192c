"""Exact log-sum-exp merge of partial attention results.

Each part is attention of the same queries over a disjoint set of keys:
``out_i = softmax(s_i) @ v_i`` and ``lse_i = logsumexp(s_i)`` (fp32, natural log).
The merge gives attention over the union, exactly.
"""
from __future__ import annotations

from typing import Sequence

import torch


def merge_partials(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention results.

    outs: each ``[..., head_dim]`` fp32; lses: each ``[...]`` fp32, ``-inf`` for an empty part
    (its ``out`` is ignored, NaN included). Returns ``(out [..., head_dim] fp32, lse [...] fp32)``;
    a row empty in every part gives ``out = 0`` and ``lse = -inf``.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"merge_partials needs matching, non-empty lists (got {len(outs)} outs, {len(lses)} lses)")
    lse_all = torch.stack([l.float() for l in lses])                  # [P, ...]
    m = lse_all.amax(dim=0)                                            # [...]
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse_all - m_safe)                                    # [P, ...], 0 for empty parts
    total = w.sum(dim=0)
    out = torch.zeros_like(outs[0], dtype=torch.float32)
    for w_i, o_i in zip(w, outs):
        # where(): an empty part may hold anything, NaN included
        out += torch.where(w_i.unsqueeze(-1) > 0, o_i.float() * w_i.unsqueeze(-1), 0.0)
    out = torch.where(total.unsqueeze(-1) > 0, out / total.clamp_min(1e-30).unsqueeze(-1), 0.0)
    lse = torch.where(total > 0, m_safe + torch.log(total.clamp_min(1e-30)), float("-inf"))
    return out, lse
