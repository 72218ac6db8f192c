"""The ``kvdrive::`` custom ops that rewritten graphs call, each with its fake impl below it.

One decode step of one attention site::

    step = open_step(past_k0, k_new0, rt, sites)   # once per graph: which session
    k_si, v_si, ticket = append(step, past_k, past_v, k_new, v_new)
    ahead = prefetch_ahead(step, after, layer)     # start reading what the layer's last step selected
    plan = select(ticket, q, scale, policy, shared)  # what to attend, where it lies (shared: another site's KV)
    plan = prefetch(plan, ahead)                   # start the rest of the disk -> host reads
    host = host_attention(plan, q, mask)           # host + disk blocks: started on the CPU worker (or deferred)
    out_d, lse_d = sparse_attention(plan, q, k_new, v_new, mask)  # device blocks, meanwhile
    out = merge(host, q, out_d, lse_d)             # waits for the CPU part (or runs it inline), merges

The scheduling pass (passes/schedule.py) moves ``prefetch_ahead`` up to ``prefetch_depth``
layers ahead (``after``: the node it must follow).

Handles (``step``, ``ticket``, ``plan``) are small int64 CPU tensors: the order of the stages
is carried by data, so none is dead code. Tensor shapes: q ``[B, Hq, Q, D]``; k_new, v_new
``[B, Hkv, n, D]``; out fp32 ``[B, Hq, Q, D]``; lse fp32 natural-log ``[B, Hq, Q]``.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.fx
from torch import Tensor

from .runtime import site_step, trace
from .runtime.standins import is_standin_like
from .runtimes import get_policy, get_runtime, materialize_standin, tail_standin


# each op's OpOverload -> its Python function: what a graph run eagerly calls (``call_directly``)
DIRECT: dict = {}


def _op(fn: Callable) -> Callable:
    """Register ``fn`` as the custom op ``kvdrive::<its name>`` (no mutated arguments) and keep
    it in ``DIRECT``."""
    op = torch.library.custom_op(f"kvdrive::{fn.__name__}", fn, mutates_args=())
    DIRECT[getattr(torch.ops.kvdrive, fn.__name__).default] = fn
    return op


def _handle(*values: int) -> Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _fake_handle(n: int) -> Tensor:
    return torch.empty((n,), dtype=torch.int64, device="cpu")


@_op
def open_step(past_k: Tensor, k_new: Tensor, runtime_id: int, sites: int) -> Tensor:
    """The session of this forward call: from the first site's past keys, or a new one.

    k_new: the first site's new keys (it orders the op after them). sites: the attention
    sites of the graph (the layers that share the device budget). Returns ``[runtime_id, session_id]``.
    """
    rt = get_runtime(runtime_id)
    with rt.timed("append") as span:
        if rt.tracer.enabled:
            span.args[trace.CPU_MS] = rt.tracer.cpu_sample()     # the "cores busy" of the timeline
        session = site_step.open_step(rt, past_k, sites)
        span.session_id = session.id       # on the timeline with the step it opened
    return _handle(runtime_id, session.id)


@open_step.register_fake
def _(past_k, k_new, runtime_id, sites):
    return _fake_handle(2)


@_op
def append(step: Tensor, past_k: Tensor, past_v: Tensor, k_new: Tensor, v_new: Tensor,
           layer: int, keeps_last: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Store ``k_new, v_new`` in the runtime; returns stand-ins for ``cat([past, new], -2)``
    (``[B, Hkv, P + n, D]``, zero memory) and a ticket ``[runtime, session, layer, P, n]``.

    keeps_last: the model keeps only the last tokens of the returned cache (a sliding window),
    so a shorter past next step means the oldest tokens left the window.
    """
    rid, sid = step.tolist()
    rt = get_runtime(rid)
    with rt.timed("append", sid, layer):
        k_si, v_si, past = site_step.append(rt, rt.session(sid), layer, past_k, past_v, k_new, v_new, keeps_last)
    return k_si, v_si, _handle(rid, sid, layer, past, k_new.shape[2])


def _fake_standin(like: Tensor, b, h, n, d) -> Tensor:
    """A stand-in's fake: ``[b, h, n, d]`` with every stride 0 (one element of storage), as
    the runtime's stand-ins are. Made directly: ``expand`` of symbolic sizes works the broadcast
    out in sympy (~8 ms a call in fake mode under cProfile), twice a layer at every compile."""
    return torch.empty_strided((b, h, n, d), (0, 0, 0, 0), dtype=like.dtype, device=like.device)


@append.register_fake
def _(step, past_k, past_v, k_new, v_new, layer, keeps_last):
    b, h, n, d = k_new.shape
    p = past_k.shape[-2] if past_k.dim() == 4 else 0
    return _fake_standin(k_new, b, h, p + n, d), _fake_standin(v_new, b, h, p + n, d), _fake_handle(5)


@_op
def standin_tail(standin: Tensor, start: int) -> Tensor:
    """``standin[:, :, start:]`` as a stand-in of its own, standing for the same layer's
    tokens from there on (a sliding-window cache keeps it). An op, not an index: inside a
    compiled graph Dynamo runs tensor ops with the subclass switched off, so an index would
    return a plain tensor that eager code could read."""
    return tail_standin(standin, start)


@standin_tail.register_fake
def _(standin, start):
    b, h, _, d = standin.shape
    return _fake_standin(standin, b, h, standin[:, :, start:].shape[2], d)


@_op
def materialize(cached: Tensor) -> Tensor:
    """The real K or V ``[B, Hkv, S, D]`` that a stand-in stands for, gathered from the
    runtime's tiers (slow, exact): for graph code that reads cache values and is not an
    attention site kvdrive rewrites. A tensor that is not a stand-in comes back as a copy.
    Contiguous, as the fake impl says: the tiers' window can be a view into a longer buffer, and
    Inductor checks a fallback op's output strides against its fake impl's."""
    if not is_standin_like(cached):
        return cached.clone(memory_format=torch.contiguous_format)
    return materialize_standin(cached).contiguous()


@materialize.register_fake
def _(cached):
    return torch.empty(cached.shape, dtype=cached.dtype, device=cached.device)


@_op
def select(ticket: Tensor, q: Tensor, scale: float, policy_id: int, shared: bool = False) -> Tensor:
    """Choose the blocks this site attends this step: score the block summaries with q (and
    the softmax scale), keep the best within the token budget, plus sink and local window (the
    policy's settings). shared: the ticket is another site's (a layer that attends an earlier
    layer's KV): select from that KV, move nothing. Returns a plan ``[runtime, session, plan]``."""
    rid, sid, layer, past, new = ticket.tolist()
    rt = get_runtime(rid)
    with rt.timed("select", sid, layer):
        pid = site_step.select(rt, rt.session(sid), layer, past, new, q, get_policy(policy_id), scale, shared)
    return _handle(rid, sid, pid)


@select.register_fake
def _(ticket, q, scale, policy_id, shared=False):
    return _fake_handle(3)


@_op
def prefetch_ahead(step: Tensor, after: Tensor, layer: int) -> Tensor:
    """Start reading (disk -> host) what ``layer``'s last decode step selected, before its
    step asks. after: a handle this must follow (carries the order the scheduler chose).
    Returns ``[runtime, session, layer]``."""
    rid, sid = step.tolist()[:2]
    rt = get_runtime(rid)
    with rt.timed("prefetch", sid, layer, event="prefetch_ahead"):
        site_step.prefetch_ahead(rt, rt.session(sid), layer)
    return _handle(rid, sid, layer)


@prefetch_ahead.register_fake
def _(step, after, layer):
    return _fake_handle(3)


@_op
def prefetch(plan: Tensor, ahead: Tensor) -> Tensor:
    """Start the disk -> host reads the plan needs on the I/O threads, taking what the
    layer's ``prefetch_ahead`` read already."""
    rid, sid, pid = plan.tolist()
    rt = get_runtime(rid)
    p = site_step.plan_of(rt, sid, pid)
    with rt.timed("prefetch", sid, p.layer.layer):
        site_step.prefetch(rt, p)
    return plan.clone()


@prefetch.register_fake
def _(plan, ahead):
    return _fake_handle(3)


@_op
def host_attention(plan: Tensor, q: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool,
                   softcap: float = 0.0) -> Tensor:
    """Start attention over the plan's host- and disk-resident blocks on the CPU worker, where
    they lie (the merge waits for it). mask: bool (True = attend) or additive, broadcastable to
    ``[B, Hq, Q, P + n]``; softcap: logit soft-capping (0: none). Returns the plan."""
    rid, sid, pid = plan.tolist()
    rt = get_runtime(rid)
    p = site_step.plan_of(rt, sid, pid)
    with rt.timed("cpu_attention", sid, p.layer.layer, event="cpu_start"):
        site_step.start_host_attention(rt, p, q, site_step.step_mask(p, mask, is_causal, softcap), scale)
    return plan.clone()


@host_attention.register_fake
def _(plan, q, mask, scale, is_causal, softcap=0.0):
    return _fake_handle(3)


def _fake_partial(q: Tensor) -> tuple[Tensor, Tensor]:
    b, h, n, d = q.shape
    return q.new_empty((b, h, n, d), dtype=torch.float32), q.new_empty((b, h, n), dtype=torch.float32)


@_op
def sparse_attention(plan: Tensor, q: Tensor, k_new: Tensor, v_new: Tensor, mask: Optional[Tensor],
                     scale: float, is_causal: bool, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """Attention over the plan's device-resident blocks (on a prefill: the new tokens)."""
    rid, sid, pid = plan.tolist()
    rt = get_runtime(rid)
    p = site_step.plan_of(rt, sid, pid)
    with rt.timed("device_attention", sid, p.layer.layer):
        out, lse = site_step.device_attention(rt, p, q, k_new, v_new,
                                              site_step.step_mask(p, mask, is_causal, softcap), scale)
    return out.contiguous(), lse.contiguous()


@sparse_attention.register_fake
def _(plan, q, k_new, v_new, mask, scale, is_causal, softcap=0.0):
    return _fake_partial(q)


@_op
def merge(plan: Tensor, q: Tensor, out_d: Tensor, lse_d: Tensor, sinks: Optional[Tensor] = None) -> Tensor:
    """Wait for the plan's CPU part, then log-sum-exp merge it with the device part: the
    attention output ``[B, Hq, Q, D]`` in q's dtype. sinks: attention sinks' logits
    ``[B, Hq, Q, 1]`` (a part that attends nothing). Ends the plan."""
    rid, sid, pid = plan.tolist()
    rt = get_runtime(rid)
    p = site_step.plan_of(rt, sid, pid)
    # the CPU part deferred to here runs now (on the timeline as itself), else it is waited for
    event = "cpu_attention" if site_step.host_part_deferred(p) else "cpu_wait"
    with rt.timed("cpu_attention", sid, p.layer.layer, event=event):
        host = site_step.finish_host_attention(rt, p, q)
    with rt.timed("merge", sid, p.layer.layer):
        site_step.end_plan(rt, rt.session(sid), pid)
        return site_step.merge([(out_d, lse_d), host, site_step.sink_part(sinks, out_d)], q.dtype).contiguous()


@merge.register_fake
def _(plan, q, out_d, lse_d, sinks=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)



def _register_effects() -> None:
    """Give every kvdrive op an ORDERED effect. Each changes (or reads) the runtime's state —
    sessions, blocks, plans, the CPU worker — in the order the schedule pass chose, and a handle
    that only carries order (``prefetch_ahead``'s ``after``) or the host part started before the
    device part is not something a compiler sees as a dependency. Under AOTAutograd (Inductor,
    ``compile_rest="inductor"``) an effectful op is threaded on one effect token, so none is
    dropped as dead code, merged with an equal call, or reordered among the others: each runs
    exactly once per call, in the graph's order. Run eagerly, a graph runs them in order anyway."""
    from torch._library.effects import EffectType

    for op in (open_step, append, standin_tail, materialize, select, prefetch_ahead, prefetch,
               host_attention, sparse_attention, merge):
        op.register_effect(EffectType.ORDERED)


_register_effects()


def call_directly(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm``, run eagerly, calling each kvdrive op's Python function itself rather than through
    the dispatcher: a Python custom op costs ~30 us a call more on this project's CPU, 7 ops a
    layer (SmolLM2 decode steps 0.90-0.92x as long without it: ``benchmarks/direct_calls.py``).
    The function runs as the dispatcher would run it for a stand-in argument
    (``DisableTorchFunctionSubclass``). Not where an input needs a gradient (there the op keeps
    the dispatcher's handling). The dumps keep the op names."""
    changed = False
    for node in gm.graph.nodes:
        fn = DIRECT.get(node.target) if node.op == "call_function" else None
        if fn is not None and not any(getattr(a.meta.get("val"), "requires_grad", False)
                                       for a in node.all_input_nodes):
            node.target = _direct(node.target, fn)
            changed = True
    if changed:
        gm.recompile()
    return gm


@functools.lru_cache(maxsize=None)
def _direct(op: torch._ops.OpOverload, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with torch._C.DisableTorchFunctionSubclass():
            return fn(*args, **kwargs)
    call.kvdrive_op = op               # what it stands for (passes/guard_standins.py: kvdrive_op)
    return call
