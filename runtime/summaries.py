"""Block summaries: small per-block statistics of the keys, kept on the device tier, from which
a step scores blocks without reading them.

For each block of each (sequence, kv_head): the per-channel min and max of its keys (Quest's
upper bound of ``q . k`` over the block) and their sum (the mean key, ShadowKV's landmark).
"""
from __future__ import annotations

import torch


class BlockSummaries:
    """``kmin``, ``kmax``, ``ksum``: fp32 ``[rows, capacity, head_dim]`` indexed by logical block."""

    def __init__(self, rows: int, head_dim: int, block_size: int, device: torch.device):
        self.rows, self.head_dim, self.block_size, self.device = rows, head_dim, block_size, device
        self.kmin = self._full(0, float("inf"))
        self.kmax = self._full(0, float("-inf"))
        self.ksum = self._full(0, 0.0)

    def _full(self, n: int, value: float) -> torch.Tensor:
        return torch.full((self.rows, n, self.head_dim), value, dtype=torch.float32, device=self.device)

    @property
    def nbytes(self) -> int:
        return 3 * self.kmin.numel() * 4

    def _reserve(self, blocks: int) -> None:
        cap = self.kmin.shape[1]
        if blocks <= cap:
            return
        new = max(blocks, 2 * cap, 16)
        for name, value in (("kmin", float("inf")), ("kmax", float("-inf")), ("ksum", 0.0)):
            grown = self._full(new, value)
            grown[:, :cap] = getattr(self, name)
            setattr(self, name, grown)

    def update(self, position: int, k: torch.Tensor) -> None:
        """Fold keys ``k: [rows, n, D]`` at token positions ``position ..`` into their blocks."""
        n = k.shape[1]
        if n == 0:
            return
        idx = (torch.arange(position, position + n, device=self.device) // self.block_size)
        self._reserve(int(idx[-1]) + 1)
        index = idx.view(1, n, 1).expand(self.rows, n, self.head_dim)
        kf = k.to(self.device, torch.float32)
        self.kmin.scatter_reduce_(1, index, kf, "amin")
        self.kmax.scatter_reduce_(1, index, kf, "amax")
        self.ksum.scatter_add_(1, index, kf)

    def scores(self, q: torch.Tensor, ids: torch.Tensor, kind: str, counts: torch.Tensor) -> torch.Tensor:
        """Score blocks ``ids`` ([nb] int64) for the queries of each KV head.

        q: ``[B, Hq, Q, D]``; counts: tokens in each block ``[nb]``. GQA/MQA and several query
        tokens aggregate by max. Returns fp32 ``[rows, nb]``.
        """
        b, hq, nq, d = q.shape
        hkv = self.rows // b
        qf = q.to(self.device, torch.float32).reshape(b * hkv, (hq // hkv) * nq, d)    # [rows, G*Q, D]
        if kind == "minmax":
            lo, hi = self.kmin[:, ids], self.kmax[:, ids]                            # [rows, nb, D]
            bound = torch.maximum(qf[:, :, None] * lo[:, None], qf[:, :, None] * hi[:, None])
            return bound.sum(-1).amax(1)
        mean = self.ksum[:, ids] / counts.to(self.device).clamp_min(1).view(1, -1, 1)
        return torch.bmm(qf, mean.transpose(1, 2)).amax(1)
