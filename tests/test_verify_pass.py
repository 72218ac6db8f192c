"""The verify pass propagates fake tensors only through what the passes changed
(``ChangedOnly``): it gives every node the value a full propagation gives, still fails on a
rewrite whose shapes do not fit, and runs every node where an in-place op edits sizes."""
import pytest
import torch
import transformers as tf

from kvdrive_compile.backend import default_passes
from kvdrive_compile.passes import verify
from kvdrive_compile.passes.pass_manager import PassContext, PassManager
from kvdrive_compile.runtimes import policy_for, runtime_for
from kvdrive_compile.options import parse_options


def capture(fn, *args):
    """Dynamo's graph of ``fn(*args)`` (with its recorded example values) and example inputs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm
    torch._dynamo.reset()
    torch.compile(fn, backend=backend, dynamic=False)(*args)
    return graphs[0]


def counted(monkeypatch):
    ran = []
    run_node = verify.FakeTensorProp.run_node

    def spy(self, n):
        ran.append(n)
        return run_node(self, n)
    monkeypatch.setattr(verify.FakeTensorProp, "run_node", spy)
    return ran


def f(x, w):
    y = torch.matmul(x, w)
    z = torch.relu(y) * 2
    return z.sum(0), y


def test_only_the_changed_nodes_run_and_their_values_follow(monkeypatch):
    gm, inputs = capture(f, torch.randn(3, 4), torch.randn(4, 5))
    traced = {n: (n.target, n.args, n.kwargs) for n in gm.graph.nodes}
    matmul = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.matmul)
    relu = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.relu)
    with gm.graph.inserting_after(matmul):                  # a "pass": relu now reads y^T, [5, 3]
        t = gm.graph.call_method("t", (matmul,))
    relu.replace_input_with(matmul, t)
    gm.recompile()
    ran = counted(monkeypatch)
    verify.VerifyGraph._propagate(gm, inputs, traced)
    ops = {n.name for n in ran if n.op not in ("placeholder", "output")}
    assert "matmul" not in ops and {t.name, relu.name} <= ops          # unchanged: kept; new and edited: run
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert out.args[0][0].meta["val"].shape == (3,)                  # sum(0) of [5, 3]: recomputed downstream
    assert out.args[0][1].meta["val"].shape == (3, 5)


def test_a_rewrite_whose_shapes_do_not_fit_still_fails():
    gm, inputs = capture(f, torch.randn(3, 4), torch.randn(4, 5))
    traced = {n: (n.target, n.args, n.kwargs) for n in gm.graph.nodes}
    matmul = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.matmul)
    matmul.args = (matmul.args[0], matmul.args[0])                    # [3, 4] @ [3, 4]
    gm.recompile()
    with pytest.raises(RuntimeError, match="reduction dim"):
        verify.VerifyGraph._propagate(gm, inputs, traced)


def g(x):
    y = x + 1
    y.unsqueeze_(0)
    return y * 2


def test_a_graph_that_edits_sizes_in_place_runs_every_node(monkeypatch):
    gm, inputs = capture(g, torch.randn(3, 4))
    assert any(verify._edits_metadata_in_place(n) for n in gm.graph.nodes)
    traced = {n: (n.target, n.args, n.kwargs) for n in gm.graph.nodes}
    ran = counted(monkeypatch)
    verify.VerifyGraph._propagate(gm, inputs, traced)
    assert len(ran) == len(gm.graph.nodes)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert out.args[0][0].meta["val"].shape == (1, 3, 4)


@pytest.mark.parametrize("options", [{"token_budget": None},
                                     {"token_budget": 32, "cpu_linears": "auto", "block_size": 8, "sink_tokens": 0,
                                      "local_window": 0, "device_memory": "32KiB", "host_memory": "16KiB"}])
def test_changed_only_gives_every_node_what_a_full_propagation_gives(options, monkeypatch):
    """On a model's prefill and decode graphs after every kvdrive pass (the decode graph's cache
    length symbolic): each node's value from the changed-only propagation is the full
    propagation's; and most of the model's own nodes were not run again."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    opts = parse_options(options)
    checked = []
    ran = counted(monkeypatch)

    def backend(gm, example_inputs, **kwargs):
        ctx = PassContext(runtime_id=runtime_for(opts), policy_id=policy_for(opts), example_inputs=list(example_inputs),
                          cpu_linears_how=opts.cpu_linears)
        ran.clear()
        PassManager(default_passes()).run(gm, ctx)             # its verify: changed-only
        assert ctx.rewritten
        changed_only = {n: n.meta["val"] for n in gm.graph.nodes if "val" in n.meta}
        n_ran = sum(n.op not in ("placeholder", "output") for n in ran)
        verify.VerifyGraph._propagate(gm, example_inputs, None)  # every node
        for n in gm.graph.nodes:
            if n.op not in ("placeholder", "output") and n in changed_only:     # (inputs: Dynamo's, or converted)
                assert verify.same_metadata(changed_only[n], n.meta["val"]), n.format_node()
        assert n_ran < len(gm.graph.nodes) / 2, (n_ran, len(gm.graph.nodes))
        checked.append(gm)
        return gm
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=backend)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert len(checked) >= 2                                      # prefill and decode
