"""The backend's options: one dataclass, parsed and validated once, at compile time."""
from __future__ import annotations

import difflib
import math
import os
import re
import tempfile
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from .runtime.placement import CACHE_POLICIES, DEFAULT_REUSE_WINDOW
from .runtime.selection import SelectionPolicy

# layers ahead at which ahead-of-need disk reads are issued (the scheduling pass places them)
DEFAULT_PREFETCH_DEPTH = 0
# what runs the rewritten graph's ops that are not kvdrive's (see KVDriveOptions.compile_rest).
# Eager by default, by measurement on this project's 2-core CPU (benchmarks/compile_rest.py,
# SmolLM2-135M at 512 tokens): Inductor made a decode step 1.05-1.07x faster (paired steps),
# 0.9x under load, and costs ~2 more minutes of compiling per prefill + decode pair in every
# process (torch 2.13 does not cache graphs with effectful ops).
COMPILE_REST = ("inductor", "eager")
DEFAULT_COMPILE_REST = "eager"
# how a CPU graph's linear layers run (see KVDriveOptions.cpu_linears)
CPU_LINEARS = ("auto", "aten")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4,
          "tib": 1 << 40}


def parse_size(value: Union[int, str, None], name: str) -> Optional[int]:
    """Bytes from an int or a string like ``"256MiB"``, ``"1.5 GB"``; None stays None (no limit)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a byte count or a size string like '256MiB', got {value!r}")
    if isinstance(value, int):
        nbytes = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}={value!r} is not a size: use an int of bytes or a string like "
                             "'512KiB', '256MiB', '1GiB'")
        nbytes = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise TypeError(f"{name} must be a byte count or a size string like '256MiB', got {type(value).__name__}")
    if nbytes < 0:
        raise ValueError(f"{name}={value!r} is negative: pass a budget >= 0 bytes, or None for no limit")
    return nbytes


@dataclass(frozen=True)
class KVDriveOptions:
    """Options of ``torch.compile(..., backend="kvdrive", options={...})``.

    block_size: tokens per KV block. policy: what each step attends (``token_budget``,
    ``selection``, ``block_summary``, ``score_aggregation``, ``sink_tokens``, ``local_window``,
    ``dense_layers``, ``attention``, ``reuse_bonus``: see ``SelectionPolicy``; the user passes them as flat options).
    device_memory, host_memory: KV bytes allowed on each tier (None: no limit); beyond the host
    budget KV goes to disk, in a private directory under ``disk_dir`` (default: the system temp
    directory). dump_dir: where pass-inspection dumps go (default: $KVDRIVE_DUMP_DIR, else none).
    cache_policy: what the device (and host) tier keeps between decode steps, ``CACHE_POLICIES``;
    reuse_window: decode steps of selection history a block is kept cached for
    (``runtime/placement.py``). prefetch_depth: layers ahead at which a layer's ahead-of-need
    disk reads start (the scheduling pass places them; 0: no ahead-of-need reads). trace: a
    Chrome-trace JSON file the runtime writes its timeline to (default: $KVDRIVE_TRACE, else none).
    cpu_worker: run the CPU part of each step's attention on a worker thread, overlapped with the
    device part (None: where the device part runs on a GPU; True; False).
    compile_rest: what runs the rest of each rewritten graph (every op that is not a ``kvdrive::``
    op: projections, norms, MLPs, the LM head): ``"inductor"`` compiles it with Inductor,
    the ``kvdrive::`` ops staying opaque calls in their scheduled order (a graph Inductor cannot
    compile runs eagerly, with one warning); ``"eager"`` (the default) runs the graph op by op in
    PyTorch. Not part of the runtime key: graphs compiled either way share a runtime.
    cpu_linears: ``"auto"`` (the default) runs the fp32 linear layers of a CPU graph over few
    rows (a decode step's) by a numba kernel where it measured faster than torch's BLAS for the
    shape on this machine (kernels/cpu_linear.py); ``"aten"`` as traced.
    """

    block_size: int = 16
    device_memory: Optional[int] = None
    host_memory: Optional[int] = None
    disk_dir: Optional[str] = None
    dump_dir: Optional[str] = None
    cache_policy: str = "attention"
    reuse_window: int = DEFAULT_REUSE_WINDOW
    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH
    cpu_worker: Optional[bool] = None
    trace: Optional[str] = None
    compile_rest: str = DEFAULT_COMPILE_REST
    cpu_linears: str = "auto"
    policy: SelectionPolicy = SelectionPolicy()

    def runtime_key(self) -> tuple:
        """Compiled functions with equal runtime options share one runtime (and its budgets)."""
        return (self.block_size, self.device_memory, self.host_memory, self.disk_dir, self.cache_policy,
                self.reuse_window, self.trace, self.prefetch_depth > 0, self.cpu_worker)


def valid_keys() -> list[str]:
    """The option names: the runtime's and the selection policy's fields, flat."""
    own = [f.name for f in fields(KVDriveOptions) if f.name != "policy"]
    return own + [f.name for f in fields(SelectionPolicy)]


def _did_you_mean(key: Any) -> str:
    """``'device_mem' (did you mean 'device_memory'?)``: the nearest valid name, if one is near."""
    near = difflib.get_close_matches(str(key), valid_keys(), n=1)
    return f"{key!r} (did you mean {near[0]!r}?)" if near else repr(key)


def _check_trace_path(trace) -> Optional[str]:
    """The trace file's absolute path (None or "": no trace, as an empty $KVDRIVE_TRACE), checked
    now rather than when the file is written, at the end of the run."""
    if trace is None or trace == "":
        return None
    if not isinstance(trace, (str, os.PathLike)):
        raise TypeError(f"trace={trace!r}: pass the path of the JSON file to write, or None")
    trace = os.path.abspath(os.path.expanduser(str(trace)))
    if os.path.isdir(trace):
        raise ValueError(f"trace {trace!r} is a directory: pass the path of the JSON file to write, "
                         f"e.g. {os.path.join(trace, 'steps.json')!r}")
    if not os.path.isdir(os.path.dirname(trace)):
        raise ValueError(f"trace {trace!r}: its directory does not exist; create it or pass another path")
    _check_dir(os.path.dirname(trace), "trace", fix="pass a trace path in a writable directory")
    return trace


def _check_dir(path: str, name: str, fix: Optional[str] = None) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    fix = fix or f"pass options={{'{name}': ...}} with a writable directory"
    if not os.path.isdir(path):
        raise ValueError(f"{name} {path!r} does not exist: create it, or pass options={{'{name}': ...}} "
                         "with an existing writable directory")
    try:                                     # a real probe: access() says yes to root everywhere
        os.rmdir(tempfile.mkdtemp(prefix=".kvdrive-probe-", dir=path))
    except OSError as e:
        raise ValueError(f"{name} {path!r} is not writable ({e.strerror}): {fix}") from None
    return path


def parse_options(options: Optional[dict[str, Any]]) -> KVDriveOptions:
    """Validate the user's ``options=`` dict; raises ValueError/TypeError that say what to change."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(valid_keys()), key=str)
    if unknown:
        raise ValueError(f"unknown kvdrive option(s): {'; '.join(_did_you_mean(k) for k in unknown)}. "
                         f"Valid options are {valid_keys()}")
    block_size = options.get("block_size", 16)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r}: must be a positive int (tokens per KV block), e.g. 16")
    budget = options.get("token_budget")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise TypeError(f"token_budget={budget!r}: pass an int (tokens), a fraction in (0, 1], or None")
        if isinstance(budget, float) and not 0 < budget <= 1:
            raise ValueError(f"token_budget={budget!r}: a fraction of the context must be in (0, 1]")
        if isinstance(budget, int) and budget <= 0:
            raise ValueError(f"token_budget={budget!r}: must be a positive number of tokens, or None for exact")
    for name, allowed in (("selection", ("topk", "window")), ("block_summary", ("qkeys", "minmax", "mean")),
                          ("score_aggregation", ("max", "prob")), ("attention", ("split", "fetch"))):
        if options.get(name, allowed[0]) not in allowed:
            raise ValueError(f"{name}={options[name]!r}: choose one of {list(allowed)}")
    compile_rest = options.get("compile_rest", DEFAULT_COMPILE_REST)
    if not isinstance(compile_rest, str) or compile_rest not in COMPILE_REST:
        raise ValueError(f"compile_rest={compile_rest!r}: choose one of {list(COMPILE_REST)} (\"inductor\" compiles "
                         "the model's other ops with Inductor; \"eager\" runs them op by op)")
    cpu_linears = options.get("cpu_linears", "auto")
    if not isinstance(cpu_linears, str) or cpu_linears not in CPU_LINEARS:
        raise ValueError(f"cpu_linears={cpu_linears!r}: choose one of {list(CPU_LINEARS)} (\"auto\" runs a CPU "
                         "decode step's linear layers by kvdrive's kernel where it measured faster; \"aten\" as traced)")
    if options.get("cache_policy", "attention") not in CACHE_POLICIES:
        raise ValueError(f"cache_policy={options['cache_policy']!r}: choose one of {list(CACHE_POLICIES)}")
    reuse = options.get("reuse_window", DEFAULT_REUSE_WINDOW)
    if isinstance(reuse, bool) or not isinstance(reuse, int) or reuse < 1:
        raise ValueError(f"reuse_window={reuse!r}: must be an int >= 1 (decode steps of selection history)")
    bonus = options.get("reuse_bonus", SelectionPolicy.reuse_bonus)
    if isinstance(bonus, bool) or not isinstance(bonus, (int, float)) or not 0 <= bonus < math.inf:
        raise ValueError(f"reuse_bonus={bonus!r}: must be a number >= 0 (nats a block already in place adds to "
                         "its estimated log attention mass when blocks are ranked; 0: none)")
    rerank = options.get("rerank_similarity")
    if rerank is not None and (isinstance(rerank, bool) or not isinstance(rerank, (int, float)) or not 0 <= rerank <= 1):
        raise ValueError(f"rerank_similarity={rerank!r}: must be a cosine similarity in [0, 1] (a (sequence, KV head) "
                         "re-ranks its blocks when its query moved further than that from the one it last ranked "
                         "with), or None: rank at every step")
    coarse = options.get("coarse_candidates")
    if coarse is not None and coarse != "auto" and (isinstance(coarse, bool) or not isinstance(coarse, (int, float))
                                                    or not 1 <= coarse < math.inf):
        raise ValueError(f"coarse_candidates={coarse!r}: must be a number >= 1 (blocks the coarse ranking stage keeps, "
                         "per block the token budget leaves to choose), None: score every block, or \"auto\" "
                         "(the default: 4 where the ranking runs on the CPU)")
    counts = {name: getattr(SelectionPolicy, name) for name in ("sink_tokens", "local_window", "dense_layers")}
    for name, default in {**counts, "prefetch_depth": DEFAULT_PREFETCH_DEPTH}.items():
        value = options.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}: must be an int >= 0")
    disk_dir = options.get("disk_dir")
    if disk_dir is not None:
        disk_dir = _check_dir(str(disk_dir), "disk_dir")
    dump_dir = options.get("dump_dir", os.environ.get("KVDRIVE_DUMP_DIR") or None)
    if dump_dir is not None:
        dump_dir = os.path.abspath(os.path.expanduser(str(dump_dir)))
        os.makedirs(dump_dir, exist_ok=True)
        _check_dir(dump_dir, "dump_dir")
    cpu_worker = options.get("cpu_worker")
    if cpu_worker not in (None, True, False):
        raise ValueError(f"cpu_worker={cpu_worker!r}: pass True, False or None (None: on a GPU only)")
    trace = _check_trace_path(options.get("trace", os.environ.get("KVDRIVE_TRACE")))
    policy_keys = [f.name for f in fields(SelectionPolicy)]
    return KVDriveOptions(
        block_size=block_size,
        device_memory=parse_size(options.get("device_memory"), "device_memory"),
        host_memory=parse_size(options.get("host_memory"), "host_memory"),
        disk_dir=disk_dir,
        dump_dir=dump_dir,
        cache_policy=options.get("cache_policy", "attention"),
        reuse_window=reuse,
        prefetch_depth=options.get("prefetch_depth", DEFAULT_PREFETCH_DEPTH),
        cpu_worker=cpu_worker,
        trace=trace,
        compile_rest=compile_rest,
        cpu_linears=cpu_linears,
        policy=SelectionPolicy(**{k: options[k] for k in policy_keys if k in options}),
    )
