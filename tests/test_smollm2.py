"""SmolLM2-135M (real weights, GGUF): exactness with KV on all three tiers, a padded batch,
no recompiles, and what the model's own cache object holds."""
import gc
import os

import pytest
import torch
from transformers import DynamicCache

import kvdrive_compile
from exactness import assert_budgets_respected, compiled_copy_forward, greedy_both, open_sessions
from kvdrive_compile.prompts import passkey_prompt

pytestmark = pytest.mark.slow

# fp32 KV of SmolLM2: 30 layers x 3 KV heads x 64 x 4 B x 2 = 46 KiB per token; a 2,000-token
# prompt holds ~90 MiB (1,100: ~50 MiB), so these budgets put KV on the device, on host and on disk
THREE_TIERS = dict(device_memory="16MiB", host_memory="24MiB", token_budget=None)


def prompt_ids(tok, n):
    text, _ = passkey_prompt(tok, n)
    return tok(text, return_tensors="pt").input_ids


@torch.no_grad()
def test_long_prompt_three_tiers_token_identical(smollm2):
    model, tok = smollm2
    ids = prompt_ids(tok, 1100)
    assert ids.shape[1] >= 1100
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    ref = model.generate(ids, **kw)
    eager = compiled_copy_forward(model, **THREE_TIERS)
    try:
        out = model.generate(ids, **kw)
    finally:
        model.forward = eager
    # the prefill's logits (KV on three tiers as it is written), then every greedy token
    torch.testing.assert_close(out.logits[0], ref.logits[0], atol=1e-4, rtol=0)
    assert torch.equal(ref.sequences, out.sequences), (ref.sequences[0, -12:].tolist(), out.sequences[0, -12:].tolist())
    st = kvdrive_compile.stats()
    assert st.moved_bytes["device->host"] > 0 and st.moved_bytes["host->disk"] > 0
    assert st.moved_bytes["disk->host"] > 0
    c = kvdrive_compile.counters
    assert c.sites_rewritten == 30 * c.graphs and c.sites_skipped == 0, c
    assert_budgets_respected()


@torch.no_grad()
def test_left_padded_batch_of_four_under_dynamic_true(smollm2):
    """A left-padded batch of four on the three tiers, compiled with torch.compile(dynamic=True):
    the softmax scale is a symbolic float there, and every site is still rewritten (it used to
    be skipped, all 60 of them); the tokens are eager's. (dynamic=True traces each graph once:
    the default's padded path, traced twice, runs on random models in test_dynamic_shapes and
    test_hf_models.)"""
    model, tok = smollm2
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [passkey_prompt(tok, n, seed=s)[0] for n, s in [(160, 1), (100, 2), (130, 3), (50, 4)]]
    batch = tok(texts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, attention_mask=batch.attention_mask)
    ref = model.generate(batch.input_ids, **kw)
    eager = model.forward
    # ~46 KiB of KV per token and row: ~29 MiB in all, on the three tiers (the device holds the
    # 12 rows' pinned blocks, 17 MiB, and some more)
    options = dict(THREE_TIERS, device_memory="20MiB", host_memory="4MiB")
    model.forward = torch.compile(eager, backend="kvdrive", dynamic=True, options=options)
    try:
        out = model.generate(batch.input_ids, **kw)
    finally:
        model.forward = eager
    assert torch.equal(ref, out), (ref[:, -6:].tolist(), out[:, -6:].tolist())
    c = kvdrive_compile.counters
    assert c.graphs == 2 and c.sites_found == c.sites_rewritten == 60 and c.dynamic_retraces == 0, c
    st = kvdrive_compile.stats(options)
    assert st.moved_bytes["host->disk"] > 0, st.moved_bytes                 # a part went to disk


@torch.no_grad()
def test_one_compile_no_recompiles_cache_files_and_dumps(smollm2, tmp_path):
    """One compile of SmolLM2 (each costs ~40 s here) checks: two graphs (prefill, decode) and
    none more over a longer generation, fullgraph; the model's own cache holds no KV bytes; KV
    files are unlinked at creation, private, and closed with their session; the pass dumps of
    both graphs name every attention site."""
    model, tok = smollm2
    ids = prompt_ids(tok, 400)                                 # ~18 MiB of KV: a part on disk
    disk, dumps = tmp_path / "kv", tmp_path / "dumps"
    disk.mkdir()
    eager = model.forward
    options = dict(THREE_TIERS, device_memory="6MiB", host_memory="4MiB", disk_dir=str(disk), dump_dir=str(dumps))
    model.forward = torch.compile(eager, backend="kvdrive", fullgraph=True, options=options)
    try:
        cache = DynamicCache(config=model.config)
        model.generate(ids, max_new_tokens=4, do_sample=False, cache=cache)     # compiles prefill + decode
        graphs = kvdrive_compile.counters.graphs
        assert graphs == 2, f"expected 2 graphs (prefill, decode), got {graphs}"
        assert cache.get_seq_length() == ids.shape[1] + 3
        for layer in cache.layers:
            for t in (layer.keys, layer.values):
                assert t.shape[-2] == ids.shape[1] + 3
                assert t.untyped_storage().nbytes() <= 4, "the HF cache holds real KV bytes"
        st = kvdrive_compile.stats()
        assert st.tiers["disk"].resident_bytes > 0
        # KV files are unlinked at creation: nothing under disk_dir, even while they hold KV;
        # the open files are this process's fds only, private to the owner
        assert list(disk.iterdir()) == []
        fds = [os.path.join("/proc/self/fd", f) for f in os.listdir("/proc/self/fd")]
        ours = [f for f in fds if os.path.realpath(f).startswith(str(disk))]
        assert ours and all(os.stat(f).st_mode & 0o777 == 0o600 for f in ours)
        assert_budgets_respected()
        del cache, layer, t                      # the last stand-ins this test held
        gc.collect()
        assert open_sessions() == 0
        fds = [os.path.join("/proc/self/fd", f) for f in os.listdir("/proc/self/fd")]
        assert not [f for f in fds if os.path.exists(f) and os.path.realpath(f).startswith(str(disk))], \
            "a KV file is still open after its session"
        with torch.compiler.set_stance("fail_on_recompile"):
            out = model.generate(ids, max_new_tokens=17, min_new_tokens=17, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 17
        assert kvdrive_compile.counters.graphs == graphs
    finally:
        model.forward = eager
    graphs = sorted(p for p in dumps.iterdir())
    assert len(graphs) == 2
    for g in graphs:
        names = sorted(os.listdir(g))
        assert "summary.txt" in names and "summary.json" in names
        assert "03.rewrite_attention.after.py" in names and "01.find_attention_sites.before.py" in names
        summary = (g / "summary.txt").read_text()
        assert "30 attention sites found, 30 rewritten, 0 skipped" in summary
        for i in range(30):
            assert f"model.layers.{i}.self_attn" in summary
        after = (g / "03.rewrite_attention.after.py").read_text()
        for op in ("open_step", "append", "prefetch_ahead", "select", "prefetch", "host_attention",
                   "sparse_attention", "merge"):
            assert f"kvdrive.{op}" in after
        assert "_C._nn.scaled_dot_product_attention(" not in after
