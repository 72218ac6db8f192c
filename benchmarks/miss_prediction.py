"""How predictable are a decode step's cache misses? (the pipeline issue's ahead-of-need movement)

A *miss* here is a block a ranked layer selects at step t+1 that it selected in none of the
last ``--window`` steps (a cache that keeps what the reuse window saw does not hold it). Two
predictors that could start reading it before step t+1 asks, and what each would read:

- near the cut: the block ranked within ``k + m`` at step t (k: the blocks a row selects), for
  margins m = k/8 .. k; reading them ahead costs up to m extra blocks per row and step;
- the layer below: the block is in layer l-1's selection at step t+1 (same row, same position);
  reading those ahead costs the blocks of that selection the window has not seen.

SmolLM2-135M (the GGUF wheel), pass-key prompts, kvdrive with ``token_budget`` and everything
else default. Prints the share of misses each predictor had, and its cost per row and step:
a predictor is worth building only where it catches most misses for few extra reads.

    python benchmarks/miss_prediction.py --context 4096 --batch 2 --budget 512 --steps 12
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch

from kvdrive_compile import models
from kvdrive_compile.bench.runner import batch_prompts
from kvdrive_compile.runtime import site_step


def record_selections(context: int, batch: int, budget: int, steps: int) -> dict[int, list]:
    """Per ranked layer, each decode step's (selected ids ``[rows, n]``, scores ``[rows, nb]``)."""
    model, tok = models.load("smollm2-135m")
    ids = batch_prompts(tok, context, batch)
    seen: dict[int, list] = defaultdict(list)
    select = site_step.select_scored

    def recording(kv, policy, q, start, end, scale=1.0):
        selected, scores = select(kv, policy, q, start, end, scale)
        if scores is not None and q.shape[2] == 1:
            seen[kv.layer].append((selected.clone(), scores.clone()))
        return selected, scores

    site_step.select_scored = recording
    try:
        model.compile(backend="kvdrive", options={"token_budget": budget})
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                           min_new_tokens=steps, do_sample=False)
    finally:
        site_step.select_scored = select
    return seen


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each block's rank in one row's scores (0: best)."""
    order = torch.argsort(torch.nan_to_num(scores, neginf=-1e30), descending=True)
    out = torch.empty_like(order)
    out[order] = torch.arange(order.numel())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--budget", type=int, default=512, help="token_budget (tokens per row and step)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--window", type=int, default=4, help="steps of selection a cache keeps (reuse_window)")
    args = ap.parse_args()
    seen = record_selections(args.context, args.batch, args.budget, args.steps)
    k = args.budget // 16
    margins = [max(1, k // 8), k // 4, k // 2, k]
    caught, below_caught, below_cost, misses_per_row, total = defaultdict(int), 0, [], [], 0
    layers = sorted(seen)
    for li, layer in enumerate(layers):
        steps = seen[layer]
        for t in range(args.window, len(steps) - 1):
            selected_next = steps[t + 1][0]
            scores_now = steps[t][1]
            for r in range(selected_next.shape[0]):
                recent = set().union(*(set(steps[j][0][r].tolist()) for j in range(t - args.window + 1, t + 1)))
                new = [b for b in selected_next[r].tolist() if b not in recent and b < scores_now.shape[1]]
                misses_per_row.append(len(new))
                if not new:
                    continue
                total += len(new)
                rank = ranks(scores_now[r])
                for m in margins:
                    caught[m] += sum(1 for b in new if rank[b] < k + m)
                if li and t + 1 < len(seen[layers[li - 1]]):
                    below = set(seen[layers[li - 1]][t + 1][0][r].tolist())
                    below_caught += sum(1 for b in new if b in below)
                    below_cost.append(len(below - recent))
    print(f"SmolLM2-135M, {args.context} tokens x {args.batch}, token budget {args.budget} ({k} blocks a row), "
          f"reuse window {args.window}, {args.steps} decode steps")
    print(f"misses per row and step: {statistics.mean(misses_per_row):.2f} of {k} selected blocks")
    for m in margins:
        print(f"  ranked within k+{m} at the step before: {caught[m] / max(total, 1):.0%} of misses "
              f"(reads up to {m} blocks a row ahead)")
    if below_cost:
        print(f"  in the layer below's selection: {below_caught / max(total, 1):.0%} of misses "
              f"(reads {statistics.mean(below_cost):.1f} blocks a row ahead)")


if __name__ == "__main__":
    main()
