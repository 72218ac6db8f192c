"""A cropped cache (Hugging Face's ``cache.crop``: assisted and prompt-lookup decoding drop the
draft tokens the model rejected): the runtime forgets the layer's tokens from the crop on, and
what follows attends exactly the tokens before it and the new ones, wherever their blocks lie."""
import numpy as np
import pytest
import torch
import transformers as tf

import kvdrive_compile
from exactness import assert_budgets_respected, open_sessions
from kvdrive_compile.options import parse_options
from kvdrive_compile.runtime import site_step
from kvdrive_compile.runtime.kv_runtime import KVRuntime
from kvdrive_compile.runtime.selection import SelectionPolicy
from kvdrive_compile.runtime.summaries import BlockSummaries
from kvdrive_compile.runtime.tiers import Tier
from kvdrive_compile.runtimes import get_runtime, runtime_for
from test_runtime import attend, budgets_ok, reference

BS = 4
WINDOW = 11          # a sliding-window layer's past: its last tokens, as Hugging Face keeps them


def tiers_of(kind, tmp_path, slot):
    """Runtimes whose blocks lie on the device only, or spread over device, host and disk."""
    if kind == "device":
        return KVRuntime(block_size=BS)
    return KVRuntime(block_size=BS, device_memory=6 * slot, host_memory=5 * slot, disk_dir=str(tmp_path))


def held_slots_match(rt, kv):
    """Every slot the pools and the disk file hold belongs to a block of the layer: a crop
    frees what it forgets, and nothing else."""
    for tier, arr in ((Tier.DEVICE, kv.dev), (Tier.HOST, kv.host)):
        if rt.pool_key(tier, kv) in rt.pools:
            assert rt.pool(tier, kv).used == int((arr >= 0).sum()), tier
    files = rt.sessions[kv.session_id].disk_files
    if files:
        assert next(iter(files.values())).used == int((kv.home == Tier.DISK).sum())


def summaries_match(kv, k_ref):
    """The layer's block summaries equal those built afresh from the reference keys."""
    fresh = BlockSummaries(kv.rows, kv.head_dim, BS, kv.device)
    fresh.update(0, k_ref.reshape(kv.rows, -1, kv.head_dim))
    s, nb = kv.summaries, kv.num_blocks
    assert s.length == fresh.length == kv.length
    for name in ("kmin", "kmax", "codes"):
        assert torch.equal(getattr(s, name)[:, kv.first:nb], getattr(fresh, name)[:, kv.first:nb]), name
    torch.testing.assert_close(s.ksum[:, kv.first:nb], fresh.ksum[:, kv.first:nb])
    n = kv.length % BS
    assert torch.equal(s.tail[:, :n], fresh.tail[:, :n])


def selected_bias(plan, b, hkv, g, nq, start, end):
    """An additive mask ``[B, Hq, Q, end - start]`` letting each query head attend exactly the
    tokens of the blocks its KV head's row selected."""
    tokens = torch.arange(start, end) // BS
    allow = torch.zeros(b * hkv, end - start, dtype=torch.bool)
    for r in range(b * hkv):
        ids = plan.selected[r][plan.selected[r] >= 0]
        allow[r] = torch.isin(tokens, ids)
    allow = allow.view(b, hkv, 1, 1, -1).expand(b, hkv, g, nq, -1).reshape(b, hkv * g, nq, -1)
    return torch.zeros(allow.shape).masked_fill(~allow, float("-inf"))


# a budget of 3 blocks, re-ranking only when the query moved: rankings kept across crops
# (a crop makes the next step rank afresh) still select blocks that are held
BUDGETED = SelectionPolicy(token_budget=3 * BS, sink_tokens=0, local_window=0, dense_layers=0, rerank_similarity=0.5)


@pytest.mark.parametrize("policy", ["exact", "budget"])
@pytest.mark.parametrize("tiers", ["device", "three"])
@pytest.mark.parametrize("keeps_last", [False, True])
def test_crops_keep_the_tokens_before_them(tmp_path, tiers, keeps_last, policy):
    """Random crops (none, inside the open block, across several blocks, at block edges) between
    prefills, chunks and decode steps: each step attends the reference's tokens (float64; with a
    budget, those of the blocks it selected, all of them held), the summaries are those of the
    kept keys, every freed slot is given back, budgets hold."""
    gen = torch.Generator().manual_seed(7 + 2 * keeps_last + (tiers == "three") + 4 * (policy == "budget"))
    b, hkv, g, d = 2, 2, 2, 8
    rt = tiers_of(tiers, tmp_path, BS * d * 2 * 4)
    session = rt.open_session()
    k_ref = torch.zeros(b, hkv, 0, d)
    v_ref = torch.zeros(b, hkv, 0, d)
    k_si = v_si = torch.zeros(0)
    held = 0                                          # a sliding window's past starts here
    crops, seen = 0, set()
    q0 = torch.randn(b, hkv * g, 1, d, generator=gen)
    for step in range(40):
        length = k_ref.shape[2]
        cut = 0 if step < 2 or length == 0 or torch.rand((), generator=gen) < 0.4 else \
            int(torch.randint(1, min(length, 2 * BS + 2) + 1, (1,), generator=gen))
        cut = min(cut, max(0, length - held - 1))         # a window's past keeps a token at least
        end = length - cut
        if keeps_last and length:
            held = max(held, end - WINDOW)
        past_k, past_v = k_si, v_si                       # step 0: empty
        if length:
            at = length - k_si.shape[2]                   # the layer token the last stand-in starts at
            past_k, past_v = k_si[:, :, held - at:end - at], v_si[:, :, held - at:end - at]
        k_ref, v_ref = k_ref[:, :, :end], v_ref[:, :, :end]
        n = 10 * BS if step == 0 else int(torch.randint(1, 6 * BS, (1,), generator=gen)) if step % 4 == 0 else 1
        k_new, v_new = torch.randn(b, hkv, n, d, generator=gen), torch.randn(b, hkv, n, d, generator=gen)
        k_si, v_si, p = site_step.append(rt, session, 0, past_k, past_v, k_new, v_new, keeps_last)
        crops += cut > 0
        k_ref, v_ref = torch.cat([k_ref, k_new], 2), torch.cat([v_ref, v_new], 2)
        assert p == end - held and k_si.shape[2] == p + n
        q = torch.randn(b, hkv * g, n, d, generator=gen)
        if policy == "budget":              # queries that barely move: rankings are kept between crops
            q = q0 + 0.2 * q
        if policy == "exact":
            out, _ = attend(rt, session, 0, q, p, n, k_new, v_new)
            bias = None
        else:
            out, plan = attend(rt, session, 0, q, p, n, k_new, v_new, policy=BUDGETED)
            bias = selected_bias(plan, b, hkv, g, n, held, held + p + n)
        expect = reference(q, k_ref[:, :, held:], v_ref[:, :, held:], 0.125, bias)
        torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)
        kv = session.layers[0]
        summaries_match(kv, k_ref)
        held_slots_match(rt, kv)
        budgets_ok(rt)
        seen |= set(np.unique(kv.where()[0][:, kv.first:]).tolist())
    assert crops >= 15 and rt.cropped_tokens > 0
    if policy == "budget" and not keeps_last:               # a sliding window attends all it holds
        assert min(rt.rankings.values()) > 0, rt.rankings       # rankings scored and kept
    assert seen == ({Tier.DEVICE} if tiers == "device" else {Tier.DEVICE, Tier.HOST, Tier.DISK}), seen
    rt.close()


def test_a_stand_in_made_before_a_crop_stands_for_nothing_past_it():
    """After a crop and new tokens in the cropped places, a stand-in kept from before (the
    tokens it stood for are gone) is refused, even where its length matches the layer's again;
    its tokens before the crop still serve."""
    rt = get_runtime(runtime_for(parse_options({"block_size": BS, "token_budget": None, "cpu_worker": False})))
    session = rt.open_session()
    k = torch.randn(1, 2, 9, 8)
    old_k, old_v, _ = site_step.append(rt, session, 0, torch.zeros(0), torch.zeros(0), k, k, False)
    new_k, new_v, p = site_step.append(rt, session, 0, old_k[:, :, :6], old_v[:, :, :6], k[:, :, :3], k[:, :, :3], False)
    assert p == 6 and session.layers[0].length == 9 == old_k.shape[2]
    with pytest.raises(RuntimeError, match="cropped at token 6"):
        site_step.append(rt, session, 0, old_k, old_v, k[:, :, :1], k[:, :, :1], False)
    with pytest.raises(RuntimeError, match="cropped at token 6"):
        kvdrive_compile.materialize(old_k)
    torch.testing.assert_close(kvdrive_compile.materialize(old_k[:, :, :5]), k[:, :, :5])
    torch.testing.assert_close(kvdrive_compile.materialize(new_k), torch.cat([k[:, :, :6], k[:, :, :3]], 2))
    _, _, p = site_step.append(rt, session, 0, old_k[:, :, :4], old_v[:, :, :4], k[:, :, :1], k[:, :, :1], False)
    assert p == 4 and session.layers[0].length == 5
    rt.release(session.id)


def test_a_head_slice_is_a_crop_never_a_window():
    """A head slice of a stand-in is a crop (its tokens from 0), never taken for a sliding
    window's last tokens; a full-attention layer's past must start at token 0."""
    rt = KVRuntime(block_size=BS)
    session = rt.open_session()
    for keeps_last in (False, True):
        k = torch.randn(1, 2, 9, 8)
        k_si, v_si, _ = site_step.append(rt, session, int(keeps_last), torch.zeros(0), torch.zeros(0), k, k, keeps_last)
        k_si, v_si, p = site_step.append(rt, session, int(keeps_last), k_si[:, :, :5], v_si[:, :, :5], k[:, :, :1],
                                         k[:, :, :1], keeps_last)
        assert p == 5 and session.layers[int(keeps_last)].length == 6
        got = site_step.read_window(rt, session.layers[int(keeps_last)], 0, 6)[0]
        torch.testing.assert_close(got, torch.cat([k[:, :, :5], k[:, :, :1]], 2))
        if not keeps_last:
            with pytest.raises(RuntimeError, match="the cache holds tokens \\[2, 6\\)"):
                site_step.append(rt, session, 0, k_si[:, :, 2:], v_si[:, :, 2:], k[:, :, :1], k[:, :, :1], False)
    rt.close()


# most of the KV on disk: with a device cache, and with none (host homes for some rows of a block, disk for others)
THREE_TIERS = dict(token_budget=None, block_size=4, sink_tokens=0, local_window=0, device_memory="6KiB", host_memory="4KiB")
NO_DEVICE_TIER = dict(THREE_TIERS, device_memory=0)


def _llama(seed, **extra):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **extra)
    return tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def _repetitive_prompt(seed, n=60):
    """A prompt that repeats itself: prompt lookup finds drafts, some accepted, some not."""
    p = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))
    return torch.cat([p, p[:, :n // 2], p[:, 5:n // 3]], 1)


def _cropped(options) -> int:
    try:
        return kvdrive_compile.stats(options).cropped_tokens
    except KeyError:                    # not compiled for yet
        return 0


@pytest.mark.parametrize("options", [dict(token_budget=None, block_size=4), THREE_TIERS, NO_DEVICE_TIER],
                         ids=["device", "three-tiers", "host-and-disk"])
@torch.no_grad()
def test_prompt_lookup_and_assisted_decoding_give_eagers_tokens(options):
    """Hugging Face's prompt-lookup decoding and assisted decoding (a draft model) crop the
    cache after each verification: with exact attention, the compiled model gives the eager
    model's tokens, and the crops happened."""
    model, draft = _llama(0), _llama(1)
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    prompt = _repetitive_prompt(3)
    eager = model.generate(prompt, **kw)
    assert torch.equal(model.generate(prompt, prompt_lookup_num_tokens=4, **kw), eager)
    model.forward = torch.compile(model.forward, backend="kvdrive", options=options)
    before = _cropped(options)
    assert torch.equal(model.generate(prompt, prompt_lookup_num_tokens=4, **kw), eager)
    after_lookup = _cropped(options)
    assert after_lookup > before, "no draft was rejected: the test does not crop"
    assert torch.equal(model.generate(prompt, assistant_model=draft, **kw), eager)
    assert _cropped(options) > after_lookup
    assert torch.equal(model.generate(prompt, **kw), eager)
    if options.get("device_memory") is not None:
        assert kvdrive_compile.stats(options).moved_bytes["host->disk"] > 0
    assert_budgets_respected()
    assert open_sessions() == 0
