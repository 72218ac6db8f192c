"""The benchmark suite: metrics, report and JSON structure, the cost model, the CLI, the gpu-8b
preset's models, prompts and prefill chunks (fast); and the smoke presets end to end on SmolLM2
and on tiny Llama-3.1 / Qwen3 shapes (slow)."""
import argparse
import copy
import json
from types import SimpleNamespace

import pytest
import torch

import kvdrive_compile
from transformers import DynamicCache, StaticCache

from kvdrive_compile import models
from kvdrive_compile.bench import cli, metrics, presets, projection, report, runner, systems

GIB = 2**30
TINY_LLAMA = models.random_config("llama3.1-tiny-random")


# -- metrics -------------------------------------------------------------------------------------

def _snap(moved, selected, stages, resident=(0, 0, 0), **more):
    return {"moved_bytes": moved, "selected_blocks": selected, "stage_seconds": stages,
            "tiers": {t: {"resident_bytes": r} for t, r in zip(metrics.TIERS, resident)}, **more}


def test_runtime_metrics_are_deltas_per_token_and_step():
    before = _snap({"disk->host": 100, "host->device": 0, "device->host": 10, "host->disk": 0},
                   {"device": 5, "host": 5, "disk": 0}, {s: 1.0 for s in metrics.STAGES})
    after = _snap({"disk->host": 900, "host->device": 0, "device->host": 410, "host->disk": 80},
                  {"device": 15, "host": 35, "disk": 10}, {**{s: 1.0 for s in metrics.STAGES}, "select": 1.2})
    m = metrics.runtime_metrics(before, after, steps=2, batch=4, step_seconds=[0.5, 0.5], split_attention=True)
    assert m["moved_per_token"] == {"disk->host": 100.0, "host->device": 0.0, "device->host": 50.0,
                                    "host->disk": 10.0}
    assert m["device_hit_rate"] == pytest.approx(10 / 50)
    assert m["cpu_attention_share"] == pytest.approx(40 / 50)
    assert m["stages_ms"]["select"] == pytest.approx(100.0)
    assert m["stages_ms"]["other"] == pytest.approx(400.0)
    fetch = metrics.runtime_metrics(before, after, 2, 4, [0.5, 0.5], split_attention=False)
    assert fetch["cpu_attention_share"] == 0.0


def test_tier_caching_metrics_are_deltas_of_served_admitted_evicted():
    moved = {b: 0 for b in metrics.BOUNDARIES}
    before = _snap(moved, {"device": 10, "host": 10, "disk": 0}, {}, served={"device": 1000, "host": 500, "disk": 0},
                   admitted={"device": 4, "host": 0}, evicted={"device": 0, "host": 0}, hit_rate=0.66)
    after = _snap({**moved, "disk->host": 800, "host->disk": 160},
                  {"device": 40, "host": 20, "disk": 10}, {"write_home": 0.5, "select": 0.25},
                  served={"device": 9000, "host": 1500, "disk": 1000}, admitted={"device": 20, "host": 6},
                  evicted={"device": 12, "host": 2}, hit_rate=0.78, disk_cache_bypass="O_DIRECT")
    m = metrics.runtime_metrics(before, after, steps=4, batch=2, step_seconds=[0.5] * 4, split_attention=True)
    # served: deltas per decoded token (8 tokens); the hit rate is the device's share of the bytes
    assert m["served_per_token"] == {"device": 1000.0, "host": 125.0, "disk": 125.0}
    assert m["hit_rate"] == pytest.approx(8000 / 10000) and m["hit_rate_from"] == "served"
    assert m["device_hit_rate"] == pytest.approx(30 / 50)          # the block-count share, kept
    assert m["admitted_per_step"] == {"device": 4.0, "host": 1.5}
    assert m["evicted_per_step"] == {"device": 3.0, "host": 0.5}
    assert m["disk_cache_bypass"] == "O_DIRECT"
    assert m["moved_per_token"]["disk->host"] == 100.0 and m["moved_per_token"]["host->disk"] == 20.0
    assert m["stages_ms"]["write_home"] == pytest.approx(125.0) and m["stages_ms"]["select"] == pytest.approx(62.5)
    assert m["stages_ms"]["other"] == pytest.approx(500.0 - 187.5)
    assert metrics.hit_rate(before, after) == (pytest.approx(0.8), "served")


def test_tier_caching_metrics_work_on_a_snapshot_without_the_new_fields():
    before = _snap({"disk->host": 0}, {"device": 0, "host": 0, "disk": 0}, {})
    after = _snap({"disk->host": 64}, {"device": 3, "host": 1, "disk": 0}, {"select": 0.1, "merge_v2": 0.1})
    m = metrics.runtime_metrics(before, after, steps=2, batch=1, step_seconds=[0.2, 0.2], split_attention=False)
    assert m["hit_rate"] == pytest.approx(0.75) and m["hit_rate_from"] == "selected_blocks"   # the fallback
    assert m["served_per_token"] == {t: 0.0 for t in metrics.TIERS}
    assert m["admitted_per_step"] == {"device": 0.0, "host": 0.0} == m["evicted_per_step"]
    assert m["disk_cache_bypass"] is None and m["moved_per_token"]["host->device"] == 0.0
    assert m["stages_ms"]["merge_v2"] == pytest.approx(50.0)        # a stage we do not know still counts
    assert m["stages_ms"]["other"] == pytest.approx(100.0)
    # zeros (a runtime that has the fields but does not fill them yet) fall back the same way
    zeros = {"served": {t: 0 for t in metrics.TIERS}}
    assert metrics.hit_rate({**before, **zeros}, {**after, **zeros}) == (pytest.approx(0.75), "selected_blocks")
    assert metrics.hit_rate(before, before) == (None, None)


def test_step_metrics_and_token_differences():
    m = metrics.step_metrics([0.1] * 19 + [1.1], batch=4)
    assert m["decode_tok_s"] == pytest.approx(80 / 3.0)
    assert m["step_ms_median"] == pytest.approx(100.0)
    assert 100.0 < m["step_ms_p95"] <= 1100.0
    assert metrics.first_difference([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]) is None
    assert metrics.first_difference([[1, 2, 3], [4, 5, 7]], [[1, 2, 3], [4, 5, 6]]) == 2
    assert metrics.offload_moved_per_token(100, 300, batch=2)["host->device"] == 100.0
    assert metrics.tier_bytes(_snap({}, {}, {}, (1, 2, 3)), _snap({}, {}, {}, (4, 0, 3))) == \
        {"device": 4, "host": 2, "disk": 3}


def test_busy_rows_are_the_ones_a_shared_machine_slowed():
    quiet = {"step_ms_median": 100.0, "step_cpu_ms_median": 95.0, "weights_read_gbs": 12.0}
    assert not metrics.busy(quiet, best_read_gbs=12.0)
    assert metrics.busy({**quiet, "step_cpu_ms_median": 60.0}, 12.0)        # waited for a core
    assert metrics.busy({**quiet, "weights_read_gbs": 6.0}, 12.0)           # memory reads slowed
    assert not metrics.busy({"step_ms_median": None}, 12.0)


def test_tokens_are_checked_against_each_systems_reference():
    def r(system, tokens):
        return {"system": system, "context": 8, "batch": 1, "tokens": tokens}

    rows = [r("dense", [[1, 2, 3]]), r("fetch-all", [[1, 2, 3]]), r("kvdrive-exact", [[1, 2, 4]]),
            r("kvdrive", [[1, 5, 8]]), r("sparse-fetch", [[1, 5, 6]]), r("hf-offload", None),
            r("shadowkv-like", [[1, 5, 6]]), r("hisparse-like", [[1, 5, 7]]), r("kvdrive-host", [[1, 5, 6]]),
            r("kvdrive-no-bonus", [[1, 5, 6]])]
    runner.check_tokens(rows)
    checks = {x["system"]: x["tokens_check"] for x in rows}
    # where a block lies must not change what the designs that rank by estimates alone attend: they
    # give each other's tokens (the first of their references present); kvdrive and kvdrive-host
    # prefer blocks in place (reuse_bonus), so they are sparse systems against dense
    assert checks == {"dense": "reference", "fetch-all": "= dense", "kvdrive-exact": "MISMATCH vs dense at step 2",
                      "kvdrive": "differs from dense from step 1 (sparse)", "sparse-fetch": "= kvdrive-no-bonus",
                      "hf-offload": None, "shadowkv-like": "= kvdrive-no-bonus",
                      "hisparse-like": "MISMATCH vs kvdrive-no-bonus at step 2",
                      "kvdrive-host": "differs from dense from step 1 (sparse)", "kvdrive-no-bonus": "= sparse-fetch"}
    rows = [r("dense", [[1, 2, 3]]), r("kvdrive-default", [[1, 5, 6]]), r("shadowkv-like", [[1, 5, 6]])]
    runner.check_tokens(rows)
    assert [x["tokens_check"] for x in rows] == ["reference", "= shadowkv-like", "= kvdrive-default"]
    rows = [r("dense", [[1, 2, 3]]), r("kvdrive-no-bonus", [[1, 5, 6]]), r("kvdrive", [[1, 2, 3]])]
    runner.check_tokens(rows)                 # none of its references ran: sparse against dense
    assert [x["tokens_check"] for x in rows] == ["reference", "differs from dense from step 1 (sparse)", "= dense"]


def test_cpu_threads_are_set_inside_and_restored_after():
    import numba

    before = torch.get_num_threads(), numba.get_num_threads()
    with runner.cpu_threads(1):
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    assert (torch.get_num_threads(), numba.get_num_threads()) == before
    with runner.cpu_threads(None):                       # starts numba's pool, keeps torch's count
        assert torch.get_num_threads() == before[0]


# -- presets and systems ---------------------------------------------------------------------------

GEMMA_LIKE = SimpleNamespace(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                             hidden_size=32, sliding_window=4,
                             layer_types=["sliding_attention", "sliding_attention", "full_attention"])


def test_kv_bytes_keeps_sliding_windows_and_budgets_follow_the_largest_point():
    # per token and layer: K and V of 1 head x 8 dims x 4 bytes = 64 B; 2 sliding layers keep 4 tokens
    assert presets.kv_bytes(GEMMA_LIKE, 100, 2, torch.float32) == 2 * (100 + 2 * 4) * 64
    sweep = presets.Sweep("m", (1024, 2048), (1, 4), token_budget=64, leave_out=((2048, 4),))
    assert sweep.points == [(1024, 1), (1024, 4), (2048, 1)]
    cfg = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          hidden_size=576)
    b = presets.budgets_for(sweep, cfg, torch.float32)
    assert b.largest_kv == presets.kv_bytes(cfg, 1024, 4, torch.float32)
    assert b.device_memory <= b.largest_kv // 4 < b.device_memory + 2**20
    assert b.host_memory <= b.largest_kv // 2 < b.host_memory + 2**20


def test_systems_are_the_designs_in_the_brief():
    b = presets.Budgets(device_memory=100, host_memory=200, token_budget=64, block_size=16)
    opts = {s.name: s.options(b) for s in systems.systems(list(systems.SYSTEMS))}
    assert opts["dense"] is None and opts["hf-offload"] is None and opts["dense-compiled"] is None
    assert isinstance(systems.DENSE_COMPILED.new_cache(SimpleNamespace(config=TINY_LLAMA), 64), StaticCache)
    assert isinstance(systems.DENSE.new_cache(SimpleNamespace(config=TINY_LLAMA), 64), DynamicCache)
    assert "dense-compiled" in systems.EXACT_SYSTEMS and systems.REFERENCE["dense-compiled"] == "dense"
    assert opts["kvdrive-inductor"] == {**opts["kvdrive-default"], "compile_rest": "inductor"}
    assert systems.REFERENCE["kvdrive-inductor"] == "kvdrive-default"
    assert opts["kvdrive-aten-linears"] == {**opts["kvdrive-default"], "cpu_linears": "aten"}
    assert systems.REFERENCE["kvdrive-aten-linears"] == "kvdrive-default"
    assert opts["fetch-all"] == {"device_memory": 0, "host_memory": 200, "token_budget": None,
                                 "attention": "fetch", "block_size": 16, "cache_policy": "none"}
    assert opts["sparse-fetch"] == {"device_memory": 0, "host_memory": 200, "token_budget": 64,
                                    "attention": "fetch", "block_size": 16, "cache_policy": "none",
                                    "reuse_bonus": 0.0}
    # ShadowKV-like: its own device tier keeps the last step's fetched blocks (reuse window 1)
    assert opts["shadowkv-like"] == {"device_memory": 100, "host_memory": 200, "token_budget": 64,
                                     "attention": "fetch", "block_size": 16, "cache_policy": "attention",
                                     "reuse_window": 1, "reuse_bonus": 0.0}
    # HiSparse-like: the device budget as an LRU hot buffer
    assert opts["hisparse-like"] == {"device_memory": 100, "host_memory": 200, "token_budget": 64,
                                     "attention": "fetch", "block_size": 16, "cache_policy": "lru", "reuse_bonus": 0.0}
    assert opts["kvdrive"] == {"device_memory": 100, "host_memory": 200, "token_budget": 64,
                               "attention": "split", "block_size": 16, "cache_policy": "attention"}
    assert opts["kvdrive-host"] == {**opts["kvdrive"], "host_memory": None}    # no disk: all spilled KV in host
    # the baselines rank blocks by their estimates alone, as the designs they stand for
    assert opts["kvdrive-no-bonus"] == {**opts["kvdrive"], "reuse_bonus": 0.0}
    assert opts["kvdrive-exact"] == {**opts["kvdrive"], "token_budget": None}
    # the -fine twins score every block; the others keep the default ("auto": two stages on a CPU)
    assert opts["kvdrive-fine"] == {**opts["kvdrive"], "coarse_candidates": None}
    assert opts["kvdrive-default-fine"] == {**opts["kvdrive-default"], "coarse_candidates": None}
    assert kvdrive_compile.parse_options(opts["kvdrive"]).policy.coarse_candidates == "auto"
    assert kvdrive_compile.parse_options(opts["kvdrive-fine"]).policy.coarse_candidates is None
    for o in opts.values():
        if o is not None:
            kvdrive_compile.parse_options(o)               # every design is a valid set of options
    # a sweep's reuse window goes to the attention-aware designs that do not fix their own
    windowed = presets.Budgets(100, 200, 64, 16, reuse_window=6)
    assert systems.KVDRIVE.options(windowed)["reuse_window"] == 6
    assert systems.KVDRIVE_HOST.options(windowed)["reuse_window"] == 6
    assert systems.SHADOWKV_LIKE.options(windowed)["reuse_window"] == 1
    assert "reuse_window" not in systems.HISPARSE_LIKE.options(windowed)
    assert "reuse_window" not in systems.SPARSE_FETCH.options(windowed)
    assert set(runner.RUN_ORDER) == set(systems.SYSTEMS)
    assert runner.RUN_ORDER.index("kvdrive") < runner.RUN_ORDER.index("shadowkv-like") < \
        runner.RUN_ORDER.index("fetch-all")
    assert systems.HF_OFFLOAD.unavailable(torch.device("cpu")).startswith("needs CUDA")
    assert systems.KVDRIVE.unavailable(torch.device("cpu")) is None
    with pytest.raises(ValueError, match="unknown system"):
        systems.systems(["flexgen"])


SMOLLM2_LIKE = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                               hidden_size=576)


def test_disk_preset_spills_to_disk_at_the_papers_budget_point():
    preset = presets.preset("disk")
    (sweep,) = preset.sweeps
    assert sweep.model == "smollm2-135m" and sweep.points == [(8192, 2)] and min(sweep.batches) >= 2
    assert sweep.token_budget == 512 == 8192 // 16                         # 6.25 %
    assert preset.threads == 1 and preset.device == "cpu" and not preset.second_try
    b = presets.budgets_for(sweep, SMOLLM2_LIKE, torch.float32)
    kv = presets.kv_bytes(SMOLLM2_LIKE, 8192, 2, torch.float32)
    assert b.largest_kv == kv == 720 * 2**20
    assert b.device_memory <= 0.15 * kv and b.host_memory <= 0.35 * kv
    assert kv - b.device_memory - b.host_memory >= 0.5 * kv                 # the rest spills to disk
    # the systems it runs: the peers' designs, kvdrive, and kvdrive with the spilled KV all in host
    assert {"sparse-fetch", "shadowkv-like", "hisparse-like", "kvdrive", "kvdrive-host"} <= set(preset.systems)
    assert set(preset.systems) <= set(systems.SYSTEMS)
    # kvdrive-host: the same device budget, no host budget (so nothing on disk)
    assert systems.KVDRIVE_HOST.options(b)["device_memory"] == systems.KVDRIVE.options(b)["device_memory"]
    need_host = runner.memory_needs(systems.KVDRIVE_HOST, b, kv, 0, 30, torch.device("cpu"))[1]
    assert need_host >= kv
    # every target names systems the preset runs
    labels = {t.label for t in sweep.targets}
    assert labels == {"kvdrive hit_rate >= 0.8", "kvdrive (disk->host + host->device) / sparse-fetch's <= 0.3x",
                      "kvdrive decode_tok_s / shadowkv-like's >= 1.74x", "kvdrive step_ms_median / kvdrive-host's <= 1.3x",
                      "kvdrive wall_over_slowest_stage <= 1.2", "kvdrive disk_read_hidden >= 0.5"}
    for t in sweep.targets:
        assert t.system in preset.systems and (t.versus is None or t.versus in preset.systems)
    with pytest.raises(ValueError, match="op"):
        presets.Target("kvdrive", ("hit_rate",), ">", 0.8)


def test_the_pipeline_preset_compares_kvdrive_with_the_faster_dense():
    """Both kvdrive rows (its default options, and tiered with disk) against the faster of dense
    eager and dense compiled; the default row runs with no tier limits, as a user's first try does."""
    preset = presets.preset("pipeline")
    throughput = {t.system: t for t in preset.sweeps[0].targets if t.metric == ("decode_tok_s",)}
    assert set(throughput) == {"kvdrive-default", "kvdrive"} and set(throughput) <= set(preset.systems)
    assert all(t.versus == ("dense", "dense-compiled") for t in throughput.values())
    assert {"dense", "dense-compiled"} <= set(preset.systems)
    assert throughput["kvdrive"].label == "kvdrive decode_tok_s / best of (dense, dense-compiled)'s >= 1.5x"
    budgets = presets.Budgets(device_memory=1 << 20, host_memory=1 << 20, token_budget=1024, block_size=16)
    assert systems.SYSTEMS["kvdrive-default"].options(budgets) == {"token_budget": 1024, "block_size": 16}
    assert systems.SYSTEMS["kvdrive"].options(budgets)["device_memory"] == 1 << 20


def test_contexts_batches_and_steps_override_every_sweep():
    preset = presets.preset("disk")
    small = runner.with_overrides(preset, steps=2, contexts=[512, 256], batches=[2])
    (sweep,) = small.sweeps
    assert sweep.points == [(256, 2), (512, 2)] and sweep.decode_steps == 2
    assert sweep.targets == preset.sweeps[0].targets and sweep.device_fraction == 0.15
    assert runner.with_overrides(preset) is preset
    args = argparse.ArgumentParser()
    cli.add_arguments(args)
    parsed = args.parse_args(["--preset", "disk", "--contexts", "1024", "--batches", "2", "4", "--steps", "2"])
    assert parsed.contexts == [1024] and parsed.batches == [2, 4] and parsed.steps == 2


# -- the gpu-8b preset: models from configs, random prompts, chunked prefill -------------------------

def test_random_models_have_the_published_shapes():
    llama, qwen = models.random_config("llama3.1-8b-random"), models.random_config("qwen3-8b-random")
    assert (llama.num_hidden_layers, llama.hidden_size, llama.intermediate_size, llama.num_attention_heads,
            llama.num_key_value_heads, llama.head_dim, llama.vocab_size) == (32, 4096, 14336, 32, 8, 128, 128256)
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.rope_parameters["rope_theta"] == 500000.0
    assert (qwen.model_type, qwen.num_hidden_layers, qwen.intermediate_size, qwen.vocab_size) == \
        ("qwen3", 36, 12288, 151936)
    with torch.device("meta"):                          # sizes only: no memory, no init
        params = {n: sum(p.numel() for p in models.random_model(n, torch.bfloat16, "meta").parameters())
                  for n in ("llama3.1-8b-random", "qwen3-8b-random")}
    assert params["llama3.1-8b-random"] == 8_030_261_248 and 8.1e9 < params["qwen3-8b-random"] < 8.3e9
    assert presets.kv_bytes(llama, 131072, 1, torch.bfloat16) == 16 * GIB         # 128 KiB a token
    model, tokenizer = models.load_any("qwen3-tiny-random")
    assert tokenizer is None and type(model).__name__ == "Qwen3ForCausalLM" and not model.training
    assert model.model.layers[0].self_attn.q_norm is not None                    # Qwen3's q/k norms
    with pytest.raises(ValueError, match="random-weight"):
        models.load_any("llama-9b")


def test_gpu_8b_preset_fits_one_h200_machine_and_checks_the_issues_targets():
    preset = presets.preset("gpu-8b")
    assert preset.device == "cuda" and preset.dtype == "bfloat16" and preset.time_budget_s <= 480
    assert set(preset.systems) == {"dense", "dense-compiled", "hf-offload", "fetch-all", "sparse-fetch",
                                   "shadowkv-like", "hisparse-like", "kvdrive"}
    ram, disk = 128 * GIB, 64 * GIB
    for sweep in preset.sweeps:
        config = models.random_config(sweep.model)
        assert sweep.budget_per_point and sweep.points == [(32768, 4), (65536, 8)]
        for context, batch in sweep.points:
            kv = presets.kv_bytes(config, context, batch, torch.bfloat16)
            b = presets.budgets_for(sweep, config, torch.bfloat16, (context, batch))
            assert b.device_memory <= 0.25 * kv and 0 < kv - b.host_memory <= 0.6 * disk     # spills to disk
            assert kv <= 0.8 * ram                                      # hf-offload keeps all KV in RAM
        for context, batch in sweep.leave_out:                           # left out for memory, or for time
            kv = presets.kv_bytes(config, context, batch, torch.bfloat16)
            assert kv > 0.8 * ram or (context, batch) not in ((32768, 4), (65536, 8))
        for t in sweep.targets:
            assert t.from_point == (65536, 8) and t.system in preset.systems and t.versus in (None, *preset.systems)
    smoke = presets.preset("gpu-8b-smoke")
    assert smoke.device == "cpu" and smoke.threads == 1
    assert [models.RANDOM_MODELS[s.model].family for s in smoke.sweeps] == ["llama", "qwen3"]
    assert set(smoke.systems) <= set(preset.systems)


def test_prompts_without_a_tokenizer_are_seeded_random_ids():
    ids = runner.batch_prompts(None, 64, 3, seed=5, vocab_size=100)
    assert ids.shape == (3, 64) and ids.dtype == torch.long and 0 <= int(ids.min()) and int(ids.max()) < 100
    assert torch.equal(ids, runner.random_prompts(100, 64, 3, seed=5))
    assert not torch.equal(ids, runner.random_prompts(100, 64, 3, seed=6))


def test_prefill_goes_in_chunks_where_one_call_would_not_fit():
    per_token = 100_000
    assert runner.prefill_chunk(4096, 4, per_token, room=2 * 4 * 4096 * per_token) == 4096      # fits: one call
    # a chunk also holds its mask over the context: 10,000 tokens of the batch fit, 9K per sequence
    chunked = 2 * 8 * 10_000 * (per_token + runner.MASK_BYTES * 65536)
    assert runner.prefill_chunk(65536, 8, per_token, room=chunked) == 9216
    assert runner.prefill_bytes(per_token, 65536, 8, 9216) == 8 * 9216 * (per_token + 4 * 65536)
    assert runner.prefill_bytes(per_token, 65536, 8, 65536) == 8 * 65536 * per_token              # causal, no mask
    assert runner.prefill_chunk(512, 2, per_token, room=1e12, limit=512) == 256                   # the sweep's cap
    assert runner.prefill_chunk(512, 2, per_token, room=0) == 16                                  # at least a step
    config = models.random_config("llama3.1-8b-random")
    assert runner.activation_bytes(config, torch.bfloat16) == (8 * 4096 + 3 * 14336) * 2
    # eager caches briefly hold a layer twice; a static cache is allocated once, at full length
    b = presets.Budgets(100, 200, 64, 16)
    assert runner.kv_placement(systems.DENSE, b, 3200, 32) == (3400, 0)
    assert runner.kv_placement(systems.DENSE_COMPILED, b, 3200, 32) == (3200, 0)
    assert runner.kv_placement(systems.KVDRIVE_DEFAULT, b, 3200, 32) == (3200, 0)            # no tier limits
    assert runner.kv_placement(systems.KVDRIVE, b, 3200, 32) == (100, 200)


def test_a_chunked_prefill_gives_the_one_call_logits():
    model, _ = models.load_any("llama3.1-tiny-random")
    ids = runner.random_prompts(model.config.vocab_size, 96, 2)
    whole = runner.prefill(model, systems.DENSE.new_cache(model, 96), ids)
    chunked = runner.prefill(model, systems.DENSE.new_cache(model, 96), ids, chunk=32)
    static = runner.prefill(model, systems.DENSE_COMPILED.new_cache(model, 100), ids, chunk=48)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(static, whole, rtol=1e-4, atol=1e-4)


def test_the_time_budget_skips_what_would_end_after_it():
    import time

    from tqdm import tqdm

    model, _ = models.load_any("llama3.1-tiny-random")
    sweep = presets.gpu_8b_smoke_sweep("llama3.1-tiny-random")
    run = runner.SweepRun(sweep, model, None, torch.device("cpu"), tqdm(disable=True), time.perf_counter() + 100)
    assert run.too_late(systems.KVDRIVE, 512, 4) is None                       # nothing measured yet
    run.last_point["kvdrive"], run.warm_up_s["kvdrive"] = (10.0, 256, 2), 30.0
    assert run.too_late(systems.KVDRIVE, 256, 2) is None                       # 10 s + a 30 s warm-up
    late = run.too_late(systems.KVDRIVE, 512, 4)                               # 10 s x 2 x 2^2 + 30 s
    assert late.startswith("skipped: would end after the preset's time budget (~110 s")
    run.deadline = time.perf_counter() - 1
    assert run.too_late(systems.DENSE, 512, 2) == "skipped: the preset's time budget was spent"
    assert run.ids(512, 2).shape == (2, 512) and run.budgets_at(512, 2).device_memory == 2**20


def test_a_gpu_preset_says_what_is_missing(tmp_path):
    assert runner.missing_dependencies(("json", "kvdrive_no_such_module")) == \
        ["kvdrive_no_such_module (ModuleNotFoundError: No module named 'kvdrive_no_such_module')"]
    if not torch.cuda.is_available():
        with pytest.raises(runner.CannotRun, match="--preset gpu-8b-smoke"):
            runner.check_gpu_machine("gpu-8b")
        args = argparse.ArgumentParser()
        cli.add_arguments(args)
        assert cli.run_bench(args.parse_args(["--preset", "gpu-8b", "--out", str(tmp_path)])) == 2


# -- the cost model --------------------------------------------------------------------------------

L8B = projection.LLAMA_8B
POLICY = projection.Policy(token_budget=2048)


def test_llama_8b_kv_is_128_kib_per_token():
    assert L8B.kv_token_layer * L8B.layers == 128 * 1024
    assert L8B.kv_bytes(131072, 1) == 16 * GIB


@pytest.mark.parametrize("context", [32768, 131072])
@pytest.mark.parametrize("batch", [8, 32])
def test_byte_model_of_each_design(context, batch):
    kv = L8B.kv_bytes(context, batch)
    host = 384 * GIB
    counts = {s: projection.scenario_counts(s, L8B, POLICY, context, batch, 16 * GIB, host)
              for s in ("dense", "hf-offload", "fetch-all", "sparse-fetch", "kvdrive")}
    assert counts["dense"].h2d_bytes == 0 and counts["dense"].device_attn_bytes == kv
    assert counts["hf-offload"].h2d_bytes == kv == counts["hf-offload"].d2h_bytes
    assert counts["fetch-all"].h2d_bytes == pytest.approx(kv)
    assert counts["fetch-all"].ssd_read_bytes == pytest.approx(max(0, kv - host))
    # sparse: the 2 dense layers attend everything, the other 30 the budget
    selected = batch * (2 * context + 30 * 2048) * L8B.kv_token_layer
    assert counts["sparse-fetch"].h2d_bytes == pytest.approx(selected)
    k = counts["kvdrive"]
    assert k.device_attn_bytes + k.cpu_attn_bytes == pytest.approx(selected)
    assert k.h2d_bytes < 2**20 * batch                   # no KV comes up: only (out, lse)
    assert k.ssd_read_bytes <= counts["sparse-fetch"].ssd_read_bytes + 1


@pytest.mark.parametrize("profile", list(projection.PROFILES))
def test_overlap_is_the_slowest_resource_and_serial_the_sum(profile):
    hw = projection.PROFILES[profile]
    c = projection.scenario_counts("kvdrive", L8B, POLICY, 65536, 16, 16 * GIB, 64 * GIB)
    t = c.seconds(hw)
    parts = {k: t[k] for k in ("device", "cpu", "pcie", "ssd")}
    assert t["overlap"] == max(parts.values()) and t["bound"] == max(parts, key=parts.get)
    assert t["overlap"] <= t["serial"] <= sum(parts.values()) + c.d2h_bytes / (hw.pcie_gbs * 1e9) + 1e-12
    fetch = projection.scenario_counts("fetch-all", L8B, POLICY, 65536, 16, 16 * GIB, 64 * GIB).seconds(hw)
    assert fetch["overlap"] > t["overlap"]              # moving all KV costs more than attending in place


def test_scenarios_say_what_does_not_fit():
    rows = projection.scenarios(["h100-pcie5-nvme"], contexts=(131072,), batches=(32,))
    by = {r["system"]: r for r in rows}
    assert by["dense"]["status"] == "does not fit" and "80 GiB" in by["dense"]["note"]
    assert by["hf-offload"]["status"] == "does not fit" and "no disk tier" in by["hf-offload"]["note"]
    assert by["kvdrive"]["status"] == "ok" and by["kvdrive"]["tok_s_overlap"] > by["sparse-fetch"]["tok_s_overlap"]
    assert "PROJECTION" in projection.text(projection.project(None, ["h100-pcie5-nvme"]))


# -- report and JSON structure ---------------------------------------------------------------------

def _row(system, status="ok", batch=2, steps=3, **kw):
    ran = status in report.RAN
    row = {"system": system, "context": 256, "batch": batch, "status": status, "note": "" if ran else status,
           "dense_kv_bytes": 1000}
    if ran:
        compiled = systems.SYSTEMS[system].kvdrive
        row.update({"decode_tok_s": 5.0, "ttft_s": 1.0, "step_ms_median": 400.0, "step_ms_p95": 500.0,
                    "step_cpu_ms_median": 380.0, "kv_bytes": 1000, "disk_bytes": 10, "compile_s": 3.0,
                    "moved_per_token": {b: 1.0 for b in metrics.BOUNDARIES},
                    "peak_bytes": {t: 10 for t in metrics.TIERS}, "device_hit_rate": 0.5,
                    "hit_rate": 0.5, "hit_rate_late": 0.6, "hit_rate_from": "served" if compiled else None,
                    "served_per_token": {"device": 500.0, "host": 300.0, "disk": 200.0} if compiled else None,
                    "admitted_per_step": {"device": 2.0, "host": 1.0} if compiled else None,
                    "evicted_per_step": {"device": 1.5, "host": 0.0} if compiled else None,
                    "disk_cache_bypass": "O_DIRECT" if compiled else None,
                    "cpu_attention_share": 0.5, "stages_ms": {s: 1.0 for s in (*metrics.STAGES, "other")},
                    "selected_blocks": {"device": 3, "host": 3, "disk": 0},
                    "tokens": [[1] * (steps + 1)] * batch, "tokens_check": "= dense"})
    row.update(kw)
    return row


def _result():
    rows = [_row("dense", stages_ms=None, selected_blocks=None), _row("hf-offload", "needs CUDA"),
            _row("fetch-all"), _row("sparse-fetch"), _row("kvdrive")]
    geometry = dict(name="m", layers=30, kv_heads=3, q_heads=9, head_dim=64, dtype_bytes=4, params=1.3e8)
    sweep = {"model": "smollm2-135m", "dtype": "float32", "device": "cpu",
             "sweep": {"contexts": [256], "batches": [2], "decode_steps": 3},
             "budgets": {"device_memory": 2**20, "host_memory": 2**21, "token_budget": 96, "block_size": 16,
                         "largest_kv": 2**22},
             "geometry": geometry, "systems": {}, "rows": rows}
    meta = {"preset": "smoke", "covers": "test", "machine": runner.machine(), "torch": torch.__version__,
            "wall_seconds": 1.0}
    return {"meta": meta, "sweeps": [sweep]}


def test_a_complete_result_validates_and_prints():
    result = _result()
    report.validate(result)
    text = report.text(result)
    for name in ("dense", "hf-offload", "fetch-all", "sparse-fetch", "kvdrive", "needs CUDA", "step CPU ms",
                 "disk->host /tok", "host->disk /tok", "cpu_attention", "write_home", "hit rate", "hit 2nd half",
                 "served disk /tok", "admitted device /step", "evicted host /step", "O_DIRECT",
                 "2 CPU cores" if not torch.cuda.is_available() else ""):
        assert name in text
    assert "targets" not in text                                   # the smoke sweep declares none
    result["projection"] = projection.project(result, ["h100-pcie5-nvme"])
    report.validate(result)
    priced = result["projection"]["measured"]
    assert {r["profile"] for r in priced} == {"h100-pcie5-nvme", "this-cpu"}
    assert len(result["projection"]["model_check"]) == 4          # every run row but hf-offload
    json.dumps(result)


@pytest.mark.parametrize("breakage, field", [
    (lambda r: r["sweeps"][0]["rows"][1].update(note=""), "must say why"),
    (lambda r: r["sweeps"][0]["rows"][2].update(status="fine"), "status 'fine'"),
    (lambda r: r["sweeps"][0]["rows"][2].update(tokens=[[1, 2]]), "tokens must be"),
    (lambda r: r["sweeps"][0]["rows"][3]["moved_per_token"].pop("disk->host"), "moved_per_token"),
    (lambda r: r["sweeps"][0]["rows"][4].pop("decode_tok_s"), "decode_tok_s"),
    (lambda r: r["sweeps"][0]["budgets"].pop("host_memory"), "host_memory"),
    (lambda r: r["sweeps"][0]["rows"][4].update(hit_rate=1.5), "hit_rate must be a share"),
    (lambda r: r["sweeps"][0]["rows"][4].pop("hit_rate_late"), "hit_rate_late must be a share"),
    (lambda r: r["sweeps"][0]["rows"][4].update(served_per_token=None), "served_per_token must be a number"),
    (lambda r: r["sweeps"][0]["rows"][3]["admitted_per_step"].pop("host"), "admitted_per_step"),
    (lambda r: r["sweeps"][0]["rows"][0].update(evicted_per_step={"device": -1, "host": 0}), "evicted_per_step"),
    (lambda r: r["sweeps"][0]["rows"][4]["stages_ms"].update(write_home="slow"), "stages_ms"),
    (lambda r: r["sweeps"][0].update(targets=[{"system": "kvdrive", "label": "x", "op": ">=", "bound": 1,
                                               "measured": None, "holds": True}]), "holds is null exactly"),
    (lambda r: r["sweeps"][0].update(targets={}), "targets must be a list"),
    (lambda r: r.pop("meta"), "meta"),
])
def test_validation_names_what_is_wrong(breakage, field):
    result = copy.deepcopy(_result())
    breakage(result)
    with pytest.raises(ValueError, match="expected structure") as e:
        report.validate(result)
    assert field in str(e.value)


def test_older_results_are_upgraded_and_validate():
    result = _result()
    for r in result["sweeps"][0]["rows"]:
        for key in report.NEW_ROW_FIELDS:
            r.pop(key, None)
    assert any("hit_rate" in p for p in report.problems(result))
    result["sweeps"] = [report.upgrade_sweep(s) for s in result["sweeps"]]
    report.validate(result)
    kv = result["sweeps"][0]["rows"][4]
    assert kv["hit_rate"] == kv["device_hit_rate"] == 0.5 and kv["served_per_token"] is None and kv["older_run"]
    assert "hit rate" in report.text(result)


DISK_TARGETS = [t.as_dict() for t in presets.DISK_TARGETS]


def _disk_rows(**changes):
    """The disk preset's rows at one point: kvdrive meets every target unless ``changes`` say otherwise."""
    def moved(fetched):
        return {"disk->host": fetched / 2, "host->device": fetched / 2, "device->host": 0.0, "host->disk": 0.0}

    rows = {"kvdrive": _row("kvdrive", decode_tok_s=4.0, step_ms_median=500.0, hit_rate=0.85, moved_per_token=moved(200)),
            "kvdrive-host": _row("kvdrive-host", decode_tok_s=4.4, step_ms_median=450.0, hit_rate=0.85),
            "shadowkv-like": _row("shadowkv-like", decode_tok_s=2.0, step_ms_median=1000.0),
            "sparse-fetch": _row("sparse-fetch", decode_tok_s=1.5, moved_per_token=moved(1000)),
            "hisparse-like": _row("hisparse-like"), "hf-offload": _row("hf-offload", "needs CUDA")}
    for name, update in changes.items():
        if update is None:
            rows[name] = _row(name, "skipped")
        else:
            rows[name].update(update)
    return list(rows.values())


def test_targets_are_computed_from_the_rows():
    evaluated = report.evaluate_targets(DISK_TARGETS, _disk_rows())
    by = {t["label"]: t for t in evaluated}
    # the last two come from a timeline (a row's "pipeline"): these rows have none
    assert [t["holds"] for t in evaluated] == [True, True, True, True, None, None]
    assert by["kvdrive hit_rate >= 0.8"]["measured"] == pytest.approx(0.85)
    fetched = by["kvdrive (disk->host + host->device) / sparse-fetch's <= 0.3x"]
    assert fetched["measured"] == pytest.approx(0.2) and (fetched["value"], fetched["versus_value"]) == (200, 1000)
    assert by["kvdrive decode_tok_s / shadowkv-like's >= 1.74x"]["measured"] == pytest.approx(2.0)
    assert by["kvdrive step_ms_median / kvdrive-host's <= 1.3x"]["measured"] == pytest.approx(500 / 450)
    assert all((t["context"], t["batch"]) == (256, 2) for t in evaluated)

    missed = report.evaluate_targets(DISK_TARGETS, _disk_rows(
        kvdrive={"hit_rate": 0.6, "decode_tok_s": 3.0, "step_ms_median": 700.0}))
    assert [t["holds"] for t in missed] == [False, True, False, False, None, None]
    assert missed[2]["measured"] == pytest.approx(1.5) and missed[3]["measured"] == pytest.approx(700 / 450)

    # a baseline that did not run, or a metric a row lacks: not measured, and the note says why
    partial = report.evaluate_targets(DISK_TARGETS, _disk_rows(**{"shadowkv-like": None},
                                                               kvdrive={"hit_rate": None, "device_hit_rate": None}))
    assert [t["holds"] for t in partial] == [None, True, None, True, None, None]
    assert partial[0]["note"] == "kvdrive has no hit_rate" and partial[2]["note"] == "no shadowkv-like row ran"
    none = report.evaluate_targets(DISK_TARGETS, _disk_rows(kvdrive=None))
    assert {t["holds"] for t in none} == {None} and none[0]["note"] == "no kvdrive row ran"


def test_a_target_versus_several_systems_takes_the_strongest_at_its_points():
    best = presets.Target("kvdrive", ("decode_tok_s",), ">=", 1.5, versus=("dense", "dense-compiled"),
                          unit="tok/s", from_point=(256, 2)).as_dict()
    rows = [_row("dense", decode_tok_s=4.0), _row("dense-compiled", decode_tok_s=5.0),
            _row("kvdrive", decode_tok_s=8.0), _row("kvdrive", batch=1, decode_tok_s=1.0)]   # batch 1: not checked
    (t,) = report.evaluate_targets([best], rows)
    assert (t["batch"], t["versus_system"], t["versus_value"], t["holds"]) == (2, "dense-compiled", 5.0, True)
    assert t["measured"] == pytest.approx(1.6)
    assert "8.00 tok/s vs 5.00 tok/s (dense-compiled)" in report.targets_table([t])
    # the faster one did not run: the other is the one; neither: not measured, and why
    (alone,) = report.evaluate_targets([best], [r for r in rows if r["system"] != "dense-compiled"])
    assert alone["versus_system"] == "dense" and alone["measured"] == pytest.approx(2.0)
    (none,) = report.evaluate_targets([best], [_row("kvdrive", decode_tok_s=8.0)])
    assert none["holds"] is None and none["note"] == "no dense or dense-compiled row ran"
    # for <=, the strongest is the smallest
    fastest = {**best, "metric": ["step_ms_median"], "op": "<=", "bound": 1.0}
    (ms,) = report.evaluate_targets([fastest], [_row("dense", step_ms_median=300.0),
                                               _row("dense-compiled", step_ms_median=200.0), _row("kvdrive")])
    assert ms["versus_system"] == "dense-compiled" and ms["measured"] == pytest.approx(2.0) and ms["holds"] is False
    (far,) = report.evaluate_targets([{**best, "from_point": [65536, 8]}], rows)
    assert far["holds"] is None and far["note"] == "the sweep has no point at >= 65536x8"


def test_the_targets_section_prints_and_validates():
    result = _result()
    sweep = result["sweeps"][0]
    sweep["rows"] = _disk_rows(kvdrive={"decode_tok_s": 3.0}, **{"kvdrive-host": None})
    sweep["targets"] = report.evaluate_targets(DISK_TARGETS, sweep["rows"])
    report.validate(result)
    text = report.text(result)
    section = text[text.index("targets: "):]
    assert section.startswith("targets: 2 of 6 hold, 3 not measured")
    assert "kvdrive decode_tok_s / shadowkv-like's >= 1.74x" in section and "1.50x" in section
    assert "MISSES" in section and "holds" in section and "not measured (no kvdrive-host row ran)" in section
    assert "85%" in section and "200 B vs 1000 B" in section and "3.00 tok/s vs 2.00 tok/s" in section
    json.dumps(result)


def test_plots_are_written(tmp_path):
    paths = report.plot_sweep(_result()["sweeps"][0], str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["smollm2-135m-throughput.png", "smollm2-135m-bytes-memory.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sizes_read_well():
    assert report.size(None) == "-" and report.size(512) == "512 B"
    assert report.size(3 * 2**20) == "3.0 MiB" and report.size(1.5 * GIB) == "1.5 GiB"


# -- the command line ------------------------------------------------------------------------------

def test_bench_subcommand_registers_on_a_parser():
    ap = argparse.ArgumentParser(prog="kvdrive")
    cli.add_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["bench", "--preset", "smoke", "--systems", "dense", "kvdrive", "--project"])
    assert args.func is cli.run_bench and args.preset == "smoke" and args.systems == ["dense", "kvdrive"]
    assert args.project


def test_projection_preset_runs_without_a_model(tmp_path, capsys):
    assert cli.main(["--preset", "projection", "--out", str(tmp_path), "--profiles", "a100-pcie4-nvme"]) == 0
    out = capsys.readouterr().out
    assert "a cost model, not a measurement" in out and "a100-pcie4-nvme" in out
    with open(tmp_path / "results.json") as f:
        result = json.load(f)
    report.validate(result)
    assert result["sweeps"] == [] and len(result["projection"]["scenarios"]) == 3 * 3 * 5


# -- end to end ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_preset_end_to_end(smollm2, tmp_path):
    preset = presets.PRESETS["smoke"]
    result = runner.run(preset, systems.systems(preset.systems), loaded={"smollm2-135m": smollm2})
    report.validate(result)
    (sweep,) = result["sweeps"]
    rows = {r["system"]: r for r in sweep["rows"]}
    assert set(rows) == set(preset.systems)
    assert rows["hf-offload"]["status"] == "needs CUDA" and "CUDA" in rows["hf-offload"]["note"]
    for name, row in rows.items():
        if name != "hf-offload":
            assert row["status"] in report.RAN, row["note"]
            assert row["recompiles"] == 0, name                   # the warm-up compiled every graph
    # kvdrive attends KV where it lies (sparse-fetch, fetch-all and dense-compiled run in
    # gpu-8b-smoke, kvdrive with token_budget=None in test_smollm2)
    assert rows["kvdrive"]["moved_per_token"]["host->device"] == 0
    assert rows["kvdrive"]["peak_bytes"]["device"] <= sweep["budgets"]["device_memory"]
    # KV spilled to disk; the device cache served part of the selection (at this small point,
    # where the device holds 45 % of the KV, it may serve all of it: then nothing runs on the CPU)
    assert rows["kvdrive"]["peak_bytes"]["disk"] > 0 and rows["kvdrive"]["hit_rate"] > 0
    assert 0 <= rows["kvdrive"]["cpu_attention_share"] < 1
    assert rows["dense"]["status"] == "over budget"
    result["projection"] = projection.project(result, ["h100-pcie5-nvme"])
    report.write_json(result, str(tmp_path / "results.json"))
    assert len(report.plot_sweep(sweep, str(tmp_path))) == 2
    assert "kvdrive" in report.text(result)


@pytest.mark.slow
def test_gpu_8b_smoke_preset_end_to_end(tmp_path):
    """The gpu-8b code path on tiny Llama-3.1 and Qwen3 shapes: random weights and prompts, per
    point budgets, a chunked prefill, dense-compiled on a static cache (~1-2 min on 2 cores)."""
    preset = presets.PRESETS["gpu-8b-smoke"]
    result = runner.run(preset, systems.systems(preset.systems))
    report.validate(result)
    assert [s["model"] for s in result["sweeps"]] == ["llama3.1-tiny-random", "qwen3-tiny-random"]
    for sweep, declared in zip(result["sweeps"], preset.sweeps):
        rows = {r["system"]: r for r in sweep["rows"]}
        assert set(rows) == set(declared.systems or preset.systems)
        for name, row in rows.items():
            if name == "hf-offload":
                assert row["status"] == "needs CUDA"
                continue
            assert row["status"] in report.RAN, (sweep["model"], name, row["note"])
            assert row["recompiles"] == 0 and row["prefill_chunk"] == 256, (sweep["model"], name)
            if name in systems.EXACT_SYSTEMS:                   # fp32: exact designs give dense's tokens
                assert row["tokens"] == rows["dense"]["tokens"], (sweep["model"], name)
        for name, row in rows.items():             # every row checked against its reference, none mismatched
            assert row["tokens_check"] is None or "MISMATCH" not in row["tokens_check"], (sweep["model"], name)
        # kvdrive prefers blocks in place (reuse_bonus) and sparse-fetch ranks by the estimates
        # alone: with no other design of that ranking here, both are sparse designs against dense
        assert rows["kvdrive"]["tokens_check"].startswith(("= dense", "differs from dense")), sweep["model"]
        if "sparse-fetch" in rows:       # kvdrive's block estimates, every miss fetched: bytes moved up
            assert rows["sparse-fetch"]["tokens_check"].startswith(("= dense", "differs from dense"))
            assert rows["sparse-fetch"]["moved_per_token"]["host->device"] > 0
        assert rows["kvdrive"]["peak_bytes"]["disk"] > 0 and rows["kvdrive"]["hit_rate"] > 0
        assert rows["kvdrive"]["peak_bytes"]["device"] <= rows["kvdrive"]["device_budget"]
        assert "dense-compiled" not in rows or rows["dense-compiled"]["compile_s"] > 0
    assert "dense-compiled" in report.text(result)
    report.write_json(result, str(tmp_path / "results.json"))


# -- benchmarks/cuda_sync_points.py: its counting on a GPU; here its attribution and a CPU run ----

def _sync_points_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "cuda_sync_points.py"
    spec = importlib.util.spec_from_file_location("cuda_sync_points", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_synchronizing_call_is_put_on_kvdrives_innermost_line():
    import traceback

    script = _sync_points_script()
    ours = script._our_dirs()
    runtime_file = ours[1] + "site_step.py"
    frame = traceback.FrameSummary
    stack = [frame("/x/transformers/models/llama/modeling_llama.py", 10, "forward"),
             frame(runtime_file, 419, "start_host_attention"),
             frame(ours[2] + "merge.py", 5, "merge_partials"),
             frame("/y/site-packages/torch/_tensor.py", 3, "cpu"), frame("/usr/lib/python3.11/warnings.py", 1, "warn")]
    assert script.site_of(stack, ours) == "kernels/merge.py:5 merge_partials"
    assert script.site_of(stack[:2], ours) == "runtime/site_step.py:419 start_host_attention"
    assert script.site_of(stack[:1], ours) == "llama/modeling_llama.py:10 forward"
    assert script.site_of(stack[3:], ours) == "(no Python frame)"


@pytest.mark.slow
def test_sync_points_script_runs_its_systems_on_the_cpu(tmp_path, capsys):
    """Without a GPU it refuses (exit 3) unless asked for a CPU run, which runs every system
    (tokens checked against dense, the timeline summarized) without counting."""
    script = _sync_points_script()
    if not torch.cuda.is_available():
        assert script.main(["--out", str(tmp_path)]) == 3
    assert script.main(["--device", "cpu", "--model", "llama3.1-tiny-random", "--layers", "4", "--context", "256",
                        "--batch", "2", "--steps", "3", "--dtype", "float32", "--budget", "32",
                        "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sync_points.json").read_text())
    assert set(result["results"]) == {"dense", "kvdrive-exact", "kvdrive", "kvdrive-default"}
    dense = result["results"]["dense"]["tokens"]
    assert result["results"]["kvdrive-exact"]["tokens"] == dense          # token_budget=None, three tiers
    assert all(len(r["step_ms"]) == 2 for r in result["results"].values())
    out = capsys.readouterr().out
    assert "step wall / slowest stage" in out and "kvdrive-exact" in out


# -- benchmarks/plan_host_work.py: a layer's plan on the host, against a git revision --------------

@pytest.mark.slow
def test_plan_host_work_times_each_part_and_compares_with_a_revision(capsys):
    """The script at a tiny shape, against the runtime at HEAD (loaded from git into a package of
    its own): both runtimes planned every step (each part timed), and where the revision's code
    is this checkout's they placed every block alike."""
    import importlib.util
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    spec = importlib.util.spec_from_file_location("plan_host_work", repo / "benchmarks" / "plan_host_work.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = script.main(["--shapes", "1x2x2048", "--steps", "4", "--against", "HEAD"])["1x2x2048"]
    for label in ("this checkout", "HEAD"):
        assert results[label]["entries"] == 2 * 129
        assert all(results[label][part] > 0 for part in ("ranking (select_scored)", "cache_step (the policy's moves)",
                                                         "select (all of the plan)"))
    changed = subprocess.run(["git", "status", "--porcelain", "runtime", "kernels"], cwd=repo,
                             capture_output=True, text=True).stdout
    if not changed:                           # HEAD's runtime is this checkout's: the same moves
        assert results["same placement"]
    assert results["ratio"] > 0
    assert "median of per-step ratios" in capsys.readouterr().out
