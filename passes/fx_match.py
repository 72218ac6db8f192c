"""Small predicates over Dynamo FX nodes (torch-level ops, any spelling)."""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx
import torch.nn.functional as F

SDPA = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
SDPA_PARAMS = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
MATMUL_FNS = {torch.matmul, operator.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
SOFTMAX_FNS = {torch.softmax, F.softmax, torch.special.softmax}
CAT_FNS = {torch.cat, torch.concat, torch.concatenate}
# ops that only change a dtype or are the identity at inference
CAST_METHODS = {"to", "type", "float", "half", "bfloat16", "double", "contiguous", "type_as"}
# ops that repeat KV heads for GQA (repeat_kv) or reshape without changing values
REPEAT_METHODS = {"expand", "reshape", "view", "repeat_interleave", "contiguous", "unsqueeze", "flatten"}
REPEAT_FNS = {torch.repeat_interleave, torch.reshape, torch.unsqueeze, torch.flatten, operator.getitem}
SIZE_METHODS = {"size", "dim", "numel", "stride", "is_contiguous", "get_device"}
SIZE_FNS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_size}


def is_call(node: Any, fns: set = frozenset(), methods: set = frozenset()) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_function":
        return node.target in fns
    if node.op == "call_method":
        return node.target in methods
    return False


def arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """An argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def sdpa_args(node: torch.fx.Node) -> dict[str, Any]:
    out = dict(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
    for name, value in zip(SDPA_PARAMS, node.args):
        out[name] = value
    out.update(node.kwargs)
    return out


def example(node: Any) -> Any:
    """The example value (a fake tensor, SymInt or constant) Dynamo recorded for a node."""
    if isinstance(node, torch.fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def tensor_meta(node: Any) -> Optional[torch.Tensor]:
    value = example(node)
    return value if isinstance(value, torch.Tensor) else None


def rank(node: Any) -> Optional[int]:
    t = tensor_meta(node)
    return None if t is None else t.dim()


def is_last_dim(dim: Any, ndim: Optional[int]) -> bool:
    return dim == -1 or (ndim is not None and dim == ndim - 1)


def is_kt(node: Any) -> Optional[torch.fx.Node]:
    """If ``node`` is ``k.transpose(-1, -2)`` (any spelling), return ``k``."""
    if not isinstance(node, torch.fx.Node):
        return None
    nd = rank(node)
    if is_call(node, {torch.transpose}, {"transpose"}):
        dims = {node.args[1] if len(node.args) > 1 else node.kwargs.get("dim0"),
                node.args[2] if len(node.args) > 2 else node.kwargs.get("dim1")}
        if nd is not None and {d % nd for d in dims if isinstance(d, int)} == {nd - 1, nd - 2}:
            return node.args[0]
    if is_call(node, {torch.permute}, {"permute"}):
        perm = node.args[1:] if len(node.args) > 2 else node.args[1]
        if nd is not None and list(perm) == [*range(nd - 2), nd - 1, nd - 2]:
            return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


def einsum_operands(node: Any) -> Optional[tuple[str, torch.fx.Node, torch.fx.Node]]:
    """``torch.einsum(equation, a, b)`` (operands listed or in one list) of two 4-D operands:
    ``("qk", q, k)`` for ``q @ k^T`` (``bhqd,bhkd->bhqk``), ``("pv", p, v)`` for ``p @ v``
    (``bhqk,bhkd->bhqd``), any letters, ``...`` for the leading two; None for anything else."""
    if not is_call(node, {torch.einsum}) or not node.args or not isinstance(node.args[0], str):
        return None
    ops = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    if len(ops) != 2 or not all(isinstance(o, torch.fx.Node) and rank(o) == 4 for o in ops):
        return None
    eq = node.args[0].replace(" ", "").replace("...", "#")
    if eq.count("->") != 1 or eq.count(",") != 1:
        return None
    lhs, out = eq.split("->")
    a, b = lhs.split(",")
    if "#" in a + b + out:                          # "..." stands for the batch and head letters
        if not (a.startswith("#") and b.startswith("#") and out.startswith("#")):
            return None
        a, b, out = ("BH" + t[1:] for t in (a, b, out))
    if not all(len(t) == 4 and len(set(t)) == 4 for t in (a, b, out)) or not (a[:2] == b[:2] == out[:2]):
        return None
    if a[3] == b[3] and a[3] not in out and out[2:] == a[2] + b[2] and a[2] != b[2]:
        return "qk", ops[0], ops[1]
    if a[3] == b[2] and a[3] not in out and out[2:] == a[2] + b[3] and a[2] != b[3]:
        return "pv", ops[0], ops[1]
    return None


def constant_value(node: Any) -> Optional[float]:
    """A Python number, or a node that builds a 0-d tensor from constants (``torch.full([], c)``)."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target in (torch.full, torch.tensor, torch.scalar_tensor):
        values = [a for a in node.args if not isinstance(a, (list, tuple))] + \
                 [v for k, v in node.kwargs.items() if k == "fill_value"]
        for value in values:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None
