"""The ``kvdrive`` torch.compile backend (registered through the ``torch_dynamo_backends``
entry point, so ``torch.compile(fn, backend="kvdrive", options={...})`` finds it)."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx

from . import ops  # noqa: F401  (registers the kvdrive:: custom ops)
from .options import parse_options
from .passes.bind_kv_cache import BindKVCache
from .passes.find_attention import FindAttentionSites
from .passes.guard_standins import GuardStandIns
from .passes.pass_manager import PassContext, PassManager
from .passes.rewrite_attention import RewriteAttention
from .passes.verify import VerifyGraph
from .runtimes import is_standin, policy_for, runtime_for

log = logging.getLogger(__name__)


@dataclass
class Counters:
    """What the backend did, for tests and users: graphs compiled, sites found/rewritten/skipped."""

    graphs: int = 0
    sites_found: int = 0
    sites_rewritten: int = 0
    sites_skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0

    def reset(self) -> None:
        self.__init__()


counters = Counters()
_graph_ids = itertools.count()
_layer_ids: dict[int, dict[str, int]] = {}           # runtime id -> module path -> layer number


def default_passes() -> list:
    return [FindAttentionSites(), BindKVCache(), RewriteAttention(), GuardStandIns(), VerifyGraph()]


def kvdrive_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], *,
                    options: Optional[dict] = None, mode: Optional[str] = None) -> Callable:
    """Rewrite the attention of a Dynamo graph to keep its KV in the kvdrive runtime.

    mode: accepted for Hugging Face, which passes one (e.g. "reduce-overhead"); kvdrive has no
    modes and ignores it.
    """
    t0 = time.perf_counter()
    opts = parse_options(options)
    # Past Dynamo's recompile limit it would run the frame eagerly, on the cache's NaN
    # stand-ins: silently wrong tokens. A clear error instead.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if mode not in (None, "default"):
        log.info("kvdrive ignores mode=%r", mode)
    rid = runtime_for(opts)
    ctx = PassContext(runtime_id=rid, policy_id=policy_for(opts), graph_index=next(_graph_ids),
                      layer_ids=_layer_ids.setdefault(rid, {}),
                      dump_dir=opts.dump_dir, example_inputs=list(example_inputs), is_standin=is_standin)
    PassManager(default_passes()).run(gm, ctx)
    for site in ctx.skipped:
        msg = f"kvdrive: attention site {site.node.name} in {site.layer_name} left as it was: {site.reason}"
        counters.skip_reasons.append(msg)
        # a graph with no KV cache at all (e.g. a hand-written prefill) is no surprise
        (log.info if "keeps no KV cache" in site.reason or "no KV cache to keep" in site.reason else log.warning)(msg)
    counters.graphs += 1
    counters.sites_found += len(ctx.sites)
    counters.sites_rewritten += len(ctx.rewritten)
    counters.sites_skipped += len(ctx.skipped)
    counters.compile_seconds += time.perf_counter() - t0
    return gm
