"""The schedule pass on hand-made FX graphs of the rewrite's site form: ahead-reads issued
``prefetch_depth`` layers early, reads and CPU parts as soon as their inputs allow, everything
else in its order, the same values computed; graphs it does not recognise left alone."""
import operator

import pytest
import torch
import torch.fx

from kvdrive_compile.passes.dump import GraphDumper, render_summary, summarize
from kvdrive_compile.passes.pass_manager import PassContext, PassManager
from kvdrive_compile.passes.schedule import ScheduleSites, _check, _kind, _snapshot, find_sites


class Op:
    """Stands for ``torch.ops.kvdrive.<name>.default`` in a hand-made graph: its str is the
    op's (how the pass recognises kvdrive ops), calling it runs a small real function."""

    def __init__(self, name, fn):
        self.op_name, self.fn = name, fn
        self.__name__ = f"kvdrive_{name}"               # for FX's generated code
        self.__module__ = __name__

    def __call__(self, *args):
        return self.fn(*args)

    def __str__(self):
        return f"kvdrive.{self.op_name}.default"


OPEN_STEP = Op("open_step", lambda past, x: past.sum() + x.sum())
APPEND = Op("append", lambda step, past, x, layer: (x, x, step + layer))
AHEAD = Op("prefetch_ahead", lambda step, after, layer: step * 2 + layer)       # `after`: order only
SELECT = Op("select", lambda ticket, q: ticket + q.mean())
PREFETCH = Op("prefetch", lambda sel, ahead: sel + ahead)
PREFETCH_OLD = Op("prefetch", lambda sel: sel * 1)
HOST = Op("host_attention", lambda plan, q: q * plan)
CPU_PARTIAL = Op("cpu_partial_attention", lambda plan, q: (q * plan, q.sum(-1)))
SPARSE = Op("sparse_attention", lambda plan, q: (q + plan, torch.sigmoid(q)))
MERGE = Op("merge", lambda host, q, out, lse: host + out * lse)
MERGE_OLD = Op("merge", lambda plan, q, out_d, lse_d, out_h, lse_h: out_h + out_d * lse_d)


def build(n_sites, *, inplace_before=None, old_form=False):
    """A decode graph of ``n_sites`` layers as the rewrite emits them (``old_form``: the rewrite
    before prefetch_ahead / host_attention). ``inplace_before=k``: ``buf.add_(1)`` right before
    site k, with layer k reading ``buf`` afterwards."""
    g = torch.fx.Graph()
    x, past, buf = g.placeholder("x"), g.placeholder("past"), g.placeholder("buf")
    step = g.call_function(OPEN_STEP, (past, x), name="kv_step")
    for l in range(n_sites):
        if inplace_before == l:
            g.create_node("call_method", "add_", (buf, 1.0), name="buf_add_")
        q = g.call_function(operator.mul, (x, float(l + 1)), name=f"q_l{l}")
        if inplace_before == l:
            q = g.call_function(operator.add, (q, buf), name=f"q_buf_l{l}")
        app = g.call_function(APPEND, (step, past, q, l), name=f"kv_append_l{l}")
        ticket = g.call_function(operator.getitem, (app, 2), name=f"kv_ticket_l{l}")
        if old_form:
            sel = g.call_function(SELECT, (ticket, q), name=f"selection_l{l}")
            plan = g.call_function(PREFETCH_OLD, (sel,), name=f"plan_l{l}")
            host = g.call_function(CPU_PARTIAL, (plan, q), name=f"host_part_l{l}")
            dev = g.call_function(SPARSE, (plan, q), name=f"device_part_l{l}")
            items = [g.call_function(operator.getitem, (n, i), name=f"{w}_{v}_l{l}")
                     for n, w in ((dev, "device"), (host, "host")) for i, v in enumerate(("out", "lse"))]
            att = g.call_function(MERGE_OLD, (plan, q, *items), name=f"attention_l{l}")
        else:
            ahead = g.call_function(AHEAD, (step, step, l), name=f"ahead_l{l}")
            sel = g.call_function(SELECT, (ticket, q), name=f"selection_l{l}")
            plan = g.call_function(PREFETCH, (sel, ahead), name=f"plan_l{l}")
            host = g.call_function(HOST, (plan, q), name=f"host_part_l{l}")
            dev = g.call_function(SPARSE, (plan, q), name=f"device_part_l{l}")
            out = g.call_function(operator.getitem, (dev, 0), name=f"device_out_l{l}")
            lse = g.call_function(operator.getitem, (dev, 1), name=f"device_lse_l{l}")
            att = g.call_function(MERGE, (host, q, out, lse), name=f"attention_l{l}")
        x = g.call_function(operator.add, (x, att), name=f"hidden_l{l}")
    g.output((x, buf))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def inputs():
    torch.manual_seed(0)
    return torch.randn(2, 3), torch.randn(4), torch.randn(2, 3)


def run_pass(gm, depth):
    ctx = PassContext(runtime_id=0, prefetch_depth=depth)
    ScheduleSites().run(gm, ctx)
    return ctx


def names(gm):
    return [n.name for n in gm.graph.nodes]


def late(gm, depth):
    """The nodes the pass must keep in order: all but ahead (when depth > 0), plan and host."""
    early = ("plan_", "host_part_") + (("ahead_",) if depth > 0 else ())
    return [n for n in names(gm) if not n.startswith(early)]


def call(gm):
    x, past, buf = inputs()
    return gm(x, past, buf)


def test_depth_two_issues_each_ahead_read_two_layers_early():
    gm = build(5)
    ref, old_late = call(gm), late(gm, 2)
    ctx = run_pass(gm, 2)
    order = names(gm)
    node = {n.name: n for n in gm.graph.nodes}
    for k in range(5):
        after = f"plan_l{k - 2}" if k >= 2 else "kv_step"
        assert node[f"ahead_l{k}"].args[1] is node[after]
        between = order[order.index(after) + 1:order.index(f"ahead_l{k}")]
        assert all(n.startswith("ahead_l") for n in between), (k, between)
        if k >= 2:
            assert between == []
        i = order.index
        assert i(f"plan_l{k}") < i(f"host_part_l{k}") < i(f"device_part_l{k}") < i(f"attention_l{k}")
    assert late(gm, 2) == old_late
    gm.graph.lint()
    for a, b in zip(call(gm), ref):
        torch.testing.assert_close(a, b)
    s = ctx.schedule
    assert s["depth"] == 2 and s["sites"] == 5 and s["moved"] == 5
    assert [r["layers_ahead"] for r in s["layers"]] == [0, 1, 2, 2, 2]
    assert [r["ahead_after"] for r in s["layers"]] == ["kv_step", "kv_step", "plan_l0", "plan_l1", "plan_l2"]
    for r in s["layers"]:
        assert order[r["ahead"]] == f"ahead_l{r['layer']}"
        assert r["ahead"] < r["select"] < r["prefetch"] < r["host_start"] < r["device_start"] < r["merge"]


def test_depth_zero_changes_nothing():
    gm = build(5)
    before, code = names(gm), gm.code
    ctx = run_pass(gm, 0)
    assert names(gm) == before and gm.code == code
    assert ctx.schedule["moved"] == 0 and [r["layers_ahead"] for r in ctx.schedule["layers"]] == [0] * 5
    assert all(r["ahead_after"] == "kv_step" for r in ctx.schedule["layers"])


def test_host_part_moved_before_device_part_even_at_depth_zero():
    gm = build(2)
    node = {n.name: n for n in gm.graph.nodes}
    node["device_lse_l1"].append(node["host_part_l1"])          # a CPU part started late
    gm.recompile()
    ref = call(gm)
    run_pass(gm, 0)
    order = names(gm)
    assert order.index("host_part_l1") == order.index("plan_l1") + 1
    for a, b in zip(call(gm), ref):
        torch.testing.assert_close(a, b)


def test_inplace_op_stays_in_place():
    gm = build(5, inplace_before=1)
    ref, old = call(gm), names(gm)
    run_pass(gm, 2)
    order = names(gm)
    # without the in-place op ahead_l1 would follow kv_step and ahead_l2 plan_l0; neither may
    # cross buf.add_, so both are issued right after it
    i = order.index("buf_add_")
    assert order[i + 1:i + 3] == ["ahead_l1", "ahead_l2"] and order.index("ahead_l0") < i
    kvdrive = [n.name for n in gm.graph.nodes if _kind(n) is not None]
    for k in kvdrive:
        assert (old.index(k) < old.index("buf_add_")) == (order.index(k) < order.index("buf_add_")), k
    for a, b in zip(call(gm), ref):
        torch.testing.assert_close(a, b)


def test_graph_without_kvdrive_ops_is_unchanged():
    def f(x, y):
        y.mul_(2)
        return torch.relu(x) + y, x.sum()
    gm = torch.fx.symbolic_trace(f)
    before, code = names(gm), gm.code
    ctx = run_pass(gm, 3)
    assert names(gm) == before and gm.code == code
    assert ctx.schedule["sites"] == 0 and ctx.schedule["layers"] == []


def test_older_rewrite_form_is_left_alone():
    gm = build(3, old_form=True)
    ref, before, code = call(gm), names(gm), gm.code
    ctx = run_pass(gm, 2)
    assert names(gm) == before and gm.code == code
    assert ctx.schedule["sites"] == 0 and ctx.schedule["unscheduled_selects"] == 3
    for a, b in zip(call(gm), ref):
        torch.testing.assert_close(a, b)


def test_changed_arguments_are_caught():
    gm = build(2)
    sites, _ = find_sites(gm.graph)
    before, old = _snapshot(gm.graph), list(gm.graph.nodes)
    sites[1].host.update_arg(1, sites[0].host.args[1])           # computes something else
    with pytest.raises(AssertionError, match="arguments of host_part_l1 changed"):
        _check(gm.graph, before, old, {}, {})


def test_negative_depth_refused():
    with pytest.raises(ValueError, match="prefetch_depth"):
        run_pass(build(1), -1)


def test_dump_renders_the_schedule(tmp_path):
    gm = build(3)
    ctx = PassContext(runtime_id=0, prefetch_depth=1, dump_dir=str(tmp_path))
    PassManager([ScheduleSites()]).run(gm, ctx)
    text = render_summary(summarize(ctx))
    assert "schedule (prefetch_depth=1)" in text and "host < device < merge" in text
    rows = [line.split() for line in text.splitlines() if line.split()[:2] in (["1", "plan_l0"], ["2", "plan_l1"])]
    assert len(rows) == 2 and all(r[2] == "1" for r in rows)
    files = sorted(p.name for p in (tmp_path / "graph000").iterdir())
    assert files == ["01.schedule.after.py", "01.schedule.before.py", "summary.json", "summary.txt"]
    assert "schedule (prefetch_depth=1)" in (tmp_path / "graph000" / "summary.txt").read_text()
    assert render_summary(summarize(PassContext(runtime_id=0))).count("schedule") == 0
    assert GraphDumper(None, 0).dir is None


def test_compiled_model_is_scheduled_and_token_identical(tmp_path):
    """A small hand-written model (3 layers) through the whole backend at prefetch_depth=2: each graph's
    summary says where every layer's ahead-read went, and the tokens are eager's."""
    import json
    import sys
    from pathlib import Path

    from kvdrive_compile import backend

    if not any(isinstance(p, ScheduleSites) for p in backend.default_passes()):
        pytest.skip("the schedule pass is not registered in default_passes() yet")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import handwritten_model as hm

    torch.manual_seed(0)
    model = hm.TinyLM(hm.TinyConfig(layers=3)).eval()
    ids = torch.randint(0, model.cfg.vocab, (2, 60))
    eager = hm.greedy(model.forward, model, ids, 2)
    compiled = torch.compile(model.forward, backend="kvdrive",
                             options={"device_memory": "320KiB", "host_memory": "64KiB", "prefetch_depth": 2,
                                      "dump_dir": str(tmp_path)})
    assert torch.equal(hm.greedy(compiled, model, ids, 2), eager)
    graphs = sorted(tmp_path.iterdir())
    assert len(graphs) == 2                                      # prefill and decode
    for g in graphs:
        schedule = json.loads((g / "summary.json").read_text())["schedule"]
        assert schedule["depth"] == 2 and schedule["sites"] == 3
        layers = schedule["layers"]
        assert [r["layer"] for r in layers] == [0, 1, 2]
        assert [r["layers_ahead"] for r in layers] == [0, 1, 2]
        assert layers[0]["ahead_after"].startswith("kv_step") and layers[1]["ahead_after"].startswith("kv_step")
        assert layers[2]["ahead_after"] == "plan_l0"
        for r in layers:
            assert r["ahead"] < r["select"] < r["prefetch"] < r["host_start"] < r["device_start"] < r["merge"]
        after = next(g.glob("*.schedule.after.py")).read_text()
        assert "prefetch_ahead.default(kv_step_l0, plan_l0, 2)" in after
        assert "schedule (prefetch_depth=2)" in (g / "summary.txt").read_text()
