"""Tables (tabulate), the JSON's expected structure, and plots (matplotlib, Agg) of a run."""
from __future__ import annotations

import json
import os
from typing import Optional

from tabulate import tabulate

from .metrics import BOUNDARIES, CACHING_TIERS, REQUIRED_STAGES, STAGES, TIERS
from .systems import SYSTEMS

RAN = ("ok", "over budget")                # statuses of rows that carry measurements
STATUSES = RAN + ("needs CUDA", "skipped", "out of memory", "error")


def size(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def num(value: Optional[float], fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def throughput_table(rows: list[dict]) -> str:
    head = ["system", "context", "batch", "status", "decode tok/s", "TTFT s", "step ms p50", "step ms p95",
            "step CPU ms", "weights GB/s", "busy", "compile s", "tokens"]
    body = [[r["system"], r["context"], r["batch"], r["status"], num(r.get("decode_tok_s")),
             num(r.get("ttft_s")), num(r.get("step_ms_median"), ".0f"), num(r.get("step_ms_p95"), ".0f"),
             num(r.get("step_cpu_ms_median"), ".0f"), num(r.get("weights_read_gbs"), ".1f"),
             ("yes" if r.get("machine_busy") else "") + (" (2 tries)" if r.get("measured_twice") else ""),
             num(r.get("compile_s"), ".1f") + (f" (+{r['recompiles']} timed)" if r.get("recompiles") else ""),
             r.get("tokens_check") or "-"] for r in rows]
    return tabulate(body, headers=head, disable_numparse=True)


def row_hit_rate(r: dict) -> Optional[float]:
    """A row's hit rate: ``hit_rate`` (served bytes), else an older row's ``device_hit_rate``."""
    return r.get("hit_rate", r.get("device_hit_rate"))


def bytes_table(rows: list[dict]) -> str:
    """KV bytes moved per decoded token, the hit rate, KV per tier, and (on a GPU) the device's
    peak allocated memory over the point: weights, KV and activations."""
    gpu = any(r.get("gpu_peak_bytes") is not None for r in rows)
    head = ["system", "context", "batch", *(f"{b} /tok" for b in BOUNDARIES), "hit rate", "CPU attn",
            "peak device", "peak host", "disk", *(["GPU peak"] if gpu else [])]
    body = []
    for r in rows:
        moved = r.get("moved_per_token") or {}
        peak = r.get("peak_bytes") or {}
        body.append([r["system"], r["context"], r["batch"], *(size(moved.get(b)) for b in BOUNDARIES),
                     pct(row_hit_rate(r)), pct(r.get("cpu_attention_share")), *(size(peak.get(t)) for t in TIERS),
                     *([size(r.get("gpu_peak_bytes"))] if gpu else [])])
    return tabulate(body, headers=head, disable_numparse=True)


def cache_table(rows: list[dict]) -> str:
    """Where the selected KV was when each step needed it, and what the caching tiers copied in
    and dropped (compiled designs only)."""
    head = ["system", "context", "batch", "hit rate", "hit 2nd half", *(f"served {t} /tok" for t in TIERS),
            *(f"admitted {t} /step" for t in CACHING_TIERS), *(f"evicted {t} /step" for t in CACHING_TIERS),
            "disk bypass"]
    body = []
    for r in rows:
        if r.get("served_per_token") is None and r.get("admitted_per_step") is None:
            continue
        served, adm, ev = (r.get(k) or {} for k in ("served_per_token", "admitted_per_step", "evicted_per_step"))
        rate = pct(row_hit_rate(r)) + (" (blocks)" if r.get("hit_rate_from") == "selected_blocks" else "")
        body.append([r["system"], r["context"], r["batch"], rate, pct(r.get("hit_rate_late")),
                     *(size(served.get(t)) for t in TIERS), *(num(adm.get(t), ".1f") for t in CACHING_TIERS),
                     *(num(ev.get(t), ".1f") for t in CACHING_TIERS), r.get("disk_cache_bypass") or "-"])
    return tabulate(body, headers=head, disable_numparse=True)


def stages_table(rows: list[dict]) -> str:
    """Per-stage wall time per decode step (ms), kvdrive designs only."""
    timed = [r for r in rows if r.get("stages_ms")]
    extra = [k for r in timed for k in r["stages_ms"] if k not in STAGES and k != "other"]
    cols = (*STAGES, *dict.fromkeys(extra), "other")
    body = [[r["system"], r["context"], r["batch"], *(num(r["stages_ms"].get(c), ".0f") for c in cols),
             num(r.get("step_ms_median"), ".0f")] for r in timed]
    return tabulate(body, headers=["system", "context", "batch", *cols, "step p50"], disable_numparse=True)


def pipeline_table(rows: list[dict]) -> str:
    """From each kvdrive system's timeline: how much of a decode step ran at once."""
    body = []
    for r in rows:
        p = r.get("pipeline")
        if not p:
            continue
        body.append([r["system"], r["context"], r["batch"], p.get("decode_steps"), num(p.get("decode_wall_ms_p50"), ".0f"),
                     num(p.get("stage_sum_over_wall")), num(p.get("wall_over_slowest_stage")),
                     num(p.get("cores_busy")) + (f" of {p['cpu_count']}" if p.get("cpu_count") else ""),
                     pct(p.get("disk_read_hidden")), num(p.get("disk_read_ms"), ".0f"),
                     pct(p.get("host_to_device_hidden")), pct(r.get("prefetch_hit_rate"))])
    return tabulate(body, headers=["system", "context", "batch", "decode steps", "step ms p50", "stage time / wall",
                                   "wall / slowest stage", "cores busy", "disk read hidden", "disk read ms", "copy hidden",
                                   "disk misses read ahead"], disable_numparse=True)


# -- targets -------------------------------------------------------------------------------------

def metric_value(row: dict, metric: list) -> Optional[float]:
    """The sum of ``metric``'s row keys (``"a.b"``: ``row["a"]["b"]``); None if one is missing."""
    total = 0.0
    for key in metric:
        value = row
        for part in key.split(".", 1):
            value = value.get(part) if isinstance(value, dict) else None
        if key == "hit_rate" and value is None:
            value = row_hit_rate(row)
        if not _is_num(value):
            return None
        total += value
    return total


def _versus_names(versus) -> list[str]:
    """A target's ``versus`` as a list of system names (empty: none)."""
    if not versus:
        return []
    return [versus] if isinstance(versus, str) else list(versus)


def strongest(t: dict, ran: dict, context: int, batch: int) -> tuple[Optional[str], Optional[float], str]:
    """Of the target's ``versus`` systems that ran at a point and have its metric, the one it is
    hardest to beat (the largest value for ``>=``, the smallest for ``<=``): ``(name, value, note)``,
    the note saying why there is none."""
    names = _versus_names(t.get("versus"))
    found = {n: metric_value(ran[(n, context, batch)], t["metric"]) for n in names if (n, context, batch) in ran}
    values = {n: v for n, v in found.items() if v is not None}
    if not values:
        what = " or ".join(names)
        return None, None, (f"no {what} row ran" if not found else f"{what} has no {' + '.join(t['metric'])}")
    pick = max if t["op"] == ">=" else min
    name = pick(values, key=values.get)
    return name, values[name], ""


def applies(t: dict, context: Optional[int], batch: Optional[int]) -> bool:
    """Whether a target is checked at a point (its ``from_point`` on: that context and batch or more)."""
    start = t.get("from_point")
    return not start or context is None or (context >= start[0] and batch >= start[1])


def evaluate_targets(targets: list[dict], rows: list[dict]) -> list[dict]:
    """Each target (``presets.Target.as_dict()``) at each point it applies to where its system
    ran: the value measured (a ratio when the target names ``versus``: against the strongest of
    them, named in ``versus_system``), and whether it holds (None: not measured, ``note`` says why)."""
    ran = {(r["system"], r["context"], r["batch"]): r for r in rows if r.get("status") in RAN}
    points = list(dict.fromkeys((r["context"], r["batch"]) for r in rows))
    out = []
    for t in targets:
        mine_points = [p for p in points if applies(t, *p)]
        for context, batch in mine_points or [(None, None)]:
            mine = ran.get((t["system"], context, batch))
            value = None if mine is None else metric_value(mine, t["metric"])
            versus, other, measured, note = None, None, value, ""
            if not mine_points and points:
                start = t["from_point"]
                note = f"the sweep has no point at >= {start[0]}x{start[1]}"
            elif mine is None:
                note = f"no {t['system']} row ran"
            elif value is None:
                note = f"{t['system']} has no {' + '.join(t['metric'])}"
            elif t.get("versus"):
                versus, other, note = strongest(t, ran, context, batch)
                if versus is None:
                    measured = None
                elif other == 0:
                    measured, note = None, f"{versus}'s value is 0"
                else:
                    measured = value / other
            holds = None if measured is None else (measured >= t["bound"] if t["op"] == ">=" else measured <= t["bound"])
            out.append({**t, "context": context, "batch": batch, "value": value, "versus_value": other,
                        "versus_system": versus, "measured": measured, "holds": holds, "note": note})
    return out


def _fmt(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return size(value)
    if unit == "share":
        return pct(value)
    return f"{value:.2f} {unit}".strip()


def targets_table(evaluated: list[dict]) -> str:
    head = ["target", "point", "measured", "holds", "values", "what it means"]
    body = []
    for t in evaluated:
        ratio = t.get("versus") is not None
        measured = ("-" if t["measured"] is None else f"{t['measured']:.2f}x" if ratio
                    else _fmt(t["measured"], t.get("unit", "")))
        values = _fmt(t["value"], t.get("unit", ""))
        if ratio:
            values = f"{values} vs {_fmt(t['versus_value'], t.get('unit', ''))}"
            if len(_versus_names(t["versus"])) > 1 and t.get("versus_system"):
                values += f" ({t['versus_system']})"
        holds = {True: "holds", False: "MISSES", None: "not measured"}[t["holds"]]
        point = "-" if t["context"] is None else f"{t['context']}x{t['batch']}"
        body.append([t["label"], point, measured, holds + (f" ({t['note']})" if t.get("note") else ""), values,
                     t.get("means", "")])
    return tabulate(body, headers=head, disable_numparse=True)


def notes(rows: list[dict]) -> list[str]:
    return [f"{r['system']} {r['context']}x{r['batch']}: {r['note']}" for r in rows if r.get("note")]


def sweep_text(sweep: dict) -> str:
    b, s = sweep["budgets"], sweep["sweep"]
    if s.get("budget_per_point"):
        budgets = (f"device budget {100 * s['device_fraction']:.0f} % and host budget "
                   f"{100 * s['host_fraction']:.0f} % of each point's dense KV (at the largest, "
                   f"{size(b['device_memory'])} and {size(b['host_memory'])})")
    else:
        budgets = f"device budget {size(b['device_memory'])}, host budget {size(b['host_memory'])}"
    head = (f"== {sweep['model']} ({sweep['dtype']}, {sweep['device']}): {budgets}, token budget {b['token_budget']}, "
            f"block {b['block_size']}, {s['decode_steps']} decode steps; dense KV of the largest point "
            f"{size(b['largest_kv'])}")
    chunked: dict = {}
    for r in sweep["rows"]:
        if r.get("prefill_chunk"):
            chunked.setdefault((r["context"], r["batch"], r["prefill_chunk"]), []).append(r["system"])
    if chunked:
        head += "\nprefilled in chunks (tokens per sequence and call): " + "; ".join(
            f"{c}x{n} in {chunk} ({', '.join(names)})" for (c, n, chunk), names in chunked.items())
    parts = [head, "", "throughput and latency", throughput_table(sweep["rows"]), "",
             "KV bytes moved per decoded token, the device hit rate, and KV bytes per tier", bytes_table(sweep["rows"])]
    if any(r.get("served_per_token") is not None or r.get("admitted_per_step") is not None for r in sweep["rows"]):
        parts += ["", "tier caching: the selected KV bytes per decoded token by where each block lay when a step "
                      "needed it, the device's share of them (hit rate; over the 2nd half of the steps: the warm "
                      "cache), block copies admitted to and evicted from each caching tier per step",
                  cache_table(sweep["rows"])]
    if any(r.get("stages_ms") for r in sweep["rows"]):
        parts += ["", "where a decode step goes (ms per step, from the runtime's stage timers)",
                  stages_table(sweep["rows"])]
    if any(r.get("pipeline") for r in sweep["rows"]):
        parts += ["", "the pipeline, from each system's timeline (all its decode steps, warm-up included; "
                      "`kvdrive trace summary` on the file gives the rest)", pipeline_table(sweep["rows"])]
    if sweep.get("targets"):
        held = [t["holds"] for t in sweep["targets"]]
        parts += ["", f"targets: {held.count(True)} of {len(held)} hold"
                      + (f", {held.count(None)} not measured" if None in held else ""),
                  targets_table(sweep["targets"])]
    extra = notes(sweep["rows"])
    if any(r.get("machine_busy") or r.get("measured_twice") for r in sweep["rows"]):
        extra.append("busy: the machine was shared during these steps (CPU time under 80% of wall time, or the "
                     "weights read under 70% of the sweep's best rate); such a row was measured a second time "
                     "and the quieter try kept, but compare it with care")
    if extra:
        parts += ["", "notes:"] + [f"  {n}" for n in extra]
    return "\n".join(parts)


def text(result: dict) -> str:
    meta = result["meta"]
    m = meta["machine"]
    where = m["gpu"] or f"{m['cpu_cores']} CPU cores, no GPU"
    parts = [f"bench preset {meta['preset']}: {meta['covers']}",
             f"machine: {where}, {m['memory_gib']} GiB RAM, {m['processor']}, torch {meta.get('torch', '?')} "
             f"with {m.get('torch_threads')} CPU thread(s); load average {m.get('load_average', ['?'])[0]:.1f}; "
             f"{meta['wall_seconds']:.0f} s"]
    for sweep in result["sweeps"]:
        parts += ["", sweep_text(sweep)]
    return "\n".join(parts)


# -- the JSON's structure ----------------------------------------------------------------------

def _require(problems: list, cond: bool, where: str, what: str) -> bool:
    if not cond:
        problems.append(f"{where}: {what}")
    return cond


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_row(p: list, r: dict, where: str, steps: int) -> None:
    for key, kind in (("system", str), ("context", int), ("batch", int), ("status", str), ("note", str)):
        _require(p, isinstance(r.get(key), kind), where, f"{key} must be {kind.__name__}")
    _require(p, r.get("system") in SYSTEMS, where, f"unknown system {r.get('system')!r}")
    if not _require(p, r.get("status") in STATUSES, where, f"status {r.get('status')!r} not in {STATUSES}"):
        return
    if r["status"] not in RAN:
        _require(p, bool(r["note"]), where, "a row that did not run must say why in its note")
        return
    for key in ("decode_tok_s", "ttft_s", "step_ms_median", "step_ms_p95", "kv_bytes", "disk_bytes"):
        _require(p, _is_num(r.get(key)) and r[key] >= 0, where, f"{key} must be a number >= 0")
    _require(p, r.get("gpu_peak_bytes") is None or (_is_num(r["gpu_peak_bytes"]) and r["gpu_peak_bytes"] > 0), where,
             "gpu_peak_bytes must be a number > 0 (a CUDA run) or null")
    moved, peak = r.get("moved_per_token"), r.get("peak_bytes")
    _require(p, isinstance(moved, dict) and all(_is_num(moved.get(b)) for b in BOUNDARIES), where,
             f"moved_per_token must give a number for each of {BOUNDARIES}")
    _require(p, isinstance(peak, dict) and all(_is_num(peak.get(t)) for t in TIERS), where,
             f"peak_bytes must give a number for each of {TIERS}")
    tokens = r.get("tokens")
    _require(p, isinstance(tokens, list) and len(tokens) == r["batch"]
             and all(isinstance(t, list) and len(t) == steps + 1 for t in tokens), where,
             f"tokens must be [batch][{steps + 1}]")
    if r.get("stages_ms") is not None:
        _require(p, all(_is_num(r["stages_ms"].get(s)) for s in (*REQUIRED_STAGES, "other"))
                 and all(_is_num(v) for v in r["stages_ms"].values()), where,
                 "stages_ms must give every stage and 'other', each a number")
    for key in ("hit_rate", "hit_rate_late"):
        _require(p, key in r and (r[key] is None or (_is_num(r[key]) and 0 <= r[key] <= 1)), where,
                 f"{key} must be a share in [0, 1] or null")
    # compiled designs count them (zeros from a runtime without the counters); a row of an older
    # run (``upgrade_sweep``) has null
    compiled = SYSTEMS[r["system"]].kvdrive and not r.get("older_run") if r.get("system") in SYSTEMS else False
    for key, parts in (("served_per_token", TIERS), ("admitted_per_step", CACHING_TIERS),
                       ("evicted_per_step", CACHING_TIERS)):
        value = r.get(key)
        ok = key in r and (value is None or (isinstance(value, dict)
                                             and all(_is_num(value.get(t)) and value[t] >= 0 for t in parts)))
        what = "null (eager) or " if not compiled else ""
        _require(p, ok and (value is not None or not compiled), where,
                 f"{key} must be {what}a number >= 0 for each of {parts}")


def _check_targets(p: list, targets, where: str) -> None:
    if not _require(p, isinstance(targets, list), where, "targets must be a list"):
        return
    for k, t in enumerate(targets):
        at = f"{where}.targets[{k}]"
        if not _require(p, isinstance(t, dict), at, "must be an object"):
            continue
        _require(p, isinstance(t.get("system"), str) and isinstance(t.get("label"), str), at,
                 "system and label must be strings")
        _require(p, t.get("op") in (">=", "<=") and _is_num(t.get("bound")), at, "op must be >= or <=, bound a number")
        _require(p, t.get("holds") in (True, False, None), at, "holds must be true, false or null")
        _require(p, t.get("measured") is None or _is_num(t["measured"]), at, "measured must be a number or null")
        _require(p, (t.get("holds") is None) == (t.get("measured") is None), at,
                 "holds is null exactly when nothing was measured")


NEW_ROW_FIELDS = ("hit_rate", "hit_rate_late", "served_per_token", "admitted_per_step", "evicted_per_step")


def upgrade_sweep(sweep: dict) -> dict:
    """A sweep of a results JSON from before the tier-caching fields, with them: the hit rate
    from the selected blocks' share, the rest null (the runtime did not count them)."""
    rows = []
    for r in sweep.get("rows", []):
        r = dict(r)
        if r.get("status") in RAN and any(key not in r for key in NEW_ROW_FIELDS):
            r["older_run"] = True
            r.setdefault("hit_rate", r.get("device_hit_rate"))
            for key in NEW_ROW_FIELDS:
                r.setdefault(key, None)
        rows.append(r)
    return {**sweep, "rows": rows}


def problems(result: dict) -> list[str]:
    """What in ``result`` does not have the expected structure (empty: it validates)."""
    p: list[str] = []
    meta = result.get("meta")
    if _require(p, isinstance(meta, dict), "meta", "missing"):
        for key in ("preset", "covers"):
            _require(p, isinstance(meta.get(key), str), f"meta.{key}", "must be a string")
        _require(p, isinstance(meta.get("machine"), dict), "meta.machine", "must describe the machine")
        _require(p, _is_num(meta.get("wall_seconds")), "meta.wall_seconds", "must be a number")
    sweeps = result.get("sweeps")
    if _require(p, isinstance(sweeps, list), "sweeps", "must be a list"):
        for i, s in enumerate(sweeps):
            where = f"sweeps[{i}]"
            _require(p, isinstance(s.get("model"), str), where, "model must be a string")
            b = s.get("budgets") or {}
            for key in ("device_memory", "host_memory", "token_budget", "block_size"):
                _require(p, isinstance(b.get(key), int), f"{where}.budgets", f"{key} must be an int")
            steps = (s.get("sweep") or {}).get("decode_steps", 0)
            if "targets" in s:
                _check_targets(p, s["targets"], where)
            rows = s.get("rows")
            if _require(p, isinstance(rows, list) and rows, where, "rows must be a non-empty list"):
                for j, r in enumerate(rows):
                    _check_row(p, r, f"{where}.rows[{j}]", steps)
    if "projection" in result:
        proj = result["projection"]
        _require(p, isinstance(proj.get("assumptions"), list), "projection.assumptions", "must be a list")
        _require(p, isinstance(proj.get("scenarios"), list), "projection.scenarios", "must be a list")
    return p


def validate(result: dict) -> None:
    """Raise ValueError naming every field of ``result`` that is not as expected."""
    found = problems(result)
    if found:
        raise ValueError("bench results do not have the expected structure:\n  " + "\n  ".join(found))


def write_json(result: dict, path: str) -> None:
    validate(result)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=_plain)


def _plain(value):
    """numpy scalars (a bool from a numpy comparison, a float64) as the Python values JSON knows."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# -- plots -------------------------------------------------------------------------------------

def _ran(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] in RAN]


def _largest(rows: list[dict]) -> Optional[tuple[int, int]]:
    points = sorted({(r["context"], r["batch"]) for r in rows}, key=lambda p: (p[0] * p[1], p))
    return points[-1] if points else None


def plot_sweep(sweep: dict, out_dir: str) -> list[str]:
    """Throughput vs batch and vs context, bytes moved per token, KV per tier: the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    rows = _ran(sweep["rows"])
    if not rows:
        return []
    model = sweep["model"]
    names = list(dict.fromkeys(r["system"] for r in rows))
    paths = []

    fig, (ax_b, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    ctx = max(r["context"] for r in rows)
    batch = min(r["batch"] for r in rows)
    for name in names:
        mine = [r for r in rows if r["system"] == name]
        by_b = sorted((r["batch"], r["decode_tok_s"]) for r in mine if r["context"] == ctx)
        by_c = sorted((r["context"], r["decode_tok_s"]) for r in mine if r["batch"] == batch)
        if by_b:
            ax_b.plot(*zip(*by_b), marker="o", label=name)
        if by_c:
            ax_c.plot(*zip(*by_c), marker="o", label=name)
    ax_b.set(xlabel="batch", ylabel="decode tokens/s (whole batch)", title=f"{model}: context {ctx}",
             xscale="log", ylim=(0, None))
    ax_c.set(xlabel="context (tokens)", ylabel="decode tokens/s", title=f"{model}: batch {batch}",
             xscale="log", ylim=(0, None))
    for ax, key in ((ax_b, "batch"), (ax_c, "context")):
        ticks = sorted({r[key] for r in rows})
        ax.set_xticks(ticks, labels=[str(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    ax_b.legend(fontsize=8)
    paths.append(_save(fig, out_dir, f"{model}-throughput.png"))

    point = _largest(rows)
    at = {r["system"]: r for r in rows if (r["context"], r["batch"]) == point}
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    _stacked(ax_m, at, "moved_per_token", ("disk->host", "host->device", "device->host"), 2**20)
    ax_m.set(ylabel="MiB per decoded token", title=f"KV moved per token at {point[0]}x{point[1]}")
    _stacked(ax_t, at, "peak_bytes", TIERS, 2**20)
    ax_t.axhline(sweep["budgets"]["device_memory"] / 2**20, color="k", ls="--", lw=1, label="device budget")
    ax_t.set(ylabel="MiB", title=f"KV bytes per tier at {point[0]}x{point[1]}")
    ax_t.legend(fontsize=8, framealpha=0.9)
    paths.append(_save(fig, out_dir, f"{model}-bytes-memory.png"))
    return paths


def _stacked(ax, at: dict, key: str, parts: tuple, scale: float) -> None:
    names = list(at)
    bottom = [0.0] * len(names)
    for part in parts:
        heights = [(at[n].get(key) or {}).get(part, 0) / scale for n in names]
        ax.bar(names, heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=20)


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
