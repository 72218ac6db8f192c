"""Paired A/B of the CPU attention kernel against its version at another git revision.

    python benchmarks/ab_cpu_attention.py --against e1266e4            # cold table + small calls
    python benchmarks/ab_cpu_attention.py --against HEAD~1 --tokens 65536 --dtypes float32 --no-small

The machine's memory bandwidth moves from minute to minute (this project's hosts are shared),
so two separate runs of bench_cpu_attention.py cannot tell a 5 % kernel change from the noise.
Here both kernels run in one process, alternated call by call on the same data:

- cold: the bench's shape (Hkv 8, GQA 4, head_dim 128, one decode token, blocks at random
  slots of a pool twice the selection, 2 MiB pages where available); every call after a 1 GiB
  flush (no priming, so a call's fixed cost is included), best and median of ``--reps``;
- small: calls on the shapes a decode step makes (SmolLM2's 3 KV heads x GQA 3, head_dim 64,
  and 8 x 4 / 8 x 8 with head_dim 128), warm (median of 300 calls each) and cold (median of
  31, each after the flush and a tiny call of the same kernel that warms its code path).

The old kernel is ``kernels/cpu_attention.py`` at ``--against``, loaded from a private temporary
directory (its numba cache goes there too and is removed with it); its relative imports are
pointed at the installed package, so a revision whose helpers differ may not load.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu_attention as bench  # noqa: E402  (the bench's selection, flush and read)

from kvdrive_compile.kernels import cpu_attention as new_kernel  # noqa: E402
from kvdrive_compile.runtime.host_memory import huge_pages_available  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SMALL = {  # name: (batch, KV heads, GQA, head_dim, blocks of 16 per (sequence, KV head), dtype)
    "SmolLM2 3x3 d64, batch 1, 64 blocks, fp32": (1, 3, 3, 64, 64, torch.float32),
    "SmolLM2 3x3 d64, batch 4, 64 blocks, fp32": (4, 3, 3, 64, 64, torch.float32),
    "8x4 d128, batch 1, 256 blocks, fp16": (1, 8, 4, 128, 256, torch.float16),
    "8x4 d128, batch 4, 64 blocks, fp16": (4, 8, 4, 128, 64, torch.float16),
    "8x8 d128, batch 1, 256 blocks, fp16": (1, 8, 8, 128, 256, torch.float16),
}


def load_old_kernel(rev: str, where: Path):
    """kernels/cpu_attention.py at ``rev`` as a module of its own (relative imports -> package)."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:kernels/cpu_attention.py"], cwd=REPO,
                                check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"cannot read kernels/cpu_attention.py at {rev!r}: {err.stderr.strip()}")
    source = re.sub(r"^from \.(\w+) import", r"from kvdrive_compile.kernels.\1 import", source, flags=re.M)
    path = where / "cpu_attention_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("cpu_attention_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cold_rows(kernels: dict, tokens_list, dtypes, bs: int, reps: int) -> list[dict]:
    huge = huge_pages_available()
    flush = np.ones(bench.FLUSH_BYTES // 4, np.float32)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dt in dtypes:
        for tokens in tokens_list:
            q, k_pool, v_pool, table, lens = bench.make_selection(tokens, bs, getattr(torch, dt), huge, gen)
            scale = 1 / math.sqrt(bench.HEAD_DIM)
            calls = {name: (lambda m=m: m.cpu_partial_attention(q, k_pool, v_pool, table, lens, scale))
                     for name, m in kernels.items()}
            ref_out, ref_lse = calls["new"]()
            for name, call in calls.items():                   # both agree before either is timed
                out, lse = call()
                torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4, msg=f"{name} kernel differs")
                torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4, msg=f"{name} kernel differs")
            times = {name: [] for name in calls}
            reads = []
            for _ in range(reps):
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    bench._read_all(flush, 64)                 # flushes the caches; also the reference
                    reads.append(time.perf_counter() - t0)
                    times[name].append(bench.timed(call))
            kv_bytes = 2 * bench.HKV * tokens * bench.HEAD_DIM * k_pool.element_size()
            read = flush.nbytes / min(reads) / 1e9
            best = {name: kv_bytes / min(t) / 1e9 for name, t in times.items()}
            median = {name: kv_bytes / float(np.median(t)) / 1e9 for name, t in times.items()}
            rows.append({"dtype": dt, "tokens": tokens, "block": bs, "pages": "2M" if huge else "4K",
                         "read GB/s": read, "old GB/s": best["old"], "new GB/s": best["new"],
                         "new / old": best["new"] / best["old"],
                         "old median": median["old"], "new median": median["new"]})
    return rows


def small_rows(kernels: dict, calls_each: int = 300, cold_each: int = 31) -> list[dict]:
    """Each shape warm (median of ``calls_each`` alternated calls) and cold (median of
    ``cold_each``: the 1 GiB flush, then a tiny call of the same kernel on other data so that
    its code path is warm as in a decode step, then the timed call, whose K/V are cold)."""
    gen = torch.Generator().manual_seed(1)
    flush = np.ones(bench.FLUSH_BYTES // 4, np.float32)
    tiny_k = torch.randn(2, 16, 64, generator=gen)
    tiny_table = torch.tensor([[[0, 1]]], dtype=torch.int32)
    rows = []
    for name, (b, hkv, g, d, nb, dtype) in SMALL.items():
        slots = 4 * b * hkv * nb
        k_pool = torch.randn(slots, 16, d, generator=gen).to(dtype)
        v_pool = torch.randn(slots, 16, d, generator=gen).to(dtype)
        table = torch.randperm(slots, generator=gen)[: b * hkv * nb].reshape(b, hkv, nb).int()
        lens = torch.full_like(table, 16)
        q = torch.randn(b, hkv * g, d, generator=gen)
        tiny = tiny_k.to(dtype)
        calls = {k: (lambda m=m: m.cpu_partial_attention(q, k_pool, v_pool, table, lens, 0.1))
                 for k, m in kernels.items()}
        primers = {k: (lambda m=m: m.cpu_partial_attention(torch.zeros(1, 1, 64), tiny, tiny, tiny_table,
                                                           torch.full_like(tiny_table, 16), 0.1))
                   for k, m in kernels.items()}
        for call in calls.values():
            call()
        warm = {k: [] for k in calls}
        for _ in range(calls_each):
            for k, call in calls.items():
                warm[k].append(bench.timed(call))
        cold = {k: [] for k in calls}
        for _ in range(cold_each):
            for k, call in calls.items():
                bench._read_all(flush, 64)
                primers[k]()
                cold[k].append(bench.timed(call))
        old, new = (float(np.median(warm[k])) * 1e6 for k in ("old", "new"))
        old_cold, new_cold = (float(np.median(cold[k])) * 1e6 for k in ("old", "new"))
        rows.append({"shape": name, "old us": old, "new us": new, "new / old": new / old,
                     "old cold us": old_cold, "new cold us": new_cold, "new / old cold": new_cold / old_cold})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", required=True, help="git revision of the old kernel, e.g. HEAD~1")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--no-small", action="store_true", help="skip the small calls")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvdrive-ab-") as where:   # mode 0700, removed after
        kernels = {"old": load_old_kernel(args.against, Path(where)), "new": new_kernel}
        print(f"old: kernels/cpu_attention.py at {args.against}; new: the installed package "
              f"({new_kernel.__file__}); numba compiles the old one first (~15 s per dtype)")
        rows = cold_rows(kernels, args.tokens, args.dtypes, args.block, args.reps)
        print("cold (after a 1 GiB flush, not primed; GB/s = best of the reps)")
        print(tabulate(rows, headers="keys", floatfmt=".2f", tablefmt="github"))
        if not args.no_small:
            print("\nsmall calls (median): warm, and cold after the flush (code path primed by a tiny call)")
            print(tabulate(small_rows(kernels), headers="keys", floatfmt=".2f", tablefmt="github"))


if __name__ == "__main__":
    main()
