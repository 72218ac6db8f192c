"""Row metrics from what a run recorded: step times and the runtime's stats snapshots
(``RuntimeStats.as_dict()`` before and after the decode steps). No model needed."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..runtime import trace as timeline

BOUNDARIES = ("disk->host", "host->device", "device->host", "host->disk")
TIERS = ("device", "host", "disk")
CACHING_TIERS = ("device", "host")       # the tiers ``admitted`` and ``evicted`` count copies into/out of
# the runtime's stage timers; a snapshot without one counts it as 0 ms
STAGES = ("select", "io_wait", "cpu_attention", "device_attention", "merge", "append", "prefetch", "write_home")
# the stages every row of a results JSON gives (older runs had no write_home)
REQUIRED_STAGES = STAGES[:7]


def delta(after: dict, before: dict) -> dict:
    """``after - before`` per key (a key missing from ``before`` counts from 0)."""
    return {k: v - before.get(k, 0) for k, v in after.items()}


def step_metrics(step_seconds: list[float], batch: int) -> dict:
    """Decode throughput of the whole batch and per-step latency (ms) of the timed steps."""
    s = np.asarray(step_seconds, dtype=np.float64)
    if s.size == 0:
        return {"decode_tok_s": None, "step_ms_median": None, "step_ms_p95": None}
    return {"decode_tok_s": batch * s.size / s.sum(),
            "step_ms_median": 1e3 * float(np.median(s)),
            "step_ms_p95": 1e3 * float(np.percentile(s, 95))}


def _field(snapshot: dict, key: str) -> dict:
    """A snapshot's dict field (``{}`` when it is missing, or not a dict)."""
    value = snapshot.get(key)
    return value if isinstance(value, dict) else {}


def _delta_of(after: dict, before: dict, key: str, parts: tuple[str, ...]) -> dict:
    """``after[key] - before[key]`` for each of ``parts`` (missing fields and parts count as 0)."""
    a, b = _field(after, key), _field(before, key)
    return {p: a.get(p, 0) - b.get(p, 0) for p in parts}


def hit_rate(before: dict, after: dict) -> tuple[Optional[float], Optional[str]]:
    """The device tier's share of the KV the steps between two snapshots attended, and what it is
    counted from: bytes ``served`` by where each block lay when a step needed it, or (a runtime that
    does not count them) the share of ``selected_blocks`` read on the device. ``(None, None)``: no
    step attended anything."""
    served = _delta_of(after, before, "served", TIERS)
    total = sum(served.values())
    if total > 0:
        return served["device"] / total, "served"
    selected = _delta_of(after, before, "selected_blocks", TIERS)
    total = sum(selected.values())
    if total > 0:
        return selected["device"] / total, "selected_blocks"
    return None, None


def runtime_metrics(before: dict, after: dict, steps: int, batch: int, step_seconds: list[float],
                    split_attention: bool) -> dict:
    """Bytes moved per decoded token per boundary; the device hit rate (``hit_rate``, see
    ``hit_rate``; ``device_hit_rate``: the share of the selected blocks read on the device); the
    selected KV bytes served per decoded token by tier; block copies admitted to and evicted from
    each caching tier per step; the admission model's measured inputs and decisions at the end;
    the CPU's share of the attention (split attention only: fetch
    designs attend on the device); and each stage's wall time per step (ms) with "other" = step
    time minus the stages."""
    tokens = max(1, steps * batch)
    moved = _delta_of(after, before, "moved_bytes", BOUNDARIES)
    selected = _delta_of(after, before, "selected_blocks", TIERS)
    total = sum(selected.values())
    hit = selected["device"] / total if total else None
    cpu = (selected["host"] + selected["disk"]) / total if total else None
    rate, source = hit_rate(before, after)
    served = _delta_of(after, before, "served", TIERS)
    admitted = _delta_of(after, before, "admitted", CACHING_TIERS)
    evicted = _delta_of(after, before, "evicted", CACHING_TIERS)
    ahead = _delta_of(after, before, "prefetch", ("landed", "in_flight", "missed"))
    asked = sum(ahead.values())
    stages = delta(_field(after, "stage_seconds"), _field(before, "stage_seconds"))
    # a stage this list does not know yet still counts (and is not part of "other")
    names = list(STAGES) + [k for k in stages if k not in STAGES and k != "other"]
    per_step = {k: 1e3 * stages.get(k, 0.0) / max(1, steps) for k in names}
    mean_ms = 1e3 * sum(step_seconds) / max(1, len(step_seconds))
    per_step["other"] = mean_ms - sum(per_step.values())
    return {"moved_per_token": {b: moved.get(b, 0) / tokens for b in BOUNDARIES},
            "device_hit_rate": hit, "hit_rate": rate, "hit_rate_from": source,
            "served_per_token": {t: served[t] / tokens for t in TIERS},
            "admitted_per_step": {t: admitted[t] / max(1, steps) for t in CACHING_TIERS},
            "evicted_per_step": {t: evicted[t] / max(1, steps) for t in CACHING_TIERS},
            "disk_cache_bypass": after.get("disk_cache_bypass") or None,
            "admission": after.get("admission") or None,       # the admission model's inputs and decisions
            "cpu_attention_share": (cpu if split_attention else 0.0) if total else None,
            "selected_blocks": selected,
            "prefetch_hit_rate": (ahead["landed"] + ahead["in_flight"]) / asked if asked else None,
            "stages_ms": per_step}


def pipeline(trace_path: str) -> dict:
    """From a system's timeline (the ``trace`` option): its decode steps' wall time and how much
    ran at once (``kvdrive trace summary``'s overlap figures)."""
    events, other = timeline.load(trace_path)
    summary = timeline.summarize(events, other)
    return {"trace": trace_path, "decode_steps": summary["decode"]["steps"],
            "decode_wall_ms_p50": summary["decode"]["wall_ms_p50"], "cpu_count": summary["cpu_count"],
            **summary["overlap"]}


def tier_bytes(*snapshots: dict) -> dict:
    """Peak KV bytes resident per tier over the snapshots (KV only grows while decoding)."""
    return {t: max((s.get("tiers") or {}).get(t, {}).get("resident_bytes", 0) for s in snapshots) for t in TIERS}


def offload_moved_per_token(kv_after_prefill: int, kv_end: int, batch: int) -> dict:
    """Hugging Face's offloaded cache copies every layer's KV to the device and back each step:
    per decoded token, the mean KV size over the steps, each way, divided by the batch."""
    per_step = (kv_after_prefill + kv_end) / 2
    return {"disk->host": 0.0, "host->device": per_step / batch, "device->host": per_step / batch,
            "host->disk": 0.0}


def first_difference(tokens: list[list[int]], reference: list[list[int]]) -> Optional[int]:
    """The first step (0 = the prefill's token) where any sequence differs; None if equal."""
    a, b = np.asarray(tokens), np.asarray(reference)
    if a.shape != b.shape:
        return 0
    diff = np.nonzero((a != b).any(axis=0))[0]
    return int(diff[0]) if diff.size else None


def busy(row: dict, best_read_gbs: float) -> bool:
    """Whether a shared machine disturbed a row's steps: the process got under 80% of the wall
    time as CPU time, or read the weights at under 70% of the best rate seen in the sweep."""
    wall, cpu, read = row.get("step_ms_median"), row.get("step_cpu_ms_median"), row.get("weights_read_gbs")
    if wall is None or cpu is None or read is None:
        return False
    return cpu < 0.8 * wall or read < 0.7 * best_read_gbs
