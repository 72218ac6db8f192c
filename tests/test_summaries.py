"""Block summaries against plain references on fresh random keys: min/max/sum, the 2-bit
quantized keys ("qkeys") and the log-mass estimates each summary gives a query."""
import math

import pytest
import torch

from kvdrive_compile.kernels.block_scores import pack_codes, round_range, unpack_codes
from kvdrive_compile.runtime.summaries import BlockSummaries


def folded(rows, d, bs, k, chunks):
    """Summaries fed ``k [rows, n, D]`` in pieces of the given sizes (prefill, then decode steps)."""
    s = BlockSummaries(rows, d, bs, torch.device("cpu"))
    pos = 0
    for n in chunks:
        s.update(pos, k[:, pos:pos + n])
        pos += n
    return s


def reference_qkeys(k, bs):
    """Per complete block, keys quantized to 4 levels within the block's per-channel min/max
    (as stored: in fp16, rounded outward): float64."""
    rows, n, d = k.shape
    full = n // bs
    kb = k[:, : full * bs].double().reshape(rows, full, bs, d)
    lo, hi = (x.double() for x in round_range(kb.amin(2, keepdim=True), kb.amax(2, keepdim=True)))
    step = (hi - lo) / 3
    codes = torch.where(step > 0, ((kb - lo) / torch.where(step > 0, step, 1)).round().clamp(0, 3), 0)
    return lo + codes * step                                                 # [rows, full, bs, D]


def test_pack_unpack_roundtrip():
    codes = torch.randint(0, 4, (3, 5, 16, 24), dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (3, 5, 16, 6) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed), codes)


@pytest.mark.parametrize("d", [8, 6, 64])
@pytest.mark.parametrize("chunks", [[70], [33, 1, 1, 1, 20, 1, 7], [1] * 40])
def test_incremental_updates_equal_one_shot(d, chunks):
    rows, bs = 3, 8
    n = sum(chunks)
    k = torch.randn(rows, n, d)
    a, b = folded(rows, d, bs, k, [n]), folded(rows, d, bs, k, chunks)
    for name in ("kmin", "kmax", "ksum", "codes"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)
    assert a.length == b.length == n
    torch.testing.assert_close(a.tail[:, : n % bs], k[:, n - n % bs:])
    full = n // bs
    kb = k[:, : full * bs].reshape(rows, full, bs, d)
    lo, hi = round_range(kb.amin(2), kb.amax(2))          # the range, in fp16 rounded outward
    assert torch.equal(a.kmin[:, :full], lo) and torch.equal(a.kmax[:, :full], hi)
    torch.testing.assert_close(a.ksum[:, :full], kb.sum(2), rtol=1e-5, atol=1e-5)


def test_out_of_order_keys_are_refused():
    s = BlockSummaries(1, 8, 4, torch.device("cpu"))
    s.update(0, torch.randn(1, 5, 8))
    with pytest.raises(RuntimeError, match="hold 5 tokens"):
        s.update(3, torch.randn(1, 1, 8))


@pytest.mark.parametrize("batch,hkv,g,nq", [(1, 1, 1, 1), (2, 3, 3, 1), (1, 2, 4, 3)])
def test_scores_match_reference(batch, hkv, g, nq):
    """Each summary's log-mass estimate, per query row, against float64 formulas; the open last
    block of qkeys falls back to the min/max bound."""
    d, bs, n, scale = 16, 8, 8 * 9 + 5, 0.3
    rows = batch * hkv
    k = torch.randn(rows, n, d) + torch.randn(rows, 1, d)       # an offset shared by the blocks
    s = folded(rows, d, bs, k, [50, 1, 1, n - 52])
    q = torch.randn(batch, hkv * g, nq, d)
    nb = -(-n // bs)
    ids = torch.arange(nb)
    counts = torch.tensor([min(bs, n - i * bs) for i in range(nb)])
    qd = q.double().reshape(rows, g * nq, d)
    kd = torch.nn.functional.pad(k.double(), (0, 0, 0, nb * bs - n), value=float("nan")).reshape(rows, nb, bs, d)
    valid = ~kd[..., 0].isnan()                                                  # [rows, nb, bs]
    lo = torch.where(valid[..., None], kd, math.inf).amin(2)
    hi = torch.where(valid[..., None], kd, -math.inf).amax(2)
    lo, hi = (x.double() for x in round_range(lo, hi))           # the range as stored
    bound = torch.maximum(qd[:, :, None] * lo[:, None], qd[:, :, None] * hi[:, None]).sum(-1) * scale \
        + counts.double().log()
    mean = torch.where(valid[..., None], kd, 0).sum(2) / counts.double()[None, :, None]
    want = {"minmax": bound, "mean": torch.einsum("rgd,rnd->rgn", qd, mean) * scale + counts.double().log()}
    kq = reference_qkeys(k, bs)                                                  # [rows, nb - 1, bs, D]
    qk = bound.clone()
    qk[:, :, : nb - 1] = torch.logsumexp(torch.einsum("rgd,rntd->rgnt", qd, kq) * scale, -1)
    want["qkeys"] = qk
    perm = torch.randperm(nb, generator=torch.Generator().manual_seed(batch))   # the open block anywhere
    for kind, ref in want.items():
        got = s.scores(q, ids, kind, counts, scale)
        assert got.shape == (rows, g * nq, nb)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4, msg=kind)
        got = s.scores(q, ids[perm], kind, counts[perm], scale)                 # any order of ids
        torch.testing.assert_close(got.double(), ref[:, :, perm], rtol=1e-4, atol=1e-4, msg=kind)


def test_qkeys_error_is_within_half_a_step():
    rows, d, bs = 2, 32, 16
    k = torch.randn(rows, 64, d) * torch.rand(1, 1, d) * 5
    kq = reference_qkeys(k, bs).float().reshape(rows, 64, d)
    kb = k.reshape(rows, 4, bs, d)
    lo, hi = round_range(kb.amin(2), kb.amax(2))
    half_step = ((hi.float() - lo.float()) / 6).repeat_interleave(bs, 1)
    assert ((kq - k).abs() <= half_step + 1e-5).all()


def spiky_blocks(nb=12, bs=16, d=16, target_block=5):
    """Blocks whose keys each spike in one channel (toward the query), and one block that holds
    the key the query matches: its true attention mass is the largest by far, while the min/max
    bound of every spiky block is larger than its own."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(d, generator=g)
    k = torch.randn(1, nb * bs, d, generator=g) * 0.1
    for b in range(nb):
        if b != target_block:
            for j in range(d):
                k[0, b * bs + j, j] = 4 * torch.sign(target[j])
    k[0, target_block * bs + 7] = target
    s = folded(1, d, bs, k, [nb * bs])
    q = target.view(1, 1, 1, d)
    true = torch.logsumexp((k[0] @ target).view(nb, bs), -1)
    return s, q, true


def test_qkeys_find_the_block_the_minmax_bound_misses():
    s, q, true = spiky_blocks()
    nb = true.numel()
    counts = torch.full((nb,), 16)
    assert int(true.argmax()) == 5
    assert int(s.scores(q, torch.arange(nb), "qkeys", counts, 1.0)[0, 0].argmax()) == 5
    assert int(s.scores(q, torch.arange(nb), "minmax", counts, 1.0)[0, 0].argmax()) != 5
