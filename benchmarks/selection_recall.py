"""How much attention the block selection keeps, and what it does to answers, on a real model.

    python benchmarks/selection_recall.py --length 8192 --tasks niah_repeat multikey --budget 1024

An offline simulation of the decode-step selection, outside the compiler: the model runs eagerly
with an attention function that, at each decode step and layer past the dense ones, scores the
cached blocks exactly as the runtime does (kvdrive_compile.runtime.selection.rank_blocks over
the same block summaries), keeps the sink, the local window and the top blocks within the
budget, and attends only those. Against the true attention of the step it records the share of
attention mass the selection keeps ("recall"), next to the oracle (the blocks with the most true
mass, same budget). The prefill is exact and shared by every scorer. Prints, per scorer, the
task scores and the recall (mean and the worst layer's mean).

Two shortcuts that save ranking work (the overlapped-pipeline issue's candidates) run as scorers
too, over the default scorer ("qkeys+max"):

- ``reuse@T``: a (sequence, KV head) re-ranks only when the cosine similarity of one of its
  query heads to the query it last ranked with falls below T (FreeKV); otherwise it keeps those
  scores (blocks completed since then are in the local window: at most ``local - block`` steps).
- ``share``: layers pair up after the dense ones (2-3, 4-5, ...); the second of a pair attends the
  blocks the first selected (IndexCache).

- ``coarse@M``: two stages (score coarse before fine): Quest's per-block bound (``minmax+max``,
  1/16 of the 2-bit keys' multiply-adds at block 16) picks ``M`` times the budget's free blocks as candidates, and
  ``qkeys+max`` ranks only those.

Their rows also give ``ranked``: the share of (row, layer, step) rankings still done (for
``coarse@M``: of the blocks the 2-bit keys score).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import defaultdict

import torch
from tabulate import tabulate
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvdrive_compile import models
from kvdrive_compile.eval.tasks import make_sample, score
from kvdrive_compile.runtime.selection import SCORERS, SelectionPolicy, rank_blocks

DEFAULT_SCORER = "qkeys+max"
from kvdrive_compile.runtime.summaries import BlockSummaries


class Simulation:
    """The selection applied in eager attention; the active scorer and the recall it reached."""

    def __init__(self, budget: int, block_size: int = 16, sink: int = 4, local: int = 64, dense_layers: int = 2):
        self.budget, self.bs, self.sink, self.local, self.dense_layers = budget, block_size, sink, local, dense_layers
        self.scorer = None                        # None: exact attention (prefill, dense reference)
        self.recall = defaultdict(list)           # (scorer, layer) -> [mass kept per (kv head, step)]
        self.ranked = defaultdict(list)           # scorer -> [1 per row ranked, 0 per row that was not]
        self.reset()

    def reset(self) -> None:
        """Forget the shortcuts' state (a new generation starts)."""
        self.anchor = {}                          # layer -> (query rows, their scores, context length)
        self.shared = {}                          # layer -> the blocks it selected at this step

    def scores(self, layer: int, query, summaries, nb: int, counts, scaling) -> torch.Tensor:
        """The rows' block scores ``[rows, nb]`` by the active scorer (a shortcut: its own state)."""
        name = self.scorer
        if not name.startswith("reuse@"):
            return rank_blocks(summaries, query, torch.arange(nb), *SCORERS[DEFAULT_SCORER if name == "share" else name],
                               counts, scaling)
        rows = summaries.rows
        qr = query.float().reshape(rows, -1, query.shape[-1])                    # [rows, G, D]
        s_len = int(counts.sum())
        fresh = rank_blocks(summaries, query, torch.arange(nb), *SCORERS[DEFAULT_SCORER], counts, scaling)
        prev = self.anchor.get(layer)
        if prev is None:
            keep = torch.zeros(rows, dtype=torch.bool)
        else:
            q0, s0, len0 = prev
            similar = torch.nn.functional.cosine_similarity(qr, q0, dim=-1).amin(-1) >= float(name[len("reuse@"):])
            keep = similar & (s_len - len0 <= self.local - self.bs)    # what was completed since: in the window
            stale = torch.full_like(fresh, float("-inf"))
            stale[:, :s0.shape[1]] = s0
            fresh = torch.where(keep[:, None], stale, fresh)
            qr = torch.where(keep[:, None, None], q0, qr)
        lens = torch.full((rows,), s_len) if prev is None else torch.where(keep, prev[2], s_len)
        self.ranked[name].extend((~keep).int().tolist())
        self.anchor[layer] = (qr, fresh, lens)
        return fresh

    def coarse(self, query, summaries, nb: int, counts, scaling, forced, k: int) -> torch.Tensor:
        """``coarse@M``: the 2-bit keys' scores of the ``M * k`` blocks with the best bounds
        (forced blocks aside), -inf elsewhere."""
        ids = torch.arange(nb)
        bound = rank_blocks(summaries, query, ids, *SCORERS["minmax+max"], counts, scaling)
        free = int((~forced).sum())
        n_cand = SelectionPolicy(coarse_candidates=float(self.scorer[len("coarse@"):])).candidates(k, free, saves=True) or free
        cand = bound.masked_fill(forced, float("-inf")).topk(n_cand, dim=1).indices
        fine = rank_blocks(summaries, query, ids, *SCORERS[DEFAULT_SCORER], counts, scaling)
        out = torch.full_like(fine, float("-inf"))
        out.scatter_(1, cand, fine.gather(1, cand))
        self.ranked[self.scorer].extend([n_cand / max(1, free)] * summaries.rows)
        return out

    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        if query.shape[2] != 1 or self.scorer is None or module.layer_idx < self.dense_layers:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kw)
        b, hq, _, d = query.shape
        hkv, s_len = key.shape[1], key.shape[2]
        g, bs = hq // hkv, self.bs
        nb = -(-s_len // bs)
        n_budget = self.budget // bs
        qf = query.float().reshape(b, hkv, g, d)
        kf, vf = key.float(), value.float()
        p = torch.softmax(torch.einsum("bhgd,bhsd->bhgs", qf, kf) * scaling, -1)    # [b, hkv, g, S]
        if n_budget >= nb:
            keep = torch.ones(b, hkv, nb, dtype=torch.bool)
        else:
            summaries = BlockSummaries(b * hkv, d, bs, torch.device("cpu"))
            summaries.update(0, kf.reshape(b * hkv, s_len, d))
            forced = torch.zeros(nb, dtype=torch.bool)
            forced[: -(-min(self.sink, s_len) // bs)] = True
            forced[max(0, s_len - self.local) // bs:] = True
            counts = torch.clamp(torch.minimum(torch.arange(nb) * bs + bs, torch.tensor(s_len)) - torch.arange(nb) * bs, min=0)
            k = max(0, n_budget - int(forced.sum()))
            mass = torch.nn.functional.pad(p, (0, nb * bs - s_len)).reshape(b, hkv, g, nb, bs).sum(-1)
            layer = module.layer_idx
            second = (layer - self.dense_layers) % 2 == 1
            if self.scorer == "share" and second and layer - 1 in self.shared:
                keep = self.shared.pop(layer - 1)
                keep[..., forced] = True                                              # this step's window
                self.ranked["share"].extend([0] * (b * hkv))
            else:
                if self.scorer == "oracle":
                    scores = mass.amax(2).reshape(b * hkv, nb)
                elif self.scorer.startswith("coarse@"):
                    scores = self.coarse(query, summaries, nb, counts, scaling, forced, k)
                else:
                    scores = self.scores(layer, query, summaries, nb, counts, scaling)
                top = scores.masked_fill(forced, float("-inf")).topk(k, dim=1).indices
                keep = forced.expand(b * hkv, nb).clone()
                keep.scatter_(1, top, True)
                keep = keep.reshape(b, hkv, nb)
                if self.scorer == "share":
                    self.shared[layer] = keep.clone()
                    self.ranked["share"].extend([1] * (b * hkv))
            kept = (mass * keep[:, :, None]).sum(-1).mean(2).flatten()              # [b * hkv]
            self.recall[(self.scorer, module.layer_idx)].extend(kept.tolist())
        tok = keep.repeat_interleave(bs, -1)[..., :s_len]                             # [b, hkv, S]
        q_p = p * tok[:, :, None]
        out = torch.einsum("bhgs,bhsd->bhgd", q_p / q_p.sum(-1, keepdim=True), vf)
        return out.reshape(b, hq, 1, d).transpose(1, 2).to(query.dtype), None


@torch.no_grad()
def greedy_from(model, cache, logits, max_new_tokens: int, eos: set[int]) -> list[int]:
    out = []
    while True:
        token = int(logits.argmax())
        out.append(token)
        if token in eos or len(out) >= max_new_tokens:
            return out
        logits = model(torch.tensor([[token]]), past_key_values=cache, logits_to_keep=1).logits[0, -1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--tasks", nargs="+", default=["niah_repeat", "niah_essay", "multikey", "passkey"])
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--scorers", nargs="+", default=["exact", "oracle", *SCORERS],
                        help=f"exact, oracle (true attention mass), summary+aggregation: {list(SCORERS)}, "
                             "or a shortcut over qkeys+max: reuse@T (T: a cosine similarity), share, coarse@M (M: candidates per "
                             "free budget block)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sim = Simulation(args.budget, block_size=args.block_size)
    AttentionInterface.register("kvdrive_simulation", sim.attend)
    model, tok = models.load(args.model)
    model.set_attn_implementation("kvdrive_simulation")
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    results = defaultdict(dict)
    for task in args.tasks:
        for i in range(args.samples):
            sample = make_sample(task, tok, args.length, i, args.samples)
            ids = torch.tensor([tok(sample.prompt).input_ids])
            sim.scorer = None
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                logits = model(ids, past_key_values=cache, logits_to_keep=1).logits[0, -1]
            for scorer in args.scorers:
                sim.scorer = None if scorer == "exact" else scorer
                sim.reset()
                out = greedy_from(model, copy.deepcopy(cache), logits, sample.max_new_tokens, eos)
                text = tok.decode(out, skip_special_tokens=True)
                results[scorer][f"{task}#{i}"] = score(sample.answers, text)
                print(f"{task}#{i} {scorer:>12}: {score(sample.answers, text):.2f} {text!r} (want {sample.answers})",
                      file=sys.stderr)
    rows = []
    for scorer in args.scorers:
        per_layer = {layer: sum(v) / len(v) for (s, layer), v in sim.recall.items() if s == scorer}
        row = {"scorer": scorer, **results[scorer],
               "avg score": 100 * sum(results[scorer].values()) / max(1, len(results[scorer]))}
        if per_layer:
            row["recall"] = sum(per_layer.values()) / len(per_layer)
            row["worst layer"] = min(per_layer.values())
            row["worst row-step"] = min(min(v) for (s, _), v in sim.recall.items() if s == scorer)
        if sim.ranked.get(scorer):
            row["ranked"] = sum(sim.ranked[scorer]) / len(sim.ranked[scorer])
        rows.append(row)
    print(f"{args.model}, {args.length} tokens, budget {args.budget} (block {args.block_size}, sink 4, "
          "window 64, 2 dense layers)")
    print(tabulate(rows, headers="keys", floatfmt=".3f", tablefmt="github"))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
