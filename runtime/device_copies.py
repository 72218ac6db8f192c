"""Copies between host memory and a CUDA device that do not make the host wait for the device:
the one module that knows CUDA's rules for them (on a CPU every function here is a plain copy or
none).

- To the host (``to_host``): a non-blocking copy into a fresh pinned buffer, and an event recorded
  after it on the stream that made the tensor; ``HostCopy.get()`` waits for that event only (not
  for the device's other work) before the host reads the buffer. A decode step's CPU part gets
  its query and mask this way: the device goes on with the device part meanwhile.
- To the device (``to_device``, ``gathered``): a non-blocking copy from pinned memory, queued on
  the current stream before the ops that use it (the same stream: they see the copied bytes). The
  source must not change until the copy has run: it is a fresh pinned buffer, or one the caller
  owns and never writes again (``owned=True``); torch's pinned-memory allocator keeps a freed
  buffer from reuse until the copies queued from it have run.

``benchmarks/cuda_sync_points.py`` counts, on a GPU, the calls of a decode step that still make
the host wait.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["HostCopy", "to_host", "to_device", "gathered"]


class HostCopy:
    """A tensor on its way to host memory; ``get()`` returns it once its copy has landed."""

    __slots__ = ("_tensor", "_event")

    def __init__(self, tensor: torch.Tensor, event=None):
        self._tensor, self._event = tensor, event

    def get(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()          # this copy only, not a device-wide wait
            self._event = None
        return self._tensor


def to_host(t: Optional[torch.Tensor], own: bool = False) -> Optional[HostCopy]:
    """``t`` in host memory. From a CUDA device: copied without waiting (``HostCopy.get`` waits for
    this copy alone). Already on the host: ``t`` itself, or a copy of it where ``own`` (the caller
    reads it after the graph may have reused ``t``'s memory)."""
    if t is None:
        return None
    if t.device.type != "cuda":
        return HostCopy(t.clone() if own else t)
    buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    buffer.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(t.device))
    return HostCopy(buffer, event)


def to_device(t: torch.Tensor, device: torch.device, owned: bool = False) -> torch.Tensor:
    """``t`` on ``device``. Host to CUDA: queued on the current stream from pinned memory without
    waiting; from ``t`` itself only where it is pinned and ``owned`` (nothing writes it again),
    else from a pinned copy made now."""
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    if not (owned and t.is_pinned()):
        t = _pinned_copy(t)
    return t.to(device, non_blocking=True)


def gathered(source: torch.Tensor, index: torch.Tensor, for_device: torch.device) -> torch.Tensor:
    """``source.index_select(0, index)`` (``source`` in host memory) into a new buffer, pinned where
    it goes on to a CUDA device (``to_device(..., owned=True)`` then copies it without waiting)."""
    out = torch.empty((index.numel(), *source.shape[1:]), dtype=source.dtype, pin_memory=for_device.type == "cuda")
    return torch.index_select(source, 0, index, out=out)


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out
