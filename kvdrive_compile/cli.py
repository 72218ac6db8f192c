"""The ``kvdrive`` command. Subcommands:

    kvdrive eval --preset smoke        offline long-context accuracy (kvdrive_compile.eval)
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    from .eval import config as eval_config, run_eval

    ap = argparse.ArgumentParser(prog="kvdrive", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    commands = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ev = commands.add_parser("eval", help="long-context accuracy: dense vs kvdrive at token budgets",
                             description=(
                                 "RULER-style retrieval tasks, pass keys and perplexity, generated offline "
                                 "with a fixed seed, run with dense attention and with kvdrive (exact, top-k "
                                 "selection and the sink+window baseline at each budget). Writes a table per "
                                 "model, a plot per model and length, and the raw JSON under --out."))
    eval_config.add_arguments(ev)
    ev.set_defaults(func=run_eval)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)
