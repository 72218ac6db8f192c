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
    if len(outs) == 1:           # its own merge (most CPU decode steps): the same values, no stacking
        lse = lses[0].float()
        return torch.where(torch.isneginf(lse).unsqueeze(-1), 0.0, outs[0].float()), lse
    lse_all = torch.stack([l.float() for l in lses])                   # [P, ...]
    # an all-empty row has m = -inf: clamped to the lowest float, its weights stay exp(-inf) = 0
    m = lse_all.amax(dim=0).clamp_min(torch.finfo(torch.float32).min)
    w = torch.exp(lse_all - m).unsqueeze(-1)                           # [P, ..., 1], 0 for empty parts
    o = torch.stack([o_i.float() for o_i in outs])
    o = torch.where(w > 0, o, 0.0)                                     # an empty part may hold NaN
    total = w.sum(dim=0)                                               # [..., 1]
    out = (o * w).sum(dim=0) / total.clamp_min(1e-30)                  # 0 where every part is empty
    return out, m + torch.log(total.squeeze(-1))                       # log(0) = -inf there
