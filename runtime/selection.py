"""Which blocks a step attends, per (sequence, kv_head), within a token budget."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .device_copies import to_device, to_host
from .layer_kv import LayerKV
from .tiers import Tier


# The default token budget (README, "Accuracy harness"): 512 was the smallest of 256/512/1024/2048
# within 1 point of dense at 8K tokens on SmolLM2-135M, but it lost the multi-key task at 4K;
# 1024 equalled dense at 2K, 4K and 8K on SmolLM2 and at 8K and 16K on Gemma 3 270M.
# Pass token_budget=None for exact attention.
DEFAULT_TOKEN_BUDGET = 1024
# What a block already in place adds to its estimated log attention mass when blocks are ranked
# (SelectionPolicy.reuse_bonus). In a simulation on SmolLM2's recorded selections (4K x 2, budget
# 512), the blocks a step selects that the reuse window had not seen fell from 17 % to 7.5 % at
# 1 nat and 3.5 % at 2, while the estimated attention mass left out grew from 0.94 % of a row's to
# 0.95 % and 0.97 % on average. Measured with 2 nats (benchmarks/RESULTS.md, "Selection that knows
# where blocks lie"): the pipeline preset's three-tier step 559 -> 309 ms in one run, and the
# accuracy harness with three tiers at 8K equal to dense on every item.
DEFAULT_REUSE_BONUS = 2.0
# Candidates per block left to choose that Quest's bound passes on to the 2-bit keys' scores
# (SelectionPolicy.coarse_candidates), where the ranking runs on the CPU ("auto"). 4 at 8K tokens
# scores 46 % of the blocks and kept 0.956 of the attention mass against 0.958 (2 per block lost
# a needle at 2K with a 512 budget); the accuracy harness gave dense's answers with it on every
# item of SmolLM2 at 8K and Gemma 3 270M at 4K-16K (benchmarks/RESULTS.md, "Scoring coarse
# before fine" and "Coarse before fine by default on the CPU").
DEFAULT_COARSE_CANDIDATES = 4.0


@dataclass(frozen=True)
class SelectionPolicy:
    """What each decode step attends (the user passes these fields as flat compile options).

    token_budget: tokens per (sequence, kv_head) and step (int), a fraction of the context
    (float in (0, 1]), or None for every token (exact attention); default
    ``DEFAULT_TOKEN_BUDGET``, so contexts up to about that many tokens stay exact.
    sink_tokens, local_window: always attended, the first and the last tokens. dense_layers:
    the first layers stay exact. block_summary:
    "qkeys" (every key at 2 bits within its block's min/max: per-token estimates of q.k),
    "minmax" (Quest's per-channel bound of q.k) or "mean" (the mean key). score_aggregation:
    how the query heads of a KV head combine their block scores, "max" (of the estimated log
    attention masses) or "prob" (of each head's estimated attention share; see
    ``rank_blocks``). selection: "topk" (best-scored blocks, plus sink and local window) or
    "window" (sink and the most recent blocks only: StreamingLLM).
    attention: "split" computes on each tier's blocks where they lie (host and disk blocks on
    the CPU); "fetch" copies every selected host/disk block to the device each step and
    attends there (the FlexGen / InfiniGen designs, kept as baselines).
    reuse_bonus: nats added to the estimated log attention mass of a block the step can read
    without moving it (a copy on the device; half of it for one in host memory) for the
    ranking only: near the cut, where the 2-bit estimates of several blocks are about equal,
    the selection takes what is already in place rather than read another block from disk or
    copy it up. A block ranked out by it had at most e^bonus times the estimated mass of the
    one taken instead. 0: rank by the estimates alone. It changes nothing without tier limits
    (every block on the device gets the same bonus).
    rerank_similarity: a cosine similarity in [0, 1], or None (the default): rank at every step.
    With a value, a (sequence, KV head) keeps the block scores of its last ranking while each of
    its query heads' query stays at least this similar to the query it was ranked with (FreeKV's
    observation: adjacent decode steps' queries are alike), and while every block completed
    since then lies in the local window (attended anyway); the step still takes its own sink,
    local window and reuse bonus. It saves the ranking's work in those rows and changes what is
    selected (benchmarks/RESULTS.md, "Ranking less often").
    coarse_candidates: a number >= 1, None: score every block, or "auto" (the default):
    ``DEFAULT_COARSE_CANDIDATES`` where it saves work (the 2-bit keys' ranking on the CPU,
    ``qkeys`` + ``max``), None elsewhere. With a value M, ranking runs in two stages (coarse
    before fine): Quest's per-block bound (the ``minmax`` summary, max over the query rows, plus
    the reuse bonus) picks M times as many blocks as the budget leaves to choose, and only those
    are scored by ``block_summary``; the others rank below every scored block (score -inf, which
    the cache policy reads too). It saves the 2-bit keys' work on the CPU in proportion (on
    CUDA every block is still scored, one kernel, and only the selection follows a number) and
    changes what is selected.
    """

    token_budget: Optional[Union[int, float]] = DEFAULT_TOKEN_BUDGET
    selection: str = "topk"
    block_summary: str = "qkeys"
    score_aggregation: str = "max"
    sink_tokens: int = 4
    local_window: int = 64
    dense_layers: int = 2
    attention: str = "split"
    reuse_bonus: float = DEFAULT_REUSE_BONUS
    rerank_similarity: Optional[float] = None
    coarse_candidates: Optional[Union[float, str]] = "auto"

    def candidates(self, k: int, free: int, saves: bool) -> int:
        """Blocks the coarse stage keeps when ``k`` of ``free`` are to be chosen: 0 (one
        stage: every block scored) without the option or when it would keep them all. saves:
        whether two stages save work here (the CPU's 2-bit-key ranking), which ``"auto"`` asks."""
        m = self.coarse_candidates
        if m == "auto":
            m = DEFAULT_COARSE_CANDIDATES if saves else None
        if m is None:
            return 0
        n = max(k, math.ceil(m * k))
        return 0 if n >= free else n

    def budget_tokens(self, context: int) -> Optional[int]:
        b = self.token_budget
        if b is None:
            return None
        return max(1, int(b * context)) if isinstance(b, float) else int(b)


EXACT = SelectionPolicy(token_budget=None)

# (block summary, aggregation over the query rows of a KV head), by name
SCORERS = {f"{summary}+{aggregation}": (summary, aggregation)
           for summary in ("minmax", "mean", "qkeys") for aggregation in ("max", "prob")}


def rank_blocks(summaries, q: torch.Tensor, ids: torch.Tensor, summary: str, aggregation: str,
                counts: torch.Tensor, scale: float) -> torch.Tensor:
    """Scores of blocks ``ids`` per (sequence, KV head): fp32 ``[rows, nb]``, higher = attend first.

    q: ``[B, Hq, Q, D]``; counts: tokens per block ``[nb]``; scale: the softmax scale.
    summary: "minmax", "mean" or "qkeys" (``BlockSummaries.scores``: each query row's estimated
    log attention mass per block). aggregation, how the query rows of a KV head (GQA group x
    query tokens) combine: "max" takes the largest estimate; "prob" first turns each row's
    estimates into shares of that row's attention (log-softmax over the blocks), so that a row
    whose scores are all high cannot outvote a row that points at one block.
    """
    s = summaries.scores(q, ids, summary, counts, scale)                        # [rows, G*Q, nb]
    if aggregation == "prob":
        s = torch.log_softmax(s, dim=-1)
    return s.amax(1)


def window_blocks(kv: LayerKV, start: int, end: int) -> torch.Tensor:
    """Logical ids of the blocks holding positions ``[start, end)``: ``[nb]`` int64."""
    r = kv.block_range(start, end)
    return torch.arange(r.start, r.stop, dtype=torch.int64)


def block_scores(kv: LayerKV, policy: SelectionPolicy, q: torch.Tensor, ids: torch.Tensor,
                 scale: float = 1.0, coarse: Optional[tuple[torch.Tensor, Optional[np.ndarray], int]] = None,
                 on_host: bool = True) -> torch.Tensor:
    """Each (sequence, kv_head)'s score of blocks ``ids`` ([nb] int64): fp32 ``[rows, nb]`` on
    the CPU (on_host) or on the summaries' device, the estimated log attention mass
    (``rank_blocks``) of q ``[B, Hq, Q, D]``.
    coarse: ``(forced, bonus, n)`` (``SelectionPolicy.coarse_candidates``): only the forced
    blocks and the ``n`` others with the best Quest bound (plus bonus) keep their scores, the
    others get -inf, as the CPU kernel's two stages give (n = 0: every block keeps its own)."""
    counts = block_counts(kv, ids)
    scores = rank_blocks(kv.summaries, q, ids, policy.block_summary, policy.score_aggregation, counts, scale)
    if coarse is not None and coarse[2]:
        forced, bonus, n = coarse
        bound = rank_blocks(kv.summaries, q, ids, "minmax", "max", counts, scale)      # on the summaries' device
        if bonus is not None:
            bound = bound + to_device(torch.from_numpy(bonus), bound.device)
        forced = to_device(forced, bound.device)
        keep = forced.expand_as(bound).clone()
        keep.scatter_(1, bound.masked_fill(forced, float("-inf")).topk(n, dim=1).indices, True)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.cpu() if on_host else scores


def block_counts(kv: LayerKV, ids: torch.Tensor) -> torch.Tensor:
    """Tokens held in each of blocks ``ids``: ``[nb]`` int64."""
    bs = kv.block_size
    return (kv.length - ids * bs).clamp_(0, bs)


def scored(kv: LayerKV, policy: SelectionPolicy) -> bool:
    """Whether this layer's decode steps rank blocks (else they attend every block)."""
    return policy.token_budget is not None and kv.layer >= policy.dense_layers and not kv.keeps_last


def select_blocks(kv: LayerKV, policy: SelectionPolicy, q: torch.Tensor, start: int, end: int,
                  scale: float = 1.0) -> torch.Tensor:
    """The blocks each (sequence, kv_head) attends this step: int64 ``[rows, n]``, ascending."""
    return select_scored(kv, policy, q, start, end, scale)[0]


def select_scored(kv: LayerKV, policy: SelectionPolicy, q: torch.Tensor, start: int, end: int,
                  scale: float = 1.0, rankings: Optional[dict[str, int]] = None, remember: bool = True
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The blocks each (sequence, kv_head) attends this step, int64 ``[rows, n]`` ascending,
    and the scores of every block of the window (fp32 ``[rows, nb]``, CPU; None when the
    blocks were not ranked; -inf for the blocks ``policy.coarse_candidates``'s first stage left
    out).

    q: ``[B, Hq, Q, D]``; scale: the softmax scale (the scores are estimated log attention
    masses). Exact (every block of the window) when there is no budget, for the first
    ``dense_layers`` layers, for sliding-window layers, and when the budget covers it all.
    rankings: counts of rows ``"scored"`` and ``"kept"`` (``policy.rerank_similarity``), added to.
    remember: keep this ranking in ``kv`` (its scores rank cached copies; ``rerank_similarity``
    reuses it); False for a layer that attends another layer's KV (``kv``): it ranks afresh
    with its own queries and leaves that layer's ranking as it was.
    """
    ids = window_blocks(kv, start, end)
    budget = policy.budget_tokens(end - start)
    bs = kv.block_size
    n_budget = None if budget is None else max(1, budget // bs)
    if n_budget is None or n_budget >= ids.numel() or not scored(kv, policy):
        return ids.expand(kv.rows, -1), None
    nb = ids.numel()
    sink_n = min(n_budget, -(-min(policy.sink_tokens, end - start) // bs))
    if policy.selection == "window":                  # sink + the most recent blocks
        local_n = n_budget - sink_n
    else:
        local_n = nb - max(start, end - policy.local_window) // bs + ids[0].item()
    local_n = min(local_n, n_budget - sink_n)        # the budget holds, window included
    forced = torch.zeros(nb, dtype=torch.bool)
    forced[:sink_n] = True
    if local_n:
        forced[nb - local_n:] = True
    k = n_budget - int(forced.sum())
    if k <= 0 or policy.selection == "window":
        return ids[forced].expand(kv.rows, -1), None
    bonus = reuse_bonus(kv, policy, ids)
    qr = None if policy.rerank_similarity is None or not remember else kv.summaries.query_rows(q).detach()
    kept = kept_rankings(kv, policy, qr, ids, nb - local_n, end)
    if rankings is not None:
        n_kept = 0 if kept is None else int(kept[0].sum())
        rankings["kept"] += n_kept
        rankings["scored"] += kv.rows - n_kept
    on_cpu = policy.block_summary == "qkeys" and policy.score_aggregation == "max" and kv.summaries.device.type == "cpu"
    n_cand = policy.candidates(k, nb - int(forced.sum()), saves=on_cpu)
    if on_cpu:
        selected, scores = kv.summaries.top_blocks(q, ids, block_counts(kv, ids), scale, forced.numpy(), k, bonus,
                                                   kept, n_cand)                 # one numba call
    else:          # ranked where the scores are (a GPU: one wait, for the selection and its scores)
        scores = block_scores(kv, policy, q, ids, scale, (forced, bonus, n_cand), on_host=False)  # [rows, nb]
        where = scores.device
        if kept is not None:
            scores = torch.where(to_device(torch.from_numpy(kept[0]), where)[:, None],
                                 to_device(torch.from_numpy(kept[1]), where), scores)
        keys = scores if bonus is None else scores + to_device(torch.from_numpy(bonus), where)
        top = keys.masked_fill(to_device(forced, where)[None, :], float("-inf")).topk(k, dim=1).indices   # [rows, k]
        fixed = to_device(forced.nonzero().view(1, -1), where)     # found on the host: nonzero on a GPU waits
        chosen = torch.cat([fixed.expand(kv.rows, -1), top], dim=1)
        selected, scores = to_host(to_device(ids, where)[chosen].sort(dim=1).values), to_host(scores)
        selected, scores = selected.get(), scores.get()
    if remember:
        remember_rankings(kv, qr, ids, scores, kept, end)
    return selected, scores


def kept_rankings(kv: LayerKV, policy: SelectionPolicy, qr: Optional[torch.Tensor], ids: torch.Tensor, tail: int,
                  end: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The rows that keep their last ranking's scores this step (``policy.rerank_similarity``):
    ``(keep, scores)``, bool ``[rows]`` and fp32 ``[rows, nb]`` of blocks ``ids``; None when
    every row ranks. qr: the step's query rows (``BlockSummaries.query_rows``; None: the option
    is off).
    tail: the position in ``ids`` from which every block is forced (the local window): a row
    keeps only if the blocks from the one that was open at its ranking on are all there
    (blocks completed since were not scored as complete ones)."""
    tau = policy.rerank_similarity
    if tau is None or qr is None or kv.rank_q is None or qr.shape != kv.rank_q.shape:
        return None
    since = kv.rank_len                                    # [rows]: context length at the ranking, -1: none
    fits = (since >= 0) & (since <= end) & (since // kv.block_size >= int(ids[0]) + tail)
    if not fits.any():
        return None
    similar = torch.nn.functional.cosine_similarity(qr, kv.rank_q, dim=-1).amin(-1).cpu().numpy() >= tau
    keep = fits & similar
    if not keep.any():
        return None
    return keep, kv.score[:, int(ids[0]):int(ids[-1]) + 1]


def remember_rankings(kv: LayerKV, qr: Optional[torch.Tensor], ids: torch.Tensor, scores: torch.Tensor,
                      kept: Optional[tuple[np.ndarray, np.ndarray]], end: int) -> None:
    """Keep the window's scores (``kv.score``: the cache policy ranks copies by them, and kept
    rows rank by them again) and each freshly ranked row's query rows ``qr`` and context length
    (for ``kept_rankings``; qr None: the option is off)."""
    kv.score[:, int(ids[0]):int(ids[-1]) + 1] = scores.numpy()         # kept rows: their own values
    if qr is None:
        return
    fresh = np.ones(kv.rows, np.bool_) if kept is None else ~kept[0]
    if kv.rank_q is None or kv.rank_q.shape != qr.shape:
        kv.rank_q = qr.clone()
        kv.rank_len[:] = -1
    rows = torch.from_numpy(np.flatnonzero(fresh))
    kv.rank_q[rows] = qr[rows]
    kv.rank_len[fresh] = end


def reuse_bonus(kv: LayerKV, policy: SelectionPolicy, ids: torch.Tensor) -> Optional[np.ndarray]:
    """What each of blocks ``ids`` (a contiguous range) adds to its score for the ranking, fp32
    ``[rows, nb]``: ``policy.reuse_bonus`` where its fastest copy is on the device, half of it
    in host memory, 0 on disk. None when it would add the same to every block (no bonus, or no
    tier limits: every block on the device), which ranks as no bonus does."""
    if not policy.reuse_bonus or ids.numel() == 0:
        return None
    tier = kv.where()[0][:, int(ids[0]):int(ids[-1]) + 1]
    if (tier == tier.flat[0]).all():
        return None
    weight = np.array([1.0, 0.5, 0.0], np.float32) * np.float32(policy.reuse_bonus)     # by Tier
    return weight[np.clip(tier, Tier.DEVICE, Tier.DISK)]      # -1 (not placed yet: on the device) as the device
