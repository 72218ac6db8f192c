"""The systems compared: dense Hugging Face, Hugging Face's offloaded cache, and the kvdrive
runtime in three designs (FlexGen-like fetch-all, InfiniGen/ShadowKV-like sparse fetch, and
kvdrive's own split attention), all at the same budgets."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from transformers import DynamicCache

import kvdrive_compile

from .presets import Budgets


@dataclass(frozen=True)
class System:
    """name: the row label. design: one line on what it does. kvdrive: compiled with the kvdrive
    backend (else eager Hugging Face). attention / sparse: the kvdrive options it differs by;
    own_device_tier: keeps KV on the device tier (else ``device_memory=0``, all KV on host/disk).
    offloaded_cache: Hugging Face's offloaded ``DynamicCache`` (needs CUDA streams)."""

    name: str
    design: str
    kvdrive: bool = False
    attention: str = "split"
    sparse: bool = False
    own_device_tier: bool = False
    offloaded_cache: bool = False

    def options(self, budgets: Budgets) -> Optional[dict]:
        """The ``options=`` of ``torch.compile(..., backend="kvdrive")``; None when not compiled."""
        if not self.kvdrive:
            return None
        return {"device_memory": budgets.device_memory if self.own_device_tier else 0,
                "host_memory": budgets.host_memory,
                "token_budget": budgets.token_budget if self.sparse else None,
                "attention": self.attention, "block_size": budgets.block_size}

    def unavailable(self, device: torch.device) -> Optional[str]:
        """Why this system cannot run on ``device`` (None: it can)."""
        if self.offloaded_cache and device.type != "cuda":
            return "needs CUDA (its prefetch and offload run on CUDA streams)"
        return None

    def new_cache(self, model) -> DynamicCache:
        return DynamicCache(config=model.config, offloading=self.offloaded_cache)


DENSE = System("dense", "Hugging Face, default DynamicCache, all KV on the device")
HF_OFFLOAD = System("hf-offload", "Hugging Face DynamicCache(offloading=True): all KV on host, each layer "
                    "prefetched to the device and offloaded back every step", offloaded_cache=True)
FETCH_ALL = System("fetch-all", "FlexGen-like: all KV on host (disk beyond), every block copied to the "
                   "device each step, exact", kvdrive=True, attention="fetch")
SPARSE_FETCH = System("sparse-fetch", "InfiniGen/ShadowKV-like: kvdrive's block selection, all KV on host, "
                      "the selected blocks copied to the device each step", kvdrive=True, attention="fetch",
                      sparse=True)
KVDRIVE = System("kvdrive", "kvdrive: device tier + host + disk, selected blocks attended where they lie "
                 "(CPU for host/disk), merged", kvdrive=True, sparse=True, own_device_tier=True)
KVDRIVE_EXACT = System("kvdrive-exact", "kvdrive with token_budget=None (exact), same tiers",
                       kvdrive=True, own_device_tier=True)

SYSTEMS = {s.name: s for s in (DENSE, HF_OFFLOAD, FETCH_ALL, SPARSE_FETCH, KVDRIVE, KVDRIVE_EXACT)}
DEFAULT_SYSTEMS = ("dense", "hf-offload", "fetch-all", "sparse-fetch", "kvdrive")
# where a system's tokens are checked against: exact systems against dense, sparse-fetch against
# kvdrive (the same selection)
REFERENCE = {"hf-offload": "dense", "fetch-all": "dense", "kvdrive-exact": "dense", "kvdrive": "dense",
             "sparse-fetch": "kvdrive"}
EXACT_SYSTEMS = ("dense", "hf-offload", "fetch-all", "kvdrive-exact")


def systems(names: Optional[list[str]] = None) -> list[System]:
    names = list(names or DEFAULT_SYSTEMS)
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; systems are {list(SYSTEMS)}")
    return [SYSTEMS[n] for n in names]


@contextlib.contextmanager
def installed(model, system: System, budgets: Budgets) -> Iterator[Optional[dict]]:
    """``model.forward`` as the system runs it inside the block (compiled for kvdrive designs);
    the eager forward, a fresh Dynamo and no open KV sessions after."""
    options = system.options(budgets)
    if options is None:
        yield None
        return
    eager = model.forward
    model.forward = torch.compile(eager, backend="kvdrive", options=options)
    try:
        yield options
    finally:
        model.forward = eager
        torch._dynamo.reset()
        kvdrive_compile.release_all()
