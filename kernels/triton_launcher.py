"""Launching a Triton kernel again without Triton's per-call argument binding.

``fn[grid](*args, **constexprs, **options)`` costs the host tens of microseconds per call on
top of the launch itself: Triton binds the arguments to the signature, specializes each one
and hashes the lot to find the compiled kernel. A decode step launches the same kernel with the
same shapes every layer, and at small batches that host cost is longer than the kernel
(benchmarks/README.md, "host us"). ``CachedLauncher`` keeps the compiled kernel Triton returned
for a call, keyed by what Triton specializes on (and then some: every int exactly, each
tensor's dtype and 16-byte alignment), and launches it directly the next time the key matches.

The direct launch is Triton's own ``CompiledKernel[grid](*args)``; where it fails (a Triton
whose compiled kernels take their arguments differently), the launcher says why once, goes back
to ``fn[grid](...)`` for good, and the call is launched that way. Under ``TRITON_INTERPRET=1``
or with ``KVDRIVE_TRITON_DIRECT_LAUNCH=0`` every call goes through ``fn[grid](...)``.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Any, Optional

import torch

DIRECT_LAUNCH_ENV = "KVDRIVE_TRITON_DIRECT_LAUNCH"   # "0": always launch through Triton's binder


def _arg_key(args: tuple) -> tuple:
    """What a compiled kernel depends on, per runtime argument: a tensor's dtype and whether its
    address is 16-byte aligned (Triton specializes pointers on that), an int's exact value (a
    superset of Triton's == 1 / % 16 specializations), a float's type alone (not specialized)."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, float):
            key.append(float)
        else:
            key.append(a)
    return tuple(key)


class CachedLauncher:
    """``launcher(grid, args, constexprs, options)`` launches ``fn[grid](*args, **constexprs,
    **options)``; ``args`` are the runtime arguments (tensors, ints, floats) in signature order,
    ``constexprs`` the ``tl.constexpr`` parameters that follow them, ``options`` Triton's launch
    options (num_warps, num_stages). Keeps up to ``capacity`` compiled kernels, least recently
    used out first."""

    def __init__(self, fn: Any, capacity: int = 64):
        self.fn = fn
        self.capacity = capacity
        self._compiled: OrderedDict[tuple, tuple[Any, tuple]] = OrderedDict()
        self.fallback_reason: Optional[str] = None
        self.direct_launches = 0        # calls launched straight from a kept kernel (for tests, dumps)

    @property
    def direct(self) -> bool:
        return (self.fallback_reason is None and os.environ.get(DIRECT_LAUNCH_ENV, "1") != "0"
                and os.environ.get("TRITON_INTERPRET") != "1")

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, options: dict) -> None:
        if not self.direct:
            self.fn[grid](*args, **constexprs, **options)
            return
        key = (torch.cuda.current_device(), _arg_key(args), tuple(constexprs.items()), tuple(options.items()))
        hit = self._compiled.get(key)
        if hit is None:
            self._keep(key, self.fn[grid](*args, **constexprs, **options), len(args), constexprs)
            return
        compiled, tail = hit
        self._compiled.move_to_end(key)
        try:
            compiled[grid + (1,) * (3 - len(grid))](*args, *tail)     # a compiled kernel takes 3 dims
        except Exception as err:        # noqa: BLE001 - any failure: go back to the binder for good
            self._give_up(f"{type(err).__name__}: {err}")
            self.fn[grid](*args, **constexprs, **options)
            return
        self.direct_launches += 1

    def _keep(self, key: tuple, compiled: Any, nargs: int, constexprs: dict) -> None:
        """Keep what ``fn[grid](...)`` returned, with the constexprs in signature order."""
        names = list(getattr(self.fn, "arg_names", ()))[nargs:]
        if compiled is None or not callable(getattr(compiled, "__getitem__", None)) or sorted(names) != sorted(constexprs):
            self._give_up(f"{type(compiled).__name__} returned by the launch cannot be launched again "
                          f"directly, or the constexprs {list(constexprs)} are not the parameters {names}")
            return
        self._compiled[key] = (compiled, tuple(constexprs[n] for n in names))
        if len(self._compiled) > self.capacity:
            self._compiled.popitem(last=False)

    def _give_up(self, why: str) -> None:
        self.fallback_reason = why
        self._compiled.clear()
        warnings.warn(f"{getattr(self.fn, '__name__', self.fn)}: launching through Triton's binder from now on "
                      f"(direct launch failed: {why})", RuntimeWarning, stacklevel=3)


_LAUNCHERS: dict[int, CachedLauncher] = {}


def launcher_for(fn: Any) -> CachedLauncher:
    """The one ``CachedLauncher`` of a Triton kernel (it holds ``fn``, so the id stays its own)."""
    got = _LAUNCHERS.get(id(fn))
    if got is None:
        got = _LAUNCHERS[id(fn)] = CachedLauncher(fn)
    return got
