"""Pass 4: no kvdrive stand-in is ever read by code that is not a ``kvdrive::`` op.

Stand-in values of a graph: the inputs whose example value is a stand-in (``ctx.is_standin``
says the runtime made it: a cache tensor whose values the runtime holds, see
runtime/standins.py), and the stand-ins each ``append`` returns. Their users may be kvdrive
ops, size queries, the graph's outputs (the cache keeps them) and tail slices ``x[:, :, a:]``
(a sliding-window cache), which become ``kvdrive::standin_tail`` (a stand-in of its own:
inside a compiled graph Dynamo switches the tensor subclass off, so an index would give eager
code a plain tensor to read). Any other user would compute on a tensor with no values: it gets
the real K/V instead, from ``kvdrive::materialize`` (gathered from the tiers each step: exact,
slower), and a warning.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx

from .bind_kv_cache import is_size_query, is_tail_slice
from .pass_manager import GraphPass, PassContext

log = logging.getLogger(__name__)


def kvdrive_op(node: torch.fx.Node) -> Optional[torch._ops.OpOverload]:
    """The ``kvdrive::`` op a node calls, None if none: its target, or the op whose Python
    function it calls directly (a graph run eagerly: ``call_directly`` in kvdrive_compile/ops.py)."""
    if node.op != "call_function":
        return None
    target = getattr(node.target, "kvdrive_op", node.target)
    return target if isinstance(target, torch._ops.OpOverload) and target.namespace == "kvdrive" else None


def is_kvdrive_op(node: torch.fx.Node) -> bool:
    return kvdrive_op(node) is not None


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


def standin_outputs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The stand-ins ``append`` returns (items 0 and 1 of its result)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem
            and isinstance(n.args[0], torch.fx.Node) and kvdrive_op(n.args[0]) is torch.ops.kvdrive.append.default
            and n.args[1] in (0, 1)]


def value_readers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users of a stand-in value that would read its values."""
    return [u for u in node.users
            if not (is_kvdrive_op(u) or is_size_query(u) or u.op == "output" or is_tail_slice(u))]


def _tail_start(view: torch.fx.Node):
    start = view.args[1][2].start
    return 0 if start is None else start


class GuardStandIns(GraphPass):
    name = "guard_standins"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        todo = standin_inputs(gm, ctx.example_inputs, ctx.is_standin) + standin_outputs(gm)
        while todo:
            node = todo.pop()
            for view in [u for u in node.users if is_tail_slice(u)]:
                with graph.inserting_before(view):
                    tail = graph.call_function(torch.ops.kvdrive.standin_tail.default, (node, _tail_start(view)))
                tail.meta.update(view.meta)
                view.replace_all_uses_with(tail)
                graph.erase_node(view)
                todo.append(tail)
            readers = value_readers(node)
            if readers:
                self._materialise(graph, node, readers)
                ctx.materialized[node.name] = [u.name for u in readers]
        if ctx.materialized:
            log.warning("kvdrive: graph %d reads the values of %d cached KV tensor(s) outside an attention site "
                        "kvdrive rewrites (%s); their KV is gathered from the runtime every step: exact, "
                        "slower. The dump's summary lists them.", ctx.graph_index, len(ctx.materialized),
                        "; ".join(f"{k} by {', '.join(v)}" for k, v in list(ctx.materialized.items())[:3]))
        gm.recompile()

    @staticmethod
    def _materialise(graph: torch.fx.Graph, node: torch.fx.Node, readers: list[torch.fx.Node]) -> None:
        where = [n for n in graph.nodes if n.op == "placeholder"][-1] if node.op == "placeholder" else node
        with graph.inserting_after(where):
            real = graph.call_function(torch.ops.kvdrive.materialize.default, (node,))
        real._rename(f"{node.name}_materialized")
        for u in readers:
            u.replace_input_with(node, real)
