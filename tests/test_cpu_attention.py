"""cpu_partial_attention (numba) against a float64 gather-and-softmax reference."""

import numpy as np
import pytest
import torch
from paged_cases import make_case, reference

from kvdrive_compile.kernels.cpu_attention import POISON_ENV, cpu_partial_attention


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv(POISON_ENV, "1")     # outputs start as NaN: an unwritten element fails


# (b, hkv, g, nq, d, bs, nb, empty (sequence, KV head) pairs): together they cover GQA 1/2/3/4/8,
# head_dim 64/128/256, block size 16/32/64, batch 1 and 8, one and three query tokens,
# a single block, empty selections, and block lists long enough to be split across threads.
CASES = {
    "gqa4-d128-bs16-split": (1, 2, 4, None, 128, 16, 40, ()),
    "batch8-gqa1-d64-bs32": (8, 2, 1, None, 64, 32, 6, ((3, 1), (7, 0))),
    "gqa3-q3-d64-bs16": (2, 1, 3, 3, 64, 16, 5, ()),
    "gqa8-d256-bs64": (1, 1, 8, None, 256, 64, 3, ()),
    "single-block": (1, 1, 4, None, 128, 32, 1, ()),
    "batch8-q3-gqa4-split": (8, 4, 4, 3, 128, 16, 24, ((0, 3), (5, 0))),
    "gqa8-q3-d64-bs64": (3, 2, 8, 3, 64, 64, 10, ((2, 1),)),
    "all-empty": (2, 2, 2, None, 64, 16, 4, ((0, 0), (0, 1), (1, 0), (1, 1))),
    "d80-bs24": (1, 1, 2, 2, 80, 24, 6, ()),
    # query rows per KV head not a multiple of four: 3 (SmolLM2's GQA 3) and 6 are padded to a
    # quad of rows inside the kernel, 9 = two quads + a single row
    "gqa3-d64-bs16": (2, 3, 3, None, 64, 16, 12, ()),
    "gqa3-q2-d128-bs32": (1, 2, 3, 2, 128, 32, 10, ()),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_partial_attention_matches_reference(dtype, case):
    *shape, empty = case
    q, k_pool, v_pool, table, lens, scale = make_case(*shape, dtype, empty=empty)
    out, lse = cpu_partial_attention(q, k_pool, v_pool, table, lens, scale)
    ref_out, ref_lse = reference(q, k_pool, v_pool, table, lens, scale)
    assert out.dtype == lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    # K/V are widened exactly and accumulated in fp32: fp32 tolerances for every storage dtype
    torch.testing.assert_close(out, ref_out.float(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-5, rtol=1e-5)
    for bi, h in empty:
        g = q.shape[1] // table.shape[1]
        assert torch.all(lse[bi, h * g:(h + 1) * g] == float("-inf"))
        assert torch.all(out[bi, h * g:(h + 1) * g] == 0)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_partial_attention_any_query_dtype(q_dtype):
    q, k_pool, v_pool, table, lens, scale = make_case(2, 2, 3, 3, 64, 16, 9, torch.float16)
    q = q.to(q_dtype)
    out, lse = cpu_partial_attention(q, k_pool, v_pool, table, lens, scale)
    ref_out, ref_lse = reference(q, k_pool, v_pool, table, lens, scale)
    torch.testing.assert_close(out, ref_out.float(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-5, rtol=1e-5)


def test_cpu_partial_attention_holes_and_large_scores():
    # holes (-1) scattered through a long list, and scores large enough to overflow a naive exp
    q, k_pool, v_pool, table, lens, _ = make_case(1, 1, 4, None, 64, 16, 48, torch.float32)
    table[0, 0, 5:30:3] = -1
    out, lse = cpu_partial_attention(q, k_pool, v_pool, table, lens, 20.0)
    ref_out, ref_lse = reference(q, k_pool, v_pool, table, lens, 20.0)
    torch.testing.assert_close(out, ref_out.float(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-4, rtol=1e-5)


def test_cpu_partial_attention_rejects_bad_shapes():
    q, k_pool, v_pool, table, lens, scale = make_case(1, 2, 2, None, 64, 16, 2, torch.float32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        cpu_partial_attention(q[:, :3], k_pool, v_pool, table, lens, scale)
    with pytest.raises(ValueError, match="block_table and block_lens"):
        cpu_partial_attention(q, k_pool, v_pool, table, lens[:, :1], scale)
    with pytest.raises(ValueError, match="slot"):
        cpu_partial_attention(q, k_pool, v_pool, table + k_pool.shape[0], lens, scale)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_partial_attention(q, k_pool[:, :8], v_pool[:, :8], table, lens.clamp(max=8), scale)


@pytest.mark.parametrize("token_bytes, bs", [(256, 16), (128, 24), (512, 64)])
def test_prefetch_plan_hints_every_line_of_the_blocks_ahead_once(token_bytes, bs):
    # the kernel hints, while block i is computed, segments of blocks i+2 .. i+9 round robin;
    # over a whole item every cache line of every block after the first two (K and V, only
    # the valid tokens of a partly filled block) must be hinted exactly once, and nothing else
    from kvdrive_compile.kernels.cpu_attention import _LINE, _PREFETCH_DISTANCE, _PREFETCH_STREAMS, _plan_hints

    gen = torch.Generator().manual_seed(token_bytes + bs)
    count = 21
    slots = torch.randperm(64, generator=gen)[:count].numpy().astype("int64")
    ns = torch.randint(1, bs + 1, (count,), generator=gen).numpy().astype("int64")
    slot_bytes, k_base, v_base = bs * token_bytes, 1 << 30, 1 << 40
    runs = np.zeros((2, 2 * _PREFETCH_STREAMS), np.int64)
    cursor = np.zeros(4, np.int64)
    hinted = []
    for i in range(count):
        _plan_hints(i, slots, ns, count, (k_base, v_base, slot_bytes, token_bytes), runs, cursor)
        for k in range(cursor[1]):                # the rounds _prefetch_some gives (its loop)
            for r in range(cursor[3]):
                if k < runs[1, r]:
                    hinted.append(int(runs[0, r] + k * _LINE))
    expected = []
    for j in range(_PREFETCH_DISTANCE, count):
        lines = -(-int(ns[j]) * token_bytes // _LINE)
        for base in (k_base, v_base):
            expected += [base + int(slots[j]) * slot_bytes + line * _LINE for line in range(lines)]
    assert sorted(hinted) == sorted(expected)
