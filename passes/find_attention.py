"""Pass 1: find the attention sites of a graph.

Two forms: ``scaled_dot_product_attention(q, k, v, ...)``, and the hand-written
``softmax(q @ k^T * scale + mask, dim=-1) @ v`` (``matmul``/``@``/``bmm``, or ``einsum`` as
``bhqd,bhkd->bhqk`` and ``bhqk,bhkd->bhqd`` in any letters, softmax spelled
``torch.softmax``/``F.softmax``/``.softmax``, the scale and mask applied by mul/div/add/sub,
``where`` or ``masked_fill``, casts and inference dropout around the softmax). GQA/MQA heads
repeated by ``repeat_kv`` (index/expand/reshape, ``repeat_interleave``) are looked through to
the KV tensor itself.
"""
from __future__ import annotations

import math
import operator
import re
from typing import Any, Optional

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
import torch.nn.functional as F

from . import fx_match as m
from .pass_manager import GraphPass, PassContext
from .sites import AttentionSite

_MUL = ({operator.mul, torch.mul}, {"mul", "__mul__", "__rmul__"})
_DIV = ({operator.truediv, torch.div, torch.true_divide}, {"div", "__truediv__", "true_divide"})
_ADD = ({operator.add, torch.add}, {"add", "__add__", "__radd__"})
_SUB = ({operator.sub, torch.sub}, {"sub", "__sub__"})
_WHERE = ({torch.where}, set())
_MASKED_FILL = ({torch.masked_fill}, {"masked_fill"})
# ops on the scores the backward walk looks through, past the first it cannot apply, for q @ k^T
_MAX_UNKNOWN_SCORE_OPS = 4


def layer_name(node: torch.fx.Node) -> str:
    """The module path of the attention layer, from ``nn_module_stack`` (e.g. ``model.layers.3.self_attn``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    return re.sub(r"^L\['[^']*'\](\[\d+\])?\.", "", path)


def _is_identity_getitem(node: torch.fx.Node) -> bool:
    """``x[:, :, None, :, :]``-like: only full slices, None and Ellipsis."""
    idx = node.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in idx)


def strip_head_repeat(node: torch.fx.Node, visited: list[torch.fx.Node]) -> torch.fx.Node:
    """Walk back through GQA head repetition, reshapes and casts; ``visited`` collects them."""
    while isinstance(node, torch.fx.Node):
        if node.target is operator.getitem and node.op == "call_function":
            if not isinstance(node.args[0], torch.fx.Node) or not _is_identity_getitem(node):
                return node
        elif not m.is_call(node, m.REPEAT_FNS | {torch.Tensor.float}, m.REPEAT_METHODS | m.CAST_METHODS):
            return node
        if node.op == "call_method" and node.target == "repeat_interleave" and m.arg(node, 2, "dim") not in (1, -3):
            return node
        visited.append(node)
        node = node.args[0]
    return node


def _through_casts(node: torch.fx.Node, visited: list[torch.fx.Node]) -> torch.fx.Node:
    while m.is_call(node, set(), m.CAST_METHODS):
        visited.append(node)
        node = node.args[0]
    return node


def _is_inference_dropout(node: torch.fx.Node) -> bool:
    if not m.is_call(node, {F.dropout, torch.dropout}, {"dropout"}):
        return False
    p = m.arg(node, 1, "p", 0.5)
    training = m.arg(node, 2, "training" if node.target is F.dropout else "train", node.target is not F.dropout)
    return p == 0 or training is False


class FindAttentionSites(GraphPass):
    name = "find_attention_sites"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        for node in gm.graph.nodes:
            site = None
            if m.is_call(node, m.SDPA):
                site = self._sdpa(node, len(ctx.sites))
            elif m.is_call(node, m.SOFTMAX_FNS, {"softmax"}):
                site = self._softmax(node, len(ctx.sites))
            if site is not None:
                ctx.sites.append(site)

    # -- scaled_dot_product_attention --------------------------------------------------------

    def _sdpa(self, node: torch.fx.Node, index: int) -> AttentionSite:
        a = m.sdpa_args(node)
        site = AttentionSite(index, node, "sdpa", layer_name(node), q=a["query"], mask=a["attn_mask"],
                             is_causal=bool(a["is_causal"]))
        site.chain = [node]
        site.k = strip_head_repeat(a["key"], site.chain)
        site.v = strip_head_repeat(a["value"], site.chain)
        if a["dropout_p"] not in (0, 0.0):
            site.skip(f"dropout_p={a['dropout_p']} (training-time attention dropout)")
        if not isinstance(a["is_causal"], bool):
            site.skip("is_causal is not a constant")
        scale = a["scale"]
        if scale is None:
            d = m.tensor_meta(site.q).shape[-1] if m.tensor_meta(site.q) is not None else None
            if not isinstance(d, int):
                site.skip("head_dim is not static and no scale is given")
            else:
                site.scale = 1.0 / math.sqrt(d)
        elif isinstance(scale, (int, float)):
            site.scale = float(scale)
        elif isinstance(m.example(scale), (torch.SymFloat, float)):
            # a number the graph computes, e.g. a module's float attribute under dynamic=True
            # (``self.scaling.item()``): the ops take its value each call
            site.scale_nodes.append(scale)
        else:
            site.skip(f"scale {scale} is neither a number nor a graph value")
        self._check_shapes(site)
        return site

    # -- softmax(q @ k^T ...) @ v --------------------------------------------------------------

    def _softmax(self, sm: torch.fx.Node, index: int) -> Optional[AttentionSite]:
        if not m.is_last_dim(m.arg(sm, 1, "dim"), m.rank(sm)):
            return None
        chain = [sm]
        # forward: softmax -> casts / inference dropout -> matmul(p, v)
        p, out, weights_read, sink_column = sm, None, [], None
        while True:
            users = list(p.users)
            pv_users = [u for u in users if self._probs_times_v(u, p) is not None]
            if len(users) != 1:
                if len(pv_users) != 1:
                    return None
                # the weights also go elsewhere (returned with output_attentions=True, ...):
                # still the attention, reported as left as it was, never silently
                weights_read += [u for u in users if u is not pv_users[0]]
                users = pv_users
            u = users[0]
            if m.is_call(u, set(), m.CAST_METHODS) or _is_inference_dropout(u):
                chain.append(u)
                p = u
                continue
            if sink_column is None and _drops_last_column(u):       # probs[..., :-1]: the sink's dropped
                sink_column = u
                chain.append(u)
                p = u
                continue
            if (pv := self._probs_times_v(u, p)) is not None:
                out, v = u, pv
            break
        if out is None:
            return None
        # backward: softmax <- (minus the row max) <- (cat with the sinks) <- score ops <- matmul(q, k^T)
        s = _without_row_max(_through_casts(sm.args[0], chain), chain)
        sinks = None
        if sink_column is not None:
            if not (m.is_call(s, m.CAT_FNS) and len(s.args[0]) == 2 and m.is_last_dim(m.arg(s, 1, "dim", 0), m.rank(s))):
                return None
            chain.append(s)
            s, sinks = s.args[0]
            s = _through_casts(s, chain)
        ops, unknown = [], []
        while not m.is_call(s, m.MATMUL_FNS, m.MATMUL_METHODS) and not _is_einsum_scores(s):
            step = self._score_op(s)
            if step is None:
                # an op kvdrive cannot apply (logit soft-capping's tanh, ...): still an attention
                # site if q @ k^T is right above it, reported as left as it was, never silently
                if len(unknown) >= _MAX_UNKNOWN_SCORE_OPS or not isinstance(s, torch.fx.Node) or not s.args \
                        or not isinstance(s.args[0], torch.fx.Node) or s.op not in ("call_function", "call_method"):
                    return None
                unknown.append(s)
                ops.append(("unknown", s))
                chain.append(s)
                s = _through_casts(s.args[0], chain)
                continue
            kind, chain_arg, other = step
            ops.append((kind, other))
            chain.append(s)
            s = _through_casts(chain_arg, chain)
        if len(s.users) != 1:
            return None
        if _is_einsum_scores(s):                     # einsum("bhqd,bhkd->bhqk", q, k)
            _, q, kt = m.einsum_operands(s)
            chain.append(s)
        else:
            q, kt = s.args[0], m.is_kt(s.args[1])
            if kt is None:
                return None
            chain += [s, s.args[1]]
        ops.reverse()                                          # matmul -> softmax order
        site = AttentionSite(index, out, "softmax", layer_name(out), is_causal=False, sinks=sinks)
        if sinks is not None and not (m.rank(sinks) == 4 and statically_known_true(m.tensor_meta(sinks).shape[-1] == 1)):
            site.skip(f"the softmax's extra column {getattr(sinks, 'name', sinks)} is not one logit per "
                      "(sequence, head, query) [B, H, Q, 1]")
        if len(unknown) == 1 and _is_tanh(unknown[0]):
            folded = _fold_soft_cap(ops)
            if folded is not None:
                site.softcap, ops, unknown = folded[0], folded[1], []
        ops = [(kind, other) for kind, other in ops if kind != "unknown"]
        for kind, other in ops:
            factor = m.tensor_meta(other) if kind in ("mul", "div") else None
            if factor is not None and factor.dim() >= 1 and not statically_known_true(factor.shape[-1] == 1):
                site.skip(f"the scores are {'multiplied' if kind == 'mul' else 'divided'} by {other.name} "
                          f"{tuple(factor.shape)}, which varies along the keys; kvdrive folds only factors "
                          "constant across keys (a number, per head or per query) into the scale")
        if weights_read:
            site.skip(f"the attention weights are also read by {', '.join(u.name for u in weights_read)} "
                      "(output_attentions=True returns them), which kvdrive's kernels do not produce")
        if unknown:
            names = ", ".join(dict.fromkeys(_op_name(u) for u in reversed(unknown)))
            site.skip(f"the scores pass through {names} between q @ k^T and the softmax, which kvdrive's "
                      "attention kernels do not apply (they apply logit soft-capping: c * tanh(scores / c), "
                      "with only scale factors before the tanh)")
        site.chain = chain + [out]
        site.score_ops = ops
        site.out_3d = m.rank(out) == 3
        site.q = self._to_4d(q, site)
        site.k = strip_head_repeat(self._to_4d(kt, site, chain_out=site.chain), site.chain)
        site.v = strip_head_repeat(self._to_4d(v, site, chain_out=site.chain), site.chain)
        self._check_shapes(site)
        return site

    @staticmethod
    def _probs_times_v(u: torch.fx.Node, p: torch.fx.Node) -> Optional[torch.fx.Node]:
        """v, if ``u`` is ``p @ v`` (matmul, bmm or einsum)."""
        if m.is_call(u, m.MATMUL_FNS, m.MATMUL_METHODS) and u.args[0] is p:
            return u.args[1]
        if (pv := m.einsum_operands(u)) is not None and pv[0] == "pv" and pv[1] is p:
            return pv[2]
        return None

    @staticmethod
    def _score_op(s: torch.fx.Node):
        """(kind, the scores operand, the other operand) of an elementwise op on the scores."""
        if not isinstance(s, torch.fx.Node):
            return None
        args = list(s.args)
        if m.is_call(s, *_MUL) and len(args) == 2 and not s.kwargs:
            a, b = args
            return ("mul", a, b) if _scores_side(a, b) else ("mul", b, a)
        if m.is_call(s, *_DIV) and len(args) == 2 and not s.kwargs:
            return "div", args[0], args[1]
        if m.is_call(s, *_ADD) and len(args) == 2 and not s.kwargs:
            a, b = args
            return ("add", a, b) if _scores_side(a, b) else ("add", b, a)
        if m.is_call(s, *_SUB) and len(args) == 2 and not s.kwargs:
            return "sub", args[0], args[1]
        if m.is_call(s, *_WHERE) and len(args) == 3:
            return "where", args[1], (args[0], args[2])
        if m.is_call(s, *_MASKED_FILL) and len(args) == 3:
            return "masked_fill", args[0], (args[1], args[2])
        return None

    @staticmethod
    def _to_4d(node: torch.fx.Node, site: AttentionSite, chain_out: Optional[list] = None) -> torch.fx.Node:
        """For the ``bmm`` form: the 4-D tensor a ``[B*H, S, D]`` operand was reshaped from."""
        while m.rank(node) == 3 and m.is_call(node, {torch.reshape}, {"reshape", "view", "contiguous"}):
            if chain_out is not None:
                chain_out.append(node)
            node = node.args[0]
        if m.rank(node) != 4:
            site.skip(f"operand {getattr(node, 'name', node)} is not a 4-D [batch, heads, tokens, head_dim] tensor")
        return node

    @staticmethod
    def _check_shapes(site: AttentionSite) -> None:
        q, k, v = (m.tensor_meta(x) for x in (site.q, site.k, site.v))
        if q is None or k is None or v is None or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            site.skip("q, k, v are not 4-D [batch, heads, tokens, head_dim] tensors")
            return
        hq, hkv = q.shape[1], k.shape[1]
        if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv:
            site.skip(f"{hq} query heads are not a multiple of {hkv} KV heads")
        if not statically_known_true(v.shape[-1] == k.shape[-1]):
            # MiMo-V2's attention: values of another head_dim than the keys'
            site.skip(f"V's head_dim {v.shape[-1]} is not K's {k.shape[-1]}: kvdrive keeps a block's K and V "
                      "in slots of one head_dim")


def _is_einsum_scores(node) -> bool:
    ops = m.einsum_operands(node)
    return ops is not None and ops[0] == "qk"


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _drops_last_column(node: torch.fx.Node) -> bool:
    """``x[..., :-1]`` (or with full slices before the last dim)."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[1], tuple):
        return False
    *lead, last = node.args[1]
    return last == slice(None, -1, None) and all(i is Ellipsis or i == slice(None) for i in lead)


def _without_row_max(node: torch.fx.Node, chain: list) -> torch.fx.Node:
    """``x`` of ``x - x.max(-1, keepdim=True).values`` (or ``amax``): a shift per row, which the
    softmax does not see (gpt-oss's eager attention); ``node`` itself otherwise."""
    if not (m.is_call(node, *_SUB) and len(node.args) == 2 and isinstance(node.args[1], torch.fx.Node)):
        return node
    x, mx = node.args
    taken = [mx]
    if (mx.op == "call_function" and mx.target is operator.getitem and mx.args[1] == 0) or \
            (mx.op == "call_function" and mx.target is getattr and mx.args[1] == "values"):
        mx = mx.args[0]
        taken.append(mx)
    if not (m.is_call(mx, {torch.max, torch.amax}, {"max", "amax"}) and mx.args and mx.args[0] is x
            and m.is_last_dim(m.arg(mx, 1, "dim"), m.rank(x)) and m.arg(mx, 2, "keepdim", False)):
        return node
    chain += [node, *taken]
    return x


def _is_tanh(node: torch.fx.Node) -> bool:
    return m.is_call(node, {torch.tanh, F.tanh}, {"tanh"})


_BIAS_OPS = ("add", "sub", "where", "masked_fill")


def _fold_soft_cap(ops: list) -> Optional[tuple[float, list]]:
    """Logit soft-capping in the score ops (matmul -> softmax order, the tanh as ``"unknown"``):
    ``c * tanh(scores * factors)``, Gemma 2's ``tanh(scores / c) * c``. Returns (c, the ops as
    kvdrive applies them: the factors, then ``* c`` into the scale, which the kernels divide by c
    inside the tanh, then the bias ops); None where the ops are not of that form: only scale
    factors before the tanh (a bias added there would be capped too), only constant factors
    (the cap) and then bias ops after it."""
    at = next(i for i, (kind, _) in enumerate(ops) if kind == "unknown")
    before, after = ops[:at], ops[at + 1:]
    if any(kind not in ("mul", "div") for kind, _ in before):
        return None
    cap, j = 1.0, 0
    while j < len(after) and after[j][0] in ("mul", "div") and (c := m.constant_value(after[j][1])) is not None:
        cap = cap * c if after[j][0] == "mul" else cap / c
        j += 1
    if not cap > 0 or any(kind not in _BIAS_OPS for kind, _ in after[j:]):
        return None
    return cap, before + [("mul", cap)] + after[j:]


def _scores_side(a: Any, b: Any) -> bool:
    """Whether ``a`` (not ``b``) is the scores operand of ``a op b``: a tensor of rank >= 3, and
    the one that comes from q @ k^T where both are tensors (a per-head factor ``[1, H, 1, 1]``
    has rank 4 too, on either side)."""
    if not (isinstance(a, torch.fx.Node) and m.rank(a) is not None and m.rank(a) >= 3):
        return False
    return not isinstance(b, torch.fx.Node) or _depends_on_matmul(a) or not _depends_on_matmul(b)


def _depends_on_matmul(node: torch.fx.Node, depth: int = 12) -> bool:
    """Whether ``node`` is (a few elementwise ops away from) a matmul: the scores side of an add."""
    for _ in range(depth):
        if m.is_call(node, m.MATMUL_FNS, m.MATMUL_METHODS) or _is_einsum_scores(node):
            return True
        if not isinstance(node, torch.fx.Node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return False
        node = node.args[0]
    return False
