"""The pass pipeline on hand-written attention in its common spellings, sites it must leave
alone, and the custom ops' own checks."""
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kvdrive_compile
from kvdrive_compile import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import handwritten_model  # noqa: E402

D, HQ, HKV = 16, 4, 2


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def causal_bias(t, p):
    return torch.full((t, p + t), float("-inf")).triu(p + 1)


def v_sdpa_gqa(q, k, v, t, p):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_bias(t, p) if t > 1 else None,
                                          enable_gqa=True)


def v_sdpa_repeat_kv_bool_mask(q, k, v, t, p):
    keep = torch.ones(t, p + t, dtype=torch.bool).tril(p)
    return F.scaled_dot_product_attention(q, repeat_kv(k, HQ // HKV), repeat_kv(v, HQ // HKV),
                                          attn_mask=keep, scale=0.3)


def v_matmul_div_add(q, k, v, t, p):
    kk, vv = repeat_kv(k, 2), repeat_kv(v, 2)
    s = torch.matmul(q, kk.transpose(2, 3)) / math.sqrt(D) + causal_bias(t, p)
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), vv)


def v_at_method_softmax_masked_fill(q, k, v, t, p):
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    s = (q @ kk.mT) * (D ** -0.5)
    s = s.masked_fill(torch.ones(t, p + t, dtype=torch.bool).triu(p + 1), float("-inf"))
    return s.softmax(-1) @ vv


def v_tensor_scale_where(q, k, v, t, p):
    kk, vv = repeat_kv(k, 2), repeat_kv(v, 2)
    s = torch.matmul(q, kk.permute(0, 1, 3, 2))
    s = s / torch.full([], D ** 0.5, dtype=s.dtype)
    s = torch.where(torch.ones(t, p + t, dtype=torch.bool).tril(p), s, torch.finfo(s.dtype).min)
    return torch.matmul(torch.softmax(s, dim=-1), vv)


def v_einsum_scale_first(q, k, v, t, p):
    kk, vv = repeat_kv(k, 2), repeat_kv(v, 2)
    s = torch.einsum("b h i d, b h j d -> b h i j", q * D ** -0.5, kk) + causal_bias(t, p)
    return torch.einsum("...ij,...jd->...id", F.softmax(s, dim=-1), vv)


def v_bmm(q, k, v, t, p):
    b = q.shape[0]
    kk, vv = repeat_kv(k, 2), repeat_kv(v, 2)
    q3 = q.reshape(b * HQ, t, D)
    k3 = kk.reshape(b * HQ, p + t, D)
    v3 = vv.reshape(b * HQ, p + t, D)
    s = torch.bmm(q3, k3.transpose(1, 2)) * (1 / math.sqrt(D)) + causal_bias(t, p)
    return torch.bmm(torch.softmax(s, -1), v3).reshape(b, HQ, t, D)


def v_head_factor_first(q, k, v, t, p):
    """A per-head temperature ``[1, H, 1, 1]`` on the left of the scores (folded into q)."""
    temperature = torch.linspace(0.5, 1.5, HQ).view(1, HQ, 1, 1)
    s = temperature * torch.matmul(q, repeat_kv(k, 2).transpose(2, 3)) + causal_bias(t, p)
    return torch.softmax(s, -1) @ repeat_kv(v, 2)


def v_softcapped(q, k, v, t, p):
    """Gemma 2's logit soft-capping, strong enough to change the result: tanh(s / c) * c, then the mask."""
    s = torch.matmul(q * 4, repeat_kv(k, 2).transpose(2, 3)) * D ** -0.5
    s = torch.tanh(s / 0.5) * 0.5 + causal_bias(t, p)
    return torch.matmul(s.softmax(-1), repeat_kv(v, 2))


def v_sinks_row_max(q, k, v, t, p):
    """gpt-oss's eager attention: a sink logit per head as an extra softmax column, the row max
    subtracted, the sink's probability dropped before @ v."""
    s = torch.matmul(q, repeat_kv(k, 2).transpose(2, 3)) * D ** -0.5 + causal_bias(t, p)
    sinks = torch.linspace(-1.0, 2.0, HQ).reshape(1, -1, 1, 1).expand(q.shape[0], -1, t, -1)
    logits = torch.cat([s, sinks], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = F.softmax(logits, dim=-1, dtype=logits.dtype)
    return torch.matmul(probs[..., :-1], repeat_kv(v, 2))


def v_stable_softmax(q, k, v, t, p):
    """A hand-stabilised softmax: the row max (amax) subtracted first."""
    s = torch.matmul(q, repeat_kv(k, 2).transpose(2, 3)) * D ** -0.5 + causal_bias(t, p)
    return torch.matmul((s - s.amax(-1, keepdim=True)).softmax(-1), repeat_kv(v, 2))


VARIANTS = [v_sdpa_gqa, v_sdpa_repeat_kv_bool_mask, v_matmul_div_add, v_at_method_softmax_masked_fill,
            v_tensor_scale_where, v_einsum_scale_first, v_bmm, v_head_factor_first, v_softcapped,
            v_sinks_row_max, v_stable_softmax]


def make_step(variant, token_major=False):
    """A model step whose cache is ``[B, Hkv, T, D]`` appended on dim -2, or with ``token_major``
    ``[B, T, Hkv, D]`` appended on dim 1 (transposed for the attention)."""
    def step(x, past_k, past_v, wq, wk, wv):
        b, t, _ = x.shape
        q = (x @ wq).view(b, t, HQ, D).transpose(1, 2)
        k_new, v_new = (x @ wk).view(b, t, HKV, D), (x @ wv).view(b, t, HKV, D)
        if token_major:
            k, v = torch.cat([past_k, k_new], dim=1), torch.cat([past_v, v_new], dim=1)
            out = variant(q, k.transpose(1, 2), v.transpose(1, 2), t, past_k.shape[1])
        else:
            k = torch.cat([past_k, k_new.transpose(1, 2)], dim=-2)
            v = torch.cat([past_v, v_new.transpose(1, 2)], dim=-2)
            out = variant(q, k, v, t, past_k.shape[-2])
        return out.sum(1), k, v
    return step


def run_steps(fn, x_steps, w, token_major=False):
    past_k = past_v = torch.zeros((2, 0, HKV, D) if token_major else (2, HKV, 0, D))
    outs = []
    for x in x_steps:
        out, past_k, past_v = fn(x, past_k, past_v, *w)
        outs.append(out)
    return outs


def eager_and_compiled(variant, prompt, decode_steps, options, token_major=False):
    """Outputs of ``variant``'s model step, eager and compiled with kvdrive, over a prompt of
    ``prompt`` tokens and ``decode_steps`` one-token steps (batch 2, fresh random weights)."""
    torch.manual_seed(0)
    w = [torch.randn(32, HQ * D) * 0.2, torch.randn(32, HKV * D) * 0.2, torch.randn(32, HKV * D)]
    steps = [torch.randn(2, prompt, 32)] + [torch.randn(2, 1, 32) for _ in range(decode_steps)]
    step = make_step(variant, token_major)
    ref = run_steps(step, steps, w, token_major)
    with torch.no_grad():
        out = run_steps(torch.compile(step, backend="kvdrive", options=options), steps, w, token_major)
    return ref, out


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda f: f.__name__)
def test_attention_spellings_are_rewritten_and_exact(variant):
    ref, out = eager_and_compiled(variant, 40, 5, {"device_memory": "128KiB", "host_memory": 4096})
    c = kvdrive_compile.counters
    assert c.sites_rewritten == c.graphs and c.sites_skipped == 0 and c.caches_unclaimed == 0, c
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_site_whose_kv_is_used_elsewhere_is_left_alone_with_a_warning(caplog):
    def step(x, past_k, past_v, wq, wk, wv):
        out, k, v = make_step(v_sdpa_gqa)(x, past_k, past_v, wq, wk, wv)
        return out + k.mean(), k, v                         # reads the cached K's values
    torch.manual_seed(0)
    w = [torch.randn(32, HQ * D), torch.randn(32, HKV * D), torch.randn(32, HKV * D)]
    steps = [torch.randn(2, 10, 32), torch.randn(2, 1, 32)]
    ref = run_steps(step, steps, w)
    with caplog.at_level(logging.WARNING, logger="kvdrive_compile.backend"):
        out = run_steps(torch.compile(step, backend="kvdrive"), steps, w)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a)
    assert kvdrive_compile.counters.sites_rewritten == 0
    assert any("left as it was" in r.message and "also used by" in r.message for r in caplog.records)


def v_clamped(q, k, v, t, p):
    """A clamp on the scores: an op kvdrive's kernels do not apply."""
    s = torch.matmul(q, repeat_kv(k, 2).transpose(2, 3)) * D ** -0.5
    s = s.clamp(-2.0, 2.0) + causal_bias(t, p)
    return torch.matmul(s.softmax(-1), repeat_kv(v, 2))


def v_capped_with_the_bias(q, k, v, t, p):
    """Soft-capping applied after the bias: the kernels cap before it, so not theirs to apply."""
    s = torch.matmul(q, repeat_kv(k, 2).transpose(2, 3)) * D ** -0.5 + causal_bias(t, p).clamp(min=-1e4)
    s = torch.tanh(s / 5.0) * 5.0
    return torch.matmul(s.softmax(-1), repeat_kv(v, 2))


def v_grouped_einsum(q, k, v, t, p):
    """GQA without repeating K/V: 5-D einsums over (batch, KV head, group), not a form kvdrive
    recognises."""
    qg = q.view(q.shape[0], HKV, HQ // HKV, t, D)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, k) * D ** -0.5 + causal_bias(t, p)
    return torch.einsum("bhgqk,bhkd->bhgqd", s.softmax(-1), v).reshape(q.shape[0], HQ, t, D)


def v_scaled_values(q, k, v, t, p):
    """V scaled after the cache: the attention's V is not the cache's, so kvdrive cannot keep it."""
    s = torch.matmul(q, repeat_kv(k, 2).transpose(2, 3)) * D ** -0.5 + causal_bias(t, p)
    return torch.matmul(s.softmax(-1), repeat_kv(v, 2) * 2.0)


def v_per_key_factor(q, k, v, t, p):
    """Scores scaled per key ``[1, 1, 1, S]``: not a factor kvdrive can fold into q."""
    s = torch.matmul(q, repeat_kv(k, 2).transpose(2, 3)) * torch.linspace(0.5, 1.5, p + t) + causal_bias(t, p)
    return torch.softmax(s, -1) @ repeat_kv(v, 2)


@pytest.mark.parametrize("variant, token_major, says", [
    (v_clamped, False, "the scores pass through clamp"),
    (v_capped_with_the_bias, False, "the scores pass through tanh"),
    (v_grouped_einsum, False, "feed no attention kvdrive recognises"),
    (v_scaled_values, False, "V (mul"),
    (v_sdpa_gqa, True, "is a view or layout change of the cache"),
    (v_per_key_factor, False, "which varies along the keys")],
    ids=["clamped", "capped-with-the-bias", "grouped-einsum", "scaled-values", "token-major-cache", "per-key-factor"])
def test_attention_kvdrive_cannot_apply_is_reported_not_silently_left(variant, token_major, says, caplog):
    """A cache the model grows but kvdrive does not keep is exact but outside the budgets: a
    WARNING per graph says so (and why), and the counters show it; never silence."""
    with caplog.at_level(logging.WARNING, logger="kvdrive_compile.backend"):
        ref, out = eager_and_compiled(variant, 12, 2, {"device_memory": "128KiB", "token_budget": 8}, token_major)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    c = kvdrive_compile.counters
    assert c.sites_rewritten == 0 and any(says in r for r in c.skip_reasons), c
    warned = [r.message for r in caplog.records if r.levelno == logging.WARNING and says in r.message]
    assert len(warned) == c.graphs >= 2, warned          # each graph's own warning, decode steps included


def test_attention_whose_weights_are_returned_is_left_exact_with_a_warning(caplog):
    """output_attentions=True returns the softmax weights, which kvdrive's kernels do not
    produce: the site is left as it was (exact, weights included) and a WARNING says why."""
    def step(x, past_k, past_v, wq, wk, wv):
        b, t, _ = x.shape
        q = (x @ wq).view(b, t, HQ, D).transpose(1, 2)
        k = torch.cat([past_k, (x @ wk).view(b, t, HKV, D).transpose(1, 2)], dim=-2)
        v = torch.cat([past_v, (x @ wv).view(b, t, HKV, D).transpose(1, 2)], dim=-2)
        s = q @ repeat_kv(k, 2).transpose(2, 3) * D ** -0.5 + causal_bias(t, past_k.shape[-2])
        weights = s.softmax(-1)
        return (weights @ repeat_kv(v, 2)).sum(1), weights, k, v

    torch.manual_seed(0)
    w = [torch.randn(32, HQ * D) * 0.2, torch.randn(32, HKV * D) * 0.2, torch.randn(32, HKV * D)]
    xs = [torch.randn(2, 12, 32), torch.randn(2, 1, 32), torch.randn(2, 1, 32)]
    compiled = torch.compile(step, backend="kvdrive", options={"device_memory": "128KiB", "token_budget": 8})
    outs = {}
    with caplog.at_level(logging.WARNING, logger="kvdrive_compile.backend"), torch.no_grad():
        for name, fn in (("eager", step), ("kvdrive", compiled)):
            past_k = past_v = torch.zeros(2, HKV, 0, D)
            outs[name] = []
            for x in xs:
                out, weights, past_k, past_v = fn(x, past_k, past_v, *w)
                outs[name] += [out, weights]
    for a, b in zip(outs["eager"], outs["kvdrive"]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert kvdrive_compile.counters.sites_rewritten == 0
    assert any("output_attentions" in r.message and "stays in the model" in r.message for r in caplog.records)


def test_static_cache_is_recognised_and_left_alone(caplog):
    def step(x, cache_k, cache_v, pos, wk, wv):
        b, t, _ = x.shape
        cache_k.index_copy_(2, pos, (x @ wk).view(b, t, HKV, D).transpose(1, 2))
        cache_v.index_copy_(2, pos, (x @ wv).view(b, t, HKV, D).transpose(1, 2))
        q = x.view(b, t, 2, D).transpose(1, 2).repeat_interleave(2, dim=1)
        return F.scaled_dot_product_attention(q, cache_k, cache_v, enable_gqa=True)
    torch.manual_seed(0)
    wk, wv = torch.randn(32, HKV * D), torch.randn(32, HKV * D)
    x = torch.randn(1, 3, 32)
    pos = torch.arange(3)
    ref = step(x, torch.zeros(1, HKV, 8, D), torch.zeros(1, HKV, 8, D), pos, wk, wv)
    with caplog.at_level(logging.WARNING, logger="kvdrive_compile.backend"):
        out = torch.compile(step, backend="kvdrive")(x, torch.zeros(1, HKV, 8, D), torch.zeros(1, HKV, 8, D), pos, wk, wv)
    torch.testing.assert_close(out, ref)
    assert any("static KV cache" in r.message and "index_copy_" in r.message for r in caplog.records)


def test_handwritten_example_model_token_identical():
    torch.manual_seed(0)
    model = handwritten_model.TinyLM(handwritten_model.TinyConfig()).eval()
    ids = torch.randint(0, model.cfg.vocab, (2, 150))
    eager = handwritten_model.greedy(model.forward, model, ids, 16)
    compiled = torch.compile(model.forward, backend="kvdrive",
                             options={"device_memory": "160KiB", "host_memory": "48KiB"})
    assert torch.equal(handwritten_model.greedy(compiled, model, ids, 16), eager)
    assert kvdrive_compile.counters.sites_rewritten == 3 * kvdrive_compile.counters.graphs
    moved = kvdrive_compile.stats().moved_bytes
    assert moved["host->disk"] > 0 and moved["disk->host"] > 0


def test_opcheck_site_ops():
    """append/select/attention change the runtime's state, so opcheck runs the checks that do not
    compare two runs' outputs: schema (no input mutated) and fake-vs-real metadata."""
    from kvdrive_compile.runtimes import runtime_for
    from kvdrive_compile.options import parse_options

    rid = runtime_for(parse_options({"block_size": 8}))
    utils = ("test_schema", "test_faketensor")
    past = torch.zeros(0)
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    q = torch.randn(1, 4, 5, 8)
    torch.library.opcheck(ops.open_step, (past, k, rid, 1), test_utils=utils)
    step = ops.open_step(past, k, rid, 1)
    torch.library.opcheck(ops.append, (step, past, past, k, v, 0, False), test_utils=("test_faketensor",))
    step = ops.open_step(past, k, rid, 1)
    k_si, v_si, ticket = ops.append(step, past, past, k, v, 0, False)
    assert k_si.shape == (1, 2, 5, 8) and k_si.untyped_storage().nbytes() <= 4
    torch.library.opcheck(ops.select, (ticket, q, 1.0, 0), test_utils=utils)
    torch.library.opcheck(ops.prefetch_ahead, (step, step, 0), test_utils=utils)
    ahead = ops.prefetch_ahead(step, step, 0)
    plan = ops.prefetch(ops.select(ticket, q, 1.0, 0), ahead)
    torch.library.opcheck(ops.prefetch, (plan, ahead), test_utils=utils)
    torch.library.opcheck(ops.host_attention, (plan, q, None, 0.3, True), test_utils=utils)
    torch.library.opcheck(ops.sparse_attention, (plan, q, k, v, None, 0.3, True), test_utils=utils)
    out_d, lse_d = ops.sparse_attention(plan, q, k, v, None, 0.3, True)
    torch.library.opcheck(ops.merge, (ops.host_attention(plan, q, None, 0.3, True), q, out_d, lse_d),
                          test_utils=("test_faketensor",))
    plan = ops.prefetch(ops.select(ticket, q, 1.0, 0), ahead)          # the merge above ended that plan
    out = ops.merge(ops.host_attention(plan, q, None, 0.3, True), q, out_d, lse_d)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref)
