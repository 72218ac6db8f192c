"""Pass 3: rewrite each bound site into the scheduled subgraph of ``kvdrive::`` ops.

::

    step           = open_step(past_k, k_new of the first site, runtime_id, sites)  # once per graph
    k_si, v_si, t  = append(step, past_k, past_v, k_new, v_new, layer)    # right after the cats
    ahead          = prefetch_ahead(step, step, layer)    # the scheduling pass may move it earlier
    plan           = prefetch(select(t, q, scale, policy, shared), ahead)
    host           = host_attention(plan, q, mask, scale, causal, softcap)   # started on the CPU worker
    out_d, lse_d   = sparse_attention(plan, q, k_new, v_new, mask, scale, causal, softcap)
    out            = merge(host, q, out_d, lse_d, sinks)          # replaces the site (sinks: gpt-oss's, or None)

A site that attends another site's cache (a KV-sharing layer: ``site.owner``) has no append
of its own: its ``select`` takes the owner's ticket with ``shared=True``.

The cats' other users (the cache write-back among the graph's outputs) get the stand-ins;
the original attention and cats are left without users and removed (only they: in-place
writes elsewhere in the graph stay).
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx

from . import fx_match as m
from .pass_manager import GraphPass, PassContext
from .sites import AttentionSite

_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack")


def _op(name: str):
    return getattr(torch.ops.kvdrive, name).default


class _Builder:
    """Creates nodes at the graph's insert point, with the site's source metadata."""

    def __init__(self, graph: torch.fx.Graph, site: AttentionSite, layer: int):
        self.graph, self.site, self.layer = graph, site, layer

    def call(self, target: Any, *args: Any, name: Optional[str] = None) -> torch.fx.Node:
        node = self.graph.call_function(target, tuple(args))
        if name is not None:                              # readable dumps: k_standin_l3, plan_l3...
            node._rename(f"{name}_l{self.layer}")
        for key in _META_KEYS:
            if key in self.site.node.meta:
                node.meta[key] = self.site.node.meta[key]
        node.meta["kvdrive_site"] = self.site.index
        return node

    def item(self, node: torch.fx.Node, i: int, name: Optional[str] = None) -> torch.fx.Node:
        return self.call(operator.getitem, node, i, name=name)


def _later(a: torch.fx.Node, b: torch.fx.Node) -> torch.fx.Node:
    for n in a.graph.nodes:
        if n is a:
            return b
        if n is b:
            return a
    raise AssertionError("nodes not in the graph")


class RewriteAttention(GraphPass):
    name = "rewrite_attention"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        self.policy_id = ctx.policy_id
        step: Optional[torch.fx.Node] = None
        dead: set[torch.fx.Node] = set()
        seen: dict[str, int] = {}
        for site in ctx.sites:
            # a module that runs attention twice in one graph has two layers
            name = f"{site.layer_name}#{seen.setdefault(site.layer_name, 0)}"
            seen[site.layer_name] += 1
            if not site.ok:
                continue
            layer = ctx.layer_ids.setdefault(name, len(ctx.layer_ids))
            b = _Builder(graph, site, layer)
            if site.owner is None:
                step = self._append(graph, b, site, step, ctx)
            with graph.inserting_before(site.node):
                out = self._attention(b, site, step)
            site.node.replace_all_uses_with(out)
            site.rewritten = True
            dead |= set(site.chain) | ({site.k_bind.cat, site.v_bind.cat} if site.owner is None else set())
        # remove only what the rewrite left unused: a graph-wide DCE would also drop in-place
        # writes (index_copy_ into a static cache) whose results nobody reads
        for node in reversed(list(graph.nodes)):
            if node in dead and not node.users:
                graph.erase_node(node)
        gm.recompile()

    @staticmethod
    def _append(graph: torch.fx.Graph, b: _Builder, site: AttentionSite, step: Optional[torch.fx.Node],
                ctx: PassContext) -> torch.fx.Node:
        """The site's ``append`` right after its cats (and the graph's ``open_step`` before the
        first); the cats' other users (the cache write-back) get the stand-ins. Returns the step."""
        kb, vb = site.k_bind, site.v_bind
        with graph.inserting_before(_later(kb.cat, vb.cat).next):
            if step is None:
                sites = sum(1 for s in ctx.sites if s.ok and s.owner is None)    # the layers that keep KV
                step = b.call(_op("open_step"), kb.past, kb.new, ctx.runtime_id, sites, name="kv_step")
            app = b.call(_op("append"), step, kb.past, vb.past, kb.new, vb.new, b.layer, site.keeps_last,
                         name="kv_append")
            k_si, v_si = b.item(app, 0, "k_standin"), b.item(app, 1, "v_standin")
            site.ticket = b.item(app, 2, "kv_ticket")
        # the attention of the site and of the sites sharing its cache read the cats no more
        chain = set(site.chain).union(*(s.chain for s in ctx.sites if s.owner is site))
        kb.cat.replace_all_uses_with(k_si, delete_user_cb=lambda u: u not in chain)
        vb.cat.replace_all_uses_with(v_si, delete_user_cb=lambda u: u not in chain)
        return step

    def _attention(self, b: _Builder, site: AttentionSite, step: torch.fx.Node) -> torch.fx.Node:
        """The scheduled ops of one site. A site that shares another's cache (``site.owner``)
        selects and attends that site's KV with its own queries, from the owner's ticket and new
        K/V; its own ``prefetch_ahead`` names its own layer, which keeps no KV: it reads nothing."""
        owner = site.owner or site
        q, scale, bias = self._scaled_query_and_bias(b, site)
        ahead = b.call(_op("prefetch_ahead"), step, step, b.layer, name="ahead")
        # the selection ranks by the scores before the cap (tanh keeps each row's order)
        rank_scale = scale if not site.softcap else (
            scale / site.softcap if isinstance(scale, float) else b.call(operator.truediv, scale, site.softcap))
        selection = b.call(_op("select"), owner.ticket, q, rank_scale, self.policy_id, site.owner is not None,
                           name="selection")
        plan = b.call(_op("prefetch"), selection, ahead, name="plan")
        host = b.call(_op("host_attention"), plan, q, bias, scale, site.is_causal, site.softcap, name="host_part")
        dev = b.call(_op("sparse_attention"), plan, q, owner.k_bind.new, owner.v_bind.new, bias, scale,
                     site.is_causal, site.softcap, name="device_part")
        out = b.call(_op("merge"), host, q, b.item(dev, 0, "device_out"), b.item(dev, 1, "device_lse"), site.sinks,
                     name="attention")
        if site.out_3d:                                                  # the bmm form: [B*Hq, Q, D]
            out = b.call(torch.flatten, out, 0, 1, name="attention_3d")
        return out

    @staticmethod
    def _scaled_query_and_bias(b: _Builder, site: AttentionSite):
        """Fold the score ops into (q * tensor factors, the scale, an additive bias). The scale is a
        float, or the node of a value the graph computes each call (a SymFloat under dynamic=True)."""
        q, scale = site.q, site.scale
        for node in site.scale_nodes:
            scale = node if scale == 1.0 else b.call(operator.mul, scale, node, name="scale")
        if site.kind == "sdpa":
            return q, scale, site.mask
        bias: Any = None
        neg_inf = float("-inf")
        for kind, other in site.score_ops:
            if kind in ("add", "sub") and not isinstance(other, torch.fx.Node):
                continue                                 # a constant shift: softmax ignores it
            if kind in ("mul", "div"):
                c = m.constant_value(other)
                if c is not None:
                    scale = scale * c if kind == "mul" else scale / c
                else:
                    factor = other if kind == "mul" else b.call(operator.truediv, 1.0, other)
                    q = b.call(operator.mul, q, factor)
                if bias is not None:
                    bias = b.call(operator.mul if kind == "mul" else operator.truediv, bias, other)
            elif kind == "add":
                bias = other if bias is None else b.call(operator.add, bias, other)
            elif kind == "sub":
                bias = b.call(operator.neg, other) if bias is None else b.call(operator.sub, bias, other)
            elif kind == "where":                        # where(keep, scores, fill)
                keep, _fill = other
                bias = b.call(torch.where, keep, 0.0 if bias is None else bias, neg_inf)
            elif kind == "masked_fill":                  # masked_fill(scores, drop, fill)
                drop, _fill = other
                bias = b.call(torch.where, drop, neg_inf, 0.0 if bias is None else bias)
        return q, scale, bias
