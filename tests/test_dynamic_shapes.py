"""Prompt lengths, batch sizes and padding: two graphs (prefill, decode) serve them all, with
the default ``dynamic=None`` and with ``dynamic=True``; kvdrive leaves Dynamo's global settings
alone; skipped sites are reported once per graph."""
import logging

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import kvdrive_compile
from exactness import open_sessions

EXACT = {"token_budget": None, "device_memory": "48KiB", "host_memory": "8KiB", "sink_tokens": 0, "local_window": 0}


def llama(layers=1):
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def prompts(lengths, padded, seed):
    """``[B, max(lengths)]`` token ids, left-padded with an attention mask if ``padded``."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros((len(lengths), n), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        ids[i, n - length:] = torch.randint(3, 128, (length,), generator=g)
        mask[i, n - length:] = 1
    return ids, (dict(attention_mask=mask) if padded else {})


# (prompt lengths, left-padded): batch sizes 1, 2 and 3, eight shapes
GENERATES = [([20], False), ([33], False), ([20, 20], False), ([40, 25], True),
             ([17, 30, 9], True), ([50], False), ([12, 12, 12], False), ([44, 31], True)]


@torch.no_grad()
def generate_all(model, compile_model, cases, new_tokens=3):
    """Eager tokens first, then compiled; returns, per generate, (the family of graphs it needs,
    the graphs compiled so far). A family is one set of inputs Hugging Face passes: batch 1 or
    more (Dynamo specializes a size 1), attention mask or none."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    runs = [(prompts(lengths, padded, seed=i)) for i, (lengths, padded) in enumerate(cases)]
    refs = [model.generate(ids, **mask, **kw) for ids, mask in runs]
    compile_model(model)
    seen = []
    for (ids, mask), ref in zip(runs, refs):
        out = model.generate(ids, **mask, **kw)
        assert torch.equal(out, ref), (ids.shape, bool(mask))
        seen.append(((ids.shape[0] == 1, bool(mask)), kvdrive_compile.counters.graphs))
    return seen


def assert_two_graphs_per_family(seen):
    families = []
    for family, graphs in seen:
        families += [family] if family not in families else []
        assert graphs == 2 * len(families), seen


def test_eight_shapes_two_graphs_per_family_compiled_forward():
    def compile_forward(model):
        model.forward = torch.compile(model.forward, backend="kvdrive", options=EXACT)
    seen = generate_all(llama(), compile_forward, GENERATES)
    assert_two_graphs_per_family(seen)
    assert kvdrive_compile.counters.graphs == 6                       # 3 families
    assert kvdrive_compile.counters.sites_skipped == 0, kvdrive_compile.counters.skip_reasons
    assert open_sessions() == 0


def test_model_compile_two_graphs_for_any_batch_and_padding():
    seen = generate_all(llama(), lambda model: model.compile(backend="kvdrive", options=EXACT),
                        [([30, 12], True), ([9, 21, 40], True), ([5, 17], True)])
    assert [graphs for _, graphs in seen] == [2, 2, 2]
    assert kvdrive_compile.counters.dynamic_retraces == 2            # prefill and decode, once each


def test_dynamic_true_rewrites_every_site():
    model = llama()
    generate_all(model, lambda m: kvdrive_compile.compile(m, dynamic=True, **EXACT),
                        [([21], False), ([13, 30], True)])
    c = kvdrive_compile.counters
    assert c.sites_skipped == 0, c.skip_reasons                     # the scale is a SymFloat here
    assert c.sites_rewritten == 2 * 2                      # (prefill, decode) x 2 families, a site each
    assert c.dynamic_retraces == 0


def test_dynamic_false_is_left_static():
    def step(x, past):
        k = torch.cat([past, x], dim=-2)
        return F.scaled_dot_product_attention(x, k, k), k
    f = torch.compile(step, backend="kvdrive", dynamic=False, options=EXACT)
    past = torch.zeros(1, 2, 0, 8)
    with torch.no_grad():
        for t in (5, 7):
            f(torch.randn(1, 2, t, 8), past)
    assert kvdrive_compile.counters.graphs == 2 and kvdrive_compile.counters.dynamic_retraces == 0


def test_no_global_dynamo_setting_changes():
    """An unrelated compiled function in the same process behaves as without kvdrive: past its
    recompile limit it runs eagerly (a warning), it does not raise."""
    before = torch._dynamo.config.fail_on_recompile_limit_hit
    def step(x, past):
        k = torch.cat([past, x], dim=-2)
        return F.scaled_dot_product_attention(x, k, k), k
    with torch.no_grad():
        torch.compile(step, backend="kvdrive", options=EXACT)(torch.randn(1, 2, 4, 8), torch.zeros(1, 2, 0, 8))
    assert kvdrive_compile.counters.graphs == 1
    assert torch._dynamo.config.fail_on_recompile_limit_hit == before

    other = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2):
        for n in range(1, 5):                                          # a graph per shape, then eager
            assert torch.equal(other(torch.ones(n)), torch.full((n,), 2.0))


def cached_attention_read_elsewhere(x, past_k, past_v):
    """Two attention sites whose cached K is also read by other code: kvdrive leaves both."""
    outs, caches = [], []
    for pk, pv in zip(past_k, past_v):
        k, v = torch.cat([pk, x], dim=-2), torch.cat([pv, x], dim=-2)
        outs.append(F.scaled_dot_product_attention(x, k, v) + k.mean())
        caches.append((k, v))
    return outs, caches


@pytest.mark.parametrize("keeps_cache", [True, False])
def test_skipped_sites_one_line_per_graph(caplog, keeps_cache):
    past = [torch.zeros(1, 2, 0, 8)] * 2
    x = torch.randn(1, 2, 6, 8)
    if keeps_cache:
        fn, args = cached_attention_read_elsewhere, (x, past, past)
    else:                                       # K/V computed in the graph: no cache to keep
        fn, args = (lambda x: [F.scaled_dot_product_attention(x, x * i, x) for i in (1, 2)]), (x,)
    with caplog.at_level(logging.INFO, logger="kvdrive_compile.backend"), torch.no_grad():
        torch.compile(fn, backend="kvdrive", options=EXACT)(*args)
    lines = [r for r in caplog.records if "left as it was" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == (logging.WARNING if keeps_cache else logging.INFO)
    assert "2 of 2 sites" in lines[0].getMessage() and "2 x " in lines[0].getMessage()
    assert len(kvdrive_compile.counters.skip_reasons) == 2
