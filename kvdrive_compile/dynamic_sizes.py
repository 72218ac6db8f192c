"""Dynamic sizes from the first trace: so the first prefill and decode graphs serve every prompt
length, batch size > 1 and padding, instead of one recompile per new size.

Dynamo traces a frame with the sizes of its first call and makes a size dynamic only after it
changed: each new prompt length, batch size or mask length recompiles once, and past its
recompile limit (8 graphs) the frame runs eagerly. A backend sees the inputs only after a trace,
so for a graph with attention kvdrive marks the sizes a later call may change dynamic then and
has Dynamo trace again (the restart Inductor's scalar pass asks for).

This leans on torch 2.13 internals (the restart exception, the speculation log, the current
trace id, the ``grapharg`` metadata, the mark attributes): another torch may need it adapted,
and tests/test_dynamic_shapes.py would show it.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Optional

import torch
import torch.fx
from torch._dynamo.exc import TensorifyScalarRestartAnalysis
from torch._dynamo.symbolic_convert import InstructionTranslator
from torch._subclasses.fake_tensor import FakeTensor

from .passes import fx_match as m
from .runtimes import is_standin

log = logging.getLogger(__name__)

_MODULE_STATE = re.compile(r"\._(parameters|buffers)\[")      # L['self']._modules['q']._parameters['weight']
_last_retraced: list[Any] = [None]                               # the compile id last traced again


def _has_attention(gm: torch.fx.GraphModule) -> bool:
    return any(m.is_call(n, m.SDPA) or m.is_call(n, m.SOFTMAX_FNS, {"softmax"}) for n in gm.graph.nodes)


def _fixed_sizes(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Optional[list[tuple[torch.Tensor, int, str]]]:
    """(input, dim, source) of each size the trace fixed that another call may change: sizes >= 2
    (Dynamo specializes 0 and 1) of the tensors passed in, not of module parameters or buffers,
    and not marked static or dynamic already. A stand-in's heads and head_dim never change.
    None when the caller marked sizes of its own inputs: it chose what is dynamic (a benchmark
    that marks the prompt length and warms up at each batch size), and a second trace would
    only cost time."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = []
    for node, value in zip(placeholders, example_inputs):
        arg = node.meta.get("grapharg")
        if arg is None or not isinstance(value, torch.Tensor) or isinstance(value, (torch.nn.Parameter, FakeTensor)):
            continue
        if _MODULE_STATE.search(arg.source.name) or m.tensor_meta(node) is None:
            continue
        marked = getattr(value, "_dynamo_static_indices", set()) | getattr(value, "_dynamo_weak_dynamic_indices", set())
        if is_standin(value):
            marked = marked | {1, 3}                               # [B, Hkv, S, D]
        elif marked and not getattr(value, "_kvdrive_marked", False):
            return None
        for dim, size in enumerate(m.tensor_meta(node).shape):
            if type(size) is int and size >= 2 and dim not in marked:
                found.append((value, dim, f"{arg.source.name}.size({dim})"))
    return found


def retrace_with_dynamic_sizes(gm: torch.fx.GraphModule, example_inputs: list[Any], counters: Any) -> None:
    """Under ``torch.compile``'s default ``dynamic=None``, make an attention graph's input sizes
    dynamic (once per compile) and raise Dynamo's restart; returns when there is nothing to mark.
    ``dynamic=True`` traced them dynamic already; ``dynamic=False`` asks for static sizes."""
    config = torch._dynamo.config
    trace = torch._guards.CompileContext.current_trace_id()
    # once per compile: the trace this restart asks for has the same compile id and a later
    # attempt (compile ids start again after torch._dynamo.reset(), attempts at 0)
    if trace is None or not config.automatic_dynamic_shapes or not config.assume_static_by_default \
            or (_last_retraced[0] == trace.compile_id and trace.attempt > 0) or not _has_attention(gm):
        return
    sizes = _fixed_sizes(gm, example_inputs)
    if not sizes:
        return
    for value, dim, _ in sizes:
        torch._dynamo.maybe_mark_dynamic(value, dim)
        value._kvdrive_marked = True                   # ours, not the caller's, on a later call
    _last_retraced[0] = trace.compile_id
    # the log of the branches this trace took: with symbolic sizes the next one may take others
    InstructionTranslator.current_tx().speculation_log.clear()
    counters.dynamic_retraces += 1
    names = [name for _, _, name in sizes]
    log.info("kvdrive: tracing %s again with dynamic sizes %s", trace.compile_id, names)
    raise TensorifyScalarRestartAnalysis(restart_reason=f"kvdrive: dynamic sizes {names}")
