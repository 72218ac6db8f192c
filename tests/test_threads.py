"""Two models compiled with equal options share one runtime (and its budgets). Generating from
two threads at once, each step's blocks stay where its plan found them until its merge (pinned),
so neither thread ever attends the other's KV."""
import sys
import threading

import numpy as np
import pytest
import torch
import transformers as tf

import kvdrive_compile
from exactness import assert_budgets_respected, open_sessions

# tiny budgets: every step of one thread evicts blocks, the other thread's too
# two generations at once pin 4 KiB each (2 layers x 4 rows x one 512-byte open block)
OPTIONS = dict(device_memory="12KiB", host_memory="8KiB", block_size=4, token_budget=None, sink_tokens=0, local_window=0)


def llama(seed):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


@torch.no_grad()
def test_two_threads_sharing_a_runtime_stay_exact():
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    models = [llama(1), llama(2)]
    prompts = [torch.randint(3, 128, (2, 60 + 7 * i), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    refs = [m.generate(p, **kw) for m, p in zip(models, prompts)]
    for m in models:
        m.forward = torch.compile(m.forward, backend="kvdrive", options=OPTIONS)
    for m, p, r in zip(models, prompts, refs):              # compile both in this thread first
        assert torch.equal(m.generate(p, **kw), r)
    results = {0: [], 1: []}
    errors = []

    def worker(i):
        try:
            for _ in range(8):
                results[i].append(models[i].generate(prompts[i], **kw))
        except BaseException as e:                           # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)                  # switch threads often: between a plan and its reads
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for i in range(2):
        wrong = [j for j, out in enumerate(results[i]) if not torch.equal(out, refs[i])]
        assert not wrong, f"thread {i}: runs {wrong} of 8 differ from eager"
    shared = kvdrive_compile.stats(OPTIONS)                   # the one runtime both models use
    assert shared.sessions_open + shared.sessions_closed >= 2 * 9, shared   # every generation of both
    moved = shared.moved_bytes
    assert moved["device->host"] > 0 and moved["host->disk"] > 0, moved
    assert_budgets_respected()
    assert open_sessions() == 0


@torch.no_grad()
def test_three_threads_with_a_budget_on_three_tiers_select_as_one_thread_does():
    """With a token budget, each step ranks and selects; with tier limits shared by three
    generations at once, blocks move between tiers under every step. With ``reuse_bonus=0``
    the selection does not depend on where blocks lie, so every thread's tokens are those of
    the same generation run alone (with the bonus they may differ near the cut: README)."""
    options = dict(device_memory="40KiB", host_memory="16KiB", block_size=4, token_budget=16, sink_tokens=4,
                   local_window=4, dense_layers=0, reuse_bonus=0)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    models = [llama(i + 1) for i in range(3)]
    prompts = [torch.randint(3, 128, (2, 50 + 7 * i), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for m in models:
        m.forward = torch.compile(m.forward, backend="kvdrive", options=options)
    refs = [m.generate(p, **kw) for m, p in zip(models, prompts)]          # one at a time
    results, errors = {i: [] for i in range(3)}, []

    def worker(i):
        try:
            with torch.no_grad():
                for _ in range(4):
                    results[i].append(models[i].generate(prompts[i], **kw))
        except BaseException as e:                           # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    wrong = [(i, j) for i in range(3) for j, out in enumerate(results[i]) if not torch.equal(out, refs[i])]
    assert not wrong, f"(thread, run) whose tokens differ from the run alone: {wrong}"
    moved = kvdrive_compile.stats(options).moved_bytes
    assert moved["device->host"] > 0 and moved["host->disk"] > 0, moved
    assert_budgets_respected()
    assert open_sessions() == 0


WORKQUEUE_SCRIPT = r"""
import sys, threading
import torch
sys.path.insert(0, sys.argv[1])
import test_threads as tt
import kvdrive_compile
from kvdrive_compile.kernels import cpu_linear, numba_math
assert not numba_math.concurrent_launch_safe()
cpu_linear.use_kernel = lambda *key: True          # the linear kernel too, whatever it measures
options = dict(block_size=4, token_budget=16, sink_tokens=4, local_window=4, dense_layers=0)
kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
models = [tt.llama(1), tt.llama(2)]
prompts = [torch.randint(3, 128, (2, 60 + 7 * i), generator=torch.Generator().manual_seed(i)) for i in range(2)]
with torch.no_grad():
    for m in models:
        m.forward = torch.compile(m.forward, backend="kvdrive", options=options)
    refs = [m.generate(p, **kw) for m, p in zip(models, prompts)]      # one thread: the reference
    results, errors = {0: [], 1: []}, []
    def worker(i):
        try:
            with torch.no_grad():
                for _ in range(4):
                    results[i].append(models[i].generate(prompts[i], **kw))
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    sys.setswitchinterval(1e-5)
    [t.start() for t in threads]
    [t.join() for t in threads]
assert not errors, errors
assert all(torch.equal(out, refs[i]) for i in range(2) for out in results[i]), "tokens differ"
import numba
print("ok", numba.threading_layer())
"""


def test_two_threads_under_numbas_workqueue_layer(tmp_path):
    """numba's "workqueue" threading layer (where neither OpenMP nor TBB is installed) aborts the
    process when two threads launch parallel kernels at once: with a budget (the ranking kernel),
    the CPU attention kernel and the linear kernel, two threads generating at once take turns
    (kernels/numba_math.py: parallel_launch) and give the one-thread tokens."""
    import os
    import subprocess

    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    run = subprocess.run([sys.executable, "-c", WORKQUEUE_SCRIPT, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if run.returncode != 0 or "ok workqueue" not in run.stdout:     # in full: an assert's repr cuts the middle
        pytest.fail(f"exit {run.returncode}\nstdout: {run.stdout[-2000:]}\nstderr: {run.stderr[-4000:]}", pytrace=False)


def _registry(reuse_addresses=False):
    from kvdrive_compile.runtime.standins import StandIns

    class Reusing(StandIns):
        @staticmethod
        def _new_base(like):
            # numpy keeps freed small buffers and hands them straight back, as the CUDA caching
            # allocator does with its blocks (this CPU build's allocator rarely reuses an address)
            return torch.from_numpy(np.full((1, 1, 1, 1), np.nan, np.float32))

    lock, released = threading.RLock(), []
    return (Reusing if reuse_addresses else StandIns)(released.append, lock), lock, released


def _sweep(reg, lock, released):
    """What the runtime's sweep does with the registry (runtime/kv_runtime.py: sweep)."""
    with lock:
        reg.settle()
        for sid in reg.sessions():
            if not reg.prune(sid):
                released.append(sid)


def test_a_sweep_in_another_thread_never_drops_a_stand_in_being_made():
    """One thread makes a session's stand-ins (a step), another sweeps (a new generation
    starting): every stand-in made is known to the registry, and a session is released only
    once none of its stand-ins is alive. (A base registered before its stand-in existed looked
    dead to the sweep: the next step found "a stand-in no kvdrive session holds".)"""
    from kvdrive_compile.runtime.standins import StandInKey
    reg, lock, released = _registry()
    like, done, lost = torch.zeros(1, 2, 1, 4), threading.Event(), []

    def steps():
        alive = []
        for i in range(1500):
            s = reg.make(StandInKey(1, i % 2, "k"), like, 5, 0)
            alive = (alive + [s])[-2:]                  # the cache keeps the last step's
            if reg.lookup(s) is None or released:
                lost.append(i)
        done.set()

    def sweeps():
        while not done.is_set():
            _sweep(reg, lock, released)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=steps), threading.Thread(target=sweeps)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        sys.setswitchinterval(interval)
    assert not lost, f"{len(lost)} of 1500 stand-ins lost or their session released while alive (first: {lost[:5]})"


def test_a_death_queued_before_its_base_was_swept_leaves_the_next_base_at_that_address_alone():
    """A stand-in finalized while another thread held the lock is queued; a sweep then drops
    its base and the address goes to another session's base. Settling the queued death must
    not take that base for its own (it would keep the first session from being released,
    or drop the other's)."""
    import gc
    from kvdrive_compile.runtime.standins import StandInKey
    reg, lock, released = _registry(reuse_addresses=True)
    like = torch.zeros(1, 2, 1, 4)
    first = reg.make(StandInKey(1, 0, "k"), like, 5, 0)
    keep = reg.make(StandInKey(1, 1, "k"), like, 5, 0)            # session 1 stays alive
    ptr = first.data_ptr()
    held, go = threading.Event(), threading.Event()

    def hold():
        with lock:
            held.set()
            go.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    del first
    gc.collect()                                  # finalized here, the lock held elsewhere: queued
    go.set()
    holder.join()
    assert reg.prune(1)                           # the sweep drops the dead base, `keep` is alive
    other = reg.make(StandInKey(2, 0, "k"), like, 5, 0)
    assert other.data_ptr() == ptr                 # another session's base at the freed address
    reg.settle()
    assert reg.lookup(other) == StandInKey(2, 0, "k")
    del keep
    gc.collect()
    assert released == [1], released              # session 1 has no stand-in left: released at once
    assert reg.lookup(other) == StandInKey(2, 0, "k")
