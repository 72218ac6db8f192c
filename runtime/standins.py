"""Zero-memory stand-ins for the K/V tensors a model keeps in its own cache object.

A stand-in has the shape of the real ``[B, Hkv, S, D]`` tensor but is a stride-0 expansion of
a one-element NaN tensor (its base) that the runtime owns; each step's stand-in gets a new base,
so no op output aliases its input. When it comes back as the next step's input, its data
pointer says which session and layer it is. Code that
reads its values outside the compiled graph gets NaN, never plausible garbage; the runtime
refuses such a tensor when it comes back. A session is released when no stand-in of it (nor a
view of one, like a sliding window's slice) is alive any more.
"""
from __future__ import annotations

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


class StandIns:
    """The registry of stand-in bases, by data pointer."""

    def __init__(self, on_unreferenced: Callable[[int], None]):
        self._bases: dict[int, torch.Tensor] = {}                  # data_ptr -> base
        self._keys: dict[int, StandInKey] = {}
        self._by_session: dict[int, set[int]] = {}
        self._alive: dict[int, int] = {}                           # session -> stand-ins not finalized
        self._orphans: dict[int, set[int]] = {}                    # session -> bases only views hold
        self._on_unreferenced = on_unreferenced

    def make(self, key: StandInKey, like: torch.Tensor, length: int) -> torch.Tensor:
        """A stand-in ``[B, Hkv, length, D]`` for ``like: [B, Hkv, n, D]``."""
        base = torch.full((1, 1, 1, 1), float("nan"), dtype=like.dtype, device=like.device)
        ptr = base.data_ptr()
        self._bases[ptr] = base
        self._keys[ptr] = key
        self._by_session.setdefault(key.session_id, set()).add(ptr)
        self._alive[key.session_id] = self._alive.get(key.session_id, 0) + 1
        b, h, _, d = like.shape
        out = base.expand(b, h, length, d)
        # the token count grows every step: let Dynamo trace it symbolically from the first
        # decode step on, instead of recompiling once more on the second
        torch._dynamo.maybe_mark_dynamic(out, 2)
        weakref.finalize(out, self._dying, key.session_id, ptr)
        return out

    def lookup(self, t: torch.Tensor) -> Optional[StandInKey]:
        """The key of a stand-in (or a view of one), else None."""
        if t.numel() == 0 or any(st != 0 for st, n in zip(t.stride(), t.shape) if n > 1):
            return None
        key = self._keys.get(t.data_ptr())
        if key is not None and self._bases[t.data_ptr()].dtype != t.dtype:
            return None
        return key

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
            self._orphans.get(session_id, set()).difference_update(dead)
        for ptr in dead:                     # dropping a base may run other finalizers: last
            self._keys.pop(ptr, None)
            self._bases.pop(ptr, None)
        return bool(live)

    def _dying(self, session_id: int, ptr: int) -> None:
        """A stand-in is finalized. Every step finalizes one per layer and kind, so this looks
        only at its own base and at the bases that outlived their stand-in through a view (a
        sliding window's slice), not at all the session's bases."""
        if session_id not in self._by_session:
            return
        self._alive[session_id] -= 1
        orphans = self._orphans.setdefault(session_id, set())
        base = self._bases.get(ptr)
        if base is not None and _other_refs(base) - 1 > 0:          # - 1: the dying stand-in
            orphans.add(ptr)
        else:
            self._drop(ptr)
        gone = [p for p in orphans if p != ptr and (p not in self._bases or _other_refs(self._bases[p]) <= 0)]
        for other in gone:                   # their views died since
            orphans.discard(other)
            self._drop(other)
        if self._alive[session_id] == 0 and not orphans:
            self._on_unreferenced(session_id)

    def _drop(self, ptr: int) -> None:
        key = self._keys.pop(ptr, None)
        self._bases.pop(ptr, None)
        if key is not None:
            self._by_session.get(key.session_id, set()).discard(ptr)

    def sessions(self) -> list[int]:
        return list(self._by_session)

    def forget(self, session_id: int) -> None:
        self._alive.pop(session_id, None)
        self._orphans.pop(session_id, None)
        for ptr in self._by_session.pop(session_id, ()):
            self._bases.pop(ptr, None)
            self._keys.pop(ptr, None)
