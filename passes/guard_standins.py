"""Pass 4: no kvdrive stand-in is ever read by code that is not a ``kvdrive::`` op.

A graph input whose example value is a stand-in (``ctx.is_standin`` says: the runtime made
it) is a cache tensor whose values the runtime holds, not the tensor (runtime/standins.py). After the rewrite its users should be kvdrive ops, size queries and
the graph's outputs (the cache keeps it). Any other user (an attention the passes do not
recognise, a slice before attending, a cross-attention over a cache the rewrite took for
self-attention) would compute on a tensor with no values: it gets the real K/V instead, from
``kvdrive::materialize`` (gathered from the tiers each step: exact, slower), and a warning.
"""
from __future__ import annotations

import logging

import torch
import torch.fx

from . import fx_match as m
from .bind_kv_cache import is_size_query
from .pass_manager import GraphPass, PassContext

log = logging.getLogger(__name__)


def is_kvdrive_op(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and \
        node.target.namespace == "kvdrive"


def standin_inputs(gm: torch.fx.GraphModule, example_inputs: list, is_standin) -> list[torch.fx.Node]:
    """The graph inputs whose example value (the real tensor Dynamo traced with) is a stand-in."""
    out = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        grapharg = node.meta.get("grapharg")
        value = getattr(grapharg, "example", None) if grapharg is not None else None
        if value is None and i < len(example_inputs):
            value = example_inputs[i]
        if isinstance(value, torch.Tensor) and is_standin(value):
            out.append(node)
    return out


def value_readers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users of ``node`` that would read its values (not kvdrive ops, size queries or outputs)."""
    return [u for u in node.users if not (is_kvdrive_op(u) or is_size_query(u) or u.op == "output")]


class GuardStandIns(GraphPass):
    name = "guard_standins"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        for node in standin_inputs(gm, ctx.example_inputs, ctx.is_standin):
            readers = value_readers(node)
            if not readers:
                continue
            last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
            with graph.inserting_after(last_input):
                real = graph.call_function(torch.ops.kvdrive.materialize.default, (node,))
            real._rename(f"{node.name}_materialized")
            for u in readers:
                u.replace_input_with(node, real)
            ctx.materialized[node.name] = [u.name for u in readers]
        if ctx.materialized:
            log.warning("kvdrive: graph %d reads the values of %d cached KV tensor(s) outside an attention site "
                        "kvdrive rewrites (%s); their KV is gathered from the runtime every step: exact, "
                        "slower. The dump's summary lists them.", ctx.graph_index, len(ctx.materialized),
                        "; ".join(f"{k} by {', '.join(v)}" for k, v in list(ctx.materialized.items())[:3]))
        gm.recompile()
