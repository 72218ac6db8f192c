"""The ``kvdrive`` torch.compile backend (registered through the ``torch_dynamo_backends``
entry point, so ``torch.compile(fn, backend="kvdrive", options={...})`` finds it)."""
from __future__ import annotations

import copy
import itertools
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx

from .ops import call_directly  # (importing ops registers the kvdrive:: custom ops)
from .dynamic_sizes import retrace_with_dynamic_sizes
from .options import parse_options
from .passes import fx_match as m
from .passes.bind_kv_cache import BindKVCache, growing_caches
from .passes.cpu_linears import CpuLinears
from .passes.find_attention import FindAttentionSites
from .passes.guard_standins import GuardStandIns, is_kvdrive_op
from .passes.pass_manager import PassContext, PassManager
from .passes.rewrite_attention import RewriteAttention
from .passes.schedule import ScheduleSites
from .passes.sites import AttentionSite
from .passes.verify import VerifyGraph
from .runtimes import get_runtime, is_standin, policy_for, runtime_for

log = logging.getLogger(__name__)


@dataclass
class Counters:
    """What the backend did, for tests and users: graphs compiled, sites found/rewritten/skipped,
    traces Dynamo was asked to redo with dynamic input sizes (``dynamic_retraces``), graphs
    Inductor compiled (``inductor_graphs``, ``compile_rest="inductor"``) and those it could not,
    which run eagerly (``inductor_fallbacks``, with the reason in ``fallback_reasons``);
    ``inductor_seconds``: time in Inductor, attempts Dynamo restarted included; ``cpu_linears``:
    linear layers run by ``kernels/cpu_linear.py`` (option ``cpu_linears``); ``caches_unclaimed``:
    K/V caches a graph grows that feed no attention site kvdrive recognised (left in the model;
    the reason in ``skip_reasons``)."""

    graphs: int = 0
    sites_found: int = 0
    sites_rewritten: int = 0
    sites_skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    caches_unclaimed: int = 0
    compile_seconds: float = 0.0
    dynamic_retraces: int = 0
    inductor_graphs: int = 0
    inductor_fallbacks: int = 0
    fallback_reasons: list[str] = field(default_factory=list)
    inductor_seconds: float = 0.0
    cpu_linears: int = 0

    def reset(self) -> None:
        self.__init__()


counters = Counters()
_graph_ids = itertools.count()
_layer_ids: dict[int, dict[str, int]] = {}           # runtime id -> module path -> layer number


def default_passes() -> list:
    return [FindAttentionSites(), BindKVCache(), RewriteAttention(), GuardStandIns(), ScheduleSites(), CpuLinears(), VerifyGraph()]


def kvdrive_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], *,
                    options: Optional[dict] = None, mode: Optional[str] = None) -> Callable:
    """Rewrite the attention of a Dynamo graph to keep its KV in the kvdrive runtime; return the
    rewritten graph (``compile_rest="eager"``) or Inductor's compilation of it (``"inductor"``).

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
                      dump_dir=opts.dump_dir, example_inputs=list(example_inputs), is_standin=is_standin,
                      cpu_linears_how=opts.cpu_linears, compile_rest=opts.compile_rest)
    # before the rewrite, which leaves the caches' cats dead: each cat and its past's name
    growing = {c: c.args[0][0].name for c in growing_caches(gm)}
    PassManager(default_passes()).run(gm, ctx)
    get_runtime(rid).layer_names.update({i: name.removesuffix("#0") for name, i in ctx.layer_ids.items()})
    compiled = compile_rest(gm, example_inputs, opts.compile_rest, ctx.graph_index)
    _report_skips(ctx)                 # after Inductor: a restart it asks for compiles this graph again
    _report_unclaimed(ctx, growing)
    counters.graphs += 1
    counters.sites_found += len(ctx.sites)
    counters.sites_rewritten += len(ctx.rewritten)
    counters.sites_skipped += len(ctx.skipped)
    counters.cpu_linears += ctx.cpu_linears
    counters.compile_seconds += time.perf_counter() - t0
    return compiled


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


# -- the rest of the model: Inductor ---------------------------------------------------------------

def compile_rest(gm: torch.fx.GraphModule, example_inputs: list[Any], how: str, graph_index: int) -> Callable:
    """The callable that runs the rewritten graph: ``gm`` itself (``how="eager"``), or Inductor's
    compilation of it, the ``kvdrive::`` ops staying opaque fallback calls. Their ordered effect
    (ops.py) makes AOTAutograd thread a token through them, so Inductor runs each exactly once per
    call and in the order the schedule pass gave them. A graph Inductor fails on runs eagerly,
    with one WARNING and a count in ``counters``: slower, never a wrong answer or a crash."""
    if how == "eager":
        return call_directly(gm)
    t0 = time.perf_counter()
    try:
        compiled = _inductor(gm, example_inputs)
    except (torch._dynamo.exc.RestartAnalysis, torch._dynamo.exc.SkipFrame):
        raise                          # Dynamo's control flow (e.g. Inductor asks to trace again), not a failure
    except Exception as e:             # noqa: BLE001 (any failure: the eager graph is exact)
        reason = f"{type(e).__name__}: {_first_line(e)}"
        counters.inductor_fallbacks += 1
        counters.fallback_reasons.append(f"graph {graph_index}: {reason}")
        log.warning("kvdrive: graph %d: Inductor could not compile the rest of the model (%s); this graph runs "
                    "eagerly instead (exact, slower). Pass options={'compile_rest': 'eager'} to skip the attempt.",
                    graph_index, reason)
        return gm
    finally:
        counters.inductor_seconds += time.perf_counter() - t0
    counters.inductor_graphs += 1
    log.info("kvdrive: graph %d: the rest of the model compiled by Inductor in %.1f s", graph_index,
             time.perf_counter() - t0)
    if not any(is_kvdrive_op(n) for n in gm.graph.nodes):
        return compiled
    return _without_alias_check(compiled)


def _first_line(e: BaseException) -> str:
    """The first line of an error's message (Inductor's errors run to many lines), at most 300 characters."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "no message"


def _inductor(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
    """Inductor's compilation of a copy of ``gm`` (``compile_fx`` may change the module it is
    given; the fallback needs the graph as the passes left it). The copy shares parameters and
    node metadata (Dynamo's fake values); only the nodes are new."""
    from torch._inductor.compile_fx import compile_fx

    copied = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    copied.meta.update(gm.meta)           # dynamo_compile_id, the flat parameter names Inductor reads
    return compile_fx(copied, example_inputs)


class _AliasCheckOff:
    """A context in which AOTAutograd's first-call check of custom ops' aliasing
    (``torch._functorch.config.check_custom_op_aliasing``) is off, shared by every thread: off
    while any such context is open, restored to what it was when the last one closes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0
        self._saved = True

    def __enter__(self) -> None:
        config = torch._functorch.config
        with self._lock:
            if self._open == 0:
                self._saved = config.check_custom_op_aliasing
                config.check_custom_op_aliasing = False
            self._open += 1

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._open -= 1
            if self._open == 0:
                torch._functorch.config.check_custom_op_aliasing = self._saved


_ALIAS_CHECK_OFF = _AliasCheckOff()


def _without_alias_check(compiled: Callable) -> Callable:
    """``compiled``, called with AOTAutograd's custom-op aliasing check off. The check runs a
    compiled graph's first call under a dispatch mode that gives up (NotImplemented) on any tensor
    subclass, and a decode step hands kvdrive's ops stand-ins (``StandIn``, runtime/standins.py):
    the call would fail. AOTAutograd runs the check at the first call that finds the setting on,
    so every call turns it off, not only the first (a lock and two assignments per call).
    kvdrive's ops never return an alias of an input (a stand-in gets a new base each step,
    ``materialize`` a copy)."""

    def run(*args: Any) -> Any:
        with _ALIAS_CHECK_OFF:
            return compiled(*args)

    return run


# -- sites left as they were ---------------------------------------------------------------------

def _keeps_growing_cache(site: AttentionSite) -> bool:
    """Whether a skipped site's K/V is a cache kvdrive should have kept: a view, layout change or
    head repetition of a growing cache (an input appended to by a cat, or written in place: a
    static cache). A cache input only read (an encoder's K/V for cross-attention) or K/V computed
    in the graph hold nothing that grows."""
    if site.reason.startswith("cross-attention"):
        return False
    return bool(site.caches)


def _report_unclaimed(ctx: PassContext, growing: dict[torch.fx.Node, str]) -> None:
    """One WARNING per graph for the caches it grows that no attention site (rewritten or left as
    it was, which ``_report_skips`` reported) reads: attention kvdrive does not recognise (a custom
    attention op, einsum scores, ...), whose KV stays in the model's own cache, outside kvdrive's
    tiers and memory budgets."""
    claimed = {c for site in ctx.sites for c in site.caches}
    unclaimed = [past for c, past in growing.items() if c not in claimed]
    if not unclaimed:
        return
    names = ", ".join(unclaimed[:4]) + (f", +{len(unclaimed) - 4} more" if len(unclaimed) > 4 else "")
    reason = (f"kvdrive: graph {ctx.graph_index}: {len(unclaimed)} K/V cache(s) grow here ({names}) but feed no "
              "attention kvdrive recognises (softmax(q @ k^T ...) @ v or scaled_dot_product_attention); they stay "
              "in the model's own cache: exact, but outside kvdrive's tiers, and device_memory / host_memory / "
              "token_budget do not apply to them")
    counters.caches_unclaimed += len(unclaimed)
    counters.skip_reasons.append(reason)
    log.warning(reason)


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
