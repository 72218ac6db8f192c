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
import os
import statistics
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
DEVICE = "cuda"             # "cpu" (with TRITON_INTERPRET=1): a dry run of this code before a GPU is spent on it
TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2.5e-2}   # q and p are rounded to the pool dtype


def make_selection(batch: int, tokens: int, bs: int, dtype: torch.dtype, gen: torch.Generator):
    """Pools twice the selection, the selected blocks at random slots, filled with randn."""
    nb = tokens // bs
    num_slots = 2 * batch * HKV * nb
    k_pool = torch.empty(num_slots, bs, HEAD_DIM, dtype=dtype, device=DEVICE)
    v_pool = torch.empty_like(k_pool)
    table = torch.randperm(num_slots, generator=gen, device=DEVICE)[: batch * HKV * nb]
    table = table.reshape(batch, HKV, nb).int()
    flat = table.flatten().long()
    k_pool[flat] = torch.randn(flat.numel(), bs, HEAD_DIM, generator=gen, device=DEVICE).to(dtype)
    v_pool[flat] = torch.randn(flat.numel(), bs, HEAD_DIM, generator=gen, device=DEVICE).to(dtype)
    lens = torch.full_like(table, bs)
    q = torch.randn(batch, HKV * GQA, HEAD_DIM, generator=gen, device=DEVICE).to(dtype)
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
    src = torch.empty(1 << 30, dtype=torch.float16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / ms / 1e6


def host_cost_us(fn, calls: int = 100, rounds: int = 7) -> float:
    """CPU time one call of ``fn`` takes to launch: median over ``rounds`` of ``calls`` calls
    back to back, with no synchronization inside a round (so the GPU's time is not in it)."""
    per_call = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(per_call)


def host_profile(batch, tokens, bs, dtype, copy_gbs, do_bench, do_bench_cudagraph, gen) -> list[dict]:
    """The host cost of one call, part by part, and the whole call with the kernels launched
    directly (kernels/triton_launcher.py) against through Triton's binder. Checks first that
    both give the same bits and that those are right."""
    from kvdrive_compile.kernels import paged_attention as pa
    from kvdrive_compile.kernels.paged_layout import check_paged_args
    from kvdrive_compile.kernels.triton_launcher import DIRECT_LAUNCH_ENV, _arg_key
    from kvdrive_compile.kernels.triton_paged import merge_kernel, split_kernel

    q, k_pool, v_pool, table, lens = make_selection(batch, tokens, bs, dtype, gen)
    scale = 1 / math.sqrt(HEAD_DIM)
    flat = table.long()
    k_dense = k_pool[flat].reshape(batch, HKV, tokens, HEAD_DIM)
    v_dense = v_pool[flat].reshape(batch, HKV, tokens, HEAD_DIM)
    nbytes = 2 * k_dense.numel() * k_dense.element_size()
    ours = lambda: pa.paged_attention_triton(q, k_pool, v_pool, table, lens, scale)
    modes = {"direct": "1", "binder": "0"}
    results = {}
    for mode, env in modes.items():
        os.environ[DIRECT_LAUNCH_ENV] = env
        for _ in range(3):                          # the first call compiles/keeps the kernel
            results[mode] = ours()
    torch.cuda.synchronize()
    check(*results["direct"], q, k_dense, v_dense, scale, dtype)
    same = all(torch.equal(a, b) for a, b in zip(results["direct"], results["binder"]))
    split, merge = pa._launchers()
    if split.fallback_reason or merge.fallback_reason or split.direct_launches == 0:
        print(f"direct launch not in use: {split.fallback_reason or merge.fallback_reason}")

    # the parts, with the arguments the whole call builds
    plan = pa._plan(q.shape, k_pool.shape, k_pool.dtype, table.shape, pa.DEFAULT_LAUNCH, q.device, False)
    nsplit = plan.nsplit
    out, lse = pa._out_and_lse(q.shape, q.device, False)
    part_out, part_lse = pa._out_and_lse(plan.scratch_shape, q.device, False)
    q_rows = q.reshape(plan.split_grid[0], plan.r, HEAD_DIM)
    split_args = (q_rows, k_pool, v_pool, table, lens, part_out, part_lse, scale * pa._LOG2E, *plan.split_ints)
    split_kw = {**plan.split_constexprs, **plan.split_options}
    merge_args = (part_out, part_lse, out, lse, *plan.merge_ints)
    merge_kw = {**plan.merge_constexprs, **plan.merge_options}
    os.environ[DIRECT_LAUNCH_ENV] = "1"
    kept, tail = next(reversed(split._compiled.values())) if split._compiled else (None, ())
    runner = kept[plan.split_grid + (1,)] if kept is not None else lambda *args: None
    parts = {
        "check_paged_args": lambda: check_paged_args(q, k_pool, v_pool, table, lens),
        "plan (cached)": lambda: pa._plan(q.shape, k_pool.shape, k_pool.dtype, table.shape, pa.DEFAULT_LAUNCH,
                                          q.device, os.environ.get("TRITON_INTERPRET") == "1"),
        "out and lse (2 x torch.empty)": lambda: pa._out_and_lse(q.shape, q.device, False),
        "split launch, binder": lambda: split_kernel[plan.split_grid](*split_args, **split_kw),
        "split launch, direct": lambda: split(plan.split_grid, split_args, plan.split_constexprs, plan.split_options),
        "split launch, kept kernel alone": lambda: runner(*split_args, *tail),
        "split launch key": lambda: _arg_key(split_args),
        "merge launch, binder": lambda: merge_kernel[plan.merge_grid](*merge_args, **merge_kw),
        "merge launch, direct": lambda: merge(plan.merge_grid, merge_args, plan.merge_constexprs, plan.merge_options),
    }
    rows = [{"part": name, "host us": host_cost_us(fn)} for name, fn in parts.items()]
    whole = {mode: {"host us": [], "ms": [], "graph ms": []} for mode in modes}
    for _ in range(3):                              # alternated: the host's speed drifts
        for mode, env in modes.items():
            os.environ[DIRECT_LAUNCH_ENV] = env
            whole[mode]["host us"].append(host_cost_us(ours))
            whole[mode]["ms"].append(do_bench(ours, return_mode="median"))
            whole[mode]["graph ms"].append(do_bench_cudagraph(ours, return_mode="median"))
    for mode, got in whole.items():
        host_us, ms, graph_ms = (statistics.median(got[k]) for k in ("host us", "ms", "graph ms"))
        rows.append({"part": f"whole call, {mode}", "host us": host_us, "ms": ms,
                     "of copy": nbytes / ms / 1e6 / copy_gbs, "graph ms": graph_ms,
                     "of copy (graph)": nbytes / graph_ms / 1e6 / copy_gbs})
    os.environ[DIRECT_LAUNCH_ENV] = "1"
    print(f"batch {batch} x {tokens} tokens, {str(dtype).removeprefix('torch.')}, block {bs}, {nsplit} splits; "
          f"direct and binder give the same bits: {same}")
    return rows


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
    host_us = host_cost_us(ours)
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
    parser.add_argument("--host-profile", action="store_true",
                        help="instead of the table: the host cost of one call, part by part, at the first "
                             "batch/tokens/block/dtype given, direct launch against Triton's binder")
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
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    copy_gbs = copy_bandwidth(do_bench)
    if args.host_profile:
        rows = host_profile(args.batches[0], args.tokens[0], args.blocks[0], getattr(torch, args.dtypes[0]),
                            copy_gbs, do_bench, do_bench_cudagraph, gen)
        print(tabulate(rows, headers="keys", floatfmt=".3f", tablefmt="github"))
        return
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
