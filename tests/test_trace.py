"""The timeline (runtime/trace.py): the Chrome trace a Tracer writes, the summary's arithmetic on
hand-made events with known answers, and ``kvdrive trace summary``."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from kvdrive_compile import cli
from kvdrive_compile.runtime import trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(path) as f:
        return json.load(f)


def complete_events(data):
    return [e for e in data["traceEvents"] if e["ph"] == "X"]


def metadata(data, name):
    return {e["tid"]: e["args"]["name"] for e in data["traceEvents"] if e["ph"] == "M" and e["name"] == name}


def record_on_thread(tracer, thread_name, event_name):
    t = threading.Thread(target=lambda: tracer.complete(event_name, 1.0, 1.5, step=0), name=thread_name)
    t.start()
    t.join()


def test_tracer_writes_a_chrome_trace(tmp_path):
    path = tmp_path / "steps.json"
    tracer = trace.Tracer(str(path))
    t0 = time.perf_counter()
    tracer.complete("disk_read", t0, t0 + 0.002, step=3, layer=1, bytes=4096, phase="decode", session=7)
    tracer.close()
    data = read(path)
    assert data["displayTimeUnit"] == "ms"
    assert data["otherData"]["events"] == 1 and data["otherData"]["dropped_events"] == 0
    (event,) = complete_events(data)
    assert event["name"] == "disk_read" and event["cat"] == "kvdrive" and event["ph"] == "X"
    assert event["pid"] == os.getpid() and event["tid"] == 0
    assert event["dur"] == pytest.approx(2000, abs=0.01) and event["ts"] >= 0
    assert event["args"] == {"step": 3, "layer": 1, "bytes": 4096, "phase": "decode", "session": 7}
    assert metadata(data, "process_name") == {0: "kvdrive"}


def test_each_thread_gets_its_own_tid_and_name(tmp_path):
    path = tmp_path / "steps.json"
    tracer = trace.Tracer(str(path))
    tracer.complete("plan", 1.0, 1.1)
    record_on_thread(tracer, "kvdrive-io_0", "disk_read")
    record_on_thread(tracer, "kvdrive-cpu-attention", "cpu_attention")
    tracer.complete("merge", 1.2, 1.3)
    tracer.flush()
    data = read(path)
    tids = {e["name"]: e["tid"] for e in complete_events(data)}
    assert tids == {"plan": 0, "merge": 0, "disk_read": 1, "cpu_attention": 2}
    assert metadata(data, "thread_name") == {0: "MainThread", 1: "kvdrive-io_0", 2: "kvdrive-cpu-attention"}


def test_span_times_its_body_also_when_it_raises(tmp_path):
    path = tmp_path / "steps.json"
    tracer = trace.Tracer(str(path))
    with tracer.span("plan", step=0):
        time.sleep(0.01)
    with pytest.raises(KeyError), tracer.span("merge", step=0):
        raise KeyError("boom")
    tracer.flush()
    events = {e["name"]: e for e in complete_events(read(path))}
    assert events["plan"]["dur"] >= 10_000 and events["plan"]["args"] == {"step": 0}
    assert "merge" in events


def test_disabled_tracer_does_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(trace.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    tracer = trace.tracer_for(None)
    assert not tracer.enabled and tracer.path is None
    tracer.complete("disk_read", 1.0, 2.0, step=0)
    assert tracer.span("plan") is tracer.span("merge")       # one shared no-op context, no clock read
    with tracer.span("plan"):
        pass
    tracer.flush()
    tracer.close()
    assert tracer._events == [] and tracer._threads == []
    assert os.listdir(tmp_path) == []


def test_event_cap_stops_recording_and_says_so(tmp_path):
    path = tmp_path / "steps.json"
    tracer = trace.Tracer(str(path), max_events=5)
    for i in range(8):
        tracer.complete("plan", 1.0, 1.1, step=i)
    tracer.close()
    data = read(path)
    assert [e["args"]["step"] for e in complete_events(data)] == [0, 1, 2, 3, 4]
    assert data["otherData"]["dropped_events"] == 3 and "cap" in data["otherData"]["note"]


def test_flush_replaces_the_file_whole(tmp_path):
    path = tmp_path / "steps.json"
    tracer = trace.Tracer(str(path))
    tracer.complete("plan", 1.0, 1.1, step=0)
    tracer.flush()
    assert len(complete_events(read(path))) == 1
    tracer.complete("plan", 1.2, 1.3, step=1)
    tracer.flush()
    assert len(complete_events(read(path))) == 2
    assert os.listdir(tmp_path) == ["steps.json"]            # no temporary file left behind


def test_closed_tracer_ignores_later_events(tmp_path):
    path = tmp_path / "steps.json"
    tracer = trace.Tracer(str(path))
    tracer.complete("plan", 1.0, 1.1)
    tracer.close()
    tracer.complete("plan", 1.2, 1.3)
    tracer.close()
    assert len(complete_events(read(path))) == 1


def test_unwritten_events_are_written_at_exit(tmp_path):
    path = tmp_path / "steps.json"
    code = ("import runtime.trace as t; tracer = t.Tracer(%r); tracer.complete('plan', 1.0, 1.1, step=0)" % str(path))
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
    assert [e["name"] for e in complete_events(read(path))] == ["plan"]


def test_env_var_is_the_default_path_and_runtimes_do_not_share_a_file(tmp_path, monkeypatch):
    path = tmp_path / "steps.json"
    monkeypatch.setenv(trace.ENV_VAR, str(path))
    first, second = trace.tracer_for(None), trace.tracer_for(None)
    assert first.enabled and first.path == str(path)
    assert second.path == str(tmp_path / "steps.1.json")
    explicit = trace.tracer_for(str(tmp_path / "other.json"))
    assert explicit.path == str(tmp_path / "other.json")
    for t in (first, second, explicit):
        t.close()


# --- summary ------------------------------------------------------------------------------------

def ev(name, start_ms, end_ms, tid, **args):
    return {"name": name, "cat": "kvdrive", "ph": "X", "ts": start_ms * 1000, "dur": (end_ms - start_ms) * 1000,
            "pid": 1, "tid": tid, "args": args}


def test_disk_read_is_hidden_only_by_compute_on_other_threads():
    events = [ev("disk_read", 0, 10, 1, step=1, phase="decode"),
              ev("cpu_attention", 5, 15, 0, step=1, phase="decode"),
              ev("io_wait", 0, 10, 0, step=1, phase="decode"),         # waiting: not work
              ev("io_wait", 0, 10, 2, step=1, phase="decode")]
    assert trace.summarize(events)["overlap"]["disk_read_hidden"] == pytest.approx(0.5)
    same_thread = [ev("disk_read", 0, 10, 1, step=1, phase="decode"),
                   ev("cpu_attention", 0, 10, 1, step=1, phase="decode")]
    assert trace.summarize(same_thread)["overlap"]["disk_read_hidden"] == 0


# step 0, prefill: 20 ms. step 1, decode, wall 100-116: a disk read on the I/O thread half hidden by
# CPU attention on the main thread (with io_wait nested in it), a copy wholly hidden. step 2, decode,
# wall 200-210: a disk read then attention, nothing hidden.
STEPS = [
    {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "kvdrive"}},
    ev("prefill_attention", 0, 20, 0, step=0, phase="prefill"),
    ev("disk_read", 100, 110, 1, step=1, phase="decode", bytes=4096),
    ev("cpu_attention", 105, 116, 0, step=1, phase="decode"),
    ev("io_wait", 106, 108, 0, step=1, phase="decode"),
    ev("io_wait", 100, 109, 2, step=1, phase="decode"),
    ev("host_to_device", 110, 112, 1, step=1, phase="decode"),
    ev("disk_read", 200, 204, 1, step=2, phase="decode"),
    ev("cpu_attention", 204, 210, 0, step=2, phase="decode"),
]


def test_summary_of_known_steps():
    s = trace.summarize(STEPS)
    assert s["events"] == 8
    assert s["stages"]["disk_read"] == {"count": 2, "total_ms": pytest.approx(14), "mean_ms": pytest.approx(7),
                                        "decode_share": pytest.approx(14 / 26)}
    assert s["stages"]["cpu_attention"]["decode_share"] == pytest.approx(17 / 26)
    assert s["stages"]["prefill_attention"]["decode_share"] == 0
    assert s["decode"] == {"steps": 2, "wall_ms_p50": pytest.approx(13), "wall_ms_mean": pytest.approx(13),
                           "wall_ms_total": pytest.approx(26)}
    assert s["prefill"]["steps"] == 1 and s["prefill"]["wall_ms_p50"] == pytest.approx(20)
    o = s["overlap"]
    assert o["stage_sum_over_wall"] == pytest.approx((10 + 11 + 2 + 9 + 2 + 4 + 6) / 26)
    assert o["disk_read_ms"] == pytest.approx(14) and o["disk_read_hidden"] == pytest.approx(5 / 14)
    assert o["host_to_device_ms"] == pytest.approx(2) and o["host_to_device_hidden"] == pytest.approx(1)
    assert o["wall_over_slowest_stage"] == pytest.approx((16 / 11 + 10 / 6) / 2)
    assert o["slowest_stage_counts"] == {"cpu_attention": 2}


def test_nested_compute_is_counted_once():
    events = [ev("disk_read", 0, 10, 1, step=1, phase="decode"),
              ev("cpu_attention", 0, 8, 0, step=1, phase="decode"),
              ev("merge", 2, 6, 0, step=1, phase="decode"),
              ev("plan", 4, 9, 2, step=1, phase="decode")]
    assert trace.summarize(events)["overlap"]["disk_read_hidden"] == pytest.approx(0.9)


def test_summary_without_steps_has_no_ratios():
    s = trace.summarize([ev("plan", 0, 1, 0)])
    assert s["decode"]["steps"] == 0 and s["overlap"]["disk_read_hidden"] is None
    assert s["overlap"]["wall_over_slowest_stage"] is None
    assert "plan" in trace.render(s)


def test_cpu_samples_make_a_counter_track(tmp_path, monkeypatch):
    path = tmp_path / "steps.json"
    tracer = trace.Tracer(str(path))
    clocks = iter([(10.0, 3.0), (10.5, 3.8), (12.5, 4.0)])       # (wall, process CPU) seconds at each sample
    now = {}

    class Clock:
        @staticmethod
        def perf_counter():
            return now["wall"]

        @staticmethod
        def process_time():
            return now["cpu"]

    monkeypatch.setattr(trace, "time", Clock)
    samples = []
    for wall, cpu in clocks:
        now.update(wall=wall, cpu=cpu)
        samples.append(tracer.cpu_sample())
    monkeypatch.undo()
    tracer.close()
    assert samples == pytest.approx([3000, 3800, 4000])
    data = read(path)
    counters = [e for e in data["traceEvents"] if e["ph"] == "C"]       # one per interval, at its start
    assert [c["name"] for c in counters] == ["cores busy"] * 2
    assert all(c["cat"] == "kvdrive" and c["pid"] == os.getpid() for c in counters)
    assert [c["args"]["cores"] for c in counters] == pytest.approx([1.6, 0.1])
    assert counters[1]["ts"] - counters[0]["ts"] == pytest.approx(0.5e6)
    assert data["otherData"]["cpu_count"] == trace.usable_cpus()
    assert trace.Tracer(None).cpu_sample() >= 0          # a disabled tracer records nothing but still answers


def test_cores_busy_spans_each_decode_step_to_its_sessions_next_opening():
    cpu = trace.CPU_MS
    events = [ev("append", 0, 1, 0, step=1, phase="prefill", session=1, **{cpu: 0.0}),
              ev("append", 100, 101, 0, step=2, phase="decode", session=1, **{cpu: 500.0}),
              ev("append", 105, 106, 0, step=3, phase="prefill", session=2, **{cpu: 510.0}),   # another session
              ev("append", 200, 201, 0, step=4, phase="decode", session=1, **{cpu: 650.0}),
              ev("append", 300, 301, 0, step=5, phase="decode", session=1, **{cpu: 900.0}),
              ev("merge", 300, 310, 0, step=5, phase="decode", layer=0)]
    # decode intervals of session 1: 100 -> 200 (150 ms of CPU), 200 -> 300 (250); the prefill's is left out
    assert trace.summarize(events)["overlap"]["cores_busy"] == pytest.approx(400 / 200)
    assert trace.summarize(events[:2])["overlap"]["cores_busy"] is None
    text = trace.render(trace.summarize(events, {"cpu_count": 2}))
    assert "2.00 cores of 2" in text and "no idle core" in text


def test_a_written_trace_reads_back(tmp_path):
    path = tmp_path / "steps.json"
    tracer = trace.Tracer(str(path))
    tracer.complete("plan", 1.000, 1.002, step=0, phase="decode")
    record_on_thread(tracer, "kvdrive-io_0", "disk_read")
    tracer.close()
    events, _ = trace.load(str(path))
    s = trace.summarize(events)
    assert s["decode"]["steps"] == 1 and s["decode"]["wall_ms_p50"] == pytest.approx(500)


# --- kvdrive trace summary ----------------------------------------------------------------------

@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"traceEvents": STEPS, "displayTimeUnit": "ms", "otherData": {}}))
    return str(path)


def test_cli_prints_the_tables(trace_file, capsys):
    assert cli.main(["trace", "summary", trace_file]) == 0
    out = capsys.readouterr().out
    assert "disk_read" in out and "share of decode wall" in out and "wall ms p50" in out
    assert "disk_read hidden by compute:  36% of 14.00 ms" in out


def test_cli_json(trace_file, capsys):
    assert cli.main(["trace", "summary", trace_file, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["decode"]["steps"] == 2 and summary["overlap"]["host_to_device_hidden"] == 1


@pytest.mark.parametrize("content", [None, "{not json", '{"events": []}', '{"traceEvents": [{"ph": "X", "name": "a"}]}'])
def test_cli_refuses_a_missing_or_malformed_file(tmp_path, capsys, content):
    path = tmp_path / "steps.json"
    if content is not None:
        path.write_text(content)
    assert cli.main(["trace", "summary", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvdrive trace summary:") and ("steps.json" in err or "event 0" in err)
