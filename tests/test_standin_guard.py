"""A stand-in (a cache tensor whose KV the runtime holds) is only ever consumed by kvdrive ops:
the passes give any other reader a materialised copy, and eager code that reads one gets a
clear error, never NaN. Encoder-decoder cross-attention is left alone and exact."""
import math
import os
import sys

import pytest
import torch
import transformers as tf

import kvdrive_compile
from kvdrive_compile.backend import kvdrive_backend
from kvdrive_compile.passes.guard_standins import is_kvdrive_op, kvdrive_op, standin_outputs
from kvdrive_compile.passes.bind_kv_cache import is_size_query
from kvdrive_compile.runtime.standins import StandInReadError
from kvdrive_compile.runtimes import is_standin
from exactness import greedy_both, open_sessions

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import handwritten_model as hw  # noqa: E402

BUDGETS = dict(device_memory="64KiB", host_memory="32KiB", block_size=16, sink_tokens=0, local_window=0)


def _varied(model, std):
    """Random weights of a larger std: greedy output varies (a tiny model at its default init repeats
    one token, which would hide a wrong cross-attention)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return model.eval()


def bart(attn):
    cfg = tf.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128)
    return _varied(tf.BartForConditionalGeneration._from_config(cfg, attn_implementation=attn), 1.0)


def t5(attn):
    cfg = tf.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    return _varied(tf.T5ForConditionalGeneration._from_config(cfg, attn_implementation=attn), 2.0)


@pytest.mark.parametrize("build", [bart, t5])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_encoder_decoder_token_identical(build, attn):
    torch.manual_seed(0)
    model = build(attn).eval()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    ref, out = greedy_both(model, ids, 12, **BUDGETS)
    assert len(set(ref[:, -12:].flatten().tolist())) > 3, "the random model should not repeat one token"
    assert torch.equal(ref, out), (ref.tolist(), out.tolist())
    c = kvdrive_compile.counters
    assert c.sites_rewritten >= 2 * 2, c                    # the decoder's self-attention, both graphs
    assert all("cross-attention" in r or "no KV cache" in r or "no cache write" in r for r in c.skip_reasons), c.skip_reasons
    assert sum("cross-attention" in r for r in c.skip_reasons) == 2, c.skip_reasons   # at prefill, both layers
    assert open_sessions() == 0


# -- hand-written models whose attention the passes cannot always follow ---------------------

class DecodeSpelledOtherwise(hw.Attention):
    """Prefill as the example model; a decode step attends through ``decode_attention``."""

    def forward(self, x, past):
        b, t, _ = x.shape
        if t > 1:
            return super().forward(x, past)
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k = torch.cat([past[0], k], dim=-2)
        v = torch.cat([past[1], v], dim=-2)
        out = self.decode_attention(q, k, v)                                         # [B, H, 1, D]
        return self.o(out.transpose(1, 2).reshape(b, t, -1)), (k, v)


class EinsumDecodeAttention(DecodeSpelledOtherwise):
    """A decode step spells attention with 5-D einsums over (batch, KV head, group, ...): GQA
    without repeating K/V, a form the passes do not recognise."""

    def decode_attention(self, q, k, v):
        b, _, t, d = q.shape
        qg = q.view(b, self.kv_heads, self.heads // self.kv_heads, t, d)
        w = torch.einsum("bhgqd,bhkd->bhgqk", qg, k).div(math.sqrt(self.head_dim)).softmax(-1)
        return torch.einsum("bhgqk,bhkd->bhgqd", w, v).reshape(b, self.heads, t, d)


class WindowSliceAttention(DecodeSpelledOtherwise):
    """A decode step attends only the last WINDOW tokens: cat([past, new])[:, :, -W:]."""

    WINDOW = 24

    def decode_attention(self, q, k, v):
        kw, vw = k[:, :, -self.WINDOW:], v[:, :, -self.WINDOW:]
        return torch.nn.functional.scaled_dot_product_attention(q, kw, vw, enable_gqa=True)


def tiny_lm(attention_cls):
    torch.manual_seed(0)
    cfg = hw.TinyConfig(vocab=97, dim=32, layers=2, heads=4, kv_heads=2, max_len=256)
    model = hw.TinyLM(cfg)
    for block in model.blocks:
        block.attn = attention_cls(cfg)
    return model.eval()


@pytest.mark.parametrize("attention_cls", [EinsumDecodeAttention, WindowSliceAttention])
def test_decode_read_outside_a_site_is_exact(attention_cls, caplog):
    model = tiny_lm(attention_cls)
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(3))
    eager = hw.greedy(model.forward, model, ids, 10)
    compiled = torch.compile(model.forward, backend="kvdrive", options={"token_budget": None, **BUDGETS})
    with caplog.at_level("WARNING"):
        ours = hw.greedy(compiled, model, ids, 10)
    assert torch.equal(eager, ours), (eager.tolist(), ours.tolist())
    assert any("gathered from the runtime" in r.getMessage() for r in caplog.records)
    assert open_sessions() == 0


# -- eager code continuing a compiled cache --------------------------------------------------

def llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def mistral_sliding():
    torch.manual_seed(0)
    cfg = tf.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=24, max_position_embeddings=256)
    return tf.MistralForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("build", [llama, mistral_sliding])
@torch.no_grad()
def test_eager_continuation_of_a_compiled_cache_errors_then_materialises(build):
    model = build()
    ids = torch.randint(3, 128, (1, 50), generator=torch.Generator().manual_seed(4))
    nxt = torch.tensor([[7]])
    compiled = torch.compile(model.forward, backend="kvdrive", options={"token_budget": None, **BUDGETS})
    cache = compiled(ids, use_cache=True).past_key_values
    for _ in range(2):                                       # decode steps: the cache keeps stand-ins
        cache = compiled(nxt, cache=cache).past_key_values
    assert all(is_standin(layer.keys) and type(layer.keys).__name__ == "StandIn" for layer in cache.layers)
    with pytest.raises(StandInReadError, match="kvdrive_compile.materialize"):
        model(nxt, cache=cache)                  # the eager model reads a stand-in
    ref_cache = model(ids, use_cache=True).past_key_values
    for _ in range(2):
        ref_cache = model(nxt, cache=ref_cache).past_key_values
    ref = model(nxt, cache=ref_cache).logits
    fresh = compiled(ids, use_cache=True).past_key_values   # (the failed call left the cache half-updated)
    for _ in range(2):
        fresh = compiled(nxt, cache=fresh).past_key_values
    kvdrive_compile.materialize(fresh)
    assert not any(is_standin(layer.keys) for layer in fresh.layers)
    torch.testing.assert_close(model(nxt, cache=fresh).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [llama, mistral_sliding])
@torch.no_grad()
def test_a_deep_copied_cache_holds_the_real_kv_and_continues_exactly(build):
    """Hugging Face's recipe for reusing a prompt's cache: prefill once, ``copy.deepcopy`` the
    cache for each continuation. A copy holds the real K/V (gathered from the tiers, here
    partly on disk) and continues exactly, eagerly or compiled; the original keeps its
    stand-ins and continues exactly too."""
    import copy
    model = build()
    gen = torch.Generator().manual_seed(6)
    prefix = torch.randint(3, 128, (1, 60), generator=gen)
    tails = [torch.randint(3, 128, (1, n), generator=gen) for n in (4, 9)]
    eager = copy.deepcopy(model)
    model.compile(backend="kvdrive", options={"token_budget": None, **BUDGETS})
    cache = model(prefix, use_cache=True).past_key_values
    ref_cache = eager(prefix, use_cache=True).past_key_values
    assert all(is_standin(layer.keys) for layer in cache.layers)
    for tail in tails:
        ids = torch.cat([prefix, tail], 1)
        mine = copy.deepcopy(cache)
        assert not any(is_standin(t) for layer in mine.layers for t in (layer.keys, layer.values))
        for got, want in zip(mine.layers, ref_cache.layers):
            torch.testing.assert_close((got.keys, got.values), (want.keys, want.values), rtol=1e-5, atol=1e-5)
        out = model.generate(ids, cache=mine, max_new_tokens=6, do_sample=False)
        ref = eager.generate(ids, cache=copy.deepcopy(ref_cache), max_new_tokens=6, do_sample=False)
        assert torch.equal(out, ref), (out.tolist(), ref.tolist())
        torch.testing.assert_close(eager(tail, cache=copy.deepcopy(cache)).logits,      # eager continues a copy
                                   eager(tail, cache=copy.deepcopy(ref_cache)).logits, rtol=1e-5, atol=1e-5)
    assert all(is_standin(layer.keys) for layer in cache.layers)
    torch.testing.assert_close(model(tails[0], cache=cache).logits, eager(tails[0], cache=ref_cache).logits,
                               rtol=1e-5, atol=1e-5)
    del cache, mine, got       # (generate filled the last copy with stand-ins of its own generation)
    assert open_sessions() == 0


@torch.no_grad()
def test_beam_search_refused_clearly():
    model = llama()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    model.forward = torch.compile(model.forward, backend="kvdrive", options={"token_budget": None})
    with pytest.raises(Exception, match="num_beams=1"):
        model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False)
    assert open_sessions() == 0


# -- the property: after the passes, stand-in inputs only reach kvdrive ops -----------------

def _spy(graphs):
    def backend(gm, example_inputs, **kwargs):
        out = kvdrive_backend(gm, example_inputs, **kwargs)
        graphs.append((gm, list(example_inputs)))
        return out
    return backend


def _hf_generate(model, ids, backend):
    model.forward = torch.compile(model.forward, backend=backend, options={"token_budget": 32, **BUDGETS})
    with torch.no_grad():
        model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)


def _handwritten(attention_cls):
    def run(backend):
        model = tiny_lm(attention_cls)
        ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(6))
        hw.greedy(torch.compile(model.forward, backend=backend, options={"token_budget": 32, **BUDGETS}), model, ids, 6)
    return run


def _hf(build):
    def run(backend):
        torch.manual_seed(0)
        _hf_generate(build(), torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(6)), backend)
    return run


@pytest.mark.parametrize("run", [
    _hf(llama), _hf(mistral_sliding), _hf(lambda: bart("sdpa").eval()), _hf(lambda: t5("eager").eval()),
    _handwritten(hw.Attention), _handwritten(EinsumDecodeAttention), _handwritten(WindowSliceAttention),
], ids=["llama", "mistral-sliding", "bart", "t5", "handwritten", "handwritten-einsum", "handwritten-window"])
def test_standin_inputs_only_reach_kvdrive_ops(run):
    graphs = []
    run(_spy(graphs))
    checked = 0
    for gm, example_inputs in graphs:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        values = [n for n, v in zip(placeholders, example_inputs) if is_standin(v)] + standin_outputs(gm) + \
            [n for n in gm.graph.nodes if kvdrive_op(n) is torch.ops.kvdrive.standin_tail.default]
        for node in values:
            checked += 1
            for user in node.users:
                assert is_kvdrive_op(user) or is_size_query(user) or user.op == "output", \
                    f"stand-in input {node.name} is read by {user.name} ({user.target})"
    assert checked > 0 and any(is_standin(v) for _, ex in graphs for v in ex), \
        "no graph took a stand-in: the property was not exercised"
