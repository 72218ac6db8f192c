"""The systems compared: dense Hugging Face (eager, and compiled by Inductor on a static cache),
Hugging Face's offloaded cache, and the kvdrive runtime in the peers' designs (FlexGen-like
fetch-all, InfiniGen-like sparse fetch, ShadowKV-like and HiSparse-like device caches of fetched
blocks) and kvdrive's own (attention-aware device tier, split attention), all at the same budgets."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from transformers import DynamicCache, StaticCache

import kvdrive_compile

from .presets import Budgets


@dataclass(frozen=True)
class System:
    """name: the row label. design: one line on what it does. kvdrive: compiled with the kvdrive
    backend (else eager Hugging Face). attention / sparse: the kvdrive options it differs by;
    own_device_tier: keeps KV on the device tier (else ``device_memory=0``, all KV on host/disk);
    host_tier: the sweep's host budget (else ``host_memory=None``: all spilled KV in host memory,
    no disk). cache_policy: what the tiers keep between steps; reuse_window: fixed by the design
    (None: the sweep's, else the runtime's default). offloaded_cache: Hugging Face's offloaded
    ``DynamicCache`` (needs CUDA streams). static_compiled: Hugging Face compiled by Inductor on a
    ``StaticCache``, the way transformers' ``generate`` runs ``cache_implementation="static"``:
    the prefill eager, each decode step the compiled forward (``COMPILE_MODES``). budgets: the
    sweep's device and host budgets (else kvdrive's defaults: no limit, every block on the
    device tier, what a user gets with no options). compile_rest, cpu_linears, reuse_bonus,
    rerank_similarity: kvdrive's options of those names (None: their defaults; the baselines rank by the block
    estimates alone, ``reuse_bonus=0``, as the designs they stand for do)."""

    name: str
    design: str
    kvdrive: bool = False
    attention: str = "split"
    sparse: bool = False
    own_device_tier: bool = False
    host_tier: bool = True
    cache_policy: str = "attention"
    reuse_window: Optional[int] = None
    offloaded_cache: bool = False
    static_compiled: bool = False
    budgets: bool = True
    compile_rest: Optional[str] = None
    cpu_linears: Optional[str] = None
    reuse_bonus: Optional[float] = None
    rerank_similarity: Optional[float] = None
    score_every_block: bool = False    # coarse_candidates=None: no coarse stage where the default has one

    def options(self, budgets: Budgets) -> Optional[dict]:
        """The ``options=`` of ``torch.compile(..., backend="kvdrive")``; None when not compiled."""
        if not self.kvdrive:
            return None
        options = {"token_budget": budgets.token_budget if self.sparse else None, "block_size": budgets.block_size}
        if self.budgets:
            options.update(device_memory=budgets.device_memory if self.own_device_tier else 0,
                           host_memory=budgets.host_memory if self.host_tier else None,
                           attention=self.attention, cache_policy=self.cache_policy)
            reuse = self.reuse_window if self.reuse_window is not None else budgets.reuse_window
            if reuse is not None and self.cache_policy == "attention":
                options["reuse_window"] = reuse
        for name in ("compile_rest", "cpu_linears", "reuse_bonus", "rerank_similarity"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        if self.score_every_block:
            options["coarse_candidates"] = None
        return options

    def unavailable(self, device: torch.device) -> Optional[str]:
        """Why this system cannot run on ``device`` (None: it can)."""
        if self.offloaded_cache and device.type != "cuda":
            return "needs CUDA (its prefetch and offload run on CUDA streams)"
        return None

    def new_cache(self, model, max_tokens: int):
        """An empty cache for one greedy decode of at most ``max_tokens`` tokens per sequence
        (prompt and decoded): a ``StaticCache`` of that length, else a ``DynamicCache``."""
        if self.static_compiled:
            return StaticCache(config=model.config, max_cache_len=max_tokens)
        return DynamicCache(config=model.config, offloading=self.offloaded_cache)


DENSE = System("dense", "Hugging Face, default DynamicCache, all KV on the device")
DENSE_COMPILED = System("dense-compiled", "Hugging Face compiled by Inductor (torch.compile fullgraph, "
                        "\"reduce-overhead\" on CUDA) on a StaticCache of the prompt + decode length, all KV on "
                        "the device; the prefill eager, as transformers' generate does", static_compiled=True)
HF_OFFLOAD = System("hf-offload", "Hugging Face DynamicCache(offloading=True): all KV on host, each layer "
                    "prefetched to the device and offloaded back every step", offloaded_cache=True)
FETCH_ALL = System("fetch-all", "FlexGen-like: all KV on host (disk beyond), every block copied to the "
                   "device each step, nothing kept between steps, exact", kvdrive=True, attention="fetch",
                   cache_policy="none")
SPARSE_FETCH = System("sparse-fetch", "InfiniGen-like: kvdrive's block selection, all KV on host (disk "
                      "beyond), the selected blocks copied to the device each step, nothing kept between "
                      "steps", kvdrive=True, attention="fetch", sparse=True, cache_policy="none", reuse_bonus=0.0)
SHADOWKV_LIKE = System("shadowkv-like", "ShadowKV-like: kvdrive's block selection, all KV homed on host (disk "
                       "beyond), the previous step's fetched blocks reused on the device (reuse window 1), "
                       "misses fetched", kvdrive=True, attention="fetch", sparse=True, own_device_tier=True,
                       cache_policy="attention", reuse_window=1, reuse_bonus=0.0)
HISPARSE_LIKE = System("hisparse-like", "HiSparse-like: kvdrive's block selection, the device budget an LRU "
                       "hot buffer of selected blocks (every miss admitted), misses fetched", kvdrive=True,
                       attention="fetch", sparse=True, own_device_tier=True, cache_policy="lru", reuse_bonus=0.0)
KVDRIVE = System("kvdrive", "kvdrive: device tier + host + disk, blocks selected within the reuse window kept "
                 "on the device, the rest attended where they lie (CPU for host/disk), merged", kvdrive=True,
                 sparse=True, own_device_tier=True)
KVDRIVE_NO_BONUS = System("kvdrive-no-bonus", "kvdrive with reuse_bonus=0: the same tiers, blocks ranked by "
                          "their estimates alone (the difference to kvdrive is the tier-aware ranking's)",
                          kvdrive=True, sparse=True, own_device_tier=True, reuse_bonus=0.0)
KVDRIVE_RERANK = System("kvdrive-rerank", "kvdrive with rerank_similarity=0.8: the same tiers, a (sequence, KV "
                        "head) re-ranks only when its query moved (the difference to kvdrive is that option's)",
                        kvdrive=True, sparse=True, own_device_tier=True, rerank_similarity=0.8)
KVDRIVE_FINE = System("kvdrive-fine", "kvdrive with coarse_candidates=None: the same tiers, every block scored by "
                      "its 2-bit keys (on a CPU the default scores only the 4x the budget's blocks with the best "
                      "Quest bound)", kvdrive=True, sparse=True, own_device_tier=True, score_every_block=True)
KVDRIVE_DEFAULT = System("kvdrive-default", "kvdrive with its default options (the sweep's token budget): no "
                         "device or host limit, every block on the device tier", kvdrive=True, sparse=True,
                         budgets=False)
KVDRIVE_DEFAULT_RERANK = System("kvdrive-default-rerank", "kvdrive-default with rerank_similarity=0.8",
                                kvdrive=True, sparse=True, budgets=False, rerank_similarity=0.8)
KVDRIVE_DEFAULT_FINE = System("kvdrive-default-fine", "kvdrive-default with coarse_candidates=None: every "
                              "block scored", kvdrive=True, sparse=True, budgets=False, score_every_block=True)
KVDRIVE_INDUCTOR = System("kvdrive-inductor", "kvdrive-default with compile_rest=\"inductor\": the rest of the "
                          "model compiled by Inductor around kvdrive's ops", kvdrive=True, sparse=True, budgets=False,
                          compile_rest="inductor")
KVDRIVE_ATEN_LINEARS = System("kvdrive-aten-linears", "kvdrive-default with cpu_linears=\"aten\": the linear "
                              "layers as traced (the difference to kvdrive-default is the cpu_linears pass's)",
                              kvdrive=True, sparse=True, budgets=False, cpu_linears="aten")
KVDRIVE_HOST = System("kvdrive-host", "kvdrive with host_memory=None: the same device tier, all spilled KV in "
                      "host memory (no disk)", kvdrive=True, sparse=True, own_device_tier=True, host_tier=False)
KVDRIVE_EXACT = System("kvdrive-exact", "kvdrive with token_budget=None (exact), same tiers",
                       kvdrive=True, own_device_tier=True)

SYSTEMS = {s.name: s for s in (DENSE, DENSE_COMPILED, HF_OFFLOAD, FETCH_ALL, SPARSE_FETCH, SHADOWKV_LIKE,
                               HISPARSE_LIKE, KVDRIVE, KVDRIVE_NO_BONUS, KVDRIVE_RERANK, KVDRIVE_FINE,
                               KVDRIVE_DEFAULT, KVDRIVE_DEFAULT_RERANK, KVDRIVE_DEFAULT_FINE, KVDRIVE_INDUCTOR,
                               KVDRIVE_ATEN_LINEARS,
                               KVDRIVE_HOST, KVDRIVE_EXACT)}
DEFAULT_SYSTEMS = ("dense", "hf-offload", "fetch-all", "sparse-fetch", "kvdrive")
# where a system's tokens are checked against (the first of its references the run has): exact
# systems against dense; the designs that rank blocks by their estimates alone against each other
# (where a block lies must not change what they attend). kvdrive and kvdrive-host rank blocks in
# place higher (reuse_bonus), so where blocks lie changes what they select: against dense, sparse.
SAME_SELECTION = ("kvdrive-default", "kvdrive-no-bonus", "sparse-fetch", "shadowkv-like", "hisparse-like")
REFERENCE = {"hf-offload": "dense", "dense-compiled": "dense", "fetch-all": "dense", "kvdrive-exact": "dense",
             "kvdrive": "dense", "kvdrive-host": "dense", "kvdrive-rerank": "dense", "kvdrive-default-rerank": "dense",
             "kvdrive-fine": "dense", "kvdrive-default-fine": "dense",
             "kvdrive-inductor": "kvdrive-default", "kvdrive-aten-linears": "kvdrive-default",
             **{name: tuple(other for other in SAME_SELECTION if other != name) for name in SAME_SELECTION}}
EXACT_SYSTEMS = ("dense", "dense-compiled", "hf-offload", "fetch-all", "kvdrive-exact")
# torch.compile's mode for the static-cache decode step: CUDA graphs (transformers' CompileConfig
# default) where there is a GPU; they do not apply on the CPU
COMPILE_MODES = {"cuda": "reduce-overhead", "cpu": "default"}


def systems(names: Optional[list[str]] = None) -> list[System]:
    names = list(names or DEFAULT_SYSTEMS)
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; systems are {list(SYSTEMS)}")
    return [SYSTEMS[n] for n in names]


@contextlib.contextmanager
def installed(model, system: System, budgets: Budgets, trace: Optional[str] = None) -> Iterator[Optional[dict]]:
    """``model.forward`` as the system runs it inside the block (compiled for kvdrive designs,
    writing its timeline to ``trace`` if given; decode steps compiled by Inductor for a static
    cache); the eager forward, a fresh Dynamo and no open KV sessions after. Yields the kvdrive
    options (None for Hugging Face systems)."""
    options = system.options(budgets)
    if system.static_compiled:
        with static_decode_compiled(model):
            yield None
        return
    if options is None:
        yield None
        return
    if trace is not None:
        options["trace"] = trace
    eager = model.forward
    model.forward = torch.compile(eager, backend="kvdrive", options=options)
    try:
        yield options
    finally:
        model.forward = eager
        torch._dynamo.reset()
        kvdrive_compile.release_all()
        kvdrive_compile.flush_traces()


@contextlib.contextmanager
def static_decode_compiled(model) -> Iterator[None]:
    """``model.forward`` split as transformers' ``generate`` runs a static cache: a call of one
    new token per sequence (a decode step) goes to ``torch.compile(forward, fullgraph=True)``,
    a longer one (a prefill, or a chunk of one) to the eager forward, whose varying lengths
    would otherwise each compile. The eager forward and a fresh Dynamo after."""
    eager = model.forward
    device = next(model.parameters()).device.type
    compiled = torch.compile(eager, mode=COMPILE_MODES.get(device, "default"), fullgraph=True)

    def forward(input_ids: torch.Tensor, *args, **kwargs):
        step = compiled if input_ids.shape[1] == 1 else eager              # input_ids: [B, L]
        return step(input_ids, *args, **kwargs)

    model.forward = forward
    try:
        yield
    finally:
        model.forward = eager
        torch._dynamo.reset()
