"""Where KV blocks go: their homes, the copies the device (and host memory, for disk-homed
blocks) keeps between decode steps, and the moves between them.

Every completed block has one *home*: the device when the device tier has no budget (nothing
ever moves then), else host memory within the layer's share of the host budget, else disk; it
is written there once, when it completes (in the background, for disk). The device tier and
host memory hold *copies*: dropping one costs nothing. The open block, the sink blocks and the
local window are pinned on the device. A prefill's blocks are placed by the scores of its last
query: per (row, block), the best on the device up to the layer's share, the best homes in host
memory up to its share, the rest on disk.

Consecutive decode steps select largely the same blocks, so a tier that keeps what attention
keeps using serves most of a step without moving anything. Per layer and step, given what the
step selected and each block's score (its estimated attention mass, from the selection):

- ``"attention"`` (default): a block selected in any of the last ``reuse_window`` steps stays
  cached. A miss (selected, not cached) is *admitted* when the admission model says its
  expected reuse pays for the copy (``AdmissionModel``: measured copy, CPU-attention, device-
  attention and disk-read throughputs, and the measured chance that a block selected again
  within the window, or for the first time, is selected at the next step), or always when the
  step copies its misses anyway (``attention="fetch"``); the best-scored misses first. Room
  comes from free quota, then from victims: cached, unpinned blocks outside the window, lowest
  score at this step first, ties broken by least recently selected.
- ``"lru"``: every miss is admitted; victims are the least recently selected blocks not
  selected this step (vLLM's / SGLang's HiSparse hot buffer).
- ``"none"``: nothing is kept between steps: unpinned copies are dropped, nothing admitted.

``choose`` works on flat numpy arrays over a layer's (row, block) entries, so the rules can be
tested on hand-made selection sequences; the functions below it do the moves it decides. A
decode step of the default policy decides the same moves from the selected entries and one
numba pass over the cached copies (``attention_choice``, ``unkept_copies``): ``choose`` over
every entry was ~40 array passes a layer and step (2.4 ms at 8 KV heads x batch 8 x 64K).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
from numba import njit

from .device_copies import gathered, to_device
from .layer_kv import NONE, Fresh, LayerKV, Pick, flat_entries, flat_index
from .selection import SelectionPolicy, block_scores, scored
from .standins import collect_garbage
from .tiers import BlockPool, Tier, slot_bytes

if TYPE_CHECKING:
    from .kv_runtime import KVRuntime
    from .site_step import Plan

# queries of a prefill's last tokens that score its blocks for their first placement. 1: on
# SmolLM2 at 8K, the best 80 blocks per row by the last query's scores held 85 % of the first
# decode step's selection (by the last 16's max: 76 %, 64's: 71 %), the best half 99 % (96 %, 94 %)
WARM_QUERIES = 1


class KVBudgetError(ValueError):
    """A byte budget cannot hold what a step must keep in place."""


CACHE_POLICIES = ("attention", "lru", "none")
# Decode steps of selection history a block is kept cached for. 4: the published measurements
# (95-100 % of a step's selection was selected in one of the last 5 steps), and on the disk
# preset at 4K x 2 it moved the fewest bytes of 1/2/4/8 with 2 points less hit rate than 2
# (benchmarks/reuse_window.py, benchmarks/RESULTS.md)
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


def within_window(last_selected: np.ndarray, step: int, window: int) -> np.ndarray:
    """Which entries were last selected at one of the ``window`` steps up to ``step``
    (``step - window < last_selected``; nothing is selected after the step being asked about).
    -1 (never selected: e.g. placed by a prefill's warm-up) is not a step: such an entry is
    outside."""
    return (last_selected >= 0) & (last_selected > step - window)


def choose(policy: str, window: int, step: int, e: Entries, room: int, admit_all: bool,
           worth: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(admit, evict): flat indices of entries to copy in and to drop at ``step``.

    room: entries the layer may still add before reaching its share of the tier (negative when
    it is over its share: then victims go even without admissions). admit_all: every miss is a
    candidate (the step copies its misses to the device anyway). worth (``"attention"``): the
    entries whose copy the admission model finds worth making; None: the misses selected
    earlier within the window (their second selection).
    """
    misses = e.selected & ~e.cached & e.eligible
    if policy == "none":
        return _empty(), np.flatnonzero(e.cached & ~e.pinned)
    if policy == "lru":
        candidates = np.flatnonzero(misses)
        victims = np.flatnonzero(e.cached & ~e.pinned & ~e.selected)
        order = e.last_selected, e.score                                   # oldest first
    elif policy == "attention":
        recent = within_window(e.last_selected, step, window)     # selected within the window before now
        candidates = np.flatnonzero(misses if admit_all else misses & (recent if worth is None else worth))
        kept = e.selected | recent | e.pinned
        victims = np.flatnonzero(e.cached & ~kept)
        order = e.score, e.last_selected                                   # lowest score first
    else:
        raise ValueError(f"cache_policy {policy!r}: choose one of {list(CACHE_POLICIES)}")
    admit = first_by(candidates, min(candidates.size, room + victims.size),
                     -e.score[candidates], -e.last_selected[candidates])          # best first
    evict = first_by(victims, min(victims.size, admit.size - room), order[0][victims], order[1][victims])
    return admit, evict


_DISK = int(Tier.DISK)            # numba reads module globals as constants


@njit(cache=True, nogil=True)
def unkept_copies(copies, home, pins, pinned_blocks, last_selected, selected, step, window, nb, disk_homes_only):
    """The ``"attention"`` policy's victims of one tier, in one pass: flat ``[rows * nb]``
    indices (ascending) of the copies (``copies[r, b] >= 0``) that nothing keeps (not pinned:
    ``pinned_blocks[b]``, ``pins[r, b] > 0``; not ``selected[r * nb + b]``; not last selected
    within the window), and how many copies there are. disk_homes_only: count only copies
    of disk-homed blocks (host memory's copies; a host home is not a copy)."""
    rows = copies.shape[0]
    out = np.empty(rows * nb, np.int64)
    n = held = 0
    for r in range(rows):
        for b in range(nb):
            if copies[r, b] < 0 or (disk_homes_only and home[r, b] != _DISK):
                continue
            held += 1
            last = last_selected[r, b]
            if pinned_blocks[b] or pins[r, b] > 0 or selected[r * nb + b] or (last >= 0 and last > step - window):
                continue
            out[n] = r * nb + b
            n += 1
    return out[:n], held


@njit(cache=True, nogil=True)
def holds_disk_home(home, nb) -> bool:
    """Whether any of the first ``nb`` blocks of any row is homed on disk."""
    for r in range(home.shape[0]):
        for b in range(nb):
            if home[r, b] == _DISK:
                return True
    return False


def load_kernels() -> None:
    """Load ``unkept_copies`` and ``holds_disk_home`` now (see ``block_scores.load_kernel``)."""
    i32, i8 = np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int8)
    unkept_copies(i32, i8, i32, np.zeros(1, np.bool_), i32, np.zeros(1, np.bool_), 1, 4, 1, False)
    holds_disk_home(i8, 1)


def attention_choice(at_nb: np.ndarray, misses: np.ndarray, wanted: np.ndarray, victims: np.ndarray,
                     room: int, score: np.ndarray, last_selected: np.ndarray,
                     keys: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """``choose("attention", ...)``'s (admit, evict) from the selected entries alone: at_nb,
    the flat ``[rows * nb]`` indices of the selected entries, ascending; misses / wanted (bool),
    score / last_selected per selected entry: the misses that may be admitted (``worth``, or
    recent, or every miss where the step copies them anyway); victims: ``unkept_copies``'s;
    keys: their score and last selection, asked for only where some must go. The same ranks
    and ties as ``choose``: candidates and victims in ascending flat order."""
    take = misses & wanted
    candidates = at_nb[take]
    admit = first_by(candidates, min(candidates.size, room + victims.size), -score[take], -last_selected[take])
    k = min(victims.size, admit.size - room)
    return admit, (first_by(victims, k, *keys(victims)) if k > 0 else victims[:0])


def first_by(idx: np.ndarray, k: int, primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """The first ``k`` of ``idx`` in the order of ``primary``, then ``secondary`` (both given
    per entry of ``idx``), then position: ``idx[np.lexsort((secondary, primary))][:k]``, sorting
    only the entries that can be among them (a step evicts a few of a layer's thousands of
    cached copies; a lexsort of 3,000-6,000 of them took 0.1-0.5 ms on this project's CPU)."""
    if k <= 0:
        return idx[:0]
    if k < idx.size:
        kth = np.partition(primary, k - 1)[k - 1]
        if not np.isnan(kth):                          # NaN sorts last: keep them all then
            near = primary <= kth                      # a superset of the first k, in idx's order
            idx, primary, secondary = idx[near], primary[near], secondary[near]
    return idx[np.lexsort((secondary, primary))][:k]


# -- admission: copy a miss up when its expected reuse pays for the copy ---------------------------

@dataclass
class Rate:
    """A throughput measured as the run goes: bytes over seconds, starting from a prior that
    counts as ``seconds`` of observation (50 ms: the first, noisy measurements of a short run
    move it little, so its decisions do not flip with them; a long run's own measurements soon
    outweigh it)."""

    nbytes: float
    seconds: float

    @classmethod
    def prior(cls, gb_per_s: float, seconds: float = 0.05) -> "Rate":
        return cls(gb_per_s * 1e9 * seconds, seconds)

    def add(self, nbytes: float, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.nbytes += nbytes
            self.seconds += seconds

    @property
    def seconds_per_byte(self) -> float:
        return self.seconds / self.nbytes

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9


# Priors (GB/s) until the run has measured its own: a GPU behind PCIe 4 with pinned host
# buffers (copies ~20, HBM attention ~1000, the numba CPU kernel ~8 on a few cores, an NVMe
# ~2), and a CPU-only machine where the "device" is host memory (copies are memcpy, both
# attention sides run on the CPU)
PRIORS = {"cuda": {"copy_up": 20.0, "device_attention": 1000.0, "cpu_attention": 8.0, "disk_read": 2.0},
          "cpu": {"copy_up": 8.0, "device_attention": 6.0, "cpu_attention": 6.0, "disk_read": 2.0}}
# the chance a block selected at a step is selected at the next one, before measurements: a
# repeat (selected before within the window) 0.8, a first selection 0.4 (published: 55-87 %
# of a step's selection was selected the step before); worth REUSE_PRIOR_N observations
REUSE_PRIOR = {"repeat": 0.8, "first": 0.4}
REUSE_PRIOR_N = 200


class AdmissionModel:
    """Whether copying a miss to the device pays, from named, measured inputs:

    - ``copy_up``: host->device copy throughput (the admissions' copies);
    - ``cpu_attention`` / ``device_attention``: bytes of KV the CPU part / the device part attends
      per second (on CUDA the device part is asynchronous and keeps its prior);
    - ``disk_read``: bytes per second of one disk request;
    - ``reuse["repeat"]`` / ``reuse["first"]``: the measured chance that a block selected at a
      step is selected at the next, for a selection that was a repeat (the block had been
      selected within the reuse window before) or a first one.

    The rule, per class c of a miss's selection history and the tier t where it lies: admit iff
    ``uses(c) * saved(t) >= copy``, with ``uses(c) = p_c + p_c^2 + ... + p_c^W`` (the
    selections it can expect while the window keeps it), ``saved(host) = cpu - device`` (the
    seconds per byte a selection attended in place costs more than on the device),
    ``saved(disk) = saved(host) + disk_read`` (and its read), ``copy = copy_up`` (seconds per
    byte). The decision is per class and tier, so a step's misses of one kind are all admitted
    or none; room and the best scores decide which of them fit (``choose``).
    """

    def __init__(self, device_type: str, window: int):
        priors = PRIORS["cuda" if device_type == "cuda" else "cpu"]
        self.device_type, self.window = device_type, window
        self.rates = {name: Rate.prior(gbps) for name, gbps in priors.items()}
        self.reuse_seen = {c: float(REUSE_PRIOR_N) for c in REUSE_PRIOR}
        self.reuse_hits = {c: p * REUSE_PRIOR_N for c, p in REUSE_PRIOR.items()}
        self.lock = threading.Lock()

    def measures(self, name: str) -> bool:
        """On CUDA the device part's time is a launch's, not the work's: it keeps its prior."""
        return not (name == "device_attention" and self.device_type == "cuda")

    def measured(self, name: str, nbytes: float, seconds: float) -> None:
        if self.measures(name):
            with self.lock:
                self.rates[name].add(nbytes, seconds)

    def observe_reuse(self, kind: str, seen: int, again: int) -> None:
        with self.lock:
            self.reuse_seen[kind] += seen
            self.reuse_hits[kind] += again

    def reuse(self, kind: str) -> float:
        return self.reuse_hits[kind] / self.reuse_seen[kind]

    def uses(self, kind: str) -> float:
        p = min(self.reuse(kind), 0.999)
        return p * (1 - p ** self.window) / (1 - p)

    def admits(self) -> dict[tuple[str, Tier], bool]:
        """(history class, tier where the miss lies) -> admit it."""
        r = {name: rate.seconds_per_byte for name, rate in self.rates.items()}
        saved = {Tier.HOST: max(0.0, r["cpu_attention"] - r["device_attention"])}
        saved[Tier.DISK] = saved[Tier.HOST] + r["disk_read"]
        return {(kind, tier): self.uses(kind) * s >= r["copy_up"] for kind in REUSE_PRIOR for tier, s in saved.items()}

    def worth(self, recent: np.ndarray, lies: np.ndarray) -> np.ndarray:
        """Which entries' copies pay: recent (a repeat selection) and lies (tier) per entry."""
        admit = self.admits()
        out = np.zeros(recent.shape, np.bool_)
        for (kind, tier), yes in admit.items():
            if yes:
                out |= (recent if kind == "repeat" else ~recent) & (lies == int(tier))
        return out

    def summary(self) -> dict:
        """The inputs and the decisions, for ``kvdrive_compile.stats()``."""
        return {"gb_per_s": {name: round(rate.gb_per_s, 3) for name, rate in self.rates.items()},
                "reuse": {kind: round(self.reuse(kind), 3) for kind in REUSE_PRIOR},
                "admits": {f"{kind} from {tier.name.lower()}": yes for (kind, tier), yes in self.admits().items()}}


def warm_order(score: np.ndarray, recency: np.ndarray) -> np.ndarray:
    """Flat indices of blocks from the one to place highest to the lowest: best score first,
    then the most recent (a prefill's placement when its blocks are scored; without scores,
    recency alone: the newest blocks on the device)."""
    return np.lexsort((-recency, -score))


def _empty() -> np.ndarray:
    return np.zeros(0, np.int64)


# -- the moves ------------------------------------------------------------------------------

def _device_share(rt: KVRuntime, kv: LayerKV) -> int:
    """Device slots this layer may keep: its share of the device budget, in proportion to what
    its steps select (a layer attended exactly selects every block, a ranked one its budget);
    layers not seen yet are counted as ranked ones."""
    slots = (rt.budgets[Tier.DEVICE].limit or 0) // slot_bytes(rt.block_size, kv.head_dim, kv.dtype)
    session = rt.sessions[kv.session_id]
    known = [layer.demand for layer in session.layers.values()]
    total = sum(known) + max(0, session.sites - len(known)) * session.typical_demand
    if not kv.demand or not total:
        return slots // max(1, session.sites)
    return slots * kv.demand // total


def _host_share(rt: KVRuntime, kv: LayerKV) -> int:
    """Host slots this layer may use for copies of disk-homed blocks: the host budget
    homes leave free, shared by the layers."""
    limit = rt.budgets[Tier.HOST].limit
    if limit is None or rt.device_home:
        return 0
    sb = slot_bytes(rt.block_size, kv.head_dim, kv.dtype)
    sites = rt.sessions[kv.session_id].sites
    return max(0, limit // sb - rt.host_homes) // max(1, sites)


def append(rt: KVRuntime, kv: LayerKV, k: torch.Tensor, v: torch.Tensor) -> None:
    """Append ``k, v: [B, Hkv, n, D]`` at the end of the layer's KV. With a device cache, new
    blocks are placed by the step's plan (``place_fresh``), which scores them with the
    step's queries; else here."""
    with rt.lock:
        place_fresh(rt, kv)
        n = k.shape[2]
        bs = rt.block_size
        k = k.reshape(kv.rows, n, kv.head_dim)                        # [rows, n, D]
        v = v.reshape(kv.rows, n, kv.head_dim)
        pos, done = kv.length, 0
        kv.summaries.update(pos, k)
        if n and pos % bs:                             # fill the open block where it lies
            done = min(n, bs - pos % bs)
            _write_tokens(rt, kv, pos // bs, pos % bs, k[:, :done], v[:, :done])
        kv.length = pos + n
        if done and (pos + done) % bs == 0:
            _completed(rt, kv, pos // bs)
        if done < n:
            rest_k, rest_v = k[:, done:], v[:, done:]
            count = -(-(n - done) // bs)
            pad = count * bs - (n - done)
            if pad:
                rest_k = torch.nn.functional.pad(rest_k, (0, 0, 0, pad))
                rest_v = torch.nn.functional.pad(rest_v, (0, 0, 0, pad))
            # [rows, count*bs, D] -> [count, rows, bs, D]
            shape = (kv.rows, count, bs, kv.head_dim)
            kv.fresh = Fresh((pos + done) // bs, rest_k.reshape(shape).transpose(0, 1),
                             rest_v.reshape(shape).transpose(0, 1))
            kv.grow(kv.num_blocks)
            if not rt.device_cache:                 # no copies to choose: placed by recency now
                place_fresh(rt, kv)


def place_fresh(rt: KVRuntime, kv: LayerKV, scores: Optional[np.ndarray] = None) -> None:
    """Place the blocks the last append made (scores ``[rows, count]`` rank them; None: recency)."""
    fresh, kv.fresh = kv.fresh, None
    if fresh is not None:
        _place(rt, kv, fresh, scores)


def _completed(rt: KVRuntime, kv: LayerKV, idx: int) -> None:
    """Block ``idx`` was just filled: write it home if it has none yet (an open block lives
    only on the device)."""
    if (kv.home[:, idx] >= 0).all():
        return
    pool = rt.pool(Tier.DEVICE, kv)
    index = torch.tensor(kv.dev[:, idx].tolist(), device=pool.device)
    k, v = pool.k.index_select(0, index), pool.v.index_select(0, index)
    _write_homes(rt, kv, np.array([idx]), k[None], v[None])


def _write_tokens(rt: KVRuntime, kv: LayerKV, idx: int, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """k, v: ``[rows, t, D]`` into block ``idx`` at token ``offset``, in every copy and its home."""
    t = k.shape[1]
    host = None                 # k, v in host memory: one copy from a GPU for the host pool and the disk
    for tier, slots in ((Tier.DEVICE, kv.dev[:, idx]), (Tier.HOST, kv.host[:, idx])):
        held = slots >= 0
        if not held.any():
            continue
        pool = rt.pool(tier, kv)
        if pool.device.type == k.device.type:
            rk, rv = k, v
        elif pool.device.type == "cpu":
            host = rk, rv = host or (k.cpu(), v.cpu())
        else:
            rk, rv = to_device(k, pool.device), to_device(v, pool.device)
        if not held.all():      # some rows' block lies elsewhere (homes split between host and disk, a crop)
            rows = to_device(torch.from_numpy(np.flatnonzero(held)), rk.device)
            slots, rk, rv = slots[held], rk.index_select(0, rows), rv.index_select(0, rows)
        index = to_device(torch.from_numpy(np.ascontiguousarray(slots)), pool.device)   # not tolist(): every layer, every step
        pool.k[index, offset:offset + t] = rk
        pool.v[index, offset:offset + t] = rv
    on_disk = np.flatnonzero(kv.home[:, idx] == Tier.DISK)
    if on_disk.size:
        disk = rt.disk(kv)
        hk, hv = host or (k.cpu(), v.cpu())
        for row in on_disk.tolist():
            disk.write_tokens(int(kv.home_slot[row, idx]), offset, hk[row], hv[row])


def drop_before(rt: KVRuntime, kv: LayerKV, position: int) -> None:
    """Free the blocks that hold only positions before ``position`` (outside a window)."""
    with rt.lock:
        first = position // rt.block_size
        if kv.first < first:
            place_fresh(rt, kv)
            drop = np.zeros(kv.num_blocks, np.bool_)
            drop[kv.first:first] = True
            free(rt, kv, drop)
            kv.first = first


def truncate(rt: KVRuntime, kv: LayerKV, length: int) -> None:
    """Forget positions from ``length`` on (a cropped cache): free the blocks that hold only
    those, and what the layer recorded of them. The block that holds ``length`` keeps its
    copies and home: the next tokens are written into it where it lies, as into any open
    block. The block summaries are cut by the caller (it reads that block's keys first)."""
    with rt.lock:
        place_fresh(rt, kv)
        if not kv.first * rt.block_size <= length <= kv.length:
            raise ValueError(f"{rt.layer_label(kv.layer)}: cannot cut at token {length}; held: "
                             f"[{kv.first * rt.block_size}, {kv.length})")
        nb, keep = kv.num_blocks, -(-length // rt.block_size)
        if kv.pins[:, keep:nb].any():
            raise RuntimeError(f"{rt.layer_label(kv.layer)}: the cache was cropped while a step still reads "
                               "the tokens it removes; crop between steps only")
        drop = np.zeros(nb, np.bool_)
        drop[keep:] = True
        free(rt, kv, drop)
        kv.last_selected[:, keep:nb] = NONE
        if kv.last_pick is not None:
            kv.last_pick = kv.last_pick.without_from(keep)
        kv.score[:, keep:nb] = 0.0
        kv.rank_len[:] = NONE       # rank afresh: a kept ranking scored the block the crop reopens as it was
        kv.length = length
        kv.changed()


def _place(rt: KVRuntime, kv: LayerKV, fresh: Fresh, scores: Optional[np.ndarray]) -> None:
    """Give new blocks their homes and device copies. scores ``[rows, count]`` (None:
    recency alone): the best-scored go up first."""
    count, rows = fresh.k.shape[0], kv.rows
    ids = np.arange(fresh.first, fresh.first + count)
    kv.grow(ids[-1] + 1)
    kv.changed()
    if rt.device_home:
        slots = _device_slots(rt, kv, rows * count)
        _write_copies(rt, Tier.DEVICE, kv, np.repeat(np.arange(rows), count), np.tile(ids, rows), slots,
                      fresh.k.transpose(0, 1).reshape(-1, *fresh.k.shape[2:]),
                      fresh.v.transpose(0, 1).reshape(-1, *fresh.v.shape[2:]), home=True)
        return
    score = np.zeros((rows, count), np.float32) if scores is None else scores
    open_id = kv.open_block()
    # positions in fresh that get a home now: all but the open block, which lives on the device
    # until it completes (where there is a device cache)
    keep_open = rt.device_cache and open_id is not None
    homed = np.flatnonzero(ids != open_id) if keep_open else np.arange(count)
    at = torch.from_numpy(homed)
    _write_homes(rt, kv, ids[homed], fresh.k[at], fresh.v[at], score[:, homed])
    if not rt.device_cache:
        return
    pinned = kv.pinned_blocks()[ids]
    must = np.zeros((rows, count), np.bool_)
    must[:, pinned] = True
    chosen = np.flatnonzero(must.reshape(-1))                    # pinned first: they must fit
    if rt.cache_policy != "none":                      # then the best of the rest, up to the share
        room = _device_share(rt, kv) - int((kv.dev >= 0).sum()) - chosen.size
        flat = warm_order(score.reshape(-1), np.tile(ids, rows))
        chosen = np.concatenate([chosen, flat[~must.reshape(-1)[flat]][:max(0, room)]])
    slots = _device_slots(rt, kv, chosen.size, required=int(must.sum()))
    r, j = np.divmod(chosen[:len(slots)], count)
    _write_copies(rt, Tier.DEVICE, kv, r, ids[j], slots, fresh.k[j, r], fresh.v[j, r])
    rt.admitted["device"] += len(slots)


def _write_homes(rt: KVRuntime, kv: LayerKV, ids: np.ndarray, k: torch.Tensor, v: torch.Tensor,
                 score: Optional[np.ndarray] = None) -> None:
    """Write blocks ``ids`` (k, v ``[n, rows, bs, D]``, every row) to their homes: host memory
    for as many (row, block) entries as the layer's share of it allows (``_host_room``), the
    best-scored first (``score [rows, n]``; None: the newest first); the rest on disk (in the
    background)."""
    if not len(ids):
        return
    t0 = time.perf_counter()
    rows, n = kv.rows, len(ids)
    score = np.zeros((rows, n), np.float32) if score is None else score
    slots = rt.alloc_upto(Tier.HOST, kv, min(rows * n, _host_room(rt, kv)))
    to_host = np.zeros(rows * n, np.bool_)
    to_host[warm_order(score.reshape(-1), np.tile(ids, rows))[:len(slots)]] = True
    to_host = to_host.reshape(rows, n)
    sb = slot_bytes(rt.block_size, kv.head_dim, kv.dtype)
    if slots:
        r, j = np.nonzero(to_host)
        at = (torch.from_numpy(j), torch.from_numpy(r))
        _write_copies(rt, Tier.HOST, kv, r, ids[j], slots, k[at], v[at], home=True)
        rt.host_homes += len(slots)
        rt.moved["device->host"] += len(slots) * sb
    if len(slots) < rows * n:
        disk = rt.disk(kv)
        for j in np.argsort(ids, kind="stable"):           # on disk in token order: reads coalesce
            r = np.flatnonzero(~to_host[:, j])
            if not r.size:
                continue
            disk_slots = disk.alloc(kv.layer, r)
            at = torch.from_numpy(r)
            # off the critical path; a failure is raised later
            disk.write_async(disk_slots, k[j].index_select(0, at), v[j].index_select(0, at), layer=kv.layer)
            kv.home[r, ids[j]], kv.home_slot[r, ids[j]] = int(Tier.DISK), disk_slots
        on_disk = rows * n - len(slots)
        rt.moved["device->host"] += on_disk * sb
        rt.moved["host->disk"] += on_disk * sb
    kv.changed()
    rt.stage_seconds["write_home"] += time.perf_counter() - t0


def _host_room(rt: KVRuntime, kv: LayerKV) -> int:
    """(row, block) entries the layer may still home in host memory: its share of the host
    budget (``LayerKV.host_share``, set when the layer first writes homes: what the homes of
    the runtime leave free, over the session's attention sites that have no share yet, so a
    layer that needs less, e.g. a sliding window, leaves its rest to the layers after it),
    less the host homes it holds. Every layer of a long prompt then keeps its best-scored
    blocks in host memory and its least likely ones on disk, instead of the first layers all
    of theirs and the last none."""
    limit = rt.budgets[Tier.HOST].limit
    if limit is None:
        return np.iinfo(np.int64).max
    if kv.host_share is None:
        session = rt.sessions[kv.session_id]
        shared = sum(1 for layer in session.layers.values() if layer.host_share is not None)
        free = max(0, limit // slot_bytes(rt.block_size, kv.head_dim, kv.dtype) - rt.host_homes)
        kv.host_share = free // max(1, session.sites - shared)
    return max(0, kv.host_share - int((kv.home == Tier.HOST).sum()))


def _write_copies(rt: KVRuntime, tier: Tier, kv: LayerKV, rows: np.ndarray, blocks: np.ndarray, slots: list[int],
                  k: torch.Tensor, v: torch.Tensor, home: bool = False, owned: bool = False) -> None:
    """Entries (rows[i], blocks[i]) get ``slots[i]`` of a memory tier holding k[i], v[i] ``[bs, D]``
    (owned: nothing writes k and v again; to a GPU they are then copied from where they are)."""
    if not len(slots):
        return
    pool = rt.pool(tier, kv)
    index = to_device(torch.tensor(slots), pool.device)
    pool.k.index_copy_(0, index, to_device(k, pool.device, owned))
    pool.v.index_copy_(0, index, to_device(v, pool.device, owned))
    target = kv.dev if tier == Tier.DEVICE else kv.host
    target[rows, blocks] = slots
    if home:
        kv.home[rows, blocks] = int(tier)
        kv.home_slot[rows, blocks] = slots
    kv.changed()


ROOM_WAIT_SECONDS = 10.0      # longest a step waits for room another generation will give back


def _device_slots(rt: KVRuntime, kv: LayerKV, n: int, required: Optional[int] = None) -> list[int]:
    """``n`` device slots, at least ``required`` (default all) of them: making room by
    dropping unpinned copies where the budget is full; a clear error if it cannot.

    Room that other generations sharing the runtime hold but will give back is waited for: the
    blocks another thread's step reads (pinned until its merge: waiting lets go of the lock, so
    that step can reach it), and the KV of a dropped generation whose cache is garbage not yet
    collected (one full collection, after any other thread's under way). Called where the
    caller's own step holds no plan (placing new blocks, before selecting), so two threads
    never wait for each other."""
    required = n if required is None else required
    slots = rt.alloc_upto(Tier.DEVICE, kv, n)
    if len(slots) >= required or rt.device_home:
        return slots
    deadline, collected = time.monotonic() + ROOM_WAIT_SECONDS, False
    while True:
        _drop_copies(rt, kv, required - len(slots))
        slots += rt.alloc_upto(Tier.DEVICE, kv, n - len(slots), reclaim=True)
        left = deadline - time.monotonic()
        if len(slots) >= required or left <= 0:
            break
        if _held_by_plans(rt, kv) >= required - len(slots):
            rt.room.wait(min(left, 0.1))          # another thread's step: until a plan unpins
        elif not collected:
            collect_garbage(left)
            rt.sweep()
            collected = True
        else:
            break
    if len(slots) < required:
        rt.pool(Tier.DEVICE, kv).release(slots)
        raise _budget_error(rt, kv)
    return slots


def _held_by_plans(rt: KVRuntime, kv: LayerKV) -> int:
    """Device slots of ``kv``'s size that other generations' steps running in other threads pin
    beyond the blocks those always keep there: the room their merges give back. (A plan of a
    step that was interrupted, or of a thread that ended, is never merged: its generation keeps
    the room until it is released.)"""
    me = threading.current_thread()
    held = 0
    for session in rt.sessions.values():
        if session.id == kv.session_id or not any(p.thread is not me and p.thread.is_alive()
                                                  for p in session.plans.values()):
            continue
        for layer in session.layers.values():
            nb = layer.num_blocks
            pinned = (layer.dev[:, :nb] >= 0) & (layer.pins[:, :nb] > 0) & ~layer.pinned_blocks()[None, :]
            held += int(pinned.sum()) * slot_bytes(rt.block_size, layer.head_dim, layer.dtype)
    return held // slot_bytes(rt.block_size, kv.head_dim, kv.dtype)


def _budget_error(rt: KVRuntime, kv: LayerKV) -> KVBudgetError:
    def kept(layer: LayerKV) -> int:           # bytes of the blocks a layer keeps on the device
        return (layer.pinned_front + layer.pinned_back) * layer.rows * slot_bytes(rt.block_size, layer.head_dim, layer.dtype)

    def needs(session) -> int:                 # bytes a generation keeps on the device in all
        # layers differ where their head_dim does (Gemma 4): the ones seen so far as they are, the
        # others as the largest of those
        known = [kept(layer) for layer in session.layers.values()]
        return sum(known) + max(0, session.sites - len(known)) * max(known + [per_layer])

    sb = slot_bytes(rt.block_size, kv.head_dim, kv.dtype)
    per_layer = kept(kv)
    session = rt.sessions[kv.session_id]
    sites = session.sites
    minimum = needs(session)
    together = minimum + sum(needs(other) for other in rt.sessions.values() if other is not session)
    return KVBudgetError(
        f"device_memory={rt.budgets[Tier.DEVICE].limit} bytes cannot hold the blocks each attention layer "
        f"keeps on the device (sink, local window, open block: {kv.pinned_front + kv.pinned_back} blocks x "
        f"{kv.rows} rows x {sb} bytes = {per_layer} bytes per layer; {rt.layer_label(kv.layer)}, "
        f"one of at least {sites} attention layers). "
        + (f"{len(rt.sessions) - 1} other generation(s) sharing this runtime hold theirs too: a generation "
           "keeps its KV while its cache lives (a variable, a generate output, or an error kept from an "
           "interrupted generate, as a notebook keeps the last one, can hold it); drop those, or free every "
           "generation's KV with kvdrive_compile.release_all(). "
           if len(rt.sessions) > 1 else "")
        + (f"Pass device_memory >= {together} bytes to keep them all ({minimum} for this generation alone; "
           if together > minimum else f"Pass device_memory >= {minimum} bytes (")
        + "more, so blocks attention reuses can stay), "
        "device_memory=0 (no device tier: attend everything where it lies), or None (no limit)")


def _drop_copies(rt: KVRuntime, kv: LayerKV, n: int) -> None:
    """Drop unpinned device copies to make room for ``n`` of ``kv``'s slots: this layer's
    lowest-scored first, then other layers' (any session's; a layer of another head_dim frees
    slots of another size, which its pool gives back to the budget when packed)."""
    need = n * slot_bytes(rt.block_size, kv.head_dim, kv.dtype)
    layers = [kv] + [other for s in rt.sessions.values() for other in s.layers.values() if other is not kv]
    for layer in layers:
        if need <= 0:
            return
        sb = slot_bytes(rt.block_size, layer.head_dim, layer.dtype)
        nb = layer.num_blocks
        pinned = layer.pinned_blocks()[None, :] | (layer.pins[:, :nb] > 0)
        cand = np.flatnonzero(((layer.dev[:, :nb] >= 0) & ~pinned).reshape(-1))
        victims = first_by(cand, -(-need // sb), layer.score[:, :nb].reshape(-1)[cand],
                           layer.last_selected[:, :nb].reshape(-1)[cand])
        _evict(rt, layer, Tier.DEVICE, victims)
        need -= victims.size * sb


def pack_pool(rt: KVRuntime, tier: Tier, pool: BlockPool) -> None:
    """Move the blocks in ``pool``'s slots above its count in use into its free slots below
    it (their layers' tables follow), so that ``pool.shrink`` can give the budget the free
    capacity back: a pool of another head_dim (Gemma 4's full and sliding layers) needs it.
    Blocks a live plan reads (pinned) stay where they are, and so do slots reserved for a disk
    read that has not landed (no table names them yet)."""
    used = pool.capacity - len(pool.free)
    low = np.array(sorted(slot for slot in pool.free if slot < used), np.int64)
    if not low.size:
        return
    src, dst, taken = [], [], 0
    for session in rt.sessions.values():
        for kv in session.layers.values():
            if taken == low.size or rt.pools.get(rt.pool_key(tier, kv)) is not pool:
                continue
            nb = kv.num_blocks
            table = kv.dev if tier == Tier.DEVICE else kv.host
            r, b = np.nonzero((table[:, :nb] >= used) & (kv.pins[:, :nb] == 0))
            r, b = r[:low.size - taken], b[:low.size - taken]
            if not r.size:
                continue
            to = low[taken:taken + r.size]
            src.append(table[r, b].copy())
            dst.append(to)
            table[r, b] = to
            if tier == Tier.HOST:                     # a host-homed block's host slot is its home slot
                homed = kv.home[r, b] == Tier.HOST
                kv.home_slot[r[homed], b[homed]] = to[homed]
            taken += r.size
            kv.changed()
    if not taken:
        return
    src, dst = np.concatenate(src), np.concatenate(dst)
    at, to = torch.from_numpy(src).to(pool.device), torch.from_numpy(dst).to(pool.device)
    pool.k[to] = pool.k[at]
    pool.v[to] = pool.v[at]
    moved = set(dst.tolist())                 # the vacated slots are taken last (alloc takes the list's end)
    pool.free = sorted(src.tolist(), reverse=True) + [slot for slot in pool.free if slot not in moved]


def _evict(rt: KVRuntime, kv: LayerKV, tier: Tier, flat: np.ndarray) -> None:
    """Drop the copies of flat (row, block) entries from ``tier`` (their homes keep the bytes)."""
    if not flat.size:
        return
    nb = kv.num_blocks
    r, b = np.divmod(flat, nb)
    copies = kv.dev if tier == Tier.DEVICE else kv.host
    assert not (kv.home[r, b] == tier).any(), "a home is never evicted"
    rt.pool(tier, kv).release(copies[r, b].tolist())
    copies[r, b] = NONE
    rt.evicted[tier.name.lower()] += flat.size
    kv.changed()


def free(rt: KVRuntime, kv: LayerKV, blocks: np.ndarray) -> None:
    """Free every copy and home of the logical blocks where ``blocks`` (bool ``[nb]``) is set."""
    nb = min(kv.num_blocks, kv.home.shape[1])
    blocks = blocks[:nb]
    if not blocks.any():
        return
    sel = np.zeros(kv.home.shape, np.bool_)
    sel[:, :nb] = blocks[None, :]
    dev = sel & (kv.dev >= 0)
    if dev.any():
        rt.pool(Tier.DEVICE, kv).release(kv.dev[dev].tolist())
    host = sel & (kv.host >= 0)
    if host.any():
        rt.pool(Tier.HOST, kv).release(kv.host[host].tolist())
        rt.host_homes -= int((host & (kv.home == Tier.HOST)).sum())
    disk = sel & (kv.home == Tier.DISK)
    if disk.any() and kv.session_id in rt.sessions:
        files = rt.sessions[kv.session_id].disk_files
        f = files.get((kv.dtype, kv.head_dim))
        if f is not None:
            f.release(kv.home_slot[disk].tolist())
    for arr in (kv.dev, kv.host, kv.home_slot):
        arr[sel] = NONE
    kv.home[sel] = NONE
    kv.changed()


def warm_scores(rt: KVRuntime, kv: LayerKV, policy: SelectionPolicy, q: torch.Tensor, scale: float) -> Optional[np.ndarray]:
    """Scores of the fresh blocks from the queries of the step's last tokens (None when the
    layer does not rank blocks, or there is no device cache to place them in)."""
    fresh = kv.fresh
    if fresh is None or not rt.device_cache or not scored(kv, policy):
        return None
    ids = torch.arange(fresh.first, fresh.first + fresh.k.shape[0])
    if kv.pinned_blocks()[ids.numpy()].all():         # a decode step's new block: pinned, no choice to make
        return None
    return block_scores(kv, policy, q[:, :, -WARM_QUERIES:], ids, scale).numpy()


def count_served(rt: KVRuntime, kv: LayerKV, selected: torch.Tensor) -> dict[Tier, int]:
    """Count the bytes each tier serves to this step's selection; returns the selected
    (row, block) entries per tier (a tier with none needs no part split off)."""
    if rt.device_home:                            # every held block lies on the device, always
        counts = np.zeros(len(Tier) + 1, np.int64)
        counts[int(Tier.DEVICE) + 1] = selected.numel()
    else:
        tier, _ = kv.where()
        lay = np.take(tier, flat_entries(selected.numpy(), tier.shape[1]))
        counts = np.bincount(lay.ravel() + 1, minlength=len(Tier) + 1)       # index 0: not held (-1)
    sb = slot_bytes(rt.block_size, kv.head_dim, kv.dtype)
    out = {}
    for t in Tier:
        out[t] = int(counts[int(t) + 1])
        rt.served[t.name.lower()] += out[t] * sb
    return out


def cache_step(rt: KVRuntime, kv: LayerKV, plan: Plan) -> None:
    """The cache policy's moves at this step: drop victims, copy admitted misses up (from
    host now; from disk when the plan's read lands), remember what was selected. Victims and
    candidates rank by ``kv.score``, which the step's selection wrote. What only the selected
    entries need (the reuse count, whether a miss's copy pays, the history) is computed for
    those only: at 64 rows x 4,096 blocks each pass over every entry costs ~0.1-0.3 ms."""
    nb = kv.num_blocks
    kv.step += 1
    picked = plan.selected.numpy()
    at_nb = flat_entries(picked, nb).ravel()                  # into a [rows, nb] array
    at = flat_entries(picked, kv.home.shape[1]).ravel()       # into the [rows, capacity] state
    selected = np.zeros(kv.rows * nb, np.bool_)
    selected[at_nb] = True
    recent = within_window(np.take(kv.last_selected, at), kv.step, rt.reuse_window)   # a repeat selection
    model = admission_model(rt, kv)
    if model is not None:
        _observe_reuse(model, kv, selected.reshape(kv.rows, nb))
    if rt.cache_policy == "attention":
        _attention_moves(rt, kv, plan, selected, at_nb, at, recent, model)
    else:
        _moves_over_every_entry(rt, kv, plan, selected.reshape(kv.rows, nb))
    np.put(kv.last_selected, at, kv.step)
    kv.last_pick = Pick(np.repeat(np.arange(kv.rows), picked.shape[1]), picked.flatten(), recent, kv.step)   # copies


def _attention_moves(rt: KVRuntime, kv: LayerKV, plan: Plan, selected: np.ndarray, at_nb: np.ndarray,
                     at: np.ndarray, recent: np.ndarray, model: Optional[AdmissionModel]) -> None:
    """The ``"attention"`` policy's moves (what ``choose`` decides over every entry): the
    candidates from the selected entries (``at_nb`` / ``at``: their flat indices into
    ``[rows, nb]`` / the state arrays; ``recent``: selected within the window before), the
    victims from one pass over the copies (``unkept_copies``)."""
    nb = kv.num_blocks
    order = np.argsort(at_nb, kind="stable")          # choose's ties go by position: ascending entries
    at_nb, at, recent = at_nb[order], at[order], recent[order]
    score, last = np.take(kv.score, at), np.take(kv.last_selected, at)
    if rt.device_cache:
        tier, _ = kv.where()
        lies = np.take(tier, at_nb)
        victims, cached = unkept_copies(kv.dev, kv.home, kv.pins, kv.pinned_blocks(), kv.last_selected, selected,
                                        kv.step, rt.reuse_window, nb, False)
        room = _device_share(rt, kv) - cached
        misses = (np.take(kv.dev, at) < 0) & (lies >= 0)
        if plan.fetch:                                # the step copies its misses anyway: every one may stay
            wanted = np.ones(misses.shape, np.bool_)
        else:                                         # the admission model's, or the second selection's
            wanted = recent if model is None else model.worth(recent, lies)
        admit, evict = attention_choice(at_nb, misses, wanted, victims, room, score, last, _keys(kv, nb))
        _evict(rt, kv, Tier.DEVICE, evict)
        _admit(rt, kv, plan, Tier.DEVICE, admit, tier.reshape(-1))
    if rt.budgets[Tier.HOST].limit is None or not holds_disk_home(kv.home, nb):
        return
    victims, copies = unkept_copies(kv.host, kv.home, kv.pins, np.zeros(nb, np.bool_), kv.last_selected, selected,
                                    kv.step, rt.reuse_window, nb, True)
    room = _host_share(rt, kv) - copies
    if room <= 0 and not copies:                      # nothing is cached there and nothing fits: no move
        return
    tier, _ = kv.where()
    on_disk = np.take(tier, at_nb) == Tier.DISK      # only on disk (a copy anywhere is read there)
    for _, r, b, _ in plan.fills:                     # on their way to the device already
        on_disk &= ~np.isin(at_nb, r * nb + b)
    admit, evict = attention_choice(at_nb, on_disk, recent, victims, room, score, last, _keys(kv, nb))
    _evict(rt, kv, Tier.HOST, evict)
    _admit(rt, kv, plan, Tier.HOST, admit, tier.reshape(-1))


def _keys(kv: LayerKV, nb: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Score and last selection of flat ``[rows * nb]`` entries (read by flat index: numpy's
    2-D fancy indexing of thousands of entries costs ~0.5 ms)."""
    def keys(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at = flat_index(*np.divmod(flat, nb), kv.home.shape[1])
        return np.take(kv.score, at), np.take(kv.last_selected, at)
    return keys


def _moves_over_every_entry(rt: KVRuntime, kv: LayerKV, plan: Plan, selected: np.ndarray) -> None:
    """The moves of the other policies (the baselines' ``"lru"`` and ``"none"``): ``choose``
    over every (row, block) entry; selected: bool ``[rows, nb]``."""
    nb = kv.num_blocks
    tier, _ = kv.where()
    if rt.device_cache:
        pinned = kv.pinned_blocks()[None, :] | (kv.pins[:, :nb] > 0)
        e = Entries(cached=(kv.dev[:, :nb] >= 0).reshape(-1), pinned=pinned.reshape(-1),
                    last_selected=kv.last_selected[:, :nb].reshape(-1), score=kv.score[:, :nb].reshape(-1),
                    selected=selected.reshape(-1), eligible=(tier >= 0).reshape(-1))
        room = _device_share(rt, kv) - int(e.cached.sum())
        admit, evict = choose(rt.cache_policy, rt.reuse_window, kv.step, e, room, plan.fetch)
        _evict(rt, kv, Tier.DEVICE, evict)
        _admit(rt, kv, plan, Tier.DEVICE, admit, tier.reshape(-1))
    if rt.budgets[Tier.HOST].limit is not None and (kv.home[:, :nb] == Tier.DISK).any():
        copy = (kv.host[:, :nb] >= 0) & (kv.home[:, :nb] == Tier.DISK)
        copies = int(copy.sum())
        room = _host_share(rt, kv) - copies
        if room > 0 or copies:                 # else nothing is cached there and nothing fits: no move
            tier, _ = kv.where()
            on_disk = tier == Tier.DISK
            for _, r, b, _ in plan.fills:             # on their way to the device already
                on_disk[r, b] = False
            e = Entries(cached=copy.reshape(-1), pinned=(kv.pins[:, :nb] > 0).reshape(-1),
                        last_selected=kv.last_selected[:, :nb].reshape(-1), score=kv.score[:, :nb].reshape(-1),
                        selected=(selected & (on_disk | copy)).reshape(-1), eligible=on_disk.reshape(-1))
            admit, evict = choose(rt.cache_policy, rt.reuse_window, kv.step, e, room, False)
            _evict(rt, kv, Tier.HOST, evict)
            _admit(rt, kv, plan, Tier.HOST, admit, tier.reshape(-1))


def _observe_reuse(model: AdmissionModel, kv: LayerKV, selected: np.ndarray) -> None:
    """Tell the admission model how many of the previous step's selections, by history class,
    this step (``selected``: bool ``[rows, nb]``) selects again. The previous step's are the
    entries ``kv.last_pick`` names, if it was made at that step, with their history class
    (a crop drops the entries of the blocks it frees): nothing is read at scattered entries."""
    pick = kv.last_pick
    if pick is None or pick.step != kv.step - 1:
        return
    again = np.take(selected, flat_index(pick.rows, pick.blocks, selected.shape[1]))
    for kind, seen in (("repeat", pick.repeat), ("first", ~pick.repeat)):
        model.observe_reuse(kind, int(seen.sum()), int((seen & again).sum()))


def admission_model(rt: KVRuntime, kv: LayerKV) -> Optional[AdmissionModel]:
    """The runtime's admission model (made when first asked, with the priors of the device its
    KV is on); None where nothing asks it: a policy other than ``"attention"``, or no device
    cache (nothing is admitted there). Then nothing is measured for it either."""
    if not (rt.device_cache and rt.cache_policy == "attention"):
        return None
    if rt.admission is None:
        with rt.lock:
            if rt.admission is None:
                rt.admission = AdmissionModel(kv.device.type, rt.reuse_window)
    return rt.admission


def _admit(rt: KVRuntime, kv: LayerKV, plan: Plan, tier: Tier, flat: np.ndarray, lies: np.ndarray) -> None:
    """Copy admitted entries up to ``tier``: at once from a memory tier above disk; from
    disk once the plan's read lands (``_fill_from_disk``)."""
    if not flat.size:
        return
    slots = rt.alloc_upto(tier, kv, flat.size)
    flat = flat[:len(slots)]
    if not len(slots):
        return
    nb = kv.num_blocks
    r, b = np.divmod(flat, nb)
    slots = np.asarray(slots)
    from_disk = lies[flat] == Tier.DISK
    if (~from_disk).any():                            # host -> device, now: attended there this step
        t0 = time.perf_counter()
        src = rt.pool(Tier.HOST, kv)
        index = torch.from_numpy(kv.host[r[~from_disk], b[~from_disk]])
        dest = rt.pool(tier, kv).device
        _write_copies(rt, tier, kv, r[~from_disk], b[~from_disk], slots[~from_disk].tolist(),
                      gathered(src.k, index, dest), gathered(src.v, index, dest), owned=True)
        _copied_up(rt, kv, t0, int((~from_disk).sum()) * src.slot_bytes)
    if from_disk.any():               # the slots are reserved now and linked to their entries once filled
        plan.fills.append((tier, r[from_disk], b[from_disk], slots[from_disk]))
    rt.admitted[tier.name.lower()] += len(slots)


def _copied_up(rt: KVRuntime, kv: LayerKV, t0: float, nbytes: int) -> None:
    """Count a host->device copy that began at ``t0`` (and put it on the timeline)."""
    t1 = time.perf_counter()
    rt.moved["host->device"] += nbytes
    model = admission_model(rt, kv)
    if model is not None:
        model.measured("copy_up", nbytes, t1 - t0)
    if rt.tracer.enabled:
        rt.trace("host_to_device", t0, t1, kv.session_id, kv.layer, bytes=nbytes)


def fill_from_disk(rt: KVRuntime, plan: Plan, k: torch.Tensor, v: torch.Tensor) -> None:
    """Copy admitted disk blocks from the plan's staged read (k, v ``[n, bs, D]`` by
    ``plan.disk_slots``) into their new slots."""
    kv = plan.layer
    with rt.lock:
        fills, plan.fills = plan.fills, []
        for tier, r, b, slots in fills:
            t0 = time.perf_counter()
            at = torch.searchsorted(plan.disk_slots, torch.from_numpy(kv.home_slot[r, b].astype(np.int64)))
            _write_copies(rt, tier, kv, r, b, slots.tolist(), k[at], v[at])
            if tier == Tier.DEVICE:
                _copied_up(rt, kv, t0, len(slots) * slot_bytes(rt.block_size, kv.head_dim, kv.dtype))
