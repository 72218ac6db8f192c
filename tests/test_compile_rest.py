"""compile_rest="inductor": the rest of each rewritten graph compiled by Inductor, the kvdrive ops
kept opaque. Each op runs exactly once per call, in the scheduled order (the runtime's own
timeline says which ran when), stand-ins still reach only kvdrive ops, the tokens are eager's, and
a graph Inductor cannot compile runs eagerly with one warning."""
import collections
import logging
import os
import sys

import pytest
import torch

import kvdrive_compile
from exactness import open_sessions
from kvdrive_compile.runtime import trace as timeline
from test_standin_guard import BUDGETS, WindowSliceAttention, tiny_lm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import handwritten_model as hw  # noqa: E402

# the timeline events each kvdrive op records on the calling thread (open_step's is an "append"
# without a layer); I/O, the cache policy's "plan" and the CPU worker run on other threads or nest.
# The merge op's first: "cpu_wait" (waiting for the worker's CPU part, or none to wait for), or
# "cpu_attention" where it runs the CPU part deferred to it (inline, the default on a CPU)
OP_EVENTS = {"append", "prefetch_ahead", "select", "prefetch", "cpu_start", "device_attention", "cpu_wait", "merge"}
MERGE_RUNS_CPU_PART = "cpu_attention"


def op_calls(path: str) -> list[tuple]:
    """(event, layer, step) of every kvdrive op the main thread ran, in the order they ended (the
    merge's inline CPU part named as its wait)."""
    events, _ = timeline.load(path)
    return [("cpu_wait" if e.name == MERGE_RUNS_CPU_PART else e.name, e.args.get("layer"), e.args.get("step"))
            for e in timeline.complete_events(events)
            if e.tid == 0 and e.name in OP_EVENTS | {MERGE_RUNS_CPU_PART}]


def generate(model, ids, steps, tmp_path, compile_rest, **options):
    """Greedy tokens of the hand-written model compiled with kvdrive, and its ops' calls."""
    path = str(tmp_path / f"{compile_rest}.json")
    compiled = torch.compile(model.forward, backend="kvdrive",
                             options=dict(options, compile_rest=compile_rest, trace=path))
    tokens = hw.greedy(compiled, model, ids, steps)
    kvdrive_compile.flush_traces()
    return tokens, op_calls(path)


def test_ops_run_once_each_in_the_scheduled_order(tmp_path):
    """KV on all three tiers and ahead-of-need reads two layers early (the schedule pass moves
    them): Inductor's graph calls the ops exactly as the eager graph does, and its tokens are eager's."""
    torch.manual_seed(0)
    model = hw.TinyLM(hw.TinyConfig()).eval()
    ids = torch.randint(0, model.cfg.vocab, (2, 100), generator=torch.Generator().manual_seed(1))
    ref = hw.greedy(model.forward, model, ids, 6)
    options = dict(device_memory="160KiB", host_memory="48KiB", prefetch_depth=2, token_budget=None)
    eager_tokens, eager_calls = generate(model, ids, 6, tmp_path, "eager", **options)
    tokens, calls = generate(model, ids, 6, tmp_path, "inductor", **options)
    c = kvdrive_compile.counters
    assert c.inductor_graphs == 2 and c.inductor_fallbacks == 0, c
    assert torch.equal(tokens, ref) and torch.equal(eager_tokens, ref)
    assert calls == eager_calls
    assert kvdrive_compile.stats().moved_bytes["disk->host"] > 0        # the inductor run's runtime
    opened = [call for call in calls if call[:2] == ("append", None)]        # open_step: once per call
    by_site = collections.defaultdict(list)
    for name, layer, step in calls:
        if layer is not None:
            by_site[(layer, step)].append(name)
    assert len(by_site) == 3 * len(opened) == 3 * 6
    assert all(sorted(names) == sorted(OP_EVENTS) for names in by_site.values()), by_site
    # the first decode step's ops after its opening (open_step's "append", without a layer)
    first = [(name, layer) for name, layer, step in calls if step == 2 and layer is not None][:6]
    assert first == [("prefetch_ahead", 0), ("prefetch_ahead", 1), ("append", 0), ("select", 0), ("prefetch", 0),
                     ("prefetch_ahead", 2)], first                          # layer 2's read issued 2 layers ahead
    assert open_sessions() == 0, "Inductor's graph kept a stand-in alive"
    assert torch._functorch.config.check_custom_op_aliasing, "the setting kvdrive turns off per call stayed off"


def test_standins_reach_only_kvdrive_ops(caplog):
    """A decode step that slices the cache (a window) and attends it with code the passes do not
    rewrite: the slice becomes kvdrive::standin_tail and the attention reads kvdrive::materialize's
    real K/V, in Inductor's graph too."""
    model = tiny_lm(WindowSliceAttention)
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(3))
    eager = hw.greedy(model.forward, model, ids, 6)
    compiled = torch.compile(model.forward, backend="kvdrive",
                             options={"token_budget": None, "compile_rest": "inductor", **BUDGETS})
    with caplog.at_level("WARNING"):
        ours = hw.greedy(compiled, model, ids, 6)
    assert torch.equal(eager, ours), (eager.tolist(), ours.tolist())
    assert any("gathered from the runtime" in r.getMessage() for r in caplog.records)
    c = kvdrive_compile.counters
    assert c.inductor_graphs == c.graphs and c.inductor_fallbacks == 0, c
    assert open_sessions() == 0


def test_a_graph_inductor_cannot_compile_runs_eagerly_with_one_warning(caplog):
    """No working C++ compiler (and no cached kernels to fall back on): the graph warns once, is
    counted, and runs eagerly, exactly."""
    torch.manual_seed(0)
    model = hw.TinyLM(hw.TinyConfig(layers=1)).eval()
    ids = torch.randint(0, model.cfg.vocab, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, _ = model(ids, model.empty_cache(1))
        compiled = torch.compile(model.forward, backend="kvdrive", options={"compile_rest": "inductor"})
        no_compiler = {"cpp.cxx": ("/nonexistent/kvdrive-test-c++",), "fx_graph_cache": False}
        with torch._inductor.config.patch(no_compiler), torch._functorch.config.patch(enable_autograd_cache=False), \
                caplog.at_level(logging.WARNING, logger="kvdrive_compile.backend"):
            out, _ = compiled(ids, model.empty_cache(1))
    torch.testing.assert_close(out, ref)
    c = kvdrive_compile.counters
    assert c.graphs == 1 and c.inductor_fallbacks == 1 and c.inductor_graphs == 0, c
    assert "InvalidCxxCompiler" in c.fallback_reasons[0], c.fallback_reasons
    warnings = [r.getMessage() for r in caplog.records if "Inductor could not compile" in r.getMessage()]
    assert len(warnings) == 1 and "runs eagerly" in warnings[0] and "InvalidCxxCompiler" in warnings[0], warnings


@torch.no_grad()
def test_llama_exact_and_no_recompiles():
    """A random GQA Llama (4 layers: Inductor compiles it in seconds, where SmolLM2's 30 layers
    take ~3 minutes a process) with its rest compiled by Inductor: two graphs, none more over 16
    decode steps of another prompt length, and exactly the eager model's tokens."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 128, (2, 23), generator=torch.Generator().manual_seed(1))
    longer = torch.randint(3, 128, (2, 41), generator=torch.Generator().manual_seed(2))
    kw = dict(do_sample=False)
    refs = [model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw) for x, n in ((ids, 3), (longer, 16))]
    eager = model.forward
    kvdrive_compile.counters.reset()
    model.forward = torch.compile(eager, backend="kvdrive", options={"token_budget": None, "compile_rest": "inductor"})
    try:
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, **kw)       # compiles prefill + decode
        c = kvdrive_compile.counters
        assert c.graphs == 2 and c.inductor_graphs == 2 and c.inductor_fallbacks == 0, c
        with torch.compiler.set_stance("fail_on_recompile"):
            out_longer = model.generate(longer, max_new_tokens=16, min_new_tokens=16, **kw)
        assert c.graphs == 2, c
    finally:
        model.forward = eager
        torch._dynamo.reset()
        kvdrive_compile.release_all()
    assert torch.equal(out, refs[0]) and torch.equal(out_longer, refs[1]), (out_longer[0, -16:], refs[1][0, -16:])
    assert c.sites_rewritten == 2 * cfg.num_hidden_layers, c


def _spied_graphs(monkeypatch) -> list:
    """The graphs the kvdrive backend returns to run eagerly, as they run."""
    from kvdrive_compile import backend

    graphs = []
    real = backend.call_directly
    monkeypatch.setattr(backend, "call_directly", lambda gm: graphs.append(real(gm)) or graphs[-1])
    return graphs


def _op_nodes(graphs) -> list:
    from kvdrive_compile.passes.guard_standins import kvdrive_op

    return [n for gm in graphs for n in gm.graph.nodes if kvdrive_op(n) is not None]


def test_an_eager_graph_calls_the_ops_functions_directly(monkeypatch):
    """Run eagerly (the default), every kvdrive op node calls the op's Python function without
    torch's dispatcher, and still names its op; the tokens are the eager model's, with the KV on
    three tiers and the CPU part on the worker."""
    graphs = _spied_graphs(monkeypatch)
    torch.manual_seed(0)
    model = hw.TinyLM(hw.TinyConfig()).eval()
    ids = torch.randint(0, model.cfg.vocab, (2, 100), generator=torch.Generator().manual_seed(1))
    ref = hw.greedy(model.forward, model, ids, 6)
    compiled = torch.compile(model.forward, backend="kvdrive", options=dict(
        device_memory="160KiB", host_memory="48KiB", token_budget=None, cpu_worker=True))
    assert torch.equal(hw.greedy(compiled, model, ids, 6), ref)
    nodes = _op_nodes(graphs)
    assert len(graphs) == 2 and nodes, graphs
    assert all(not isinstance(n.target, torch._ops.OpOverload) for n in nodes), [n.target for n in nodes]
    names = {n.target.kvdrive_op.name() for n in nodes}
    assert {"kvdrive::append", "kvdrive::select", "kvdrive::host_attention", "kvdrive::sparse_attention",
            "kvdrive::merge"} <= names, names
    assert open_sessions() == 0


def test_nodes_whose_inputs_need_a_gradient_keep_the_op(monkeypatch):
    """A forward with gradients on: the ops whose inputs need one stay ops (a backward through
    them says that they have no autograd formula), the others are called directly; the logits
    are eager's."""
    import transformers as tf

    graphs = _spied_graphs(monkeypatch)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    compiled = torch.compile(model.forward, backend="kvdrive", options={"token_budget": None})
    out = compiled(ids).logits
    torch.testing.assert_close(out, ref)
    nodes = _op_nodes(graphs)
    kept = [n for n in nodes if isinstance(n.target, torch._ops.OpOverload)]
    direct = [n for n in nodes if n not in kept]
    assert kept and all(any(a.meta["val"].requires_grad for a in n.all_input_nodes) for n in kept), kept
    assert all(not any(getattr(a.meta.get("val"), "requires_grad", False) for a in n.all_input_nodes) for n in direct)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()
    del out
    assert open_sessions() == 0
