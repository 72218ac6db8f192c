"""The qkeys block-score kernel (numba) and its torch twin against a float64 reference on fresh
random codes and ranges."""
import importlib.util

import pytest
import torch

from kvdrive_compile.kernels.block_scores import (
    pack_codes,
    qkeys_log_mass,
    qkeys_log_mass_torch,
    qkeys_log_mass_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def case(rows, nq, d, bs, cap, seed):
    g = torch.Generator().manual_seed(seed)
    dp = -(-d // 4) * 4
    codes = torch.randint(0, 4, (rows, cap, bs, dp), generator=g, dtype=torch.uint8)
    codes[..., d:] = 0
    kmin = torch.randn(rows, cap, d, generator=g)
    kmax = kmin + torch.rand(rows, cap, d, generator=g) * 3
    kmax[:, 0, 0] = kmin[:, 0, 0]                             # a channel with an empty range
    q = torch.randn(rows, nq, d, generator=g) * 2
    ids = torch.randperm(cap, generator=g)[: max(1, cap - 3)]
    return codes, pack_codes(codes), kmin, kmax, q, ids


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
@pytest.mark.parametrize("use_dot", [True, False])
@pytest.mark.parametrize("rows,nq,d,bs", [(1, 1, 64, 16), (2, 3, 16, 8), (1, 4, 6, 8)])
def test_qkeys_triton_matches_float64(rows, nq, d, bs, use_dot):
    """The Triton kernel (the interpreter on a CPU machine: small shapes) on the model's device."""
    codes, packed, kmin, kmax, q, ids = case(rows, nq, d, bs, cap=5, seed=3)
    got = qkeys_log_mass_triton(*(t.to(DEVICE) for t in (packed, kmin, kmax, q, ids)), 0.25, use_dot=use_dot)
    assert got.shape == (rows, nq, ids.numel())
    torch.testing.assert_close(got.cpu().double(), reference(codes, kmin, kmax, q, ids, 0.25), rtol=1e-4, atol=1e-4)


def test_no_blocks_and_bad_shapes():
    codes, packed, kmin, kmax, q, ids = case(2, 3, 16, 8, cap=4, seed=0)
    assert qkeys_log_mass(packed, kmin, kmax, q, ids[:0], 1.0).shape == (2, 3, 0)
    with pytest.raises(ValueError, match="do not fit"):
        qkeys_log_mass(packed[:1], kmin, kmax, q, ids, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        qkeys_log_mass(packed, kmin[..., :8], kmax, q, ids, 1.0)
