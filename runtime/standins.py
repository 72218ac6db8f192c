"""Zero-memory stand-ins for the K/V tensors a model keeps in its own cache object.

A stand-in has the shape and dtype of the real ``[B, Hkv, S, D]`` tensor but is a stride-0
expansion of a one-element NaN tensor (its base) that the runtime owns, wrapped as a
``StandIn`` (a ``torch.Tensor`` subclass); each step's stand-in gets a new base, so no op output
aliases its input. When it comes back as the next step's input, its data pointer says which
session and layer it is.

A stand-in holds no KV values, so nothing but kvdrive's ops may compute on it. While Dynamo
traces, it is a plain tensor (the passes then make sure that only ``kvdrive::`` ops read it,
or give the reader a ``kvdrive::materialize`` of the real values). Outside a trace, any torch
function other than a metadata query (shape, dtype, device...) or a ``kvdrive::`` op raises
``StandInReadError``, which says what to do: eager code (the uncompiled model, beam search,
a Dynamo fallback) can never attend NaN silently. A session is released when no stand-in of
it (nor a view of one, like a sliding window's slice) is alive any more.
"""
from __future__ import annotations

import collections
import gc
import itertools
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class StandInKey:
    session_id: int
    layer: int
    kind: str          # "k" or "v"


def _other_refs(t: torch.Tensor) -> int:
    """How many tensors besides ``t`` share its storage."""
    storage = t.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata) - 2        # - t itself - this wrapper


# threads with a garbage collection under way (gc.callbacks: "start" ... "stop")
_collecting: set[int] = set()


def _collection_phase(phase: str, info: dict) -> None:
    if phase == "start":
        _collecting.add(threading.get_ident())
    else:
        _collecting.discard(threading.get_ident())


gc.callbacks.append(_collection_phase)


def collect_garbage(timeout: float) -> None:
    """A full garbage collection in this thread, so that the finalizers of every dropped
    generation's stand-ins have run when it returns. Python runs one collection at a time, and
    ``gc.collect()`` returns at once while another thread's is under way (its finalizers may
    not have run yet): that one is waited for first, up to ``timeout`` seconds."""
    me = threading.get_ident()
    deadline = time.monotonic() + timeout
    while _collecting - {me} and time.monotonic() < deadline:
        time.sleep(0.001)
    gc.collect()


class StandInReadError(RuntimeError):
    pass


READ_OUTSIDE = (
    "{what} read a KV cache tensor that kvdrive holds in its runtime (a zero-memory stand-in: "
    "the values are not in the cache object). Only the model compiled with backend='kvdrive' can "
    "continue this cache. To continue it with eager code, first call "
    "kvdrive_compile.materialize(cache), which puts the real K/V back into the cache object; "
    "beam search and other cache reordering are not supported (use num_beams=1; a crop of the "
    "last tokens, as assisted decoding does, is). If "
    "the compiled model itself got here, Dynamo ran its frame eagerly: it hit its recompile limit "
    "(torch._dynamo.config.recompile_limit; e.g. one function compiled with many option sets or "
    "for many model instances, or first calls of a kind made from several threads at once, which "
    "compile the same graph once per thread): call torch._dynamo.reset() between them, make each "
    "kind of call once from one thread before generating from several, or raise the limit.")

# metadata a stand-in answers truthfully: its shape, dtype, device... never its values
_METADATA = {"size", "dim", "numel", "stride", "storage_offset", "is_contiguous", "data_ptr",
             "untyped_storage", "element_size", "get_device", "nelement", "ndimension",
             "__len__", "__hash__", "_version", "_typed_storage", "storage"}
_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "layout", "is_cuda", "is_cpu", "is_meta",
               "requires_grad", "is_leaf", "grad_fn", "is_sparse", "is_quantized", "is_nested",
               "_base", "names", "itemsize", "nbytes", "is_mps", "is_xpu"}


def _is_metadata(name: str) -> bool:
    return name in _METADATA or name in _ATTRIBUTES or \
        (name.startswith(("is_", "_is_")) and name != "is_nonzero")             # flags, not values


def _func_name(func) -> str:
    if getattr(func, "__name__", "") == "__get__":                     # a property: its name
        return getattr(getattr(func, "__self__", None), "__name__", "__get__")
    return getattr(func, "__name__", str(func))


# What ``copy.deepcopy`` of a stand-in gives: the real K/V it stands for, gathered from the
# tiers (set by kvdrive_compile.runtimes, which finds a stand-in's runtime); None: refused.
copy_values: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


class StandIn(torch.Tensor):
    """A cache tensor whose KV lives in the kvdrive runtime (see the module docstring)."""

    def __deepcopy__(self, memo):
        """A deep copy of a cache kvdrive holds (Hugging Face's recipe for reusing a prompt's
        cache: ``copy.deepcopy(cache)`` per continuation) holds the real K/V, gathered from the
        tiers: an ordinary cache, as large as eager's, that eager code or the compiled model
        (as a new generation) continues exactly. The original keeps its KV in the runtime."""
        if id(self) not in memo:
            if copy_values is None:
                raise StandInReadError(READ_OUTSIDE.format(what="copy.deepcopy"))
            memo[id(self)] = copy_values(self)
        return memo[id(self)]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():                     # Dynamo traces it as a plain tensor
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        name = _func_name(func)
        if _is_metadata(name) or name in _VIEWS or \
                (isinstance(func, torch._ops.OpOverload) and func.namespace == "kvdrive"):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            # a view of a stand-in (a sliding window's slice) is a stand-in too
            return _wrap(out, _view_first(name, args, out)) if name in _VIEWS else out
        raise StandInReadError(READ_OUTSIDE.format(what=f"torch.{name} (outside the compiled graph)"))

    def __repr__(self, *, tensor_contents=None):
        return f"kvdrive.StandIn(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


# views taken of a stand-in without reading it (Hugging Face's sliding-window cache keeps
# ``full[:, :, -w:]`` of the stand-in a compiled step returned) are stand-ins too
_VIEWS = {"__getitem__", "narrow", "detach", "expand"}


def _wrap(t: torch.Tensor, first: Optional[int]) -> torch.Tensor:
    """``t`` as a StandIn whose token 0 is the layer's token ``first`` (None: not known)."""
    out = torch.Tensor._make_subclass(StandIn, t)
    out.kv_first = first
    return out


def _full(index, size: int) -> bool:
    return isinstance(index, slice) and index.indices(size) == (0, size, 1)


def _view_first(name: str, args: tuple, out: torch.Tensor) -> Optional[int]:
    """Which layer token a view's token 0 is: the parent's plus the offset the view takes
    along the token dimension. None when the view is anything else (a batch or head slice,
    a strided or fancy index): such a stand-in can stand for nothing, and any use says so."""
    parent = args[0]
    first = getattr(parent, "kv_first", None)
    if first is None or parent.dim() != 4 or out.dim() != 4:
        return None
    if name in ("detach", "expand"):
        return first if out.shape == parent.shape else None
    if name == "narrow":
        dim, start = args[1] % 4, args[2]
        return first + start % parent.shape[2] if dim == 2 else None
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (4 - len(index) + 1) + index[at + 1:]
    index = index + (slice(None),) * (4 - len(index))
    if len(index) != 4 or not all(_full(index[d], parent.shape[d]) for d in (0, 1, 3)):
        return None
    tokens = index[2]
    if not isinstance(tokens, slice) or tokens.step not in (None, 1):
        return None
    return first + tokens.indices(parent.shape[2])[0]


def token_span(t: torch.Tensor) -> Optional[tuple[int, int]]:
    """(first layer token, count) that a stand-in (or a view of one) stands for; None if not known."""
    first = getattr(t, "kv_first", None)
    return None if first is None else (first, t.shape[2])


def is_standin_like(t: object) -> bool:
    """A tensor that holds no values of its own: a stand-in, or a view of one."""
    return isinstance(t, StandIn)


def _never_traced(fn: Callable) -> Callable:
    return torch._dynamo.disable(fn, recursive=True)


class StandIns:
    """The registry of stand-in bases, by data pointer."""

    def __init__(self, on_unreferenced: Callable[[int], None], lock: Optional[threading.RLock] = None):
        # the runtime's lock: stand-ins are made by every thread's steps and finalized by any
        # thread's garbage collection
        self.lock = lock if lock is not None else threading.RLock()
        self._bases: dict[int, torch.Tensor] = {}                  # data_ptr -> base
        # data_ptr -> the serial of the base registered there: a freed base's address is soon
        # another's, and a death queued before (or an orphan) must not take the new one for its own
        self._made: dict[int, int] = {}
        self._serials = itertools.count()
        self._keys: dict[int, StandInKey] = {}
        self._by_session: dict[int, set[int]] = {}
        self._alive: dict[int, int] = {}                           # session -> stand-ins not finalized
        self._orphans: dict[int, dict[int, int]] = {}              # session -> bases only views hold (ptr -> serial)
        # data_ptr -> the layer token a base's views must end by: its layer was cropped there
        # (``cut``) after the base was made, and what lies beyond is other tokens now
        self._ends: dict[int, int] = {}
        # stand-ins finalized by another thread's garbage collection while the lock was held
        # (a step's): settled by the next ``settle`` (the runtime's sweep)
        self._deaths: collections.deque[tuple[int, int, int]] = collections.deque()
        self._on_unreferenced = on_unreferenced
        # finalizers run wherever garbage is collected, Dynamo tracing included: never traced.
        # Wrapped once: torch._dynamo.disable builds a new wrapper each call (~0.1 ms, twice a
        # layer and step)
        self._finalize = _never_traced(self._dying)

    def make(self, key: StandInKey, like: torch.Tensor, length: int, first: int) -> torch.Tensor:
        """A stand-in ``[B, Hkv, length, D]`` for ``like: [B, Hkv, n, D]``, standing for the
        layer's tokens ``[first, first + length)``."""
        base = self._new_base(like)
        ptr = base.data_ptr()
        b, h, _, d = like.shape
        # the stand-in exists (holds a reference to its base) before the base is registered:
        # another thread's sweep counts a registered base without one as dead and drops it
        out = _wrap(base.expand(b, h, length, d), first)
        serial = next(self._serials)
        with self.lock:
            self._bases[ptr] = base
            self._made[ptr] = serial
            self._keys[ptr] = key
            self._by_session.setdefault(key.session_id, set()).add(ptr)
            self._alive[key.session_id] = self._alive.get(key.session_id, 0) + 1
        # the token count grows every step: let Dynamo trace it symbolically from the first
        # decode step on, instead of recompiling once more on the second
        torch._dynamo.maybe_mark_dynamic(out, 2)
        # heads and head_dim never change: under dynamic=True, Dynamo would otherwise give a
        # batch of 2 and 2 KV heads one symbol, and the next batch size would recompile
        torch._dynamo.mark_static(out, 1)
        torch._dynamo.mark_static(out, 3)
        weakref.finalize(out, self._finalize, key.session_id, ptr, serial)
        return out

    @staticmethod
    def _new_base(like: torch.Tensor) -> torch.Tensor:
        """A one-element NaN tensor of ``like``'s dtype and device (its address soon belongs to
        another base once freed: the CUDA caching allocator hands blocks straight back)."""
        return torch.full((1, 1, 1, 1), float("nan"), dtype=like.dtype, device=like.device)

    def lookup(self, t: torch.Tensor) -> Optional[StandInKey]:
        """The key of a stand-in (or a view of one), else None."""
        if t.numel() == 0 or any(st != 0 for st, n in zip(t.stride(), t.shape) if n > 1):
            return None
        ptr = t.data_ptr()
        with self.lock:
            key = self._keys.get(ptr)
            if key is not None and self._bases[ptr].dtype != t.dtype:
                return None
            return key

    def cut(self, session_id: int, layer: int, length: int) -> None:
        """The layer's tokens from ``length`` on were forgotten (a crop): every stand-in made so
        far of that layer stands at most for tokens before ``length`` from now on (new tokens
        will take those positions)."""
        with self.lock:
            for ptr in self._by_session.get(session_id, ()):
                key = self._keys.get(ptr)
                if key is not None and key.layer == layer:
                    self._ends[ptr] = min(self._ends.get(ptr, length), length)

    def end_limit(self, t: torch.Tensor) -> Optional[int]:
        """The layer token a stand-in's span must end by (a crop since it was made), else None."""
        with self.lock:
            return self._ends.get(t.data_ptr())

    def prune(self, session_id: int, dying_ptr: Optional[int] = None) -> bool:
        """Forget the session's bases no tensor refers to any more; whether any is left in use.

        dying_ptr: the base of a stand-in being finalized (it still counts as a reference).
        """
        live, dead = [], []
        for ptr in list(self._by_session.get(session_id, ())):
            base = self._bases.get(ptr)
            if base is not None and _other_refs(base) - (1 if ptr == dying_ptr else 0) > 0:
                live.append(ptr)
            else:
                dead.append(ptr)
        if session_id in self._by_session:
            self._by_session[session_id] = set(live)
            orphans = self._orphans.get(session_id, {})
            for ptr in dead:
                orphans.pop(ptr, None)
        for ptr in dead:                     # dropping a base may run other finalizers: last
            self._forget_base(ptr)
        return bool(live)

    def _dying(self, session_id: int, ptr: int, serial: int) -> None:
        """A stand-in is finalized. Every step finalizes one per layer and kind, so this looks
        only at its own base and at the bases that outlived their stand-in through a view (a
        sliding window's slice), not at all the session's bases.

        Finalizers run in whichever thread collects the garbage. Where another thread holds the
        lock (a step of this runtime), the death is queued instead of waited for: waiting would
        stall that collection, and meanwhile the step's own ``gc.collect()`` returns at once (one
        collection at a time per process), so a step short of room would not see the blocks of a
        dropped generation come free."""
        if self.lock.acquire(blocking=False):
            try:
                self._dying_locked(session_id, ptr, serial)
            finally:
                self.lock.release()
        else:
            self._deaths.append((session_id, ptr, serial))

    def settle(self) -> None:
        """Account the deaths queued by ``_dying`` (under the lock)."""
        with self.lock:
            while self._deaths:
                self._dying_locked(*self._deaths.popleft(), finalizing=False)

    def _dying_locked(self, session_id: int, ptr: int, serial: int, finalizing: bool = True) -> None:
        """finalizing: the stand-in is being finalized now and still refers to its base (a
        queued death: it may be gone already; if not, its base stays an orphan until a sweep).
        A base a sweep dropped since (its address may hold another base now) is left alone."""
        if session_id not in self._by_session:
            return
        self._alive[session_id] -= 1
        orphans = self._orphans.setdefault(session_id, {})
        if self._made.get(ptr) == serial:
            if _other_refs(self._bases[ptr]) - finalizing > 0:      # a finalizing stand-in is one of the refs
                orphans[ptr] = serial
            else:
                self._drop(ptr)
        for other, made in list(orphans.items()):      # their views died since (or a sweep dropped them)
            if other != ptr and (self._made.get(other) != made or _other_refs(self._bases[other]) <= 0):
                del orphans[other]
                if self._made.get(other) == made:
                    self._drop(other)
        if self._alive[session_id] == 0 and not orphans:
            self._on_unreferenced(session_id)

    def _drop(self, ptr: int) -> None:
        key = self._keys.get(ptr)
        self._forget_base(ptr)
        if key is not None:
            self._by_session.get(key.session_id, set()).discard(ptr)

    def _forget_base(self, ptr: int) -> None:
        self._keys.pop(ptr, None)
        self._ends.pop(ptr, None)
        self._made.pop(ptr, None)
        self._bases.pop(ptr, None)               # last: dropping a base may run other finalizers

    def sessions(self) -> list[int]:
        return list(self._by_session)

    def forget(self, session_id: int) -> None:
        self._alive.pop(session_id, None)
        self._orphans.pop(session_id, None)
        for ptr in self._by_session.pop(session_id, ()):
            self._forget_base(ptr)
