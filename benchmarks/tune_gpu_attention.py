"""Sweep the Triton paged kernel's launch (kernels/paged_attention.py LaunchConfig) on one GPU.

    python benchmarks/tune_gpu_attention.py [--json best.json]

For a few decode shapes (fp16, block 16, Hkv 8, GQA 4, head_dim 128) every launch config is
checked against float64 attention and timed (do_bench median); the table gives each config's
fraction of the device-to-device copy bandwidth measured in the same run, per shape and as a
geometric mean, best first. ``--json`` writes the best config for bench_gpu_attention.py --launch.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))    # bench_gpu_attention, also under python -P
from bench_gpu_attention import HEAD_DIM, check, copy_bandwidth, make_selection
from tabulate import tabulate

from kvdrive_compile.kernels.paged_attention import LaunchConfig, paged_attention_triton

SHAPES = [(8, 4096), (8, 16384), (8, 65536), (32, 16384)]        # (batch, selected tokens per head)
GRID = dict(tile_bytes=[8192, 16384, 32768], programs_per_sm=[4, 8, 16, 32], num_warps=[4], num_stages=[2, 3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the best config here")
    parser.add_argument("--grid", type=json.loads, default={},
                        help='JSON overriding some of the grid\'s lists, e.g. \'{"num_stages": [2]}\'')
    args = parser.parse_args()
    grid = {**GRID, **args.grid}
    from triton.testing import do_bench

    gen = torch.Generator(device="cuda").manual_seed(1)
    copy_gbs = copy_bandwidth(do_bench)
    configs = [LaunchConfig(**dict(zip(grid, values))) for values in itertools.product(*grid.values())]
    scale = 1 / math.sqrt(HEAD_DIM)
    frac = {c: [] for c in configs}
    for batch, tokens in SHAPES:
        q, k_pool, v_pool, table, lens = make_selection(batch, tokens, 16, torch.float16, gen)
        flat = table.long()
        k_dense = k_pool[flat].reshape(batch, 8, tokens, HEAD_DIM)
        v_dense = v_pool[flat].reshape(batch, 8, tokens, HEAD_DIM)
        nbytes = 2 * k_dense.numel() * k_dense.element_size()
        for c in configs:
            fn = lambda: paged_attention_triton(q, k_pool, v_pool, table, lens, scale, launch=c)  # noqa: E731
            check(*fn(), q, k_dense, v_dense, scale, torch.float16)
            ms = do_bench(fn, return_mode="median")
            frac[c].append(nbytes / ms / 1e6 / copy_gbs)
        del q, k_pool, v_pool, k_dense, v_dense
        torch.cuda.empty_cache()
    rows = [{**dataclasses.asdict(c), **{f"{b}x{t // 1024}K": f for (b, t), f in zip(SHAPES, fs)},
             "geomean": math.exp(sum(map(math.log, fs)) / len(fs))} for c, fs in frac.items()]
    rows.sort(key=lambda r: -r["geomean"])
    print(f"{torch.cuda.get_device_name()}: fraction of copy bandwidth ({copy_gbs:.0f} GB/s), fp16, block 16")
    print(tabulate(rows[:12], headers="keys", floatfmt=".2f", tablefmt="github"))
    print("best at 8x4K:", max(rows, key=lambda r: r["8x4K"]))
    default_launch = dataclasses.replace(LaunchConfig(), num_warps=LaunchConfig().num_warps or 4)  # head_dim 128
    default = [r for r in rows if LaunchConfig(**{k: r[k] for k in grid}) == default_launch]
    print("current default:", default[0] if default else f"{default_launch} (not in the grid)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: rows[0][k] for k in grid}, f)


if __name__ == "__main__":
    main()
