"""Shared by the paged-kernel tests: random pools with a random selection, and a float64
gather-and-softmax reference."""
import math

import torch


def make_case(b, hkv, g, nq, d, bs, nb, dtype, empty=(), seed=0):
    """Random pools and a random selection; every slot and block tail not selected is NaN.

    Entry 1 of (0, 0) is -1 (a hole), each row's last block is partly filled, and the
    (sequence, KV head) pairs in ``empty`` select nothing. nq None: q is [B, Hq, D]."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = 2 * b * hkv * nb + 3
    k_pool = torch.randn(num_slots, bs, d, generator=gen).to(dtype)
    v_pool = torch.randn(num_slots, bs, d, generator=gen).to(dtype)
    table = torch.randperm(num_slots, generator=gen)[: b * hkv * nb].reshape(b, hkv, nb).int()
    lens = torch.full_like(table, bs)
    lens[..., -1] = torch.randint(1, bs + 1, (b, hkv), generator=gen, dtype=torch.int32)
    if nb > 2:
        table[0, 0, 1] = -1
    for bi, hi in empty:
        table[bi, hi] = -1
    selected = torch.zeros(num_slots, bs, dtype=torch.bool)
    for slot, n in zip(table.flatten().tolist(), lens.flatten().tolist()):
        if slot >= 0:
            selected[slot, :n] = True
    k_pool[~selected] = float("nan")
    v_pool[~selected] = float("nan")
    shape = (b, hkv * g, d) if nq is None else (b, hkv * g, nq, d)
    q = torch.randn(shape, generator=gen).to(dtype)
    return q, k_pool, v_pool, table, lens, 1 / math.sqrt(d)


def reference(q, k_pool, v_pool, table, lens, scale, softcap=0.0):
    """Gather each (sequence, KV head)'s tokens, float64 softmax (of the soft-capped scores
    ``softcap * tanh(s / softcap)`` where softcap > 0). Returns (out, lse) like q."""
    q4 = q.unsqueeze(2) if q.dim() == 3 else q
    b, hq, nq, d = q4.shape
    hkv = table.shape[1]
    g = hq // hkv
    out = torch.zeros(b, hq, nq, d, dtype=torch.float64)
    lse = torch.full((b, hq, nq), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for h in range(hkv):
            picked = [(s, n) for s, n in zip(table[bi, h].tolist(), lens[bi, h].tolist()) if s >= 0]
            if not picked:
                continue
            k = torch.cat([k_pool[s, :n] for s, n in picked]).double()             # [S, D]
            v = torch.cat([v_pool[s, :n] for s, n in picked]).double()
            scores = q4[bi, h * g:(h + 1) * g].double() @ k.T * scale               # [G, Q, S]
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            lse[bi, h * g:(h + 1) * g] = torch.logsumexp(scores, dim=-1)
            out[bi, h * g:(h + 1) * g] = torch.softmax(scores, dim=-1) @ v
    if q.dim() == 3:
        return out.squeeze(2), lse.squeeze(2)
    return out, lse
