"""Pass 2: bind each attention site to the KV cache its K and V come from.

Bound: ``torch.cat([past, new], dim=-2)`` where ``past`` is a graph input (the tensor the
model's cache held after the last step: Hugging Face ``DynamicCache``, tuple caches of
hand-written models) or an empty tensor (a prefill). The cat's result may also be returned
(the cache keeps it) or sliced from the end first (a sliding-window cache). A static cache
written in place (``index_copy_``, slice assignment) is recognised and left as it is.
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Optional

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import fx_match as m
from .pass_manager import GraphPass, PassContext
from .sites import AttentionSite, KVBinding

log = logging.getLogger(__name__)



def _is_empty(node: torch.fx.Node) -> bool:
    t = m.tensor_meta(node)
    try:
        return t is not None and t.numel() == 0
    except Exception:          # a symbolic numel: not known to be empty
        return False


def _static_cache_write(node: torch.fx.Node) -> Optional[str]:
    """How ``node`` (a graph input) is written in place, if it is: slice assignment, or an
    in-place op (``index_copy_``, ``copy_``, ``index_put_``: torch names them with one trailing ``_``)."""
    for u in node.users:
        if u.op == "call_function" and u.target is operator.setitem:
            return "slice assignment"
        name = u.target if u.op == "call_method" else getattr(u.target, "__name__", "")
        if u.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__") \
                and u.args and u.args[0] is node:
            return name
    return None


def is_size_query(node: torch.fx.Node) -> bool:
    """``x.size()``, ``x.shape``, ``x.dim()``...: reads metadata, not KV values."""
    if node.op == "call_method":
        return node.target in m.SIZE_METHODS
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "dtype", "device", "ndim")
    return node.op == "call_function" and node.target in m.SIZE_FNS


def _cat_pair(node: torch.fx.Node) -> Optional[tuple]:
    """(a, b) if ``node`` is ``cat([a, b], ...)``, else None."""
    tensors = node.args[0] if node.args else None
    if not m.is_call(node, m.CAT_FNS) or not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        return None
    return tuple(tensors)


def cache_append(node: torch.fx.Node) -> Optional[tuple]:
    """(past, new) if ``node`` is ``cat([past, new], dim=-2)`` of 4-D KV, else None."""
    parts = _cat_pair(node)
    if parts is None or m.arg(node, 1, "dim", 0) not in (2, -2) or m.rank(node) != 4:
        return None
    return parts


def growing_caches(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The caches a graph grows: ``cat([past, new])`` along a token axis whose ``past`` is a graph
    input (what a Hugging Face ``DynamicCache`` or a hand-written tuple cache traces to at a
    decode step). Wider than the appends kvdrive binds (dim -2 of ``[B, H, T, D]``): a cache kept
    as ``[B, T, H, D]``, ``[T, B, H, D]``, ``[B, H, D, T]`` (keys transposed) or ``[B, T, C]``
    grows too, and must be reported when kvdrive does not keep it. 2-D tensors (ids, masks) and
    the last dim of 3-D ones (features) never are."""
    return [node for node in gm.graph.nodes if _appends_to_input(node)]


def _appends_to_input(node: torch.fx.Node) -> bool:
    parts = _cat_pair(node)
    if parts is None:
        return False
    past, ndim = parts[0], m.rank(node)
    value = m.tensor_meta(node)
    if not isinstance(past, torch.fx.Node) or past.op != "placeholder" or ndim not in (3, 4, 5):
        return False
    # the last dim of a 3-D tensor is its features (a state such as a convolution's window grows
    # there too); of a 4-D one it can be the tokens of keys cached transposed ([B, H, D, T])
    last = m.is_last_dim(m.arg(node, 1, "dim", 0), ndim)
    return value is not None and value.dtype.is_floating_point and not (last and ndim == 3)


def cache_source(node: Any) -> Optional[torch.fx.Node]:
    """The growing cache (a ``growing_caches`` cat, or a graph input written in place: a static
    cache) that ``node`` is a view, layout change, head repetition or cast of; None if none."""
    seen = 0
    while isinstance(node, torch.fx.Node) and seen < 16:
        if _appends_to_input(node) or (node.op == "placeholder" and _static_cache_write(node) is not None):
            return node
        if not (m.is_call(node, m.REPEAT_FNS | LAYOUT_FNS, m.REPEAT_METHODS | m.CAST_METHODS | LAYOUT_METHODS)
                and node.args and isinstance(node.args[0], torch.fx.Node)):
            return None
        node, seen = node.args[0], seen + 1
    return None


LAYOUT_FNS = {torch.transpose, torch.permute, torch.swapaxes, torch.movedim}
LAYOUT_METHODS = {"transpose", "permute", "swapaxes", "movedim", "mT"}


def is_tail_slice(node: torch.fx.Node) -> bool:
    """``x[:, :, a:, :]`` with only the token dimension sliced: a window kept from the end."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if len(idx) < 3 or not all(isinstance(i, slice) for i in idx):
        return False
    full = all(i == slice(None) for j, i in enumerate(idx) if j != 2)
    return full and idx[2].step is None and idx[2].stop is None


def _describe_source(source: torch.fx.Node) -> str:
    if m.is_call(source, m.CAT_FNS):
        return f"cat on dim {m.arg(source, 1, 'dim', 0)}"
    return f"written in place by {_static_cache_write(source)}"


def _tokens(node: torch.fx.Node):
    """The token count (dim -2) of a 4-D tensor node: an int or a SymInt."""
    return m.tensor_meta(node).shape[-2]


class BindKVCache(GraphPass):
    name = "bind_kv_cache"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        for site in ctx.sites:
            # read before the rewrite, which leaves the caches' cats dead: the report of caches
            # kvdrive does not keep needs them for skipped sites too
            site.caches = tuple(c for c in (cache_source(site.k), cache_source(site.v)) if c is not None)
            if site.ok:
                site.k_bind = self._binding(site, site.k, "K")
            if site.ok:
                site.v_bind = self._binding(site, site.v, "V")
        for group in _sharing(ctx.sites):
            self._check_group(group)
        for site in ctx.sites:
            if not site.ok:
                log.debug("site %s (%s) not bound: %s", site.node.name, site.layer_name, site.reason)

    def _check_group(self, group: list[AttentionSite]) -> None:
        """The sites that attend one cache append (usually one; more where layers share a
        cache): the first appends (the owner), the others attend its K/V with their own
        queries. Left as they were together, for the first reason found."""
        owner, readers = group[0], group[1:]
        reason = ""
        for r in readers:
            if r.v_bind.cat is not owner.v_bind.cat:
                reason = reason or (f"{r.layer_name} attends the keys of {owner.layer_name}'s cache with other values "
                          f"({r.v_bind.cat.name}, not {owner.v_bind.cat.name})")
        q_len, kv_len = (_tokens(n) for n in (owner.q, owner.k_bind.new))
        if not reason and not statically_known_true(q_len == kv_len):
            # self-attention appends one K/V per query token; these come from another sequence
            reason = (f"cross-attention: {kv_len} new K/V tokens for {q_len} query tokens (K/V computed "
                      "from another sequence, e.g. an encoder's); left as it is, exact")
        chains = set().union(*(s.chain for s in group))
        for b in (owner.k_bind, owner.v_bind):
            reason = reason or self._check_users(owner, b, chains)
        for s in group:
            reason = reason or self._check_chain(s)
        for s in group:
            s.skip(reason)
        for r in readers:
            r.owner = owner

    def _binding(self, site: AttentionSite, node: torch.fx.Node, what: str) -> Optional[KVBinding]:
        if node.op == "placeholder":
            how = _static_cache_write(node)
            if how is not None:
                site.skip(f"static KV cache ({what} written in place by {how}) is not supported yet")
            else:
                site.skip(f"{what} is a graph input with no cache write: no KV cache to keep")
            return None
        source = cache_source(node)
        if not m.is_call(node, m.CAT_FNS) and source is not None:
            shape = tuple(m.tensor_meta(source).shape)
            site.skip(f"{what} ({node.name}) is a view or layout change of the cache {source.name} "
                      f"({_describe_source(source)} of {shape}); kvdrive keeps caches appended as "
                      "cat([past, new], dim=-2) of [batch, heads, tokens, head_dim] (store the cache in that layout)")
            return None
        if not m.is_call(node, m.CAT_FNS):
            site.skip(f"{what} ({node.name}) does not come from a cache write "
                      "(torch.cat([past, new], dim=-2)); this graph keeps no KV cache at this site")
            return None
        parts = cache_append(node)
        if parts is None:
            site.skip(f"{what} is {node.name} = cat of {len(node.args[0])} tensors on dim {m.arg(node, 1, 'dim', 0)}, "
                      "not cat([past, new], dim=-2) of 4-D KV")
            return None
        past, new = parts
        if not isinstance(past, torch.fx.Node) or not (past.op == "placeholder" or _is_empty(past)):
            site.skip(f"past {what} ({getattr(past, 'name', past)}) is neither a graph input nor empty")
            return None
        for u in past.users:
            # one empty tensor may start several caches (K and V, or every layer)
            shared_empty = _is_empty(past) and m.is_call(u, m.CAT_FNS) and u.args[0][0] is past
            if u is not node and not is_size_query(u) and not shared_empty:
                site.skip(f"past {what} ({past.name}) is also used by {u.name}")
                return None
        return KVBinding(node, past, new)

    @staticmethod
    def _check_users(site: AttentionSite, b: KVBinding, chains: set) -> str:
        """Why the cat cannot be kept, if it cannot: its value may only reach the attention
        sites that read it (``chains``), the graph's outputs (possibly as a tail slice) or size
        queries."""
        for u in b.cat.users:
            if u in chains or u.op == "output" or is_size_query(u):
                continue
            if is_tail_slice(u) and all(w.op == "output" or is_size_query(w) for w in u.users):
                site.keeps_last = True
                continue
            return f"cached {b.cat.name} is also used by {u.name} ({u.target}); kvdrive would have to materialise it"
        return ""

    @staticmethod
    def _check_chain(site: AttentionSite) -> str:
        """Why the site's own nodes cannot be replaced, if one of them is used elsewhere."""
        chain = set(site.chain)
        for c in chain:
            if c is site.node:
                continue
            for u in c.users:
                if u not in chain:
                    return f"{c.name}, part of the attention, is also used by {u.name}"
        return ""


def _sharing(sites: list[AttentionSite]) -> list[list[AttentionSite]]:
    """The bound sites grouped by the cache append their keys come from, each group in graph
    order (the sites' order)."""
    groups: dict[torch.fx.Node, list[AttentionSite]] = {}
    for site in sites:
        if site.ok:                          # bound: both bindings made
            groups.setdefault(site.k_bind.cat, []).append(site)
    return list(groups.values())
