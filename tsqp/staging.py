"""A request's tensors onto the device, and a reply's back, in one copy each way.

Copying each tensor on its own from pageable memory runs well below the bus's speed and waits
once per tensor, each way, plus once per finiteness check. Packing all of a call's tensors into
one pinned buffer makes it one DMA each way and a single wait, whatever the tensor count
(QKVScores sends 3 tensors and returns up to 8 causal blocks); docs/benchmarks.md has what it
saved on an H200.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .shm import aligned  # the same 64-byte alignment: every packed tensor can be viewed in place

log = logging.getLogger("tsqp.server")

_pinning_works: bool | None = None  # probed once: a sandbox or a CPU-only build may refuse page-locked memory
_PROBE_BYTES = 4096


def layout(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Each tensor's byte offset in a packed buffer, and the buffer's size."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end = aligned(end + t.numel() * t.element_size())
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
    """Page-locked host memory when the platform allows it (DMA at full speed), else ordinary.

    Pinned blocks come from torch's caching host allocator. A block holding a reply stays alive
    while ZeroMQ still sends its frames (they reference the tensor), and one given to an
    asynchronous copy is not reused before the copy's recorded event. A platform that refuses a
    small probe never pins; a single large request that fails to pin gets ordinary memory."""
    global _pinning_works
    if _pinning_works is None:
        try:
            torch.empty(_PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
            _pinning_works = True
        except RuntimeError:
            _pinning_works = False
    if _pinning_works:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as err:
            log.warning("could not pin %d bytes (%s); copying through ordinary memory",
                        nbytes, str(err).splitlines()[0])
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
    """Device tensors on the host, complete when this returns: one copy and one wait for a GPU.
    Several outputs are first packed on the device, which briefly takes their size again in
    device memory (bounded by the server's output limit)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return [t.cpu() for t in tensors]
    offsets, size = layout(tensors)
    if len(tensors) == 1:
        packed = _bytes(tensors[0])  # a view when the output is contiguous: nothing to pack
    else:
        packed = torch.empty(size, dtype=torch.uint8, device=tensors[0].device)
        pack(tensors, packed, offsets)
    host = _host_buffer(size)
    host[: packed.numel()].copy_(packed, non_blocking=True)
    torch.cuda.current_stream(packed.device).synchronize()
    return unpack(host, offsets, tensors)
