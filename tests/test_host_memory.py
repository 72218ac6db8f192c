"""Host pools on transparent huge pages: right shape and dtype, 2 MiB-aligned, usable, and
backed by huge pages where the kernel grants them."""
import pytest
import torch

from kvdrive_compile.runtime.host_memory import HUGE_PAGE, host_empty, huge_pages_available
from kvdrive_compile.runtime.tiers import BlockPool, TierBudget


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_host_empty_is_a_usable_tensor(dtype):
    t = host_empty((1024, 16, 128), dtype)
    assert t.shape == (1024, 16, 128) and t.dtype == dtype and t.is_contiguous()
    x = torch.randn(1024, 16, 128).to(dtype)
    t.copy_(x)
    assert torch.equal(t, x)
    if huge_pages_available():
        assert t.data_ptr() % HUGE_PAGE == 0
    small = host_empty((2, 16, 8), dtype)                   # under 2 MiB: a plain allocation
    assert small.shape == (2, 16, 8)


@pytest.mark.skipif(not huge_pages_available(), reason="transparent huge pages are disabled here")
def test_pool_memory_is_on_huge_pages():
    pool = BlockPool(TierBudget("host", None), torch.device("cpu"), torch.float32, 16, 128)
    slots = pool.alloc(2048)                                  # 16 MiB per K and V
    pool.k.fill_(1.0)
    assert pool.k.data_ptr() % HUGE_PAGE == 0
    start, end = pool.k.data_ptr(), pool.k.data_ptr() + pool.k.numel() * 4
    huge_kib = 0
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < end and start < hi
            elif inside and head == "AnonHugePages:":
                huge_kib += int(line.split()[1])
    if huge_kib == 0:
        pytest.skip("the kernel granted no huge page now (THP 'madvise' mode, memory fragmented)")
    assert huge_kib >= 2048
    assert len(set(slots)) == 2048


def test_pool_grows_geometrically_keeps_data_and_budget(monkeypatch):
    """Filling a pool a layer's blocks at a time copies each slot O(1) times (a fixed growth
    step copied the whole pool once per 4,096 slots: quadratic in the context), keeps every
    block written, and never reserves past a budget."""
    copied = []
    grow = BlockPool._grow

    def counting(self, need):
        copied.append(self.capacity)
        return grow(self, need)
    monkeypatch.setattr(BlockPool, "_grow", counting)
    pool = BlockPool(TierBudget("device", None), torch.device("cpu"), torch.float32, 4, 2)
    written = {}
    for i in range(300):                                    # 300 "layers" of 768 blocks: 230,400 slots
        for s in pool.alloc(768):
            written[s] = float(len(written))
        if i % 37 == 0:                                     # write some, check they survive later grows
            idx = torch.tensor(list(written))
            pool.k[idx] = torch.tensor(list(written.values())).view(-1, 1, 1)
    n = len(written)
    assert pool.capacity >= n and pool.capacity <= 1.5 * n + 4096
    assert sum(copied) <= 3 * n, (len(copied), sum(copied))         # amortized O(1) copies per slot
    idx = torch.tensor(list(written)[:768 * 260])
    assert torch.equal(pool.k[idx, 0, 0], torch.tensor(list(written.values())[:768 * 260]))

    per_slot = pool.slot_bytes
    limited = BlockPool(TierBudget("device", 40_000 * per_slot), torch.device("cpu"), torch.float32, 4, 2)
    got = sum(len(limited.alloc_upto(768)) for _ in range(100))
    assert got == 40_000 and limited.capacity == 40_000 and limited.budget.reserved == 40_000 * per_slot
