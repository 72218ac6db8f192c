"""Runs every system over a sweep's points on the same prompts and budgets, and records a row
per (system, point).

A point is a greedy decode of our own: one timed prefill (time to first token), then
``decode_steps`` timed steps, each ``model(next_tokens, cache=cache)`` on a ``DynamicCache``.
Systems run one after the other; each kvdrive design compiles once (the warm-up, timed as its
compile time), runs every point, and is undone (eager forward, Dynamo reset, KV released).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import platform
import time
from dataclasses import asdict, replace
from typing import Callable, Iterator, Optional

import numpy as np
import psutil
import torch
from tqdm import tqdm

import kvdrive_compile

from .. import models
from ..prompts import passkey_prompt
from . import metrics, report
from .presets import Budgets, Preset, Sweep, budgets_for, kv_bytes
from .projection import Geometry
from .systems import EXACT_SYSTEMS, REFERENCE, SAME_SELECTION, System, installed

log = logging.getLogger(__name__)

QUESTION_TOKENS = 16            # prompts are cut to length before their last tokens (the question)
WARMUP_TOKENS = 48
# kvdrive first among the compiled designs, then what the disk preset's targets compare it with:
# if the time budget runs out, the slowest baseline (fetch-all) is the one whose rows say so
RUN_ORDER = ("dense", "hf-offload", "kvdrive", "kvdrive-host", "kvdrive-exact", "shadowkv-like", "sparse-fetch",
             "hisparse-like", "fetch-all")


def run_order(name: str) -> int:
    """Where ``name`` runs (a system this list does not name runs last)."""
    return RUN_ORDER.index(name) if name in RUN_ORDER else len(RUN_ORDER)


def batch_prompts(tokenizer, context: int, batch: int, seed: int = 0) -> torch.Tensor:
    """``[batch, context]`` token ids: pass-key prompts with different keys and depths, cut to
    exactly ``context`` tokens (filler dropped just before the question)."""
    rows = []
    for i in range(batch):
        depth = 0.1 + 0.5 * i / max(1, batch - 1)
        text, _ = passkey_prompt(tokenizer, context, depth=depth, seed=seed + i)
        ids = tokenizer(text).input_ids
        rows.append(ids[:context - QUESTION_TOKENS] + ids[-QUESTION_TOKENS:])
    return torch.tensor(rows, dtype=torch.long)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy(model, cache, ids: torch.Tensor, steps: int,
           after_prefill: Optional[Callable[[], None]] = None,
           after_step: Optional[Callable[[int], None]] = None) -> tuple[torch.Tensor, float, list[tuple]]:
    """Greedy decode of ``ids: [B, L]``: ``(tokens [B, steps + 1], ttft seconds, per step
    (wall seconds, process CPU seconds))``. The CPU time tells a busy shared machine (wall time
    up, CPU time not) from a slower step.

    ``after_prefill`` runs between the prefill and the first timed step, ``after_step(i)`` after
    the ``i``-th (from 1) timed step; both outside the timing."""
    device = ids.device
    torch._dynamo.maybe_mark_dynamic(ids, 1)        # one prefill graph for every prompt length
    t0 = time.perf_counter()
    logits = model(ids, cache=cache, logits_to_keep=1).logits[:, -1]
    token = logits.argmax(-1, keepdim=True)                                      # [B, 1]
    _sync(device)
    ttft = time.perf_counter() - t0
    if after_prefill is not None:
        after_prefill()
    out, times = [token], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        token = model(token, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        times.append((time.perf_counter() - t0, time.process_time() - c0))
        out.append(token)
        if after_step is not None:
            after_step(len(times))
    return torch.cat(out, dim=1).cpu(), ttft, times


@torch.no_grad()
def weights_read_gbs(model, device: torch.device) -> float:
    """How fast this machine reads the model's weights right now (GB/s): a decode step's floor.
    On a shared machine it swings by an order of magnitude; each row records it."""
    params = list(model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in params)
    _sync(device)
    t0 = time.perf_counter()
    for p in params:
        p.sum()
    _sync(device)
    return nbytes / (time.perf_counter() - t0) / 1e9


def cache_bytes(cache, device: torch.device) -> dict:
    """KV bytes an eager Hugging Face cache holds, on the compute device and on the host (a
    kvdrive cache holds zero-byte stand-ins; its runtime's stats say where the KV is)."""
    held = {"device": 0, "host": 0, "disk": 0}
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                tier = "device" if t.device.type == device.type else "host"
                held[tier] += t.numel() * t.element_size()
    return held


def memory_needs(system: System, budgets: Budgets, dense_kv: int, activations: int, layers: int,
                 device: torch.device) -> tuple[int, int]:
    """Rough ``(compute-device bytes, host bytes)`` a point needs: the KV where the system keeps
    it (eager caches briefly hold two copies: ``torch.cat`` makes a new one), plus activations."""
    if system.offloaded_cache:
        kv_device, kv_host = 4 * dense_kv // max(1, layers), 2 * dense_kv
    elif system.kvdrive:
        kv_device = budgets.device_memory if system.own_device_tier else 0
        kv_host = budgets.host_memory if system.host_tier else dense_kv
    else:
        kv_device, kv_host = 2 * dense_kv, 0
    if device.type == "cpu":
        return 0, kv_device + kv_host + activations
    return kv_device + activations, kv_host


def memory_shortfall(need_device: int, need_host: int, device: torch.device) -> Optional[str]:
    """Why a point cannot run in this machine's memory (None: it fits, roughly)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if need_device > 0.9 * free:
            return f"skipped: needs ~{need_device / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB free"
    available = psutil.virtual_memory().available
    if need_host > 0.8 * available:
        return f"skipped: needs ~{need_host / 2**30:.1f} GiB of RAM, {available / 2**30:.1f} GiB available"
    return None


class SweepRun:
    """One sweep: the model, its prompts and budgets, and the rows of every system."""

    def __init__(self, sweep: Sweep, model, tokenizer, device: torch.device, bar: tqdm,
                 deadline: Optional[float] = None, second_try: bool = True, trace_dir: Optional[str] = None):
        self.sweep, self.model, self.tokenizer, self.device, self.bar = sweep, model, tokenizer, device, bar
        self.deadline, self.second_try, self.trace_dir = deadline, second_try, trace_dir
        if trace_dir is not None:
            os.makedirs(trace_dir, exist_ok=True)
        self.best_read = 0.0                         # the fastest weights read seen (GB/s)
        self.dtype = next(model.parameters()).dtype
        self.budgets = budgets_for(sweep, model.config, self.dtype)
        self.prompts = {c: batch_prompts(tokenizer, c, max(sweep.batches)) for c in sweep.contexts}

    def ids(self, context: int, batch: int) -> torch.Tensor:
        return self.prompts[context][:batch].to(self.device)

    def row(self, system: System, context: int, batch: int, status: str, note: str = "", **values) -> dict:
        dense_kv = kv_bytes(self.model.config, context, batch, self.dtype)
        return {"system": system.name, "context": context, "batch": batch, "status": status, "note": note,
                "dense_kv_bytes": dense_kv, **values}

    def run(self, system: System) -> list[dict]:
        why = system.unavailable(self.device)
        if why is not None:
            self.bar.update(len(self.sweep.points))
            return [self.row(system, c, b, why.split(" (")[0], why) for c, b in self.sweep.points]
        rows = []
        trace = None if self.trace_dir is None else os.path.join(self.trace_dir, f"{self.sweep.model}-{system.name}.json")
        if trace is not None and os.path.exists(trace):
            os.remove(trace)                         # else a run that writes none would report the old one
        with installed(self.model, system, self.budgets, trace) as options:
            try:
                compile_s, graphs = self.warm_up(system)
            except Exception as e:                    # its rows say so; the other systems still run
                log.exception("%s: the warm-up failed", system.name)
                self.bar.update(len(self.sweep.points))
                why = f"warm-up failed: {type(e).__name__}: {str(e)[:200]}"
                return [self.row(system, c, b, "error", why) for c, b in self.sweep.points]
            for context, batch in self.sweep.points:
                self.bar.set_postfix_str(f"{self.sweep.model} {system.name} {context}x{batch}")
                rows.append(self.point(system, options, context, batch, compile_s, graphs))
                self.bar.update()
            rows = [self.again_if_busy(system, options, r) for r in rows]
        if trace is not None and os.path.exists(trace):      # written when the system's runtime was let go
            pipeline = metrics.pipeline(trace)
            for r in rows:
                r["pipeline"] = pipeline
        return rows

    def again_if_busy(self, system: System, options: Optional[dict], row: dict) -> dict:
        """A row the shared machine disturbed is measured once more; the quieter of the two stays
        (every system gets the same second chance; none when the preset says so)."""
        self.best_read = max(self.best_read, row.get("weights_read_gbs") or 0.0)
        if not self.second_try or row["status"] not in ("ok", "over budget"):
            return row
        if self.device.type != "cpu" or not metrics.busy(row, self.best_read):   # a GPU step syncs, CPU idle
            return row
        self.bar.set_postfix_str(f"{self.sweep.model} {system.name} {row['context']}x{row['batch']} again")
        again = self.point(system, options, row["context"], row["batch"], row["compile_s"], row["warmup_graphs"])
        if (again.get("weights_read_gbs") or 0.0) > row["weights_read_gbs"]:
            row = again
        row["measured_twice"] = True
        return row

    def warm_up(self, system: System) -> tuple[Optional[float], int]:
        """Compile (kvdrive designs) on short prompts at each of the sweep's batch sizes, the
        prompt length marked dynamic, so the timed points reuse the graphs: ``(seconds, graphs
        compiled)``. Eager systems run once, untimed."""
        batches = sorted(set(self.sweep.batches)) if system.kvdrive else self.sweep.batches[:1]
        # past a sliding window the graphs differ (the cache keeps a fixed slice): warm up there
        window = getattr(self.model.config, "sliding_window", None) or 0
        length = min(max(WARMUP_TOKENS, window + WARMUP_TOKENS), min(self.sweep.contexts))
        g0 = kvdrive_compile.counters.graphs
        t0 = time.perf_counter()
        for batch in batches:
            ids = self.ids(self.sweep.contexts[0], batch)[:, :length]
            cache = system.new_cache(self.model)
            greedy(self.model, cache, ids, 2)
            del cache
            kvdrive_compile.release_all()
        seconds = time.perf_counter() - t0
        return (seconds if system.kvdrive else None), kvdrive_compile.counters.graphs - g0

    def point(self, system: System, options: Optional[dict], context: int, batch: int,
              compile_s: Optional[float], graphs: int) -> dict:
        if self.deadline is not None and time.perf_counter() > self.deadline:
            return self.row(system, context, batch, "skipped", "skipped: the preset's time budget was spent")
        dense_kv = kv_bytes(self.model.config, context, batch, self.dtype)
        hidden = self.model.config.hidden_size
        activations = 24 * batch * context * hidden * self.dtype.itemsize + (256 << 20)
        needs = memory_needs(system, self.budgets, dense_kv, activations, self.model.config.num_hidden_layers,
                             self.device)
        short = memory_shortfall(*needs, self.device)
        if short is not None:
            return self.row(system, context, batch, "skipped", short)
        try:
            return self.measure(system, options, context, batch, compile_s, graphs)
        except (torch.OutOfMemoryError, MemoryError) as e:
            return self.row(system, context, batch, "out of memory", f"out of memory: {str(e)[:160]}")
        except Exception as e:                        # a failed point is a row, not a lost run
            log.exception("%s at %dx%d failed", system.name, context, batch)
            return self.row(system, context, batch, "error", f"{type(e).__name__}: {str(e)[:200]}")
        finally:
            kvdrive_compile.release_all()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def measure(self, system: System, options: Optional[dict], context: int, batch: int,
                compile_s: Optional[float], graphs: int) -> dict:
        steps = self.sweep.decode_steps
        cache = system.new_cache(self.model)
        snapshot = (lambda: kvdrive_compile.stats(options).as_dict()) if options else (lambda: None)
        snaps, held = [], []                           # after the prefill, after the last step
        middle = []                                    # after half the steps: the warm cache's hit rate

        def after_prefill():
            snaps.append(snapshot())
            held.append(cache_bytes(cache, self.device) if options is None else None)

        def after_step(i: int):
            if options is not None and i == steps // 2 and steps >= 2:
                middle.append(snapshot())

        g0 = kvdrive_compile.counters.graphs
        read_before = weights_read_gbs(self.model, self.device)
        tokens, ttft, timed = greedy(self.model, cache, self.ids(context, batch), steps, after_prefill, after_step)
        times = [wall for wall, _ in timed]
        read_gbs = (read_before + weights_read_gbs(self.model, self.device)) / 2
        recompiles = kvdrive_compile.counters.graphs - g0
        snaps.append(snapshot())
        held.append(cache_bytes(cache, self.device) if options is None else None)
        values = {"ttft_s": ttft, "step_ms": [1e3 * t for t in times],
                  "step_cpu_ms_median": 1e3 * float(np.median([cpu for _, cpu in timed])) if timed else None,
                  "compile_s": compile_s, "weights_read_gbs": read_gbs,
                  "warmup_graphs": graphs, "recompiles": recompiles, "tokens": tokens.tolist(),
                  **metrics.step_metrics(times, batch)}
        if options is not None:
            values.update(metrics.runtime_metrics(snaps[0], snaps[1], steps, batch, times,
                                                  system.attention == "split"))
            values["hit_rate_late"] = metrics.hit_rate(middle[0], snaps[1])[0] if middle else None
            values["peak_bytes"] = metrics.tier_bytes(*snaps)
            values["kv_bytes"] = sum(values["peak_bytes"].values())
            if not any(values["selected_blocks"].values()):
                return self.row(system, context, batch, "error", "the kvdrive graphs did not run during the "
                                "timed steps (Dynamo fell back to eager: recompile limit?)", **values)
        else:
            values.update(self.eager_metrics(system, held, batch))
        values["disk_bytes"] = values["peak_bytes"]["disk"]
        status, note = self.budget_status(system, values["peak_bytes"])
        return self.row(system, context, batch, status, note, **values)

    def eager_metrics(self, system: System, held: list[dict], batch: int) -> dict:
        kv = [sum(h.values()) for h in held]
        if system.offloaded_cache:
            moved = metrics.offload_moved_per_token(kv[0], kv[-1], batch)
            # at most two layers on the device at once (the one attended, the one prefetched)
            per_layer = kv[-1] / max(1, self.model.config.num_hidden_layers)
            peak = {"device": int(2 * per_layer), "host": kv[-1], "disk": 0}
        else:
            moved = {b: 0.0 for b in metrics.BOUNDARIES}
            peak = {"device": kv[-1], "host": 0, "disk": 0}
        hit = 1.0 if not system.offloaded_cache else None
        return {"moved_per_token": moved, "peak_bytes": peak, "kv_bytes": kv[-1],
                "device_hit_rate": hit, "hit_rate": hit, "hit_rate_late": hit, "hit_rate_from": None,
                "served_per_token": None, "admitted_per_step": None, "evicted_per_step": None,
                "disk_cache_bypass": None, "cpu_attention_share": 0.0, "stages_ms": None, "selected_blocks": None}

    def budget_status(self, system: System, peak: dict) -> tuple[str, str]:
        if peak["device"] > self.budgets.device_memory:
            return ("over budget", f"KV on the device {peak['device'] / 2**20:.1f} MiB > device budget "
                                   f"{self.budgets.device_memory / 2**20:.0f} MiB")
        return "ok", ""


def check_tokens(rows: list[dict]) -> None:
    """Each row's tokens against its reference system's at the same point (``tokens_check``)."""
    by_key = {(r["system"], r["context"], r["batch"]): r for r in rows}
    for r in rows:
        if r.get("tokens") is None:
            r["tokens_check"] = None
            continue
        if r["system"] == "dense":
            r["tokens_check"] = "reference"
            continue
        ref_name = REFERENCE.get(r["system"], "dense")
        ref = by_key.get((ref_name, r["context"], r["batch"]))
        if ref is None or ref.get("tokens") is None:
            r["tokens_check"] = f"no {ref_name} tokens"
            continue
        step = metrics.first_difference(r["tokens"], ref["tokens"])
        exact = r["system"] in EXACT_SYSTEMS or r["system"] in SAME_SELECTION
        if step is None:
            r["tokens_check"] = f"= {ref_name}"
        else:
            r["tokens_check"] = (f"MISMATCH vs {ref_name} at step {step}" if exact
                                 else f"differs from {ref_name} from step {step} (sparse)")


def run_sweep(sweep: Sweep, chosen: list[System], loaded, device: torch.device, dtype: torch.dtype,
              bar: tqdm, deadline: Optional[float], second_try: bool = True, trace_dir: Optional[str] = None) -> dict:
    model, tokenizer = loaded if loaded is not None else models.load(sweep.model, dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    run = SweepRun(sweep, model, tokenizer, device, bar, deadline, second_try, trace_dir)
    rows: list[dict] = []
    for system in sorted(chosen, key=lambda s: run_order(s.name)):
        log.info("%s: %s", sweep.model, system.name)
        rows += run.run(system)
    order = [s.name for s in chosen]
    rows.sort(key=lambda r: (order.index(r["system"]), r["context"], r["batch"]))
    check_tokens(rows)
    best = max([r.get("weights_read_gbs") or 0.0 for r in rows])
    for r in rows:
        r["machine_busy"] = device.type == "cpu" and metrics.busy(r, best)
    return {"model": sweep.model, "dtype": str(dtype).split(".")[-1], "device": device.type,
            "sweep": {"contexts": list(sweep.contexts), "batches": list(sweep.batches),
                      "decode_steps": sweep.decode_steps, "device_fraction": sweep.device_fraction,
                      "host_fraction": sweep.host_fraction, "reuse_window": sweep.reuse_window},
            "budgets": run.budgets.as_dict(),
            "targets": report.evaluate_targets([t.as_dict() for t in sweep.targets], rows),
            "geometry": asdict(Geometry.of(sweep.model, model.config, dtype.itemsize,
                                           sum(p.numel() for p in model.parameters()))),
            "systems": {s.name: s.design for s in chosen},
            "rows": rows}


def machine() -> dict:
    """What ran it: CPU, cores, memory, GPU."""
    import numba

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_cores": psutil.cpu_count(logical=True), "torch_threads": torch.get_num_threads(),
            "numba_threads": numba.get_num_threads(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": gpu,
            "load_average": list(psutil.getloadavg())}


def run(preset: Preset, chosen: list[System], loaded: Optional[dict] = None, steps: Optional[int] = None,
        time_budget_s: Optional[float] = None, threads: Optional[int] = None,
        contexts: Optional[list[int]] = None, batches: Optional[list[int]] = None,
        trace_dir: Optional[str] = None) -> dict:
    """Every sweep of ``preset`` for the ``chosen`` systems; ``loaded`` maps a model name to
    ``(model, tokenizer)`` already loaded (tests). ``steps``, ``contexts``, ``batches``: override
    every sweep's (the budgets follow the new largest point). ``trace_dir``: each kvdrive system
    writes its timeline there (``<model>-<system>.json``) and its rows get the trace's summary."""
    preset = with_overrides(preset, steps, contexts, batches)
    device = torch.device(preset.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"preset {preset.name!r} needs a CUDA GPU and torch.cuda.is_available() is False; "
                           "run --preset cpu on this machine")
    dtype = getattr(torch, preset.dtype)
    with cpu_threads(threads if threads is not None else preset.threads):
        return _run(preset, chosen, loaded, time_budget_s, device, dtype, trace_dir)


@contextlib.contextmanager
def cpu_threads(n: Optional[int]) -> Iterator[None]:
    """torch's and numba's CPU threads set to ``n`` inside the block (None: as they are).

    numba's OpenMP pool is started first: starting it resets OpenMP's thread count, which is
    torch's, and a thread count that changes after a compile fails every Dynamo guard (each
    graph recompiles, and past the recompile limit Dynamo falls back to eager)."""
    import numba

    before = torch.get_num_threads()
    numba_before = numba.get_num_threads()                   # starts numba's pool
    numba.set_num_threads(numba_before if n is None else min(n, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(before if n is None else n)
    try:
        yield
    finally:
        numba.set_num_threads(numba_before)
        torch.set_num_threads(before)


def _run(preset: Preset, chosen: list[System], loaded: Optional[dict], time_budget_s: Optional[float],
         device: torch.device, dtype: torch.dtype, trace_dir: Optional[str] = None) -> dict:
    import transformers

    t0 = time.perf_counter()
    budget = time_budget_s if time_budget_s is not None else preset.time_budget_s
    deadline = None if budget is None else t0 + budget
    sweeps = list(preset.sweeps)
    total = sum(len(s.points) for s in sweeps) * len(chosen)
    out = []
    with tqdm(total=total, desc=f"bench {preset.name}", unit="point", dynamic_ncols=True) as bar:
        for i, sweep in enumerate(sweeps):
            out.append(run_sweep(sweep, chosen, (loaded or {}).get(sweep.model), device, dtype, bar,
                                 _share(deadline, sweeps[i:]), preset.second_try, trace_dir))
    return {"meta": {"preset": preset.name, "covers": preset.covers, "machine": machine(),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "time_budget_s": budget, "wall_seconds": time.perf_counter() - t0,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
            "sweeps": out}


def _share(deadline: Optional[float], sweeps: list[Sweep]) -> Optional[float]:
    """The first sweep's deadline: its share (by points) of the time left, so that a slow
    sweep cannot leave the next one no rows."""
    if deadline is None:
        return None
    now = time.perf_counter()
    points = [len(s.points) for s in sweeps]
    return now + max(0.0, deadline - now) * points[0] / sum(points)


def with_overrides(preset: Preset, steps: Optional[int] = None, contexts: Optional[list[int]] = None,
                   batches: Optional[list[int]] = None) -> Preset:
    """``preset`` with every sweep's decode steps, contexts or batches replaced (None: kept); a
    replaced grid runs every point (``leave_out`` dropped) and its budgets follow its largest point."""
    if steps is None and not contexts and not batches:
        return preset
    changes: dict = {}
    if steps is not None:
        changes["decode_steps"] = steps
    if contexts:
        changes["contexts"] = tuple(sorted(set(contexts)))
    if batches:
        changes["batches"] = tuple(sorted(set(batches)))
    if contexts or batches:
        changes["leave_out"] = ()
    return replace(preset, sweeps=tuple(replace(s, **changes) for s in preset.sweeps))
