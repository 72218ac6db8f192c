"""The host work of one ranked layer's decode plan, by part, as the context and batch grow;
with ``--against REV``, this checkout's runtime against its version at a git revision.

A decode step plans each ranked layer on the host before any of its attention runs: rank the
blocks (``select_scored``: on a CPU the numba ranking; on a GPU the Triton one, the reuse bonus
computed here either way), count what each tier serves, the cache policy's moves
(``cache_step``), split the selection by tier (``tier_part``) and pin what it reads. This
drives one layer of a ``KVRuntime`` directly (no model) with three tiers (device 25 %, host
50 % of the layer's KV, the rest on disk), the default selection policy (1,024 tokens per KV
head), keys with a few heavy hitters and a query that drifts from step to step, and prints
per part the p50 over the decode steps and its cost per (row, block) entry: the parts whose
cost per entry stays flat as the entries grow are O(rows x blocks) per layer and step.

The shapes: SmolLM2-135M's at 8K x 4 (3 KV heads), then 8 KV heads (Llama-3.1-8B's) x batch 8
at 16K and 64K: the last is the ``gpu-8b`` preset's largest point, where a step plans 32 such
layers. head_dim is 64 throughout (the per-entry state does not depend on it).

``--against REV``: the runtime and kernels at REV (``git archive``, into a private temporary
directory, imported as a package of their own) get a runtime of their own fed the same
appends and queries; decode steps alternate between the two (the order flips every step), so
the machine's drift hits both alike. It prints both p50s and the median of the per-step ratios
of the plan without the ranking (this checkout over REV), and checks that both placed the
blocks alike (where the change was meant to move nothing).

    .venv/bin/python benchmarks/plan_host_work.py                  # ~2 minutes on 2 cores
    .venv/bin/python benchmarks/plan_host_work.py --against HEAD~1 --shapes 4x8x8192 8x8x65536 --steps 20
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

LAYER = 5                    # past the default dense layers: ranked
HEAD_DIM, GQA, BLOCK = 64, 4, 16
CHUNK = 8192                 # prefill tokens per call
PARTS = {"ranking (select_scored)": ("site_step", "select_scored"),
         "reuse bonus (in the ranking)": ("selection", "reuse_bonus"),
         "count_served": ("placement", "count_served"),
         "cache_step (the policy's moves)": ("placement", "cache_step"),
         "tier_part (3 tiers)": ("site_step", "tier_part"),
         "_pin": ("site_step", "_pin")}
REPO = Path(__file__).resolve().parent.parent


class Runtime:
    """One implementation's modules, its runtime with one session, and its part clocks."""

    def __init__(self, package: str, kv_bytes: int, disk_dir: str):
        self.mod = {name: importlib.import_module(f"{package}.runtime.{name}")
                    for name in ("placement", "selection", "site_step", "kv_runtime")}
        self.rt = self.mod["kv_runtime"].KVRuntime(block_size=BLOCK, device_memory=kv_bytes // 4,
                                                   host_memory=kv_bytes // 2, disk_dir=disk_dir, io_threads=2)
        self.session = self.rt.open_session(sites=1)
        self.policy = self.mod["selection"].SelectionPolicy()
        self.clock: dict[str, list] = {name: [] for name in PARTS}
        self.total: list[float] = []
        for name, (module, attr) in PARTS.items():           # each part adds its time to clock[name][-1]
            fn = getattr(self.mod[module], attr)

            def timed(*args, _fn=fn, _name=name, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    if self.clock[_name]:                     # decode steps only
                        self.clock[_name][-1] += time.perf_counter() - t0
            setattr(self.mod[module], attr, timed)

    def step(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, timed: bool) -> torch.Tensor:
        site_step = self.mod["site_step"]
        kv = self.rt.layer(self.session, LAYER, k, keeps_last=False)
        past, n = kv.length, k.shape[2]
        self.mod["placement"].append(self.rt, kv, k, v)
        if timed:
            for series in self.clock.values():
                series.append(0.0)
        t0 = time.perf_counter()
        pid = site_step.select(self.rt, self.session, LAYER, past, n, q, self.policy if n == 1 else site_step.EXACT)
        if timed:
            self.total.append(time.perf_counter() - t0)
        selected = self.session.plans[pid].selected
        site_step.end_plan(self.rt, self.session, pid)
        return selected

    def settle(self) -> None:
        """Wait for the prefill's disk writes: they would run into the timed steps."""
        for f in self.session.disk_files.values():
            f.flush()

    def summary(self) -> dict:
        warm = slice(2, None)                                 # the first steps load kernels and warm up
        out = {name: statistics.median(series[warm]) for name, series in self.clock.items()}
        out["select (all of the plan)"] = statistics.median(self.total[warm])
        for b in self.rt.budgets.values():
            if b.limit is not None and b.peak > b.limit:
                raise AssertionError(f"the {b.name} budget was exceeded: {b.peak} > {b.limit}")
        return out

    def plan_only(self) -> list[float]:
        """Per timed step: the plan without the ranking."""
        return [t - r for t, r in zip(self.total, self.clock["ranking (select_scored)"])]


def run_shape(batch: int, kv_heads: int, tokens: int, steps: int, packages: dict[str, str], seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    hot = torch.randn(kv_heads, HEAD_DIM, generator=gen)

    def keys(n: int) -> torch.Tensor:           # ~2 % of the tokens point at their head's hot direction
        k = torch.randn(batch, kv_heads, n, HEAD_DIM, generator=gen)
        heavy = torch.rand(batch, kv_heads, n, 1, generator=gen) < 0.02
        return (k + heavy * 3 * hot[None, :, None, :]).half()

    kv_bytes = batch * kv_heads * tokens * HEAD_DIM * 2 * 2
    budget_blocks = None
    with tempfile.TemporaryDirectory() as disk_dir:
        runs = {label: Runtime(package, kv_bytes, tempfile.mkdtemp(dir=disk_dir)) for label, package in packages.items()}
        try:
            for start in range(0, tokens, CHUNK):                      # the prefill, in chunks
                n = min(CHUNK, tokens - start)
                k, v = keys(n), torch.randn(batch, kv_heads, n, HEAD_DIM, generator=gen).half()
                q = torch.randn(batch, kv_heads * GQA, n, HEAD_DIM, generator=gen).half()
                for run in runs.values():
                    run.step(k, v, q, timed=False)
            for run in runs.values():
                run.settle()
            q = torch.randn(batch, kv_heads * GQA, 1, HEAD_DIM, generator=gen) + 2 * hot.repeat_interleave(GQA, 0)[None, :, None, :]
            admitted = {label: run.rt.admitted["device"] for label, run in runs.items()}
            for step in range(steps):
                k, v = keys(1), torch.randn(batch, kv_heads, 1, HEAD_DIM, generator=gen).half()
                q = q + 0.3 * torch.randn(q.shape, generator=gen)
                order = list(runs) if step % 2 else list(runs)[::-1]
                for label in order:
                    selected = runs[label].step(k, v, q.half(), timed=True)
                    budget_blocks = budget_blocks or runs[label].policy.token_budget // BLOCK
                    if selected.shape[1] != budget_blocks:
                        raise AssertionError(f"{label}: the plan selects {selected.shape[1]} blocks a row, not {budget_blocks}")
            out = {label: run.summary() for label, run in runs.items()}
            for label, run in runs.items():
                kv = run.session.layers[LAYER]
                out[label]["entries"] = kv.rows * kv.num_blocks
                out[label]["admitted per step"] = (run.rt.admitted["device"] - admitted[label]) / steps
            if len(runs) == 2:
                (a, ra), (b, rb) = runs.items()
                ratios = [x / y for x, y in zip(ra.plan_only()[2:], rb.plan_only()[2:])]
                out["ratio"] = statistics.median(ratios)
                placed = [r.session.layers[LAYER] for r in (ra, rb)]
                nb = placed[0].num_blocks           # the held blocks (the arrays' capacity may differ)
                out["same placement"] = all(np.array_equal(getattr(placed[0], f)[:, :nb], getattr(placed[1], f)[:, :nb])
                                            for f in ("dev", "host", "home"))
            return out
        finally:
            for run in runs.values():
                run.rt.close()


def package_at(rev: str, where: Path) -> str:
    """The runtime and kernels at ``rev`` as package ``kvdrive_rev`` under ``where``."""
    root = where / "kvdrive_rev"
    root.mkdir()
    try:
        archive = subprocess.run(["git", "archive", rev, "runtime", "kernels"], cwd=REPO, check=True,
                                 capture_output=True).stdout
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"cannot read runtime/ and kernels/ at {rev!r}: {err.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    (root / "__init__.py").write_text("")
    sys.path.insert(0, str(where))
    return "kvdrive_rev"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4x3x8192", "8x8x16384", "8x8x65536"],
                    help="BATCHxKV_HEADSxTOKENS each")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--against", metavar="REV", help="also run the runtime at this git revision, alternating steps")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        packages = {"this checkout": "kvdrive_compile"}
        if args.against:
            packages[args.against] = package_at(args.against, Path(tmp))
        results = {}
        for shape in args.shapes:
            b, h, n = (int(x) for x in shape.split("x"))
            t0 = time.perf_counter()
            results[shape] = run_shape(b, h, n, args.steps, packages)
            print(f"{shape}: {results[shape]['this checkout']['entries']} entries, {time.perf_counter() - t0:.0f} s",
                  flush=True)
    names = list(PARTS) + ["select (all of the plan)"]
    for label in packages:
        rows = []
        for name in names:
            row = [name]
            for shape in args.shapes:
                r = results[shape][label]
                row += [f"{r[name] * 1e3:.2f}", f"{r[name] * 1e9 / r['entries']:.1f}"]
            rows.append(row)
        rows.append(["device admissions per decode step"]
                    + sum(([f"{results[s][label]['admitted per step']:.0f}", ""] for s in args.shapes), []))
        headers = [f"{label}: p50 per layer and step"] + sum(([f"{s} ms", "ns/entry"] for s in args.shapes), [])
        print(tabulate(rows, headers=headers, disable_numparse=True))
    print("entries: rows (sequence x KV head) x blocks of 16 tokens; 'select' holds every part above "
          "(the reuse bonus inside the ranking)")
    if args.against:
        for shape in args.shapes:
            r = results[shape]
            print(f"{shape}: plan without the ranking, this checkout / {args.against}: median of per-step "
                  f"ratios {r['ratio']:.3f}; same placement: {r['same placement']}")
    return results


if __name__ == "__main__":
    main()
