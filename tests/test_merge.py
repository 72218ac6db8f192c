"""merge_partials against attention over the union of the parts, in float64."""
import pytest
import torch

from kvdrive_compile.kernels.merge import merge_partials


def reference(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores: [rows, S] float64, -inf = masked; v: [S, D]. Returns out [rows, D], lse [rows]."""
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    return p @ v, lse


def split_keys(n_keys: int, n_parts: int, gen: torch.Generator) -> list[torch.Tensor]:
    """n_parts disjoint, non-empty, randomly sized sets of key indices covering 0..n_keys-1."""
    cuts = torch.randperm(n_keys - 1, generator=gen)[: n_parts - 1].add(1).sort().values.tolist()
    order = torch.randperm(n_keys, generator=gen)
    return list(torch.tensor_split(order, cuts))


@pytest.mark.parametrize("offset", [0.0, 80.0], ids=["near", "lse-far-apart"])
@pytest.mark.parametrize("empty_part", [None, 0, -1], ids=["none-empty", "first-empty", "last-empty"])
@pytest.mark.parametrize("n_parts", [2, 3, 4])
def test_merge_matches_attention_over_union(n_parts, empty_part, offset):
    gen = torch.Generator().manual_seed(n_parts * 10 + (empty_part or 0))
    rows, n_keys, d = 6, 40, 16
    scores = torch.randn(rows, n_keys, generator=gen, dtype=torch.float64) * 3
    v = torch.randn(n_keys, d, generator=gen, dtype=torch.float64)
    parts = split_keys(n_keys, n_parts, gen)
    # part i's scores shifted by +-offset: part lses differ by up to 2 * offset
    for i, keys in enumerate(parts):
        scores[:, keys] += offset * (1 if i % 2 else -1)
    outs, lses = [], []
    for i, keys in enumerate(parts):
        if empty_part is not None and i == empty_part % n_parts:
            scores[:, keys] = float("-inf")
            outs.append(torch.full((rows, d), float("nan"), dtype=torch.float32))   # must be ignored
            lses.append(torch.full((rows,), float("-inf"), dtype=torch.float32))
            continue
        out_i, lse_i = reference(scores[:, keys], v[keys])
        outs.append(out_i.float())
        lses.append(lse_i.float())
    out, lse = merge_partials(outs, lses)
    ref_out, ref_lse = reference(scores, v)
    # an fp32 lse of magnitude ~offset carries ~offset * 6e-8 absolute error into the weights
    tol = 1e-6 + 3e-7 * offset
    torch.testing.assert_close(out, ref_out.float(), atol=tol, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("n_parts", [1, 3])
def test_merge_all_empty_gives_zero_and_minus_inf(n_parts):
    outs = [torch.full((2, 3, 8), float("nan")) for _ in range(n_parts)]
    lses = [torch.full((2, 3), float("-inf")) for _ in range(n_parts)]
    out, lse = merge_partials(outs, lses)
    assert torch.equal(out, torch.zeros(2, 3, 8))
    assert torch.equal(lse, torch.full((2, 3), float("-inf")))


def test_merge_rows_empty_in_some_parts_only():
    # row 0 has keys only in part 0, row 1 only in part 1
    out0, out1 = torch.tensor([[1.0, 2.0], [float("nan")] * 2]), torch.tensor([[float("nan")] * 2, [3.0, 4.0]])
    lse0, lse1 = torch.tensor([0.5, float("-inf")]), torch.tensor([float("-inf"), -2.0])
    out, lse = merge_partials([out0, out1], [lse0, lse1])
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(lse, torch.tensor([0.5, -2.0]))


def test_merge_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="matching"):
        merge_partials([torch.zeros(1, 2)], [])


def test_one_part_is_its_own_merge():
    """One part comes back as the general merge gives it next to an empty part, bit for bit: its
    out and lse, 0 where a row attended nothing (the kernels may leave anything there)."""
    gen = torch.Generator().manual_seed(7)
    out = torch.randn(3, 5, 8, generator=gen)
    lse = torch.randn(3, 5, generator=gen) * 20
    lse[1, 2] = float("-inf")
    out[1, 2] = float("nan")
    one = merge_partials([out], [lse])
    two = merge_partials([out, torch.zeros_like(out)], [lse, torch.full_like(lse, float("-inf"))])
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert torch.equal(one[0][1, 2], torch.zeros(8))
