"""``kvdrive bench`` / ``python -m kvdrive_compile.bench``: decode throughput, latency and KV
bytes moved of dense Hugging Face, its offloaded cache, and three kvdrive runtime designs, side by
side at the same budgets; and a cost model's projection to Llama-3.1-8B on named hardware.

    python -m kvdrive_compile.bench --preset cpu          # under 10 minutes on 2 CPU cores
    python -m kvdrive_compile.bench --preset smoke        # one small point per system (CI)
    python -m kvdrive_compile.bench --preset disk         # 8K x 2 spilled to disk: the caching designs, targets
    python -m kvdrive_compile.bench --preset gpu          # one H100, under 8 minutes
    python -m kvdrive_compile.bench --preset gpu-8b       # Llama-3.1-8B/Qwen3-8B shapes on one H200, ~8 minutes
    python -m kvdrive_compile.bench --preset gpu-8b-smoke # the same code path on the CPU, tiny shapes
    python -m kvdrive_compile.bench --preset projection   # the cost model only, no model run
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from typing import Optional

import torch

from . import presets, projection, report, runner, systems


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="cpu", choices=sorted(presets.PRESETS),
                    help="what to run (default: cpu): " + "; ".join(         # argparse %-formats help
                        f"{p.name}: {p.covers}" for p in presets.PRESETS.values()).replace("%", "%%"))
    ap.add_argument("--systems", nargs="+", metavar="SYSTEM", choices=list(systems.SYSTEMS),
                    help=f"a subset of {list(systems.SYSTEMS)} (default: the preset's, else "
                         f"{' '.join(systems.DEFAULT_SYSTEMS)})")
    ap.add_argument("--steps", type=int, help="decode steps timed per point (default: the preset's)")
    ap.add_argument("--contexts", type=int, nargs="+", metavar="TOKENS",
                    help="replace every sweep's contexts (the budgets follow the new largest point)")
    ap.add_argument("--batches", type=int, nargs="+", metavar="N",
                    help="replace every sweep's batch sizes (the budgets follow the new largest point)")
    ap.add_argument("--threads", type=int, metavar="N",
                    help="CPU threads for torch and numba (default: the preset's; the CPU presets use 1)")
    ap.add_argument("--time-budget", type=float, metavar="SECONDS",
                    help="points not started when it is spent become rows saying so (default: the preset's)")
    ap.add_argument("--project", action="store_true",
                    help="add the cost model's projection (its own table and JSON section)")
    ap.add_argument("--profiles", nargs="+", choices=list(projection.PROFILES), metavar="PROFILE",
                    help=f"hardware profiles of the projection: {list(projection.PROFILES)} (default: the GPU ones)")
    ap.add_argument("--from-json", metavar="PATH",
                    help="with --preset projection: also price the counted bytes of an earlier run's JSON")
    ap.add_argument("--out", metavar="DIR", help="results folder (default: results/bench/<preset>)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--trace", action="store_true",
                    help="each kvdrive system writes its timeline to <out>/traces/<model>-<system>.json, and the "
                         "report gets a pipeline table from them (the pipeline preset always does)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on an argparse subparsers object (the ``kvdrive`` command's)."""
    ap = subparsers.add_parser("bench", help="throughput and KV bytes moved: kvdrive vs the peers' designs",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.set_defaults(func=run_bench)
    return ap


def _no_run(preset: presets.Preset, from_json: Optional[str]) -> dict:
    if from_json:
        with open(from_json) as f:
            earlier = json.load(f)
        return {"meta": {**earlier["meta"], "preset": preset.name, "covers": preset.covers + f" (priced: {from_json})"},
                "sweeps": [report.upgrade_sweep(s) for s in earlier["sweeps"]]}
    return {"meta": {"preset": preset.name, "covers": preset.covers, "machine": runner.machine(),
                     "torch": torch.__version__, "wall_seconds": 0.0,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, "sweeps": []}


def run_bench(args: argparse.Namespace) -> int:
    preset = presets.preset(args.preset)
    if args.systems:                                  # the choice runs on every sweep
        preset = replace(preset, sweeps=tuple(replace(s, systems=None) for s in preset.sweeps))
    out_dir = args.out or os.path.join("results", "bench", preset.name)
    os.makedirs(out_dir, exist_ok=True)
    if preset.sweeps:
        try:
            result = runner.run(preset, systems.systems(args.systems or preset.systems), steps=args.steps,
                                time_budget_s=args.time_budget, threads=args.threads, contexts=args.contexts,
                                batches=args.batches,
                                trace_dir=os.path.join(out_dir, "traces") if args.trace or preset.trace else None)
        except runner.CannotRun as e:
            print(f"bench: {e}", file=sys.stderr)
            return 2
    else:
        result = _no_run(preset, args.from_json)
    if args.project or preset.project:
        result["projection"] = projection.project(result, args.profiles)
    print(report.text(result))
    if "projection" in result:
        print("\n" + projection.text(result["projection"]))
    path = os.path.join(out_dir, "results.json")
    report.write_json(result, path)
    plots = [] if args.no_plots else [p for s in result["sweeps"] for p in report.plot_sweep(s, out_dir)]
    print(f"\nwrote {path}" + "".join(f"\nwrote {p}" for p in plots))
    # exactness is promised in fp32; in bf16 the attention kernels round differently and greedy
    # tokens may part after a while, which is reported but does not fail the run
    failed = False
    for s in result["sweeps"]:
        for r in s["rows"]:
            if "MISMATCH" in (r.get("tokens_check") or ""):
                failed |= s["dtype"] == "float32"
                print(f"TOKENS DIFFER ({s['model']} {s['dtype']}): {r['system']} {r['context']}x{r['batch']}: "
                      f"{r['tokens_check']}")
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvdrive_compile.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_bench(args)
