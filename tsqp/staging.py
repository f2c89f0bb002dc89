"""A request's tensors onto the device, and a reply's back, in one copy each way, through pinned
buffers kept between calls.

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
    A platform that refuses a small probe never pins; a single large request that fails to pin
    gets ordinary memory."""
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


KEEP_BYTES = 64 << 20  # a staging buffer is kept for reuse up to this size; a larger call gets its own
_MIN_BYTES = 64 << 10


def _use_count(t: torch.Tensor) -> int:
    """How many tensors share `t`'s memory (torch has no public call for it); a torch without
    the private one counts every buffer as shared, so nothing is reused."""
    counter = getattr(torch._C, "_storage_Use_Count", None)
    return counter(t.untyped_storage()._cdata) if counter is not None else 1 << 30


_OWN_USES = _use_count(torch.empty(1))  # a tensor nothing else views


class HostBuffer:
    """One page-locked buffer, kept between calls and grown when a call needs more. It is handed
    out again only when no tensor from an earlier call still views it: a reply's frames reference
    its tensors until ZeroMQ has sent them, perhaps long after `handle` returned."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def take(self, nbytes: int) -> torch.Tensor:
        kept = self.buffer
        if kept is not None and kept.numel() >= nbytes and _use_count(kept) <= _OWN_USES:
            return kept
        if nbytes > KEEP_BYTES:
            return _host_buffer(nbytes)  # a one-off: freed with its last view
        self.buffer = _host_buffer(max(_MIN_BYTES, 1 << (nbytes - 1).bit_length()))
        return self.buffer


class Staging:
    """A server's way to and from its device: on CUDA, a call's tensors go through one kept pinned
    buffer each way (an allocation of page-locked memory per call costs more than the copy of a
    decode step's few kB); on the CPU they stay where they are."""

    def __init__(self, device: torch.device):
        self.device = device
        self.inbound, self.outbound = HostBuffer(), HostBuffer()
        self._uploaded = torch.cuda.Event() if device.type == "cuda" else None  # the last copy out of inbound

    def to_device(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Host tensors on the device: one host-side pack and one asynchronous copy for a GPU."""
        if self.device.type == "cpu":
            return list(tensors)
        if self._uploaded is None or not tensors:
            return [t.to(self.device) for t in tensors]
        offsets, size = layout(tensors)
        self._uploaded.synchronize()  # the previous call's copy has read the buffer (done, unless that call failed)
        host = self.inbound.take(size)
        pack(tensors, host, offsets)
        moved = host[:size].to(self.device, non_blocking=True)
        self._uploaded.record()
        return unpack(moved, offsets, tensors)

    def to_host(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Device tensors on the host, complete when this returns: one copy and the call's one wait
        for a GPU. Several outputs are first packed on the device, which briefly takes their size
        again in device memory (bounded by the server's output limit)."""
        if self.device.type == "cpu":
            return list(tensors)
        devices = {t.device for t in tensors}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            return [t.cpu() for t in tensors]
        offsets, size = layout(tensors)
        if len(tensors) == 1:
            packed = _bytes(tensors[0])  # a view when the output is contiguous: nothing to pack
        else:
            packed = torch.empty(size, dtype=torch.uint8, device=tensors[0].device)
            pack(tensors, packed, offsets)
        host = self.outbound.take(size)
        host[: packed.numel()].copy_(packed, non_blocking=True)
        torch.cuda.current_stream(packed.device).synchronize()
        return unpack(host, offsets, tensors)
