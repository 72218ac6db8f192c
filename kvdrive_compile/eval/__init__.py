"""The offline long-context accuracy harness: RULER-style tasks, pass keys and perplexity over
text from installed packages, run densely and through kvdrive at several token budgets.

    kvdrive eval --preset smoke            # or: python -m kvdrive_compile.eval --preset smoke
    kvdrive eval --preset smollm2-8k --samples 2 --tasks passkey niah_essay perplexity
"""
from __future__ import annotations

import argparse


def run_eval(args: argparse.Namespace) -> int:
    """The ``eval`` command: run the configuration, write results, print the tables."""
    from .config import from_args
    from .report import table, write
    from .runner import run

    config = from_args(args)
    results = run(config)
    written = write(results, config.out)
    for model in dict.fromkeys(name for name, _ in config.runs):
        print(f"\n{model}\n")
        print(table(results, model))
    print(f"\nran in {results['meta']['wall_seconds'] / 60:.1f} min; wrote")
    for path in (p for paths in written.values() for p in paths):
        print(f"  {path}")
    return 0
