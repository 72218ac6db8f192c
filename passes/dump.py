"""Pass-inspection dumps: the readable graph before/after each pass, and a summary per graph.

Layout under ``dump_dir``::

    graph000/01.find_attention_sites.before.py   ... one pair per pass
    graph000/summary.txt                          sites found / rewritten / skipped, bindings,
                                                  the schedule (where each layer's reads are issued)
    graph000/summary.json                         the same, for tools

The graphs also go to ``torch._logging.trace_structured`` for TORCH_TRACE / tlparse users.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Optional

import torch
import torch.fx
from tabulate import tabulate

if TYPE_CHECKING:
    from .pass_manager import PassContext


def _readable(gm: torch.fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


class GraphDumper:
    def __init__(self, dump_dir: Optional[str], graph_index: int):
        self.dir = None if dump_dir is None else os.path.join(dump_dir, f"graph{graph_index:03d}")
        self.graph_index = graph_index
        if self.dir is not None:
            os.makedirs(self.dir, exist_ok=True)

    def graph(self, gm: torch.fx.GraphModule, number: int, pass_name: str, when: str) -> None:
        name = f"{number:02d}.{pass_name}.{when}"
        if when == "after" or number == 1:
            torch._logging.trace_structured(
                "artifact",
                metadata_fn=lambda: {"name": f"kvdrive_graph{self.graph_index:03d}_{name}", "encoding": "string"},
                payload_fn=lambda: _readable(gm),
            )
        if self.dir is not None:
            with open(os.path.join(self.dir, name + ".py"), "w") as f:
                f.write(_readable(gm))

    def summary(self, ctx: "PassContext") -> None:
        data = summarize(ctx)
        torch._logging.trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": f"kvdrive_graph{self.graph_index:03d}_summary", "encoding": "json"},
            payload_fn=lambda: json.dumps(data),
        )
        if self.dir is None:
            return
        with open(os.path.join(self.dir, "summary.json"), "w") as f:
            json.dump(data, f, indent=1)
        with open(os.path.join(self.dir, "summary.txt"), "w") as f:
            f.write(render_summary(data))


def summarize(ctx: "PassContext") -> dict:
    return {
        "graph": ctx.graph_index,
        "runtime_id": ctx.runtime_id,
        "sites_found": len(ctx.sites),
        "sites_rewritten": len(ctx.rewritten),
        "sites_skipped": len(ctx.skipped),
        "cpu_linears": ctx.cpu_linears,
        "pass_seconds": {k: round(v, 4) for k, v in ctx.pass_seconds.items()},
        "sites": [
            {"site": s.index, "node": s.node.name, "layer": s.layer_name,
             "kind": s.kind + (f", soft-cap {s.softcap:g}" if s.softcap else ""),
             "status": "rewritten" if s.rewritten else "skipped",
             "binding": s.binding(), "reason": s.reason}
            for s in ctx.sites
        ],
        "materialized": ctx.materialized,
        "schedule": ctx.schedule,
    }


def render_summary(data: dict) -> str:
    head = (f"graph {data['graph']}: {data['sites_found']} attention sites found, "
            f"{data['sites_rewritten']} rewritten, {data['sites_skipped']} skipped; "
            f"{data.get('cpu_linears', 0)} linear layers run by kernels/cpu_linear.py\n"
            f"pass seconds: {data['pass_seconds']}\n\n")
    rows = [[s["site"], s["layer"], s["kind"], s["node"], s["status"], s["binding"] if s["status"] == "rewritten" else s["reason"]]
            for s in data["sites"]]
    out = head + tabulate(rows, headers=["site", "layer", "kind", "node", "status", "KV binding / reason"]) + "\n"
    if data.get("materialized"):
        out += ("\ncached KV read outside a rewritten site, gathered from the runtime each step (exact, slower):\n"
                + tabulate([[k, ", ".join(v)] for k, v in data["materialized"].items()], headers=["cache input", "read by"])
                + "\n")
    return out + render_schedule(data.get("schedule") or {})


def render_schedule(schedule: dict) -> str:
    """The schedule pass's per-layer table: what each layer's ahead-read waits for, how many
    layers of attention run between its issue and the layer's select, and the positions (node
    index in graph order) of its stages: host start < device start < merge."""
    if not schedule.get("layers"):
        return ""
    rows = [[r["layer"], r["ahead_after"], r["layers_ahead"], r["ahead"], r["select"], r["prefetch"],
             f"{r['host_start']} < {r['device_start']} < {r['merge']}"] for r in schedule["layers"]]
    return (f"\nschedule (prefetch_depth={schedule['depth']}): {schedule['moved']} nodes moved\n"
            + tabulate(rows, headers=["layer", "ahead issued after", "layers ahead", "ahead", "select",
                                      "prefetch", "host < device < merge"]) + "\n")
