"""The qkeys block-score kernel (numba) and its torch twin against a float64 reference on fresh
random codes and ranges."""
import importlib.util

import numpy as np
import pytest
import torch
from triton_compile import compile_for_h100

from kvdrive_compile.kernels.block_scores import (
    _every_block,
    _log_mass,
    _row_max,
    _top_row,
    fold_open_key,
    pack_codes,
    qkeys_log_mass,
    qkeys_log_mass_or_bound,
    qkeys_log_mass_torch,
    qkeys_log_mass_triton,
    qkeys_top_blocks,
    round_range,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def case(rows, nq, d, bs, cap, seed):
    g = torch.Generator().manual_seed(seed)
    dp = -(-d // 4) * 4
    codes = torch.randint(0, 4, (rows, cap, bs, dp), generator=g, dtype=torch.uint8)
    codes[..., d:] = 0
    kmin = torch.randn(rows, cap, d, generator=g)
    kmin, kmax = round_range(kmin, kmin + torch.rand(rows, cap, d, generator=g) * 3)    # fp16, as stored
    kmax[:, 0, 0] = kmin[:, 0, 0]                             # a channel with an empty range
    q = torch.randn(rows, nq, d, generator=g) * 2
    ids = torch.randperm(cap, generator=g)[: max(1, cap - 3)]
    return codes, pack_codes(codes), kmin, kmax, q, ids


def bits(t):
    """An fp16 tensor as the numba kernels take it (its bits, int16)."""
    return t.view(torch.int16).numpy()


def test_round_range_widens_to_the_nearest_fp16_values_outside():
    """fp16 ``lo <= x <= hi``, each the nearest such fp16 value (the next one inward is past x),
    values beyond fp16's range clamped to its largest finite ones, exact fp16 values kept."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4000, generator=g) * torch.logspace(-6, 6, 4000)
    x = torch.cat([x, torch.tensor([0.0, 1.0, -2.5, 1e6, -1e6, 65504.0, -65504.0, 3e-8])])
    lo, hi = round_range(x, x)
    assert lo.dtype == hi.dtype == torch.float16
    limit = 65504.0
    xc = x.clamp(-limit, limit)
    assert (lo.float() <= xc).all() and (hi.float() >= xc).all() and torch.isfinite(lo).all() and torch.isfinite(hi).all()
    inward_lo = torch.nextafter(lo, torch.full_like(lo, float("inf"))).float()
    inward_hi = torch.nextafter(hi, torch.full_like(hi, float("-inf"))).float()
    assert (inward_lo > xc).all() and (inward_hi < xc).all()
    exact = x.half().float() == x
    assert (lo.float()[exact] == x[exact]).all() and (hi.float()[exact] == x[exact]).all()


def test_next_half_steps_as_nextafter_on_every_finite_fp16():
    """The bit-level step round_range uses (not torch.nextafter, missing for fp16 on some CUDA
    builds) against torch.nextafter on the CPU, for every finite fp16 value, both ways."""
    from kvdrive_compile.kernels.block_scores import _next_half

    y = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    y = y[torch.isfinite(y)]
    for down in (True, False):
        want = torch.nextafter(y, torch.full_like(y, float("-inf") if down else float("inf")))
        got = _next_half(y, down)
        assert torch.equal(got.float(), want.float())


def test_fold_open_key_equals_the_torch_ops_it_stands_for():
    """One decode key per row folded into an open block by the numba kernel: the same bits as
    round_range + torch.minimum / maximum, the sum and the tail as torch's, on fresh random keys
    of every magnitude and on fp16's edges (zeros, subnormals, halfway and exact values, past
    the finite range, infinities, NaN)."""
    g = torch.Generator().manual_seed(5)
    edges = torch.tensor([0.0, -0.0, 1e-8, -1e-8, 3e-8, 6e-8, -6e-8, 5.96e-8, 1 / 3, -1 / 3, 2048.5, 1.0000001,
                          65504.0, 65519.0, -65519.999, 65520.0, 7e4, -7e4, 1e9, float("inf"), float("-inf"),
                          float("nan")])
    for trial in range(60):
        rows, d = 3 + trial % 4, 8 * (1 + trial % 3)
        scale = 10.0 ** (trial % 13 - 7)
        k = torch.randn(rows, d, generator=g) * scale
        if trial % 2:
            pick = edges[torch.randint(0, len(edges), (rows, d), generator=g)]
            k = torch.where(torch.rand(rows, d, generator=g) < 0.5, pick, k)
        kmin = (torch.randn(rows, 3, d, generator=g) * scale).to(torch.float16)
        kmax = (kmin.float() + scale).to(torch.float16)
        kmin[:, 1], kmax[:, 1] = float("inf"), float("-inf")          # a block with no key yet
        ksum, tail = torch.randn(rows, 3, d, generator=g), torch.zeros(rows, 4, d)
        blk, slot = trial % 3, trial % 4
        want = [t.clone() for t in (kmin, kmax, ksum, tail)]
        lo, hi = round_range(k, k)
        want[0][:, blk] = torch.minimum(want[0][:, blk], lo)
        want[1][:, blk] = torch.maximum(want[1][:, blk], hi)
        want[2][:, blk] += k
        want[3][:, slot] = k
        got = [t.clone() for t in (kmin, kmax, ksum, tail)]
        fold_open_key(k, *got, blk, slot)
        for w, x in zip(want[:2], got[:2]):
            assert torch.equal(w.isnan(), x.isnan())
            assert torch.equal(w.nan_to_num(0.0).view(torch.int16), x.nan_to_num(0.0).view(torch.int16))
        for w, x in zip(want[2:], got[2:]):
            assert torch.equal(w, x) or torch.equal(w.nan_to_num(7.0), x.nan_to_num(7.0))
    ok = (torch.zeros(2, 3, 4, dtype=torch.float16), torch.zeros(2, 3, 4, dtype=torch.float16), torch.zeros(2, 3, 4),
          torch.zeros(2, 2, 4))
    for k, blk, slot in ((torch.zeros(2, 4), 3, 0), (torch.zeros(2, 4), -1, 0), (torch.zeros(2, 4), 0, 2),
                         (torch.zeros(3, 4), 0, 0), (torch.zeros(2, 5), 0, 0)):
        with pytest.raises(ValueError, match="do not fit"):
            fold_open_key(k, *ok, blk, slot)
    with pytest.raises(ValueError, match="contiguous"):
        fold_open_key(torch.zeros(2, 4), torch.zeros(2, 4, 3, dtype=torch.float16).transpose(1, 2), *(
            torch.zeros(2, 3, 4, dtype=torch.float16), torch.zeros(2, 3, 4), torch.zeros(2, 2, 4)), 0, 0)


def test_kernels_refuse_ranges_not_in_fp16():
    codes, packed, kmin, kmax, q, ids = case(2, 3, 16, 8, cap=4, seed=0)
    with pytest.raises(ValueError, match="round_range"):
        qkeys_log_mass(packed, kmin.float(), kmax.float(), q, ids, 1.0)


def reference(codes, kmin, kmax, q, ids, scale):
    d = q.shape[-1]
    c = codes[:, ids, :, :d].double()
    lo, hi = kmin[:, ids].double(), kmax[:, ids].double()
    k = lo[:, :, None] + c * ((hi - lo) / 3)[:, :, None]                       # [rows, n, bs, D]
    s = torch.einsum("rgd,rntd->rgnt", q.double(), k) * scale
    return torch.logsumexp(s, -1)


@pytest.mark.parametrize("rows,nq,d,bs", [(1, 1, 64, 16), (3, 3, 64, 16), (2, 8, 128, 32), (2, 4, 6, 8)])
@pytest.mark.parametrize("impl", [qkeys_log_mass, qkeys_log_mass_torch])
def test_qkeys_log_mass_matches_float64(rows, nq, d, bs, impl):
    for seed in range(2):
        codes, packed, kmin, kmax, q, ids = case(rows, nq, d, bs, cap=11, seed=seed)
        scale = d ** -0.5
        got = impl(packed, kmin, kmax, q, ids, scale)
        assert got.shape == (rows, nq, ids.numel()) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), reference(codes, kmin, kmax, q, ids, scale), rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("programs_per_sm", [8, 1], ids=["block-per-program", "blocks-per-program"])
@pytest.mark.parametrize("rows,nq,d,bs,cap", [(1, 1, 64, 16, 5), (2, 3, 16, 8, 23), (1, 4, 6, 8, 9), (2, 17, 16, 32, 7)])
def test_qkeys_triton_matches_float64(rows, nq, d, bs, cap, programs_per_sm):
    """The Triton kernel (the interpreter on a CPU machine: small shapes) on the model's device:
    one block per program, or many with a shorter last range; query rows past 16; blocks under 16.
    Twice on fresh data: on a GPU the second call launches the kept compiled kernel directly
    (kernels/triton_launcher.py)."""
    if DEVICE == "cuda":
        from kvdrive_compile.kernels.triton_block_scores import qkeys_kernel
        from kvdrive_compile.kernels.triton_launcher import launcher_for
        launcher = launcher_for(qkeys_kernel)
        before = launcher.direct_launches
    for seed in (3, 4):
        codes, packed, kmin, kmax, q, ids = case(rows, nq, d, bs, cap=cap, seed=seed)
        got = qkeys_log_mass_triton(*(t.to(DEVICE) for t in (packed, kmin, kmax, q, ids)), 0.25,
                                    programs_per_sm=programs_per_sm, precision="ieee")
        assert got.shape == (rows, nq, ids.numel())
        torch.testing.assert_close(got.cpu().double(), reference(codes, kmin, kmax, q, ids, 0.25), rtol=1e-4, atol=1e-4)
    if DEVICE == "cuda":
        assert launcher.fallback_reason is None and launcher.direct_launches > before


@pytest.mark.skipif(DEVICE != "cuda", reason="tf32 is a tensor-core format: needs a GPU")
def test_qkeys_triton_tf32_close():
    codes, packed, kmin, kmax, q, ids = case(2, 4, 128, 16, cap=64, seed=4)
    got = qkeys_log_mass_triton(*(t.to(DEVICE) for t in (packed, kmin, kmax, q, ids)), 128 ** -0.5, precision="tf32")
    torch.testing.assert_close(got.cpu().double(), reference(codes, kmin, kmax, q, ids, 128 ** -0.5), rtol=1e-2, atol=1e-2)


COMPILE_FOR_H100 = """
from kvdrive_compile.kernels.triton_block_scores import qkeys_kernel
types = {"packed_ptr": "*u8", "kmin_ptr": "*fp16", "kmax_ptr": "*fp16", "q_ptr": "*fp32", "ids_ptr": "*i64",
         "out_ptr": "*fp32", "scale": "fp32"}
for rows, block, dims, precision in [(16, 16, 128, "tf32"), (32, 32, 256, "ieee"), (16, 16, 16, "ieee")]:
    constants = {"ROWS": rows, "BLOCK": block, "DIMS": dims, "PRECISION": precision}
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in qkeys_kernel.arg_names}
    compile(ASTSource(qkeys_kernel, signature, constants), target=target, options={"num_warps": 4, "num_stages": 3})
print("compiled")
"""


@needs_triton
def test_triton_kernel_compiles_for_h100():
    compile_for_h100(COMPILE_FOR_H100)


@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_qkeys_split_over_threads_matches_float64(chunks):
    """The (row, block) pairs cut into ``chunks`` ranges (numba's threads), ranges that start and
    end inside a row included, the open block's bound among them: the same scores as one range."""
    codes, packed, kmin, kmax, q, ids = case(3, 3, 64, 16, cap=150, seed=5)
    scale = 64 ** -0.5
    quantized = torch.ones(ids.numel(), dtype=torch.bool)
    quantized[7] = False
    log_count = torch.full((ids.numel(),), 2.0)
    out = torch.empty(3, 3, ids.numel())
    n = ids.numel()
    _log_mass(packed.numpy(), bits(kmin), bits(kmax), q.numpy(), ids.numpy(), quantized.numpy(),
              log_count.numpy(), np.float32(scale), out.numpy(), np.arange(3), _every_block(3, n), chunks)
    want = qkeys_log_mass_or_bound(packed, kmin, kmax, q, ids, quantized, log_count, scale)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    some = torch.full_like(out, 7.0)                   # only the rows listed are written
    _log_mass(packed.numpy(), bits(kmin), bits(kmax), q.numpy(), ids.numpy(), quantized.numpy(),
              log_count.numpy(), np.float32(scale), some.numpy(), np.array([2, 0]), _every_block(2, n), chunks)
    torch.testing.assert_close(some[[0, 2]], want[[0, 2]], rtol=0, atol=0)
    assert (some[1] == 7.0).all()
    listed = np.sort(np.stack([np.random.default_rng(r).choice(n, 40, replace=False) for r in range(2)]), axis=1)
    some = torch.full_like(out, 7.0)                   # only the (row, block) pairs listed are written
    _log_mass(packed.numpy(), bits(kmin), bits(kmax), q.numpy(), ids.numpy(), quantized.numpy(),
              log_count.numpy(), np.float32(scale), some.numpy(), np.array([0, 2]), listed, chunks)
    for i, r in enumerate((0, 2)):
        written = torch.zeros(n, dtype=torch.bool)
        written[torch.from_numpy(listed[i])] = True
        torch.testing.assert_close(some[r][:, written], want[r][:, written], rtol=0, atol=0)
        assert (some[r][:, ~written] == 7.0).all()
    assert (some[1] == 7.0).all()
    torch.testing.assert_close(out[:, :, quantized].double(), reference(codes, kmin, kmax, q, ids[quantized], scale),
                               rtol=1e-4, atol=1e-4)


def test_no_blocks_and_bad_shapes():
    codes, packed, kmin, kmax, q, ids = case(2, 3, 16, 8, cap=4, seed=0)
    assert qkeys_log_mass(packed, kmin, kmax, q, ids[:0], 1.0).shape == (2, 3, 0)
    with pytest.raises(ValueError, match="do not fit"):
        qkeys_log_mass(packed[:1], kmin, kmax, q, ids, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        qkeys_log_mass(packed, kmin[..., :8], kmax, q, ids, 1.0)


@pytest.mark.parametrize("rows,nq,d,bs", [(3, 3, 64, 16), (2, 4, 6, 8)])
def test_qkeys_or_bound_mixes_the_two_per_block(rows, nq, d, bs):
    """Blocks not quantized (the open one, anywhere in ids) get Quest's bound + log(count)."""
    codes, packed, kmin, kmax, q, ids = case(rows, nq, d, bs, cap=11, seed=3)
    scale = d ** -0.5
    quantized = torch.rand(ids.numel(), generator=torch.Generator().manual_seed(4)) < 0.7
    log_count = torch.rand(ids.numel()) * 3
    got = qkeys_log_mass_or_bound(packed, kmin, kmax, q, ids, quantized, log_count, scale)
    want = reference(codes, kmin, kmax, q, ids, scale)
    lo, hi = kmin[:, ids].double(), kmax[:, ids].double()
    bound = torch.maximum(q.double()[:, :, None] * lo[:, None], q.double()[:, :, None] * hi[:, None]).sum(-1)
    want[:, :, ~quantized] = (bound * scale + log_count.double())[:, :, ~quantized]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="shaped like ids"):
        qkeys_log_mass_or_bound(packed, kmin, kmax, q, ids, quantized[:-1], log_count, scale)


@pytest.mark.parametrize("rows,nq,d,bs,cap", [(1, 1, 64, 16, 40), (12, 3, 64, 16, 300), (4, 4, 128, 16, 90), (2, 5, 6, 8, 23)])
def test_top_blocks_are_forced_plus_topk_of_the_max_over_query_rows(rows, nq, d, bs, cap):
    """The fused ranking (scores, max over query rows, top-k, forced blocks, in ids' order) gives
    what the unfused path gives: ``qkeys_log_mass_or_bound(...).amax(1)`` and ``torch.topk``."""
    g = torch.Generator().manual_seed(rows * 100 + cap)
    codes, packed, kmin, kmax, q, ids = case(rows, nq, d, bs, cap, seed=cap)
    n = ids.numel()
    quantized = torch.rand(n, generator=g) < 0.9
    log_count = torch.rand(n, generator=g) * 3
    scale = d ** -0.5
    want_scores = qkeys_log_mass_or_bound(packed, kmin, kmax, q, ids, quantized, log_count, scale).amax(1)
    for trial in range(4):
        forced = torch.rand(n, generator=g) < (0.0, 0.1, 0.3, 0.05)[trial]
        free = n - int(forced.sum())
        for k in sorted({0, 1, free // 3, free}):
            chosen, scores = qkeys_top_blocks(packed, kmin, kmax, q, ids, quantized, log_count, scale,
                                              forced.numpy(), k)
            torch.testing.assert_close(scores, want_scores, rtol=0, atol=0)
            assert chosen.shape == (rows, int(forced.sum()) + k)
            top = want_scores.masked_fill(forced, float("-inf")).topk(k, dim=1).indices
            assert_forced_plus_top(chosen, ids, forced, top)
    with pytest.raises(ValueError, match="do not fit"):
        qkeys_top_blocks(packed, kmin, kmax, q, ids, quantized, log_count, scale, np.zeros(n, bool), n + 1)


def ranking_case(rows, nq, d, bs, cap, seed, g, tail):
    """Summaries of complete blocks on fresh random data, their reference scores (max over query
    rows), and a forced mask of the first block and the last ``tail``."""
    codes, packed, kmin, kmax, q, ids = case(rows, nq, d, bs, cap, seed=seed)
    n = ids.numel()
    quantized, log_count, scale = torch.ones(n, dtype=torch.bool), torch.rand(n, generator=g) * 3, d ** -0.5
    args = (packed, kmin, kmax, q, ids, quantized, log_count, scale)
    forced = torch.zeros(n, dtype=torch.bool)
    forced[0] = forced[-tail:] = True
    return args, qkeys_log_mass_or_bound(*args).amax(1), forced


def assert_forced_plus_top(chosen, ids, forced, top):
    """Each row chose the forced blocks and its ``top`` positions, in the order of ``ids``."""
    pos = {b: i for i, b in enumerate(ids.tolist())}
    for r in range(chosen.shape[0]):
        assert chosen[r].tolist() == sorted(ids[forced].tolist() + ids[top[r]].tolist(), key=pos.get)


@pytest.mark.parametrize("rows,nq,d,bs,cap", [(3, 2, 64, 16, 70), (12, 3, 64, 16, 300)])
def test_top_blocks_rank_by_scores_plus_bonus_and_return_the_scores(rows, nq, d, bs, cap):
    """With a bonus, the chosen blocks are the forced ones plus the top-k of scores + bonus
    (torch's topk on fresh random data); the scores returned are the scores alone."""
    g = torch.Generator().manual_seed(cap)
    args, want_scores, forced = ranking_case(rows, nq, d, bs, cap, cap + 1, g, tail=3)
    ids, n = args[4], args[4].numel()
    k = (n - 4) // 4
    for bonus_size in (0.5, 1.0, 4.0):
        bonus = (torch.rand(rows, n, generator=g) < 0.4).float() * bonus_size
        chosen, scores = qkeys_top_blocks(*args, forced.numpy(), k, bonus.numpy())
        torch.testing.assert_close(scores, want_scores, rtol=0, atol=0)
        top = (want_scores + bonus).masked_fill(forced, float("-inf")).topk(k, dim=1).indices
        plain = want_scores.masked_fill(forced, float("-inf")).topk(k, dim=1).indices
        assert_forced_plus_top(chosen, ids, forced, top)
        moved = sum(len(set(top[r].tolist()) - set(plain[r].tolist())) for r in range(rows))
        assert moved > 0                                   # the bonus changed some selections
    with pytest.raises(ValueError, match="bonus"):
        qkeys_top_blocks(*args, forced.numpy(), k, np.zeros((rows, n - 1), np.float32))


@pytest.mark.parametrize("rows,nq,d,bs,cap", [(5, 3, 64, 16, 120), (12, 3, 64, 16, 300)])
def test_kept_rows_rank_by_their_given_scores(rows, nq, d, bs, cap):
    """Rows marked kept are not scored: they rank (with this call's forced blocks and bonus) by
    the scores they come with, which are returned as given; the other rows are scored as
    without ``kept`` (fresh random data, torch's topk as the reference)."""
    g = torch.Generator().manual_seed(cap + rows)
    args, fresh, forced = ranking_case(rows, nq, d, bs, cap, cap + 2, g, tail=4)
    ids, n = args[4], args[4].numel()
    k = (n - 5) // 3
    bonus = (torch.rand(rows, n, generator=g) < 0.3).float() * 2
    for keep in (torch.rand(rows, generator=g) < 0.5, torch.ones(rows, dtype=torch.bool),
                 torch.zeros(rows, dtype=torch.bool)):
        given = torch.randn(rows, n, generator=g) * 4
        chosen, scores = qkeys_top_blocks(*args, forced.numpy(), k, bonus.numpy(), kept=(keep.numpy(), given.numpy()))
        want = torch.where(keep[:, None], given, fresh)
        torch.testing.assert_close(scores, want, rtol=0, atol=0)
        top = (want + bonus).masked_fill(forced, float("-inf")).topk(k, dim=1).indices
        assert_forced_plus_top(chosen, ids, forced, top)
    with pytest.raises(ValueError, match="kept rows"):
        qkeys_top_blocks(*args, forced.numpy(), k, kept=(np.ones(rows - 1, bool), np.zeros((rows, n), np.float32)))


@pytest.mark.parametrize("rows,nq,d,bs,cap", [(5, 3, 64, 16, 120), (12, 3, 64, 16, 300), (3, 2, 30, 8, 50)])
def test_two_stage_ranking_scores_only_the_best_bounded_candidates(rows, nq, d, bs, cap):
    """``candidates=n``: per row, Quest's bound (max over query rows, plus the bonus) picks the
    forced blocks and n others; only those are scored by their 2-bit keys (the scores of the
    one-stage kernel there, -inf elsewhere) and the top k of them (plus bonus) is chosen. Checked
    against torch ops on fresh random data, with kept rows, and n >= every free block as one stage."""
    g = torch.Generator().manual_seed(cap + 7)
    args, fine, forced = ranking_case(rows, nq, d, bs, cap, cap + 3, g, tail=3)
    packed, kmin, kmax, q, ids, quantized, log_count, scale = args
    n = ids.numel()
    free = n - int(forced.sum())
    lo, hi = kmin[:, ids].float(), kmax[:, ids].float()
    bound = (torch.maximum(q[:, :, None] * lo[:, None], q[:, :, None] * hi[:, None]).sum(-1) * scale
             + log_count).amax(1)                                                      # [rows, n]
    for k, n_cand, bonus_size in ((1, 1, 0.0), (free // 5, 2 * (free // 5), 1.0), (free // 4, free // 2, 0.0),
                                  (free // 3, free - 1, 2.0)):
        bonus = (torch.rand(rows, n, generator=g) < 0.3).float() * bonus_size
        cand = (bound + bonus).masked_fill(forced, float("-inf")).topk(n_cand, dim=1).indices
        keep = forced.expand(rows, -1).clone()
        keep.scatter_(1, cand, True)
        want = fine.masked_fill(~keep, float("-inf"))
        chosen, scores = qkeys_top_blocks(*args, forced.numpy(), k, bonus.numpy(), candidates=n_cand)
        torch.testing.assert_close(scores, want, rtol=0, atol=0)
        top = (want + bonus).masked_fill(forced, float("-inf")).topk(k, dim=1).indices
        assert_forced_plus_top(chosen, ids, forced, top)
    keep_rows = torch.rand(rows, generator=g) < 0.5                     # kept rows: neither stage runs
    given = torch.randn(rows, n, generator=g)
    chosen, scores = qkeys_top_blocks(*args, forced.numpy(), 2, kept=(keep_rows.numpy(), given.numpy()), candidates=4)
    torch.testing.assert_close(scores[keep_rows], given[keep_rows], rtol=0, atol=0)
    one_stage = qkeys_top_blocks(*args, forced.numpy(), 2)
    every = qkeys_top_blocks(*args, forced.numpy(), 2, candidates=free)
    assert torch.equal(every[0], one_stage[0]) and torch.equal(every[1], one_stage[1])
    with pytest.raises(ValueError, match="candidates"):
        qkeys_top_blocks(*args, forced.numpy(), 3, candidates=2)


def test_top_row_ties_nan_and_infinities():
    """Ties at the k-th score go to the lowest positions; NaN (in any query row) makes the
    block's score NaN and ranks it first, as torch.amax and torch.topk do; -inf ranks last."""
    def top(per_query, forced, k):
        per_query = np.asarray(per_query, np.float32)
        n = per_query.shape[1]
        scores, chosen = np.empty(n, np.float32), np.empty(int(np.sum(forced)) + k, np.int64)
        _row_max(per_query, scores)
        _top_row(scores, np.asarray(forced, np.bool_), np.zeros(0, np.float32), k, chosen, np.empty(n, np.float32))
        return scores, chosen.tolist()

    no = [False] * 6
    assert top([[1, 2, 2, 2, 0, 3]], no, 3)[1] == [1, 2, 5]
    assert top([[5, 5, 5, 5, 5, 5]], no, 2)[1] == [0, 1]
    assert top([[5, 5, 5, 5, 5, 5]], [True, False, False, False, False, True], 2)[1] == [0, 1, 2, 5]
    scores, chosen = top([[0, 1, 2, 3, 4, 5], [0, 1, np.nan, 3, 4, -1]], no, 2)
    assert np.isnan(scores[2]) and scores[5] == 5 and chosen == [2, 5]
    nan_first = [[np.nan, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert np.isnan(top(nan_first, no, 1)[0][0]) and top(nan_first, no, 1)[1] == [0]
    assert top([[-np.inf, 1, -np.inf, 3, -np.inf, -np.inf]], no, 3)[1] == [0, 1, 3]
    assert top([[-np.inf] * 6], no, 2)[1] == [0, 1]
    assert top([[np.inf, 1, np.inf, 3, 0, 0]], no, 1)[1] == [0]
    assert top([[1, 2, 3, 4, 5, 6]], [True] * 6, 0)[1] == list(range(6))
