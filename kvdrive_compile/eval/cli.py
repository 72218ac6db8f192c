"""``kvdrive eval`` / ``python -m kvdrive_compile.eval``: offline long-context accuracy."""
from __future__ import annotations

import argparse
import logging
from typing import Optional

from . import config

DESCRIPTION = ("RULER-style retrieval tasks, pass keys and perplexity, generated offline with a fixed "
               "seed, run with dense attention and with kvdrive (exact, top-k selection and the "
               "sink+window baseline at each budget). Writes a table per model, a plot per model and "
               "length, and the raw JSON under --out.")


def run_eval(args: argparse.Namespace) -> int:
    """Run the configuration (or merge earlier results), write results under --out, print the tables."""
    import json
    from pathlib import Path

    from .report import merge, table, write
    from .runner import run

    cfg = config.from_args(args)
    if args.merge:
        parts = []
        for folder in args.merge:
            path = Path(folder) / "results.json"
            if not path.is_file():
                raise SystemExit(f"--merge {folder}: no results.json there (give the --out folders of earlier runs)")
            parts.append(json.loads(path.read_text()))
        results = merge(parts)
    else:
        results = run(cfg)
    written = write(results, cfg.out)
    for model in dict.fromkeys(r["model"] for r in results["runs"]):
        print(f"\n{model}\n\n{table(results, model)}")
    verb = "merged" if args.merge else "ran in"
    print(f"\n{verb} {results['meta']['wall_seconds'] / 60:.1f} min of runs; wrote")
    for path in (p for paths in written.values() for p in paths):
        print(f"  {path}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on an argparse subparsers object (the ``kvdrive`` command's)."""
    ap = subparsers.add_parser("eval", help="long-context accuracy: dense vs kvdrive at token budgets",
                               description=DESCRIPTION)
    config.add_arguments(ap)
    ap.set_defaults(func=run_eval)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvdrive_compile.eval", description=DESCRIPTION)
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    config.add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_eval(args)
