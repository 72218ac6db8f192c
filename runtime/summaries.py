"""Block summaries: small per-block statistics of the keys, kept on the device tier, from which
a step scores blocks without reading them.

For each block of each (sequence, kv_head): the per-channel min and max of its keys (Quest's
upper bound of ``q . k`` over the block; in fp16, widened to the fp16 values just outside them:
``block_scores.round_range``), their sum (the mean key, ShadowKV's landmark), and
every key quantized to 2 bits per channel within the block's own min/max ("qkeys": 4 codes per
byte, head_dim / 4 bytes per token, a sixteenth of an fp32 key). A block's keys are quantized
when the block is complete (its range is final then); until then they wait in ``tail``.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..kernels.block_scores import (
    CODE_BITS,
    LEVELS,
    fold_open_key,
    RANGE_DTYPE,
    pack_codes,
    qkeys_log_mass_or_bound,
    qkeys_log_mass_torch,
    qkeys_log_mass_triton,
    qkeys_top_blocks,
    round_range,
)
from .device_copies import to_device

_PER_BYTE = 8 // CODE_BITS


def quantize(k: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Codes of keys ``k [..., bs, D]`` within their block's per-channel range ``lo, hi [..., 1, D]``."""
    step = ((hi - lo) / LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
    return ((k - lo) / step).round_().clamp_(0, LEVELS).to(torch.uint8)


class BlockSummaries:
    """``kmin``, ``kmax``: fp16 ``[rows, capacity, head_dim]`` indexed by logical block (the range
    rounded outward), ``ksum``: fp32, the same shape;
    ``codes``: uint8 ``[rows, capacity, block_size, head_dim / 4]`` (complete blocks only);
    ``tail``: fp32 ``[rows, block_size, head_dim]``, the keys of the open (incomplete) block."""

    def __init__(self, rows: int, head_dim: int, block_size: int, device: torch.device):
        self.rows, self.head_dim, self.block_size, self.device = rows, head_dim, block_size, device
        self.code_dim = -(-head_dim // _PER_BYTE) * _PER_BYTE                  # channels, padded
        self.kmin = self._full(0, float("inf"), RANGE_DTYPE)
        self.kmax = self._full(0, float("-inf"), RANGE_DTYPE)
        self.ksum = self._full(0, 0.0)
        self.codes = torch.zeros((rows, 0, block_size, self.code_dim // _PER_BYTE), dtype=torch.uint8, device=device)
        self.tail = torch.zeros((rows, block_size, head_dim), dtype=torch.float32, device=device)
        self.length = 0                                                        # tokens folded in

    def _full(self, n: int, value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full((self.rows, n, self.head_dim), value, dtype=dtype, device=self.device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kmin, self.kmax, self.ksum, self.codes, self.tail))

    def _reserve(self, blocks: int) -> None:
        cap = self.kmin.shape[1]
        if blocks <= cap:
            return
        # a quarter more than asked: a prompt fills its blocks exactly, and growing at the first
        # decode step (copying every summary of the layer) cost ~2 ms per layer at 4K x 4
        new = max(blocks + blocks // 4, 2 * cap, 16)
        for name, value in (("kmin", float("inf")), ("kmax", float("-inf")), ("ksum", 0.0)):
            grown = self._full(new, value, getattr(self, name).dtype)
            grown[:, :cap] = getattr(self, name)
            setattr(self, name, grown)
        codes = self.codes.new_zeros((self.rows, new, *self.codes.shape[2:]))
        codes[:, :cap] = self.codes
        self.codes = codes

    def update(self, position: int, k: torch.Tensor) -> None:
        """Fold keys ``k: [rows, n, D]`` at token positions ``position ..`` into their blocks.

        Keys arrive in order (``position`` is the number of tokens folded in so far)."""
        n = k.shape[1]
        if n == 0:
            return
        if position != self.length:
            raise RuntimeError(f"block summaries hold {self.length} tokens, keys arrived for position {position}")
        bs = self.block_size
        if n == 1 and (position + 1) % bs:              # a decode step's token, its block still open
            blk = position // bs
            self._reserve(blk + 1)
            kf = k[:, 0].to(self.device, torch.float32)                       # [rows, D]
            if self.device.type == "cpu":                                     # one numba call
                fold_open_key(kf, self.kmin, self.kmax, self.ksum, self.tail, blk, position % bs)
                self.length = position + 1
                return
            lo, hi = round_range(kf, kf)
            self.kmin[:, blk] = torch.minimum(self.kmin[:, blk], lo)
            self.kmax[:, blk] = torch.maximum(self.kmax[:, blk], hi)
            self.ksum[:, blk] += kf
            self.tail[:, position % bs] = kf
            self.length = position + 1
            return
        idx = (torch.arange(position, position + n, device=self.device) // bs)
        self._reserve((position + n - 1) // bs + 1)           # from the host's numbers: no read of idx
        index = idx.view(1, n, 1).expand(self.rows, n, self.head_dim)
        kf = k.to(self.device, torch.float32)
        lo, hi = round_range(kf, kf)               # rounding each key outward, then min/max: the same
        self.kmin.scatter_reduce_(1, index, lo, "amin")
        self.kmax.scatter_reduce_(1, index, hi, "amax")
        self.ksum.scatter_add_(1, index, kf)
        # -- quantize the blocks this completes; the rest waits in the tail --
        open_n = position % bs
        first = position // bs
        keys = torch.cat([self.tail[:, :open_n], kf], dim=1) if open_n else kf      # from block `first` on
        full = keys.shape[1] // bs
        if full:
            blocks = keys[:, : full * bs].reshape(self.rows, full, bs, self.head_dim)
            lo = self.kmin[:, first:first + full, None].float()
            hi = self.kmax[:, first:first + full, None].float()
            codes = quantize(blocks, lo, hi)
            if self.code_dim != self.head_dim:
                codes = torch.nn.functional.pad(codes, (0, self.code_dim - self.head_dim))
            self.codes[:, first:first + full] = pack_codes(codes)
        rest = keys.shape[1] - full * bs
        self.tail[:, :rest] = keys[:, full * bs:]
        self.length = position + n

    def truncate(self, length: int, open_keys: Optional[torch.Tensor]) -> None:
        """Forget the keys from token ``length`` on (the cache was cropped). open_keys: the keys
        ``[rows, length % block_size, D]`` of the block that is open again (None when ``length``
        ends a block): its min, max and sum are taken anew from them (the sum token by token, as
        the steps added them), and they wait in the tail until the block is complete again."""
        if length > self.length:
            raise ValueError(f"block summaries hold {self.length} tokens; cannot keep {length}")
        bs = self.block_size
        keep = -(-length // bs)
        self.kmin[:, keep:] = float("inf")
        self.kmax[:, keep:] = float("-inf")
        self.ksum[:, keep:] = 0.0
        self.codes[:, keep:] = 0
        n = length % bs
        if n:
            if open_keys is None or tuple(open_keys.shape) != (self.rows, n, self.head_dim):
                raise ValueError(f"the open block's {n} keys are needed to cut the summaries at {length}")
            blk, kf = length // bs, open_keys.to(self.device, torch.float32)
            self.kmin[:, blk], self.kmax[:, blk] = round_range(kf.amin(1), kf.amax(1))
            total = torch.zeros_like(kf[:, 0])
            for t in range(n):
                total += kf[:, t]
            self.ksum[:, blk] = total
            self.codes[:, blk] = 0
            self.tail[:, :n] = kf
        self.length = length

    def scores(self, q: torch.Tensor, ids: torch.Tensor, kind: str, counts: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Estimated log attention mass of blocks ``ids`` ([nb] int64) for every query row.

        q: ``[B, Hq, Q, D]``; counts: tokens in each block ``[nb]``; scale: the softmax scale.
        kind "minmax": ``scale * max over the block of q.k (Quest's bound) + log(count)``, an
        upper bound; "mean": ``scale * q.mean key + log(count)``; "qkeys": the log-sum-exp of
        ``scale * q.k`` over the block's 2-bit keys (the open block, not quantized yet, gets
        its min/max bound). Returns fp32 ``[rows, G*Q, nb]`` (rows = B*Hkv, G = Hq // Hkv).
        """
        qf, log_count = self._query_rows(q, counts)
        # which blocks are quantized, decided on the host (the runtime's ids are CPU tensors):
        # on a GPU a device-side mask would cost a sync per layer and step to read back
        ids_host = ids if ids.device.type == "cpu" else ids.cpu()
        ids = to_device(ids, self.device)
        if kind == "mean":
            mean = self.ksum[:, ids] / counts.to(self.device).clamp_min(1).view(1, -1, 1)
            return torch.bmm(qf, mean.transpose(1, 2)) * scale + log_count
        if kind not in ("minmax", "qkeys"):
            raise ValueError(f"block summary {kind!r} is not known: use 'minmax', 'mean' or 'qkeys'")
        if kind == "minmax":
            return self._bound(qf, ids, log_count, scale)
        done = self._quantized(ids_host)
        if self.device.type == "cpu":                  # one numba call, the open block's bound included
            return qkeys_log_mass_or_bound(self.codes, self.kmin, self.kmax, qf, ids, done, log_count, scale)
        n_done = int(done.sum())
        score = qkeys_log_mass_triton if self.device.type == "cuda" else qkeys_log_mass_torch
        out = qf.new_empty((qf.shape[0], qf.shape[1], ids.numel()))
        if bool(done[:n_done].all()):          # ascending ids: the quantized blocks, then the open one
            if n_done:
                out[:, :, :n_done] = score(self.codes, self.kmin, self.kmax, qf, ids[:n_done], scale)
            if n_done < ids.numel():                                   # min/max bound for the open block
                out[:, :, n_done:] = self._bound(qf, ids[n_done:], log_count[n_done:], scale)
            return out
        at = to_device(done.nonzero().squeeze(1), self.device)
        rest = to_device((~done).nonzero().squeeze(1), self.device)
        out[:, :, at] = score(self.codes, self.kmin, self.kmax, qf, ids[at], scale)     # [rows, R, n]
        out[:, :, rest] = self._bound(qf, ids[rest], log_count[rest], scale)
        return out

    def top_blocks(self, q: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, scale: float,
                   forced: np.ndarray, k: int, bonus: Optional[np.ndarray] = None,
                   kept: Optional[tuple[np.ndarray, np.ndarray]] = None, candidates: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``forced`` blocks (bool ``[nb]``) and the ``k`` others of ``ids`` with the best
        "qkeys" scores aggregated by the max over each KV head's query rows (plus ``bonus``
        ``[rows, nb]`` for the ranking, if given), in the order of
        ``ids`` ``[rows, forced.sum() + k]``, and those scores ``[rows, nb]``:
        ``scores(...).amax(1)`` and its top-k, in one numba call (rows ``kept`` marks rank by the
        scores given with it, unscored: ``qkeys_top_blocks``; candidates: its two stages). CPU
        summaries only (the device kernels rank on the device, where ``scores`` and
        ``torch.topk`` serve)."""
        if self.device.type != "cpu":
            raise ValueError(f"top_blocks ranks summaries held on the CPU; these are on {self.device}")
        qf, log_count = self._query_rows(q, counts)
        return qkeys_top_blocks(self.codes, self.kmin, self.kmax, qf, ids, self._quantized(ids), log_count, scale,
                                forced, k, bonus, kept, candidates)

    def _quantized(self, ids: torch.Tensor) -> torch.Tensor:
        """Which of blocks ``ids`` (on the host) are complete, their keys coded: bool ``[nb]``."""
        return (ids + 1) * self.block_size <= self.length

    def query_rows(self, q: torch.Tensor) -> torch.Tensor:
        """q ``[B, Hq, Q, D]`` as fp32 ``[rows, R, D]`` (R = G*Q query rows per KV head), on the
        summaries' device."""
        b, hq, nq, d = q.shape
        hkv = self.rows // b
        return q.to(self.device, torch.float32).reshape(b * hkv, (hq // hkv) * nq, d)

    def _query_rows(self, q: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``query_rows(q)`` and the log of each block's token count (at least 1) ``[nb]``."""
        return self.query_rows(q), to_device(counts, self.device).to(torch.float32).clamp_min(1).log()

    def _bound(self, qf: torch.Tensor, ids: torch.Tensor, log_count: torch.Tensor, scale: float) -> torch.Tensor:
        """Quest's bound ``scale * sum_c max(q_c min_c, q_c max_c) + log(count)``: ``[rows, R, n]``."""
        lo, hi = self.kmin[:, ids].float(), self.kmax[:, ids].float()                  # [rows, n, D]
        bound = torch.maximum(qf[:, :, None] * lo[:, None], qf[:, :, None] * hi[:, None]).sum(-1)
        return bound * scale + log_count


def summary_bytes_per_token(head_dim: int, block_size: int) -> float:
    """Device bytes of summaries per token and KV head (min and max in fp16, sum in fp32, 2-bit codes)."""
    return head_dim * (2 + 2 + 4) / block_size + math.ceil(head_dim / _PER_BYTE)
