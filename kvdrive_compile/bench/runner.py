"""Runs every system over a sweep's points on the same prompts and budgets, and records a row
per (system, point).

A point is a greedy decode of our own: one timed prefill (time to first token; in chunks
through the same cache where one call would not fit), then ``decode_steps`` timed steps, each
``model(next_tokens, cache=cache)`` on a ``DynamicCache`` (a ``StaticCache`` for dense-compiled).
Systems run one after the other; each compiled design compiles once (the warm-up, timed as its
compile time; once per point where the budgets or its static cache's length follow the point),
runs every point, and is undone (eager forward, Dynamo reset, KV released).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
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
from .presets import PRESETS, Budgets, Preset, Sweep, budgets_for, kv_bytes
from .projection import Geometry
from .systems import EXACT_SYSTEMS, REFERENCE, SAME_SELECTION, System, installed

log = logging.getLogger(__name__)

QUESTION_TOKENS = 16            # prompts are cut to length before their last tokens (the question)
WARMUP_TOKENS = 48
# kvdrive first among the compiled designs, then what the disk preset's targets compare it with:
# if the time budget runs out, the slowest baseline (fetch-all) is the one whose rows say so
RUN_ORDER = ("dense", "hf-offload", "kvdrive", "kvdrive-no-bonus", "kvdrive-rerank", "kvdrive-fine", "kvdrive-default",
             "kvdrive-default-rerank", "kvdrive-default-fine", "kvdrive-inductor", "kvdrive-aten-linears", "kvdrive-host", "kvdrive-exact",
             "shadowkv-like", "dense-compiled", "sparse-fetch", "hisparse-like", "fetch-all")
# what a GPU run imports, checked before anything loads (the GPU machine has no venv of ours)
GPU_DEPENDENCIES = ("torch", "triton", "transformers", "numba", "networkx", "tabulate", "matplotlib", "numpy", "psutil",
                    "tqdm", "xxhash")


def run_order(name: str) -> int:
    """Where ``name`` runs (a system this list does not name runs last)."""
    return RUN_ORDER.index(name) if name in RUN_ORDER else len(RUN_ORDER)


class CannotRun(RuntimeError):
    """A preset cannot run on this machine; the message says what to do instead."""


def missing_dependencies(names: tuple[str, ...] = GPU_DEPENDENCIES) -> list[str]:
    """The modules of ``names`` that do not import here, each with the error it gave."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:                 # an ImportError, or a broken install's own error
            missing.append(f"{name} ({type(e).__name__}: {e})")
    return missing


def random_prompts(vocab_size: int, context: int, batch: int, seed: int = 0) -> torch.Tensor:
    """``[batch, context]`` random token ids below ``vocab_size``, seeded (a random-weight model
    has no tokenizer, and no text would mean more to it)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, context), generator=generator, dtype=torch.long)


def batch_prompts(tokenizer, context: int, batch: int, seed: int = 0, vocab_size: Optional[int] = None) -> torch.Tensor:
    """``[batch, context]`` token ids: pass-key prompts with different keys and depths, cut to
    exactly ``context`` tokens (filler dropped just before the question); random ids below
    ``vocab_size`` where there is no tokenizer."""
    if tokenizer is None:
        return random_prompts(vocab_size, context, batch, seed)
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
def prefill(model, cache, ids: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
    """The logits of each prompt's last token, ``[B, vocab]``: ``ids: [B, L]`` through the model
    in calls of at most ``chunk`` tokens per sequence (None: one call) on the same cache, as
    transformers' ``prefill_chunk_size`` does. Every call's length is marked dynamic: one graph
    for every prompt and chunk length (a compiled design has one more for the chunks after the
    first, which have a past)."""
    chunk = chunk or ids.shape[1]
    for start in range(0, ids.shape[1], chunk):
        part = ids[:, start:start + chunk]
        torch._dynamo.maybe_mark_dynamic(part, 1)
        logits = model(part, cache=cache, logits_to_keep=1).logits[:, -1]
    return logits


@torch.no_grad()
def greedy(model, cache, ids: torch.Tensor, steps: int,
           after_prefill: Optional[Callable[[], None]] = None,
           after_step: Optional[Callable[[int], None]] = None,
           chunk: Optional[int] = None) -> tuple[torch.Tensor, float, list[tuple]]:
    """Greedy decode of ``ids: [B, L]``: ``(tokens [B, steps + 1], ttft seconds, per step
    (wall seconds, process CPU seconds))``. The CPU time tells a busy shared machine (wall time
    up, CPU time not) from a slower step. chunk: prompt tokens per prefill call (``prefill``).

    ``after_prefill`` runs between the prefill and the first timed step, ``after_step(i)`` after
    the ``i``-th (from 1) timed step; both outside the timing."""
    device = ids.device
    t0 = time.perf_counter()
    token = prefill(model, cache, ids, chunk).argmax(-1, keepdim=True)           # [B, 1]
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


def kv_placement(system: System, budgets: Budgets, dense_kv: int, layers: int) -> tuple[int, int]:
    """Rough ``(device bytes, host bytes)`` of KV the system holds at a point: where it keeps
    it, plus the copies it makes on the way (an eager cache's ``torch.cat`` builds a layer's new
    K and V while the old ones live; a static cache is allocated once, at full length)."""
    layer = dense_kv // max(1, layers)
    if system.offloaded_cache:
        return 4 * layer, 2 * dense_kv
    if system.kvdrive and not system.budgets:        # kvdrive's defaults: every block on the device tier
        return dense_kv, 0
    if system.kvdrive:
        return (budgets.device_memory if system.own_device_tier else 0,
                budgets.host_memory if system.host_tier else dense_kv)
    if system.static_compiled:
        return dense_kv, 0
    return dense_kv + 2 * layer, 0


def memory_needs(system: System, budgets: Budgets, dense_kv: int, activations: int, layers: int,
                 device: torch.device) -> tuple[int, int]:
    """Rough ``(compute-device bytes, host bytes)`` a point needs: the KV (``kv_placement``)
    plus activations."""
    kv_device, kv_host = kv_placement(system, budgets, dense_kv, layers)
    if device.type == "cpu":
        return 0, kv_device + kv_host + activations
    return kv_device + activations, kv_host


MASK_BYTES = 4             # a chunk's attention mask, per query and key (kvdrive makes it an fp32 bias)


def activation_bytes(config, dtype: torch.dtype) -> int:
    """Rough bytes each prompt token of a prefill call holds while a layer runs: its hidden
    states, q/k/v/o and norms (~8 x hidden), the MLP's gate, up and their product (3 x
    intermediate)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return (8 * config.hidden_size + 3 * intermediate) * itemsize


def prefill_bytes(per_token: int, context: int, batch: int, chunk: int) -> int:
    """Rough bytes one prefill call of ``chunk`` tokens per sequence holds: its activations, and
    where it is a chunk (a past before it), its attention mask over the context (a whole prompt
    is causal, no mask)."""
    mask = MASK_BYTES * context if chunk < context else 0
    return batch * chunk * (per_token + mask)


def prefill_chunk(context: int, batch: int, per_token: int, room: float, limit: Optional[int] = None) -> int:
    """Prompt tokens per sequence each prefill call takes: all ``context`` when one call
    (``prefill_bytes``) fits in half of ``room`` bytes and ``limit`` (tokens of the whole batch)
    allows; else the most that do, in multiples of 1,024 tokens (of 16 below that), and at
    least one such multiple."""
    half = max(0.0, room) / 2
    if prefill_bytes(per_token, context, batch, context) <= half and (not limit or batch * context <= limit):
        return context
    tokens = int(half // (per_token + MASK_BYTES * context))
    tokens = min(tokens, limit) if limit else tokens
    per_sequence = tokens // batch
    step = 1024 if per_sequence >= 1024 else 16
    return min(context, max(step, per_sequence // step * step))


def free_memory(device: torch.device) -> int:
    """Bytes free for a point's KV and activations on the compute device (RAM on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


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
        self.budgets = budgets_for(sweep, model.config, self.dtype)      # the sweep's: of its largest point
        self.chunks: dict[tuple[str, int, int], int] = {}                # (system, context, batch): prefill chunk
        self.last_point: dict[str, tuple[float, int, int]] = {}          # system: (seconds, context, batch)
        self.warm_up_s: dict[str, float] = {}                            # system: its last warm-up's seconds
        vocab = model.config.vocab_size
        self.prompts = {c: batch_prompts(tokenizer, c, max(sweep.batches), vocab_size=vocab) for c in sweep.contexts}

    def ids(self, context: int, batch: int) -> torch.Tensor:
        return self.prompts[context][:batch].to(self.device)

    def budgets_at(self, context: int, batch: int) -> Budgets:
        """The budgets every system runs under at a point: the sweep's, or the point's own."""
        if self.sweep.budget_per_point:
            return budgets_for(self.sweep, self.model.config, self.dtype, (context, batch))
        return self.budgets

    def row(self, system: System, context: int, batch: int, status: str, note: str = "", **values) -> dict:
        dense_kv = kv_bytes(self.model.config, context, batch, self.dtype)
        budgets = self.budgets_at(context, batch)
        return {"system": system.name, "context": context, "batch": batch, "status": status, "note": note,
                "dense_kv_bytes": dense_kv, "device_budget": budgets.device_memory,
                "host_budget": budgets.host_memory, **values}

    def run(self, system: System) -> list[dict]:
        why = system.unavailable(self.device)
        if why is not None:
            self.bar.update(len(self.sweep.points))
            return [self.row(system, c, b, why.split(" (")[0], why) for c, b in self.sweep.points]
        points = self.sweep.points
        groups = [[p] for p in points] if self.sweep.budget_per_point else [points]   # one compile each
        return [row for group in groups for row in self.run_compiled(system, group)]

    def run_compiled(self, system: System, points: list[tuple[int, int]]) -> list[dict]:
        """``points`` under one installation of the system (one compile, one set of budgets);
        none where the time budget would skip every point anyway."""
        late = [self.too_late(system, c, b) for c, b in points]
        if all(late):
            self.bar.update(len(points))
            return [self.row(system, c, b, "skipped", why) for (c, b), why in zip(points, late)]
        rows = []
        trace = self.trace_path(system, points)
        if trace is not None and os.path.exists(trace):
            os.remove(trace)                         # else a run that writes none would report the old one
        with installed(self.model, system, self.budgets_at(*points[-1]), trace) as options:
            try:
                t0 = time.perf_counter()
                compile_s, graphs = self.warm_up(system, points)
                self.warm_up_s[system.name] = time.perf_counter() - t0
            except Exception as e:                    # its rows say so; the other systems still run
                log.exception("%s: the warm-up failed", system.name)
                self.bar.update(len(points))
                why = f"warm-up failed: {type(e).__name__}: {str(e)[:200]}"
                return [self.row(system, c, b, "error", why) for c, b in points]
            for context, batch in points:
                self.bar.set_postfix_str(f"{self.sweep.model} {system.name} {context}x{batch}")
                rows.append(self.point(system, options, context, batch, compile_s, graphs))
                self.bar.update()
            rows = [self.again_if_busy(system, options, r) for r in rows]
        if trace is not None and os.path.exists(trace):      # written when the system's runtime was let go
            pipeline = metrics.pipeline(trace)
            for r in rows:
                r["pipeline"] = pipeline
        return rows

    def trace_path(self, system: System, points: list[tuple[int, int]]) -> Optional[str]:
        """Where a kvdrive system's timeline goes (one file per point where each compiles anew)."""
        if self.trace_dir is None:
            return None
        where = f"-{points[0][0]}x{points[0][1]}" if self.sweep.budget_per_point else ""
        return os.path.join(self.trace_dir, f"{self.sweep.model}-{system.name}{where}.json")

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

    def chunk(self, system: System, context: int, batch: int) -> int:
        """Prompt tokens per sequence of each prefill call at a point (``prefill_chunk``): what the
        free memory holds after the KV the system will keep there. Decided once per system and
        point, so that the warm-up compiles the graphs the timed prefill runs."""
        key = (system.name, context, batch)
        if key not in self.chunks:
            config = self.model.config
            kv = kv_placement(system, self.budgets_at(context, batch), kv_bytes(config, context, batch, self.dtype),
                              config.num_hidden_layers)
            room = free_memory(self.device) - kv[0] - (kv[1] if self.device.type == "cpu" else 0)
            self.chunks[key] = prefill_chunk(context, batch, activation_bytes(config, self.dtype), room,
                                             self.sweep.prefill_tokens)
        return self.chunks[key]

    def warm_up_length(self) -> int:
        """Prompt tokens of a warm-up: a few blocks, or past a sliding window where there is one
        (beyond it the graphs differ: the cache keeps a fixed slice)."""
        config = self.model.config
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ())
        window = (getattr(config, "sliding_window", None) or 0) if sliding else 0
        return min(max(WARMUP_TOKENS, window + WARMUP_TOKENS), min(self.sweep.contexts))

    def warm_up(self, system: System, points: list[tuple[int, int]]) -> tuple[Optional[float], int]:
        """Compile (kvdrive designs) on short prompts at each batch size of ``points``, the
        prompt length marked dynamic and prefilled in two chunks where a point's prefill is
        chunked, so the timed points reuse the graphs: ``(seconds, graphs compiled)``. Eager
        systems run once, untimed; a static cache compiles at each point (``warm_up_static``)."""
        if system.static_compiled:
            return None, 0
        batches = sorted({b for _, b in points}) if system.kvdrive else [points[0][1]]
        length = self.warm_up_length()
        chunked = any(self.chunk(system, c, b) < c for c, b in points)
        g0 = graphs_compiled(system)
        t0 = time.perf_counter()
        for batch in batches:
            ids = self.ids(self.sweep.contexts[0], batch)[:, :length]
            cache = system.new_cache(self.model, length + 2)
            greedy(self.model, cache, ids, 2, chunk=length // 2 if chunked else None)
            del cache
            kvdrive_compile.release_all()
        seconds = time.perf_counter() - t0
        return (seconds if system.kvdrive else None), graphs_compiled(system) - g0

    def warm_up_static(self, system: System, context: int, batch: int) -> tuple[float, int]:
        """Compile the static cache's decode step at this point's shape (batch, cache length)
        on a short prompt, and run it until CUDA graphs replay (the first call warms up, the
        second records): ``(seconds, graphs compiled)``."""
        length = self.warm_up_length()
        g0 = graphs_compiled(system)
        t0 = time.perf_counter()
        cache = system.new_cache(self.model, self.max_tokens(context))
        greedy(self.model, cache, self.ids(context, batch)[:, :length], 3)
        del cache
        return time.perf_counter() - t0, graphs_compiled(system) - g0

    def max_tokens(self, context: int) -> int:
        """Tokens a sequence's cache holds by the end of a point: the prompt and every step's input."""
        return context + self.sweep.decode_steps

    def too_late(self, system: System, context: int, batch: int) -> Optional[str]:
        """Why a point does not start under the preset's time budget (None: it does): the budget
        is spent, or the same system's last point says this one would end after it (its time
        scaled by batch x context^2, a prefill's attention: where the weights' FLOPs dominate,
        an overestimate; plus its warm-up where each point compiles anew)."""
        if self.deadline is None:
            return None
        now = time.perf_counter()
        if now > self.deadline:
            return "skipped: the preset's time budget was spent"
        if system.name not in self.last_point:
            return None
        seconds, c0, b0 = self.last_point[system.name]
        guess = seconds * (batch * context**2) / (b0 * c0**2)
        if self.sweep.budget_per_point:
            guess += self.warm_up_s.get(system.name, 0.0)
        if now + guess <= self.deadline:
            return None
        warm = " and its warm-up" if self.sweep.budget_per_point else ""
        return (f"skipped: would end after the preset's time budget (~{guess:.0f} s from its {c0}x{b0} point's "
                f"{seconds:.1f} s{warm}; {self.deadline - now:.0f} s left)")

    def point(self, system: System, options: Optional[dict], context: int, batch: int,
              compile_s: Optional[float], graphs: int) -> dict:
        late = self.too_late(system, context, batch)
        if late is not None:
            return self.row(system, context, batch, "skipped", late)
        config = self.model.config
        budgets = self.budgets_at(context, batch)
        dense_kv = kv_bytes(config, context, batch, self.dtype)
        chunk = self.chunk(system, context, batch)
        activations = prefill_bytes(activation_bytes(config, self.dtype), context, batch, chunk) + (256 << 20)
        needs = memory_needs(system, budgets, dense_kv, activations, config.num_hidden_layers, self.device)
        short = memory_shortfall(*needs, self.device)
        if short is not None:
            return self.row(system, context, batch, "skipped", short)
        t0 = time.perf_counter()
        try:
            if system.static_compiled:
                compile_s, graphs = self.warm_up_static(system, context, batch)
            row = self.measure(system, options, context, batch, compile_s, graphs, chunk)
            self.last_point[system.name] = (time.perf_counter() - t0, context, batch)
            return row
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
                compile_s: Optional[float], graphs: int, chunk: Optional[int] = None) -> dict:
        steps = self.sweep.decode_steps
        cache = system.new_cache(self.model, self.max_tokens(context))
        snapshot = (lambda: kvdrive_compile.stats(options).as_dict()) if options else (lambda: None)
        snaps, held = [], []                           # after the prefill, after the last step
        middle = []                                    # after half the steps: the warm cache's hit rate

        def after_prefill():
            snaps.append(snapshot())
            held.append(cache_bytes(cache, self.device) if options is None else None)

        def after_step(i: int):
            if options is not None and i == steps // 2 and steps >= 2:
                middle.append(snapshot())

        g0 = graphs_compiled(system)
        read_before = weights_read_gbs(self.model, self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        tokens, ttft, timed = greedy(self.model, cache, self.ids(context, batch), steps, after_prefill, after_step,
                                     chunk=chunk)
        gpu_peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        times = [wall for wall, _ in timed]
        read_gbs = (read_before + weights_read_gbs(self.model, self.device)) / 2
        recompiles = graphs_compiled(system) - g0
        snaps.append(snapshot())
        held.append(cache_bytes(cache, self.device) if options is None else None)
        values = {"ttft_s": ttft, "step_ms": [1e3 * t for t in times],
                  "step_cpu_ms_median": 1e3 * float(np.median([cpu for _, cpu in timed])) if timed else None,
                  "compile_s": compile_s, "weights_read_gbs": read_gbs, "gpu_peak_bytes": gpu_peak,
                  "prefill_chunk": chunk if chunk is not None and chunk < context else None,
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
        status, note = ("ok", "") if not system.budgets else self.budget_status(self.budgets_at(context, batch),
                                                                                values["peak_bytes"])
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

    @staticmethod
    def budget_status(budgets: Budgets, peak: dict) -> tuple[str, str]:
        if peak["device"] > budgets.device_memory:
            return ("over budget", f"KV on the device {peak['device'] / 2**20:.1f} MiB > device budget "
                                   f"{budgets.device_memory / 2**20:.0f} MiB")
        return "ok", ""


def graphs_compiled(system: System) -> int:
    """Graphs the system's compiler has built so far: kvdrive's count for its designs, Dynamo's
    (Inductor's graphs) for the others."""
    if system.kvdrive:
        return kvdrive_compile.counters.graphs
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


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
        names = REFERENCE.get(r["system"], "dense")
        names = (names,) if isinstance(names, str) else names
        ref_name = next((n for n in names if (n, r["context"], r["batch"]) in by_key), None)
        same = ref_name is not None and r["system"] in SAME_SELECTION
        if ref_name is None:                 # none of its references ran: a sparse system against dense
            ref_name = "dense" if r["system"] in SAME_SELECTION else names[0]
        ref = by_key.get((ref_name, r["context"], r["batch"]))
        if ref is None or ref.get("tokens") is None:
            r["tokens_check"] = f"no {ref_name} tokens"
            continue
        step = metrics.first_difference(r["tokens"], ref["tokens"])
        exact = r["system"] in EXACT_SYSTEMS or same
        if step is None:
            r["tokens_check"] = f"= {ref_name}"
        else:
            r["tokens_check"] = (f"MISMATCH vs {ref_name} at step {step}" if exact
                                 else f"differs from {ref_name} from step {step} (sparse)")


def sweep_systems(sweep: Sweep, chosen: list[System]) -> list[System]:
    """The chosen systems a sweep runs: those its ``systems`` names (all where it names none)."""
    return [s for s in chosen if sweep.systems is None or s.name in sweep.systems]


def run_sweep(sweep: Sweep, chosen: list[System], loaded, device: torch.device, dtype: torch.dtype,
              bar: tqdm, deadline: Optional[float], second_try: bool = True, trace_dir: Optional[str] = None) -> dict:
    model, tokenizer = loaded if loaded is not None else models.load_any(sweep.model, dtype, device)
    model = model.to(device=device, dtype=dtype)
    run = SweepRun(sweep, model, tokenizer, device, bar, deadline, second_try, trace_dir)
    chosen = sweep_systems(sweep, chosen)
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
                      "host_fraction": sweep.host_fraction, "reuse_window": sweep.reuse_window,
                      "budget_per_point": sweep.budget_per_point, "prefill_tokens": sweep.prefill_tokens},
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
    if device.type == "cuda":
        check_gpu_machine(preset.name)
    dtype = getattr(torch, preset.dtype)
    with cpu_threads(threads if threads is not None else preset.threads):
        return _run(preset, chosen, loaded, time_budget_s, device, dtype, trace_dir)


def check_gpu_machine(preset_name: str) -> None:
    """Raise ``CannotRun`` saying what is missing where a GPU preset cannot run: a CUDA GPU,
    or a module a GPU run imports (``GPU_DEPENDENCIES``)."""
    if not torch.cuda.is_available():
        twin = f"{preset_name}-smoke" if f"{preset_name}-smoke" in PRESETS else "cpu"
        raise CannotRun(f"preset {preset_name!r} needs a CUDA GPU and torch.cuda.is_available() is False "
                        f"(torch {torch.__version__}); on this machine run --preset {twin}")
    missing = missing_dependencies()
    if missing:
        raise CannotRun(f"preset {preset_name!r}: these modules do not import here: {'; '.join(missing)}. "
                        "Install them into this Python (the project's dependencies in pyproject.toml) and run again")


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
    total = sum(len(s.points) * len(sweep_systems(s, chosen)) for s in sweeps)
    out = []
    with tqdm(total=total, desc=f"bench {preset.name}", unit="point", dynamic_ncols=True) as bar:
        for i, sweep in enumerate(sweeps):
            out.append(run_sweep(sweep, chosen, (loaded or {}).get(sweep.model), device, dtype, bar,
                                 _share(deadline, sweeps[i:]), preset.second_try, trace_dir))
            gc.collect()                             # the sweep's model goes before the next one is made
            if device.type == "cuda":
                torch.cuda.empty_cache()
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
