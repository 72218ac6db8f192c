"""paged_attention's Triton and torch implementations against a float64 reference.

Where there is no GPU, tests/conftest.py sets TRITON_INTERPRET=1 and the Triton kernels run
in the interpreter on CPU tensors: slow, so the Triton cases are few and small.
"""
import importlib.util

import pytest
import torch
from paged_cases import make_case, reference
from triton_compile import compile_for_h100

from kvdrive_compile.kernels.paged_attention import (
    POISON_ENV,
    LaunchConfig,
    paged_attention,
    paged_attention_torch,
    paged_attention_triton,
)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv(POISON_ENV, "1")     # outputs start as NaN: an unwritten element fails


# (b, hkv, g, nq, d, bs, nb, empty (sequence, KV head) pairs): GQA 1/3/4/8, head_dim 64/128/256,
# block size 16/32/64, batch 1 and 8, one and three query tokens, a single block, empty
# selections, block lists split across programs.
TRITON_CASES = {
    "gqa4-d64-bs16-split": (1, 2, 4, None, 64, 16, 24, ()),
    "batch8-gqa1-bs32-empty": (8, 1, 1, None, 64, 32, 3, ((2, 0), (5, 0))),
    "gqa3-q3-d128-bs16": (2, 1, 3, 3, 128, 16, 5, ()),
    "gqa8-d256-bs64-single-block": (1, 1, 8, None, 256, 64, 1, ()),
    "d80-bs24-padded": (1, 1, 2, 2, 80, 24, 6, ()),
}
TORCH_CASES = {
    **TRITON_CASES,
    "batch8-q3-gqa4-d128": (8, 4, 4, 3, 128, 16, 12, ((0, 3), (5, 0))),
    "gqa8-q3-d64-bs64": (3, 2, 8, 3, 64, 64, 10, ((2, 1),)),
    "all-empty": (2, 2, 2, None, 64, 16, 4, ((0, 0), (0, 1), (1, 0), (1, 1))),
}
# Triton rounds q and the softmax probabilities to the pool dtype for the tensor cores
TRITON_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def on_device(*tensors):
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]


def check(out, lse, ref_out, ref_lse, tol, lse_tol=2e-5):
    assert out.dtype == lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.cpu(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu(), ref_lse.float(), atol=lse_tol, rtol=1e-5)


@pytest.mark.parametrize("case", TORCH_CASES.values(), ids=TORCH_CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_matches_reference(dtype, case):
    *shape, empty = case
    inputs = make_case(*shape, dtype, empty=empty)
    out, lse = paged_attention_torch(*inputs)
    check(out, lse, *reference(*inputs), tol=2e-5)


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES.values(), ids=TRITON_CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_reference(dtype, case):
    *shape, empty = case
    inputs = make_case(*shape, dtype, empty=empty)
    out, lse = paged_attention_triton(*on_device(*inputs))
    check(out, lse, *reference(*inputs), tol=TRITON_TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_agrees_with_torch(dtype):
    inputs = on_device(*make_case(2, 2, 4, 3, 64, 16, 14, dtype, empty=((1, 0),), seed=3))
    out_triton, lse_triton = paged_attention(*inputs, backend="triton")
    out_torch, lse_torch = paged_attention(*inputs, backend="torch")
    torch.testing.assert_close(out_triton, out_torch, atol=TRITON_TOL[dtype], rtol=TRITON_TOL[dtype])
    torch.testing.assert_close(lse_triton, lse_torch, atol=2e-5, rtol=1e-5)


@needs_triton
def test_triton_split_merge(monkeypatch):
    """Many splits per (sequence, KV head), some of them empty, merged two at a time (the merge
    reads the splits in chunks so that any number of them fits in registers)."""
    from kvdrive_compile.kernels import paged_attention as module

    monkeypatch.setattr(module, "_MERGE_FLOATS", 128)      # 2 splits of head_dim 64 at a time: 3 rounds
    launch = LaunchConfig(tile_bytes=2048, programs_per_sm=64)   # 4 blocks per split, 5 splits
    inputs = make_case(2, 2, 4, None, 64, 16, 20, torch.float16, empty=((1, 0),), seed=5)
    inputs[3][0, 1, 4:12] = -1                               # two whole splits of one row unused
    out, lse = paged_attention_triton(*on_device(*inputs), launch=launch)
    check(out, lse, *reference(*inputs), tol=TRITON_TOL[torch.float16])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_calls_again_with_fresh_data_are_right(dtype):
    """The second and later calls with the same shapes launch the kept compiled kernels directly
    on a GPU (kernels/triton_launcher.py; under the interpreter every call binds): each call on
    its own fresh pools, selection and query must still be right, split and merge alike."""
    from kvdrive_compile.kernels.paged_attention import _launchers

    split, merge = _launchers()
    before = split.direct_launches, merge.direct_launches
    for seed in range(3):
        inputs = make_case(2, 2, 4, None, 64, 16, 20, dtype, seed=10 + seed)
        out, lse = paged_attention_triton(*on_device(*inputs), launch=LaunchConfig(tile_bytes=2048, programs_per_sm=64))
        check(out, lse, *reference(*inputs), tol=TRITON_TOL[dtype])
    if DEVICE == "cuda":
        assert split.fallback_reason is None and merge.fallback_reason is None
        assert split.direct_launches - before[0] == 2       # the merge's key has no pool dtype: >= 2
        assert merge.direct_launches - before[1] >= 2


@needs_triton
def test_triton_all_empty():
    inputs = on_device(*make_case(2, 1, 4, None, 64, 16, 3, torch.float16, empty=((0, 0), (1, 0))))
    out, lse = paged_attention_triton(*inputs)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


COMPILE_FOR_H100 = """
from kvdrive_compile.kernels.triton_paged import merge_kernel, split_kernel

for pool, head_dim, block, rows in [("fp16", 128, 16, 16), ("bf16", 256, 64, 32), ("fp32", 64, 32, 16)]:
    types = {"q_ptr": "*" + pool, "k_ptr": "*" + pool, "v_ptr": "*" + pool, "table_ptr": "*i32",
             "lens_ptr": "*i32", "out_ptr": "*fp32", "lse_ptr": "*fp32", "qk_scale": "fp32",
             "softcap": "fp32"}
    constants = {"ROWS": rows, "HEAD_DIM": head_dim, "BLOCK": block, "BLOCKS_PER_STEP": 2,
                 "DOT_PRECISION": "ieee", "UPCAST_DOTS": False, "SOFTCAP": pool == "bf16"}
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in split_kernel.arg_names}
    compile(ASTSource(split_kernel, signature, constants), target=target, options={"num_warps": 4, "num_stages": 2})
    signature = {n: "constexpr" if n in ("SPLITS", "HEAD_DIM") else "*fp32" if n.endswith("_ptr") else "i32"
                 for n in merge_kernel.arg_names}
    compile(ASTSource(merge_kernel, signature, {"SPLITS": 4096 // head_dim, "HEAD_DIM": head_dim}), target=target,
            options={"num_warps": 1})
print("compiled")
"""


@needs_triton
def test_triton_kernels_compile_for_h100():
    compile_for_h100(COMPILE_FOR_H100)


SOFTCAP_CASES = {"gqa4-q3": (2, 2, 4, 3, 64, 16, 5, ()), "gqa2-one-token-empty": (2, 1, 2, None, 64, 16, 4, ((1, 0),))}


@pytest.mark.parametrize("case", SOFTCAP_CASES.values(), ids=SOFTCAP_CASES.keys())
@pytest.mark.parametrize("backend", ["torch", "numba", pytest.param("triton", marks=needs_triton)])
def test_soft_capped_scores_match_reference(backend, case):
    """Logit soft-capping (Gemma 2) on every backend, with q scaled up so the cap bites."""
    *shape, empty = case
    q, k_pool, v_pool, table, lens, scale = make_case(*shape, torch.float32, empty=empty, seed=3)
    q = q * 6
    ref_out, ref_lse = reference(q, k_pool, v_pool, table, lens, scale, softcap=2.0)
    uncapped = reference(q, k_pool, v_pool, table, lens, scale)[1]
    assert (ref_lse - uncapped)[ref_lse.isfinite()].abs().max() > 1.0          # the cap changes the result
    inputs = (q, k_pool, v_pool, table, lens) if backend != "triton" else on_device(q, k_pool, v_pool, table, lens)
    out, lse = paged_attention(*inputs, scale, backend=backend, softcap=2.0)
    check(out, lse, ref_out, ref_lse, tol=2e-5)


def test_dispatch():
    from kvdrive_compile.kernels.cpu_attention import cpu_partial_attention

    inputs = make_case(1, 1, 2, None, 64, 16, 2, torch.float32)
    out, lse = paged_attention(*inputs)                      # CPU tensors: the numba kernel
    ref_out, ref_lse = cpu_partial_attention(*inputs)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    out, lse = paged_attention(*inputs, backend="torch")
    ref_out, ref_lse = paged_attention_torch(*inputs)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    with pytest.raises(ValueError, match="backend"):
        paged_attention(*inputs, backend="cuda")


@pytest.mark.parametrize("queries,keys", [(0, 6), (3, 0), (0, 0)])
def test_attention_of_no_query_or_no_key_is_empty(queries, keys):
    """No query (a chunk of a split step with none left) or no key: out 0 and lse -inf of the
    right shapes, with or without a mask (the fused CPU kernel dies on zero queries)."""
    from kvdrive_compile.kernels.masked_attention import attention_with_lse

    q, k, v = torch.randn(2, 4, queries, 8), torch.randn(2, 2, keys, 8), torch.randn(2, 2, keys, 8)
    for bias, causal in ((None, False), (torch.zeros(2, 1, queries, keys), True)):
        out, lse = attention_with_lse(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), 0.5,
                                      None if bias is None else bias.to(DEVICE), causal)
        assert out.shape == (2, 4, queries, 8) and lse.shape == (2, 4, queries)
        assert not out.any() and bool((lse == float("-inf")).all())


@pytest.mark.parametrize("is_causal", [False, True])
def test_gathered_attention_soft_caps_before_the_bias(is_causal):
    """attention_with_lse (prefills, masked and gathered parts) with softcap: the cap applies to
    ``scale * q @ k^T``, then the bias, as Gemma 2's eager attention does."""
    from kvdrive_compile.kernels.masked_attention import attention_with_lse

    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, hq, 5, 16, generator=gen) * (4 if hq == 4 else 1) for hq in (4, 2, 2))
    bias = torch.where(torch.rand(2, 1, 5, 5, generator=gen) < 0.2, float("-inf"), torch.randn(2, 1, 5, 5, generator=gen))
    bias[..., 0] = 0.0                                            # every row sees a key
    out, lse = attention_with_lse(q, k, v, 0.25, bias, is_causal, softcap=1.5)
    kk, vv = k.repeat_interleave(2, dim=1).double(), v.repeat_interleave(2, dim=1).double()
    s = 1.5 * torch.tanh(q.double() @ kk.transpose(-1, -2) * 0.25 / 1.5) + bias.double()
    if is_causal:
        s = s.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).float(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out, (s.softmax(-1) @ vv).float(), atol=2e-5, rtol=1e-5)
