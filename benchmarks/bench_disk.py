"""Read bandwidth of the disk tier (``runtime/disk.py``): page cache or not, coalesced or not,
one request at a time or several.

    python benchmarks/bench_disk.py [--dir /tmp] [--slots 4096] [--file-slots 32768] [--run 16]
                                    [--depths 1 4] [--modes O_DIRECT ...]

The slots are SmolLM2-135M's fp32 block (16 tokens x 64 dims x 4 B, K and V: 8 KiB). A file of
``--file-slots`` slots is written once; each read takes ``--slots`` of them (32 MiB by default):

- ``scattered``: distinct slots drawn at random over the file (sorted, so the odd neighbours
  still merge: nearly one request per slot);
- ``coalesced``: runs of ``--run`` adjacent slots at random places (one request per run, as a
  (layer, row)'s successive blocks are laid out).

Modes: ``buffered, cached`` (page cache, file read once before: the bound a cache gives),
``buffered, cold`` (page cache dropped before each read: fsync + POSIX_FADV_DONTNEED on the whole
file), ``O_DIRECT`` (reads straight into the rows of k and v), ``O_DIRECT staged`` (into an
aligned staging buffer, then copied to k and v). Queue depth: ``DiskFile(queue_depth=q)`` on a
pool of ``q`` threads. Best and median of ``--reps`` reads (the best is the steadier figure on a
shared machine); GB/s = bytes of KV delivered / the best read's wall time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tabulate import tabulate

from kvdrive_compile.runtime.disk import DiskFile


def make(directory: str, n_slots: int, depth: int, pool, **kw) -> DiskFile:
    f = DiskFile(directory, "bench.kv", torch.float32, 16, 64, pool.submit, queue_depth=depth, **kw)
    slots = [s for _ in range(n_slots // 16) for s in f.alloc(0, 16)]          # 16 rows, side by side
    assert sorted(slots) == list(range(n_slots))
    chunk = 2048
    for a in range(0, n_slots, chunk):
        k = torch.randn(chunk, 16, 64)
        f.write(list(range(a, a + chunk)), k, k)
    return f


def drop_cache(f: DiskFile) -> None:
    os.fsync(f.fd)
    os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def pick(n_file: int, n: int, run: int, rng) -> list[int]:
    if run == 1:
        return sorted(rng.choice(n_file, n, replace=False).tolist())
    starts = rng.choice(n_file // run, n // run, replace=False) * run
    return sorted((starts[:, None] + np.arange(run)).reshape(-1).tolist())


def timed(f: DiskFile, slots: list[int], reps: int, before=None) -> tuple[float, float, float]:
    """Best and median seconds per read of ``slots``, and requests per read."""
    out, reqs = [], []
    for _ in range(reps):
        if before:
            before(f)
        r0 = f.read_requests
        t0 = time.perf_counter()
        k, v = f.read_async(slots).result()
        out.append(time.perf_counter() - t0)
        reqs.append(f.read_requests - r0)
    return min(out), statistics.median(out), statistics.median(reqs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--slots", type=int, default=4096)
    ap.add_argument("--file-slots", type=int, default=32768)
    ap.add_argument("--run", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--modes", nargs="+", default=None, help="only these modes (names as in the table)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    layouts = {"scattered": pick(args.file_slots, args.slots, 1, rng),
               f"coalesced (runs of {args.run})": pick(args.file_slots, args.slots, args.run, rng)}
    modes = [("buffered, cached", dict(bypass_cache=False), None),
             ("buffered, cold", dict(bypass_cache=False), drop_cache),
             ("O_DIRECT", dict(), None),
             ("O_DIRECT staged", dict(read_into_rows=False), None)]
    modes = [m for m in modes if args.modes is None or m[0] in args.modes]
    rows = []
    for depth in args.depths:
        with ThreadPoolExecutor(depth, thread_name_prefix="kvdrive-io") as pool:
            for name, kw, before in modes:
                f = make(args.dir, args.file_slots, depth, pool, **kw)
                for layout, slots in layouts.items():
                    if before is None and not f.direct:
                        f.read(slots)                                    # warm the cache
                    best, med, reqs = timed(f, slots, args.reps, before)
                    gb = len(slots) * f.slot_bytes / best / 1e9
                    rows.append([name, layout, depth, int(reqs), f"{best * 1e3:.1f}", f"{med * 1e3:.1f}", f"{gb:.2f}"])
                    print(*rows[-1], sep=" | ", flush=True)
                f.close()
    print()
    print(f"{args.slots} slots of 8 KiB ({args.slots * 8 // 1024} MiB) per read from a "
          f"{args.file_slots * 8 // 1024} MiB file in {args.dir}")
    print(tabulate(rows, headers=["mode", "slots", "queue depth", "requests", "best ms", "median ms", "GB/s (best)"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
