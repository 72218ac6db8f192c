"""Pass 4: check the rewritten graph: lint, fake-tensor propagation, every site accounted for."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from . import fx_match as m
from .pass_manager import GraphPass, PassContext


class VerifyGraph(GraphPass):
    name = "verify"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        gm.graph.lint()
        self._propagate(gm, ctx.example_inputs, ctx.traced)
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
    def _propagate(gm: torch.fx.GraphModule, example_inputs: list, traced: Optional[dict] = None) -> None:
        """Run the fake impls over the graph from Dynamo's example values; record the results.
        traced: each node's (target, args, kwargs) before the passes (``PassContext.traced``):
        then only what the passes changed runs where it can (``ChangedOnly``); None: every node."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        mode = _recorded_mode(placeholders)
        if traced is not None and mode is not None and not any(_edits_metadata_in_place(n) for n in gm.graph.nodes):
            with mode, enable_python_dispatcher():
                ChangedOnly(gm, mode, traced).propagate_dont_convert_inputs(*[m.example(n) for n in placeholders])
            _record_examples(gm)
            return
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
        _record_examples(gm)


def _record_examples(gm: torch.fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        if "example_value" not in n.meta and "val" in n.meta:
            n.meta["example_value"] = n.meta["val"]


def _recorded_mode(placeholders: list[torch.fx.Node]) -> Optional[FakeTensorMode]:
    """The fake mode of the values Dynamo recorded for the graph's inputs (its tracing mode,
    not the one it gives the backend); None unless every input has a fake tensor of that mode
    or a number."""
    modes = set()
    for n in placeholders:
        v = m.example(n)
        if isinstance(v, FakeTensor):
            modes.add(v.fake_mode)
        elif not isinstance(v, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
            return None
    return modes.pop() if len(modes) == 1 else None


class ChangedOnly(FakeTensorProp):
    """Fake-tensor propagation of what the passes changed, in the mode Dynamo traced with: a
    node they added or edited (target, args or kwargs not as Dynamo traced them), and a node
    an input of which now has other metadata (sizes, strides, dtype, device) than the value
    Dynamo recorded for it. Every other node keeps Dynamo's recorded value: its propagation
    depends only on that metadata, so running it again gives the same. (On SmolLM2 the verify
    pass spent ~2 s a graph re-running the model's own ops.)"""

    def __init__(self, gm: torch.fx.GraphModule, mode: FakeTensorMode, traced: dict):
        super().__init__(gm, mode)
        self.traced = traced
        self.changed: set[torch.fx.Node] = set()

    def run_node(self, n: torch.fx.Node) -> Any:
        old = m.example(n)
        if old is not None and n.op != "output" and self._as_traced(n) and not self.changed.intersection(n.all_input_nodes):
            n.meta.setdefault("val", old)
            return old
        result = super().run_node(n)
        if old is None or not same_metadata(result, old):
            self.changed.add(n)
        return result

    def _as_traced(self, n: torch.fx.Node) -> bool:
        traced = self.traced.get(n)
        return traced is not None and traced[0] is n.target and traced[1] is n.args and traced[2] is n.kwargs


def same_metadata(a: Any, b: Any) -> bool:
    """Whether two example values look alike to every op that takes them: sizes, strides and
    storage offset equal whatever their symbols are, same dtype, device, layout, grad flag."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if (a.dtype, a.device, a.layout, a.requires_grad) != (b.dtype, b.device, b.layout, b.requires_grad) \
                or a.layout != torch.strided:
            return False
        return _known_equal(a.shape, b.shape) and _known_equal(a.stride(), b.stride()) and \
            _known_equal((a.storage_offset(),), (b.storage_offset(),))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_metadata(x, y) for x, y in zip(a, b))
    numbers = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)
    if isinstance(a, numbers) and isinstance(b, numbers):
        return _known_equal((a,), (b,))
    return False


def _known_equal(xs, ys) -> bool:
    return len(xs) == len(ys) and all(statically_known_true(x == y) for x, y in zip(xs, ys))


# in-place ops that change a tensor's sizes or strides: run again on the value Dynamo recorded
# (which has the change already) they would apply it twice, so a graph with one runs every node
_METADATA_IN_PLACE = {"unsqueeze_", "squeeze_", "transpose_", "t_", "resize_", "resize_as_", "as_strided_",
                      "set_", "swapdims_", "swapaxes_", "detach_"}


def _edits_metadata_in_place(n: torch.fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _METADATA_IN_PLACE
    if n.op != "call_function":
        return False
    if isinstance(n.target, torch._ops.OpOverload):
        return torch.Tag.inplace_view in n.target.tags
    return getattr(n.target, "__name__", "") in _METADATA_IN_PLACE
