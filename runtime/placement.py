"""Which block copies a caching tier (the device, or host memory for disk-homed blocks) keeps
between decode steps: the policy, apart from the mechanics of moving bytes (``kv_runtime``).

Consecutive decode steps select largely the same blocks, so a tier that keeps what attention
keeps using serves most of a step without moving anything. Per layer and step, given what the
step selected and each block's score (its estimated attention mass, from the selection):

- ``"attention"`` (default): a block selected in any of the last ``reuse_window`` steps stays
  cached. A miss (selected, not cached) is *admitted* when it was also selected earlier within
  the window (its second selection: it will likely be selected again), or always when the step
  copies its misses anyway (``attention="fetch"``); the best-scored misses first. Room comes
  from free quota, then from victims: cached, unpinned blocks outside the window, lowest score
  at this step first, ties broken by least recently selected.
- ``"lru"``: every miss is admitted; victims are the least recently selected blocks not
  selected this step (vLLM's / SGLang's HiSparse hot buffer).
- ``"none"``: nothing is kept between steps: unpinned copies are dropped, nothing admitted.

Everything here works on flat numpy arrays over a layer's (row, block) entries, so the rules
can be tested on hand-made selection sequences.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CACHE_POLICIES = ("attention", "lru", "none")
# Decode steps of selection history a block is kept cached for (benchmarks/RESULTS.md, "reuse
# window": on the disk preset 4 kept the device hit rate within a point of 8 at half the churn)
DEFAULT_REUSE_WINDOW = 4


@dataclass(frozen=True)
class Entries:
    """One layer's (row, block) entries at a decode step, flat (``[rows * nblocks]`` each).

    cached: a copy is on the caching tier; pinned: may not be dropped (sink, local window,
    open block, or read by a live plan); last_selected: the step that last selected it before
    this one (-1: never); score: this step's score (higher = more attention expected);
    selected: this step selects it; eligible: it could be admitted (held somewhere below).
    """

    cached: np.ndarray
    pinned: np.ndarray
    last_selected: np.ndarray
    score: np.ndarray
    selected: np.ndarray
    eligible: np.ndarray


def choose(policy: str, window: int, step: int, e: Entries, room: int, admit_all: bool
           ) -> tuple[np.ndarray, np.ndarray]:
    """(admit, evict): flat indices of entries to copy in and to drop at ``step``.

    room: entries the layer may still add before reaching its share of the tier (negative when
    it is over its share: then victims go even without admissions). admit_all: every miss is a
    candidate (the step copies its misses to the device anyway).
    """
    misses = e.selected & ~e.cached & e.eligible
    if policy == "none":
        return _empty(), np.flatnonzero(e.cached & ~e.pinned)
    if policy == "lru":
        candidates = np.flatnonzero(misses)
        victims = np.flatnonzero(e.cached & ~e.pinned & ~e.selected)
        victims = victims[np.lexsort((e.score[victims], e.last_selected[victims]))]     # oldest first
    elif policy == "attention":
        recent = e.last_selected > step - window                   # selected within the window before now
        candidates = np.flatnonzero(misses if admit_all else misses & recent)
        kept = e.selected | recent | e.pinned
        victims = np.flatnonzero(e.cached & ~kept)
        victims = victims[np.lexsort((e.last_selected[victims], e.score[victims]))]     # lowest score first
    else:
        raise ValueError(f"cache_policy {policy!r}: choose one of {list(CACHE_POLICIES)}")
    candidates = candidates[np.lexsort((-e.last_selected[candidates], -e.score[candidates]))]   # best first
    admit = candidates[:max(0, min(candidates.size, room + victims.size))]
    evict = victims[:max(0, min(victims.size, admit.size - room))]
    return admit, evict


def warm_order(score: np.ndarray, recency: np.ndarray) -> np.ndarray:
    """Flat indices of blocks from the one to place highest to the lowest: best score first,
    then the most recent (a prefill's placement when its blocks are scored; without scores,
    recency alone: the newest blocks on the device)."""
    return np.lexsort((-recency, -score))


def _empty() -> np.ndarray:
    return np.zeros(0, np.int64)
