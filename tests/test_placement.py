"""The cache policy (runtime/placement.py) on hand-made selection sequences, and the runtime's
tiers under it: what is cached after each step is exactly what the policy says, budgets hold,
a block reads the same wherever it lies, and placement never changes the answer."""
import time
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvdrive_compile.runtime import placement, site_step
from kvdrive_compile.runtime.kv_runtime import KVRuntime
from kvdrive_compile.runtime.placement import AdmissionModel, Entries, KVBudgetError, choose, first_by
from kvdrive_compile.runtime.selection import SelectionPolicy
from kvdrive_compile.runtime.tiers import Tier


class Cache:
    """One row of blocks under ``choose``, as the runtime drives it: a step selects blocks,
    the policy admits and evicts, then the selection is remembered."""

    def __init__(self, policy, window, capacity, nblocks, pinned=(), fetch=False):
        self.policy, self.window, self.capacity, self.fetch = policy, window, capacity, fetch
        self.cached = np.zeros(nblocks, np.bool_)
        self.pinned = np.zeros(nblocks, np.bool_)
        self.pinned[list(pinned)] = True
        self.last = np.full(nblocks, -1, np.int64)
        self.step = 0

    def run(self, selected, scores=None):
        self.step += 1
        sel = np.zeros_like(self.cached)
        sel[list(selected)] = True
        score = np.zeros(self.cached.size, np.float32) if scores is None else np.asarray(scores, np.float32)
        e = Entries(self.cached.copy(), self.pinned, self.last.copy(), score, sel, np.ones_like(sel))
        admit, evict = choose(self.policy, self.window, self.step, e, self.capacity - int(self.cached.sum()),
                              self.fetch)
        assert not (set(admit) & set(evict))
        self.cached[evict] = False
        self.cached[admit] = True
        self.last[sel] = self.step
        assert self.cached.sum() <= self.capacity
        return set(np.flatnonzero(self.cached).tolist())


def test_attention_admits_on_the_second_selection_within_the_window():
    c = Cache("attention", window=2, capacity=4, nblocks=10)
    assert c.run({1, 2}) == set()                 # first selections: attended where they lie
    assert c.run({2, 3}) == {2}                   # 2 again within the window: admitted
    assert c.run({4}) == {2}
    assert c.run({3}) == {2}                      # 3 was last selected 2 steps ago: outside a window of 2
    assert c.run({3, 4}) == {2, 3}                # 3 again at once: admitted; 4 (2 steps ago) is not


def test_blocks_never_selected_are_outside_the_window_from_the_first_step():
    """A prefill places its best-scored blocks on the device before any decode step selected
    them (last selected: -1, never). They hold no place in the reuse window: the first decode
    steps' misses may take their room (they once counted as selected at step -1, which kept them
    for the first window - 2 steps while the same misses were read from disk again and again)."""
    for window in (2, 4, 8):
        c = Cache("attention", window=window, capacity=3, nblocks=10, fetch=True)
        c.cached[[0, 1, 2]] = True                                # placed by the prefill, never selected
        assert c.run({0, 5, 6}, [1, 0, 0, 0, 0, 2, 2, 0, 0, 0]) == {0, 5, 6}    # 1 and 2 make room at once
        assert c.run({5, 6, 7}) == {0, 5, 6}                     # 0 was selected at step 1: kept, 7 waits


def test_attention_keeps_the_window_and_evicts_the_lowest_score_first():
    c = Cache("attention", window=2, capacity=3, nblocks=8, fetch=True)      # fetch: every miss admitted
    assert c.run({0, 1, 2}) == {0, 1, 2}
    # full; 3 and 4 miss. 0, 1, 2 were selected one step ago: inside the window, kept
    assert c.run({3, 4}) == {0, 1, 2}
    # now 0, 1, 2 left the window (last selected 2 steps ago); the lowest-scored goes first
    scores = [5, -1, 3, 9, 0, 0, 0, 0]
    assert c.run({3}, scores) == {0, 2, 3}
    # two misses need two victims: 3 was selected last step (in the window); 2 (score 3) and 0 (5) go
    assert c.run({5, 6}, [5, 0, 3, 9, 0, 1, 2, 0]) == {3, 5, 6}


def test_attention_ties_go_to_the_least_recently_selected():
    c = Cache("attention", window=1, capacity=2, nblocks=6, fetch=True)
    c.run({0})
    c.run({1})
    assert c.run({2}) == {1, 2}                   # 0 and 1 tie on score: 0 was selected longer ago


def test_pinned_blocks_are_never_evicted_and_count_against_the_capacity():
    c = Cache("lru", window=1, capacity=2, nblocks=6, pinned={0})
    c.cached[0] = True                            # the open block lives on the device
    assert c.run({1}) == {0, 1}
    assert c.run({2}) == {0, 2}                   # lru: 1 goes, 0 stays pinned
    assert c.run({3, 4}) == {0, 3}                # room for one: the best (ties: most recent) admitted


def test_lru_admits_every_miss_and_evicts_the_least_recently_selected():
    c = Cache("lru", window=4, capacity=3, nblocks=8)
    assert c.run({0, 1}) == {0, 1}
    assert c.run({2}) == {0, 1, 2}
    assert c.run({1, 3}) == {1, 2, 3}             # 0 was selected longest ago
    assert c.run({4}) == {1, 3, 4}                # 2 (step 2) before 1 and 3 (step 3)


def test_none_keeps_nothing_between_steps():
    c = Cache("none", window=4, capacity=8, nblocks=8, pinned={7})
    c.cached[[1, 2, 7]] = True
    assert c.run({1, 3}) == {7}
    assert c.run({1, 3}) == {7}


def test_over_its_share_a_layer_gives_back_even_without_misses():
    c = Cache("attention", window=1, capacity=2, nblocks=6)
    c.cached[[0, 1, 2, 3]] = True                 # e.g. after a warm-up with a larger share
    assert c.run({0}, [0, 5, 1, 0, 0, 0]) == {0, 1}


# -- admission: the cost model ----------------------------------------------------------------------

def test_worth_decides_which_misses_are_admitted():
    sel = np.zeros(8, np.bool_)
    sel[[1, 2, 3]] = True
    e = Entries(np.zeros(8, np.bool_), np.zeros(8, np.bool_), np.full(8, -1), np.arange(8, dtype=np.float32), sel,
                np.ones(8, np.bool_))
    worth = np.zeros(8, np.bool_)
    worth[[1, 3, 5]] = True                       # 5 is not selected: never a candidate
    admit, evict = choose("attention", 2, 1, e, room=8, admit_all=False, worth=worth)
    assert sorted(admit.tolist()) == [1, 3] and evict.size == 0
    admit, _ = choose("attention", 2, 1, e, room=1, admit_all=False, worth=worth)
    assert admit.tolist() == [3]                  # room for one: the best score
    admit, _ = choose("attention", 2, 1, e, room=8, admit_all=True, worth=worth)
    assert sorted(admit.tolist()) == [1, 2, 3]    # a fetching step copies every miss anyway


def test_admission_pays_for_the_copy_by_expected_reuse():
    # a CPU machine's priors: both attention sides on the CPU at one speed; a host miss saves
    # nothing by moving, a disk miss saves its next reads
    a = AdmissionModel("cpu", window=4).admits()
    assert a == {("repeat", Tier.HOST): False, ("first", Tier.HOST): False,
                 ("repeat", Tier.DISK): True, ("first", Tier.DISK): True}
    # a GPU's priors: the CPU part is ~100x slower per byte than the device part, copies cheap
    m = AdmissionModel("cuda", window=4)
    assert all(m.admits().values())
    # copies measured slow (5 GB/s): a repeat (expected ~2.4 more selections in the window)
    # still pays for its copy, a first selection (~0.65) does not
    m.measured("copy_up", 5e10, 10.0)              # outweighs the prior (50 ms at 20 GB/s)
    assert m.rates["copy_up"].gb_per_s == pytest.approx((5e10 + 1e9) / 10.05 / 1e9)
    a = m.admits()
    assert a[("repeat", Tier.HOST)] and not a[("first", Tier.HOST)]
    assert a[("first", Tier.DISK)]                # its disk reads are worth saving
    # measured: first selections are selected again 90 % of the time: now they pay too
    m.observe_reuse("first", 20000, 18000)
    assert m.reuse("first") == pytest.approx(0.9, abs=0.01)
    assert m.admits()[("first", Tier.HOST)]
    # the device part's time on CUDA is a launch, not the work: it keeps its prior
    m.measured("device_attention", 1.0, 1.0)
    assert m.rates["device_attention"].gb_per_s == pytest.approx(1000.0)
    worth = m.worth(np.array([True, False, True, False]), np.array([Tier.HOST, Tier.HOST, Tier.DISK, Tier.DEVICE]))
    assert worth.tolist() == [True, True, True, False]


def test_reuse_is_measured_per_history_class():
    """A block selected at one step is counted at the next: selected again or not, by whether
    its selection was a repeat (selected before within the window) or a first one."""
    rt = KVRuntime(block_size=16, device_memory=1 << 20, host_memory=None, reuse_window=2)
    session = rt.open_session(sites=1)
    k = torch.randn(1, 1, 16 * 8, 16)
    kv = rt.layer(session, 0, k, False)
    placement.append(rt, kv, k, k)
    model = placement.admission_model(rt, kv)
    seen, hits = dict(model.reuse_seen), dict(model.reuse_hits)
    for sel in ([1, 2], [2, 3], [2, 5], [2, 3]):
        placement.cache_step(rt, kv, SimpleNamespace(selected=torch.tensor([sel]), fetch=False, fills=[]))
    # step 2: 1, 2 were first selections (2 again); step 3: 2 a repeat (again), 3 a first (not);
    # step 4: 2 a repeat (again), 5 a first (not)
    assert {c: model.reuse_seen[c] - seen[c] for c in seen} == {"repeat": 2, "first": 4}
    assert {c: model.reuse_hits[c] - hits[c] for c in hits} == {"repeat": 2, "first": 1}
    assert kv.last_pick.blocks.tolist() == [2, 3] and kv.last_pick.repeat.tolist() == [True, False]
    rt.close()
    # other policies, or no device cache, ask no admission model: none is made or measured
    for options in (dict(device_memory=1 << 20, cache_policy="lru"), dict(device_memory=None)):
        rt = KVRuntime(block_size=16, host_memory=None, **options)
        kv = rt.layer(rt.open_session(sites=1), 0, k, False)
        placement.append(rt, kv, k, k)
        placement.cache_step(rt, kv, SimpleNamespace(selected=torch.tensor([[1, 2]]), fetch=False, fills=[]))
        assert placement.admission_model(rt, kv) is None and rt.stats().admission == {}
        rt.close()


_REPEAT = weakref.WeakKeyDictionary()     # the reference's history class per (row, block) entry, by layer


def reference_repeat(kv):
    """The reference's ``[rows, capacity]`` bool array of repeat selections of ``kv`` (the
    runtime keeps only the last step's, in ``kv.last_pick``)."""
    old = _REPEAT.get(kv)
    if old is None or old.shape != kv.home.shape:
        _REPEAT[kv] = np.zeros(kv.home.shape, np.bool_)
        if old is not None:
            _REPEAT[kv][:, :old.shape[1]] = old
    return _REPEAT[kv]


def cache_step_over_every_entry(rt, kv, plan):
    """The reference for ``placement.cache_step``: the same rules with ``Entries`` over every
    (row, block) entry of the layer and ``where()``'s whole table, and the history class of
    every entry kept."""
    nb = kv.num_blocks
    repeat = reference_repeat(kv)
    kv.step += 1
    selected = np.zeros((kv.rows, nb), np.bool_)
    np.put_along_axis(selected, plan.selected.numpy(), True, axis=1)
    tier, _ = kv.where()
    pinned = kv.pinned_blocks()[None, :] | (kv.pins[:, :nb] > 0)
    last = kv.last_selected[:, :nb]
    recent = placement.within_window(last, kv.step, rt.reuse_window)
    model = placement.admission_model(rt, kv)
    if model is not None:
        before = last == kv.step - 1
        for kind, was in (("repeat", repeat[:, :nb]), ("first", ~repeat[:, :nb])):
            seen = before & was
            model.observe_reuse(kind, int(seen.sum()), int((seen & selected).sum()))
    if rt.device_cache:
        e = Entries(cached=(kv.dev[:, :nb] >= 0).reshape(-1), pinned=pinned.reshape(-1),
                    last_selected=last.reshape(-1), score=kv.score[:, :nb].reshape(-1),
                    selected=selected.reshape(-1), eligible=(tier >= 0).reshape(-1))
        room = placement._device_share(rt, kv) - int(e.cached.sum())
        worth = None if model is None or plan.fetch else model.worth(recent.reshape(-1), tier.reshape(-1))
        admit, evict = choose(rt.cache_policy, rt.reuse_window, kv.step, e, room, plan.fetch, worth)
        placement._evict(rt, kv, Tier.DEVICE, evict)
        placement._admit(rt, kv, plan, Tier.DEVICE, admit, tier.reshape(-1))
    if rt.budgets[Tier.HOST].limit is not None and (kv.home[:, :nb] == Tier.DISK).any():
        tier, _ = kv.where()
        on_disk = tier == Tier.DISK
        for _, r, b, _ in plan.fills:
            on_disk[r, b] = False
        copy = (kv.host[:, :nb] >= 0) & (kv.home[:, :nb] == Tier.DISK)
        e = Entries(cached=copy.reshape(-1), pinned=(kv.pins[:, :nb] > 0).reshape(-1),
                    last_selected=kv.last_selected[:, :nb].reshape(-1), score=kv.score[:, :nb].reshape(-1),
                    selected=(selected & (on_disk | copy)).reshape(-1), eligible=on_disk.reshape(-1))
        room = placement._host_share(rt, kv) - int(copy.sum())
        admit, evict = choose(rt.cache_policy, rt.reuse_window, kv.step, e, room, False)
        placement._evict(rt, kv, Tier.HOST, evict)
        placement._admit(rt, kv, plan, Tier.HOST, admit, tier.reshape(-1))
    repeat[:, :nb][selected] = recent[selected]
    kv.last_selected[:, :nb][selected] = kv.step


@pytest.mark.parametrize("cache_policy,fetch", [("attention", False), ("attention", True), ("lru", False),
                                                ("none", False)])
@pytest.mark.parametrize("seed,sites", [(0, 2), (1, 2), (2, 1)])
def test_the_cache_step_decides_what_the_rules_over_every_entry_decide(tmp_path, monkeypatch, cache_policy, fetch,
                                                                       seed, sites):
    """Two runtimes fed the same appends, selections and scores, on fresh random data: one moves
    copies by ``cache_step`` (which counts reuse, asks the admission model and keeps the
    selection history for the selected entries only, and starts the next step's reuse count and
    ahead-of-need read from ``last_pick``), the other by the same rules over every entry. After
    each step both hold the same copies in the same slots, the same pending disk fills, the
    same selection history and the same reuse counts, and an ahead-of-need read takes the blocks
    the step selected that lie only on disk. The admission model's decisions are drawn at random
    per step (the same for both: its measured rates depend on time). The disk reads land between
    steps (the admitted copies fill); halfway the cache is cropped by a block and a bit. With one
    attention site the layer's homes take all of host memory: no copy fits there. Steps vary
    what the fast path must get right by itself: selections out of block order, scores with
    ties, entries a live plan pins, a window longer than the first steps."""
    rng = np.random.default_rng(seed)
    batch, hkv, d, bs = 2, 2, 8, 4
    slot = bs * d * 2 * 4
    draws = [rng.random(4) < 0.5 for _ in range(40)]
    monkeypatch.setattr(AdmissionModel, "admits", lambda self: {
        (kind, tier): bool(draws[self.calls][i]) for i, (kind, tier) in
        enumerate((k, t) for k in ("repeat", "first") for t in (Tier.HOST, Tier.DISK))})
    monkeypatch.setattr(AdmissionModel, "calls", 0, raising=False)
    k = torch.from_numpy(rng.standard_normal((batch, hkv, bs * 30 + 2, d), np.float32))
    rts, kvs, sessions = [], [], []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        rt = KVRuntime(block_size=bs, device_memory=20 * batch * hkv * slot, host_memory=20 * batch * hkv * slot,
                       disk_dir=str(tmp_path / str(i)), cache_policy=cache_policy, reuse_window=(2, 4, 3)[seed])
        session = rt.open_session(sites=sites)   # 2: the layer homes blocks in half of host memory, the rest holds copies
        session.phase = "decode"
        kv = rt.layer(session, 0, k, False)
        placement.append(rt, kv, k, k)
        placement.place_fresh(rt, kv)
        rts.append(rt)
        kvs.append(kv)
        sessions.append(session)
    read_ahead = 0
    for step in range(25):
        new = torch.from_numpy(rng.standard_normal((batch, hkv, 1, d), np.float32))
        for rt, kv in zip(rts, kvs):
            if step == 12:                          # a crop: what was selected in the blocks it frees is forgotten
                site_step.crop(rt, kv, kv.length - bs - 3)
            placement.append(rt, kv, new, new)
            placement.place_fresh(rt, kv)
        nb = kvs[0].num_blocks
        picks = np.stack([rng.choice(nb, 9, replace=False) for _ in range(batch * hkv)])
        picks = torch.from_numpy(np.sort(picks, 1) if step % 2 else picks)      # a ranking's order, or the blocks'
        scores = rng.standard_normal((batch * hkv, nb)).astype(np.float32)
        if step % 3 == 0:                                   # ties: the last selection, then the position decide
            scores = np.round(scores)
        pins = (rng.random((batch * hkv, nb)) < 0.15).astype(np.int32)          # read by another live plan
        plans = []
        for rt, kv, run in zip(rts, kvs, (placement.cache_step, cache_step_over_every_entry)):
            kv.score[:, :nb] = scores
            kv.pins[:, :nb] += pins
            plans.append(SimpleNamespace(selected=picks, fetch=fetch, fills=[], pinned=(), layer=kv))
            AdmissionModel.calls = step
            run(rt, kv, plans[-1])
            kv.pins[:, :nb] -= pins
        a, b = kvs
        for name in ("dev", "host", "home", "home_slot", "last_selected"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), (step, name)
        pick = a.last_pick
        assert pick.step == b.step and np.array_equal(pick.repeat, reference_repeat(b)[pick.rows, pick.blocks]), step
        fills = [[(t, r.tolist(), c.tolist(), s.tolist()) for t, r, c, s in p.fills] for p in plans]
        assert fills[0] == fills[1], step
        assert [dict(rt.admitted) for rt in rts] == [dict(rts[0].admitted)] * 2, step
        assert [dict(rt.evicted) for rt in rts] == [dict(rts[0].evicted)] * 2, step
        models = [placement.admission_model(rt, kv) for rt, kv in zip(rts, kvs)]
        if models[0] is not None:
            assert (models[0].reuse_seen, models[0].reuse_hits) == (models[1].reuse_seen, models[1].reuse_hits)
        for rt, kv, plan in zip(rts, kvs, plans):           # the disk reads land: the admitted copies fill
            for tier, r, c, slots in plan.fills:
                zeros = torch.zeros(len(slots), bs, d)
                placement._write_copies(rt, tier, kv, r, c, slots.tolist(), zeros, zeros)
            plan.fills = []
        # an ahead-of-need read takes the blocks the last step selected that lie only on disk
        site_step.prefetch_ahead(rts[0], sessions[0], 0)
        ahead = kvs[0].ahead
        want = (plans[0].selected.numpy() < kvs[0].length // bs) & (kvs[0].where()[0][np.arange(batch * hkv)[:, None], plans[0].selected.numpy()] == Tier.DISK)
        got = set() if ahead is None else set(zip(ahead.rows.tolist(), ahead.blocks.tolist()))
        assert got == {(r, int(plans[0].selected[r, j])) for r, j in zip(*np.nonzero(want))}, step
        read_ahead += len(got)
        if ahead is not None:
            ahead.read.result()
        site_step._drop_ahead(rts[0], kvs[0])
    assert read_ahead or cache_policy == "lru" or fetch, "no block read ahead: the test misses its case"   # both admit every miss
    for rt in rts:
        assert cache_policy == "none" or sites == 1 or rt.evicted["host"], "no host copy evicted: the test misses its case"
        assert rt.evicted["device"], "no device copy evicted: the test misses its case"
        rt.close()


# -- the runtime under the policy ------------------------------------------------------------------

POLICY = SelectionPolicy(token_budget=64, sink_tokens=16, local_window=16, dense_layers=0)


def reference(q, k, v, scale):
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    return torch.softmax(q.double() @ k.transpose(-1, -2) * scale, -1) @ v


def step(rt, session, layer, q, past, n, k_new, v_new, policy):
    """One site's step as the ops run it: select, prefetch, start the CPU part, the device part,
    then the CPU part's result and the merge."""
    pid = site_step.select(rt, session, layer, past, n, q, policy, 0.25)
    plan = session.plans[pid]
    site_step.prefetch(rt, plan)
    mask = site_step.step_mask(plan, None, n > 1)
    site_step.start_host_attention(rt, plan, q, mask, 0.25)
    if plan.host_part is not None:      # inline on a CPU: deferred past the device part, nothing read or waited yet
        assert site_step.host_part_deferred(plan) and plan.staged is None
    device = site_step.device_attention(rt, plan, q, k_new, v_new, mask, 0.25)
    parts = [device, site_step.finish_host_attention(rt, plan, q)]
    site_step.end_plan(rt, session, pid)
    return site_step.merge(parts, torch.float32), plan


def check_counters(rt):
    for tier, b in rt.budgets.items():
        assert b.limit is None or b.peak <= b.limit, (tier, b)
    copies = {Tier.DEVICE: 0, Tier.HOST: 0}
    for session in rt.sessions.values():
        for kv in session.layers.values():
            nb = kv.num_blocks
            assert (kv.pins[:, :nb] == 0).all()
            copies[Tier.DEVICE] += int((kv.dev[:, :nb] >= 0).sum())
            copies[Tier.HOST] += int((kv.host[:, :nb] >= 0).sum())
            # every completed block has exactly one home
            done = kv.length // kv.block_size
            assert (kv.home[:, kv.first:done] >= 0).all()
    # every slot a pool hands out belongs to exactly one entry (one shape of KV in these tests)
    for (tier, *_), pool in rt.pools.items():
        assert pool.used == copies[tier], (tier, pool.used, copies[tier])


def assert_copies_equal(rt, kv):
    """Every completed block reads the same bytes from each place it lies: its device copy, its
    host copy (or host home) and its home on disk."""
    done = kv.length // kv.block_size
    rows, blocks = np.nonzero(kv.home[:, kv.first:done] >= 0)
    blocks = blocks + kv.first
    if not rows.size:
        return
    home_k = torch.empty((rows.size, kv.block_size, kv.head_dim))
    home_v = torch.empty_like(home_k)
    on_disk = kv.home[rows, blocks] == Tier.DISK
    if on_disk.any():
        k, v = rt.disk(kv).read(kv.home_slot[rows[on_disk], blocks[on_disk]].tolist())
        home_k[torch.from_numpy(on_disk)], home_v[torch.from_numpy(on_disk)] = k, v
    for tier, slots in ((Tier.HOST, kv.host), (Tier.DEVICE, kv.dev)):
        held = slots[rows, blocks] >= 0
        if not held.any():
            continue
        pool = rt.pool(tier, kv)
        at = torch.from_numpy(slots[rows[held], blocks[held]])
        if tier == Tier.HOST:                          # host homes are the reference where there is no disk home
            fill = torch.from_numpy(held & ~on_disk)
            home_k[fill], home_v[fill] = pool.k[torch.from_numpy(slots[rows, blocks][held & ~on_disk])], \
                pool.v[torch.from_numpy(slots[rows, blocks][held & ~on_disk])]
        mask = torch.from_numpy(held)
        assert torch.equal(pool.k[at], home_k[mask]) and torch.equal(pool.v[at], home_v[mask]), tier


@pytest.mark.parametrize("cache_policy", ["attention", "lru", "none"])
@pytest.mark.parametrize("attention", ["split", "fetch"])
@pytest.mark.parametrize("seed", range(3))
def test_tiers_and_policies_give_the_selected_answer(tmp_path, cache_policy, attention, seed):
    """Random prompt lengths, batches and budgets: every decode step equals attention over the
    blocks the step selected, computed from the full K/V (so a block reads the same from a
    device copy, a host copy or its home on disk); budgets and counters hold at every step."""
    gen = torch.Generator().manual_seed(seed)
    batch, hkv, g, d, bs = int(torch.randint(1, 4, (1,), generator=gen)), 2, 2, 16, 16
    slot = 2 * bs * d * 4
    rows = batch * hkv
    pinned = (1 + 1 + 1) * rows * slot                      # sink, local, open block per layer
    layers = 2
    rt = KVRuntime(block_size=bs, device_memory=layers * (pinned + int(torch.randint(0, 8, (1,), generator=gen)) * slot),
                   host_memory=int(torch.randint(0, 12, (1,), generator=gen)) * slot, disk_dir=str(tmp_path),
                   cache_policy=cache_policy, reuse_window=int(torch.randint(1, 4, (1,), generator=gen)))
    policy = SelectionPolicy(token_budget=64, sink_tokens=16, local_window=16, dense_layers=0, attention=attention)
    session = rt.open_session(sites=layers)
    prompt = int(torch.randint(100, 260, (1,), generator=gen))
    full = {}
    for t in range(12):
        n = prompt if t == 0 else 1
        for layer in range(layers):
            k_new, v_new = (torch.randn(batch, hkv, n, d, generator=gen) for _ in range(2))
            kv = rt.layer(session, layer, k_new, False)
            past = kv.length
            placement.append(rt, kv, k_new, v_new)
            k_all, v_all = full.get(layer, (k_new[:, :, :0], v_new[:, :, :0]))
            k_all, v_all = torch.cat([k_all, k_new], 2), torch.cat([v_all, v_new], 2)
            full[layer] = (k_all, v_all)
            q = torch.randn(batch, hkv * g, n, d, generator=gen)
            out, plan = step(rt, session, layer, q, past, n, k_new, v_new, policy)
            if t == 0:
                continue
            # the reference: the same blocks, gathered from the full K/V
            sel = plan.selected                                          # [rows, m]
            tok = (sel[:, :, None] * bs + torch.arange(bs)).reshape(rows, -1)
            tok = tok.clamp(max=kv.length - 1)
            keep = (sel[:, :, None] * bs + torch.arange(bs)).reshape(rows, -1) < kv.length
            ka = k_all.reshape(rows, -1, d)[torch.arange(rows)[:, None], tok]
            va = v_all.reshape(rows, -1, d)[torch.arange(rows)[:, None], tok]
            qr = q.reshape(batch, hkv, g, 1, d)
            s = (qr.double() @ ka.view(batch, hkv, 1, -1, d).double().transpose(-1, -2)) * 0.25
            s = s.masked_fill(~keep.view(batch, hkv, 1, 1, -1), float("-inf"))
            ref = (torch.softmax(s, -1) @ va.view(batch, hkv, 1, -1, d).double()).reshape(batch, hkv * g, 1, d)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
            check_counters(rt)
            assert_copies_equal(rt, kv)
    st = rt.stats()
    assert sum(st.served.values()) > 0
    for kv in session.layers.values():
        copies = int((kv.dev[:, :kv.num_blocks] >= 0).sum())
        if cache_policy == "none":                    # nothing kept but the pinned blocks
            assert copies <= rows * int(kv.pinned_blocks().sum())
    assert st.hit_rate == pytest.approx(st.served["device"] / sum(st.served.values()))
    if cache_policy == "attention":
        # the model measured this run: its reuse counts moved off the priors; the CPU part's
        # throughput too where it attended host or disk blocks (split), never with fetch
        model = rt.admission
        assert sum(model.reuse_seen.values()) > 2 * placement.REUSE_PRIOR_N
        cpu = model.rates["cpu_attention"].seconds
        prior = placement.Rate.prior(placement.PRIORS["cpu"]["cpu_attention"]).seconds
        if attention == "fetch":
            assert cpu == prior
        else:
            assert cpu > prior or st.served["host"] + st.served["disk"] == 0
        assert set(st.admission["admits"]) == {"repeat from host", "repeat from disk", "first from host",
                                               "first from disk"}
    else:
        assert st.admission == {}
    rt.close()


def test_a_device_budget_below_the_pinned_blocks_says_the_minimum():
    rt = KVRuntime(block_size=16, device_memory=4096, host_memory=None)
    session = rt.open_session(sites=3)
    k = torch.randn(1, 2, 100, 16)
    kv = rt.layer(session, 0, k, False)
    placement.append(rt, kv, k, k)
    with pytest.raises(KVBudgetError, match=r"Pass device_memory >= \d+ bytes"):
        site_step.select(rt, session, 0, 0, 100, torch.randn(1, 4, 100, 16), POLICY, 0.25)
    rt.close()


def test_a_generation_short_of_room_names_the_others_and_how_to_free_them():
    """A device budget that holds one generation's pinned blocks: while another generation still
    holds its KV (its cache alive somewhere, e.g. in an error a notebook kept), the next is
    refused with how to free it; once that one is released, the next runs."""
    torch.manual_seed(0)
    rt = KVRuntime(block_size=16, device_memory=3 * 2 * 2048, host_memory=None)     # 3 pinned blocks x 2 rows
    k = torch.randn(1, 2, 40, 16)
    first = rt.open_session(sites=1)
    kv = rt.layer(first, 0, k, False)
    placement.append(rt, kv, k, k)
    site_step.select(rt, first, 0, 0, 40, torch.randn(1, 4, 40, 16), POLICY, 0.25)
    second = rt.open_session(sites=1)
    kv2 = rt.layer(second, 0, k, False)
    placement.append(rt, kv2, k, k)
    with pytest.raises(KVBudgetError, match=r"1 other generation\(s\) sharing this runtime hold theirs too.*"
                                            r"kvdrive_compile\.release_all\(\).*Pass device_memory >= 24576 bytes "
                                            r"to keep them all \(12288 for this generation alone"):
        site_step.select(rt, second, 0, 0, 40, torch.randn(1, 4, 40, 16), POLICY, 0.25)
    rt.release(first.id)
    site_step.select(rt, second, 0, 0, 40, torch.randn(1, 4, 40, 16), POLICY, 0.25)
    rt.close()


def test_a_step_short_of_room_waits_for_another_threads_step_to_give_its_blocks_back():
    """Two generations share a device budget. While one thread's step reads its blocks (pinned
    from its plan to its merge), the other thread's step needs room only those blocks hold: it
    waits, letting go of the lock so the first step can merge, and then takes the room (it
    used to sleep holding the lock and fail with a KVBudgetError)."""
    import threading

    torch.manual_seed(0)
    slot = 2 * 16 * 16 * 4
    rt = KVRuntime(block_size=16, device_memory=15 * slot, host_memory=None)
    k = torch.randn(1, 2, 96, 16)                     # 6 blocks x 2 rows, every one on the device
    first = rt.open_session(sites=1)
    kv = rt.layer(first, 0, k, False)
    placement.append(rt, kv, k, k)
    exact = SelectionPolicy(token_budget=None, sink_tokens=16, local_window=16, dense_layers=0)
    site_step.end_plan(rt, first, site_step.select(rt, first, 0, 0, 96, torch.randn(1, 4, 96, 16), exact, 0.25))
    assert int((kv.dev[:, :kv.num_blocks] >= 0).sum()) == 12
    placement.append(rt, kv, k[:, :, :1], k[:, :, :1])
    # a decode step of the first generation: its plan pins the 12 it reads (one of them the open
    # block) until its merge
    pid = site_step.select(rt, first, 0, 96, 1, torch.randn(1, 4, 1, 16), exact, 0.25)
    second = rt.open_session(sites=1)
    kv2 = rt.layer(second, 0, k, False)
    seen = []                                       # from another thread: room the first step gives back
    probe = threading.Thread(target=lambda: seen.append(placement._held_by_plans(rt, kv2)))
    probe.start()
    probe.join(10)
    assert seen[0] >= 6
    placement.append(rt, kv2, k[:, :, :40], k[:, :, :40])
    errors, done = [], threading.Event()

    def other_thread():                             # needs 3 pinned blocks x 2 rows: more than is free
        try:
            site_step.select(rt, second, 0, 0, 40, torch.randn(1, 4, 40, 16), exact, 0.25)
        except BaseException as e:                  # pragma: no cover - reported below
            errors.append(e)
        done.set()
    t = threading.Thread(target=other_thread)
    t.start()
    time.sleep(0.3)
    assert not done.is_set(), errors                # waiting for the first step, not failing
    site_step.end_plan(rt, first, pid)              # the first step merges: its blocks may move
    t.join(10)
    assert done.is_set() and not errors, errors
    assert rt.budgets[Tier.DEVICE].peak <= 15 * slot
    assert (kv2.dev[:, :kv2.num_blocks][:, kv2.pinned_blocks()] >= 0).all()
    rt.close()


def test_a_plan_no_thread_will_merge_is_not_waited_for():
    """A plan of this thread's own interrupted step (an error between select and merge, its
    cache kept) is never merged: a step short of the room it pins fails at once with the budget
    error instead of waiting for it."""
    torch.manual_seed(0)
    slot = 2 * 16 * 16 * 4
    rt = KVRuntime(block_size=16, device_memory=15 * slot, host_memory=None)
    k = torch.randn(1, 2, 96, 16)
    first = rt.open_session(sites=1)
    kv = rt.layer(first, 0, k, False)
    placement.append(rt, kv, k, k)
    exact = SelectionPolicy(token_budget=None, sink_tokens=16, local_window=16, dense_layers=0)
    site_step.end_plan(rt, first, site_step.select(rt, first, 0, 0, 96, torch.randn(1, 4, 96, 16), exact, 0.25))
    placement.append(rt, kv, k[:, :, :1], k[:, :, :1])
    site_step.select(rt, first, 0, 96, 1, torch.randn(1, 4, 1, 16), exact, 0.25)      # never merged
    second = rt.open_session(sites=1)
    kv2 = rt.layer(second, 0, k, False)
    placement.append(rt, kv2, k[:, :, :40], k[:, :, :40])

    def waited(timeout=None):
        raise AssertionError("waited for a plan no thread will merge")
    rt.room.wait = waited
    with pytest.raises(KVBudgetError, match="1 other generation"):
        site_step.select(rt, second, 0, 0, 40, torch.randn(1, 4, 40, 16), exact, 0.25)
    rt.close()


def test_a_step_short_of_room_waits_for_another_threads_garbage_collection():
    """A dropped generation's KV comes free when its cache is collected. Where another thread's
    collection is under way (gc.collect() then returns at once, and the dropped stand-ins'
    finalizers run in that thread), a step short of room waits for it to end, then collects
    and takes the room (it used to give up after ~0.1 s)."""
    import gc
    import threading

    from kvdrive_compile.runtime.standins import StandInKey

    torch.manual_seed(0)
    slot = 2 * 16 * 16 * 4
    rt = KVRuntime(block_size=16, device_memory=6 * slot, host_memory=None)     # one generation's pinned blocks
    k = torch.randn(1, 2, 40, 16)
    dropped = rt.open_session(sites=1)
    kv = rt.layer(dropped, 0, k, False)
    placement.append(rt, kv, k, k)
    site_step.end_plan(rt, dropped, site_step.select(rt, dropped, 0, 0, 40, torch.randn(1, 4, 40, 16), POLICY, 0.25))
    cycle = [rt.standins.make(StandInKey(dropped.id, 0, "k"), k, 40, 0)]
    cycle.append(cycle)                             # its cache: garbage only a collection frees
    del cycle
    second = rt.open_session(sites=1)
    kv2 = rt.layer(second, 0, k, False)
    placement.append(rt, kv2, k, k)
    started, release = threading.Event(), threading.Event()
    holder = [None]                                 # the other thread's id

    def slow_start(phase, info):                    # the other thread's collection takes a while
        if phase == "start" and threading.get_ident() == holder[0]:
            started.set()
            release.wait(5)

    def other_thread():
        holder[0] = threading.get_ident()
        gc.collect()
    enabled = gc.isenabled()
    gc.disable()                                     # no collection but the other thread's
    gc.callbacks.append(slow_start)
    try:
        t = threading.Thread(target=other_thread)
        t.start()
        assert started.wait(5)
        threading.Timer(0.3, release.set).start()     # its collection ends after 0.3 s
        site_step.select(rt, second, 0, 0, 40, torch.randn(1, 4, 40, 16), POLICY, 0.25)
        t.join(10)
    finally:
        gc.callbacks.remove(slow_start)
        release.set()
        if enabled:
            gc.enable()
    assert dropped.id not in rt.sessions
    assert (kv2.dev[:, :kv2.num_blocks][:, kv2.pinned_blocks()] >= 0).all()
    rt.close()


def test_prefill_places_the_best_scored_blocks_on_the_device():
    """Warm-up: the blocks the last prompt queries score highest get the device's room, the
    rest go home (host while it has room, then disk)."""
    torch.manual_seed(0)
    bs, d = 16, 16
    slot = 2 * bs * d * 4
    rt = KVRuntime(block_size=bs, device_memory=(3 + 4) * slot, host_memory=6 * slot, cache_policy="attention")
    session = rt.open_session(sites=1)
    k = torch.randn(1, 1, 20 * bs, d) * 0.1
    hot = [5, 9, 12, 14]
    q = torch.randn(1, 1, 20 * bs, d)
    for b in hot:                                     # keys aligned with the last queries: high scores
        k[0, 0, b * bs:(b + 1) * bs] = q[0, 0, -1] * 3
    kv = rt.layer(session, 0, k, False)
    placement.append(rt, kv, k, k)
    policy = SelectionPolicy(token_budget=64, sink_tokens=16, local_window=16, dense_layers=0)
    site_step.select(rt, session, 0, 0, 20 * bs, q, policy, 0.25)
    on_device = set(np.flatnonzero(kv.dev[0, :20] >= 0).tolist())
    assert on_device == {0, 18, 19} | set(hot)            # sink, local window + open block, the hot ones
    assert set(np.flatnonzero(kv.home[0, :20] == Tier.HOST).tolist()) >= set(hot)    # best homes: host
    assert (kv.home[0, :20] == Tier.DISK).sum() == 20 - 6
    rt.close()


def test_each_layer_homes_its_best_blocks_in_its_share_of_host_memory():
    """Host homes are shared by the layers: each takes what the homes before it left free over
    the layers still to come (a short layer leaves the rest to the next), and within its share the
    (row, block) entries its last prompt query scores highest, each row its own; the rest on disk."""
    torch.manual_seed(1)
    bs, d, rows = 16, 16, 2
    slot = 2 * bs * d * 4
    host_entries = 30
    rt = KVRuntime(block_size=bs, device_memory=64 * slot, host_memory=host_entries * slot, cache_policy="attention")
    session = rt.open_session(sites=3)
    policy = SelectionPolicy(token_budget=64, sink_tokens=16, local_window=16, dense_layers=0)
    lengths = {0: 3 * bs, 1: 20 * bs, 2: 20 * bs}           # layer 0: three blocks (a short one)
    hot = {1: ([4, 7, 11], [5, 8, 13]), 2: ([2, 9, 10], [3, 6, 12])}     # per row
    for layer, n in lengths.items():
        q = torch.randn(1, rows, n, d)
        k = torch.randn(1, rows, n, d) * 0.1
        for r, blocks in enumerate(hot.get(layer, ((), ()))):
            for b in blocks:                            # aligned with the row's last query: high scores
                k[0, r, b * bs:(b + 1) * bs] = q[0, r, -1] * 3
        kv = rt.layer(session, layer, k, False)
        placement.append(rt, kv, k, k)
        site_step.select(rt, session, layer, 0, n, q, policy, 0.25)
    homes = {layer: session.layers[layer].home[:, :n // bs] for layer, n in lengths.items()}
    assert (homes[0] == Tier.HOST).all()                      # 6 entries: under a third of 30
    # what layer 0 left: (30 - 6) // 2 = 12 entries for each of the others, of their 2 x 20
    for layer in (1, 2):
        assert (homes[layer] == Tier.HOST).sum() == 12
        assert (homes[layer] == Tier.DISK).sum() == 2 * 20 - 12
        for r, blocks in enumerate(hot[layer]):
            assert (homes[layer][r, blocks] == Tier.HOST).all(), (layer, r)
    assert rt.host_homes == 6 + 2 * 12
    assert_copies_equal(rt, session.layers[2])
    rt.close()


def test_first_by_is_the_head_of_a_lexsort():
    """``first_by`` gives the first k of a full lexsort (primary, secondary, position) on fresh
    random data: few distinct values (ties at the k-th), -inf, NaN, k of 0, 1, some, all, more."""
    rng = np.random.default_rng(3)
    for trial in range(200):
        n = int(rng.integers(0, 60))
        idx = np.sort(rng.choice(1000, n, replace=False))
        primary = rng.integers(-3, 4, n).astype(np.float32)
        primary[rng.random(n) < 0.1] = -np.inf
        if trial % 3 == 0:
            primary[rng.random(n) < 0.2] = np.nan
        secondary = rng.integers(-1, 3, n)
        for k in {0, 1, n // 3, n - 1, n, n + 5}:
            want = idx[np.lexsort((secondary, primary))][:max(k, 0)]
            assert np.array_equal(first_by(idx, k, primary, secondary), want), (trial, k)
