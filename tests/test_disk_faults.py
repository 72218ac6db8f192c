"""The disk tier under real faults in real files: bytes changed on disk, short writes, a full
disk, a shut-down I/O pool, a killed process. Each fault either raises a clear error or is
survived exactly; none gives wrong tokens, and none leaves KV held or files behind."""
import contextlib
import errno
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import kvdrive_compile
from exactness import assert_budgets_respected, compiled_copy_forward, greedy_both, open_sessions
from kvdrive_compile.runtime import disk, placement, site_step
from kvdrive_compile.runtime.block_attention import StepMask
from kvdrive_compile.runtime.kv_runtime import KVRuntime
from kvdrive_compile.runtime.tiers import KVDiskError, KVIntegrityError, Tier
from test_hf_models import BUDGETS, build

# the pinned open block alone on the device (2 layers x 2 rows x 2 KiB), two blocks' homes in
# host memory: the rest of the KV is read from disk at every step
BUDGETS = dict(BUDGETS, device_memory="8KiB", host_memory="8KiB")

D = 16                                  # head_dim; a slot (K and V of 16 tokens, fp32) is 2 KiB


def disk_runtime(disk_dir, layers=2, tokens=48):
    """A runtime whose KV all goes to disk (budgets of 0), with ``layers`` layers of K, V
    ``[1, 2, tokens, D]`` appended; returns it, the session and the last layer's K, V."""
    torch.manual_seed(0)
    rt = KVRuntime(block_size=16, device_memory=0, host_memory=0, disk_dir=str(disk_dir))
    session = rt.open_session()
    for layer in range(layers):
        k, v = torch.randn(1, 2, tokens, D), torch.randn(1, 2, tokens, D)
        placement.append(rt, rt.layer(session, layer, k, False), k, v)
    for f in session.disk_files.values():
        f.flush()                  # the home writes run in the background: tamper after them
    return rt, session, (k, v)


def attend_disk(rt, kv, q):
    """One exact decode-step attention over the layer's (all on disk) KV, through the runtime's
    plan, prefetch (the I/O threads) and host attention. q: ``[1, Hq, 1, D]``."""
    plan = site_step.plan_step(rt, kv, kv.length - 1, 1, q)
    site_step.prefetch(rt, plan)
    return site_step.host_attention(rt, plan, q, StepMask(plan.window[0], plan.window[1], None, False), 0.25)


def slot_of(kv, block, row=0):
    return int(kv.home_slot[row, block])


# the file's fd bypasses the page cache (O_DIRECT: aligned requests only); these pokes go
# through a buffered fd of the same file, at each slot's offset


def flip_bit(f, slot, byte=100):
    fd, at = f.buffered_fd(), f.offset(slot) + byte
    (b,) = os.pread(fd, 1, at)
    os.pwrite(fd, bytes([b ^ 0x10]), at)


def swap_slots(f, a, b):
    fd = f.buffered_fd()
    sa, sb = (os.pread(fd, f.slot_bytes, f.offset(s)) for s in (a, b))
    assert sa != sb
    os.pwrite(fd, sb, f.offset(a))
    os.pwrite(fd, sa, f.offset(b))


def zero_slot(f, slot):
    os.pwrite(f.buffered_fd(), bytes(f.slot_bytes), f.offset(slot))


def names(path, slot, layer):
    """The integrity error's text: the file (and that it was unlinked), the slot and the layer."""
    return rf"^KV block read back from {re.escape(str(path))} \(slot {slot}, layer {layer}\) .*unlinked at creation"


@pytest.mark.parametrize("fault", ["bit", "swap", "zero"])
def test_changed_bytes_are_caught_on_read(tmp_path, fault):
    rt, session, _ = disk_runtime(tmp_path)
    kv = session.layers[1]
    (f,) = session.disk_files.values()
    q = torch.randn(1, 4, 1, D)
    attend_disk(rt, kv, q)                                       # intact: reads fine
    bad = slot_of(kv, 1)
    if fault == "bit":
        flip_bit(f, bad)
    elif fault == "swap":                                        # each slot self-consistent, but moved
        bad = min(bad, slot_of(kv, 2))
        swap_slots(f, slot_of(kv, 1), slot_of(kv, 2))
    else:
        zero_slot(f, bad)
    with pytest.raises(KVIntegrityError, match=names(f.path, bad, 1)):
        attend_disk(rt, kv, q)
    with pytest.raises(KVIntegrityError, match="does not match what kvdrive wrote"):
        f.read([bad])
    attend_disk(rt, session.layers[0], q)                        # layer 0's slots are untouched
    rt.close()


def test_truncated_file_is_caught(tmp_path):
    rt, session, _ = disk_runtime(tmp_path, layers=1, tokens=64)    # 4 blocks x 2 rows
    kv = session.layers[0]
    (f,) = session.disk_files.values()
    row0 = [slot_of(kv, b, 0) for b in range(4)]
    os.ftruncate(f.fd, f.offset(row0[2]) + 100)
    # cut short, or (a direct read rounds to the file system's block) read as zeros: never data
    with pytest.raises(KVIntegrityError, match=rf"slot {row0[2]}, layer 0\) (is cut short|does not match)"):
        f.read(row0)
    # a later block extends the file again: the cut bytes now read as zeros, not short
    k = torch.randn(1, 2, 16, D)
    placement.append(rt, kv, k, k)
    f.flush()                                                     # its home write is in the background
    assert os.fstat(f.fd).st_size > f.offset(row0[3])
    with pytest.raises(KVIntegrityError, match="layer 0"):
        attend_disk(rt, kv, torch.randn(1, 4, 1, D))
    f.read(row0[:2] + [slot_of(kv, 4, 0)])                       # the slots the cut spared, and a new one
    rt.close()


def test_token_writes_into_a_disk_block_keep_its_checksum(tmp_path):
    """Decode tokens land in the open block on disk (budgets of 0): each write reads the slot
    (checked), patches it and writes it whole with a new checksum."""
    rt, session, (k_all, v_all) = disk_runtime(tmp_path, layers=1, tokens=20)
    kv = session.layers[0]
    (f,) = session.disk_files.values()
    for _ in range(14):
        k, v = torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D)
        placement.append(rt, kv, k, v)
        k_all, v_all = torch.cat([k_all, k], 2), torch.cat([v_all, v], 2)
    placement.place_fresh(rt, kv)
    assert set(kv.where()[0].reshape(-1).tolist()) == {Tier.DISK}
    q = torch.randn(1, 4, 1, D)
    out, _ = attend_disk(rt, kv, q)
    ref = torch.softmax(q.double() @ k_all.double().repeat_interleave(2, 1).transpose(-1, -2) * 0.25, -1)
    ref = ref @ v_all.double().repeat_interleave(2, 1)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    open_slot = slot_of(kv, 2, row=1)
    flip_bit(f, open_slot, byte=f.slot_bytes - 1)                # the open block's last V byte
    with pytest.raises(KVIntegrityError, match=names(f.path, open_slot, 0)):
        placement.append(rt, kv, torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D))
    rt.close()


# a short write (past RLIMIT_FSIZE) is finished or an error: tests/test_disk_tier.py


def kv_fds(pid, directory):
    """The fds of process ``pid`` open on files in ``directory``."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(directory) + "/"):
                out.append(fd)
    return out


def test_files_are_unlinked_at_creation_without_o_tmpfile(tmp_path, monkeypatch):
    """Where the filesystem has no O_TMPFILE the file is made in a private directory, and both
    are removed at once: nothing is ever left to find."""
    monkeypatch.setattr(disk, "_O_TMPFILE", 0)
    rt, session, _ = disk_runtime(tmp_path, layers=1)
    (f,) = session.disk_files.values()
    assert list(tmp_path.iterdir()) == []
    assert stat.S_IMODE(os.fstat(f.fd).st_mode) == 0o600
    (fd,) = kv_fds(os.getpid(), tmp_path)
    assert re.search(r"/kvdrive-\w+/session\d+-float32-d16\.kv \(deleted\)$", os.readlink(f"/proc/self/fd/{fd}"))
    attend_disk(rt, session.layers[0], torch.randn(1, 4, 1, D))
    rt.close()
    assert kv_fds(os.getpid(), tmp_path) == []


def test_disk_dir_removed_says_so(tmp_path):
    gone = tmp_path / "kv"
    gone.mkdir()
    rt = KVRuntime(block_size=16, device_memory=0, host_memory=0, disk_dir=str(gone))
    gone.rmdir()                                                 # a temp cleaner, say
    s = rt.open_session()
    k = torch.randn(1, 2, 20, D)
    with pytest.raises(KVDiskError, match=rf"disk_dir '{re.escape(str(gone))}' is gone.*options=\{{'disk_dir'"):
        placement.append(rt, rt.layer(s, 0, k, False), k, k)
    rt.close()


# -- the model: a tiny random Llama with KV on disk (see test_hf_models) ------------------------

def prompt(n, seed=1):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def runtime_on(disk_dir) -> KVRuntime:
    (rt,) = [rt for rt in kvdrive_compile.runtimes.runtimes() if rt._disk_parent == str(disk_dir)]
    return rt


class CorruptDisk(LogitsProcessor):
    """Between two decode steps (after ``at`` tokens), flip a bit in slot 0 of every KV file."""

    def __init__(self, rt, at):
        self.rt, self.at, self.calls = rt, at, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.at:
            for session in self.rt.sessions.values():
                for f in session.disk_files.values():
                    f.flush()               # a home write still in flight would undo the flip
                    flip_bit(f, 0)
        return scores


@torch.no_grad()
def test_corruption_mid_generation_raises_not_wrong_tokens(tmp_path):
    model = build("llama")
    opts = dict(BUDGETS, disk_dir=str(tmp_path))
    ids = prompt(70)
    ref, out = greedy_both(model, ids, 4, **opts)                 # compiles; KV reaches the disk
    assert torch.equal(ref, out)
    rt = runtime_on(tmp_path)
    assert rt.moved["host->disk"] > 0
    eager = compiled_copy_forward(model, token_budget=None, **opts)
    try:
        with pytest.raises(KVIntegrityError, match=r"\.kv \(slot 0, layer \d\) does not match.*unlinked at creation"):
            model.generate(ids, max_new_tokens=8, do_sample=False,
                           logits_processor=LogitsProcessorList([CorruptDisk(rt, at=3)]))
    finally:
        model.forward = eager
    assert open_sessions() == 0 and kv_fds(os.getpid(), tmp_path) == []
    ref, out = greedy_both(model, ids, 4, **opts)                 # the next generation is exact
    assert torch.equal(ref, out)


def test_a_kept_error_is_raised_anew():
    """An error a file or future keeps is raised as a new exception (same type, message and
    errno, caused by the first), so raising it never adds the raiser's frames to the kept one."""
    kept = KVDiskError("writing KV failed", errno.EIO)
    with contextlib.suppress(KVDiskError):
        raise kept
    frames = len(list(traceback.walk_tb(kept.__traceback__)))
    for _ in range(2):
        with pytest.raises(KVDiskError, match="^writing KV failed$") as caught:
            disk.raise_kept(kept)
        assert caught.value is not kept and caught.value.errno == errno.EIO and caught.value.__cause__ is kept
        with pytest.raises(KVDiskError) as again:           # a copy raised again: still caused by the first
            disk.raise_kept(caught.value)
        assert again.value.__cause__ is kept
    assert len(list(traceback.walk_tb(kept.__traceback__))) == frames


class FailWrites(LogitsProcessor):
    """From the ``at``-th generated token on, every write to a KV file fails with EIO (in
    whichever thread makes it: a decode step writes the block it completes to its home in the
    background), after a while: the step that started the write does not see it fail. Between
    steps it waits for the writes in flight, so that the next step, as it opens, is the first to
    see the failure."""

    def __init__(self, monkeypatch, rt, at):
        self.rt, self.at, self.calls, self.failing = rt, at, 0, False
        real = os.pwrite

        def pwrite(fd, data, offset):
            if self.failing:
                time.sleep(0.2)
                raise OSError(errno.EIO, "Input/output error")
            return real(fd, data, offset)
        monkeypatch.setattr(disk.os, "pwrite", pwrite)

    def __call__(self, input_ids, scores):
        self.calls += 1
        self.failing = self.failing or self.calls >= self.at
        for session in list(self.rt.sessions.values()):
            for f in session.disk_files.values():
                with f.lock:
                    ops = list(f.writes)
                for op in ops:
                    op.exception()
        return scores


def cache_in(tb):
    """The generation's cache, as the frames of a traceback hold it."""
    from transformers import Cache

    for frame, _ in traceback.walk_tb(tb):
        for value in frame.f_locals.values():
            for x in (value.values() if isinstance(value, dict) else (value,)):
                if isinstance(x, Cache):
                    return x
    raise AssertionError("no cache in the traceback's frames")


@torch.no_grad()
def test_a_failed_write_releases_its_generation_at_once(tmp_path, monkeypatch):
    """A generation a disk error ended gives its KV back when the error is raised, not when its
    cache is dropped: the error (kept here as a notebook or a logger keeps the last one, with its
    frames and so the cache) holds no blocks and no file, the cache says it was released, and
    the next generation is exact. (A write that failed in the background was kept by its file
    and raised itself at the next step: that error then held the cache for good, and every later
    generation was refused for want of room.)"""
    model = build("llama")
    opts = dict(BUDGETS, disk_dir=str(tmp_path))
    ids = prompt(75)                                              # a block completes 5 tokens in
    ref, out = greedy_both(model, ids, 2, **opts)                 # compiles; KV reaches the disk
    assert torch.equal(ref, out) and open_sessions() == 0
    eager = compiled_copy_forward(model, token_budget=None, **opts)
    fail = FailWrites(monkeypatch, runtime_on(tmp_path), at=3)
    try:
        with pytest.raises(KVDiskError, match=r"writing KV to .*\.kv .*failed: Input/output error") as caught:
            model.generate(ids, max_new_tokens=12, do_sample=False, logits_processor=LogitsProcessorList([fail]))
        fail.failing = False
        assert open_sessions() == 0 and kv_fds(os.getpid(), tmp_path) == []
        with pytest.raises(RuntimeError, match="stand-in of KV that no kvdrive session holds"):
            model(ids[:, -1:], cache=cache_in(caught.tb))
    finally:
        model.forward = eager
    ref, out = greedy_both(model, ids, 8, **opts)                 # the next generation is exact
    assert torch.equal(ref, out)


class RandomFaults:
    """Reads and writes of KV files that fail now and then, at random (seeded): EIO, a short
    read or write, a read of nothing, a flipped bit in what was read, a full disk, a slow
    request. ``on``: whether faults are injected now."""

    READS, WRITES = ("eio", "short", "nothing", "flip", "slow"), ("eio", "short", "full", "slow")

    def __init__(self, monkeypatch, p):
        self.p, self.on, self.rng, self.injected = p, False, random.Random(0), 0
        self.lock = threading.Lock()
        self.preadv, self.pwrite = os.preadv, os.pwrite
        monkeypatch.setattr(disk.os, "preadv", self._preadv)
        monkeypatch.setattr(disk.os, "pwrite", self._pwrite)

    def _fault(self, kinds):
        with self.lock:
            if not self.on or self.rng.random() >= self.p:
                return None, 0
            self.injected += 1
            return self.rng.choice(kinds), self.rng.random()

    def _preadv(self, fd, views, offset):
        kind, x = self._fault(self.READS)
        if kind == "eio":
            raise OSError(errno.EIO, "Input/output error")
        if kind == "nothing":
            return 0
        if kind == "short":
            return max(0, self.preadv(fd, list(views)[:1], offset) - 1 - int(x * 64))
        if kind == "slow":
            time.sleep(0.02)
        n = self.preadv(fd, views, offset)
        if kind == "flip":
            view = memoryview(views[int(x * len(views))]).cast("B")
            view[int(x * 7919) % len(view)] ^= 1 << int(x * 8)
        return n

    def _pwrite(self, fd, data, offset):
        kind, _ = self._fault(self.WRITES)
        if kind in ("eio", "full"):
            err = errno.EIO if kind == "eio" else errno.ENOSPC
            raise OSError(err, os.strerror(err))
        if kind == "short":
            view = memoryview(data).cast("B")
            return self.pwrite(fd, view[:max(1, len(view) // 2)], offset)
        if kind == "slow":
            time.sleep(0.02)
        return self.pwrite(fd, data, offset)


@torch.no_grad()
def test_random_disk_faults_give_the_tokens_or_an_error(tmp_path, monkeypatch):
    """Faults injected at random into a generation's disk reads and writes (a left-padded batch
    of 2, its KV mostly on disk, the CPU part on the worker, reads ahead of need): each
    generation gives eager's tokens or a kvdrive disk error, never other tokens; after each,
    no session, file or budget overrun is left, and a generation without faults is exact."""
    model = build("llama")
    opts = dict(BUDGETS, device_memory="24KiB", host_memory="16KiB", disk_dir=str(tmp_path), token_budget=None,
                cpu_worker=True, prefetch_depth=2)
    faults = RandomFaults(monkeypatch, p=0.03)
    g = torch.Generator().manual_seed(1)
    outcomes = []
    for trial in range(6):
        n = 40 + 17 * trial
        ids = torch.randint(3, 128, (2, n), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :trial + 1] = 0
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, attention_mask=mask)
        ref = model.generate(ids, **kw)
        eager = compiled_copy_forward(model, **opts)
        faults.on = True
        try:
            out = model.generate(ids, **kw)
            assert torch.equal(out, ref), f"trial {trial}: eager {ref[:, n:].tolist()} != kvdrive {out[:, n:].tolist()}"
            outcomes.append("exact")
        except KVDiskError as e:
            assert "This generation cannot continue" in str(e), e
            outcomes.append(type(e).__name__)
        finally:
            faults.on = False
            model.forward = eager
        assert open_sessions() == 0, (trial, outcomes)
        assert os.listdir(tmp_path) == [] and kv_fds(os.getpid(), tmp_path) == []
        assert_budgets_respected()
    # which request a fault hits depends on the I/O threads' order: here 2 of 6 gave the tokens
    assert faults.injected > 0, outcomes
    ref, out = greedy_both(model, ids, 8, attention_mask=mask, **opts)
    assert torch.equal(ref, out)


@contextlib.contextmanager
def small_tmpfs(path, size):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)],
                      capture_output=True).returncode:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def used_bytes(path):
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def fd_count():
    return len(os.listdir("/proc/self/fd"))


@torch.no_grad()
def disk_full_then_room(disk_dir, make_room):
    """A generation whose KV overflows the disk raises a clear error and holds nothing after
    it; once there is room (``make_room()``), the next generation in this process is exact."""
    model = build("llama")
    opts = dict(BUDGETS, disk_dir=str(disk_dir))
    ref, out = greedy_both(model, prompt(40), 2, **opts)          # fits: compiles, warms up
    assert torch.equal(ref, out) and open_sessions() == 0
    fds = fd_count()
    eager = compiled_copy_forward(model, token_budget=None, **opts)
    try:
        with pytest.raises(KVDiskError) as caught:               # ~140 KiB of KV on disk
            model.generate(prompt(300), max_new_tokens=2, do_sample=False)
    finally:
        model.forward = eager
    assert caught.value.errno in (errno.ENOSPC, errno.EFBIG), caught.value
    assert re.search(r"^writing KV to .*\.kv \(slot \d+, layer \d\) failed: .*unlinked at creation", str(caught.value))
    if caught.value.errno == errno.ENOSPC:
        assert f"the disk under disk_dir '{disk_dir}' is full" in str(caught.value)
    assert open_sessions() == 0 and fd_count() == fds and kv_fds(os.getpid(), disk_dir) == []
    assert list(os.scandir(disk_dir)) == []
    make_room()
    read = runtime_on(disk_dir).moved["disk->host"]
    ref, out = greedy_both(model, prompt(300), 4, **opts)
    assert torch.equal(ref, out)
    assert runtime_on(disk_dir).moved["disk->host"] - read > 3 * 64 * 1024     # each step read it all
    assert open_sessions() == 0


RLIMIT_DISK_FULL = """
import resource, signal, sys
import test_disk_faults as t
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
t.disk_full_then_room(sys.argv[1], lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2))
print("disk full, then exact")
"""


def test_disk_full_raises_then_next_generation_is_exact(tmp_path):
    disk = tmp_path / "small"
    with small_tmpfs(disk, "64k") as mounted:
        if mounted:
            disk_full_then_room(disk, lambda: subprocess.run(
                ["mount", "-o", "remount,size=1m", str(disk)], check=True))
            assert used_bytes(disk) == 0
            return
    # no mount here: the file size limit plays the full disk (EFBIG), in a process of its own
    done = subprocess.run([sys.executable, "-c", RLIMIT_DISK_FULL, str(disk)], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(__file__))
    assert done.returncode == 0 and "disk full, then exact" in done.stdout, done.stderr[-3000:]


@torch.no_grad()
def test_io_pool_shut_down_is_replaced(tmp_path):
    model = build("llama")
    opts = dict(BUDGETS, disk_dir=str(tmp_path))
    ref, out = greedy_both(model, prompt(70), 4, **opts)
    assert torch.equal(ref, out)
    rt = runtime_on(tmp_path)
    old = rt.io_pool
    old.shutdown()
    read = rt.moved["disk->host"]
    ref, out = greedy_both(model, prompt(70), 4, **opts)
    assert torch.equal(ref, out)
    assert rt.io_pool is not old and rt.moved["disk->host"] > read


CHILD = """
import sys
import torch
import kvdrive_compile
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

torch.manual_seed(0)
config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
model = LlamaForCausalLM(config).eval()
model.forward = torch.compile(model.forward, backend="kvdrive", options={
    "device_memory": "4KiB", "host_memory": "2KiB", "disk_dir": sys.argv[1], "token_budget": None,
    "sink_tokens": 0, "local_window": 0})


class Announce(LogitsProcessor):
    said = False

    def __call__(self, ids, scores):
        if not Announce.said:
            print("generating", flush=True)
            Announce.said = True
        return scores


ids = torch.randint(0, 97, (1, 120))
with torch.no_grad():
    while True:
        model.generate(ids, max_new_tokens=16, do_sample=False, logits_processor=LogitsProcessorList([Announce()]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_process_leaves_no_files(tmp_path, sig):
    disk = tmp_path / "kv"
    disk.mkdir()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(disk)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert child.stdout.readline().strip() == "generating", child.stderr.read()[-3000:]
        deadline = time.monotonic() + 30
        while not kv_fds(child.pid, disk):                       # caught in the middle of a generate
            assert time.monotonic() < deadline, "the child never held a KV file open"
            time.sleep(0.01)
        child.send_signal(sig)
        assert child.wait(timeout=30) == -sig
    finally:
        child.kill()
        child.communicate()
    assert list(disk.iterdir()) == []
