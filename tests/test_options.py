"""Options are validated once, at compile time, with errors that say what to do."""
import pytest
import torch

import kvdrive_compile
from kvdrive_compile import parse_options, parse_size
from kvdrive_compile.options import valid_keys
from kvdrive_compile.runtime.selection import DEFAULT_REUSE_BONUS, DEFAULT_TOKEN_BUDGET


@pytest.mark.parametrize("value,expected", [
    (None, None), (0, 0), (4096, 4096), ("4096", 4096), ("256MiB", 256 << 20), ("1GiB", 1 << 30),
    ("1.5 KiB", 1536), ("2MB", 2_000_000), ("512kib", 512 << 10),
])
def test_parse_size(value, expected):
    assert parse_size(value, "device_memory") == expected


@pytest.mark.parametrize("value,error,match", [
    ("lots", ValueError, "not a size"), ("12 parsecs", ValueError, "not a size"),
    (-1, ValueError, "negative"), ("-5MiB", ValueError, "not a size"), (True, TypeError, "byte count"),
    (1.5, TypeError, "byte count"),
])
def test_bad_sizes(value, error, match):
    with pytest.raises(error, match=match):
        parse_size(value, "host_memory")


def test_defaults():
    o = parse_options(None)
    assert (o.block_size, o.device_memory, o.host_memory, o.disk_dir) == (16, None, None, None)
    assert o.policy.token_budget == DEFAULT_TOKEN_BUDGET == 1024
    assert (o.policy.block_summary, o.policy.score_aggregation) == ("qkeys", "max")
    assert parse_options({"token_budget": None}).policy.token_budget is None       # exact
    assert parse_options(None).policy.reuse_bonus == DEFAULT_REUSE_BONUS == 2.0
    assert parse_options({"reuse_bonus": 0}).policy.reuse_bonus == 0
    assert parse_options(None).policy.rerank_similarity is None                   # rank at every step
    assert parse_options({"rerank_similarity": 0.8}).policy.rerank_similarity == 0.8


def test_unknown_option_names_valid_keys():
    with pytest.raises(ValueError, match="unknown kvdrive option") as e:
        parse_options({"device_mem": "1GiB"})
    assert "'device_mem' (did you mean 'device_memory'?)" in str(e.value)
    for key in valid_keys():
        assert key in str(e.value)


@pytest.mark.parametrize("typo,meant", [("tokenbudget", "token_budget"), ("host_memroy", "host_memory"),
                                        ("dense_layer", "dense_layers"), ("selction", "selection")])
def test_unknown_option_suggests_the_nearest(typo, meant):
    with pytest.raises(ValueError, match=f"did you mean '{meant}'"):
        parse_options({typo: 1})


def test_unknown_option_far_from_any_has_no_suggestion():
    with pytest.raises(ValueError, match="unknown kvdrive option") as e:
        parse_options({"bogus": 1})
    assert "did you mean" not in str(e.value)


def test_compile_helper_checks_options_before_any_trace():
    """torch.compile hands a backend its options only after Dynamo traced the first call;
    kvdrive_compile.compile checks them when it is called."""
    model = torch.nn.Linear(2, 2)
    forward = model.forward
    with pytest.raises(ValueError, match="did you mean 'device_memory'"):
        kvdrive_compile.compile(model, device_mem="1GiB")
    assert model.forward == forward and kvdrive_compile.counters.graphs == 0
    kvdrive_compile.compile(model, device_memory="1GiB")
    torch.testing.assert_close(model(torch.ones(1, 2)), forward(torch.ones(1, 2)))


@pytest.mark.parametrize("options,match", [
    ({"block_size": 0}, "block_size"), ({"block_size": "16"}, "block_size"),
    ({"token_budget": -3}, "token_budget"), ({"token_budget": 1.5}, "token_budget"),
    ({"device_memory": -1}, "negative"),
    ({"disk_dir": "/nonexistent/kvdrive"}, "does not exist"),
    ({"reuse_bonus": -0.5}, "reuse_bonus"), ({"reuse_bonus": float("nan")}, "reuse_bonus"),
    ({"reuse_bonus": float("inf")}, "reuse_bonus"), ({"reuse_bonus": "1"}, "reuse_bonus"),
    ({"reuse_bonus": True}, "reuse_bonus"),
    ({"rerank_similarity": 1.5}, "rerank_similarity"), ({"rerank_similarity": -0.1}, "rerank_similarity"),
    ({"rerank_similarity": "0.9"}, "rerank_similarity"), ({"rerank_similarity": True}, "rerank_similarity"),
    ({"rerank_similarity": float("nan")}, "rerank_similarity"),
])
def test_bad_values(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        parse_options(options)


def test_unwritable_disk_dir():
    # /proc is a directory nobody can create files in, root included
    with pytest.raises(ValueError, match="not writable"):
        parse_options({"disk_dir": "/proc"})


def test_disk_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="does not exist"):
        parse_options({"disk_dir": str(f)})


@pytest.mark.parametrize("trace,match", [
    (".", "is a directory"), ("/proc/steps.json", "not writable"), ("/nonexistent/steps.json", "does not exist"),
    (5, "path of the JSON file"),
])
def test_trace_paths_are_checked_at_compile_time(trace, match):
    """A trace path the end of the run could not write is refused before anything runs."""
    with pytest.raises((ValueError, TypeError), match=match):
        parse_options({"trace": trace})


def test_empty_trace_means_none(tmp_path, monkeypatch):
    monkeypatch.setenv("KVDRIVE_TRACE", "")
    assert parse_options({}).trace is None and parse_options({"trace": ""}).trace is None
    monkeypatch.setenv("KVDRIVE_TRACE", str(tmp_path / "steps.json"))
    assert parse_options({}).trace == str(tmp_path / "steps.json")
    assert parse_options({"trace": None}).trace is None          # an explicit None overrides the variable


def test_dump_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KVDRIVE_DUMP_DIR", str(tmp_path / "dumps"))
    assert parse_options({}).dump_dir == str(tmp_path / "dumps")


@pytest.mark.parametrize("options,match", [
    ({"bogus": 1}, "unknown kvdrive option"),
    ({"host_memory": -5}, "negative"),
    ({"disk_dir": "/proc"}, "not writable"),
])
def test_errors_surface_at_compile_time(options, match):
    f = torch.compile(lambda x: x + 1, backend="kvdrive", options=options)
    with pytest.raises(Exception, match=match):
        f(torch.ones(2))


def test_mode_is_accepted():
    f = torch.compile(lambda x: x * 2, backend="kvdrive", mode="reduce-overhead")
    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))


@pytest.mark.parametrize("value", ["Inductor", "aot_eager", "", None, True, 1])
def test_compile_rest_accepts_only_inductor_or_eager(value):
    with pytest.raises(ValueError, match=r"compile_rest=.*choose one of \['inductor', 'eager'\]"):
        parse_options({"compile_rest": value})


def test_compile_rest_is_not_part_of_the_runtime_key():
    """Graphs compiled with and without Inductor share one runtime (and its budgets)."""
    inductor, eager = parse_options({"compile_rest": "inductor"}), parse_options({"compile_rest": "eager"})
    assert (inductor.compile_rest, eager.compile_rest, parse_options(None).compile_rest) == ("inductor", "eager", "eager")
    assert inductor.runtime_key() == eager.runtime_key()
