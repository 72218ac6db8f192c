"""A linear layer over few rows on the CPU (a decode step's projections, MLPs and LM head), in
whichever of two equivalent BLAS calls this machine runs faster for the shape.

``F.linear(x, W)`` asks the BLAS for ``x @ W^T``; with a few rows of x (batch x 1 in decode) some
BLAS builds take a slow path for it: on this project's 2-core AMD EPYC, torch's MKL sgemm read
SmolLM2's weights at ~6-7 GB/s for 4 rows, and at ~13-16 GB/s when asked for the same product
as ``(W @ x^T)^T`` (``benchmarks/RESULTS.md``). Which call is faster depends on the BLAS, the
CPU and the shape (one row goes to a GEMV that is fast either way), so it is measured, not
assumed: the first call with a new (rows, in, out, dtype, threads) times both on weights of
that shape streamed from memory, as a decode step streams the model's, and keeps the faster
(the weight-major call only when it wins by 10 %). The two differ only in the order of the
sums (~1e-6 relative).

``linear`` is what ``passes/cpu_linears.py`` puts in place of a CPU graph's ``F.linear`` (in a
graph Inductor compiles, ``linear_op``: the same as an opaque custom op, kept as one call).
"""
from __future__ import annotations

import threading
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["linear", "linear_op", "weight_major", "chosen", "MAX_ROWS"]

# more rows than this: the BLAS's usual GEMM path (a prefill's thousands of rows) without a measurement
MAX_ROWS = 64
# the weights a measurement streams, per call: bigger than a last-level cache, so they come from DRAM
_STREAM_BYTES = 96 << 20
_MAX_COPIES = 256                     # tiny weights: enough calls to time, not a loop of Python calls
_MIN_GAIN = 0.9                       # the weight-major call must take <= 90 % of the time to be kept
_ROUNDS = 3

_chosen: dict[tuple, bool] = {}
_lock = threading.Lock()


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``, as ``(weight @ x^T)^T`` where that measured faster for
    the shape on this machine (CPU, at most ``MAX_ROWS`` rows of x). A plain function: what an
    eagerly run graph calls (here ~4 us a call over ``F.linear``'s; a Python custom op costs
    ~40 us more a call, ~9 ms a SmolLM2 decode step)."""
    k, n = weight.shape[1], weight.shape[0]
    if isinstance(x, FakeTensor) or x.device.type != "cpu":     # shape propagation: nothing to measure
        return F.linear(x, weight, bias)
    rows = x.numel() // k if k else 0
    if not 0 < rows <= MAX_ROWS or not weight_major(rows, k, n, x.dtype):
        return F.linear(x, weight, bias)
    return _weight_major(x.reshape(rows, k), weight, bias).reshape(*x.shape[:-1], n)


@torch.library.custom_op("kvdrive_cpu::linear", mutates_args=())
def linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``linear`` as an opaque op, for graphs Inductor compiles (``compile_rest="inductor"``)."""
    return linear(x, weight, bias)


@linear_op.register_fake
def _(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _weight_major(x2: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x2 [m, k] @ weight[n, k]^T (+ bias)`` computed as ``weight @ x2^T``: ``[m, n]``, contiguous."""
    yt = torch.mm(weight, x2.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, x2.t())
    return yt.t().contiguous()


def weight_major(rows: int, k: int, n: int, dtype: torch.dtype) -> bool:
    """Whether ``rows x k @ (n x k)^T`` runs faster as ``weight @ x^T`` here: measured once per
    (rows, k, n, dtype, torch threads) in a process, then remembered."""
    key = (rows, k, n, dtype, torch.get_num_threads())
    found = _chosen.get(key)
    if found is not None:
        return found
    with _lock:
        if key not in _chosen:
            _chosen[key] = _measure(rows, k, n, dtype)
        return _chosen[key]


def chosen() -> dict[tuple, bool]:
    """The decisions made so far: (rows, in, out, dtype, threads) -> weight-major."""
    with _lock:
        return dict(_chosen)


def _measure(rows: int, k: int, n: int, dtype: torch.dtype) -> bool:
    """Time both calls over copies of a ``[n, k]`` weight totalling ``_STREAM_BYTES`` (fewer
    output rows where one weight is bigger than that; at most ``_MAX_COPIES``): the best of
    ``_ROUNDS`` alternating rounds."""
    item = torch.empty((), dtype=dtype).element_size()
    n_measured = max(1, min(n, _STREAM_BYTES // max(1, k * item)))
    copies = max(1, min(_MAX_COPIES, _STREAM_BYTES // max(1, n_measured * k * item)))
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn((copies, n_measured, k), generator=gen).to(dtype)
    x = torch.randn((rows, k), generator=gen).to(dtype)

    def as_traced():
        for w in weights:
            F.linear(x, w)

    def transposed():
        for w in weights:
            _weight_major(x, w, None)

    best = {as_traced: float("inf"), transposed: float("inf")}
    as_traced(), transposed()                                        # warm: allocations, BLAS threads
    for _ in range(_ROUNDS):
        for fn in best:
            t0 = time.perf_counter()
            fn()
            best[fn] = min(best[fn], time.perf_counter() - t0)
    return best[transposed] <= _MIN_GAIN * best[as_traced]
