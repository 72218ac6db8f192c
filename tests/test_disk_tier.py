"""The disk tier's file (runtime/disk.py) on its own: O_DIRECT or a recorded fallback, aligned
slots of any size, rows laid out side by side, coalesced and parallel reads, background
writes whose failures are not lost, checksums, and nothing left after close."""
import errno
import fcntl
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kvdrive_compile.runtime import disk
from kvdrive_compile.runtime.disk import IO_THREAD_PREFIX, DiskFile, KVDiskError, KVIntegrityError


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4, thread_name_prefix=IO_THREAD_PREFIX) as p:
        yield p


def new_file(directory, pool, dtype=torch.float32, head_dim=16, block_size=16, **kw) -> DiskFile:
    return DiskFile(str(directory), "test.kv", dtype, block_size, head_dim, pool.submit, **kw)


def blocks(f: DiskFile, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (n, f.block_size, f.head_dim)
    return torch.randn(shape, generator=g).to(f.dtype), torch.randn(shape, generator=g).to(f.dtype)


def fill(f: DiskFile, layers=2, rows=3, per_row=5, seed=0):
    """``per_row`` blocks for each (layer, row); returns the slots and the K, V written to them."""
    slots = [s for _ in range(per_row) for layer in range(layers) for s in f.alloc(layer, rows)]
    k, v = blocks(f, len(slots), seed)
    f.write(slots, k, v)
    return slots, k, v


def o_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def refuse_o_direct(monkeypatch):
    def refuse(fd):
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(disk, "_set_direct", refuse)


def test_o_direct_on_a_disk_file_system(tmp_path, pool):
    if disk.fs_type(str(tmp_path)) in ("tmpfs", "?"):
        pytest.skip(f"{tmp_path} is not on a disk file system")
    f = new_file(tmp_path, pool, torch.float16, head_dim=40)           # 2560-byte slots
    assert f.direct and f.cache_bypass == "O_DIRECT" and o_direct(f.fd)
    assert f.align >= 4096 and f.stride == 4096 and f.slot_bytes == 2560
    slots, k, v = fill(f)
    kk, vv = f.read(slots)
    assert torch.equal(kk, k) and torch.equal(vv, v)
    assert os.fstat(f.fd).st_size == (max(slots) + 1) * f.stride
    f.close()


def test_fallback_when_o_direct_is_refused(tmp_path, pool, monkeypatch):
    refuse_o_direct(monkeypatch)
    dropped = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: (dropped.append((off, n, advice)),
                                                                         real(fd, off, n, advice))[1])
    f = new_file(tmp_path, pool, torch.bfloat16, head_dim=40)
    kind = disk.fs_type(str(tmp_path))
    assert not f.direct and not o_direct(f.fd)
    assert f.cache_bypass == f"fadvise DONTNEED (O_DIRECT refused on {kind}: EINVAL)"
    assert f.stride == f.slot_bytes == 2560                             # no padding without O_DIRECT
    slots, k, v = fill(f, per_row=3)
    assert dropped and all(a == os.POSIX_FADV_DONTNEED for *_, a in dropped)
    written = len(dropped)
    kk, vv = f.read(slots[::-1])
    assert torch.equal(kk, k.flip(0)) and torch.equal(vv, v.flip(0))
    assert len(dropped) > written                                      # reads drop their range too
    f.close()


def test_tmpfs(pool):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    f = new_file("/dev/shm", pool, torch.float16, head_dim=40)
    assert f.fs_type == "tmpfs"
    assert f.cache_bypass.startswith("O_DIRECT (tmpfs") if f.direct else \
        f.cache_bypass == "fadvise DONTNEED (O_DIRECT refused on tmpfs: EINVAL)"
    slots, k, v = fill(f)
    kk, vv = f.read_async(slots[::-1]).result()
    assert torch.equal(kk, k.flip(0)) and torch.equal(vv, v.flip(0))
    f.close()


@pytest.mark.parametrize("dtype,head_dim,staged", [
    (torch.float16, 40, None), (torch.bfloat16, 40, None), (torch.float32, 40, None),   # 2560, 2560, 5120 B
    (torch.bfloat16, 96, None), (torch.float32, 64, None), (torch.float32, 64, True),  # 6144, 8192, 8192 B
])
def test_round_trip_in_scrambled_order(tmp_path, pool, dtype, head_dim, staged):
    f = new_file(tmp_path, pool, dtype, head_dim=head_dim, read_into_rows=False if staged else None,
                 max_request=3 * 8192)                                 # long runs cut into requests
    assert f.stride % f.align == 0 and f.stride >= f.slot_bytes
    slots, k, v = fill(f, layers=2, rows=4, per_row=9, seed=head_dim)
    perm = torch.randperm(len(slots), generator=torch.Generator().manual_seed(1)).tolist()
    scrambled = [slots[i] for i in perm]
    for kk, vv in (f.read(scrambled), f.read_async(scrambled).result()):
        assert kk.shape == (len(slots), 16, head_dim) and kk.dtype == dtype and kk.is_contiguous()
        assert torch.equal(kk, k[perm]) and torch.equal(vv, v[perm])
    some = scrambled[:7] + scrambled[:3]                               # repeated slots too
    kk, vv = f.read(some)
    assert torch.equal(kk, k[perm[:7] + perm[:3]]) and torch.equal(vv, v[perm[:7] + perm[:3]])
    # rewrite a scattered half in scrambled order, then patch tokens of one slot
    k2, v2 = blocks(f, len(slots) // 2, seed=7)
    f.write(scrambled[::2], k2, v2)
    k[perm[::2]], v[perm[::2]] = k2, v2
    t_k, t_v = blocks(f, 1, seed=8)
    f.write_tokens(slots[5], 3, t_k[0, :4], t_v[0, :4])
    k[5, 3:7], v[5, 3:7] = t_k[0, :4], t_v[0, :4]
    kk, vv = f.read_async(slots).result()
    assert torch.equal(kk, k) and torch.equal(vv, v)
    f.close()


def test_a_rows_blocks_lie_side_by_side_and_read_as_one_request(tmp_path, pool):
    f = new_file(tmp_path, pool, extent_slots=16)
    per = [f.alloc(layer, 4) for _ in range(20) for layer in range(3)]     # 20 blocks of 3 layers x 4 rows
    assert all(len(s) == 4 for s in per) and len({s for b in per for s in b}) == 240
    assert f.layer_of[per[1][0]] == 1
    for layer in range(3):
        for row in range(4):
            mine = [b[row] for b in per[layer::3]]
            assert mine[:16] == list(range(mine[0], mine[0] + 16))        # one extent
            assert mine[16:] == list(range(mine[16], mine[16] + 4))       # the next one
    k, v = blocks(f, 240, seed=3)
    order = [s for b in per for s in b]
    f.write(order, k, v)
    row1 = [b[1] for b in per[0::3]][2:10]                              # 8 adjacent blocks of (layer 0, row 1)
    before = f.read_requests
    kk, _ = f.read(row1)
    assert f.read_requests - before == 1
    assert torch.equal(kk, k[[order.index(s) for s in row1]])
    before = f.read_requests
    f.read_async(row1[::-1]).result()                                  # any order: still one request
    assert f.read_requests - before == 1
    # freed slots are reused once the row's newest extent is full; a wholly freed extent goes to any row
    f.release(row1)
    again = [f.alloc(0, 2)[1] for _ in range(12 + 8)]
    assert again[:12] == list(range(again[0], again[0] + 12)) and again[0] == per[-3][1] + 1
    assert sorted(again[12:]) == sorted(row1)
    whole = [b[3] for b in per[2::3]][:16]                              # (layer 2, row 3)'s first extent
    f.release(whole)
    used = f.used
    new = f.alloc(5, 1)
    assert new[0] in whole and f.used == used + 1
    f.close()


def test_requests_run_in_parallel(tmp_path, monkeypatch):
    real = os.preadv
    now, most, threads, lock = [0], [0], set(), threading.Lock()

    def slow_preadv(fd, views, offset):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
            threads.add(threading.current_thread().name)
        time.sleep(0.03)
        try:
            return real(fd, views, offset)
        finally:
            with lock:
                now[0] -= 1

    with ThreadPoolExecutor(4, thread_name_prefix=IO_THREAD_PREFIX) as pool:
        f = new_file(tmp_path, pool, queue_depth=4)
        slots, k, v = fill(f, layers=4, rows=2, per_row=4)              # 8 runs of 4 slots
        monkeypatch.setattr(os, "preadv", slow_preadv)
        t0 = time.perf_counter()
        kk, vv = f.read_async(slots).result()
        took = time.perf_counter() - t0
        assert torch.equal(kk, k) and torch.equal(vv, v)
        assert f.read_requests == 8 and most[0] >= 2 and len(threads) >= 2, (most, threads)
        assert took < 8 * 0.03
        most[0] = 0
        f.read(slots)                                                   # synchronous: parallel too
        assert most[0] >= 2
        f.close()


def test_reads_on_a_busy_io_thread_do_not_deadlock(tmp_path):
    with ThreadPoolExecutor(1, thread_name_prefix=IO_THREAD_PREFIX) as pool:   # one I/O thread
        f = new_file(tmp_path, pool, queue_depth=4)
        slots, k, v = fill(f, layers=3, rows=3, per_row=2)

        def on_io_thread():
            assert threading.current_thread().name.startswith(IO_THREAD_PREFIX)
            kk, _ = f.read_async(slots).result()                        # its jobs queue behind this one
            w = f.write_async(slots[:4], v[:4], k[:4])
            kk2, _ = f.read(slots[:4])                                  # waits for that write
            w.result()
            return kk, kk2

        kk, kk2 = pool.submit(on_io_thread).result(timeout=30)
        assert torch.equal(kk, k) and torch.equal(kk2, v[:4])
        f.close()


def test_write_async_then_read_returns_the_new_data(tmp_path, pool, monkeypatch):
    f = new_file(tmp_path, pool, torch.bfloat16, head_dim=40)
    slots, k, v = fill(f, per_row=4)
    real = os.pwrite

    def slow_pwrite(fd, data, offset):
        time.sleep(0.05)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    k1, v1 = blocks(f, len(slots), seed=11)
    k2, v2 = blocks(f, 6, seed=12)
    mine = k1.clone()
    w1 = f.write_async(slots, mine, v1)
    mine.zero_()                                                        # the caller reuses its tensor
    w2 = f.write_async(slots[3:9], k2, v2)                              # after w1, on the same slots
    assert not w1.done() and not w2.done()
    kk, vv = f.read(slots)                                              # waits for both
    k1[3:9], v1[3:9] = k2, v2
    assert torch.equal(kk, k1) and torch.equal(vv, v1)
    assert w1.result() is None and w2.result() is None
    f.flush()
    f.close()


def test_a_write_waits_for_the_reads_of_its_slots_in_flight(tmp_path, pool, monkeypatch):
    """A read in flight of a slot that a later write rewrites (an ahead-of-need read of a block
    being written in place): the write waits for it, so the read gets the old bytes whole and
    checks them against the old checksum (it raised KVIntegrityError when the two interleaved);
    the next read gets the new bytes."""
    f = new_file(tmp_path, pool)
    slots, k, v = fill(f, per_row=2)
    release, reading = threading.Event(), threading.Event()
    real = disk._preadv_all

    def held_read(fd, views, offset, size=-1):
        reading.set()
        assert release.wait(30)
        return real(fd, views, offset, size)

    monkeypatch.setattr(disk, "_preadv_all", held_read)
    r = f.read_async(slots[2:4])
    assert reading.wait(30)
    k1, v1 = blocks(f, 2, seed=21)
    w = f.write_async(slots[3:5], k1, v1)
    time.sleep(0.2)
    assert not w.done()                                                  # waits for the read
    release.set()
    kr, vr = r.result()
    assert torch.equal(kr, k[2:4]) and torch.equal(vr, v[2:4])
    assert w.result() is None
    monkeypatch.setattr(disk, "_preadv_all", real)
    kk, vv = f.read(slots[2:5])
    assert torch.equal(kk, torch.cat([k[2:3], k1])) and torch.equal(vv, torch.cat([v[2:3], v1]))
    f.close()


def test_empty_async_requests_resolve(tmp_path, pool):
    """read_async([]) and write_async([]) resolve at once (an empty read left its future pending
    and the file counting a read in flight forever, so released slots were never reused)."""
    f = new_file(tmp_path, pool)
    slots, k, v = fill(f, per_row=1)
    kk, vv = f.read_async([]).result(timeout=5)
    assert kk.shape == (0, f.block_size, f.head_dim) and vv.shape == kk.shape
    assert f.write_async([], k[:0], v[:0]).result(timeout=5) is None
    assert f.reads_in_flight == 0
    f.release(slots[:1])
    assert f.used == len(slots) - 1                                      # freed now, not deferred
    f.close()


def test_a_failed_write_async_is_raised_later(tmp_path, pool, monkeypatch):
    f = new_file(tmp_path, pool)
    slots, k, v = fill(f, per_row=2)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    w = f.write_async(slots[:3], v[:3], k[:3])
    assert isinstance(w.exception(), KVDiskError) and w.exception().errno == errno.ENOSPC
    monkeypatch.undo()
    for again in (lambda: f.read(slots[5:6]), f.flush, lambda: f.write(slots[5:6], k[:1], v[:1]),
                  lambda: f.read_async(slots).result()):
        with pytest.raises(KVDiskError, match=r"writing KV to .*test\.kv \(slot \d+, layer 0\) failed: No space "
                                              r"left on device \(ENOSPC\); the disk under disk_dir .* is full"):
            again()
    f.close()


def flip(f: DiskFile, slot: int, byte: int) -> None:
    """Flip one bit of ``slot``'s byte ``byte`` in the file itself: an aligned read-modify-write
    through the fd (O_DIRECT where it is: no page cache in between)."""
    at = f.offset(slot) + byte
    base = at - at % 4096
    buf = disk.aligned_bytes(4096)
    assert os.preadv(f.fd, [buf], base) == 4096
    buf[at - base] ^= 0x10
    assert os.pwrite(f.fd, buf, base) == 4096


def test_changed_bytes_and_a_cut_file_raise(tmp_path, pool):
    f = new_file(tmp_path, pool, torch.float16, head_dim=40)
    slots, k, v = fill(f, layers=2, rows=2, per_row=3)
    bad = slots[5]
    flip(f, bad, 2000)                                                  # in V
    with pytest.raises(KVIntegrityError, match=rf"^KV block read back from {tmp_path}/test\.kv \(slot {bad}, "
                                               rf"layer {f.layer_of[bad]}\) does not match what kvdrive wrote"):
        f.read(slots)
    with pytest.raises(KVIntegrityError, match=f"slot {bad},"):
        f.read_async([bad]).result()
    others = [s for s in slots if s != bad]
    kk, _ = f.read(others)
    assert torch.equal(kk, k[[i for i, s in enumerate(slots) if s != bad]])
    last = max(slots)
    os.ftruncate(f.fd, f.offset(last) + 100)
    with pytest.raises(KVIntegrityError, match=rf"\(slot {last}, layer \d\) is cut short: the file ends "
                                               rf"100 bytes into a 2560-byte read"):
        f.read([last])
    f.close()


def kv_fds(directory):
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory) + "/"):
                out.append(fd)
        except OSError:
            pass
    return out


@pytest.mark.parametrize("tmpfile", [True, False])
def test_close_leaves_nothing(tmp_path, pool, monkeypatch, tmpfile):
    if not tmpfile:
        monkeypatch.setattr(disk, "_O_TMPFILE", 0)                      # the private-directory path
    f = new_file(tmp_path, pool)
    assert list(tmp_path.iterdir()) == []
    slots, k, v = fill(f)
    f.buffered_fd()
    w = f.write_async(slots, k, v)
    f.read_async(slots)
    f.close()                                                           # waits for running requests
    assert kv_fds(tmp_path) == [] and list(tmp_path.iterdir()) == []
    assert w.exception() is None or "was closed" in str(w.exception())
    with pytest.raises(KVDiskError, match="was closed: its session was released"):
        f.read(slots[:1])


EFBIG = """
import resource, signal, sys, torch
from concurrent.futures import ThreadPoolExecutor
from kvdrive_compile.runtime.disk import DiskFile, KVDiskError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # EFBIG instead of a killed process
f = DiskFile(sys.argv[1], "limited.kv", torch.float32, 16, 16, ThreadPoolExecutor(2).submit)
slots = [f.alloc(3, 1)[0] for _ in range(16)]             # one run of 16 slots
resource.setrlimit(resource.RLIMIT_FSIZE, (5 * f.stride + 100, resource.RLIM_INFINITY))
try:
    f.write(slots, torch.randn(16, 16, 16), torch.randn(16, 16, 16))
except KVDiskError as e:
    import os
    print("direct", f.direct, "errno", e.errno, "size", os.fstat(f.fd).st_size, "stride", f.stride)
    print(e)
"""


def test_file_size_limit_is_efbig_under_o_direct(tmp_path):
    """Past RLIMIT_FSIZE the kernel refuses the now unaligned direct write (EINVAL); the write
    goes on through the buffered fd, which writes what fits and then reports EFBIG."""
    done = subprocess.run([sys.executable, "-c", EFBIG, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    first, text = done.stdout.split("\n", 1)
    _, direct, _, err, _, size, _, stride = first.split()
    assert int(err) == errno.EFBIG and int(size) == 5 * int(stride) + 100, done.stdout
    assert "(slot 5, layer 3) failed: File too large (EFBIG)" in text and "ulimit -f" in text
    assert list(tmp_path.iterdir()) == []
