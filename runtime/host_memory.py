"""Host-memory tensors on transparent huge pages.

KV blocks on the host are read in random order (whatever the selection picks), so with 4 KiB
pages nearly every block read starts with a TLB miss; on 2 MiB pages the CPU kernel read
18-40 % faster on this project's machine (benchmarks/README.md). Pools on the host are
allocated here: an anonymous mapping, 2 MiB-aligned and advised MADV_HUGEPAGE, where the
kernel allows it (``/sys/kernel/mm/transparent_hugepage/enabled`` not ``[never]``); plain
``torch.empty`` otherwise and for small tensors.
"""
from __future__ import annotations

import functools
import math
import mmap

import numpy as np
import torch

HUGE_PAGE = 2 << 20


@functools.cache
def huge_pages_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read() and hasattr(mmap, "MADV_HUGEPAGE")
    except OSError:
        return False


def huge_page_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor in a 2 MiB-aligned anonymous mapping advised MADV_HUGEPAGE (the
    mapping lives as long as the tensor)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(area, np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    return torch.from_numpy(raw[start:start + nbytes]).view(dtype).reshape(shape)


def host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype)`` on the CPU, on huge pages when it is 2 MiB or larger and the
    kernel allows them."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes >= HUGE_PAGE and huge_pages_available():
        return huge_page_tensor(shape, dtype)
    return torch.empty(shape, dtype=dtype)
