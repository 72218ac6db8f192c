"""Pass 4: check the rewritten graph: lint, fake-tensor propagation, every site accounted for."""
from __future__ import annotations

import torch
import torch.fx
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from . import fx_match as m
from .pass_manager import GraphPass, PassContext


class VerifyGraph(GraphPass):
    name = "verify"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        gm.graph.lint()
        self._propagate(gm, ctx.example_inputs)
        live = set(gm.graph.nodes)
        for site in ctx.sites:
            if site.rewritten and site.node in live:
                raise AssertionError(f"kvdrive: rewritten site {site.node.name} ({site.layer_name}) is still in the graph")
            if not site.rewritten and site.node not in live:
                raise AssertionError(f"kvdrive: skipped site {site.node.name} ({site.layer_name}) vanished from the graph")
        known = {s.node for s in ctx.sites}
        stray = [n.name for n in gm.graph.nodes if m.is_call(n, m.SDPA) and n not in known]
        if stray:
            raise AssertionError(f"kvdrive: attention nodes not accounted for: {stray}")

    @staticmethod
    def _propagate(gm: torch.fx.GraphModule, example_inputs: list) -> None:
        """Run the fake impls over the graph from Dynamo's example values; record the results."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        tracing = torch._guards.TracingContext.try_get()
        mode = tracing.fake_mode if tracing is not None else None
        if mode is None:
            mode = FakeTensorMode(allow_non_fake_inputs=True)
        values = []
        for i, n in enumerate(placeholders):
            v = m.example(n)
            if isinstance(v, FakeTensor) and v.fake_mode is mode:
                values.append(v)
            elif i < len(example_inputs) and isinstance(example_inputs[i], torch.Tensor):
                values.append(mode.from_tensor(example_inputs[i]))
            else:
                values.append(v if v is not None else (example_inputs[i] if i < len(example_inputs) else None))
        # the python dispatcher, as Dynamo traces with: some ops' meta functions (baddbmm's
        # broadcast of its input) handle symbolic sizes only through it
        with mode, enable_python_dispatcher():
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*values)
        for n in gm.graph.nodes:
            if "example_value" not in n.meta and "val" in n.meta:
                n.meta["example_value"] = n.meta["val"]
