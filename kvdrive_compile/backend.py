"""The ``kvdrive`` torch.compile backend (registered through the ``torch_dynamo_backends``
entry point, so ``torch.compile(fn, backend="kvdrive", options={...})`` finds it)."""
from __future__ import annotations

import itertools
import logging
import operator
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx

from . import ops  # noqa: F401  (registers the kvdrive:: custom ops)
from .dynamic_sizes import retrace_with_dynamic_sizes
from .options import parse_options
from .passes import fx_match as m
from .passes.bind_kv_cache import BindKVCache
from .passes.find_attention import FindAttentionSites
from .passes.guard_standins import GuardStandIns
from .passes.pass_manager import PassContext, PassManager
from .passes.rewrite_attention import RewriteAttention
from .passes.schedule import ScheduleSites
from .passes.sites import AttentionSite
from .passes.verify import VerifyGraph
from .runtimes import is_standin, policy_for, runtime_for

log = logging.getLogger(__name__)


@dataclass
class Counters:
    """What the backend did, for tests and users: graphs compiled, sites found/rewritten/skipped,
    and traces Dynamo was asked to redo with dynamic input sizes (``dynamic_retraces``)."""

    graphs: int = 0
    sites_found: int = 0
    sites_rewritten: int = 0
    sites_skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0
    dynamic_retraces: int = 0

    def reset(self) -> None:
        self.__init__()


counters = Counters()
_graph_ids = itertools.count()
_layer_ids: dict[int, dict[str, int]] = {}           # runtime id -> module path -> layer number


def default_passes() -> list:
    return [FindAttentionSites(), BindKVCache(), RewriteAttention(), GuardStandIns(), ScheduleSites(), VerifyGraph()]


def kvdrive_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], *,
                    options: Optional[dict] = None, mode: Optional[str] = None) -> Callable:
    """Rewrite the attention of a Dynamo graph to keep its KV in the kvdrive runtime.

    mode: accepted for Hugging Face, which passes one (e.g. "reduce-overhead"); kvdrive has no
    modes and ignores it.
    """
    t0 = time.perf_counter()
    opts = parse_options(options)
    retrace_with_dynamic_sizes(gm, example_inputs, counters)
    if mode not in (None, "default"):
        log.info("kvdrive ignores mode=%r", mode)
    rid = runtime_for(opts)
    ctx = PassContext(runtime_id=rid, policy_id=policy_for(opts), graph_index=next(_graph_ids),
                      layer_ids=_layer_ids.setdefault(rid, {}), prefetch_depth=opts.prefetch_depth,
                      dump_dir=opts.dump_dir, example_inputs=list(example_inputs), is_standin=is_standin)
    PassManager(default_passes()).run(gm, ctx)
    _report_skips(ctx)
    counters.graphs += 1
    counters.sites_found += len(ctx.sites)
    counters.sites_rewritten += len(ctx.rewritten)
    counters.sites_skipped += len(ctx.skipped)
    counters.compile_seconds += time.perf_counter() - t0
    return gm


def compile(model: torch.nn.Module, *, dynamic: Optional[bool] = None, **options: Any) -> torch.nn.Module:
    """Compile ``model.forward`` with the kvdrive backend, in place (Hugging Face's ``generate``
    calls it), and return ``model``. The options are checked here, at once: ``torch.compile``
    gives a backend its options only after Dynamo has traced the first call (seconds on a real
    model), and has no hook that would let a backend check them sooner.

    ``kvdrive_compile.compile(model, device_memory="256MiB")`` is
    ``model.forward = torch.compile(model.forward, backend="kvdrive", options={...})``."""
    parse_options(options)
    model.forward = torch.compile(model.forward, backend="kvdrive", options=options, dynamic=dynamic)
    return model


# -- sites left as they were ---------------------------------------------------------------------

def _written_in_place(node: torch.fx.Node) -> bool:
    """An in-place op (``index_copy_``, ``copy_``: torch names them with one trailing ``_``) or
    slice assignment writes to ``node``."""
    return any(u.target is operator.setitem or (u.op == "call_method" and str(u.target).endswith("_")
                                                 and not str(u.target).endswith("__")) for u in node.users)


def _keeps_growing_cache(site: AttentionSite) -> bool:
    """Whether a skipped site's K/V is a cache kvdrive should have kept: appended to by a cat, or a
    graph input written in place (a static cache). A cache input only read (an encoder's K/V for
    cross-attention) or K/V computed in the graph hold nothing that grows."""
    if site.reason.startswith("cross-attention"):
        return False
    return any(m.is_call(kv, m.CAT_FNS) or (isinstance(kv, torch.fx.Node) and kv.op == "placeholder"
                                              and _written_in_place(kv)) for kv in (site.k, site.v))


def _summary(sites: list[AttentionSite]) -> str:
    """``N x <reason> (layer, layer, layer, +K more)`` per reason; reasons that differ only in
    numbers (node names: ``cat_3``, ``l_kwargs_cache_layers_3_keys``) are one reason."""
    groups: dict[str, list[AttentionSite]] = {}
    for site in sites:
        groups.setdefault(re.sub(r"\d+", "#", re.sub(r"_\d+\b", "", site.reason)), []).append(site)
    parts = []
    for group in groups.values():
        layers = list(dict.fromkeys(s.layer_name for s in group))
        more = f", +{len(layers) - 3} more" if len(layers) > 3 else ""
        parts.append(f"{len(group)} x {group[0].reason} ({', '.join(layers[:3])}{more})")
    return "; ".join(parts)


def _report_skips(ctx: PassContext) -> None:
    """Per graph, one WARNING for the skipped sites whose KV cache stays in the model (grouped by
    reason) and one INFO for those that keep no cache; each site's reason in ``counters``."""
    for site in ctx.skipped:
        counters.skip_reasons.append(
            f"kvdrive: attention site {site.node.name} in {site.layer_name} left as it was: {site.reason}")
    cached = [s for s in ctx.skipped if _keeps_growing_cache(s)]
    other = [s for s in ctx.skipped if not _keeps_growing_cache(s)]
    n = len(ctx.sites)
    if cached:
        log.warning("kvdrive: graph %d: attention left as it was at %d of %d sites, whose KV cache stays in "
                    "the model (exact, but not in kvdrive's tiers): %s", ctx.graph_index, len(cached), n,
                    _summary(cached))
    if other:
        log.info("kvdrive: graph %d: attention left as it was at %d of %d sites, which keep no KV cache: %s",
                 ctx.graph_index, len(other), n, _summary(other))
