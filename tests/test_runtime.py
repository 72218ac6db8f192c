"""The KV runtime on its own: data placed over three tiers and read back exactly, budgets,
sessions apart, sliding windows, private disk files."""
import os
import stat
import subprocess
import sys

import pytest
import torch

from kvdrive_compile.runtime import placement, site_step
from kvdrive_compile.runtime.kv_runtime import KVRuntime
from kvdrive_compile.runtime.selection import SelectionPolicy
from kvdrive_compile.runtime.standins import StandInKey
from kvdrive_compile.runtime.tiers import Tier

# exact attention, nothing kept on the device but the open block: tiny budgets spill
EXACT_SMALL = SelectionPolicy(token_budget=None, sink_tokens=0, local_window=0)


def reference(q, k, v, scale, bias=None):
    """float64 attention; q [B,Hq,Q,D], k/v [B,Hkv,S,D], bias broadcastable to [B,Hq,Q,S]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    return torch.softmax(s, -1) @ v


def attend(rt, session, layer, q, past, new, k_new, v_new, mask=None, causal=False, policy=EXACT_SMALL,
           shared=False):
    pid = site_step.select(rt, session, layer, past, new, q, policy, shared=shared)
    plan = session.plans[pid]
    site_step.prefetch(rt, plan)
    step = site_step.step_mask(plan, mask, causal)
    parts = [site_step.device_attention(rt, plan, q, k_new, v_new, step, 0.125),
             site_step.host_attention(rt, plan, q, step, 0.125)]
    site_step.end_plan(rt, session, pid)                      # as the merge op does: unpins its blocks
    return site_step.merge(parts, torch.float32), plan


def append_new(rt, session, k_new, v_new):
    """Append ``k_new, v_new [B, Hkv, n, D]`` to layer 0 of ``session``; the layer and its past length."""
    kv = rt.layer(session, 0, k_new, keeps_last=False)
    past = kv.length
    placement.append(rt, kv, k_new, v_new)
    return kv, past


def budgets_ok(rt):
    for tier, b in rt.budgets.items():
        assert b.limit is None or b.peak <= b.limit, (tier, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,hkv,g,d", [(1, 3, 3, 64), (2, 2, 4, 32), (3, 1, 4, 16)])
def test_three_tiers_exact(tmp_path, dtype, batch, hkv, g, d):
    torch.manual_seed(0)
    block_bytes = 16 * d * 2 * torch.empty((), dtype=dtype).element_size() * batch * hkv
    rt = KVRuntime(block_size=16, device_memory=2 * block_bytes, host_memory=3 * block_bytes,
                   disk_dir=str(tmp_path))
    session = rt.open_session()
    k_all = torch.randn(batch, hkv, 0, d, dtype=dtype)
    v_all = k_all.clone()
    for n in [37, 1, 1, 14, 1, 40, 1, 2, 1]:                   # a prefill, decode steps, chunks
        k_new = torch.randn(batch, hkv, n, d, dtype=dtype)
        v_new = torch.randn(batch, hkv, n, d, dtype=dtype)
        kv, past = append_new(rt, session, k_new, v_new)
        k_all, v_all = torch.cat([k_all, k_new], 2), torch.cat([v_all, v_new], 2)
        q = torch.randn(batch, hkv * g, n, d, dtype=dtype)
        mask = torch.rand(batch, 1, n, past + n) > 0.2
        mask[..., -1] = True
        out, plan = attend(rt, session, 0, q, past, n, k_new, v_new, mask)
        bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.double(), reference(q, k_all, v_all, 0.125, bias), atol=tol, rtol=tol)
        budgets_ok(rt)
    tier, _ = kv.where()
    assert set(tier.reshape(-1).tolist()) == {Tier.DEVICE, Tier.HOST, Tier.DISK}
    homes = set(kv.home[:, :kv.num_blocks - 1].reshape(-1).tolist())      # the open block has none
    assert homes == {Tier.HOST, Tier.DISK}
    rt.close()


@pytest.mark.parametrize("causal", [False, True])
def test_a_step_of_many_queries_builds_its_bias_in_bounded_query_chunks(tmp_path, monkeypatch, causal):
    """A prompt fed in chunks attends every earlier block with a mask (or causality) per query:
    the bias of a gathered part, [B, Hq, Q, S], is built a chunk of queries at a time within the
    score budget, and the result is what one pass over every query gives (float64 reference)."""
    from kvdrive_compile.runtime import block_attention

    built = []
    row_bias = block_attention.row_bias

    def recorded(*args, **kwargs):
        bias = row_bias(*args, **kwargs)
        built.append(0 if bias is None else bias.numel() * 4)
        return bias

    budget = 3 * 2 * 8 * 4 * 100                       # ~3 queries' scores of [B=2, Hq=8] over ~100 keys
    monkeypatch.setattr(block_attention, "_SCORE_BYTES", budget)
    monkeypatch.setattr(block_attention, "row_bias", recorded)
    torch.manual_seed(1)
    batch, hkv, g, d, bs = 2, 2, 4, 16, 16
    block_bytes = bs * d * 2 * 4 * batch * hkv
    rt = KVRuntime(block_size=bs, device_memory=2 * block_bytes, host_memory=2 * block_bytes, disk_dir=str(tmp_path))
    session = rt.open_session()
    k_all = v_all = torch.zeros(batch, hkv, 0, d)
    for n in [21, 1, 13, 30, 1]:
        k_new, v_new = torch.randn(batch, hkv, n, d), torch.randn(batch, hkv, n, d)
        kv, past = append_new(rt, session, k_new, v_new)
        k_all, v_all = torch.cat([k_all, k_new], 2), torch.cat([v_all, v_new], 2)
        q = torch.randn(batch, hkv * g, n, d)
        if causal and n > 1:        # SDPA's convention: query i sees window column j <= i (top left);
            mask = None             # as in Hugging Face, a step of one query is not causal
            bias = torch.zeros(n, past + n).masked_fill(torch.ones(n, past + n, dtype=torch.bool).tril().logical_not(),
                                                        float("-inf"))
        else:
            mask = torch.rand(batch, 1, n, past + n) > 0.3
            mask[..., 0] = True
            bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        built.clear()
        out, _ = attend(rt, session, 0, q, past, n, k_new, v_new, mask, causal=causal and n > 1)
        torch.testing.assert_close(out.double(), reference(q, k_all, v_all, 0.125, bias), atol=1e-5, rtol=1e-5)
        if past and n > 3:
            assert len(built) > 2, "no gathered part was attended in query chunks: the test misses its case"
            assert max(built) <= budget
        budgets_ok(rt)
    tier, _ = kv.where()
    assert set(tier.reshape(-1).tolist()) == {Tier.DEVICE, Tier.HOST, Tier.DISK}
    rt.close()


@pytest.mark.parametrize("host_blocks", [1, 2, 3, 9, 10])
def test_no_device_tier_an_open_block_split_between_host_and_disk(tmp_path, host_blocks):
    """device_memory=0: every block, the open one included, gets its home at once, and where
    host memory runs out inside a block some rows' open block lies in host memory and the
    others' on disk. Each decode token is written into its own row's copy: not into the last
    host slot for a row that has none (another block's), nor a host slot number taken as a
    disk slot (a wrong answer and false checksum errors before this was fixed)."""
    torch.manual_seed(host_blocks)
    b, hkv, g, d, bs = 2, 2, 2, 8, 4
    rt = KVRuntime(block_size=bs, device_memory=0, host_memory=host_blocks * bs * d * 2 * 4, disk_dir=str(tmp_path))
    session = rt.open_session()
    k_all = v_all = torch.zeros(b, hkv, 0, d)
    split = False
    for n in [6] + [1] * 20:
        k_new, v_new = torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
        kv, past = append_new(rt, session, k_new, v_new)
        k_all, v_all = torch.cat([k_all, k_new], 2), torch.cat([v_all, v_new], 2)
        q = torch.randn(b, hkv * g, n, d)
        out, _ = attend(rt, session, 0, q, past, n, k_new, v_new)
        torch.testing.assert_close(out.double(), reference(q, k_all, v_all, 0.125), atol=1e-5, rtol=1e-5)
        if kv.length % bs:                      # the open block: homes of its rows on both tiers?
            split |= len(set(kv.home[:, kv.length // bs].tolist())) > 1
        budgets_ok(rt)
    assert split, "no open block was split between host and disk: the test misses its case"
    rt.close()


def test_a_mask_with_one_key_column_broadcasts_over_every_key(tmp_path):
    """A mask whose key axis has length 1 applies to every key, as SDPA broadcasts it (MiniMax's
    decode mask is built so); a mask over more than one key but fewer than the cache holds
    cannot be lined up with the cache and is refused."""
    torch.manual_seed(2)
    batch, hkv, g, d = 2, 2, 2, 16
    block_bytes = 16 * d * 2 * 4 * batch * hkv
    rt = KVRuntime(block_size=16, device_memory=2 * block_bytes, host_memory=2 * block_bytes,
                   disk_dir=str(tmp_path))
    session = rt.open_session()
    k_all = torch.randn(batch, hkv, 0, d)
    v_all = k_all.clone()
    for n in [70, 1, 1, 1]:
        k_new, v_new = torch.randn(batch, hkv, n, d), torch.randn(batch, hkv, n, d)
        kv, past = append_new(rt, session, k_new, v_new)
        k_all, v_all = torch.cat([k_all, k_new], 2), torch.cat([v_all, v_new], 2)
        q = torch.randn(batch, hkv * g, n, d)
        causal = torch.ones(n, past + n, dtype=torch.bool).tril(past)
        mask = causal.expand(batch, 1, n, past + n) if n > 1 else torch.randn(batch, 1, 1, 1)
        out, _ = attend(rt, session, 0, q, past, n, k_new, v_new, mask)
        bias = torch.zeros(batch, 1, n, past + n).masked_fill(~causal, float("-inf")) + (mask if n == 1 else 0)
        torch.testing.assert_close(out.double(), reference(q, k_all, v_all, 0.125, bias), atol=1e-5, rtol=1e-5)
    q = torch.randn(batch, hkv * g, 1, d)
    kv, past = append_new(rt, session, k_new, v_new)
    with pytest.raises(RuntimeError, match="masks fewer keys than it attends"):
        attend(rt, session, 0, q, past, 1, k_new, v_new, torch.zeros(batch, 1, 1, 2))
    rt.close()


def test_sessions_do_not_see_each_other():
    torch.manual_seed(1)
    rt = KVRuntime(block_size=8, device_memory=8 * 8 * 16 * 4 * 2, host_memory=8 * 8 * 16 * 4 * 2)
    sessions = [rt.open_session() for _ in range(2)]
    data = {}
    for step in range(6):
        for s in sessions:
            n = 20 if step == 0 else 1
            k, v = torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
            kv = rt.layer(s, 0, k, False)
            past = kv.length
            placement.append(rt, kv, k, v)
            ks, vs = data.get(s.id, (k[:, :, :0], v[:, :, :0]))
            data[s.id] = (torch.cat([ks, k], 2), torch.cat([vs, v], 2))
            q = torch.randn(1, 4, n, 16)
            out, _ = attend(rt, s, 0, q, past, n, k, v, causal=False)
            torch.testing.assert_close(out.double(), reference(q, *data[s.id], 0.125), atol=1e-5, rtol=1e-5)
    rt.release(sessions[0].id)
    with pytest.raises(RuntimeError, match="released"):
        rt.session(sessions[0].id)
    rt.close()


@pytest.mark.parametrize("device_memory", [None, 4 * 8 * 16 * 4 * 2])
def test_released_sessions_leave_nothing_alive(device_memory):
    """A long-lived runtime (no budget: nothing is ever evicted) must not keep the layers of
    released sessions, nor their block summaries, through its placement bookkeeping."""
    import gc
    import weakref

    rt = KVRuntime(block_size=8, device_memory=device_memory)
    refs = []
    for _ in range(3):
        s = rt.open_session()
        for layer in range(2):
            k = torch.randn(1, 2, 40, 16)
            kv = rt.layer(s, layer, k, False)
            placement.append(rt, kv, k, torch.randn_like(k))
            refs += [weakref.ref(kv), weakref.ref(kv.summaries)]
        rt.release(s.id)
        del s, kv
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    rt.close()


def test_prefill_is_causal_and_sliding_window_drops_blocks():
    torch.manual_seed(2)
    rt = KVRuntime(block_size=4, device_memory=4096, host_memory=4096)
    s = rt.open_session()
    window = 10
    k, v = torch.randn(1, 1, 23, 8), torch.randn(1, 1, 23, 8)
    kv = rt.layer(s, 0, k, keeps_last=True)
    placement.append(rt, kv, k, v)
    q = torch.randn(1, 2, 23, 8)
    out, _ = attend(rt, s, 0, q, 0, 23, k, v, causal=True)
    causal = torch.full((23, 23), float("-inf")).triu(1)
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.125, causal), atol=1e-5, rtol=1e-5)
    # the model keeps only the last window-1 tokens; the next step attends them and the new one
    k1, v1 = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    placement.drop_before(rt, kv, kv.length - (window - 1))
    assert kv.first == (23 - (window - 1)) // 4
    assert (kv.where()[0][:, :kv.first] == -1).all()
    placement.append(rt, kv, k1, v1)
    q1 = torch.randn(1, 2, 1, 8)
    out, _ = attend(rt, s, 0, q1, window - 1, 1, k1, v1)
    kw = torch.cat([k[:, :, -(window - 1):], k1], 2)
    vw = torch.cat([v[:, :, -(window - 1):], v1], 2)
    torch.testing.assert_close(out.double(), reference(q1, kw, vw, 0.125), atol=1e-5, rtol=1e-5)
    rt.close()


def test_disk_files_are_private_and_removed(tmp_path):
    rt = KVRuntime(block_size=16, device_memory=0, host_memory=0, disk_dir=str(tmp_path))
    s = rt.open_session()
    k = torch.randn(1, 2, 50, 16)
    kv = rt.layer(s, 0, k, False)
    placement.append(rt, kv, k, k)
    placement.place_fresh(rt, kv)
    assert (kv.where()[0] == Tier.DISK).all()
    assert list(tmp_path.iterdir()) == []                  # unlinked at creation: only the fd holds it
    (f,) = s.disk_files.values()
    assert stat.S_IMODE(os.fstat(f.fd).st_mode) == 0o600
    f.flush()                                              # the blocks' writes are asynchronous
    assert os.fstat(f.fd).st_size >= 50 * 2 * 16 * 4 * 2
    q = torch.randn(1, 2, 1, 16)
    out, _ = attend(rt, s, 0, q, 49, 1, k[:, :, -1:], k[:, :, -1:])
    torch.testing.assert_close(out.double(), reference(q, k, k, 0.125), atol=1e-5, rtol=1e-5)
    fd = f.fd
    rt.release(s.id)
    assert f.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)                                       # closed, which frees the unlinked file
    rt.close()
    assert list(tmp_path.iterdir()) == []


def test_budget_zero_device_still_exact():
    rt = KVRuntime(block_size=16, device_memory=0, host_memory=None)
    s = rt.open_session()
    k, v = torch.randn(2, 2, 33, 16), torch.randn(2, 2, 33, 16)
    kv = rt.layer(s, 0, k, False)
    placement.append(rt, kv, k, v)
    assert rt.budgets[Tier.DEVICE].peak == 0
    q = torch.randn(2, 4, 1, 16)
    out, _ = attend(rt, s, 0, q, 32, 1, k[:, :, -1:], v[:, :, -1:])
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.125), atol=1e-5, rtol=1e-5)
    rt.close()


def test_stand_ins_report_a_session_once_nothing_refers_to_it():
    """Each finalized stand-in checks only its own base and the bases a view kept alive; the
    session is reported unreferenced when the last stand-in is gone and no view holds a base."""
    import gc

    from kvdrive_compile.runtime.standins import StandInKey, StandIns

    released = []
    st = StandIns(released.append)
    like = torch.zeros(1, 2, 3, 4)
    a = st.make(StandInKey(7, 0, "k"), like, 5, 0)
    b = st.make(StandInKey(7, 0, "v"), like, 5, 0)
    window = a[:, :, 2:]                     # a sliding window's slice outlives its stand-in
    del a
    gc.collect()
    assert released == [] and st.lookup(window) == StandInKey(7, 0, "k")
    del b
    gc.collect()
    assert released == []                    # the slice still holds a's base
    c = st.make(StandInKey(7, 1, "k"), like, 6, 0)
    del window
    gc.collect()
    assert released == []                    # c is alive
    del c
    gc.collect()
    assert released == [7]
    assert st._bases == {} and st._keys == {}


def test_a_stand_in_dying_while_another_thread_holds_the_lock_does_not_wait_for_it():
    """Garbage is collected in whichever thread triggers it. A stand-in finalized while
    another thread holds the runtime's lock (a step) is queued, not waited for (waiting stalls
    that collection, and the step's own gc.collect() returns at once meanwhile); the next sweep
    accounts it and releases the session."""
    import threading

    rt = KVRuntime(block_size=8, device_memory=None, host_memory=None)
    session = rt.open_session()
    k = torch.randn(1, 2, 5, 16)
    kv = rt.layer(session, 0, k, keeps_last=False)
    placement.append(rt, kv, k, k)
    standin = rt.standins.make(StandInKey(session.id, 0, "k"), k, 5, 0)
    held, done = threading.Event(), threading.Event()

    def step():                                          # another thread's step holds the lock
        with rt.lock:
            held.set()
            done.wait(10)
    holder = threading.Thread(target=step)
    holder.start()
    held.wait(10)
    box = [standin]
    del standin

    def drop():
        box.clear()                                      # the last reference: finalized in this thread
    dropped = threading.Thread(target=drop)
    dropped.start()
    dropped.join(2)
    finished = not dropped.is_alive()
    done.set()
    holder.join(10)
    dropped.join(10)
    assert finished, "the finalizer waited for the lock another thread held"
    assert session.id in rt.sessions
    rt.sweep()
    assert session.id not in rt.sessions
    rt.close()


def test_stand_in_views_know_their_tokens_or_refuse():
    """A view of a stand-in stands for the tokens it selects along dim 2 (a tail slice: a
    sliding window; a head slice: a crop); any other view stands for nothing; and no view,
    nor the stand-in itself, gives its values to code that is not a kvdrive op."""
    from kvdrive_compile.runtime.standins import StandInKey, StandInReadError, StandIns, token_span

    st = StandIns(lambda sid: None)
    s = st.make(StandInKey(1, 0, "k"), torch.zeros(2, 3, 1, 4), 10, 30)     # tokens [30, 40)
    assert token_span(s) == (30, 10)
    assert token_span(s[:, :, -4:]) == (36, 4) and token_span(s[..., 2:5, :]) == (32, 3)
    assert token_span(s[:, :, :7]) == (30, 7) and token_span(s.narrow(2, 1, 2)) == (31, 2)
    assert token_span(s[:, :, -4:][:, :, 1:]) == (37, 3) and token_span(s.detach()) == (30, 10)
    for other in (s[:1], s[:, 1:], s[:, :, ::2], s[..., :2], s[:, :, None]):
        assert token_span(other) is None
    assert st.lookup(s[:, :, -4:]) == StandInKey(1, 0, "k")
    assert s.shape == (2, 3, 10, 4) and s.dtype == torch.float32 and s.dim() == 4
    for read in (lambda t: t + 1, lambda t: torch.cat([t, t], 2), lambda t: t.sum(), lambda t: t.clone(),
                 lambda t: t.float(), lambda t: t.index_select(0, torch.tensor([0])), lambda t: t.cpu()):
        with pytest.raises(StandInReadError, match="materialize"):
            read(s[:, :, -4:])


@pytest.mark.parametrize("seed", range(3))
def test_where_is_the_fastest_copy_of_each_block(seed):
    """LayerKV.where (one numba pass) against numpy: per (row, block) the device copy if any,
    else the host copy, else a disk home, else not held (-1), and that copy's slot, on fresh
    random state of which only the first num_blocks columns count."""
    import numpy as np

    from kvdrive_compile.runtime.layer_kv import LayerKV

    rng = np.random.default_rng(seed)
    kv = LayerKV(0, 0, 2, 3, 8, torch.float32, 16, torch.device("cpu"), length=16 * 37 + 5)
    kv.grow(50)
    shape = kv.dev.shape
    kv.dev[:] = np.where(rng.random(shape) < 0.3, rng.integers(0, 500, shape), -1)
    kv.host[:] = np.where(rng.random(shape) < 0.4, rng.integers(0, 500, shape), -1)
    kv.home[:] = rng.integers(-1, 3, shape)
    kv.home_slot[:] = rng.integers(0, 500, shape)
    kv.changed()
    tier, slot = kv.where()
    n = kv.num_blocks
    dev, host, home = kv.dev[:, :n], kv.host[:, :n], kv.home[:, :n]
    want = np.where(dev >= 0, 0, np.where(host >= 0, 1, np.where(home == 2, 2, -1)))
    assert tier.shape == slot.shape == (6, n) and np.array_equal(tier, want)
    assert np.array_equal(slot, np.where(dev >= 0, dev, np.where(host >= 0, host, kv.home_slot[:, :n])))


def test_flat_entries_name_each_rows_blocks_and_refuse_a_block_past_the_row():
    """``flat_entries`` (what the cache step, the tier counts and the pins read entries by)
    against 2-D indexing on fresh random data; a block id past the width would name the next
    row's entry, so it is refused."""
    import numpy as np

    from kvdrive_compile.runtime.layer_kv import flat_entries

    rng = np.random.default_rng(0)
    table = rng.integers(0, 1000, (5, 23))
    selected = np.sort(rng.integers(0, 23, (5, 7)), 1)
    assert np.array_equal(np.take(table, flat_entries(selected, 23)), table[np.arange(5)[:, None], selected])
    for bad in (23, -1):
        selected[2, 3] = bad
        with pytest.raises(IndexError, match="outside"):
            flat_entries(selected, 23)


@pytest.mark.parametrize("seed", range(4))
def test_tier_split_matches_a_stable_sort_by_tier(seed):
    """layer_kv.tier_part (one numba pass) against the torch reference: per row the selected
    blocks of the tier first, in their order, then the others as padding (valid False, slot 0),
    cut to the longest row; None where no row has one. Each row's blocks lie on their own tiers;
    dropped blocks (tier -1) belong to none."""
    from types import SimpleNamespace

    from kvdrive_compile.runtime.layer_kv import tier_part

    gen = torch.Generator().manual_seed(seed)
    rows, nblocks, n = 5, 40, 12
    tiers = torch.randint(-1, 3 if seed else 2, (rows, nblocks), generator=gen)     # seed 0: no disk block
    slots = torch.randint(0, 1000, (rows, nblocks), generator=gen)
    selected = torch.stack([torch.randperm(nblocks, generator=gen)[:n].sort().values for _ in range(rows)])
    kv = SimpleNamespace(table=lambda: (tiers, slots))
    for tier in Tier:
        in_tier = tiers.gather(1, selected) == tier
        m = int(in_tier.sum(1).max())
        got = tier_part(kv, selected, tier)
        if m == 0:
            assert got is None
            continue
        order = torch.argsort((~in_tier).to(torch.int8), dim=1, stable=True)[:, :m]
        ids, valid = selected.gather(1, order), in_tier.gather(1, order)
        assert torch.equal(got.ids, ids) and torch.equal(got.valid, valid)
        assert torch.equal(got.slots, torch.where(valid, slots.gather(1, ids), 0))
    with pytest.raises(IndexError, match="outside"):
        tier_part(kv, torch.full((rows, 1), nblocks), Tier.DEVICE)


def test_decode_kernels_load_in_the_background_at_runtime_creation():
    """A fresh process: creating a runtime starts loading the numba kernels only decode steps
    run, on a thread of its own (a prefill hides it; the first ranking decode step waited ~0.5 s)."""
    code = ("from kvdrive_compile.kernels import block_scores\n"
            "from kvdrive_compile.runtime import layer_kv, kv_runtime\n"
            "assert not block_scores._top_blocks.signatures and not block_scores._log_mass.signatures\n"
            "assert not layer_kv._split_by_tier.signatures\n"
            "rt = kv_runtime.KVRuntime()\n"
            "[t] = kv_runtime._kernel_loading\n"                     # started by the runtime, once
            "assert t.name == 'kvdrive-kernel-load' and t is kv_runtime.load_kernels_in_background()\n"
            "t.join(300)\n"
            "assert block_scores._top_blocks.signatures and block_scores._log_mass.signatures and layer_kv._split_by_tier.signatures\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
