"""The benchmark suite: metrics, report and JSON structure, the cost model, the CLI (fast, no
model); and the smoke preset end to end on SmolLM2 (slow)."""
import argparse
import copy
import json
from types import SimpleNamespace

import pytest
import torch

import kvdrive_compile
from kvdrive_compile.bench import cli, metrics, presets, projection, report, runner, systems

GIB = 2**30


# -- metrics -------------------------------------------------------------------------------------

def _snap(moved, selected, stages, resident=(0, 0, 0)):
    return {"moved_bytes": moved, "selected_blocks": selected, "stage_seconds": stages,
            "tiers": {t: {"resident_bytes": r} for t, r in zip(metrics.TIERS, resident)}}


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
            r("kvdrive", [[1, 5, 6]]), r("sparse-fetch", [[1, 5, 6]]), r("hf-offload", None)]
    runner.check_tokens(rows)
    checks = {x["system"]: x["tokens_check"] for x in rows}
    assert checks == {"dense": "reference", "fetch-all": "= dense", "kvdrive-exact": "MISMATCH vs dense at step 2",
                      "kvdrive": "differs from dense from step 1 (sparse)", "sparse-fetch": "= kvdrive",
                      "hf-offload": None}


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
    assert opts["dense"] is None and opts["hf-offload"] is None
    assert opts["fetch-all"] == {"device_memory": 0, "host_memory": 200, "token_budget": None,
                                 "attention": "fetch", "block_size": 16}
    assert opts["sparse-fetch"] == {**opts["fetch-all"], "token_budget": 64}
    assert opts["kvdrive"] == {"device_memory": 100, "host_memory": 200, "token_budget": 64,
                               "attention": "split", "block_size": 16}
    assert opts["kvdrive-exact"]["token_budget"] is None
    for o in opts.values():
        if o is not None:
            kvdrive_compile.parse_options(o)               # every design is a valid set of options
    assert systems.HF_OFFLOAD.unavailable(torch.device("cpu")).startswith("needs CUDA")
    assert systems.KVDRIVE.unavailable(torch.device("cpu")) is None
    with pytest.raises(ValueError, match="unknown system"):
        systems.systems(["flexgen"])


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
        row.update({"decode_tok_s": 5.0, "ttft_s": 1.0, "step_ms_median": 400.0, "step_ms_p95": 500.0,
                    "step_cpu_ms_median": 380.0, "kv_bytes": 1000, "disk_bytes": 10, "compile_s": 3.0,
                    "moved_per_token": {b: 1.0 for b in metrics.BOUNDARIES},
                    "peak_bytes": {t: 10 for t in metrics.TIERS}, "device_hit_rate": 0.5,
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
                 "disk->host /tok", "cpu_attention", "2 CPU cores" if not torch.cuda.is_available() else ""):
        assert name in text
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
    (lambda r: r.pop("meta"), "meta"),
])
def test_validation_names_what_is_wrong(breakage, field):
    result = copy.deepcopy(_result())
    breakage(result)
    with pytest.raises(ValueError, match="expected structure") as e:
        report.validate(result)
    assert field in str(e.value)


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
    # exact designs give dense's tokens; sparse-fetch gives kvdrive's (the same selection)
    dense = rows["dense"]["tokens"]
    assert rows["fetch-all"]["tokens"] == dense and rows["fetch-all"]["tokens_check"] == "= dense"
    assert rows["kvdrive-exact"]["tokens"] == dense
    assert rows["sparse-fetch"]["tokens"] == rows["kvdrive"]["tokens"]
    # bytes: fetch designs bring KV up every step, kvdrive attends it where it lies
    up = {name: rows[name]["moved_per_token"]["host->device"] for name in ("fetch-all", "sparse-fetch")}
    assert up["fetch-all"] > up["sparse-fetch"] > 0
    assert rows["kvdrive"]["moved_per_token"]["host->device"] == 0
    assert rows["kvdrive"]["peak_bytes"]["device"] <= sweep["budgets"]["device_memory"]
    assert rows["kvdrive"]["peak_bytes"]["disk"] > 0 and 0 < rows["kvdrive"]["cpu_attention_share"] < 1
    assert rows["dense"]["status"] == "over budget"
    result["projection"] = projection.project(result, ["h100-pcie5-nvme"])
    report.write_json(result, str(tmp_path / "results.json"))
    assert len(report.plot_sweep(sweep, str(tmp_path))) == 2
    assert "sparse-fetch" in report.text(result)
