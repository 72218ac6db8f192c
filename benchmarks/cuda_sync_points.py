"""Where a CUDA decode step makes the host wait for the GPU: synchronizing calls per decode step,
by the line of kvdrive (or of the model) that made each one, and the step's timeline.

    python benchmarks/cuda_sync_points.py [--model llama3.1-8b-random] [--layers 8] [--context 8192]
                                          [--batch 4] [--steps 6] [--out results/sync]

The overlapped pipeline issue asks for "no device-wide synchronize inside a decode step; at most
one small device->host wait per layer" and, on a GPU, for "the same trace from a CUDA run, and its
count of synchronizing points per decode step". This script measures both on one GPU: a model of a
published architecture's shape with random weights (made on the GPU: nothing downloaded or carried;
``--layers`` keeps its first N layers, so that compiling takes seconds), a random prompt of
``--context`` tokens x ``--batch``, greedy decoding by

- dense Hugging Face (eager, its own cache): the reference tokens and step time;
- kvdrive with ``token_budget=None`` and three tiers (device 25 %, host 50 % of the KV, the rest on
  disk): its tokens must be the reference's (where two logits are within rounding a greedy token
  can differ; the table says at which step and by how much);
- kvdrive with the default budget and the same tiers, its timeline written to ``OUT/steps.json``;
- kvdrive with the default budget and no tier limits.

Every timed decode step runs under ``torch.cuda.set_sync_debug_mode("warn")``: torch warns at each
call that makes the host wait for the device (``.item()``, ``.cpu()``, ``nonzero``, a copy with
``non_blocking=False``, a stream or device synchronize), and the warning's Python stack names the
first frame in this repository's code (``runtime/``, ``kernels/``, ``passes/``, the package) or,
if none, in transformers. Prints a table per system (step time, synchronizing calls per step and
per attention layer) and the lines that made them; writes ``OUT/sync_points.json``.

It needs a CUDA GPU (exit code 3 with a message otherwise) and installs nothing. Time on an
H200: about 2 minutes at the defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

import torch

SYNC_WARNING = "synchronizing CUDA operation"       # the text of torch's sync-debug warning
SKIP = ("/warnings.py", "/torch/", "/contextlib.py", "/cuda_sync_points.py")


def _our_dirs() -> tuple[str, ...]:
    """The folders kvdrive's code is imported from (a wheel's ``kvdrive_compile/``, or a
    checkout's ``kvdrive_compile/``, ``runtime/``, ``kernels/``, ``passes/``)."""
    import kvdrive_compile
    from kvdrive_compile import kernels, passes, runtime

    return tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (kvdrive_compile, runtime, kernels, passes))


def site_of(stack: Iterable[traceback.FrameSummary], ours: tuple[str, ...]) -> str:
    """``file:line function`` of the frame that made a synchronizing call: the innermost frame in
    one of the folders ``ours``, else the innermost of transformers, else the innermost that is
    not torch's or Python's own. ``stack``: outermost first (``traceback.extract_stack()``)."""
    frames = [f for f in stack if not any(s in f.filename.replace(os.sep, "/") for s in SKIP)]
    tests = (lambda f: os.path.abspath(f.filename).startswith(ours),
             lambda f: "/transformers/" in f.filename.replace(os.sep, "/"), lambda f: True)
    for wanted in tests:
        for f in reversed(frames):
            if wanted(f):
                parts = Path(f.filename).parts
                return f"{'/'.join(parts[-2:])}:{f.lineno} {f.name}"
    return "(no Python frame)"


class SyncCounter:
    """Counts the synchronizing CUDA calls made inside ``with counter.counting():`` by site."""

    def __init__(self):
        self.ours = _our_dirs()
        self.sites: Counter = Counter()
        self.steps: list[int] = []

    @contextlib.contextmanager
    def counting(self):
        if not torch.cuda.is_available():        # a CPU run (--device cpu): nothing waits for a GPU
            yield
            return
        before = sum(self.sites.values())
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            shown = warnings.showwarning

            def record(message, category, filename, lineno, file=None, line=None):
                if SYNC_WARNING in str(message):
                    self.sites[site_of(traceback.extract_stack(), self.ours)] += 1
                else:
                    shown(message, category, filename, lineno, file, line)

            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)
                warnings.showwarning = shown
        self.steps.append(sum(self.sites.values()) - before)


@torch.no_grad()
def decode(model, ids: torch.Tensor, steps: int, counter: Optional[SyncCounter] = None):
    """Greedy decoding: (tokens [B, steps + 1], each step's smallest gap between the top two
    logits of a sequence, the step seconds of every step after the first, each counted)."""
    from transformers import DynamicCache

    def sync():
        if ids.is_cuda:
            torch.cuda.synchronize()

    cache = DynamicCache(config=model.config)
    logits = model(ids, cache=cache, logits_to_keep=1).logits[:, -1]
    tokens, gaps, times = [logits.argmax(-1, keepdim=True)], [], []
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        scope = counter.counting() if counter is not None and i > 0 else contextlib.nullcontext()
        with scope:
            logits = model(tokens[-1], cache=cache, logits_to_keep=1).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
        sync()
        times.append(time.perf_counter() - t0)
        top2 = logits.float().topk(2, dim=-1).values
        gaps.append((top2[:, 0] - top2[:, 1]).min().item())
        tokens.append(token)
    return torch.cat(tokens, 1).cpu(), gaps, times[1:]


def first_difference(ref: torch.Tensor, got: torch.Tensor, gaps: list[float]) -> str:
    diff = (ref != got).any(0).nonzero()
    if not len(diff):
        return "same"
    step = int(diff[0])
    gap = f", reference's top-2 logit gap there {gaps[step - 1]:.3g}" if step > 0 else ""
    return f"differ from step {step}{gap}"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3.1-8b-random")
    ap.add_argument("--layers", type=int, default=8, help="keep the model's first N layers (0: all)")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="decode steps (the first is not timed)")
    ap.add_argument("--budget", type=int, default=1024, help="token_budget of the budgeted systems")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--out", default=os.environ.get("OUT", "results/sync"))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: the same runs without counting (a check of this script on a machine without a GPU)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"cuda_sync_points: no CUDA GPU visible to torch {torch.__version__}: run this on a GPU machine "
              "(benchmarks/device_check.sh runs it there)", file=sys.stderr)
        return 3
    import kvdrive_compile
    from tabulate import tabulate
    from kvdrive_compile import models
    from kvdrive_compile.bench.presets import kv_bytes
    from kvdrive_compile.runtime import trace

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = models.random_model(args.model, dtype, device, layers=args.layers or None)
    layers = model.config.num_hidden_layers
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device=device)
    kv = kv_bytes(model.config, args.context, args.batch, dtype)
    tiers = {"device_memory": max(1 << 20, kv // 4), "host_memory": max(1 << 20, kv // 2)}
    trace_file = str(out / "steps.json")
    systems = {
        "dense": None,
        "kvdrive-exact": {"token_budget": None, **tiers},
        "kvdrive": {"token_budget": args.budget, **tiers, "trace": trace_file},
        "kvdrive-default": {"token_budget": args.budget},
    }
    eager = model.forward
    rows, results, reference = [], {}, None
    with tempfile.TemporaryDirectory(prefix="kvdrive-sync-") as disk_dir:
        for name, options in systems.items():
            counter = SyncCounter()
            model.forward = eager
            if options is not None:
                options = dict(options, disk_dir=disk_dir) if "device_memory" in options else options
                model.forward = torch.compile(eager, backend="kvdrive", options=options)
                decode(model, ids[:, : min(512, args.context)], 2)        # compile outside the timing
            t0 = time.perf_counter()
            tokens, gaps, times = decode(model, ids, args.steps, counter)
            total = time.perf_counter() - t0
            kvdrive_compile.release_all()
            kvdrive_compile.flush_traces()
            if reference is None:
                reference, reference_gaps = tokens, gaps
            per_step = counter.steps
            rows.append([name, f"{statistics.median(times) * 1e3:.1f}" if times else "-",
                         f"{statistics.median(per_step):.0f}" if per_step else "-",
                         f"{statistics.median(per_step) / layers:.2f}" if per_step else "-",
                         first_difference(reference, tokens, reference_gaps), f"{total:.1f}"])
            results[name] = {"options": options, "step_ms": [t * 1e3 for t in times], "syncs_per_step": per_step,
                             "sites": dict(counter.sites.most_common()), "tokens": tokens.tolist()}
            print(f"{name}: done ({total:.1f} s)", flush=True)
    model.forward = eager
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (not counted)"
    print(f"\n{where}, torch {torch.__version__}; {args.model} first {layers} layers, "
          f"{args.dtype}, {args.context} x {args.batch}, KV {kv / 2**20:.0f} MiB; tiers {tiers}")
    print(tabulate(rows, headers=["system", "step ms p50", "syncs / step", "per layer", "tokens vs dense",
                                  "seconds"]))
    for name, r in results.items():
        if r["sites"]:
            steps = max(1, len(r["syncs_per_step"]))
            print(f"\n{name}: synchronizing calls per decode step, by the line that made them")
            print(tabulate([[site, f"{n / steps:.1f}"] for site, n in r["sites"].items()], headers=["site", "per step"]))
    if os.path.exists(trace_file):
        events, _ = trace.load(trace_file)
        print("\nkvdrive's timeline (" + trace_file + "):")
        print(trace.render(trace.summarize(events)))
    (out / "sync_points.json").write_text(json.dumps({"args": vars(args), "tiers": tiers, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
