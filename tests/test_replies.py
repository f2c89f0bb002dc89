"""The TEE checks every reply before it uses it: a NaN, an infinity or a value beyond float32's
range ends the run with an error naming the method and layer, in every mode."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tsqp import api, protocol
from tsqp.errors import IntegrityError, ProtocolError
from tsqp.server import GpuServer, ServerThread
from tsqp.tee.runner import TeeRunner
from tsqp.transport import Client


def poisoning(handle, method: str, nth: int, value: float):
    """A server whose `nth` reply to `method` carries `value` in one element of its first tensor."""
    seen = 0

    def handle_and_poison(frames: list[Any]) -> list[Any]:
        nonlocal seen
        reply_frames = handle(frames)
        if protocol.decode(frames).header.get("method") != method:
            return reply_frames
        seen += 1
        if seen != nth:
            return reply_frames
        reply = protocol.decode(reply_frames)
        first = reply.tensors[0].clone()
        first.view(-1)[first.numel() // 3] = value
        header = {k: v for k, v in reply.header.items() if k != "tensors"}
        return protocol.encode(header, [first, *reply.tensors[1:]])

    return handle_and_poison


def run(tiny_dir, method: str, nth: int, value: float, **runner_args) -> None:
    server = GpuServer(tiny_dir, "cpu")
    server.handle = poisoning(server.handle, method, nth, value)
    with ServerThread(server, api.free_endpoint()) as thread:
        runner = TeeRunner(Client(thread.endpoint, timeout_s=30), tiny_dir, **runner_args)
        ids = torch.randint(0, runner.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(nth))
        try:
            runner.prefill(ids)
        finally:
            runner.client.close()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_lean_reply_is_named_by_method_and_layer(tiny_dir, value):
    with pytest.raises(ProtocolError, match=r"DownHead \(layer 1\) reply holds NaN or infinity"):
        run(tiny_dir, "DownHead", 1, value)
    with pytest.raises(ProtocolError, match=r"AttnGate \(layer 1\) reply holds NaN or infinity"):
        run(tiny_dir, "AttnGate", 2, value)  # mid-forward: named here, not by the next call's refusal
    with pytest.raises(ProtocolError, match=r"DownScores \(layer 0\) reply holds NaN or infinity"):
        run(tiny_dir, "DownScores", 1, value)


def test_a_non_finite_seed_reply_is_named(tiny_dir):
    with pytest.raises(ProtocolError, match=r"Linear \(layer 0\) reply holds NaN or infinity"):
        run(tiny_dir, "Linear", 2, float("nan"), protocol="seed")


# 1e300 is finite on private mode's float64 wire, but not once unmasked to float32
@pytest.mark.parametrize("value, guard", [(float("nan"), {"protection": "private"}), (1e300, {"protection": "private"}),
                                          (float("nan"), {"verify": True}), (float("inf"), {"verify": True})])
def test_a_guarded_reply_no_honest_product_gives_is_an_integrity_error(tiny_dir, value, guard):
    with pytest.raises(IntegrityError, match=r"layer 0 gate_up|layer 0 gate_proj"):
        run(tiny_dir, "Linears", 3, value, **guard)
