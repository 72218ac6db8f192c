"""Passes as named units, run in order, timed, and dumped before/after."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.fx

from .dump import GraphDumper
from .sites import AttentionSite

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What the passes share about one graph: inputs, the sites found, and what became of them.

    runtime_id: the runtime the rewritten graph calls; policy_id: its block selection policy.
    graph_index: the n-th graph compiled.
    layer_ids: a site's layer number by its module path, shared by all graphs of a runtime so
    that the prefill and decode graphs name a layer alike.
    prefetch_depth: how many layers ahead the schedule pass issues a layer's disk reads (0: when
    the layer starts); schedule: what that pass decided (see passes/schedule.py).
    cpu_linears_how, compile_rest: those options; cpu_linears: the linear layers the
    ``cpu_linears`` pass changed.
    """

    runtime_id: int
    policy_id: int = 0
    graph_index: int = 0
    layer_ids: dict[str, int] = field(default_factory=dict)
    dump_dir: Optional[str] = None
    example_inputs: list[Any] = field(default_factory=list)
    sites: list[AttentionSite] = field(default_factory=list)
    materialized: dict[str, list[str]] = field(default_factory=dict)   # cache input -> its readers
    is_standin: Callable[[Any], bool] = lambda t: False                # the runtime made this tensor
    pass_seconds: dict[str, float] = field(default_factory=dict)
    prefetch_depth: int = 0
    schedule: dict = field(default_factory=dict)
    cpu_linears_how: str = "aten"
    compile_rest: str = "eager"
    cpu_linears: int = 0
    # each node's (target, args, kwargs) as Dynamo traced it, before any pass: the verify pass
    # re-propagates only what the passes changed (``PassManager.run`` records it)
    traced: dict[torch.fx.Node, tuple] = field(default_factory=dict)

    @property
    def rewritten(self) -> list[AttentionSite]:
        return [s for s in self.sites if s.rewritten]

    @property
    def skipped(self) -> list[AttentionSite]:
        return [s for s in self.sites if not s.rewritten]


class GraphPass:
    """A transformation (or check) of a Dynamo FX graph. Subclasses set ``name`` and ``run``."""

    name = "pass"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        raise NotImplementedError


class PassManager:
    def __init__(self, passes: list[GraphPass]):
        self.passes = passes

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
        dumper = GraphDumper(ctx.dump_dir, ctx.graph_index)
        ctx.traced = {n: (n.target, n.args, n.kwargs) for n in gm.graph.nodes}
        for i, p in enumerate(self.passes, start=1):
            dumper.graph(gm, i, p.name, "before")
            t0 = time.perf_counter()
            p.run(gm, ctx)
            ctx.pass_seconds[p.name] = time.perf_counter() - t0
            dumper.graph(gm, i, p.name, "after")
        ctx.traced = {}             # the nodes the passes erased are garbage now, with what their meta holds
        dumper.summary(ctx)
        return gm
