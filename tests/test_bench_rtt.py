"""`tsqp bench --rtt`: the transport alone, every transport and payload, median and p99."""

from __future__ import annotations

import json

import torch

from tsqp import api
from tsqp.transport import Client

from conftest import run_cli


def test_echo_returns_what_it_was_sent_and_no_more_than_the_reply_limit(tiny_dir):
    with api.start_server(tiny_dir, device="cpu") as server, Client(server.endpoint) as client:
        for payload in (torch.randn(0), torch.randn(3, 5), torch.randn(1 << 18).to(torch.bfloat16)):
            echoed = client.call("Echo", [payload], wire_dtype={torch.bfloat16: "bfloat16"}.get(payload.dtype,
                                                                                                "float32")).tensors[0]
            assert echoed.dtype == payload.dtype and torch.equal(echoed, payload)


def test_rtt_reports_every_transport_and_payload(tiny_dir):
    result = run_cli("bench", "--rtt", "--model", str(tiny_dir), "--repeat", "1", "--json", "-", timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rtt"]
    assert [(r["transport"], r["payload"]) for r in rows] == [
        (t, p) for t in ("tcp", "ipc", "ipc+shm", "fastlink") for p in ("empty", "8 KiB", "1 MiB", "16 MiB")]
    for r in rows:
        assert 0 < r["median_s"] <= r["p99_s"] and r["calls"] >= 5
    assert "| ipc+shm | 16 MiB |" in result.stderr and "| fastlink | empty |" in result.stderr
