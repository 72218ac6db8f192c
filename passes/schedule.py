"""Pass: schedule the issue of each site's reads and CPU part, ``prefetch_depth`` layers ahead.

Per rewritten site of layer ``l`` the rewrite emits (names ``*_l{l}``)::

    ahead_l     = prefetch_ahead(kv_step, after, l)     # start disk -> host reads for layer l
    selection_l = select(ticket_l, q, scale, policy)
    plan_l      = prefetch(selection_l, ahead_l)        # the step's own reads
    host_l      = host_attention(plan_l, q, mask, ...)  # starts the CPU part, returns a handle
    device_l    = sparse_attention(plan_l, q, ...)      # the device part
    attention_l = merge(host_l, q, out_d, lse_d)        # awaits the CPU part

with ``after = kv_step``: layer l's reads start only when layer l does. With depth d > 0 this
pass makes the k-th site's ``after`` the ``prefetch`` node of the site d places earlier (the
step's ``kv_step`` for the first d sites), so the data dependency itself says "issue the reads
for layer l while layer l - d runs", then reorders the graph so that every ``prefetch_ahead``,
``prefetch`` and ``host_attention`` is issued as soon as its inputs allow, and everything else
keeps its order. The graph computes the same values: only those ``after`` arguments change,
and only the order of nodes that depend on nothing but their inputs and the runtime's handles.

The order comes from ``nx.lexicographical_topological_sort`` over the dependency DAG (data
edges, order edges that pin side effects, ``host -> sparse`` per site), keyed by

    placeholders (-1, 0, position)  <  early nodes (0, priority, position)  <  others (1, 0, position)

Why the other ("late") nodes keep their relative order: every edge of the DAG goes forward in
the original order (the FX graph is topologically sorted; order edges are added in order; the
rewrite emits ``host_attention`` before ``sparse_attention``), so a node's ancestors all sit
before it. Suppose late ``b`` were emitted while a late ``a`` from before it was not; take the
first such ``a``. If all of ``a``'s ancestors were emitted, ``a`` was ready with a smaller key
than ``b``. Otherwise, the first unemitted ancestor ``e`` of ``a`` had all its inputs emitted
(they are ancestors of ``a`` before ``e``; late ones are before ``a`` and so emitted by the
choice of ``a``), so it was ready; it is early (late ones are emitted), so its key is smaller
than ``b``'s. Either way the sort would not have picked ``b``. Placeholders come first in any
FX graph and are always ready with the smallest keys. ``_check`` asserts this after the sort.

Graphs without sites of this form (no kvdrive ops, or the older rewrite whose ``prefetch``
takes one argument) are left exactly as they are.
"""
from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass
from typing import Any, Optional

import networkx as nx
import torch.fx

from .pass_manager import GraphPass, PassContext

Node = torch.fx.Node

_PRIORITY = {"prefetch_ahead": 0, "prefetch": 1, "host_attention": 2}   # among the early nodes


def _kind(node: Any) -> Optional[str]:
    """``"prefetch"`` for a call of ``torch.ops.kvdrive.prefetch.default`` (from the target's
    name, ``kvdrive.prefetch.default``: an op the runtime has not registered yet, or a stand-in
    with that name in a test, reads the same); None for anything else."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    parts = str(node.target).split(".")
    if len(parts) == 3 and parts[0] == "kvdrive" and parts[2] == "default":
        return parts[1]
    return None


_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift}
_GLOBAL_STATE = ("_set_grad_enabled", "_enter_autocast", "_exit_autocast", "_record_function")


def _is_inplace(node: Node) -> bool:
    """A node whose effect is not only its value: an in-place op (torch names them with one
    trailing ``_``: ``index_copy_``), slice assignment or augmented assignment, a mutating
    op overload, a switch of global state Dynamo puts in graphs (grad mode, autocast), or a
    submodule call (unknown code)."""
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return True
    if node.op in ("call_method", "call_function"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if (name.endswith("_") and not name.endswith("__")) or name.startswith(_GLOBAL_STATE):
            return True
        schema = getattr(node.target, "_schema", None)
        if schema is not None and getattr(schema, "is_mutable", False) and _kind(node) is None:
            return True
    return node.op == "call_module"                     # unknown code: may write anything


@dataclass
class _Site:
    """One site of the form in the module docstring."""

    layer: int
    ahead: Node
    select: Node
    plan: Node
    host: Node
    device: Node
    merge: Node


def _user(node: Node, kind: str) -> Optional[Node]:
    """The single user of ``node`` that is a kvdrive ``kind`` op (None if none or several)."""
    found = [u for u in node.users if _kind(u) == kind]
    return found[0] if len(found) == 1 else None


def _site_of(select: Node) -> Optional[_Site]:
    """The site around a ``select`` node, if it has the form this pass schedules."""
    plan = _user(select, "prefetch")
    if plan is None or len(plan.args) != 2 or plan.args[0] is not select:
        return None                                      # the older one-argument prefetch
    ahead = plan.args[1]
    if _kind(ahead) != "prefetch_ahead" or len(ahead.args) != 3 or not isinstance(ahead.args[0], Node):
        return None
    host, device = _user(plan, "host_attention"), _user(plan, "sparse_attention")
    merge = _user(host, "merge") if host is not None else None
    if device is None or merge is None:
        return None
    layer = ahead.args[2]
    return _Site(layer if isinstance(layer, int) else -1, ahead, select, plan, host, device, merge)


def find_sites(graph: torch.fx.Graph) -> tuple[list[_Site], int]:
    """The schedulable sites in the order of their ``select`` nodes, and how many ``select``
    nodes were not part of one (left alone)."""
    sites, other, claimed = [], 0, set()
    for node in graph.nodes:
        if _kind(node) != "select":
            continue
        site = _site_of(node)
        if site is None or site.ahead in claimed:
            other += 1
            continue
        claimed.add(site.ahead)
        sites.append(site)
    return sites, other


def _early_nodes(sites: list[_Site], depth: int) -> dict[Node, int]:
    """The nodes to issue as soon as their inputs allow, with their priority: each site's
    prefetch and host start (and getitems of them), and its ahead-read when depth > 0 (with
    depth 0 the ahead-read stays where the rewrite put it: no lookahead)."""
    early: dict[Node, int] = {}
    for s in sites:
        for node in ([s.ahead] if depth > 0 else []) + [s.plan, s.host]:
            early[node] = _PRIORITY[_kind(node)]
            for u in node.users:
                if u.target is operator.getitem:
                    early[u] = early[node]
    return early


def dependency_dag(graph: torch.fx.Graph, sites: list[_Site]) -> nx.DiGraph:
    """Data edges (input -> user); order edges that keep every side effect where it was (each
    in-place op, setitem, call_module and the output after the previous one, every kvdrive op
    between the side effects around it; kvdrive ops among themselves by their data only); and
    ``host_attention -> sparse_attention`` per site, so the device part launches after the CPU
    part started (and before the merge awaits it)."""
    dag = nx.DiGraph()
    last_effect: Optional[Node] = None
    kvdrive_since: list[Node] = []
    for node in graph.nodes:
        dag.add_node(node)
        for inp in node.all_input_nodes:
            dag.add_edge(inp, node)
        if _kind(node) is not None:
            if last_effect is not None:
                dag.add_edge(last_effect, node)
            kvdrive_since.append(node)
        elif _is_inplace(node) or node.op == "output":
            if last_effect is not None:
                dag.add_edge(last_effect, node)
            for k in kvdrive_since:
                dag.add_edge(k, node)
            last_effect, kvdrive_since = node, []
    for s in sites:
        dag.add_edge(s.host, s.device)
    return dag


def _fewest_moves(old: list[Node], new: list[Node]) -> int:
    """How many nodes must move to turn ``old`` into ``new``: the nodes outside a longest
    subsequence both share (a longest increasing run of old positions, O(n log n))."""
    pos = {n: i for i, n in enumerate(old)}
    tails: list[int] = []
    for n in new:
        i = bisect.bisect_left(tails, pos[n])
        tails[i:i + 1] = [pos[n]]
    return len(new) - len(tails)


def _snapshot(graph: torch.fx.Graph) -> dict[Node, tuple]:
    return {n: (n.args, dict(n.kwargs)) for n in graph.nodes}


def _same(a: Any, b: Any) -> bool:
    """Structural equality of FX arguments (nodes by identity; no tensor ``==``)."""
    if a is b:
        return True
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, slice) and isinstance(b, slice):
        return _same((a.start, a.stop, a.step), (b.start, b.stop, b.step))
    if isinstance(a, (Node, torch.Tensor)) or isinstance(b, (Node, torch.Tensor)):
        return False
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return False


def _check(graph: torch.fx.Graph, before: dict[Node, tuple], old: list[Node], early: dict[Node, int],
           rewired: dict[Node, Node]) -> None:
    """What the pass promises, checked: the same nodes, the same arguments (but the rewired
    ``after`` of ahead-reads), and the late nodes in their order."""
    now = list(graph.nodes)
    if set(now) != set(before) or len(now) != len(before):
        raise AssertionError(f"kvdrive schedule: the node set changed: lost {sorted(n.name for n in set(before) - set(now))}, "
                             f"gained {sorted(n.name for n in set(now) - set(before))}")
    for node, (args, kwargs) in before.items():
        if node in rewired:
            args = (args[0], rewired[node]) + tuple(args[2:])
        if not (_same(node.args, args) and _same(dict(node.kwargs), kwargs)):
            raise AssertionError(f"kvdrive schedule: the arguments of {node.name} changed: "
                                 f"{args}, {kwargs} -> {node.args}, {dict(node.kwargs)}")
    late_old = [n for n in old if n not in early]
    late_new = [n for n in now if n not in early]
    if late_old != late_new:
        first = next(i for i, (a, b) in enumerate(zip(late_old, late_new)) if a is not b)
        raise AssertionError(f"kvdrive schedule: a node that is not issued early moved: {late_old[first].name} "
                             f"expected where {late_new[first].name} now is")


def _layers_ahead(order: dict[Node, int], sites: list[_Site], k: int) -> int:
    """How many other sites' attention (their merge) runs between the k-th site's ahead-read
    and its select: the overlap the reads get, measured on the final order."""
    s = sites[k]
    return sum(1 for o in sites if o is not s and order[s.ahead] < order[o.merge] < order[s.select])


class ScheduleSites(GraphPass):
    """Issues each site's ahead-read ``ctx.prefetch_depth`` layers early and every read and CPU
    part as soon as its inputs allow; records the schedule in ``ctx.schedule``."""

    name = "schedule"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        depth = ctx.prefetch_depth
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"kvdrive schedule: prefetch_depth must be an int >= 0, got {depth!r}")
        graph = gm.graph
        sites, other = find_sites(graph)
        ctx.schedule = {"depth": depth, "sites": len(sites), "unscheduled_selects": other, "moved": 0, "layers": []}
        if not sites:
            return                                        # nothing recognised: leave the graph as it is
        before, old, early = _snapshot(graph), list(graph.nodes), _early_nodes(sites, depth)
        rewired = self._rewire(sites, depth)
        try:
            order = self._order(graph, sites, old, early)
        except AssertionError:
            for ahead in rewired:                       # the graph as it came
                ahead.update_arg(1, before[ahead][0][1])
            raise
        if order != old:
            self._apply(order)
        _check(graph, before, old, early, rewired)
        graph.lint()
        gm.recompile()
        ctx.schedule.update(moved=_fewest_moves(old, order), layers=self._record(graph, sites, depth))

    @staticmethod
    def _rewire(sites: list[_Site], depth: int) -> dict[Node, Node]:
        """Step 1: the k-th site's ahead-read waits for the prefetch of site k - depth (the
        step's ``kv_step`` for the first sites). Returns ahead node -> its new ``after``."""
        rewired: dict[Node, Node] = {}
        if depth == 0:
            return rewired
        for k, s in enumerate(sites):
            after = sites[k - depth].plan if k >= depth else s.ahead.args[0]
            if s.ahead.args[1] is not after:
                rewired[s.ahead] = after
                s.ahead.update_arg(1, after)
        return rewired

    @staticmethod
    def _order(graph: torch.fx.Graph, sites: list[_Site], old: list[Node], early: dict[Node, int]) -> list[Node]:
        """Step 2: the new node order (see the module docstring for why late nodes keep theirs)."""
        dag = dependency_dag(graph, sites)
        if not nx.is_directed_acyclic_graph(dag):
            cycle = nx.find_cycle(dag)
            raise AssertionError(f"kvdrive schedule: the dependencies have a cycle: "
                                 f"{' -> '.join(a.name for a, _ in cycle)}")
        pos = {n: i for i, n in enumerate(old)}

        def key(n: Node) -> tuple[int, int, int]:
            if n.op == "placeholder":
                return (-1, 0, pos[n])
            if n in early:
                return (0, early[n], pos[n])
            return (1, 0, pos[n])

        return list(nx.lexicographical_topological_sort(dag, key=key))

    @staticmethod
    def _apply(order: list[Node]) -> None:
        """Step 3: move the nodes so the graph's order is ``order`` (each right after the one
        before it; the first then heads the graph)."""
        for prev, node in zip(order, order[1:]):
            if prev.next is not node:
                prev.append(node)

    @staticmethod
    def _record(graph: torch.fx.Graph, sites: list[_Site], depth: int) -> list[dict]:
        """Step 5: per site, where its ahead-read was issued and where its stages sit."""
        order = {n: i for i, n in enumerate(graph.nodes)}
        return [{"layer": s.layer, "ahead_after": s.ahead.args[1].name if isinstance(s.ahead.args[1], Node) else None,
                 "layers_ahead": _layers_ahead(order, sites, k),
                 "ahead": order[s.ahead], "select": order[s.select], "prefetch": order[s.plan],
                 "host_start": order[s.host], "device_start": order[s.device], "merge": order[s.merge]}
                for k, s in enumerate(sites)]
