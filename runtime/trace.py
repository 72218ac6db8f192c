"""A timeline of a runtime's stages in Chrome Trace Event Format, and its summary.

``Tracer`` records complete events (``"ph": "X"``: a name, a start, a duration, a thread, args)
from any thread and writes them as one JSON file that Perfetto (ui.perfetto.dev) and
chrome://tracing open. A disabled tracer (no path) does nothing, so a runtime can call it
unconditionally. ``summarize`` and ``render`` turn such a file back into what
``kvdrive trace summary`` prints: time per stage, step wall times, and how much of the disk reads
and host-to-device copies ran hidden under compute on other threads, and how many cores the
process kept busy (a "cores busy" counter track: the process's CPU time over wall time between
the starts of consecutive steps).
"""
from __future__ import annotations

import atexit
import bisect
import contextlib
import json
import logging
import os
import statistics
import threading
import time
from collections import Counter, defaultdict
from typing import Any, Iterable, NamedTuple, Optional

from tabulate import tabulate

log = logging.getLogger(__name__)

ENV_VAR = "KVDRIVE_TRACE"
MAX_EVENTS = 2_000_000          # ~0.6 GiB of events (~300 B each) at most; past it recording stops
PROCESS_NAME = "kvdrive"
CATEGORY = "kvdrive"

DISK_READ = "disk_read"
HOST_TO_DEVICE = "host_to_device"
IO_WAIT = "io_wait"
# not compute: moving bytes, or a thread waiting for another's work (the merge for the CPU part)
WAITING = frozenset((DISK_READ, HOST_TO_DEVICE, IO_WAIT, "disk_write", "cpu_wait"))
SLOWEST_STAGE_TARGET = 1.2      # the target for a decode step's wall / its slowest stage
CORES_BUSY = "cores busy"       # the counter track of the process's CPU time over wall time
CPU_MS = "process_cpu_ms"       # the arg of a step's opening event: the process's CPU time so far

_NULL_SPAN = contextlib.nullcontext()
_claimed_lock = threading.Lock()
_claimed: set[str] = set()      # trace files this process's tracers write (tracer_for keeps them apart)


class Tracer:
    """Collects Chrome Trace Event Format complete events ("ph": "X") for one runtime and writes them as JSON.

    Events are kept as small tuples (name, t0, t1, tid, args) under a lock; the JSON is built only
    when the file is written (``flush``, ``close``, or at process exit if events are unwritten).
    """

    def __init__(self, path: Optional[str], max_events: int = MAX_EVENTS):
        self.path = path
        self.enabled = bool(path)
        self.max_events = max_events
        self._origin = time.perf_counter()          # ts 0 in the file
        self._created = time.time()
        self._pid = os.getpid()
        self._lock = threading.Lock()               # events, threads, dropped, closed
        self._write_lock = threading.Lock()         # one flush at a time
        self._local = threading.local()             # this thread's tid
        self._events: list[tuple] = []
        self._threads: list[tuple[int, str]] = []   # (tid, Python thread name), in order of first event
        self._next_tid = 1                          # the main thread is 0; others in order of appearance
        self._counters: list[tuple] = []            # (t, cores busy from t to the next sample)
        self._last_cpu: Optional[tuple[float, float]] = None     # (perf_counter, process_time) of the last sample
        self._dropped = 0
        self._written = 0                           # events + dropped at the last write
        self._closed = False
        if self.enabled:
            atexit.register(self._flush_unwritten)

    def complete(self, name: str, t0: float, t1: float, **args) -> None:
        """Record one event on the current thread; t0 and t1 are ``time.perf_counter()`` seconds."""
        if not self.enabled:
            return
        tid = getattr(self._local, "tid", None)
        if tid is None:
            tid = self._register_thread()
        with self._lock:
            if self._closed:
                return
            if len(self._events) >= self.max_events:
                self._dropped += 1
                return
            self._events.append((name, t0, t1, tid, args))

    def cpu_sample(self) -> float:
        """The process's CPU time so far (ms, every thread); the "cores busy" counter track gets
        its CPU time over wall time since the previous sample (a step's opening takes one)."""
        now, cpu = time.perf_counter(), time.process_time()
        with self._lock:
            last, self._last_cpu = self._last_cpu, (now, cpu)
            if (last is not None and now > last[0] and not self._closed
                    and len(self._events) + len(self._counters) < self.max_events):
                self._counters.append((last[0], (cpu - last[1]) / (now - last[0])))
        return cpu * 1e3

    def span(self, name: str, **args):
        """A context manager that times its body and records it, also when the body raises.

        Disabled, it is one shared no-op context (no generator, no clock read).
        """
        if not self.enabled:
            return _NULL_SPAN
        return self._span(name, args)

    @contextlib.contextmanager
    def _span(self, name: str, args: dict):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.complete(name, t0, time.perf_counter(), **args)

    def flush(self) -> None:
        """Write the file now with every event so far: to a temporary file, then ``os.replace``,
        so a reader never sees a partial file."""
        if not self.enabled:
            return
        with self._write_lock:
            with self._lock:
                events, threads, dropped = list(self._events), list(self._threads), self._dropped
            counters = list(self._counters)
            _write_atomically(self.path, self._lines(events, threads, dropped, counters))
            self._written = len(events) + dropped

    def close(self) -> None:
        """Flush, then ignore further events; closing twice writes once."""
        if not self.enabled:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.flush()
        atexit.unregister(self._flush_unwritten)

    def _register_thread(self) -> int:
        thread = threading.current_thread()
        with self._lock:
            if thread is threading.main_thread():
                tid = 0
            else:
                tid, self._next_tid = self._next_tid, self._next_tid + 1
            self._threads.append((tid, thread.name))
        self._local.tid = tid
        return tid

    def _flush_unwritten(self) -> None:
        """At exit: write events no flush has written yet (never from a forked child: the file is the parent's)."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            unwritten = len(self._events) + self._dropped != self._written
        if unwritten:
            self.flush()

    def _lines(self, events: list[tuple], threads: list[tuple[int, str]], dropped: int,
               counters: list[tuple] = ()) -> Iterable[str]:
        """The file's text, piece by piece: building 2M event dicts at once would double the memory."""
        pid = self._pid
        yield '{"traceEvents": [\n'
        yield json.dumps({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                          "args": {"name": PROCESS_NAME}})
        for tid, thread_name in sorted(threads):
            yield ",\n" + json.dumps({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                                      "args": {"name": thread_name}})
        names: dict[str, str] = {}                  # a stage's name, JSON-quoted once
        for name, t0, t1, tid, args in events:
            quoted = names.get(name) or names.setdefault(name, json.dumps(name))
            ts = (t0 - self._origin) * 1e6
            dur = max(0.0, (t1 - t0) * 1e6)
            yield (f',\n{{"name": {quoted}, "cat": "{CATEGORY}", "ph": "X", "ts": {ts:.3f}, "dur": {dur:.3f}, '
                   f'"pid": {pid}, "tid": {tid}, "args": {json.dumps(args, default=_jsonable)}}}')
        for t, cores in counters:
            yield (f',\n{{"name": "{CORES_BUSY}", "cat": "{CATEGORY}", "ph": "C", "ts": {(t - self._origin) * 1e6:.3f}, '
                   f'"pid": {pid}, "tid": 0, "args": {{"cores": {cores:.3f}}}}}')
        yield '\n],\n"displayTimeUnit": "ms",\n"otherData": ' + json.dumps(self._other_data(len(events), dropped)) + "}\n"

    def _other_data(self, recorded: int, dropped: int) -> dict:
        other = {"tool": "kvdrive-compile", "pid": self._pid,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self._created)),
                 "clock": "time.perf_counter, ts 0 at the tracer's creation",
                 "events": recorded, "max_events": self.max_events, "dropped_events": dropped,
                 "cpu_count": usable_cpus()}
        if dropped:
            other["note"] = (f"event cap reached: recording stopped after {recorded} events "
                             f"({dropped} later events dropped); the timeline ends early")
        return other


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def tracer_for(path: Optional[str]) -> Tracer:
    """The tracer of one runtime: ``path``, else ``$KVDRIVE_TRACE``, else a disabled tracer.

    Each tracer of a process writes its own file: when the path is already another tracer's
    (several runtimes under one ``KVDRIVE_TRACE``), this one writes ``NAME.1.json``,
    ``NAME.2.json``... beside it instead of overwriting it.
    """
    path = path or os.environ.get(ENV_VAR) or None
    if path is None:
        return Tracer(None)
    return Tracer(_claim(path))


def _claim(path: str) -> str:
    stem, ext = os.path.splitext(path)
    with _claimed_lock:
        candidate, n = path, 0
        while os.path.abspath(candidate) in _claimed:
            n += 1
            candidate = f"{stem}.{n}{ext}"
        _claimed.add(os.path.abspath(candidate))
    if candidate != path:
        log.info("trace file %s is another runtime's; this runtime's timeline goes to %s", path, candidate)
    return candidate


def _jsonable(value: Any) -> Any:
    """An arg JSON cannot write: a torch/numpy scalar becomes its number, anything else its str."""
    item = getattr(value, "item", None)
    if callable(item):
        with contextlib.suppress(Exception):
            return item()
    return str(value)


def _write_atomically(path: str, pieces: Iterable[str]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.writelines(pieces)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- reading a trace back: kvdrive trace summary ----------------------------------------------

class TraceFormatError(ValueError):
    """The file is not a Chrome trace (JSON object with traceEvents, or a JSON array of events)."""


class Event(NamedTuple):
    """A complete event in milliseconds."""

    name: str
    tid: Any
    start: float
    end: float
    args: dict

    @property
    def ms(self) -> float:
        return self.end - self.start


def load(path: str) -> tuple[list[dict], dict]:
    """A trace file's events and its otherData; raises OSError or TraceFormatError."""
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise TraceFormatError(f"{path} is not JSON: {e}") from None
    if isinstance(data, list):
        events, other = data, {}
    elif isinstance(data, dict) and isinstance(data.get("traceEvents"), list):
        events, other = data["traceEvents"], data.get("otherData") or {}
    else:
        raise TraceFormatError(f"{path} is not a Chrome trace: no traceEvents list")
    for i, e in enumerate(events):
        if not isinstance(e, dict):
            raise TraceFormatError(f"{path}: event {i} is not a JSON object")
    return events, other if isinstance(other, dict) else {}


def complete_events(events: Iterable[dict]) -> list[Event]:
    """The ``"ph": "X"`` events, in ms; raises TraceFormatError for one without a numeric ts or dur."""
    out = []
    for i, e in enumerate(events):
        if e.get("ph") != "X":
            continue
        ts, dur = e.get("ts"), e.get("dur")
        if not (isinstance(ts, (int, float)) and isinstance(dur, (int, float))):
            raise TraceFormatError(f"event {i} ({e.get('name')!r}) has no numeric ts and dur")
        args = e.get("args") if isinstance(e.get("args"), dict) else {}
        out.append(Event(str(e.get("name")), e.get("tid"), ts / 1000, (ts + dur) / 1000, args))
    return out


def union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint intervals covering exactly what the given ones cover."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def length(merged: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in merged)


def covered(start: float, end: float, merged: list[tuple[float, float]], ends: list[float]) -> float:
    """How much of [start, end] the disjoint sorted intervals ``merged`` (``ends``: their ends) cover."""
    total = 0.0
    for i in range(bisect.bisect_right(ends, start), len(merged)):
        s, e = merged[i]
        if s >= end:
            break
        total += min(e, end) - max(s, start)
    return total


def steps(events: list[Event]) -> dict[Any, tuple[str, list[Event]]]:
    """Events grouped by ``args.step``, each step with its phase (the first ``args.phase`` given)."""
    grouped: dict[Any, list[Event]] = defaultdict(list)
    for e in events:
        if "step" in e.args:
            grouped[e.args["step"]].append(e)
    return {step: (next((e.args["phase"] for e in evs if "phase" in e.args), "unknown"), evs)
            for step, evs in grouped.items()}


def wall(events: list[Event]) -> float:
    return max(e.end for e in events) - min(e.start for e in events)


def hidden_share(events: list[Event], kind: str, compute: list[Event]) -> tuple[float, Optional[float]]:
    """Total ms of ``kind`` events, and the share of it covered by compute on other threads.

    Per event, the covered part is its overlap with the union of compute intervals on every
    thread but its own: nested or concurrent compute is counted once, and waiting never counts.
    """
    mine = [e for e in events if e.name == kind]
    total = sum(e.ms for e in mine)
    if not mine or total <= 0:
        return total, None
    others: dict[Any, tuple[list, list]] = {}
    hidden = 0.0
    for e in mine:
        if e.tid not in others:
            merged = union((c.start, c.end) for c in compute if c.tid != e.tid)
            others[e.tid] = (merged, [end for _, end in merged])
        hidden += covered(e.start, e.end, *others[e.tid])
    return total, hidden / total


def slowest_stage(step_events: list[Event]) -> tuple[str, float]:
    """The stage whose events' intervals cover the most of the step, and that length (ms)."""
    by_name: dict[str, list] = defaultdict(list)
    for e in step_events:
        by_name[e.name].append((e.start, e.end))
    return max(((name, length(union(iv))) for name, iv in by_name.items()), key=lambda p: (p[1], p[0]))


def slowest_stages(step_events: list[list[Event]], walls: list[float]) -> tuple[Optional[float], dict[str, int]]:
    """The mean over steps of wall / slowest stage's time (1.0: the step took no longer than its
    slowest stage, everything else hidden under it), and how often each stage was the slowest."""
    ratios, counts = [], Counter()
    for evs, step_wall in zip(step_events, walls):
        name, ms = slowest_stage(evs)
        counts[name] += 1
        if ms > 0:
            ratios.append(step_wall / ms)
    return (statistics.fmean(ratios) if ratios else None), dict(counts.most_common())


def cores_busy(events: list[Event]) -> Optional[float]:
    """The process's CPU time over wall time across decode steps, each from its opening (the
    event carrying ``process_cpu_ms``) to its session's next opening: how many cores the
    steps kept busy, the model's own ops and the time between steps included (None: no such
    pair of openings in the trace)."""
    opens: dict[Any, list[Event]] = defaultdict(list)
    for e in events:
        if isinstance(e.args.get(CPU_MS), (int, float)) and "session" in e.args:
            opens[e.args["session"]].append(e)
    cpu = wall_ms = 0.0
    for evs in opens.values():
        evs.sort(key=lambda e: e.start)
        for a, b in zip(evs, evs[1:]):
            if a.args.get("phase") == "decode" and b.start > a.start:
                cpu += b.args[CPU_MS] - a.args[CPU_MS]
                wall_ms += b.start - a.start
    return cpu / wall_ms if wall_ms > 0 else None


def _step_stats(walls: list[float]) -> dict:
    return {"steps": len(walls),
            "wall_ms_p50": statistics.median(walls) if walls else None,
            "wall_ms_mean": statistics.fmean(walls) if walls else None,
            "wall_ms_total": sum(walls)}


def summarize(events: Iterable[dict], other: Optional[dict] = None) -> dict:
    """What ``kvdrive trace summary`` reports, from a trace's events (dicts as in the file).

    stages: per event name, count / total / mean ms over all events, and ``decode_share``: its
    time within decode steps over the decode steps' summed wall time. decode / prefill: step
    counts and wall times (a step's wall: its last end minus its first start). overlap, over
    decode steps: ``stage_sum_over_wall`` (> 1: stages ran at the same time), the hidden shares of
    disk_read and host_to_device time, and ``wall_over_slowest_stage`` (mean of each step's wall
    over the union length of its slowest stage; the target is <= 1.2), ``cores_busy`` (the
    process's CPU time over wall time between decode steps' openings) and, from the file's
    ``other`` data, ``cpu_count`` (the CPUs the process could use).
    """
    evs = complete_events(events)
    grouped = steps(evs)
    decode = [step_evs for phase, step_evs in grouped.values() if phase == "decode"]
    prefill = [step_evs for phase, step_evs in grouped.values() if phase == "prefill"]
    decode_events = [e for step_evs in decode for e in step_evs]
    decode_walls = [wall(s) for s in decode]
    decode_wall = sum(decode_walls)
    compute = [e for e in evs if e.name not in WAITING]
    disk_ms, disk_hidden = hidden_share(decode_events, DISK_READ, compute)
    copy_ms, copy_hidden = hidden_share(decode_events, HOST_TO_DEVICE, compute)
    wall_over_slowest, slowest_counts = slowest_stages(decode, decode_walls)
    return {
        "events": len(evs),
        "stages": _stages(evs, decode_events, decode_wall),
        "decode": _step_stats(decode_walls),
        "prefill": _step_stats([wall(s) for s in prefill]),
        "overlap": {
            "stage_sum_over_wall": sum(e.ms for e in decode_events) / decode_wall if decode_wall else None,
            "disk_read_ms": disk_ms, "disk_read_hidden": disk_hidden,
            "host_to_device_ms": copy_ms, "host_to_device_hidden": copy_hidden,
            "wall_over_slowest_stage": wall_over_slowest, "slowest_stage_counts": slowest_counts,
            "cores_busy": cores_busy(evs),
        },
        "cpu_count": (other or {}).get("cpu_count"),
    }


def _stages(evs: list[Event], decode_events: list[Event], decode_wall: float) -> dict:
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0, 0.0])      # count, total ms, decode ms
    for e in evs:
        t = totals[e.name]
        t[0] += 1
        t[1] += e.ms
    for e in decode_events:
        totals[e.name][2] += e.ms
    return {name: {"count": n, "total_ms": ms, "mean_ms": ms / n,
                   "decode_share": dec / decode_wall if decode_wall else None}
            for name, (n, ms, dec) in sorted(totals.items(), key=lambda kv: -kv[1][1])}


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _cores(busy: Optional[float], cpus: Optional[int]) -> str:
    if busy is None:
        return "-"
    if not isinstance(cpus, int):
        return f"{busy:.2f} cores"
    saturated = "  (near all: no idle core left for overlap to use)" if busy >= 0.9 * cpus else ""
    return f"{busy:.2f} cores of {cpus}{saturated}"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render(summary: dict) -> str:
    """The summary as text: a stage table, a step table, and the overlap lines."""
    stages = tabulate([[name, s["count"], _ms(s["total_ms"]), _ms(s["mean_ms"]), _pct(s["decode_share"])]
                       for name, s in summary["stages"].items()],
                      headers=["stage", "count", "total ms", "mean ms", "share of decode wall"],
                      disable_numparse=True)
    step_rows = [[phase, s["steps"], _ms(s["wall_ms_p50"]), _ms(s["wall_ms_mean"]), _ms(s["wall_ms_total"])]
                 for phase, s in (("prefill", summary["prefill"]), ("decode", summary["decode"]))]
    step_table = tabulate(step_rows, headers=["phase", "steps", "wall ms p50", "wall ms mean", "wall ms total"],
                          disable_numparse=True)
    o = summary["overlap"]
    slowest = ", ".join(f"{name} {n}" for name, n in o["slowest_stage_counts"].items()) or "-"
    lines = [f"{summary['events']} events", "", stages, "", step_table, "",
             "overlap over decode steps:",
             f"  stage time summed / wall:     {_ratio(o['stage_sum_over_wall'])}  (> 1: stages ran at once)",
             f"  disk_read hidden by compute:  {_pct(o['disk_read_hidden'])} of {_ms(o['disk_read_ms'])} ms",
             f"  host_to_device hidden:        {_pct(o['host_to_device_hidden'])} of {_ms(o['host_to_device_ms'])} ms",
             f"  step wall / slowest stage:    {_ratio(o['wall_over_slowest_stage'])}  "
             f"(target <= {SLOWEST_STAGE_TARGET}x; slowest per step: {slowest})",
             f"  CPU busy (process CPU / wall): {_cores(o.get('cores_busy'), summary.get('cpu_count'))}"]
    if summary.get("note"):
        lines += ["", f"note: {summary['note']}"]
    return "\n".join(lines)
