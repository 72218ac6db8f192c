"""A linear layer over few rows on the CPU (a decode step's projections, MLPs and LM head): a
numba kernel where this machine measured it faster than torch's BLAS for the shape.

``F.linear(x, W)`` asks the BLAS for ``x @ W^T``; with a few rows of x (batch x 1 in decode) some
BLAS builds take a slow path: on this project's 2-core AMD EPYC torch's MKL sgemm read SmolLM2's
weights at ~7 GB/s for 4 rows, a plain numba loop over the weight's rows (each read once, the
few rows of x in L1) at 17-20 GB/s (``benchmarks/RESULTS.md``). The same product asked of the
BLAS as ``(W @ x^T)^T`` read at ~14 GB/s alone, but its OpenMP threads then slowed the numba
ranking kernel that follows in a decode step by ~40 ms (the two thread pools on two cores);
the numba kernel runs on numba's pool, the ranking's own. Which call is faster depends on the
BLAS, the CPU and the shape, so it is measured, not assumed: the first call with a new (rows,
in, out, threads) times both on fp32 weights of that shape streamed from memory, as a decode
step streams the model's (~0.25 s per shape here, in the first decode step), and keeps the numba kernel only when it wins by 10 %. The two differ
only in the order of the sums (~1e-6 relative). Other dtypes, non-contiguous weights and more
than ``MAX_ROWS`` rows take ``F.linear``.

``linear`` is what ``passes/cpu_linears.py`` puts in place of a CPU graph's ``F.linear`` (in a
graph Inductor compiles, ``linear_op``: the same as an opaque custom op, kept as one call).
"""
from __future__ import annotations

import threading
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from numba import get_num_threads, njit, prange
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from .numba_math import FASTMATH, parallel_launch, start_thread_pool

__all__ = ["linear", "linear_op", "use_kernel", "chosen", "MAX_ROWS"]

# more rows than this: the BLAS's usual GEMM path (a prefill's thousands of rows) without a measurement
MAX_ROWS = 64
# the weights a measurement streams, per call: bigger than a last-level cache, so they come from DRAM
_STREAM_BYTES = 96 << 20
_MAX_COPIES = 256                     # tiny weights: enough calls to time, not a loop of Python calls
_MIN_GAIN = 0.9                       # the kernel must take <= 90 % of F.linear's time to be kept
_ROUNDS = 3
_MIN_OUTPUTS_PER_CHUNK = 64           # weight rows below which a thread is not worth starting

start_thread_pool()

_chosen: dict[tuple, bool] = {}
_lock = threading.Lock()


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``, by the numba kernel where that measured faster for the
    shape on this machine (CPU, fp32, a contiguous weight, at most ``MAX_ROWS`` rows of x). A
    plain function: what an eagerly run graph calls (~4 us a call over ``F.linear``'s; a Python
    custom op costs ~40 us more a call, ~9 ms a SmolLM2 decode step)."""
    if isinstance(x, FakeTensor) or x.device.type != "cpu":     # shape propagation: nothing to measure
        return F.linear(x, weight, bias)
    n, k = weight.shape
    rows = x.numel() // k if k else 0
    if not (0 < rows <= MAX_ROWS and x.dtype == weight.dtype == torch.float32 and weight.is_contiguous()
            and (bias is None or bias.dtype == torch.float32) and use_kernel(rows, k, n)):
        return F.linear(x, weight, bias)
    out = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
    _run(x.reshape(rows, k), weight, bias, out.view(rows, n))
    return out


@torch.library.custom_op("kvdrive_cpu::linear", mutates_args=())
def linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``linear`` as an opaque op, for graphs Inductor compiles (``compile_rest="inductor"``)."""
    return linear(x, weight, bias)


@linear_op.register_fake
def _(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _rows_times_weight(x, w, bias, has_bias, out, chunks):
    """``out [m, n] = x [m, k] @ w[n, k]^T (+ bias)``: the weight's rows split over numba's
    threads in contiguous ranges, each row read once and dotted with every row of x."""
    m, k = x.shape
    n = w.shape[0]
    chunks = max(1, min(chunks, n // _MIN_OUTPUTS_PER_CHUNK))
    for c in prange(chunks):
        for j in range(c * n // chunks, (c + 1) * n // chunks):
            b = bias[j] if has_bias else np.float32(0.0)
            for i in range(m):
                acc = np.float32(0.0)
                for t in range(k):
                    acc += x[i, t] * w[j, t]
                out[i, j] = acc + b


_NO_BIAS = np.zeros(0, np.float32)


def _run(x2: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor) -> None:
    b = bias.contiguous().numpy() if bias is not None else _NO_BIAS
    args = (x2.contiguous().numpy(), weight.numpy(), b, bias is not None, out.numpy())
    with parallel_launch():
        _rows_times_weight(*args, get_num_threads())


def use_kernel(rows: int, k: int, n: int) -> bool:
    """Whether the numba kernel runs ``rows x k @ (n x k)^T`` (fp32) faster than ``F.linear``
    here: measured once per (rows, k, n, threads) in a process, then remembered."""
    key = (rows, k, n, get_num_threads())
    found = _chosen.get(key)
    if found is not None:
        return found
    with _lock:
        if key not in _chosen:
            _chosen[key] = _measure(rows, k, n)
        return _chosen[key]


def chosen() -> dict[tuple, bool]:
    """The decisions made so far: (rows, in, out, threads) -> the numba kernel."""
    with _lock:
        return dict(_chosen)


def _measure(rows: int, k: int, n: int) -> bool:
    """Time both over copies of an fp32 ``[n, k]`` weight totalling ``_STREAM_BYTES`` (fewer
    output rows where one weight is bigger than that; at most ``_MAX_COPIES``): the best of
    ``_ROUNDS`` alternating rounds."""
    n_measured = max(1, min(n, _STREAM_BYTES // max(1, 4 * k)))
    copies = max(1, min(_MAX_COPIES, _STREAM_BYTES // max(1, 4 * n_measured * k)))
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn((copies, n_measured, k), generator=gen)
    x = torch.randn((rows, k), generator=gen)
    out = torch.empty((rows, n_measured))

    def blas():
        for w in weights:
            F.linear(x, w)

    def kernel():
        for w in weights:
            _run(x, w, None, out)

    best = {blas: float("inf"), kernel: float("inf")}
    blas(), kernel()                                                 # warm: allocations, threads, the kernel
    for _ in range(_ROUNDS):
        for fn in best:
            t0 = time.perf_counter()
            fn()
            best[fn] = min(best[fn], time.perf_counter() - t0)
    return best[kernel] <= _MIN_GAIN * best[blas]
