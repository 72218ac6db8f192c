"""The overlapped decode step: the CPU part runs on a worker while the device part runs, disk
reads start layers ahead of need, the scheduling pass orders the ops, and the timeline shows it."""
import json
import sys
import time
from pathlib import Path

import pytest
import torch

import kvdrive_compile
from kvdrive_compile.runtime import placement, site_step
from kvdrive_compile.runtime import trace as timeline
from kvdrive_compile.runtime.kv_runtime import KVRuntime
from kvdrive_compile.runtime.selection import SelectionPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import handwritten_model as hm  # noqa: E402

# reuse_bonus=0: blocks ranked by their estimates alone, so that tiered runs must give the tokens
# of the all-device run (the default bonus lets where blocks lie steer the selection on purpose;
# test_the_reuse_bonus_gives_the_same_tokens_scheduled_or_not checks it on its own)
SPARSE = {"token_budget": 64, "sink_tokens": 0, "local_window": 16, "dense_layers": 0, "reuse_bonus": 0}
TIERS = {"device_memory": "96KiB", "host_memory": "64KiB"}     # about a third of the KV on each tier


STEPS = 6


@pytest.fixture(scope="module")
def tiny():
    """The example's hand-written model, a batch of 2 prompts, and its greedy tokens with all KV
    on the device at the sparse budget (the reference every placement must give)."""
    torch.manual_seed(0)
    model = hm.TinyLM(hm.TinyConfig()).eval()
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(1))
    return model, ids, generate(model, ids, STEPS, **SPARSE)


@torch.no_grad()
def generate(model, ids, steps, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="kvdrive", options=options)
    out = hm.greedy(compiled, model, ids, steps)
    kvdrive_compile.release_all()
    return out


def test_host_and_device_parts_run_concurrently(monkeypatch):
    """A deliberately slow CPU kernel and a slow device kernel (0.3 s each): the layer's step
    takes about the longer of the two, not their sum."""
    slow = 0.3

    def slowed(kernel):
        def run(*args, **kwargs):
            time.sleep(slow)
            return kernel(*args, **kwargs)
        return run

    monkeypatch.setattr(site_step, "cpu_partial_attention", slowed(site_step.cpu_partial_attention))
    monkeypatch.setattr(site_step, "paged_attention", slowed(site_step.paged_attention))
    rt = KVRuntime(block_size=16, device_memory=48 << 10, host_memory=None, async_cpu=True)
    policy = SelectionPolicy(token_budget=None, sink_tokens=0, local_window=0)
    session = rt.open_session()
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 400, 32, generator=g), torch.randn(1, 2, 400, 32, generator=g)
    kv = rt.layer(session, 0, k, keeps_last=False)
    placement.append(rt, kv, k, v)
    site_step.end_plan(rt, session, site_step.select(rt, session, 0, 0, 400, torch.randn(1, 4, 400, 32), policy))
    k1, v1 = torch.randn(1, 2, 1, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g)
    placement.append(rt, kv, k1, v1)
    q = torch.randn(1, 4, 1, 32, generator=g)
    pid = site_step.select(rt, session, 0, 400, 1, q, policy)
    plan = session.plans[pid]
    assert plan.part(site_step.Tier.HOST) is not None and plan.part(site_step.Tier.DEVICE) is not None
    site_step.prefetch(rt, plan)
    mask = site_step.step_mask(plan, None, False)
    t0 = time.perf_counter()
    site_step.start_host_attention(rt, plan, q, mask, 1.0)
    device = site_step.device_attention(rt, plan, q, k1, v1, mask, 1.0)
    host = site_step.finish_host_attention(rt, plan, q)
    wall = time.perf_counter() - t0
    out = site_step.merge([device, host], torch.float32)
    site_step.end_plan(rt, session, pid)
    assert wall < 2 * slow - 0.1, f"the two parts did not overlap: {wall:.3f} s for two {slow} s parts"
    kk, vv = torch.cat([k, k1], 2).repeat_interleave(2, 1), torch.cat([v, v1], 2).repeat_interleave(2, 1)
    ref = torch.softmax(q @ kk.transpose(-1, -2), -1) @ vv
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert rt.background_seconds["cpu_attention"] >= slow
    rt.close()


def test_the_reuse_bonus_gives_the_same_tokens_scheduled_or_not(tiny, monkeypatch):
    """With the default reuse_bonus, where blocks lie steers the selection: the same tiers give
    the same tokens with and without the scheduling pass, and the bonus served more of the
    selected blocks from the device than ranking by the estimates alone did."""
    model, ids, _ = tiny
    bonus = {**SPARSE, "reuse_bonus": 2.0}

    def device_share(options):                  # of the blocks this run's steps selected (the runtime is shared)
        try:
            before = dict(kvdrive_compile.stats({**options, **TIERS}).served)
        except KeyError:                        # no runtime for these options yet
            before = {}
        out = generate(model, ids, STEPS, **options, **TIERS)
        after = kvdrive_compile.stats({**options, **TIERS}).served
        served = {tier: after[tier] - before.get(tier, 0) for tier in after}
        return out, served["device"] / sum(served.values())

    out, hit = device_share(bonus)
    _, plain = device_share(SPARSE)
    assert hit > plain, (hit, plain)
    from kvdrive_compile import backend
    from kvdrive_compile.passes.schedule import ScheduleSites
    unscheduled = [p for p in backend.default_passes() if not isinstance(p, ScheduleSites)]
    monkeypatch.setattr(backend, "default_passes", lambda: unscheduled)
    assert torch.equal(out, generate(model, ids, STEPS, **bonus, **TIERS))


def test_scheduled_graph_and_ahead_reads_give_the_same_tokens(tiny, monkeypatch):
    """prefetch_depth 0 (no lookahead) and 3, and the graph without the scheduling pass: the
    same greedy tokens as all KV on the device, at the same token budget; reads issued ahead
    were taken by the steps."""
    model, ids, ref = tiny
    for depth, worker in ((0, False), (3, True)):
        out = generate(model, ids, STEPS, **SPARSE, **TIERS, prefetch_depth=depth, cpu_worker=worker)
        assert torch.equal(ref, out), depth
    st = kvdrive_compile.stats({**SPARSE, **TIERS, "prefetch_depth": 3, "cpu_worker": True})
    assert st.prefetch["landed"] + st.prefetch["in_flight"] > 0, st.prefetch
    assert 0 < st.prefetch_hit_rate <= 1
    from kvdrive_compile import backend
    from kvdrive_compile.passes.schedule import ScheduleSites
    unscheduled = [p for p in backend.default_passes() if not isinstance(p, ScheduleSites)]
    monkeypatch.setattr(backend, "default_passes", lambda: unscheduled)
    assert torch.equal(ref, generate(model, ids, STEPS, **SPARSE, **TIERS, cache_policy="lru"))


def test_ahead_reads_take_complete_blocks_only(tiny, monkeypatch):
    """No device or host budget: every block lives on disk, the open one too (each step writes
    its token into it in place). Ahead reads never name the open block (such a read raced that
    write and raised KVIntegrityError now and then) and the tokens stay exact."""
    model, ids, _ = tiny
    ref = generate(model, ids, STEPS, token_budget=None)
    open_named, real = [], site_step.prefetch_ahead

    def recorded(rt, session, layer):
        real(rt, session, layer)
        kv = session.layers.get(layer)
        if kv is not None and kv.ahead is not None:
            open_named.append(bool((kv.ahead.blocks >= kv.length // kv.block_size).any()))

    monkeypatch.setattr(site_step, "prefetch_ahead", recorded)
    out = generate(model, ids, STEPS, token_budget=None, device_memory=0, host_memory=0, prefetch_depth=2)
    assert torch.equal(out, ref)
    assert open_named and not any(open_named)


def test_timeline_of_a_generation(tiny, tmp_path):
    """The trace option writes Chrome Trace Event Format: complete events of every stage with
    step, phase and layer, one tid per thread, and decode steps where work of different threads
    overlaps."""
    model, ids, ref = tiny
    path = tmp_path / "steps.json"
    assert torch.equal(ref, generate(model, ids, STEPS, **SPARSE, **TIERS, trace=str(path), cpu_worker=True))
    assert str(path) in kvdrive_compile.flush_traces()
    data = json.loads(path.read_text())
    events = [e for e in data["traceEvents"] if e["ph"] == "X"]
    names = {e["tid"]: e["args"]["name"] for e in data["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    for e in events:
        assert e["cat"] == "kvdrive" and e["dur"] >= 0 and e["ts"] >= 0 and isinstance(e["pid"], int)
    stages = {e["name"] for e in events}
    for stage in ("append", "select", "plan", "prefetch_ahead", "prefetch", "cpu_start", "cpu_attention",
                  "device_attention", "cpu_wait", "merge", "disk_read", "disk_write", "io_wait"):
        assert stage in stages, (stage, stages)
    assert any(n.startswith("kvdrive-io") for n in names.values())
    assert any(n.startswith("kvdrive-cpu-attention") for n in names.values())
    for e in events:                     # every event belongs to a step; all but a step's opening to a layer
        assert {"step", "phase"} <= set(e["args"]), e
        assert "layer" in e["args"] or e["name"] == "append", e
        if e["name"] in ("disk_read", "disk_write"):
            assert e["args"]["bytes"] > 0, e
    decode = [e for e in events if e["args"].get("phase") == "decode"]
    overlapping = 0
    by_step = {}
    for e in decode:
        by_step.setdefault(e["args"]["step"], []).append(e)
    for evs in by_step.values():
        evs.sort(key=lambda e: e["ts"])
        overlapping += any(a["tid"] != b["tid"] and b["ts"] < a["ts"] + a["dur"]
                           for i, a in enumerate(evs) for b in evs[i + 1:])
    assert overlapping >= len(by_step) // 2, (overlapping, len(by_step))
    summary = timeline.summarize(events, data["otherData"])
    assert summary["decode"]["steps"] == len(by_step) and summary["overlap"]["stage_sum_over_wall"] > 0
    opens = [e for e in decode if timeline.CPU_MS in e["args"]]          # each decode step's opening samples the CPU time
    assert len(opens) == len(by_step) and all(e["name"] == "append" for e in opens)
    assert 0 < summary["overlap"]["cores_busy"] and summary["cpu_count"] >= 1
    counters = [e for e in data["traceEvents"] if e["ph"] == "C"]
    assert counters and all(e["name"] == "cores busy" and e["args"]["cores"] >= 0 for e in counters)
    from kvdrive_compile import cli
    assert cli.main(["trace", "summary", str(path)]) == 0


def test_a_failed_cpu_part_fails_the_step_and_frees_the_session(tiny, monkeypatch):
    """An error in the CPU part (on the worker) is raised at the merge, the generation's KV is
    released, and the next generation is exact."""
    model, ids, ref = tiny
    calls = {"n": 0}
    real = site_step.host_attention

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("injected CPU-part failure")
        return real(*args)

    monkeypatch.setattr(site_step, "host_attention", failing)
    with pytest.raises(OSError, match="injected"):
        generate(model, ids, STEPS, **SPARSE, **TIERS, cpu_worker=True)
    assert kvdrive_compile.collect() == 0
    monkeypatch.setattr(site_step, "host_attention", real)
    assert torch.equal(ref, generate(model, ids, STEPS, **SPARSE, **TIERS))


def test_ahead_reads_are_taken_only_for_the_blocks_they_hold(tmp_path):
    """Every disk block read ahead is taken by the step that selects it (no byte read twice);
    an entry whose slot no longer holds the block it was read for (a slot reused) is read again,
    never attended; the answer is exact throughout."""
    torch.manual_seed(3)
    d, rows = 32, 2
    block = 16 * d * 2 * 4 * rows
    rt = KVRuntime(block_size=16, device_memory=8 * block, host_memory=2 * block, disk_dir=str(tmp_path),
                   cache_policy="none")
    policy = SelectionPolicy(token_budget=None, sink_tokens=0, local_window=0)
    session = rt.open_session()
    k_all, v_all = torch.zeros(1, rows, 0, d), torch.zeros(1, rows, 0, d)
    for i, n in enumerate([200, 1, 1, 1, 1]):
        session.phase = "prefill" if i == 0 else "decode"
        k, v = torch.randn(1, rows, n, d), torch.randn(1, rows, n, d)
        kv = rt.layer(session, 0, k, keeps_last=False)
        site_step.prefetch_ahead(rt, session, 0)
        if i == 3:                                   # as if a slot had been given to another block since
            kv.ahead.rows[::2] = (kv.ahead.rows[::2] + 1) % rows
        before = dict(rt.prefetch)
        past = kv.length
        placement.append(rt, kv, k, v)
        k_all, v_all = torch.cat([k_all, k], 2), torch.cat([v_all, v], 2)
        q = torch.randn(1, 4, n, d)
        pid = site_step.select(rt, session, 0, past, n, q, policy)
        plan = session.plans[pid]
        site_step.prefetch(rt, plan)
        mask = site_step.step_mask(plan, None, n > 1)
        site_step.start_host_attention(rt, plan, q, mask, 0.125)
        device = site_step.device_attention(rt, plan, q, k, v, mask, 0.125)
        out = site_step.merge([device, site_step.finish_host_attention(rt, plan, q)], torch.float32)
        site_step.end_plan(rt, session, pid)
        kk, vv = k_all.repeat_interleave(2, 1), v_all.repeat_interleave(2, 1)
        s = q @ kk.transpose(-1, -2) * 0.125
        if n > 1:
            s = s + torch.full((n, past + n), float("-inf")).triu(past + 1)
        torch.testing.assert_close(out, torch.softmax(s, -1) @ vv, atol=1e-5, rtol=1e-5)
        got = {k: rt.prefetch[k] - before[k] for k in before}
        if i in (2, 4):                              # every disk miss was read ahead (exact: all selected)
            assert got["missed"] == 0 and got["landed"] + got["in_flight"] > 0 and got["unused"] == 0, got
        if i == 3:                                   # the tampered half is read again, not taken
            assert got["missed"] > 0 and got["landed"] + got["in_flight"] > 0, got
    rt.close()
