"""The paged KV of one attention layer of one session: where each block's home and copies are.

A *block* here is ``block_size`` token positions of one row, a row being one (sequence,
kv_head). Each block has one *home* (device when the device tier has no budget, else host
for the layer's best-scored blocks within its share of the host budget, else disk) and may have cached copies: on the device
(whatever its home) and, for a disk-homed block, in host memory. Attention reads a block
where its fastest copy lies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from numba import njit

from .summaries import BlockSummaries
from .tiers import Tier

NONE = -1


@dataclass
class Fresh:
    """Blocks appended but not placed yet (placement waits for the step's queries to score
    them): logical blocks ``first ..`` with k, v ``[count, rows, bs, D]`` on the layer's device."""

    first: int
    k: torch.Tensor
    v: torch.Tensor

    @property
    def ids(self) -> range:
        return range(self.first, self.first + self.k.shape[0])


@dataclass
class LayerKV:
    """KV of one layer of one session: ``length`` tokens in blocks ``first .. num_blocks - 1``.

    Blocks before ``first`` were dropped (a sliding-window layer no longer attends them).
    Per (row, block), numpy ``[rows, capacity]`` (32-bit or narrower: the cache policy streams
    them every step, ~25 bytes an entry): ``home`` tier (-1: none yet, or dropped) and
    ``home_slot``; ``dev`` and ``host`` copy slots (-1: no copy; a host-homed block's host
    slot is its home slot); ``last_selected`` (the layer's decode step that last selected
    it, -1: never); ``score`` (its estimated attention mass at the row's last ranking);
    ``pins`` (live plans reading it: it may not move); ``last_pick``: the entries the layer's
    last decode step selected and whether each selection was a repeat (``Pick``: where the
    next step's reuse count and ahead-of-need reads start, without reading the state arrays
    at scattered entries). Per row: ``rank_q``
    (fp32 ``[rows, R, D]``, the queries of that ranking) and ``rank_len`` (the context length
    then, -1: none),
    kept only with ``rerank_similarity``.
    """

    session_id: int
    layer: int
    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int
    device: torch.device
    keeps_last: bool = False
    length: int = 0
    first: int = 0
    step: int = 0                                  # decode steps planned so far
    pinned_front: int = 1                          # sink blocks kept on the device
    pinned_back: int = 5                           # local-window blocks (and the open one) kept there
    demand: int = 0                                # (row, block) entries a decode step selects
    host_share: Optional[int] = None               # (row, block) entries it may home in host memory (placement._host_room)
    summaries: Optional[BlockSummaries] = None
    fresh: Optional[Fresh] = None
    ahead: Optional[object] = None                 # site_step.Ahead: disk blocks read before the step asked
    home: np.ndarray = field(default=None, repr=False)
    home_slot: np.ndarray = field(default=None, repr=False)
    dev: np.ndarray = field(default=None, repr=False)
    host: np.ndarray = field(default=None, repr=False)
    last_selected: np.ndarray = field(default=None, repr=False)
    score: np.ndarray = field(default=None, repr=False)
    pins: np.ndarray = field(default=None, repr=False)
    rank_q: Optional[torch.Tensor] = field(default=None, repr=False)
    rank_len: np.ndarray = field(default=None, repr=False)
    last_pick: Optional["Pick"] = field(default=None, repr=False)   # the entries the last decode step selected
    _table: Optional[tuple[np.ndarray, np.ndarray]] = field(default=None, repr=False)

    def __post_init__(self):
        if self.summaries is None:
            self.summaries = BlockSummaries(self.rows, self.head_dim, self.block_size, self.device)
        self._alloc_state(0)
        self.rank_len = np.full(self.rows, NONE, np.int64)

    def _alloc_state(self, cap: int) -> None:
        old = self.home
        n = 0 if old is None else old.shape[1]
        r = self.rows
        fills = {"home": (NONE, np.int8), "home_slot": (NONE, np.int32), "dev": (NONE, np.int32),
                 "host": (NONE, np.int32), "last_selected": (NONE, np.int32), "score": (0.0, np.float32),
                 "pins": (0, np.int32)}
        for name, (fill, dtype) in fills.items():
            new = np.full((r, cap), fill, dtype)
            if n:
                new[:, :n] = getattr(self, name)
            setattr(self, name, new)

    def __hash__(self):                   # identity: one object per (session, layer)
        return id(self)

    def __eq__(self, other):
        return self is other

    @property
    def rows(self) -> int:
        """Rows of a logical block: one per (sequence, kv_head)."""
        return self.batch * self.kv_heads

    @property
    def num_blocks(self) -> int:
        return -(-self.length // self.block_size)

    def block_range(self, start: int, end: int) -> range:
        """Logical blocks holding token positions ``[start, end)``."""
        return range(start // self.block_size, -(-end // self.block_size))

    def grow(self, nblocks: int) -> None:
        """Room in the state arrays for ``nblocks`` logical blocks."""
        if nblocks > self.home.shape[1]:
            self._alloc_state(max(nblocks, 2 * self.home.shape[1], 16))

    def pinned_blocks(self) -> np.ndarray:
        """bool ``[num_blocks]``: blocks kept on the device (sink, local window, open block)."""
        n = self.num_blocks
        out = np.zeros(n, np.bool_)
        out[self.first:min(n, self.first + self.pinned_front)] = True
        out[max(self.first, n - self.pinned_back):] = True
        return out

    def open_block(self) -> Optional[int]:
        """The partly filled last block, if any."""
        return None if self.length % self.block_size == 0 else self.length // self.block_size

    def where(self) -> tuple[np.ndarray, np.ndarray]:
        """Where attention reads each (row, block): tier ``[rows, nb]`` int8 (-1: not held) and
        slot (int32), its fastest copy; kept until the blocks change (read-only)."""
        if self._table is None:
            self._table = _where(self.dev, self.host, self.home, self.home_slot, self.num_blocks)
        return self._table

    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``where()`` as tensors ``(tier [rows, nblocks], slot [rows, nblocks])``."""
        tier, slot = self.where()
        return torch.from_numpy(tier), torch.from_numpy(slot)

    def changed(self) -> None:
        """Blocks were added, moved or dropped: the cached table is stale."""
        self._table = None


@dataclass(frozen=True)
class Pick:
    """The (row, block) entries one decode step of a layer selected, flat and in row order:
    ``rows``, ``blocks`` int64 ``[n]``; ``repeat`` bool ``[n]`` (the selection was a repeat: the
    block had been selected within the reuse window before); ``step``: the layer's decode step
    (what it wrote to ``last_selected``). A crop drops the entries of the blocks it frees
    (``without_from``), so the rest still say what the state arrays say of them."""

    rows: np.ndarray
    blocks: np.ndarray
    repeat: np.ndarray
    step: int

    def without_from(self, block: int) -> "Pick":
        """The entries of blocks before ``block``."""
        keep = self.blocks < block
        return Pick(self.rows[keep], self.blocks[keep], self.repeat[keep], self.step)


@dataclass
class TierPart:
    """The selected blocks of one tier, per row (one row per (sequence, kv_head)).

    ids: logical block ids ``[rows, m]``; slots: where they lie in the tier's pool (or staging
    buffer, for disk) ``[rows, m]``; valid: which entries are real (rows select different
    numbers of blocks per tier; the rest is padding).
    """

    ids: torch.Tensor
    slots: torch.Tensor
    valid: torch.Tensor


_DEVICE, _HOST, _DISK = int(Tier.DEVICE), int(Tier.HOST), int(Tier.DISK)     # numba reads module globals as constants


@njit(cache=True, nogil=True)
def _where(dev, host, home, home_slot, n):
    """``LayerKV.where``'s table of the first ``n`` blocks, in one pass (as numpy ``where``s it
    took ~40 us a call, up to three calls a layer and step)."""
    rows = dev.shape[0]
    tier = np.empty((rows, n), np.int8)
    slot = np.empty((rows, n), np.int32)
    for r in range(rows):
        for b in range(n):
            if dev[r, b] >= 0:
                tier[r, b], slot[r, b] = _DEVICE, dev[r, b]
            elif host[r, b] >= 0:
                tier[r, b], slot[r, b] = _HOST, host[r, b]
            else:
                tier[r, b] = _DISK if home[r, b] == _DISK else NONE
                slot[r, b] = home_slot[r, b]
    return tier, slot


@njit(cache=True, nogil=True)
def _split_by_tier(tier_of, slot_of, selected, tier):
    """Row by row, the selected blocks on ``tier`` first (in their order), then the others, cut
    to the longest row's count m: ids, slots (0 where not on the tier), valid ``[rows, m]``.
    tier_of, slot_of: ``[rows, nblocks]`` (tier -1: not held); selected: ``[rows, n]``."""
    rows, n = selected.shape
    nblocks = tier_of.shape[1]
    m = 0
    for r in range(rows):
        c = 0
        for j in range(n):
            b = selected[r, j]
            if b < 0 or b >= nblocks:                # numba does not check bounds
                raise IndexError("a selected block id is outside the layer's block table")
            c += tier_of[r, b] == tier
        m = max(m, c)
    ids = np.empty((rows, m), np.int64)
    slots = np.zeros((rows, m), np.int64)
    valid = np.zeros((rows, m), np.bool_)
    for r in range(rows):
        k = 0
        for j in range(n):
            b = selected[r, j]
            if tier_of[r, b] == tier and k < m:
                ids[r, k], slots[r, k], valid[r, k] = b, slot_of[r, b], True
                k += 1
        for j in range(n):                    # padding: the other blocks, as a stable sort puts them
            b = selected[r, j]
            if tier_of[r, b] != tier and k < m:
                ids[r, k] = b
                k += 1
    return ids, slots, valid


def load_kernel() -> None:
    """Load ``_split_by_tier`` and ``_where`` now (see ``block_scores.load_kernel``)."""
    _split_by_tier(np.zeros((1, 1), np.int8), np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int64), 0)
    one = np.zeros((1, 1), np.int32)
    _where(one, one, np.zeros((1, 1), np.int8), one, 1)


def flat_entries(selected: np.ndarray, width: int) -> np.ndarray:
    """Flat indices ``row * width + block`` of a selection ``[rows, n]`` (block ids per row)
    into a C-ordered ``[rows, width]`` array (``np.take``/``np.put`` read them several times
    faster than 2-D fancy indexing), checked: a block id past ``width`` would name an entry of
    the next row."""
    return flat_index(np.arange(selected.shape[0])[:, None], selected, width)


def flat_index(rows: np.ndarray, blocks: np.ndarray, width: int) -> np.ndarray:
    """``rows * width + blocks`` (broadcast), checked as ``flat_entries`` is."""
    if blocks.size and (blocks.min() < 0 or blocks.max() >= width):
        raise IndexError("a selected block id is outside the layer's block table")
    return rows * width + blocks


def tier_part(kv: LayerKV, selected: torch.Tensor, tier: Tier) -> Optional[TierPart]:
    """The blocks of ``selected`` (int64 ``[rows, n]``, CPU) that lie on ``tier``, or None.
    One numba pass (this runs for every tier of every layer of every step: as torch ops it was
    ~35 us per tier on this project's CPU)."""
    tiers, slots = kv.table()
    if selected.numel() == 0:
        return None
    ids, where, valid = _split_by_tier(tiers.numpy(), slots.numpy(), selected.cpu().contiguous().numpy(), int(tier))
    if ids.shape[1] == 0:
        return None
    return TierPart(torch.from_numpy(ids), torch.from_numpy(where), torch.from_numpy(valid))
