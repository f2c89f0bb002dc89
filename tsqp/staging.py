"""A request's tensors onto the device, and a reply's back, in one copy each way.

On a GPU a short prompt's server time is mostly waiting: a pageable copy per tensor each way,
each one a synchronization, plus one per finiteness check. Packing all of a call's tensors into
one pinned buffer turns that into one DMA each way and a single wait, whatever the tensor count
(QKVScores sends 3 tensors and returns up to 8 causal blocks).
"""

from __future__ import annotations

from typing import Sequence

import torch

ALIGN = 64  # bytes; every packed tensor starts here, so any dtype can be viewed in place

_pinning_works: bool | None = None  # decided on first use: a sandbox may refuse page-locked memory


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def layout(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Each tensor's byte offset in a packed buffer, and the buffer's size."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end = _aligned(end + t.numel() * t.element_size())
    return offsets, end


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def pack(tensors: Sequence[torch.Tensor], buffer: torch.Tensor, offsets: Sequence[int]) -> None:
    """Copy `tensors` into the uint8 `buffer` at `offsets` (asynchronous on a device)."""
    for t, at in zip(tensors, offsets):
        data = _bytes(t)
        buffer[at: at + data.numel()].copy_(data, non_blocking=True)


def unpack(buffer: torch.Tensor, offsets: Sequence[int], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views into the uint8 `buffer`, one per tensor of `like` (same dtypes and shapes)."""
    return [buffer[at: at + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for t, at in zip(like, offsets)]


def _host_buffer(nbytes: int) -> torch.Tensor:
    """Page-locked when the platform allows (DMA at full speed, from torch's caching allocator,
    so a buffer still referenced by a queued reply is never reused), else ordinary memory."""
    global _pinning_works
    if _pinning_works is not False:
        try:
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            _pinning_works = True
            return buffer
        except RuntimeError:
            _pinning_works = False
    return torch.empty(nbytes, dtype=torch.uint8)


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors on `device`: one host-side pack and one asynchronous copy for a GPU."""
    if device.type != "cuda" or not tensors:
        return [t.to(device) for t in tensors]
    offsets, size = layout(tensors)
    host = _host_buffer(size)
    pack(tensors, host, offsets)
    return unpack(host.to(device, non_blocking=True), offsets, tensors)


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Device tensors on the host, complete when this returns: packed on the device, then one
    copy and one synchronization for a GPU."""
    devices = {t.device for t in tensors}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return [t.cpu() for t in tensors]
    offsets, size = layout(tensors)
    packed = torch.empty(size, dtype=torch.uint8, device=tensors[0].device)
    pack(tensors, packed, offsets)
    host = _host_buffer(size)
    host.copy_(packed, non_blocking=True)
    torch.cuda.current_stream(packed.device).synchronize()
    return unpack(host, offsets, tensors)
