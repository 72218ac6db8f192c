"""An attention site of a traced graph, and what the passes learned about it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch.fx


@dataclass
class KVBinding:
    """Where a site's K or V comes from: ``cat([past, new], dim=-2)``.

    past: a graph input (the cache's tensor from the last step) or an empty tensor (a prefill).
    """

    cat: torch.fx.Node
    past: torch.fx.Node
    new: torch.fx.Node

    def describe(self) -> str:
        past = self.past.name if self.past.op == "placeholder" else f"empty {self.past.name}"
        return f"cat([{past}, {self.new.name}]) -> {self.cat.name}"


@dataclass
class AttentionSite:
    """One attention computation: ``softmax(scale * q @ k^T + bias) @ v``.

    node: the node whose value is the attention output ``[B, Hq, Q, D]`` (SDPA, or the final
    matmul of the hand-written form; ``out_3d`` when that is a ``bmm`` on ``[B*Hq, Q, D]``).
    chain: the site's own nodes, which the rewrite leaves dead.
    q, k, v: the 4-D operands (k, v before any GQA head repetition). scale: a constant factor;
    scale_nodes: graph values the scale is multiplied by (a SymFloat under dynamic=True).
    score_ops: the elementwise ops between ``q @ k^T`` and the softmax, as (op, args) to
    rebuild the additive bias from. softcap: logit soft-capping's cap (0: none); the scale then
    includes it (``_fold_soft_cap`` in find_attention).
    """

    index: int
    node: torch.fx.Node
    kind: str
    layer_name: str
    q: Optional[torch.fx.Node] = None
    k: Optional[torch.fx.Node] = None
    v: Optional[torch.fx.Node] = None
    mask: Optional[torch.fx.Node] = None
    is_causal: bool = False
    scale: float = 1.0
    scale_nodes: list[torch.fx.Node] = field(default_factory=list)
    score_ops: list[tuple[str, Any]] = field(default_factory=list)
    softcap: float = 0.0        # logit soft-capping: the kernels take softcap * tanh(scale * q.k / softcap)
    sinks: Optional[torch.fx.Node] = None   # attention sinks: a logit per (sequence, head, query) [B, H, Q, 1]
                                            # in the softmax's denominator, attending nothing (gpt-oss)
    out_3d: bool = False
    chain: list[torch.fx.Node] = field(default_factory=list)
    k_bind: Optional[KVBinding] = None
    v_bind: Optional[KVBinding] = None
    keeps_last: bool = False
    caches: tuple = ()          # the growing caches K and V are views of (``bind_kv_cache.cache_source``)
    # the site that appends the KV this site attends, where another does (layers that share a
    # cache: Gemma 3n's and Gemma 4's KV-sharing layers attend an earlier layer's K/V)
    owner: Optional["AttentionSite"] = None
    ticket: Optional[torch.fx.Node] = None   # the rewrite's ticket of this site's append (owners)
    rewritten: bool = False
    reason: str = ""

    def skip(self, reason: str) -> None:
        self.reason = self.reason or reason

    @property
    def ok(self) -> bool:
        return not self.reason

    def binding(self) -> str:
        if self.owner is not None:
            return f"K, V of {self.owner.layer_name} (its cache, shared)"
        if self.k_bind is None and self.v_bind is None:
            return "-"
        window = ", keeps last tokens (sliding window)" if self.keeps_last else ""
        k, v = (b.describe() if b is not None else "no cache write" for b in (self.k_bind, self.v_bind))
        return f"K {k}; V {v}{window}"
