"""Layers that share another layer's KV cache (Gemma 3n's and Gemma 4's KV-sharing layers
attend the K/V an earlier layer appended, with their own queries): one copy of the KV in the
tiers, each layer's attention exact (or over the blocks it selected), and the owner's
placement left to the owner. Also: pools of different head_dims share one byte budget."""
import re

import numpy as np
import pytest
import torch
import transformers as tf

import kvdrive_compile
from exactness import assert_budgets_respected, greedy_both, open_sessions
from kvdrive_compile.runtime import placement, site_step
from kvdrive_compile.runtime.kv_runtime import KVRuntime
from kvdrive_compile.runtime.placement import KVBudgetError
from kvdrive_compile.runtime.tiers import BlockPool, TierBudget
from test_crop import BS, BUDGETED, selected_bias, tiers_of
from test_runtime import EXACT_SMALL, attend, budgets_ok, reference

STATE = ("home", "home_slot", "dev", "host", "last_selected", "score", "rank_len")


def placement_state(kv):
    return {name: getattr(kv, name).copy() for name in STATE} | {"step": kv.step, "demand": kv.demand,
                                                                 "pick": id(kv.last_pick)}


@pytest.mark.parametrize("policy", ["exact", "budget"])
@pytest.mark.parametrize("tiers", ["device", "three"])
def test_layers_sharing_a_cache_attend_it_with_their_own_queries(tmp_path, tiers, policy):
    """Layer 0 appends; two more layers attend its KV with other queries each step (a prefill,
    chunks, decode steps over blocks on every tier): each output is the float64 reference's
    over the tokens (with a budget, of the blocks its own selection chose), and a sharing
    layer's plan moves nothing and leaves the owner's ranking and cache state as they were."""
    gen = torch.Generator().manual_seed(3 + (tiers == "three") + 2 * (policy == "budget"))
    b, hkv, g, d = 2, 2, 2, 8
    rt = tiers_of(tiers, tmp_path, BS * d * 2 * 4)
    session = rt.open_session()
    pol = BUDGETED if policy == "budget" else None
    k_ref, v_ref = torch.zeros(b, hkv, 0, d), torch.zeros(b, hkv, 0, d)
    k_si = v_si = torch.zeros(0)
    q0 = [torch.randn(b, hkv * g, 1, d, generator=gen) for _ in range(3)]
    differed = 0
    for step in range(24):
        n = 10 * BS if step == 0 else int(torch.randint(2, 3 * BS, (1,), generator=gen)) if step % 6 == 0 else 1
        k_new, v_new = torch.randn(b, hkv, n, d, generator=gen), torch.randn(b, hkv, n, d, generator=gen)
        k_si, v_si, p = site_step.append(rt, session, 0, k_si, v_si, k_new, v_new, False)
        k_ref, v_ref = torch.cat([k_ref, k_new], 2), torch.cat([v_ref, v_new], 2)
        kv = session.layers[0]
        selections = []
        for reader in range(3):                       # 0: the owner; 1, 2: layers sharing its KV
            q = q0[reader] + 0.3 * torch.randn(b, hkv * g, n, d, generator=gen)
            before = placement_state(kv)
            kw = {} if pol is None else {"policy": pol}
            out, plan = attend(rt, session, 0, q, p, n, k_new, v_new, shared=reader > 0, **kw)
            if reader:
                after = placement_state(kv)
                for name, value in before.items():
                    assert np.array_equal(value, after[name]), (step, reader, name)
            bias = None if pol is None else selected_bias(plan, b, hkv, g, n, 0, p + n)
            expect = reference(q, k_ref, v_ref, 0.125, bias)
            torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)
            selections.append(plan.selected)
        differed += any(s.shape != selections[0].shape or not torch.equal(s, selections[0]) for s in selections[1:])
        assert not session.plans
        budgets_ok(rt)
    if policy == "budget":
        assert differed, "the layers' own queries never selected other blocks than the owner's"
    if tiers == "three":
        st = rt.stats()
        assert st.tiers["disk"].resident_blocks and st.tiers["host"].resident_blocks
    rt.close()


def test_pools_of_different_head_dims_share_a_budget():
    """Pools of two slot sizes under one byte budget: a pool grows by half the budget's room at
    most, and slots that must be found (``reclaim``) take the room another pool reserved and
    does not use, that pool's slots in use keeping their values; an optional allocation takes
    only the room there is."""
    budget = TierBudget("device", 64 * 1024)
    small = BlockPool(budget, torch.device("cpu"), torch.float32, 4, 16, False)      # 512-byte slots
    large = BlockPool(budget, torch.device("cpu"), torch.float32, 4, 32, False)      # 1 KiB slots
    got = small.alloc(10)
    assert 0 < budget.room() <= 32 * 1024, "the first pool reserves half the room, not all of it"
    vals = torch.randn(10, 4, 16)
    small.k[got] = vals
    first = large.alloc_upto(40)
    assert 0 < len(first) < 40, "without reclaim: only the room there is"
    more = large.alloc_upto(40 - len(first), reclaim=True)
    assert len(first) + len(more) == 40 and budget.reserved <= budget.limit
    assert torch.equal(small.k[got], vals)
    assert small.alloc_upto(200) and budget.reserved <= budget.limit      # what is left, no more
    small.release(got)
    assert budget.peak <= budget.limit
    large.close()                  # a closed pool shares the budget no more: the other grows as if alone
    assert budget.pools == [small]


def gemma4(shared_layers, seed=0):
    """A random Gemma 4 text model: sliding and full layers of different head_dims, the last
    ``shared_layers`` attending the KV of the last earlier layer of their kind."""
    cfg = tf.Gemma4TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        vocab_size_per_layer_input=256, hidden_size_per_layer_input=16, num_kv_shared_layers=shared_layers,
        per_layer_config={"01": {"head_dim": 32}, "04": {"head_dim": 32}})
    torch.manual_seed(seed)
    return tf.Gemma4ForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def ragged_batch(n=70):
    ids = torch.randint(3, 256, (2, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    return ids, mask


@pytest.mark.parametrize("options", [
    {},
    {"device_memory": "40KiB", "host_memory": "24KiB", "local_window": 8, "sink_tokens": 4, "block_size": 4},
    {"token_budget": 24, "device_memory": "40KiB", "host_memory": "24KiB", "local_window": 8, "sink_tokens": 4,
     "block_size": 4},
], ids=["no-limits", "three-tiers", "budget-three-tiers"])
def test_gemma4_kv_sharing_layers_are_kept_in_the_tiers(options):
    """Gemma 4 with KV-sharing layers (sliding and full, head_dims 16 and 32): every attention
    site is rewritten (before, a shared cache left every site of the model as it was), the
    tokens are eager's with exact attention (tiers included), a budget runs within every
    byte budget, nothing is held after."""
    model = gemma4(shared_layers=2)
    ids, mask = ragged_batch()
    c0 = kvdrive_compile.counters.sites_rewritten, kvdrive_compile.counters.sites_found
    ref, out = greedy_both(model, ids, 8, attention_mask=mask, **options)
    found = kvdrive_compile.counters.sites_found - c0[1]
    assert found and kvdrive_compile.counters.sites_rewritten - c0[0] == found
    if options.get("token_budget") is None:
        assert torch.equal(out, ref)
    else:
        assert out.shape == ref.shape
    del out
    assert_budgets_respected()
    assert open_sessions() == 0


def test_a_device_budget_error_names_a_minimum_that_fits_layers_of_two_head_dims():
    """Layers of two head_dims: the KVBudgetError's minimum counts each layer's own blocks, and
    generation runs with it."""
    model = gemma4(shared_layers=0)
    ids, mask = ragged_batch(40)
    opts = {"local_window": 8, "sink_tokens": 4, "block_size": 4}
    with pytest.raises(KVBudgetError) as err:
        greedy_both(model, ids, 2, attention_mask=mask, device_memory="12KiB", **opts)
    minimum = int(re.search(r"Pass device_memory >= (\d+) bytes", str(err.value)).group(1))
    del err
    open_sessions()
    ref, out = greedy_both(model, ids, 4, attention_mask=mask, device_memory=minimum, **opts)
    assert torch.equal(out, ref)
    assert_budgets_respected()


def test_layers_of_two_head_dims_pack_their_pools_within_one_device_budget(tmp_path, monkeypatch):
    """Two layers of different head_dims under one small device budget, over three tiers: the
    pools hand each other unused capacity (moving blocks down to free slots at the top), and
    every step still attends exactly the reference's tokens."""
    moved = []                                     # per pack: whether it moved any block down

    def pack(rt, tier, pool):
        free = list(pool.free)
        real_pack(rt, tier, pool)
        moved.append(pool.free != free)

    real_pack = placement.pack_pool
    monkeypatch.setattr(placement, "pack_pool", pack)
    gen = torch.Generator().manual_seed(11)
    b, hkv, g = 2, 2, 2
    dims = (8, 16)
    small = BS * dims[0] * 2 * 4                                      # one slot of the smaller head_dim
    rt = KVRuntime(block_size=BS, device_memory=40 * small, host_memory=30 * small, disk_dir=str(tmp_path))
    session = rt.open_session(sites=2)
    refs = {layer: (torch.zeros(b, hkv, 0, d), torch.zeros(b, hkv, 0, d)) for layer, d in enumerate(dims)}
    standins = {layer: (torch.zeros(0), torch.zeros(0)) for layer in refs}
    policy = BUDGETED
    for step in range(30):
        n = 12 * BS if step == 0 else 1
        for layer, d in enumerate(dims):
            k_new, v_new = torch.randn(b, hkv, n, d, generator=gen), torch.randn(b, hkv, n, d, generator=gen)
            k_si, v_si, p = site_step.append(rt, session, layer, *standins[layer], k_new, v_new, False)
            standins[layer] = (k_si, v_si)
            k_ref, v_ref = (torch.cat([r, x], 2) for r, x in zip(refs[layer], (k_new, v_new)))
            refs[layer] = (k_ref, v_ref)
            q = torch.randn(b, hkv * g, n, d, generator=gen)
            out, plan = attend(rt, session, layer, q, p, n, k_new, v_new, policy=policy if step else EXACT_SMALL)
            bias = selected_bias(plan, b, hkv, g, n, 0, p + n) if step else None
            torch.testing.assert_close(out.double(), reference(q, k_ref, v_ref, 0.125, bias), atol=1e-5, rtol=1e-5)
        budgets_ok(rt)
    assert any(moved), "no pool moved a block down to give capacity back: the case is not exercised"
    rt.close()
