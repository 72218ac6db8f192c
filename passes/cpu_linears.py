"""Pass: a CPU graph's linear layers call ``kernels/cpu_linear.py: linear`` (``kvdrive_cpu::linear``
where Inductor compiles the graph), which runs a decode step's few-row fp32 products by a numba
kernel where this machine measured it faster than torch's BLAS for the shape (on this project's
2-core AMD CPU the model's linear layers took ~95 ms of a SmolLM2 8K x 4 decode step as traced).

Only inference graphs on the CPU: a node whose input's example value lives elsewhere, needs a
gradient, or is not fp32 is left as traced (the op has no backward; the kernel is fp32's). Option
``cpu_linears="aten"`` turns the pass off; ``ctx.cpu_linears`` counts the nodes it changed.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from ..kernels.cpu_linear import linear, linear_op  # noqa: F401  (linear_op registers kvdrive_cpu::linear)
from . import fx_match as m
from .pass_manager import GraphPass, PassContext

LINEAR_FNS = {torch._C._nn.linear, F.linear}
_PARAMS = ("input", "weight", "bias")


def _replaceable(node: torch.fx.Node) -> bool:
    if not m.is_call(node, LINEAR_FNS):
        return False
    x, w = m.tensor_meta(m.arg(node, 0, "input")), m.tensor_meta(m.arg(node, 1, "weight"))
    out = m.tensor_meta(node)
    if x is None or w is None or out is None or w.dim() != 2:
        return False
    return x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and not out.requires_grad


class CpuLinears(GraphPass):
    name = "cpu_linears"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        ctx.cpu_linears = 0
        if ctx.cpu_linears_how != "auto":
            return
        for node in list(gm.graph.nodes):
            if not _replaceable(node):
                continue
            args = [m.arg(node, i, name) for i, name in enumerate(_PARAMS)]
            node.target = torch.ops.kvdrive_cpu.linear.default if ctx.compile_rest == "inductor" else linear
            node.args, node.kwargs = tuple(args), {}
            # the same computation as traced (fake tensors take F.linear): the verify pass
            # need not propagate it again unless its inputs change
            ctx.traced[node] = (node.target, node.args, node.kwargs)
            ctx.cpu_linears += 1
        if ctx.cpu_linears:
            gm.recompile()
