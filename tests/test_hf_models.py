"""Random-weight Hugging Face models of several architectures: kvdrive's greedy tokens are
exactly eager's, with budgets small enough that device, host and disk all hold KV.

KVDRIVE_TEST_DEVICE=cuda runs them with the model on the GPU (the device tier there, the
Triton kernel for device blocks, pinned host blocks); the default is the CPU.
"""
import os

import pytest
import torch
import transformers as tf

import kvdrive_compile
from exactness import assert_budgets_respected, greedy_both, open_sessions

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=512)

CASES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_key_value_heads=2), "sdpa"),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(num_key_value_heads=1), "sdpa"),
    "mistral-sliding": (tf.MistralConfig, tf.MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=24), "sdpa"),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(num_key_value_heads=2, pad_token_id=0), "sdpa"),
    "gpt2-eager": (tf.GPT2Config, tf.GPT2LMHeadModel,
                   dict(n_embd=64, n_layer=2, n_head=4, n_positions=512), "eager"),
    "gpt-neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(rotary_pct=0.5), "sdpa"),
    # q/k norms, and sliding-window layers between full ones (per-layer layer_types)
    "qwen3-hybrid": (tf.Qwen3Config, tf.Qwen3ForCausalLM,
                     dict(num_key_value_heads=2, head_dim=16, use_sliding_window=True, sliding_window=24,
                          layer_types=["sliding_attention", "full_attention"]), "sdpa"),
    "cohere2-hybrid": (tf.Cohere2Config, tf.Cohere2ForCausalLM,
                       dict(num_key_value_heads=2, sliding_window=24, pad_token_id=0,
                            layer_types=["sliding_attention", "full_attention"]), "sdpa"),
    # one KV head split off a fused projection (multi-query)
    "gpt-bigcode-mqa": (tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM,
                        dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, multi_query=True), "sdpa"),
    # ALiBi: a bias that grows along the keys, applied with the mask
    "falcon-alibi": (tf.FalconConfig, tf.FalconForCausalLM, dict(alibi=True), "sdpa"),
    # partial rotary on interleaved channels, q/k/v from one projection split in groups
    "codegen": (tf.CodeGenConfig, tf.CodeGenForCausalLM,
                dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, rotary_dim=8), "eager"),
}

# a block of 16 tokens of one (sequence, kv head) at head_dim 16 is 2 KiB
DEVICE = torch.device(os.environ.get("KVDRIVE_TEST_DEVICE", "cpu"))
BUDGETS = dict(device_memory="64KiB", host_memory="32KiB", block_size=16, sink_tokens=0, local_window=0)
# models that hold ~24 KiB of KV (one KV head; a 24-token sliding window: at most 3 blocks per
# layer and row), under the budgets above: smaller ones, so their KV reaches the disk too
SMALL_KV = {"qwen2", "mistral-sliding", "gpt-bigcode-mqa", "falcon-alibi"}
# configs named the GPT-2 way (n_embd, n_layer, n_head)
GPT2_STYLE = (tf.GPT2Config, tf.GPTBigCodeConfig, tf.CodeGenConfig)
SMALL_KV_BUDGETS = dict(BUDGETS, device_memory="16KiB", host_memory="8KiB")


def moved_bytes(options):
    """The runtime for ``options``'s bytes moved so far (runtimes outlive a test: compare before
    and after), none if no model was compiled with them yet."""
    try:
        return kvdrive_compile.stats(dict(options, token_budget=None)).moved_bytes
    except KeyError:
        return {}


# what a case's architecture adds to attention, turned off: with it off the eager tokens differ,
# so kvdrive's equal tokens say it applied it (random tiny models barely attend by position:
# their query and key weights are scaled up, ``SHARPEN``, until the feature changes the answer)
FEATURE_OFF = {"falcon-alibi": dict(alibi=False), "qwen3-hybrid": dict(sliding_window=4096),
               "cohere2-hybrid": dict(sliding_window=4096), "codegen": dict(rotary_dim=4)}
SHARPEN = {"falcon-alibi": 16.0, "cohere2-hybrid": 16.0, "codegen": 16.0}
QK_WEIGHTS = ("q_proj.weight", "k_proj.weight", "query_key_value.weight", "qkv_proj.weight")


def build(name, **changes):
    """The case's random model (seed 0); changes: config fields set after the case's own."""
    cfg_cls, model_cls, extra, attn = CASES[name]
    kwargs = {"vocab_size": 128, **extra} if cfg_cls in GPT2_STYLE else {**SMALL, **extra}
    cfg = cfg_cls(**kwargs)
    for key, value in changes.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = model_cls._from_config(cfg, attn_implementation=attn).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if name in SHARPEN and pname.endswith(QK_WEIGHTS):
                p.mul_(SHARPEN[name])
    return model.to(DEVICE)


@pytest.mark.parametrize("name", list(CASES))
def test_random_model_token_identical(name):
    model = build(name)
    ids = torch.randint(3, 128, (1, 70), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    kvdrive_compile.counters.reset()
    budgets = SMALL_KV_BUDGETS if name in SMALL_KV else BUDGETS
    before = moved_bytes(budgets)
    ref, out = greedy_both(model, ids, 12, **budgets)
    assert torch.equal(ref, out), f"{name}: eager {ref[0, 70:].tolist()} != kvdrive {out[0, 70:].tolist()}"
    if name in FEATURE_OFF:                        # the feature decides tokens: kvdrive applied it
        plain = build(name, **FEATURE_OFF[name])
        plain.load_state_dict(model.state_dict())
        kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
        with torch.no_grad():
            assert not torch.equal(plain.generate(ids, **kw), ref), f"{name}: {FEATURE_OFF[name]} gives the same tokens"
    assert kvdrive_compile.counters.sites_rewritten >= 2 * model.config.num_hidden_layers, kvdrive_compile.counters
    assert kvdrive_compile.counters.sites_skipped == 0, kvdrive_compile.counters.skip_reasons
    assert kvdrive_compile.counters.caches_unclaimed == 0, kvdrive_compile.counters.skip_reasons
    moved = {k: v - before.get(k, 0) for k, v in moved_bytes(budgets).items()}      # this generation's
    assert moved["device->host"] > 0 and moved["host->disk"] > 0, moved
    assert_budgets_respected()
    assert open_sessions() == 0


def test_left_padded_batch_token_identical():
    model = build("llama")
    g = torch.Generator().manual_seed(2)
    lengths = [70, 41, 55, 18]
    ids = torch.zeros((4, 70), dtype=torch.long)
    mask = torch.zeros((4, 70), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 70 - n:] = torch.randint(3, 128, (n,), generator=g)
        mask[i, 70 - n:] = 1
    ref, out = greedy_both(model, ids.to(DEVICE), 10, attention_mask=mask.to(DEVICE), **BUDGETS)
    assert torch.equal(ref, out)


FRESH_PROCESS = """
import torch
import kvdrive_compile
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(1)                 # a count numba's thread pool would reset when it starts
torch.manual_seed(0)
config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 97, (1, 64))
model.forward = torch.compile(model.forward, backend="kvdrive", options={
    "device_memory": "64KiB", "host_memory": "1MiB", "token_budget": 32, "dense_layers": 0})
with torch.no_grad():
    model.generate(ids, max_new_tokens=3, do_sample=False)     # the numba kernels run in here
    with torch.compiler.set_stance("fail_on_recompile"):
        model.generate(ids, max_new_tokens=5, do_sample=False)
print("no recompile", torch.get_num_threads())
"""


def test_numba_pool_does_not_make_the_next_generate_recompile(tmp_path):
    """In a fresh process, the first numba parallel kernel of a decode step used to start numba's
    thread pool, which reset torch's thread count and failed every Dynamo guard: the second
    generate re-traced its prefill. kernels/cpu_attention.py now starts the pool at import."""
    import subprocess
    import sys

    # cwd: not the repository root, whose kvdrive_compile/ would shadow an installed wheel
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0 and "no recompile 1" in done.stdout, done.stderr[-3000:]


@torch.no_grad()
def test_prompt_in_chunks_attends_every_token_under_a_budget():
    """A token budget is a decode step's: a step that brings several tokens (the rest of a
    prompt fed in chunks, a conversation continued on its cache) attends every token, so its
    logits are eager's over the whole prompt; the next one-token step attends the budget."""
    cfg = tf.LlamaConfig(**{**SMALL, "num_hidden_layers": 3}, num_key_value_heads=2)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval().to(DEVICE)
    ids = torch.randint(3, 128, (2, 150), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    want = model(ids).logits[:, -1]
    options = dict(token_budget=16, block_size=4, sink_tokens=0, local_window=4, dense_layers=0)
    model.forward = torch.compile(model.forward, backend="kvdrive", options=options)
    try:
        cache = tf.DynamicCache(config=cfg)
        model(ids[:, :60], past_key_values=cache)
        got = model(ids[:, 60:], past_key_values=cache).logits[:, -1]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        stats = kvdrive_compile.stats(options)
        before = stats.selected_blocks["device"] + stats.selected_blocks["host"] + stats.selected_blocks["disk"]
        model(got.argmax(-1, keepdim=True), past_key_values=cache)
        stats = kvdrive_compile.stats(options)
        after = stats.selected_blocks["device"] + stats.selected_blocks["host"] + stats.selected_blocks["disk"]
        assert after - before == 3 * 2 * 2 * 4, (before, after)     # layers x rows x the budget's 4 blocks
    finally:
        kvdrive_compile.release_all()


def test_soft_capped_attention_is_rewritten_and_exact():
    """Gemma 2's eager attention caps its logits (``tanh(s / c) * c``, then the mask): kvdrive's
    kernels apply the cap, every site is rewritten, and the tokens are eager's across the tiers.
    The cap is strong (0.2, queries scaled up) so that attention without it picks other tokens."""
    cfg = tf.Gemma2Config(**{**SMALL, "num_hidden_layers": 2}, num_key_value_heads=2, head_dim=16,
                          sliding_window=24, query_pre_attn_scalar=16, attn_logit_softcapping=0.2)
    torch.manual_seed(0)
    model = tf.Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager").eval().to(DEVICE)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(32)
    ids = torch.randint(3, 128, (2, 60), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    kvdrive_compile.counters.reset()
    ref, out = greedy_both(model, ids, 8, **dict(BUDGETS, device_memory="24KiB", host_memory="8KiB"))
    assert torch.equal(ref, out)
    c = kvdrive_compile.counters
    assert c.sites_rewritten == c.sites_found >= 4 and c.caches_unclaimed == 0, c
    assert_budgets_respected()


def test_attention_sinks_are_merged_and_exact():
    """gpt-oss's eager attention adds a learned sink logit per head to the softmax (an extra
    column, dropped before @ v), on sliding-window and full layers: kvdrive merges it as a part
    that attends nothing, every site is rewritten, and the tokens are eager's across the tiers
    (sinks set large enough that attention without them picks other tokens)."""
    cfg = tf.GptOssConfig(**SMALL, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=16)
    torch.manual_seed(0)
    model = tf.GptOssForCausalLM._from_config(cfg, attn_implementation="eager").eval().to(DEVICE)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(-1, 4, cfg.num_attention_heads))
            layer.self_attn.q_proj.weight.mul_(4)
    ids = torch.randint(3, 128, (2, 50), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    kvdrive_compile.counters.reset()
    ref, out = greedy_both(model, ids, 8, attention_mask=torch.ones_like(ids),
                           **dict(BUDGETS, device_memory="24KiB", host_memory="8KiB"))
    assert torch.equal(ref, out)
    c = kvdrive_compile.counters
    assert c.sites_rewritten == c.sites_found >= 4 and c.caches_unclaimed == 0, c
    assert_budgets_respected()


def test_alibi_baddbmm_attention_runs_exact_and_is_reported(caplog):
    """Bloom scores with ``alibi.baddbmm(q, k^T)`` on 3-D tensors, a form kvdrive does not
    rewrite: the model still compiles (the verify pass propagates shapes as Dynamo does, so the
    op's symbolic broadcast works), answers exactly, and its caches are reported as not kept."""
    import logging

    cfg = tf.BloomConfig(n_layer=2, n_head=4, hidden_size=64, vocab_size=128)
    torch.manual_seed(0)
    model = tf.BloomForCausalLM._from_config(cfg, attn_implementation="eager").eval().to(DEVICE)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    kvdrive_compile.counters.reset()
    with caplog.at_level(logging.WARNING, logger="kvdrive_compile.backend"):
        ref, out = greedy_both(model, ids, 5, attention_mask=torch.ones_like(ids), **BUDGETS)
    assert torch.equal(ref, out)
    assert kvdrive_compile.counters.caches_unclaimed >= 4
    assert any("feed no attention kvdrive recognises" in r.message for r in caplog.records)


def test_values_of_another_head_dim_than_the_keys_are_left_and_reported():
    """MiMo-V2's attention has values of another head_dim than its keys (16 and 128 here):
    kvdrive keeps K and V blocks in slots of one head_dim, so the sites are left as they were
    with that reason (the compile used to fail: the rewritten output took the keys' width)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = CONFIG_MAPPING["mimo_v2_flash"](
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=128, head_dim=16, v_head_dim=128, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, pad_token_id=0)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval().to(DEVICE)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    kvdrive_compile.counters.reset()
    ref, out = greedy_both(model, ids, 5, attention_mask=torch.ones_like(ids), **BUDGETS)
    assert torch.equal(ref, out)
    c = kvdrive_compile.counters
    assert c.sites_found >= 2 and c.sites_rewritten == 0
    assert all("V's head_dim 128 is not K's 16" in r for r in c.skip_reasons), c.skip_reasons
