"""Placement never changes the answer: with tight three-tier budgets every cache policy, and the
graph with or without the scheduling pass, gives the greedy tokens kvdrive gives with all KV on
the device, at the same token budget (fp32). These runs rank blocks by their estimates alone
(``reuse_bonus=0``): the default bonus lets where blocks lie steer the selection on purpose
(tests/test_placement.py checks each such step against attention over what it selected)."""
import pytest
import torch
import transformers as tf

import kvdrive_compile
from exactness import assert_budgets_respected, compiled_copy_forward, open_sessions
from kvdrive_compile.prompts import passkey_prompt


@torch.no_grad()
def generate(model, ids, new_tokens, attention_mask=None, **options):
    eager = compiled_copy_forward(model, **options)
    try:
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        out = model.generate(ids, **kw)
    finally:
        model.forward = eager
        torch._dynamo.reset()
    return out


def unscheduled_passes(monkeypatch):
    """Compile without the scheduling pass: each site's ops in the order the rewrite wrote them."""
    from kvdrive_compile import backend
    from kvdrive_compile.passes.schedule import ScheduleSites

    passes = [p for p in backend.default_passes() if not isinstance(p, ScheduleSites)]
    monkeypatch.setattr(backend, "default_passes", lambda: passes)


def policies_agree(model, ids, new_tokens, sparse: dict, tiers: dict, attention_mask=None,
                   policies=("attention", "lru", "none"), monkeypatch=None) -> dict:
    """Tokens of the all-device run and of each policy under ``tiers``; asserts they agree. With
    ``monkeypatch``: also the unscheduled graph (no scheduling pass, ``prefetch_depth=0``)."""
    ref = generate(model, ids, new_tokens, attention_mask, **sparse)            # no budgets: all on the device
    if monkeypatch is not None:
        with monkeypatch.context() as m:
            unscheduled_passes(m)
            out = generate(model, ids, new_tokens, attention_mask, **sparse, **tiers, prefetch_depth=0)
        assert torch.equal(ref, out), ("unscheduled", ref[:, -new_tokens:].tolist(), out[:, -new_tokens:].tolist())
    stats = {}
    for policy in policies:
        out = generate(model, ids, new_tokens, attention_mask, **sparse, **tiers, cache_policy=policy)
        assert torch.equal(ref, out), (policy, ref[:, -new_tokens:].tolist(), out[:, -new_tokens:].tolist())
        st = kvdrive_compile.stats({**sparse, **tiers, "cache_policy": policy})
        assert st.served["disk"] > 0 and st.served["host"] > 0, st.served     # three tiers served the steps
        assert_budgets_respected()
        stats[policy] = st
        assert open_sessions() == 0
    return stats


def test_random_gqa_model_ragged_batch_of_three(monkeypatch):
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():                                     # weights that make greedy output vary
        for p in model.parameters():
            p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(5)
    lengths = [300, 170, 240]
    ids = torch.zeros((3, 300), dtype=torch.long)
    mask = torch.zeros((3, 300), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 300 - n:] = torch.randint(3, 128, (n,), generator=g)
        mask[i, 300 - n:] = 1
    sparse = dict(token_budget=64, dense_layers=0, sink_tokens=16, local_window=16, block_size=16, reuse_bonus=0)
    # 2 KiB slots, 6 rows: 3 pinned blocks per row and layer = 72 KiB; 19 blocks per row and layer
    tiers = dict(device_memory="96KiB", host_memory="96KiB")
    stats = policies_agree(model, ids, 16, sparse, tiers, mask, monkeypatch=monkeypatch)
    assert stats["attention"].admitted["device"] > 0 and stats["none"].hit_rate < stats["lru"].hit_rate


@pytest.mark.slow
def test_smollm2_policies_agree(smollm2, monkeypatch):
    model, tok = smollm2
    text, _ = passkey_prompt(tok, 700)
    ids = tok(text, return_tensors="pt").input_ids
    sparse = dict(token_budget=128, block_size=16, reuse_bonus=0)
    # ~46 KiB of KV per token: ~32 MiB in all; 30 layers pin 6 blocks x 3 rows x 8 KiB = 4.2 MiB.
    # lru and none, and the graph without the scheduling pass, are checked on the random model
    # above (each variant here costs a compile of SmolLM2)
    tiers = dict(device_memory="6MiB", host_memory="8MiB")
    policies_agree(model, ids, 10, sparse, tiers, policies=("attention",))
