"""``kvdrive trace summary FILE``: where a traced run's steps spent their time.

A runtime writes its timeline when ``KVDRIVE_TRACE=steps.json`` is set (or the trace option is given),
in Chrome Trace Event Format: ui.perfetto.dev or chrome://tracing shows it.

    kvdrive trace summary steps.json           time per stage, decode/prefill step walls, overlap
    kvdrive trace summary steps.json --json    the same as JSON
"""
from __future__ import annotations

import argparse
import json
import sys

from .runtime import trace


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``trace`` (with its ``summary`` action) on an argparse subparsers object (the ``kvdrive`` command's)."""
    ap = subparsers.add_parser("trace", help="read a runtime's timeline (Chrome trace JSON)",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = ap.add_subparsers(dest="trace_action", required=True, metavar="ACTION")
    summary = actions.add_parser("summary", help="time per stage, step wall times, how much I/O ran hidden")
    summary.add_argument("file", metavar="FILE", help="a trace file a runtime wrote")
    summary.add_argument("--json", action="store_true", help="print the summary as JSON")
    summary.set_defaults(func=run_summary)
    return ap


def run_summary(args: argparse.Namespace) -> int:
    """Print the summary of ``args.file``; exit code 2, with the reason, if it cannot be read as a trace."""
    try:
        events, other = trace.load(args.file)
        summary = trace.summarize(events, other)
    except (OSError, trace.TraceFormatError) as e:
        print(f"kvdrive trace summary: {e}", file=sys.stderr)
        return 2
    if other.get("note"):
        summary["note"] = other["note"]
    print(json.dumps(summary, indent=2) if args.json else trace.render(summary))
    return 0
