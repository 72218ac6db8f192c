"""float32 math for numba kernels that LLVM can vectorize (numba's ``math.exp`` is a scalar
libm call unless Intel's SVML is installed).

Used by kernels/cpu_attention.py and kernels/block_scores.py (and ``wide_vectors``, a hint to
LLVM, by both; and ``start_thread_pool``, which both parallel kernels call at import: what they
share about numba's threads lives here too). numba's on-disk cache keys a
compiled function on its own file only: after editing this module, delete the ``.nbi``/``.nbc``
files in ``kernels/__pycache__`` (or set a fresh ``NUMBA_CACHE_DIR``) so that the kernels that
inline these helpers are compiled again.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np
import torch
from llvmlite import ir
from numba import get_num_threads, njit, types
from numba.extending import intrinsic

__all__ = ["exp_f32", "f16_to_f32", "f32_to_f16", "FASTMATH", "start_thread_pool", "wide_vectors", "concurrent_launch_safe", "parallel_launch"]

# LLVM fast-math flags for the kernels: no "ninf"/"nnan", because -inf marks empty rows
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)          # ln 2 split in two so that n * ln2 is exact
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_FLOOR = np.float32(-87.0)             # exp() of anything lower is taken as e^-87 ~ 1.6e-38
_C2, _C3, _C4, _C5, _C6, _C7 = (np.float32(1.0 / f) for f in (2, 6, 24, 120, 720, 5040))   # Taylor
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)


@intrinsic
def _bits_to_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        low = builder.trunc(args[0], ir.IntType(32)) if x.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def f16_to_f32(typingctx, x):
    """The float32 value of an IEEE half given as its 16 bits (an int16 or uint16: numba's
    arrays of float16 are read through an int16 view). One ``fpext``, which LLVM vectorizes
    (``vcvtph2ps`` on x86 with F16C)."""
    if not isinstance(x, types.Integer) or x.bitwidth != 16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def f32_to_f16(typingctx, x):
    """A float32 as the 16 bits (int16) of the nearest IEEE half, ties to even (one ``fptrunc``:
    torch's ``.to(torch.float16)``); beyond the half's range, +-inf."""
    if not isinstance(x, types.Float) or x.bitwidth != 32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(x), codegen


@njit(inline="always", fastmath=FASTMATH)
def exp_f32(x):
    """float32 e**x for x <= 0, vectorizable; rel err < 2e-7."""
    x = max(x, _EXP_FLOOR)
    n = np.floor(x * _LOG2E + _HALF)
    f = x - n * _LN2_HI - n * _LN2_LO                          # |f| <= ln2 / 2
    p = _C7 * f + _C6
    p = p * f + _C5
    p = p * f + _C4
    p = p * f + _C3
    p = p * f + _C2
    p = p * f + _ONE
    p = p * f + _ONE
    return p * _bits_to_f32((np.int64(n) + 127) << 23)


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM vectorize the function this is called in with 512-bit registers where the CPU
    has them. LLVM prefers 256 bits on every AVX-512 CPU model (a frequency guard for older
    Xeons); here 512 makes the CPU attention's fp16 kernel ~6 % faster cold and ~8 % on small
    warm calls, fp32 the same. The attribute is a string attribute that llvmlite's checked ``add`` does
    not know, so it goes in through ``set.add`` (rendered verbatim in the function's header;
    skipped if a later llvmlite stores attributes otherwise: it is only a hint); CPUs without
    AVX-512 ignore it."""
    def codegen(context, builder, sig, args):
        attributes = builder.function.attributes
        if isinstance(attributes, set):
            set.add(attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.void(), codegen


def start_thread_pool() -> None:
    """Start numba's thread pool now, keeping torch's thread count (the kernels that use the pool
    call this at import). Starting the pool (numba's OpenMP layer, the default here) resets
    OpenMP's thread count, which is torch's; a count that changes after a ``torch.compile``
    fails Dynamo's global-state guard, and every graph compiled before recompiles (the next
    ``generate`` re-traced its prefill: ~20 s for SmolLM2). Started at import, before anything
    is compiled."""
    before = torch.get_num_threads()
    get_num_threads()                       # launches the pool
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def concurrent_launch_safe() -> bool:
    """Whether two threads may run parallel numba kernels at once: numba's TBB and OpenMP
    threading layers take parallel launches from several threads; its fallback, "workqueue",
    does not (it aborts the process on a concurrent launch)."""
    import numba

    layer = numba.config.THREADING_LAYER
    if layer == "workqueue":
        return False
    if layer in ("tbb", "omp"):
        return True
    for pool in ("tbbpool", "omppool"):                 # "default", "safe", "threadsafe": the first that loads
        try:
            __import__(f"numba.np.ufunc.{pool}")
            return True
        except ImportError:
            continue
    return False


_LAUNCH_LOCK = threading.Lock()


def parallel_launch():
    """Where a parallel numba kernel is called: nothing to do under a threading layer that
    takes concurrent launches; under "workqueue" one process-wide lock, so that two threads
    generating at once (or a generating thread and the CPU worker) call the kernels one after
    the other instead of aborting the process."""
    return contextlib.nullcontext() if concurrent_launch_safe() else _LAUNCH_LOCK
