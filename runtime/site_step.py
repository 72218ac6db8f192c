"""One step of one attention site, as the custom ops run it: open, append, select, prefetch,
attend on each side, merge. Each returns what the next stage needs, so the graph can carry
the order as data.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch

from .block_attention import StepMask, to_bias
from .kv_runtime import KVRuntime, Plan, Session
from .layer_kv import LayerKV
from .selection import EXACT, SelectionPolicy
from .standins import StandInKey, is_standin_like, token_span
from ..kernels.merge import merge_partials

_plan_ids = itertools.count(1)

OUTSIDE_READ = (
    "the KV cache handed to the compiled model holds values that were read or rewritten outside "
    "the compiled graph (beam search reorders the cache, and cropping or editing it does the "
    "same); kvdrive keeps the KV in its runtime and cannot follow such changes. Use greedy or "
    "sampling decoding (num_beams=1), and do not edit the cache between steps.")


def open_step(rt: KVRuntime, past_k: torch.Tensor, sites: int = 1) -> Session:
    """The session this forward call belongs to, from the first site's past keys. sites: the
    graph's attention sites (a model split into several graphs has at least that many)."""
    key = rt.standins.lookup(past_k)
    with rt.lock:
        rt.steps += 1
        if key is None:
            rt.sweep()
            return rt.open_session(sites)
        session = rt.session(key.session_id)
        session.sites = max(session.sites, sites)
        for f in session.disk_files.values():      # a background home write that failed: say so now
            if f.error is not None:
                raise f.error
        for pid in list(session.plans):         # left by a step that did not finish
            end_plan(rt, session, pid)
        return session


def _past_length(rt: KVRuntime, session: Session, kv: LayerKV, past: torch.Tensor, kind: str) -> Optional[int]:
    """How many cached tokens ``past`` stands for; None if it is real KV to import."""
    if past.numel() == 0:
        if kv.length:
            raise RuntimeError(f"layer {kv.layer}: the cache was emptied outside the compiled graph. {OUTSIDE_READ}")
        return 0
    key = rt.standins.lookup(past)
    if key is None:
        if is_standin_like(past) or bool(torch.isnan(past).any()):   # e.g. a reordered stand-in
            raise RuntimeError(f"layer {kv.layer}: the cache holds a {tuple(past.shape)} stand-in of KV that "
                               f"no kvdrive session holds (released, or made from one outside the graph). {OUTSIDE_READ}")
        if kv.length:
            raise RuntimeError(f"layer {kv.layer}: got real KV for a layer the runtime already holds. {OUTSIDE_READ}")
        return None
    if key != StandInKey(session.id, kv.layer, kind):
        raise RuntimeError(f"layer {kv.layer}: the cache holds the {key.kind} of layer {key.layer} of session "
                           f"{key.session_id}, not this layer's. {OUTSIDE_READ}")
    span = token_span(past)
    p = past.shape[-2]
    if span is not None and (past.shape[0], past.shape[1]) == (kv.batch, kv.kv_heads):
        first, _ = span
        # the past must be the layer's last p tokens: all of them, or a sliding window's tail
        if first + p == kv.length and (first == 0 or kv.keeps_last):
            return p
    raise RuntimeError(f"layer {kv.layer}: the cache holds tokens {_describe(span, p)} of a "
                       f"[{kv.batch}, {kv.kv_heads}] batch; the runtime holds [0, {kv.length}) of "
                       f"[{past.shape[0]}, {past.shape[1]}]. {OUTSIDE_READ}")


def _describe(span: Optional[tuple[int, int]], p: int) -> str:
    return f"[{span[0]}, {span[0] + p})" if span is not None else f"(a slice kvdrive cannot place, {p} long)"


def append(rt: KVRuntime, session: Session, layer: int, past_k: torch.Tensor, past_v: torch.Tensor,
           k_new: torch.Tensor, v_new: torch.Tensor, keeps_last: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Store the new K/V; returns the stand-ins for ``cat([past, new])`` and the past length.

    k_new, v_new: ``[B, Hkv, n, D]``; past_k, past_v: stand-ins from the last step, empty, or
    real KV from outside (imported once).
    """
    kv = rt.layer(session, layer, k_new, keeps_last)
    p = _past_length(rt, session, kv, past_k, "k")
    pv = _past_length(rt, session, kv, past_v, "v")
    if p != pv:
        raise RuntimeError(f"layer {layer}: keys and values of the cache disagree. {OUTSIDE_READ}")
    if p is None:                                                     # real KV: import it
        rt.append(kv, past_k.to(k_new.dtype), past_v.to(v_new.dtype))
        p = past_k.shape[-2]
    rt.drop_before(kv, kv.length - p)
    rt.append(kv, k_new, v_new)
    total = p + k_new.shape[2]
    k_out = rt.standins.make(StandInKey(session.id, layer, "k"), k_new, total, kv.length - total)
    v_out = rt.standins.make(StandInKey(session.id, layer, "v"), v_new, total, kv.length - total)
    return k_out, v_out, p


def select(rt: KVRuntime, session: Session, layer: int, past_len: int, new_len: int,
           q: torch.Tensor, policy: SelectionPolicy = EXACT, scale: float = 1.0) -> int:
    """Plan what the site attends this step (q: ``[B, Hq, Q, D]``, scale: the softmax scale);
    returns the plan id."""
    plan = rt.plan(session.layers[layer], past_len, new_len, q, policy, scale)
    pid = next(_plan_ids)
    session.plans[pid] = plan
    return pid


def end_plan(rt: KVRuntime, session: Session, plan_id: int) -> None:
    """Forget a plan once merged; its blocks may move again."""
    plan = session.plans.pop(plan_id, None)
    if plan is not None:
        rt.unpin(plan)


def plan_of(rt: KVRuntime, session_id: int, plan_id: int) -> Plan:
    plan = rt.session(session_id).plans.get(plan_id)
    if plan is None:
        raise RuntimeError(f"kvdrive plan {plan_id} of session {session_id} is gone: a step's ops ran out of order")
    return plan


def step_mask(plan: Plan, mask: Optional[torch.Tensor], is_causal: bool) -> StepMask:
    start, end = plan.window
    if mask is not None and mask.shape[-1] < end - start:
        raise RuntimeError(f"attention mask covers {mask.shape[-1]} keys, the cache holds {end - start}")
    bias = to_bias(mask)
    if bias is not None and bias.shape[-1] > end - start:
        bias = bias[..., : end - start]
    return StepMask(start, end, bias, is_causal)


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    out, _ = merge_partials([o for o, _ in parts], [l for _, l in parts])
    return out.to(dtype)
