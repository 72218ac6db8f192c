"""Cost of the disk tier's per-slot checksum (xxh3-64) against reading the slot itself.

    python benchmarks/bench_checksum.py [--block-size 16] [--head-dims 64 128] [--run 64]

A slot is one KV block of one (sequence, KV head): K then V, each ``[block_size, head_dim]``.
For each shape and dtype, per slot (median of repeats, microseconds):

- ``checksum``: the slot's checksum (``disk._digest``: K half and V half, each a buffer of its
  own), taken on every write and checked on every read;
- ``pread 1``: a preadv of that one slot (two buffers) from a page-cached file;
- ``pread in run``: a preadv of ``--run`` consecutive slots (as DiskFile reads a run), per slot;
- ``DiskFile.read 1`` / ``in run``: DiskFile.read of one slot / of the run, checks included.

The file is page-cached (written just before; ``DiskFile(bypass_cache=False)``: no O_DIRECT), so
the reads are the cheapest a disk read can be: the ratio is an upper bound of what the checksum
adds. (``benchmarks/bench_disk.py`` measures reads that bypass the page cache.)
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import xxhash
from tabulate import tabulate

from kvdrive_compile.runtime.disk import DiskFile, _digest


def per_call(fn, reps: int = 200, rounds: int = 7) -> float:
    """Median seconds per call of ``fn`` over ``rounds`` rounds of ``reps`` calls."""
    fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t0) / reps)
    return statistics.median(out)


def measure(bs: int, d: int, dtype: torch.dtype, run: int, pool: ThreadPoolExecutor, directory: str) -> list:
    f = DiskFile(directory, "bench.kv", dtype, bs, d, pool.submit, bypass_cache=False)
    slots = [f.alloc(0, 1)[0] for _ in range(run)]                 # one row's blocks: consecutive
    assert slots == list(range(run))
    k, v = torch.randn(run, bs, d).to(dtype), torch.randn(run, bs, d).to(dtype)
    f.write(slots, k, v)                                           # page-cached from here on
    half = f.half
    k_buf, v_buf = np.empty((run, half), np.uint8), np.empty((run, half), np.uint8)
    one = [memoryview(k_buf[0]), memoryview(v_buf[0])]
    views = [m for i in range(run) for m in (memoryview(k_buf[i]), memoryview(v_buf[i]))]
    t_sum = per_call(lambda: _digest(17, one[0], one[1]), reps=2000)
    t_pread = per_call(lambda: os.preadv(f.fd, one, 0), reps=2000)
    t_run = per_call(lambda: os.preadv(f.fd, views, 0)) / run
    t_disk_1 = per_call(lambda: f.read(slots[:1]), reps=200)
    t_disk = per_call(lambda: f.read(slots), reps=50) / run
    f.close()
    us = 1e6
    return [bs, d, str(dtype).split(".")[-1], f.slot_bytes, t_sum * us, t_pread * us, t_run * us,
            t_disk_1 * us, t_disk * us, f"{t_sum / t_pread:.0%}", f"{t_sum / t_run:.0%}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--run", type=int, default=64, help="consecutive slots per read")
    parser.add_argument("--dir", default=None, help="where the file is made (default: the temp dir)")
    args = parser.parse_args()
    rows = []
    with ThreadPoolExecutor(4) as pool, tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for d in args.head_dims:
            for dtype in (torch.float16, torch.float32):
                rows.append(measure(args.block_size, d, dtype, args.run, pool, directory))
    print(f"xxhash {xxhash.VERSION} (xxHash {xxhash.XXHASH_VERSION}); per slot, microseconds; "
          f"run = {args.run} consecutive slots")
    print(tabulate(rows, headers=["block", "head_dim", "dtype", "slot bytes", "checksum", "pread 1",
                                  "pread in run", "DiskFile.read 1", "DiskFile.read in run",
                                  "checksum/pread 1", "checksum/in run"],
                   floatfmt=".2f"))


if __name__ == "__main__":
    main()
