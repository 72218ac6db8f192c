"""What an evaluation runs: one dataclass, presets of it, and the command-line arguments over it."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from .tasks import PERPLEXITY, TASKS

ALL_TASKS = [*TASKS, PERPLEXITY]
ALL_METHODS = ["dense", "kvdrive-exact", "kvdrive", "window"]
BUDGETS = [256, 512, 1024, 2048]


@dataclass(frozen=True)
class EvalConfig:
    """runs: (model name, prompt lengths in tokens) pairs. samples: per task and length.
    methods: among ``ALL_METHODS``; ``kvdrive`` and ``window`` run once per budget.
    steps: teacher-forced decode steps per perplexity slice. threads: torch's intra-op threads
    for the run (None: torch's default); 1 is much faster on a machine whose cores are busy
    with other work, where waiting threads spin. tiers: (device, host) fractions of the KV of the
    run's longest prompt that the kvdrive methods get as ``device_memory`` and ``host_memory``
    (the rest on disk), so that where blocks lie takes part (None: no limits). kvdrive_options:
    more options of the kvdrive methods (e.g. ``{"reuse_bonus": 0}``). Either one marks the
    kvdrive methods' labels (``kvdrive@1024 [tiers 0.25/0.5]``)."""

    runs: list[tuple[str, list[int]]]
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    samples: int = 3
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    budgets: list[int] = field(default_factory=lambda: list(BUDGETS))
    steps: int = 32
    seed: int = 0
    threads: Optional[int] = None
    out: str = "results/accuracy"
    tiers: Optional[tuple[float, float]] = None
    kvdrive_options: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "out"}


SMOLLM2, GEMMA3 = "smollm2-135m", "gemma3-270m"
PRESETS = {
    # CI: two tasks, a few samples, one budget, 2K (a couple of minutes on 2 CPU cores)
    "smoke": EvalConfig([(SMOLLM2, [2048])], tasks=["passkey", "niah_repeat"], samples=2, budgets=[512]),
    "smollm2-8k": EvalConfig([(SMOLLM2, [8192])], samples=3),
    "smollm2": EvalConfig([(SMOLLM2, [2048, 4096, 8192])], samples=3),
    "gemma3": EvalConfig([(GEMMA3, [8192, 16384])], samples=3),
    # hours on 2 CPU cores: every prompt is prefilled once per method (10 methods)
    "full": EvalConfig([(SMOLLM2, [2048, 4096, 8192]), (GEMMA3, [8192, 16384])], samples=3),
}


def parse_length(text: str) -> int:
    """Tokens from ``8192``, ``8K`` or ``8k`` (K = 1024)."""
    text = text.strip().lower()
    try:
        return int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"length {text!r}: give tokens, e.g. 8192 or 8K") from None


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smoke",
                    help="a starting configuration; the options below override it (default: smoke)")
    ap.add_argument("--model", choices=[SMOLLM2, GEMMA3], help="run this model only")
    ap.add_argument("--lengths", nargs="+", type=parse_length, metavar="N", help="prompt lengths, e.g. 2K 8K")
    ap.add_argument("--tasks", nargs="+", choices=[*ALL_TASKS, "all"], metavar="TASK",
                    help=f"tasks, or 'all': {', '.join(ALL_TASKS)}")
    ap.add_argument("--samples", type=int, help="samples per task and length")
    ap.add_argument("--methods", nargs="+", choices=ALL_METHODS, help="methods to compare")
    ap.add_argument("--budgets", nargs="+", type=int, metavar="B", help="token budgets of kvdrive and window")
    ap.add_argument("--steps", type=int, help="teacher-forced decode steps per perplexity slice")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); use 1 on a shared, busy machine")
    ap.add_argument("--out", help="results folder (default results/accuracy)")
    ap.add_argument("--tiers", nargs=2, type=float, metavar=("DEVICE", "HOST"),
                    help="give the kvdrive methods these fractions of the longest prompt's KV as device_memory "
                         "and host_memory (the rest goes to disk), e.g. --tiers 0.25 0.5")
    ap.add_argument("--kvdrive-options", type=json.loads, metavar="JSON",
                    help="more kvdrive options for the kvdrive methods, as JSON, e.g. '{\"reuse_bonus\": 0}'")
    ap.add_argument("--merge", nargs="+", metavar="DIR",
                    help="run nothing: pool the results.json of earlier runs' --out folders (other seeds, "
                         "tasks or methods, e.g. run in parallel) into one table, plot and JSON under --out")


def from_args(args: argparse.Namespace) -> EvalConfig:
    config = PRESETS[args.preset]
    runs = config.runs
    if args.model:
        runs = [(args.model, dict(runs).get(args.model, runs[0][1]))]
    if args.lengths:
        runs = [(name, list(args.lengths)) for name, _ in runs]
    tasks = ALL_TASKS if args.tasks and "all" in args.tasks else args.tasks
    given = {"tasks": tasks, "samples": args.samples, "methods": args.methods, "budgets": args.budgets,
             "steps": args.steps, "seed": args.seed, "threads": args.threads, "out": args.out,
             "tiers": tuple(args.tiers) if args.tiers else None, "kvdrive_options": args.kvdrive_options}
    config = replace(config, runs=runs, **{k: v for k, v in given.items() if v is not None})
    if config.samples < 1 or config.steps < 1:
        raise SystemExit("--samples and --steps must be at least 1")
    if config.tiers is not None and not all(0 <= f <= 1 for f in config.tiers):
        raise SystemExit(f"--tiers {config.tiers}: fractions of the KV in [0, 1]")
    if not isinstance(config.kvdrive_options, dict):
        raise SystemExit(f"--kvdrive-options {config.kvdrive_options!r}: a JSON object of kvdrive options")
    owned = sorted(set(config.kvdrive_options) & {"token_budget", "selection"})
    if owned:
        raise SystemExit(f"--kvdrive-options: {owned} come from the method and --budgets (kvdrive@B, window@B); "
                         "leave them out")
    if config.tiers is not None and set(config.kvdrive_options) & {"device_memory", "host_memory"}:
        raise SystemExit("--kvdrive-options: device_memory/host_memory and --tiers both set the tier budgets; "
                         "pass one of them")
    from .. import parse_options
    try:
        parse_options(config.kvdrive_options)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"--kvdrive-options: {e}") from None
    return config
