"""The runtimes that compiled graphs call into, by id (graphs carry the id as a constant)."""
from __future__ import annotations

import itertools
import threading
from typing import Any, Optional

import torch

from .options import KVDriveOptions, parse_options
from .runtime import site_step, standins
from .runtime.kv_runtime import KVRuntime
from .runtime.selection import SelectionPolicy  # noqa: F401  (the registry's type)
from .runtime.site_step import OUTSIDE_READ
from .runtime.standins import is_standin_like, token_span
from .runtime.stats import RuntimeStats

_lock = threading.Lock()
_ids = itertools.count(1)
_by_id: dict[int, KVRuntime] = {}
_by_key: dict[tuple, int] = {}
_last: list[int] = []                     # the runtime most recently compiled for
_policies: list[SelectionPolicy] = []     # graphs carry a policy's index


def runtime_for(options: KVDriveOptions) -> int:
    """The id of the runtime for these options, created on first use."""
    with _lock:
        key = options.runtime_key()
        rid = _by_key.get(key)
        if rid is None:
            rid = next(_ids)
            _by_id[rid] = KVRuntime(options.block_size, options.device_memory, options.host_memory,
                                    options.disk_dir, cache_policy=options.cache_policy,
                                    reuse_window=options.reuse_window, trace=options.trace,
                                    ahead_reads=options.prefetch_depth > 0, async_cpu=options.cpu_worker)
            _by_key[key] = rid
        _last[:] = [rid]
        return rid


def policy_for(options: KVDriveOptions) -> int:
    """The id of the selection policy of these options (graphs carry it as a constant)."""
    policy = options.policy
    with _lock:
        if policy not in _policies:
            _policies.append(policy)
        return _policies.index(policy)


def get_policy(policy_id: int) -> SelectionPolicy:
    return _policies[policy_id]


def get_runtime(runtime_id: int) -> KVRuntime:
    try:
        return _by_id[runtime_id]
    except KeyError:
        raise RuntimeError(f"kvdrive runtime {runtime_id} is gone (it was closed); compile the model again") from None


def runtimes() -> list[KVRuntime]:
    return list(_by_id.values())


def is_standin(t: Any) -> bool:
    """Whether ``t`` is a stand-in (or a view of one) that some kvdrive runtime made."""
    return isinstance(t, torch.Tensor) and (is_standin_like(t) or any(rt.standins.lookup(t) for rt in runtimes()))


def _placed(t: torch.Tensor):
    """(runtime, key, layer KV, (first token, count)) of a stand-in; a clear error otherwise."""
    for rt in runtimes():
        key = rt.standins.lookup(t)
        if key is None:
            continue
        kv = rt.session(key.session_id).layers[key.layer]
        span = token_span(t)
        if span is None or (t.shape[0], t.shape[1], t.shape[3]) != (kv.batch, kv.kv_heads, kv.head_dim):
            raise RuntimeError(f"a stand-in of layer {key.layer} was reshaped or sliced in a way kvdrive cannot "
                               f"follow ({tuple(t.shape)}; the runtime holds [{kv.batch}, {kv.kv_heads}, "
                               f"{kv.length}, {kv.head_dim}]): {OUTSIDE_READ}")
        site_step.check_not_cropped(rt, t, key.layer, span)
        return rt, key, kv, span
    raise RuntimeError(f"a {tuple(t.shape)} stand-in reached a kvdrive op but no kvdrive runtime holds its KV "
                       f"(its generation was released, or it was copied outside kvdrive). {OUTSIDE_READ}")


def materialize_standin(t: torch.Tensor) -> torch.Tensor:
    """The real K or V ``[B, Hkv, S, D]`` behind a stand-in ``t`` (on the layer's device): the
    tokens it stands for, gathered from the tiers."""
    rt, key, kv, (first, n) = _placed(t)
    k, v = site_step.read_window(rt, kv, first, first + n)
    return k if key.kind == "k" else v


standins.copy_values = materialize_standin


def tail_standin(t: torch.Tensor, start: int) -> torch.Tensor:
    """A new stand-in for ``t[:, :, start:]`` (the same layer's tokens from ``start`` on)."""
    rt, key, _, (first, n) = _placed(t)
    skip = slice(start, None).indices(n)[0]
    return rt.standins.make(key, t, n - skip, first + skip)


def materialize(cache: Any) -> Any:
    """A model's KV cache with every kvdrive stand-in replaced by the real K/V, so that eager
    code (the uncompiled model, beam search, cropping) can continue from it.

    cache: a Hugging Face ``Cache`` (its ``layers``' ``keys``/``values``; an encoder-decoder
    cache's two halves), or tuples/lists/dicts of tensors (a hand-written model's cache).
    Hugging Face caches are changed in place and returned; containers are rebuilt.
    """
    if isinstance(cache, torch.Tensor):
        return materialize_standin(cache) if is_standin_like(cache) else cache
    if isinstance(cache, (tuple, list)):
        return type(cache)(materialize(c) for c in cache)
    if isinstance(cache, dict):
        return {k: materialize(c) for k, c in cache.items()}
    for half in ("self_attention_cache", "cross_attention_cache"):
        if hasattr(cache, half):
            materialize(getattr(cache, half))
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            value = getattr(layer, name, None)
            if is_standin_like(value):
                setattr(layer, name, materialize_standin(value))
    return cache


def stats(options: Optional[dict] = None) -> RuntimeStats:
    """A snapshot of one runtime's counters: the one for ``options`` (as passed to
    torch.compile), or by default the one most recently compiled for."""
    if options is not None:
        rid = _by_key.get(parse_options(options).runtime_key())
        if rid is None:
            raise KeyError(f"no model was compiled with kvdrive options {options}")
    elif _last:
        rid = _last[0]
    else:
        raise RuntimeError("no model has been compiled with the kvdrive backend yet")
    return _by_id[rid].stats()


def all_stats() -> list[RuntimeStats]:
    """Every runtime's counters (one runtime per distinct set of runtime options)."""
    return [rt.stats() for rt in runtimes()]


def release_all() -> None:
    """Free every session's KV in every runtime (and remove their disk files)."""
    for rt in runtimes():
        for sid in list(rt.sessions):
            rt.release(sid)


def flush_traces() -> list[str]:
    """Write every runtime's timeline now (``trace`` option); returns the files written."""
    written = []
    for rt in runtimes():
        if rt.tracer.enabled:
            rt.tracer.flush()
            written.append(rt.tracer.path)
    return written


def collect() -> int:
    """Release the sessions whose cache objects are gone; returns how many remain open."""
    for rt in runtimes():
        rt.sweep()
    return sum(len(rt.sessions) for rt in runtimes())
