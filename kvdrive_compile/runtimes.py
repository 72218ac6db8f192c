"""The runtimes that compiled graphs call into, by id (graphs carry the id as a constant)."""
from __future__ import annotations

import itertools
import threading

from typing import Optional

from .options import KVDriveOptions, parse_options
from .runtime.kv_runtime import KVRuntime
from .runtime.selection import SelectionPolicy  # noqa: F401  (the registry's type)
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
                                    options.disk_dir)
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


def collect() -> int:
    """Release the sessions whose cache objects are gone; returns how many remain open."""
    for rt in runtimes():
        rt.sweep()
    return sum(len(rt.sessions) for rt in runtimes())
