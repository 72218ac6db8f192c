"""Decode step time of SmolLM2-135M with the rest of the model run eagerly or compiled by Inductor
(the ``compile_rest`` option), in one process, A/B interleaved step by step.

    python benchmarks/compile_rest.py                        # 512 tokens x batch 1 and 4
    python benchmarks/compile_rest.py --context 2048 --batches 1 --reps 3 --steps 32

Everything that is not a ``kvdrive::`` op (projections, norms, rotary embeddings, MLPs, the LM
head) runs op by op in PyTorch with ``compile_rest="eager"``, and as Inductor's kernels with
``"inductor"``. Both compiled forwards share one runtime (``compile_rest`` is not part of its
key). Per batch size each mode first compiles and warms up (``first run s``: Dynamo, the
passes and, for Inductor, its compile, plus a prefill and two steps). Then each repetition
prefills a fresh cache per mode and decodes ``--steps`` greedy steps, the two modes' steps
alternating (A B, B A, ...): this project's machine is shared, and its speed swings up to 10x
within seconds, so only steps taken side by side compare. The table gives per mode the median
step, the median of the per-pair ratios (eager step / inductor step next to it), the kvdrive
ops' time in a step (the runtime's stage seconds: append, select, attention, merge...) and the
rest. Options: the default token budget, no device or host limit.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from tabulate import tabulate
from transformers import DynamicCache

import kvdrive_compile
from kvdrive_compile import models
from kvdrive_compile.bench.runner import prefill
from kvdrive_compile.prompts import passkey_prompt

MODES = ("eager", "inductor")


def prompt_batch(tok, context: int, batch: int) -> torch.Tensor:
    """``[batch, context]`` token ids: passkey prompts of other seeds, cut to one length (no padding)."""
    rows = []
    for seed in range(batch):
        text, _ = passkey_prompt(tok, context + 64, seed=seed)
        ids = tok(text, return_tensors="pt").input_ids[0]
        if ids.numel() < context:
            raise SystemExit(f"the prompt has {ids.numel()} tokens, fewer than --context {context}")
        rows.append(ids[:context])
    return torch.stack(rows)


def stage_seconds() -> float:
    """The kvdrive ops' time on the calling thread so far, over every runtime."""
    return sum(sum(st.stage_seconds.values()) for st in kvdrive_compile.all_stats())


class Decoder:
    """One greedy generation of one mode, a step at a time."""

    def __init__(self, forward, model, ids: torch.Tensor):
        self.forward, self.cache = forward, DynamicCache(config=model.config)
        t0 = time.perf_counter()
        self.token = prefill(forward, self.cache, ids).argmax(-1, keepdim=True)
        self.prefill_seconds = time.perf_counter() - t0
        self.tokens = [self.token]

    def step(self) -> tuple[float, float]:
        """(wall seconds, kvdrive ops' seconds) of one decode step."""
        ops0, t0 = stage_seconds(), time.perf_counter()
        logits = self.forward(self.token, cache=self.cache, logits_to_keep=1).logits
        wall = time.perf_counter() - t0
        self.token = logits[:, -1].argmax(-1, keepdim=True)
        self.tokens.append(self.token)
        return wall, stage_seconds() - ops0


def measure(model, tok, context: int, batch: int, steps: int, reps: int) -> list[dict]:
    ids = prompt_batch(tok, context, batch)
    forwards, first = {}, {}
    for mode in MODES:
        forwards[mode] = torch.compile(model.forward, backend="kvdrive", options={"compile_rest": mode})
        t0 = time.perf_counter()
        warm = Decoder(forwards[mode], model, ids)
        warm.step(), warm.step()
        first[mode] = time.perf_counter() - t0
        del warm
    walls, ops, prefills, ratios, same = {m: [] for m in MODES}, {m: [] for m in MODES}, {m: [] for m in MODES}, [], True
    for _ in range(reps):
        decoders = {m: Decoder(forwards[m], model, ids) for m in MODES}
        for i in range(steps):
            pair = {}
            for m in MODES if i % 2 == 0 else MODES[::-1]:
                pair[m], op = decoders[m].step()
                walls[m].append(pair[m])
                ops[m].append(op)
            ratios.append(pair["eager"] / pair["inductor"])
        for m in MODES:
            prefills[m].append(decoders[m].prefill_seconds)
        same &= torch.equal(torch.cat(decoders["eager"].tokens, 1), torch.cat(decoders["inductor"].tokens, 1))
        del decoders
        kvdrive_compile.collect()
    rows = []
    for m in MODES:
        step, op = statistics.median(walls[m]), statistics.median(ops[m])
        rows.append({"batch": batch, "context": context, "compile_rest": m, "step ms": 1e3 * step,
                     "p10..p90 ms": f"{1e3 * _quantile(walls[m], 0.1):.0f}..{1e3 * _quantile(walls[m], 0.9):.0f}",
                     "eager / this (paired)": statistics.median(ratios) if m == "inductor" else 1.0,
                     "kvdrive ops ms": 1e3 * op, "rest ms": 1e3 * (step - op),
                     "prefill s": statistics.median(prefills[m]), "first run s": first[m],
                     "tokens as eager": "yes" if same else "no"})
    return rows


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=10)[round(q * 10) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=512, help="prompt tokens per sequence")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per generation")
    parser.add_argument("--reps", type=int, default=5, help="generations per mode")
    args = parser.parse_args()
    # two modes x (prefill, decode) x (batch 1, batch > 1) graphs of one forward: 8, Dynamo's
    # default limit, which a ninth would pass silently (an eager frame); this script needs more
    torch._dynamo.config.recompile_limit = 64
    model, tok = models.load("smollm2-135m")
    print(f"SmolLM2-135M fp32, {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}; {args.steps} steps x {args.reps} generations per mode, steps alternated")
    rows = []
    with torch.no_grad():
        for batch in args.batches:
            rows += measure(model, tok, args.context, batch, args.steps, args.reps)
            print(tabulate(rows[-2:], headers="keys", floatfmt=".2f", tablefmt="github"), flush=True)
    c = kvdrive_compile.counters
    print(f"\ngraphs {c.graphs}, by Inductor {c.inductor_graphs} ({c.inductor_seconds:.0f} s), "
          f"Inductor fallbacks {c.inductor_fallbacks} {c.fallback_reasons}")
    print(tabulate(rows, headers="keys", floatfmt=".2f", tablefmt="github"))


if __name__ == "__main__":
    main()
