"""Choose ``reuse_window``: the disk preset's kvdrive row at several reuse windows, one run each
(same prompts, budgets and steps), printing hit rate, bytes moved up per token and step time.

    python benchmarks/reuse_window.py [--windows 1 2 4 8] [--contexts 4096] [--steps 16]
"""
from __future__ import annotations

import argparse
import dataclasses

from tabulate import tabulate

from kvdrive_compile.bench import presets, runner, systems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=None, help="default: the disk preset's")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    base = presets.preset("disk")
    rows = []
    for w in args.windows:
        sweep = dataclasses.replace(base.sweeps[0], reuse_window=w, targets=())
        preset = dataclasses.replace(base, sweeps=(sweep,), time_budget_s=None)
        result = runner.run(preset, systems.systems(["kvdrive"]), steps=args.steps, contexts=args.contexts)
        (row,) = [r for r in result["sweeps"][0]["rows"] if r["status"] == "ok"]
        moved = row["moved_per_token"]
        rows.append([w, f"{100 * row['hit_rate']:.1f}%", f"{100 * (row.get('hit_rate_late') or 0):.1f}%",
                     f"{(moved['disk->host'] + moved['host->device']) / 2**20:.2f}",
                     f"{row['step_ms_median']:.0f}", f"{row['decode_tok_s']:.2f}"])
    print(tabulate(rows, headers=["reuse_window", "hit rate", "hit rate (2nd half)",
                                  "disk->host + host->device MiB/token", "step ms p50", "decode tok/s"]))


if __name__ == "__main__":
    main()
