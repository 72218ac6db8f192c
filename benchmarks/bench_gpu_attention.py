"""Triton paged decode attention (kernels/paged_attention.py) on one GPU: HBM bandwidth and SDPA.

    python benchmarks/bench_gpu_attention.py [--batches 8 32] [--tokens 4096 16384 65536]

One decode token, Hkv 8 KV heads, GQA 4, head_dim 128, fp16 and bf16 pools; each (sequence,
KV head) selects ``tokens`` tokens as blocks at random slots of a pool twice that size.
Each configuration is first checked against float64 attention on fresh random data, then
timed with triton.testing.do_bench (median; L2 cleared between runs, each call launched from
Python as the runtime launches it) and with do_bench_cudagraph ("graph": calls replayed from a
CUDA graph, so the GPU time alone, without the host's launch cost; "host us" is the CPU time
one call takes to launch). "GB/s" counts the K/V
bytes read; "copy GB/s" is a device-to-device copy of 2 GiB measured in the same run (bytes
read + written), the practical HBM ceiling. torch SDPA runs on the dense equivalent (the
selected tokens already gathered, contiguous), as a model calls it (``enable_gqa=True``) and
with the GQA group packed as query rows; "x gather" is paged_attention_torch on the same pools.
Needs a CUDA GPU (up to ~35 GB of memory with the defaults, most of it for the gather
baseline); finishes in a few minutes on an H100.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from kvdrive_compile.kernels.paged_attention import (
    DEFAULT_LAUNCH,
    LaunchConfig,
    paged_attention_torch,
    paged_attention_triton,
)

HKV, GQA, HEAD_DIM = 8, 4, 128
TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2.5e-2}   # q and p are rounded to the pool dtype


def make_selection(batch: int, tokens: int, bs: int, dtype: torch.dtype, gen: torch.Generator):
    """Pools twice the selection, the selected blocks at random slots, filled with randn."""
    nb = tokens // bs
    num_slots = 2 * batch * HKV * nb
    k_pool = torch.empty(num_slots, bs, HEAD_DIM, dtype=dtype, device="cuda")
    v_pool = torch.empty_like(k_pool)
    table = torch.randperm(num_slots, generator=gen, device="cuda")[: batch * HKV * nb]
    table = table.reshape(batch, HKV, nb).int()
    flat = table.flatten().long()
    k_pool[flat] = torch.randn(flat.numel(), bs, HEAD_DIM, generator=gen, device="cuda").to(dtype)
    v_pool[flat] = torch.randn(flat.numel(), bs, HEAD_DIM, generator=gen, device="cuda").to(dtype)
    lens = torch.full_like(table, bs)
    q = torch.randn(batch, HKV * GQA, HEAD_DIM, generator=gen, device="cuda").to(dtype)
    return q, k_pool, v_pool, table, lens


def check(out, lse, q, k_dense, v_dense, scale, dtype) -> float:
    """Max abs error of the first two sequences against float64 attention; exits if too large."""
    n = min(2, q.shape[0])
    qd = q[:n].double().reshape(n, HKV, GQA, HEAD_DIM)
    s = qd @ k_dense[:n].double().transpose(-1, -2) * scale                 # [n, Hkv, G, S]
    ref = (torch.softmax(s, dim=-1) @ v_dense[:n].double()).reshape(n, HKV * GQA, HEAD_DIM)
    ref_lse = torch.logsumexp(s, dim=-1).reshape(n, HKV * GQA)
    err = (out[:n].double() - ref).abs().max().item()
    lse_err = (lse[:n].double() - ref_lse).abs().max().item()
    if err > TOLERANCE[dtype] or lse_err > 1e-3 or out.isnan().any():
        raise SystemExit(f"paged_attention_triton is wrong here (out error {err:.2e}, lse error "
                         f"{lse_err:.2e}, tolerance {TOLERANCE[dtype]:.0e}); not timing it")
    return err


def copy_bandwidth(do_bench) -> float:
    """Device-to-device copy of 2 GiB, (read + written bytes) / time, in GB/s."""
    src = torch.empty(1 << 30, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / ms / 1e6


def bench(batch, tokens, bs, dtype, copy_gbs, do_bench, do_bench_cudagraph, gen, launch=DEFAULT_LAUNCH) -> dict:
    q, k_pool, v_pool, table, lens = make_selection(batch, tokens, bs, dtype, gen)
    scale = 1 / math.sqrt(HEAD_DIM)
    flat = table.long()                                                       # [B, Hkv, NB]
    k_dense = k_pool[flat].reshape(batch, HKV, tokens, HEAD_DIM)            # gathered, contiguous
    v_dense = v_pool[flat].reshape(batch, HKV, tokens, HEAD_DIM)
    ours = lambda: paged_attention_triton(q, k_pool, v_pool, table, lens, scale, launch=launch)
    err = check(*ours(), q, k_dense, v_dense, scale, dtype)
    q_model = q.unsqueeze(2)                                                  # [B, Hq, 1, D]
    q_packed = q.reshape(batch, HKV, GQA, HEAD_DIM)                           # [B, Hkv, G, D]
    fns = {
        "ours": ours,
        "model": lambda: F.scaled_dot_product_attention(q_model, k_dense, v_dense, scale=scale, enable_gqa=True),
        "packed": lambda: F.scaled_dot_product_attention(q_packed, k_dense, v_dense, scale=scale),
        "gather": lambda: paged_attention_torch(q, k_pool, v_pool, table, lens, scale),
    }
    ms = {name: do_bench(fn, return_mode="median") for name, fn in fns.items()}
    graph_ms = do_bench_cudagraph(ours, return_mode="median")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(100):                    # host time per call: what a launch costs the CPU
        ours()
    host_us = (time.perf_counter() - start) * 1e4
    torch.cuda.synchronize()
    nbytes = 2 * k_dense.numel() * k_dense.element_size()
    gbs = nbytes / ms["ours"] / 1e6
    return {
        "batch": batch, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "block": bs,
        "ms": ms["ours"], "GB/s": gbs, "copy GB/s": copy_gbs, "of copy": gbs / copy_gbs,
        "graph ms": graph_ms, "of copy (graph)": nbytes / graph_ms / 1e6 / copy_gbs, "host us": host_us,
        "x SDPA(gqa)": ms["model"] / ms["ours"], "x SDPA(packed)": ms["packed"] / ms["ours"],
        "x gather": ms["gather"] / ms["ours"], "max err": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--launch", help="a JSON file of LaunchConfig fields (tune_gpu_attention.py --json)")
    args = parser.parse_args()
    launch = DEFAULT_LAUNCH
    if args.launch:
        with open(args.launch) as f:
            launch = LaunchConfig(**json.load(f))
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_attention needs a CUDA GPU and torch.cuda.is_available() is False "
                         "here; on a CPU-only machine run benchmarks/bench_cpu_attention.py")
    from triton.testing import do_bench, do_bench_cudagraph

    print(f"{torch.cuda.get_device_name()}; Hkv {HKV}, GQA {GQA}, head_dim {HEAD_DIM}, one query token; {launch}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_gbs = copy_bandwidth(do_bench)
    rows = []
    for dt in args.dtypes:
        for bs in args.blocks:
            for batch in args.batches:
                for tokens in args.tokens:
                    if batch * tokens > 8 * 65536:      # pools, dense copies, gather baseline: < ~35 GB
                        continue
                    rows.append(bench(batch, tokens, bs, getattr(torch, dt), copy_gbs, do_bench,
                                       do_bench_cudagraph, gen, launch))
                    torch.cuda.empty_cache()
    floatfmt = ("", "", "", "", ".3f", ".0f", ".0f", ".2f", ".3f", ".2f", ".0f", ".2f", ".2f", ".2f", ".0e")
    print(tabulate(rows, headers="keys", floatfmt=floatfmt, tablefmt="github"))


if __name__ == "__main__":
    main()
