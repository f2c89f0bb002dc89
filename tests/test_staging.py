"""The one-copy packing of a call's tensors (tsqp.staging): what the GPU server does on CUDA,
checked here on the CPU with the same layout code."""

import pytest
import torch

from tsqp.shm import ALIGN
from tsqp.staging import Staging, layout, pack, unpack


def _varied(generator: torch.Generator) -> list[torch.Tensor]:
    """Mixed dtypes, odd sizes, a scalar, an empty tensor and a non-contiguous one."""
    return [
        torch.randn(3, 7, 5, generator=generator),
        torch.randint(-1000, 1000, (13,), generator=generator),
        torch.randn(2, 9, generator=generator).to(torch.bfloat16),
        torch.tensor(float(torch.rand(1, generator=generator))),
        torch.empty(0, 4),
        torch.randn(6, 4, generator=generator, dtype=torch.float64).t(),
        torch.rand(11, generator=generator) > 0.5,
        torch.randn(1, 3, generator=generator).half(),
    ]


def test_pack_unpack_round_trip_keeps_every_value_dtype_and_shape():
    generator = torch.Generator().manual_seed(3)
    tensors = _varied(generator)
    offsets, size = layout(tensors)
    assert all(at % ALIGN == 0 for at in offsets) and size % ALIGN == 0
    ends = [at + t.numel() * t.element_size() for t, at in zip(tensors, offsets)]
    assert all(end <= nxt for end, nxt in zip(ends, offsets[1:])) and ends[-1] <= size  # no overlap
    buffer = torch.full((size,), 0xAB, dtype=torch.uint8)
    pack(tensors, buffer, offsets)
    for original, view in zip(tensors, unpack(buffer, offsets, tensors)):
        assert view.dtype == original.dtype and view.shape == original.shape
        assert torch.equal(view, original)
        if view.numel():
            assert view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()  # views, not copies


def test_cpu_device_moves_nothing():
    tensors = _varied(torch.Generator().manual_seed(4))
    staging = Staging(torch.device("cpu"))
    for moved, original in zip(staging.to_device(tensors), tensors):
        assert moved is original or torch.equal(moved, original)
    assert all(torch.equal(a, b) for a, b in zip(staging.to_host(tensors), tensors))


def test_host_buffers_fall_back_to_ordinary_memory_where_pinning_is_refused(monkeypatch):
    import tsqp.staging as staging

    real_empty = torch.empty

    def refusing(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("no page-locked memory here")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(staging, "_pinning_works", None)
    monkeypatch.setattr(torch, "empty", refusing)
    buffer = staging._host_buffer(1000)
    assert buffer.numel() == 1000 and buffer.dtype == torch.uint8 and staging._pinning_works is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip_is_exact_and_an_earlier_reply_stays_intact():
    generator = torch.Generator().manual_seed(5)
    tensors = _varied(generator)
    staging = Staging(torch.device("cuda"))
    on_device = staging.to_device(tensors)
    assert all(t.device.type == "cuda" for t in on_device)
    first = staging.to_host([t.clone() for t in on_device])
    second = staging.to_host([torch.zeros_like(t) for t in on_device])  # may not reuse first's pinned buffer
    for original, back, other in zip(tensors, first, second):
        assert back.device.type == "cpu" and torch.equal(back, original)
        assert other.shape == original.shape and not other.any()
    assert first[0].is_pinned()
    single = staging.to_host([on_device[0]])[0]
    assert torch.equal(single, tensors[0])


def test_a_kept_host_buffer_is_reused_only_once_nothing_views_it():
    """What keeps a reply intact while ZeroMQ sends it: its frames (tensor_frame's memoryviews)
    still view the buffer, so the next call gets another one; once they are gone it is reused."""
    from tsqp import protocol
    from tsqp.staging import KEEP_BYTES, HostBuffer

    kept = HostBuffer()
    first = kept.take(1000)
    assert kept.take(900).data_ptr() == first.data_ptr()  # nothing else views it: reused
    reply = torch.randn(50, generator=torch.Generator().manual_seed(6))
    first[:200].view(torch.float32).copy_(reply)
    frames = protocol.encode({"ok": True}, [first[:200].view(torch.float32)])  # what a reply holds while sent
    busy = kept.take(1000)
    assert busy.data_ptr() != first.data_ptr()
    busy.fill_(0xFF)
    assert torch.equal(protocol.decode([bytes(f) for f in frames]).tensors[0], reply)  # untouched
    del frames
    assert kept.take(1000).data_ptr() == busy.data_ptr()  # the newer buffer is the kept one now
    assert kept.take(5000).numel() >= 5000  # grown
    huge = kept.take(KEEP_BYTES + 1)
    assert huge.numel() == KEEP_BYTES + 1 and kept.buffer is not huge  # a one-off, not kept
