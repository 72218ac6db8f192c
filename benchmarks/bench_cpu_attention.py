"""CPU paged attention (kernels/cpu_attention.py) against memory bandwidth and torch SDPA.

    python benchmarks/bench_cpu_attention.py [--tokens 8192 65536] [--dtypes float16] [--reps 7]

One decode token, batch 1, Hkv 8 KV heads, GQA 4, head_dim 128; each (sequence, KV head)
selects ``tokens`` tokens as blocks at random slots of a pool twice that size, allocated with
transparent huge pages (as a runtime should: 4 KiB pages cost a TLB miss per block) and, for
comparison, with plain 4 KiB pages.

Every timed call starts with cold caches: a parallel read of a 1 GiB buffer runs before it, and
that read is the bandwidth the kernel is compared with (interleaved, so both see the same
machine; best of ``--reps``, as the machine may be shared; "of peak read" divides by the best
read of the whole run instead). Right before each timed call, a tiny call of the same function
on other data warms its code path (the flush evicts code and page tables too: ~0.7 ms for any
call here, which a decode step calling the kernel every layer does not pay); the timed call's
K/V stay cold. "block read" is a plain parallel read of the same selected blocks in the same
order, no attention and no prefetch hints: what the access pattern gets without help.
torch SDPA runs on the dense equivalent (the selected tokens already gathered, contiguous), as
a model calls it (``q [1, 32, 1, 128]``, ``enable_gqa=True``) and in the fastest form torch
offers for this shape (the 4 query heads of a KV head packed as 4 query rows).
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange
from tabulate import tabulate

from kvdrive_compile.kernels.cpu_attention import _pool_as_numpy, cpu_partial_attention
from kvdrive_compile.runtime.host_memory import huge_page_tensor, huge_pages_available

HKV, GQA, HEAD_DIM = 8, 4, 128
FLUSH_BYTES = 1 << 30


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _read_all(buf, chunks):
    """Sum buf (float32, 1-D) in `chunks` parallel pieces: a pure streaming read."""
    part = np.zeros(chunks, np.float32)
    n = buf.size
    for c in prange(chunks):
        s = np.float32(0.0)
        for i in range(c * n // chunks, (c + 1) * n // chunks):
            s += buf[i]
        part[c] = s
    return part.sum()


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _read_blocks(k_pool, v_pool, table):
    """Sum every selected block of both pools (table: [Hkv, NB]), one KV head per thread."""
    part = np.zeros(table.shape[0], np.float32)
    for h in prange(table.shape[0]):
        s = np.float32(0.0)
        for slot in table[h]:
            for pool in (k_pool, v_pool):
                block = pool[slot]
                for t in range(block.shape[0]):
                    for d in range(block.shape[1]):
                        s += np.float32(block[t, d])
        part[h] = s
    return part.sum()


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its children)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    busy = sum(ticks) - ticks[3] - ticks[4]                           # minus idle and iowait
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_selection(tokens: int, bs: int, dtype: torch.dtype, huge: bool, gen: torch.Generator, hkv: int = HKV):
    """Pools twice the selection, the selected blocks at random slots, filled with randn."""
    nb = tokens // bs
    shape = (2 * hkv * nb, bs, HEAD_DIM)
    num_slots = shape[0]
    new = (lambda: huge_page_tensor(shape, dtype)) if huge else (lambda: torch.empty(shape, dtype=dtype))
    k_pool, v_pool = new(), new()                                       # unselected slots: never read
    table = torch.randperm(num_slots, generator=gen)[: hkv * nb].reshape(1, hkv, nb).int()
    flat = table.flatten().long()
    k_pool[flat] = torch.randn(flat.numel(), bs, HEAD_DIM, generator=gen).to(dtype)
    v_pool[flat] = torch.randn(flat.numel(), bs, HEAD_DIM, generator=gen).to(dtype)
    lens = torch.full_like(table, bs)
    q = torch.randn(1, hkv * GQA, HEAD_DIM, generator=gen).to(dtype)
    return q, k_pool, v_pool, table, lens


def check(out, lse, q, k_dense, v_dense, scale) -> float:
    """Max abs error of KV head 0's query heads against float64 attention."""
    s = q[0, :GQA].double() @ k_dense[0, 0].double().T * scale              # [G, S]
    ref = torch.softmax(s, dim=-1) @ v_dense[0, 0].double()
    err = max((out[0, :GQA].double() - ref).abs().max().item(),
              (lse[0, :GQA].double() - torch.logsumexp(s, dim=-1)).abs().max().item())
    if err > 1e-4:
        raise SystemExit(f"cpu_partial_attention is wrong here (max abs error {err:.2e}); not timing it")
    return err


def compile_times() -> tuple[float, float, float]:
    """Seconds, in fresh processes: importing the module (torch and numba included), then
    warm_up() (every dtype variant) with an empty numba cache, and again from that cache."""
    code = ("import time; t0 = time.perf_counter(); "
            "from kvdrive_compile.kernels.cpu_attention import warm_up; t1 = time.perf_counter(); "
            "warm_up(); print(t1 - t0, time.perf_counter() - t1)")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        run = lambda: [float(x) for x in subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                                         capture_output=True, text=True).stdout.split()[-2:]]
        (imported, cold), (_, cached) = run(), run()
    return imported, cold, cached


def primers(dtype: torch.dtype, bs: int) -> dict:
    """A tiny call of each timed function on its own small data, run right before the timed
    call: the 1 GiB flush also evicts the code, the Python objects and the page-table entries
    that every call walks (~0.7 ms of fixed cost here, for any call), which a decode step that
    runs the kernel every layer keeps warm. The timed call's K/V stay cold."""
    gen = torch.Generator().manual_seed(1)
    q, k_pool, v_pool, table, lens = make_selection(64, bs, dtype, False, gen, hkv=1)
    k, v = k_pool[table[0, 0].long()].reshape(1, 1, -1, HEAD_DIM), v_pool[table[0, 0].long()].reshape(1, 1, -1, HEAD_DIM)
    kp, vp, tb = _pool_as_numpy(k_pool), _pool_as_numpy(v_pool), table[0].numpy()
    return {
        "ours": lambda: cpu_partial_attention(q, k_pool, v_pool, table, lens, 0.1),
        "blocks": lambda: _read_blocks(kp, vp, tb),
        "model": lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True),
        "packed": lambda: F.scaled_dot_product_attention(q.reshape(1, 1, GQA, HEAD_DIM), k, v),
    }


def bench(tokens: int, bs: int, dtype: torch.dtype, huge: bool, flush: np.ndarray, reps: int, gen) -> dict:
    q, k_pool, v_pool, table, lens = make_selection(tokens, bs, dtype, huge, gen)
    scale = 1 / math.sqrt(HEAD_DIM)
    flat = table[0].long()                                                  # [Hkv, NB]
    k_dense = k_pool[flat].reshape(1, HKV, tokens, HEAD_DIM)               # gathered, contiguous
    v_dense = v_pool[flat].reshape(1, HKV, tokens, HEAD_DIM)
    run = lambda: cpu_partial_attention(q, k_pool, v_pool, table, lens, scale)
    err = check(*run(), q, k_dense, v_dense, scale)
    q_model = q.unsqueeze(2)                                                # [1, Hq, 1, D]
    q_packed = q.reshape(1, HKV, GQA, HEAD_DIM)                             # [1, Hkv, G, D]
    sdpa_model = lambda: F.scaled_dot_product_attention(q_model, k_dense, v_dense, scale=scale, enable_gqa=True)
    sdpa_packed = lambda: F.scaled_dot_product_attention(q_packed, k_dense, v_dense, scale=scale)
    kp, vp, tb = _pool_as_numpy(k_pool), _pool_as_numpy(v_pool), table[0].numpy()
    read_blocks = lambda: _read_blocks(kp, vp, tb)
    fns = {"ours": run, "blocks": read_blocks, "model": sdpa_model, "packed": sdpa_packed}
    primes = primers(dtype, bs)
    times = {"read": [], **{name: [] for name in fns}}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        times["read"].append(timed(lambda: _read_all(flush, 64)))        # also flushes the caches
        for name, fn in fns.items():
            primes[name]()
            times[name].append(timed(fn))
            _read_all(flush, 64)
    t = {name: min(v) for name, v in times.items()}
    kv_bytes = 2 * HKV * tokens * HEAD_DIM * k_pool.element_size()
    gbs, read_gbs = kv_bytes / t["ours"] / 1e9, flush.nbytes / t["read"] / 1e9
    return {
        "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "block": bs,
        "pages": "2M" if huge else "4K", "ms": t["ours"] * 1e3, "GB/s": gbs,
        "read GB/s": read_gbs, "of read": gbs / read_gbs, "block read GB/s": kv_bytes / t["blocks"] / 1e9,
        "x SDPA(gqa)": t["model"] / t["ours"], "x SDPA(packed)": t["packed"] / t["ours"],
        "max err": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--pages", nargs="+", default=["2M", "4K"], choices=["2M", "4K"],
                        help="pool pages: 2M (transparent huge pages) and/or 4K; 4K rows use the first block size only")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-compile-time", action="store_true", help="skip the fresh-process compile timing")
    args = parser.parse_args()
    if "2M" in args.pages and not huge_pages_available():
        print("transparent huge pages are disabled here (/sys/kernel/mm/transparent_hugepage/enabled): 4K rows only")
        args.pages = ["4K"]
    start, wall = cpu_seconds(), time.perf_counter()
    if not args.no_compile_time:
        imported, cold, cached = compile_times()
        print(f"import {imported:.2f} s (torch and numba included); first calls of all 3 dtype variants "
              f"(warm_up): {cold:.1f} s compiling into an empty numba cache, {cached:.2f} s loading from it")
    print(f"threads: numba {os.environ.get('NUMBA_NUM_THREADS', 'all')}, torch {torch.get_num_threads()}; "
          f"Hkv {HKV}, GQA {GQA}, head_dim {HEAD_DIM}, batch 1, one query token")
    flush = np.ones(FLUSH_BYTES // 4, np.float32)
    _read_all(flush, 64)
    gen = torch.Generator().manual_seed(0)
    configs = [(dt, bs, pages) for pages in args.pages for dt in args.dtypes
               for bs in (args.blocks if pages == args.pages[0] else args.blocks[:1])]
    rows = [bench(tokens, bs, getattr(torch, dt), pages == "2M", flush, args.reps, gen)
            for dt, bs, pages in configs for tokens in args.tokens]
    peak = max(row["read GB/s"] for row in rows)
    for row in rows:                        # the strictest reference: the best read of the whole run
        row["of peak read"] = row["GB/s"] / peak
    floatfmt = ("", "", "", "", ".2f", ".1f", ".1f", ".2f", ".1f", ".2f", ".2f", ".0e", ".2f")
    print(tabulate(rows, headers="keys", floatfmt=floatfmt, tablefmt="github"))
    (busy0, own0), (busy1, own1) = start, cpu_seconds()
    others = max(0.0, (busy1 - busy0) - (own1 - own0)) / ((time.perf_counter() - wall) * os.cpu_count())
    print(f"other processes used {others:.0%} of the machine's CPU time during this run"
          + (": the numbers above are low, rerun on a quiet machine" if others > 0.05 else ""))


if __name__ == "__main__":
    main()
