"""Block selection within a token budget: true top blocks when the summaries are exact, budget,
sink and window kept, GQA aggregation, and exact attention when the budget covers everything."""
import dataclasses

import pytest
import torch

import kvdrive_compile
from exactness import greedy_both
from kvdrive_compile.runtime import placement
from kvdrive_compile.runtime.kv_runtime import KVRuntime
from kvdrive_compile.runtime.selection import DEFAULT_COARSE_CANDIDATES, SelectionPolicy, select_blocks
from kvdrive_compile.runtime.tiers import Tier
from test_hf_models import DEVICE, build

BS = 8


def layer_with_constant_blocks(batch, hkv, d, nblocks, layer=5, seed=0):
    """Keys constant within each block, so min/max and mean summaries are exact (the keys are
    fp16 values: the summaries keep min/max in fp16)."""
    g = torch.Generator().manual_seed(seed)
    per_block = torch.randn(batch, hkv, nblocks, 1, d, generator=g).half().float()
    k = per_block.expand(batch, hkv, nblocks, BS, d).reshape(batch, hkv, nblocks * BS, d).contiguous()
    rt = KVRuntime(block_size=BS)
    s = rt.open_session()
    kv = rt.layer(s, layer, k, keeps_last=False)
    placement.append(rt, kv, k, torch.randn_like(k))
    return rt, kv, per_block[:, :, :, 0]                                   # [B, Hkv, nb, D]


def true_block_scores(q, block_keys):
    """max over the query heads of a KV head of q . k: [B, Hkv, nb]."""
    b, hq, _, d = q.shape
    hkv = block_keys.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)
    return torch.einsum("bhgd,bhnd->bhgn", qg, block_keys).amax(2)


@pytest.mark.parametrize("summary", ["minmax", "mean", "qkeys"])
@pytest.mark.parametrize("batch,hkv,g", [(1, 1, 1), (2, 3, 3), (1, 2, 4)])
def test_true_top_blocks_when_summaries_exact(summary, batch, hkv, g):
    nb, d = 40, 16
    rt, kv, block_keys = layer_with_constant_blocks(batch, hkv, d, nb)
    q = torch.randn(batch, hkv * g, 1, d)
    policy = SelectionPolicy(token_budget=12 * BS, block_summary=summary, score_aggregation="max",
                             sink_tokens=4, local_window=2 * BS)
    sel = select_blocks(kv, policy, q, 0, nb * BS)                           # [rows, n]
    assert sel.shape[1] * BS <= policy.token_budget
    scores = true_block_scores(q, block_keys).reshape(batch * hkv, nb)
    forced = {0, nb - 2, nb - 1}                                             # sink block, local window
    for r in range(batch * hkv):
        chosen = set(sel[r].tolist())
        assert forced <= chosen
        free = [i for i in range(nb) if i not in forced]
        best = sorted(free, key=lambda i: -scores[r, i].item())[: 12 - len(forced)]
        assert chosen - forced == set(best), (r, sorted(chosen), sorted(best))
    rt.close()


@pytest.mark.parametrize("summary", ["qkeys", "minmax"])          # the fused numba call and the torch path
@pytest.mark.parametrize("bonus", [0.0, 0.7, 3.0])
def test_reuse_bonus_ranks_blocks_in_place_higher_by_their_tier(summary, bonus):
    """Blocks on the device rank by score + bonus, in host memory by score + bonus/2, on disk by
    score: the selection is the forced blocks plus the top-k of those keys, on fresh random
    keys and tiers; with every block on the device it is the plain top-k."""
    nb, d, batch, hkv = 48, 16, 2, 2
    rt, kv, block_keys = layer_with_constant_blocks(batch, hkv, d, nb, seed=int(bonus * 10))
    q = torch.randn(batch, hkv * 2, 1, d) * 0.5
    policy = SelectionPolicy(token_budget=12 * BS, block_summary=summary, sink_tokens=4, local_window=2 * BS,
                             reuse_bonus=bonus)
    scores = true_block_scores(q, block_keys).reshape(batch * hkv, nb)
    forced = {0, nb - 2, nb - 1}
    free = [i for i in range(nb) if i not in forced]

    def best(keys, r):
        return set(sorted(free, key=lambda i: -keys[r, i].item())[: 12 - len(forced)])

    plain = select_blocks(kv, policy, q, 0, nb * BS)
    for r in range(batch * hkv):
        assert set(plain[r].tolist()) - forced == best(scores, r)
    g = torch.Generator().manual_seed(7)
    tier = torch.randint(0, 3, (batch * hkv, nb), generator=g).numpy()     # 0 device, 1 host, 2 disk
    tier[:, sorted(forced)] = 0
    kv.dev[:, :nb][tier != 0] = -1
    kv.host[:, :nb][tier == 1] = 0
    kv.home[:, :nb][tier == 2] = Tier.DISK
    kv.changed()
    assert (kv.where()[0] == tier).all()
    sel = select_blocks(kv, policy, q, 0, nb * BS)
    keys = scores + torch.from_numpy(tier).float().mul(-0.5).add(1.0) * bonus
    moved = 0
    for r in range(batch * hkv):
        assert set(sel[r].tolist()) - forced == best(keys, r)
        moved += len(best(keys, r) - best(scores, r))
    assert (moved > 0) == (bonus > 0)
    rt.close()


def test_gqa_aggregates_by_max_over_query_heads():
    nb, d = 20, 8
    rt, kv, block_keys = layer_with_constant_blocks(1, 1, d, nb)
    # query head 0 points at block 7, head 1 at block 13; the others are near zero
    q = torch.zeros(1, 4, 1, d)
    q[0, 0, 0] = block_keys[0, 0, 7] * 10
    q[0, 1, 0] = block_keys[0, 0, 13] * 10
    policy = SelectionPolicy(token_budget=5 * BS, sink_tokens=0, local_window=0)
    chosen = set(select_blocks(kv, policy, q, 0, nb * BS)[0].tolist())
    assert {7, 13} <= chosen
    rt.close()


@pytest.mark.parametrize("summary", ["minmax", "mean", "qkeys"])
def test_prob_aggregation_keeps_the_block_one_head_points_at(summary):
    """Head 1 scores every block high (its query follows a direction all keys share, rising
    slightly with the block), head 0 points at block 7: the maximum follows head 1's small
    differences, the attention shares ("prob") keep block 7."""
    nb, d = 20, 8
    rt, kv, block_keys = layer_with_constant_blocks(1, 1, d, nb)
    shared = torch.zeros(d)
    shared[0] = 1.0
    rt.close()
    block_keys = block_keys.clone()
    block_keys[..., 0] = 5.0 + 0.01 * torch.arange(nb)          # every block shares channel 0
    k = block_keys[:, :, :, None].expand(1, 1, nb, BS, d).reshape(1, 1, nb * BS, d).contiguous()
    rt = KVRuntime(block_size=BS)
    kv = rt.layer(rt.open_session(), 5, k, keeps_last=False)
    placement.append(rt, kv, k, torch.randn_like(k))
    q = torch.zeros(1, 2, 1, d)
    q[0, 0, 0, 1:] = block_keys[0, 0, 7, 1:]                     # head 0: block 7 (below head 1)
    q[0, 1, 0] = shared * 10                                     # head 1: all blocks alike, and high
    chosen = {}
    for aggregation in ("max", "prob"):
        policy = SelectionPolicy(token_budget=BS, sink_tokens=0, local_window=0, block_summary=summary,
                                 score_aggregation=aggregation)
        chosen[aggregation] = select_blocks(kv, policy, q, 0, nb * BS, scale=1.0)[0].tolist()
    assert chosen["max"] == [nb - 1]                             # head 1's slightly highest block
    assert chosen["prob"] == [7]
    rt.close()


def test_window_policy_keeps_sink_and_most_recent():
    rt, kv, _ = layer_with_constant_blocks(1, 2, 8, 30)
    policy = SelectionPolicy(token_budget=6 * BS, selection="window", sink_tokens=4)
    sel = select_blocks(kv, policy, torch.randn(1, 2, 1, 8), 0, 30 * BS)
    assert sel.tolist() == [[0, 25, 26, 27, 28, 29]] * 2
    rt.close()


def test_dense_layers_and_no_budget_select_everything():
    rt, kv, _ = layer_with_constant_blocks(1, 1, 8, 10, layer=1)
    q = torch.randn(1, 1, 1, 8)
    assert select_blocks(kv, SelectionPolicy(token_budget=2 * BS), q, 0, 80).shape[1] == 10   # layer 1 < 2
    assert select_blocks(kv, SelectionPolicy(token_budget=None), q, 0, 80).shape[1] == 10        # no budget
    assert select_blocks(kv, SelectionPolicy(token_budget=0.5, dense_layers=0), q, 0, 80).shape[1] == 5
    rt.close()


def test_budget_larger_than_context_is_token_identical():
    model = build("llama")
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref, out = greedy_both(model, ids, 10, token_budget=4096, dense_layers=0,
                           device_memory="64KiB", host_memory="8KiB")
    assert torch.equal(ref, out)


def test_sparse_budget_runs_end_to_end_and_attends_less():
    model = build("llama")
    ids = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    _, out = greedy_both(model, ids, 6, token_budget=64, dense_layers=0, local_window=16,
                         device_memory="48KiB", host_memory="16KiB")
    assert out.shape[1] == 306
    st = kvdrive_compile.stats()
    assert sum(st.selected_blocks.values()) > 0


@pytest.mark.parametrize("budget", [None, 64])
def test_fetch_attention_gives_the_same_tokens_as_split(budget):
    model = build("llama")
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    # reuse_bonus=0: the same selection wherever blocks lie (host copies of disk blocks come and go
    # differently under the two designs), so that only how the selected blocks are attended differs
    common = dict(token_budget=budget, dense_layers=0, local_window=16, device_memory=0, host_memory="16KiB",
                  reuse_bonus=0)
    def fetched():
        return kvdrive_compile.stats().moved_bytes["host->device"]

    _, split = greedy_both(model, ids, 6, **common)
    before = fetched()
    _, split = greedy_both(model, ids, 6, **common)
    assert fetched() == before, "split attention copied blocks to the device"
    ref, fetch = greedy_both(model, ids, 6, attention="fetch", **common)
    assert torch.equal(split, fetch)
    if budget is None:
        assert torch.equal(ref, fetch)
    assert fetched() > before


def test_past_the_recompile_limit_tokens_stay_exact_or_error():
    """Past Dynamo's recompile limit a call runs eagerly. A whole generate then runs as plain
    Hugging Face (exact); a decode step on the cache's stand-ins raises StandInReadError. Never
    a wrong token, and kvdrive changes no Dynamo setting to get there."""
    from kvdrive_compile.runtime.standins import StandInReadError

    model = build("llama")
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    prompts = {b: torch.randint(3, 128, (b, 40), generator=torch.Generator().manual_seed(b)).to(DEVICE)
               for b in (1, 2, 3)}
    refs = {b: model.generate(ids, **kw) for b, ids in prompts.items()}
    eager = model.forward
    model.forward = torch.compile(eager, backend="kvdrive", options={"token_budget": None})
    outcomes = []
    try:
        with torch._dynamo.config.patch(recompile_limit=1):        # the decode graph is one too many
            for b, ids in prompts.items():
                try:
                    out = model.generate(ids, **kw)
                except StandInReadError:
                    outcomes.append("error")
                    continue
                assert torch.equal(out, refs[b]), b
                outcomes.append("exact")
    finally:
        model.forward = eager
    assert outcomes[0] == "error" and "exact" in outcomes[1:], outcomes
    assert torch._dynamo.config.fail_on_recompile_limit_hit is False


def _grow(rt, kv, n, seed):
    """Append ``n`` tokens of random keys to the layer, one decode step each."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        k = torch.randn(kv.batch, kv.kv_heads, 1, kv.head_dim, generator=g)
        placement.append(rt, kv, k, torch.randn_like(k))


@pytest.mark.parametrize("summary", ["qkeys", "minmax"])          # the fused numba call and the torch path
def test_rerank_similarity_keeps_a_rows_ranking_while_its_queries_stay_alike(summary):
    """A row whose queries stay similar ranks by the scores of its last ranking (this step's
    sink, window and budget still hold); a row whose query moved, or whose window passed the
    block open at its ranking, is ranked afresh; with the option off nothing is kept."""
    from kvdrive_compile.runtime.selection import select_scored
    nb, d, batch, hkv, g = 40, 16, 2, 2, 2
    rt, kv, _ = layer_with_constant_blocks(batch, hkv, d, nb, seed=11)
    _grow(rt, kv, 3, seed=1)                                   # an open block at the first ranking
    policy = SelectionPolicy(token_budget=10 * BS, block_summary=summary, sink_tokens=4, local_window=3 * BS,
                             reuse_bonus=0, rerank_similarity=0.9)
    plain = SelectionPolicy(token_budget=10 * BS, block_summary=summary, sink_tokens=4, local_window=3 * BS,
                            reuse_bonus=0)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(batch, hkv * g, 1, d, generator=gen)
    counts = {"scored": 0, "kept": 0}
    end = kv.length
    sel1, scores1 = select_scored(kv, policy, q, 0, end, 1.0, counts)
    assert counts == {"scored": 4, "kept": 0}
    assert torch.equal(sel1, select_scored(kv, plain, q, 0, end)[0])
    _grow(rt, kv, 1, seed=2)
    end = kv.length
    moved = q.clone()
    moved[1, 2:] = torch.randn(1, g, 1, d, generator=gen)          # row 3 (sequence 1, KV head 1) moved
    near = moved + 0.01 * torch.randn(moved.shape, generator=gen)
    sel2, scores2 = select_scored(kv, policy, near, 0, end, 1.0, counts)
    assert counts == {"scored": 5, "kept": 3}
    fresh_sel, fresh_scores = select_scored(kv, plain, near, 0, end)
    n1 = scores1.shape[1]
    torch.testing.assert_close(scores2[:3, :n1 - 1], scores1[:3, :n1 - 1], rtol=0, atol=0)     # kept, as ranked
    assert torch.equal(sel2[3], fresh_sel[3]) and torch.equal(scores2[3], fresh_scores[3])
    nblocks = scores2.shape[1]
    forced = {0, *range(max(0, end - 3 * BS) // BS, nblocks)}
    for r in range(3):
        free = [i for i in range(nblocks) if i not in forced]
        best = sorted(free, key=lambda i: (-scores2[r, i].item(), i))[: 10 - len(forced)]
        assert set(sel2[r].tolist()) == forced | set(best)
        assert sel2.shape[1] * BS <= policy.token_budget
    assert not torch.equal(scores2[:3], fresh_scores[:3])        # it did keep something a fresh ranking changes
    _grow(rt, kv, 4 * BS, seed=3)                                 # the window moved past the open block
    counts = {"scored": 0, "kept": 0}
    select_scored(kv, policy, near, 0, kv.length, 1.0, counts)
    assert counts == {"scored": 4, "kept": 0}
    counts = {"scored": 0, "kept": 0}
    select_scored(kv, plain, near, 0, kv.length, 1.0, counts)
    assert counts == {"scored": 4, "kept": 0} and kv.rank_q is not None
    rt.close()


def test_rerank_similarity_is_not_stored_without_the_option():
    rt, kv, _ = layer_with_constant_blocks(1, 2, 8, 30)
    select_blocks(kv, SelectionPolicy(token_budget=6 * BS, sink_tokens=4), torch.randn(1, 2, 1, 8), 0, 30 * BS)
    assert kv.rank_q is None and (kv.rank_len == -1).all()
    rt.close()


def test_rerank_similarity_end_to_end():
    """A compiled model with the option runs within its budget, keeps some rankings, and with
    no budget (every block attended) is still token-identical to eager."""
    model = build("llama")
    ids = torch.randint(3, 128, (2, 300), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    options = dict(token_budget=128, dense_layers=0, local_window=48, rerank_similarity=0.0,
                   device_memory="160KiB", host_memory="64KiB")
    try:
        before = kvdrive_compile.stats(options).rankings
    except KeyError:                                            # no runtime with these options yet
        before = {"scored": 0, "kept": 0}
    _, out = greedy_both(model, ids, 12, **options)
    after = kvdrive_compile.stats(options).rankings
    assert out.shape[1] == 312
    assert after["kept"] > before["kept"] and after["scored"] > before["scored"]
    ref, out = greedy_both(model, ids, 8, token_budget=None, rerank_similarity=0.5, device_memory="160KiB")
    assert torch.equal(ref, out)


@pytest.mark.parametrize("summary", ["qkeys", "minmax"])          # the fused numba call and the torch path
def test_coarse_candidates_rank_only_the_best_bounded_blocks(summary):
    """``coarse_candidates=M``: per row, the forced blocks and the M * k others with the best Quest
    bound (plus the reuse bonus) are the only ones scored; the selection is the forced blocks
    plus the top k of those scores (plus bonus), the others' scores are -inf. The numba call and
    the torch path give the same, on fresh random keys and tiers; a large M ranks as without it."""
    from kvdrive_compile.runtime.selection import block_counts, rank_blocks, select_scored, window_blocks
    nb, d, batch, hkv, g = 64, 16, 2, 2, 3
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(batch, hkv, nb * BS, d, generator=gen)
    rt = KVRuntime(block_size=BS)
    kv = rt.layer(rt.open_session(), 5, k, keeps_last=False)
    placement.append(rt, kv, k, torch.randn_like(k))
    tier = torch.randint(0, 3, (batch * hkv, nb), generator=gen).numpy()     # 0 device, 1 host, 2 disk
    tier[:, [0, nb - 2, nb - 1]] = 0
    kv.dev[:, :nb][tier != 0] = -1
    kv.host[:, :nb][tier == 1] = 0
    kv.home[:, :nb][tier == 2] = Tier.DISK
    kv.changed()
    q = torch.randn(batch, hkv * g, 1, d, generator=gen)
    ids = window_blocks(kv, 0, kv.length)
    bonus = torch.from_numpy(tier).float().mul(-0.5).add(1.0)                # reuse_bonus=1: 1, 0.5, 0 by tier
    forced = torch.zeros(nb, dtype=torch.bool)
    forced[[0, nb - 2, nb - 1]] = True
    n_free = 12 - 3
    for m, n_cand in ((1, n_free), (2.5, 23), (100, nb - 3)):             # ceil(M * k); every free block
        policy = SelectionPolicy(token_budget=12 * BS, block_summary=summary, sink_tokens=4, local_window=2 * BS,
                                 reuse_bonus=1.0, coarse_candidates=m)
        sel, scores = select_scored(kv, policy, q, 0, kv.length)
        counts = block_counts(kv, ids)
        fine = rank_blocks(kv.summaries, q, ids, summary, "max", counts, 1.0)
        bound = rank_blocks(kv.summaries, q, ids, "minmax", "max", counts, 1.0) + bonus
        cand = bound.masked_fill(forced, float("-inf")).topk(n_cand, dim=1).indices
        keep = forced.expand(batch * hkv, -1).clone()
        keep.scatter_(1, cand, True)
        want = fine.masked_fill(~keep, float("-inf"))
        torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
        top = (want + bonus).masked_fill(forced, float("-inf")).topk(n_free, dim=1).indices
        for r in range(batch * hkv):
            assert set(sel[r].tolist()) == {0, nb - 2, nb - 1} | set(top[r].tolist())
        if m == 100:                                                          # every block a candidate
            plain = SelectionPolicy(token_budget=12 * BS, block_summary=summary, sink_tokens=4,
                                    local_window=2 * BS, reuse_bonus=1.0, coarse_candidates=None)
            assert torch.equal(sel, select_scored(kv, plain, q, 0, kv.length)[0])
    # the default, "auto": two stages of DEFAULT_COARSE_CANDIDATES where the CPU's 2-bit-key ranking
    # runs (qkeys + max, summaries on the CPU), one stage elsewhere (no work to save)
    auto = SelectionPolicy(token_budget=12 * BS, block_summary=summary, sink_tokens=4, local_window=2 * BS,
                           reuse_bonus=1.0)
    assert auto.coarse_candidates == "auto"
    same_as = DEFAULT_COARSE_CANDIDATES if summary == "qkeys" else None
    want_sel, want_scores = select_scored(kv, dataclasses.replace(auto, coarse_candidates=same_as), q, 0, kv.length)
    sel, scores = select_scored(kv, auto, q, 0, kv.length)
    assert torch.equal(sel, want_sel) and torch.equal(scores, want_scores)
    assert (scores == float("-inf")).any() == (summary == "qkeys")        # 4 x 9 of 61 free blocks scored
    rt.close()


def test_coarse_candidates_end_to_end():
    """A compiled model with the option runs within its budget; with no budget it is still
    token-identical to eager; a value below 1 is refused."""
    model = build("llama")
    ids = torch.randint(3, 128, (2, 300), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    options = dict(token_budget=64, dense_layers=0, local_window=16, coarse_candidates=2,
                   device_memory="160KiB", host_memory="64KiB")
    _, out = greedy_both(model, ids, 10, **options)
    assert out.shape[1] == 310
    ref, out = greedy_both(model, ids, 8, token_budget=None, coarse_candidates=2, device_memory="160KiB")
    assert torch.equal(ref, out)
    for bad in (0.5, "fast", True):
        with pytest.raises(ValueError, match="coarse_candidates"):
            kvdrive_compile.options.parse_options({"coarse_candidates": bad})
    for good, parsed in (("auto", "auto"), (None, None), (3, 3)):
        assert kvdrive_compile.options.parse_options({"coarse_candidates": good}).policy.coarse_candidates == parsed
