"""runtime/device_copies.py: host <-> device copies that do not make the host wait. On a CPU every
function is a plain copy or none (tested here); the CUDA tests run on a GPU
(benchmarks/device_check.sh) and check that a copy's bytes are the ones the tensor held when the
copy was asked for, whatever the host or the device does next."""
import pytest
import torch

from kvdrive_compile.runtime.device_copies import HostCopy, gathered, to_device, to_host

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/device_check.sh)")


def test_on_the_cpu_nothing_is_copied_unless_owned():
    t = torch.randn(3, 4)
    assert to_host(None) is None
    assert to_host(t).get() is t
    own = to_host(t, own=True).get()
    assert own is not t and torch.equal(own, t)
    t.add_(1)                                   # the graph reuses t's memory: the owned copy keeps its bytes
    assert not torch.equal(own, t)
    assert to_device(t, CPU) is t
    assert to_device(t, CPU, owned=True) is t


def test_gathered_is_index_select_into_a_new_buffer():
    source = torch.randn(10, 4, 8)
    index = torch.tensor([7, 2, 2, 9])
    out = gathered(source, index, CPU)
    assert torch.equal(out, source.index_select(0, index))
    source.zero_()
    assert out.abs().sum() > 0


def test_a_host_copy_waits_only_when_asked():
    calls = []

    class Event:
        def synchronize(self):
            calls.append("sync")

    t = torch.ones(2)
    copy = HostCopy(t, Event())
    assert calls == []
    assert copy.get() is t and copy.get() is t
    assert calls == ["sync"]                   # once: the event has been waited for


@needs_cuda
def test_a_copy_to_the_host_holds_the_bytes_of_the_work_queued_before_it():
    dev = torch.device("cuda")
    a = torch.randn(2048, 2048, device=dev)
    for _ in range(3):
        b = a @ a                              # queued: the host goes on at once
        copy = to_host(b[:4])
        got = copy.get()                       # before anything else waits for the device
        assert torch.equal(got, b[:4].cpu()) and got.is_pinned()


@needs_cuda
def test_a_copy_to_the_device_keeps_the_bytes_it_was_given():
    dev = torch.device("cuda")
    busy = torch.randn(4096, 4096, device=dev)
    for owned in (False, True):
        host = torch.arange(1 << 16, dtype=torch.float32)
        if owned:
            host = host.pin_memory()
        (busy @ busy).sum()                    # the stream is busy: the copy runs later
        on_device = to_device(host, dev, owned=owned)
        if not owned:
            host.zero_()                       # allowed: the copy was made from a pinned copy
        assert torch.equal(on_device.cpu(), torch.arange(1 << 16, dtype=torch.float32))


@needs_cuda
def test_gathered_blocks_go_up_without_a_wait_and_arrive_whole():
    dev = torch.device("cuda")
    pool = torch.randn(64, 16, 32).pin_memory()
    index = torch.tensor([5, 60, 3])
    up = to_device(gathered(pool, index, dev), dev, owned=True)
    assert torch.equal(up.cpu(), pool.index_select(0, index))
