"""CPU paged attention (kernels/cpu_attention.py) against memory bandwidth and torch SDPA.

    python benchmarks/bench_cpu_attention.py [--tokens 8192 16384 32768 65536] [--reps 7]

One decode token, batch 1, Hkv 8 KV heads, GQA 4, head_dim 128; each (sequence, KV head)
selects ``tokens`` tokens as randomly placed blocks of a pool twice that size. Every timed
call starts with cold caches: a parallel read of a 1 GiB buffer runs before it, and that read
is also the bandwidth the kernel is compared with (interleaved, so both see the same machine).
torch SDPA runs on the dense equivalent (the selected tokens already gathered, contiguous),
as a model calls it (``q [1, 32, 1, 128]``, ``enable_gqa=True``) and in the fastest form
torch offers for this shape (the 4 query heads of a KV head packed as 4 query rows).
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

from kvdrive_compile.kernels.cpu_attention import cpu_partial_attention

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


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_selection(tokens: int, bs: int, dtype: torch.dtype, gen: torch.Generator):
    """Pools twice the selection, the selected blocks at random slots, filled with randn."""
    nb = tokens // bs
    num_slots = 2 * HKV * nb
    k_pool = torch.empty(num_slots, bs, HEAD_DIM, dtype=dtype)        # unselected slots: never read
    v_pool = torch.empty(num_slots, bs, HEAD_DIM, dtype=dtype)
    table = torch.randperm(num_slots, generator=gen)[: HKV * nb].reshape(1, HKV, nb).int()
    flat = table.flatten().long()
    k_pool[flat] = torch.randn(flat.numel(), bs, HEAD_DIM, generator=gen).to(dtype)
    v_pool[flat] = torch.randn(flat.numel(), bs, HEAD_DIM, generator=gen).to(dtype)
    lens = torch.full_like(table, bs)
    q = torch.randn(1, HKV * GQA, HEAD_DIM, generator=gen).to(dtype)
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


def compile_times() -> tuple[float, float]:
    """Seconds for import + warm_up() in a fresh process: with an empty numba cache, then cached."""
    code = ("import time; t = time.perf_counter(); "
            "from kvdrive_compile.kernels.cpu_attention import warm_up; warm_up(); "
            "print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        run = lambda: float(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                           capture_output=True, text=True).stdout.split()[-1])
        return run(), run()


def bench(tokens: int, bs: int, dtype: torch.dtype, flush: np.ndarray, reps: int, gen) -> dict:
    q, k_pool, v_pool, table, lens = make_selection(tokens, bs, dtype, gen)
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
    times = {"read": [], "ours": [], "model": [], "packed": []}
    for fn in (run, sdpa_model, sdpa_packed):
        fn()
    for _ in range(reps):
        times["read"].append(timed(lambda: _read_all(flush, 64)))
        times["ours"].append(timed(run))
        _read_all(flush, 64)
        times["model"].append(timed(sdpa_model))
        _read_all(flush, 64)
        times["packed"].append(timed(sdpa_packed))
    t = {k: float(np.median(v)) for k, v in times.items()}
    kv_bytes = 2 * HKV * tokens * HEAD_DIM * k_pool.element_size()
    gbs, read_gbs = kv_bytes / t["ours"] / 1e9, flush.nbytes / t["read"] / 1e9
    return {
        "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "block": bs,
        "ms": t["ours"] * 1e3, "GB/s": gbs, "read GB/s": read_gbs, "of read bw": gbs / read_gbs,
        "SDPA(gqa) ms": t["model"] * 1e3, "x SDPA(gqa)": t["model"] / t["ours"],
        "SDPA(packed) ms": t["packed"] * 1e3, "x SDPA(packed)": t["packed"] / t["ours"],
        "max err": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    cold, cached = compile_times()
    print(f"first call (import + compile all 3 dtype variants): {cold:.1f} s with an empty numba cache, "
          f"{cached:.2f} s from the cache")
    print(f"threads: numba {os.environ.get('NUMBA_NUM_THREADS', 'all')}, torch {torch.get_num_threads()}; "
          f"Hkv {HKV}, GQA {GQA}, head_dim {HEAD_DIM}, batch 1, one query token")
    flush = np.ones(FLUSH_BYTES // 4, np.float32)
    _read_all(flush, 64)
    gen = torch.Generator().manual_seed(0)
    rows = [bench(tokens, bs, getattr(torch, dt), flush, args.reps, gen)
            for dt in args.dtypes for bs in args.blocks for tokens in args.tokens]
    print(tabulate(rows, headers="keys", floatfmt=".2f", tablefmt="github"))


if __name__ == "__main__":
    main()
