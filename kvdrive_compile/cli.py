"""The ``kvdrive`` command; each subcommand's package registers its own parser:

    kvdrive eval --preset smoke        offline long-context accuracy (kvdrive_compile.eval)
    kvdrive bench --preset cpu         throughput and bytes moved vs the peers' designs (kvdrive_compile.bench)
    kvdrive trace summary steps.json   where a traced run's steps spent their time (kvdrive_compile.trace_cli)
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional

from . import trace_cli
from .bench import cli as bench_cli
from .eval import cli as eval_cli


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvdrive", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    commands = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    eval_cli.add_parser(commands)
    bench_cli.add_parser(commands)
    trace_cli.add_parser(commands)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)
