"""Gemma 3 270M (real weights, GGUF): 4 query heads / 1 KV head, head_dim 256, 15 of 18 layers
with a 512-token sliding window. A prompt longer than the window, KV on all three tiers."""
import pytest
import torch

import kvdrive_compile
from exactness import assert_budgets_respected, greedy_both
from kvdrive_compile import models
from kvdrive_compile.prompts import passkey_prompt

pytestmark = pytest.mark.slow


def test_gemma3_past_its_window_token_identical():
    model, tok = models.load("gemma3-270m")
    text, _ = passkey_prompt(tok, 720)
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.shape[1] >= 720 > model.config.sliding_window
    # fp32 KV: 18 layers x 1 KV head x 256 x 4 B x 2 = 36 KiB per token, ~26 MiB in all
    ref, out = greedy_both(model, ids, 10, device_memory="6MiB", host_memory="8MiB")
    assert torch.equal(ref, out), (ref[0, -10:].tolist(), out[0, -10:].tolist())
    c = kvdrive_compile.counters
    assert c.sites_skipped == 0 and c.sites_rewritten == 18 * c.graphs, c
    st = kvdrive_compile.stats()
    assert st.moved_bytes["host->disk"] > 0 and st.moved_bytes["disk->host"] > 0, st.moved_bytes
    assert_budgets_respected()
