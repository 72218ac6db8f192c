"""Cost of scoring the blocks at one decode step, per layer: the select stage's work.

    python benchmarks/bench_block_scores.py [--contexts 8192 32768 131072] [--device cuda]

Summaries of ``context`` tokens for one sequence with Hkv KV heads (head_dim, GQA as given;
default a Llama-3-8B layer: 8 KV heads, GQA 4, head_dim 128, block 16), scored for one decode
token by each block summary (runtime/summaries.py). The qkeys scores come from the numba kernel
on the CPU and the Triton kernel on CUDA ("qkeys kernel (...)": the kernel called directly, at
both dot precisions and a few launches); "qkeys (torch twin)" is the torch version. Prints the
median time per call (synchronized), the qkeys bytes read per second, and the summary bytes per
token.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate

from kvdrive_compile.kernels.block_scores import qkeys_log_mass_torch, qkeys_log_mass_triton
from kvdrive_compile.runtime.summaries import BlockSummaries, summary_bytes_per_token


def timed(fn, device: torch.device, reps: int = 20) -> float:
    fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--gqa", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    hkv, d, bs = args.kv_heads, args.head_dim, args.block_size
    rows = []
    for n in args.contexts:
        s = BlockSummaries(hkv, d, bs, device)
        s.update(0, torch.randn(hkv, n, d, device=device))
        q = torch.randn(1, hkv * args.gqa, 1, d, device=device)
        nb = n // bs
        ids = torch.arange(nb)                            # on the host, as the runtime passes them
        counts = torch.full((nb,), bs)
        ids_dev = ids.to(device)
        fns = {kind: (lambda kind=kind: s.scores(q, ids, kind, counts, d ** -0.5)) for kind in ("minmax", "mean", "qkeys")}
        qr = q.reshape(hkv, args.gqa, d)
        fns["qkeys (torch twin)"] = lambda: qkeys_log_mass_torch(s.codes, s.kmin, s.kmax, qr, ids_dev, d ** -0.5)
        if device.type == "cuda":       # the kernel alone, without the summary's own bookkeeping
            for precision, pps, stages in [("tf32", 8, 3), ("tf32", 16, 2), ("ieee", 8, 3), ("ieee", 8, 2)]:
                fns[f"qkeys kernel ({precision}, {pps}/SM, {stages} stages)"] = (
                    lambda p=precision, a=pps, b=stages: qkeys_log_mass_triton(
                        s.codes, s.kmin, s.kmax, qr, ids_dev, d ** -0.5, precision=p, programs_per_sm=a, num_stages=b))
        read = hkv * nb * (bs * s.codes.shape[-1] + 2 * d * 2)     # qkeys bytes read: codes, kmin, kmax (fp16)
        for kind, fn in fns.items():
            sec = timed(fn, device)
            rows.append({"context": n, "summary": kind, "ms per layer": sec * 1e3,
                         "us per 1K tokens": sec * 1e6 / (n / 1024),
                         "qkeys GB/s": read / sec / 1e9 if kind.startswith("qkeys") else None})
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"{name}; Hkv {hkv}, GQA {args.gqa}, head_dim {d}, block {bs}; summaries "
          f"{summary_bytes_per_token(d, bs):.0f} bytes per token and KV head")
    print(tabulate(rows, headers="keys", floatfmt=".3f", tablefmt="github"))


if __name__ == "__main__":
    main()
