"""Memory bounded per request: a small request cannot make a huge reply.

The tiny preset: hidden 64, 4 heads of 16, vocab 512, max_position_embeddings 512, so its
reply limit is 4 x the seed's Q·Kᵀ for one 512-token sequence (4 MiB): 16 MiB.
"""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import torch
import zmq

from tsqp import api
from tsqp.config import ModelConfig
from tsqp.errors import RemoteError
from tsqp.models import PRESETS
from tsqp.server import default_reply_bytes
from tsqp.transport import Client

from conftest import run_cli

LIMIT = 16 << 20


def refused(client: Client, method: str, tensors: list, **args) -> tuple[str, str]:
    with pytest.raises(RemoteError) as caught:
        client.call(method, tensors, **args)
    return caught.value.code, str(caught.value)


def test_the_default_reply_limit_is_sized_to_the_model():
    configs = {name: ModelConfig.from_dict({"model_type": "llama", **kwargs}) for name, kwargs in PRESETS.items()}
    assert default_reply_bytes(configs["tiny"]) == 4 * (4 * 512 * 512 * 4) == LIMIT
    assert default_reply_bytes(configs["tinyllama-1.1b"]) == 4 * (32 * 2048 * 2048 * 4)  # 2 GiB
    assert default_reply_bytes(configs["llama-3.2-1b"]) == 4 << 30  # capped: its full length is 131072


@pytest.mark.parametrize("wire", ["float64", "float32"])
def test_matmul_takes_only_the_seed_attention_products(servers, wire):
    """[n, 1] @ [1, n]: 16 kB in, 33 MB out in float64 on the unbounded server."""
    n = 2048
    with Client(servers["gqa"].endpoint, timeout_s=30) as client:
        code, message = refused(client, "Matmul", [torch.randn(n, 1), torch.randn(1, n)], wire_dtype=wire)
        assert code == "bad_request" and ("attention products" in message or "wire_dtype" in message)
        q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
        (scores,) = client.call("Matmul", [q, k.transpose(2, 3)]).tensors
        assert torch.allclose(scores, q @ k.transpose(2, 3), rtol=1e-5, atol=1e-5)
        p = torch.softmax(scores, dim=-1)
        (out,) = client.call("Matmul", [p, k]).tensors
        assert torch.allclose(out, p @ k, rtol=1e-5, atol=1e-6)
        for a, b in (([2, 4, 9, 16], [2, 4, 16, 8]), ([2, 3, 9, 16], [2, 3, 16, 9]), ([1, 4, 9, 9], [1, 4, 9, 15]),
                     ([1, 4, 600, 16], [1, 4, 16, 600]), ([4, 9, 16], [4, 16, 9])):
            code, message = refused(client, "Matmul", [torch.randn(*a), torch.randn(*b)])
            assert code == "bad_request" and "attention products" in message, (a, b)


def test_float64_replies_only_where_a_method_needs_them(servers):
    x = torch.randn(1, 3, 64)
    with Client(servers["gqa"].endpoint, timeout_s=10) as client:
        for method, tensors, args in (("Linear", [x], {"layer_idx": 0, "module_name": "q_proj"}),
                                      ("LMHead", [x], {}), ("Embedding", [torch.tensor([[1, 2]])], {}),
                                      ("Gate", [x], {"layer_idx": 0, "session": "f64"}),
                                      ("Whole", [torch.tensor([[1, 2]])], {})):
            code, message = refused(client, method, tensors, wire_dtype="float64", **args)
            assert code == "bad_request" and "wire_dtype 'float64'" in message, method
        (y,) = client.call("Linears", [x.double()], layer_idx=0, modules=["q_proj"], wire_dtype="float64").tensors
        assert y.dtype == torch.float64  # private mode's masked products


def test_replies_over_the_limit_are_refused_before_any_work(servers):
    with Client(servers["gqa"].endpoint, timeout_s=30) as client:
        over = [("Embedding", [torch.zeros(1, LIMIT // (64 * 4) + 1, dtype=torch.int64)], {}),  # 512 kB of ids
                ("LMHead", [torch.randn(LIMIT // (512 * 4) + 1, 64)], {}),
                ("Matmul", [torch.randn(5, 4, 512, 16), torch.randn(5, 4, 16, 512)], {}),  # 5 x 4 MiB of scores
                ("Linears", [torch.randn(LIMIT // (512 * 8) + 1, 64).double()],
                 {"modules": ["lm_head"], "wire_dtype": "float64"}),
                ("LMHead", [torch.randn(LIMIT // (512 * 2) + 1, 64)], {"wire_dtype": "float16"})]
        for method, tensors, args in over:
            code, message = refused(client, method, tensors, **args)
            assert code == "too_large" and f"(limit {LIMIT} bytes" in message, (method, message)
        at_limit = [("Embedding", [torch.zeros(1, LIMIT // (64 * 4), dtype=torch.int64)], {}),
                    ("Matmul", [torch.randn(4, 4, 512, 16), torch.randn(4, 4, 16, 512)], {}),
                    ("LMHead", [torch.randn(LIMIT // (512 * 2), 64)], {"wire_dtype": "float16"})]
        for method, tensors, args in at_limit:
            (out,) = client.call(method, tensors, **args).tensors
            assert out.numel() * out.element_size() == LIMIT, method


def test_serve_takes_a_reply_limit(tiny_dir):
    with api.spawn_server(tiny_dir, device="cpu", extra_args=("--max-reply-mb", "1")) as server:
        with Client(server.endpoint, timeout_s=10) as client:
            assert client.call("LMHead", [torch.randn(512, 64)]).tensors[0].shape == (512, 512)  # exactly 1 MiB
            code, message = refused(client, "LMHead", [torch.randn(513, 64)])
            assert code == "too_large" and "limit 1048576 bytes" in message
    for flag, value in (("--max-reply-mb", "0"), ("--session-memory-mb", "nan"), ("--session-idle-s", "-1")):
        result = run_cli("serve", "--model", str(tiny_dir), "--device", "cpu", flag, value)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == f"error: {flag} must be a positive number, got {float(value)}"


# -- the server's memory under hostile input ---------------------------------------------------------


def header(method: str, specs: list[tuple[str, list[int]]], **args) -> bytes:
    return msgpack.packb({"method": method, "args": args, "tensors": [{"dtype": d, "shape": s} for d, s in specs]})


def most_rss_growth(server: api.ServerProcess, requests: list[list[bytes]], hold_s: float = 1.0) -> tuple[int, int]:
    """Send every request from one socket without reading, give the server `hold_s` to answer
    them (its replies wait in its queue), then read them all. Returns the bytes sent and the most
    the server's resident memory grew meanwhile (sampled every 5 ms)."""
    base = server.rss_bytes()
    peak, done = base, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, server.rss_bytes() or 0)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        for frames in requests:
            sock.send_multipart([b"", *frames])
        time.sleep(hold_s)
        for _ in requests:
            assert sock.poll(120_000), "no reply"
            sock.recv_multipart()
    finally:
        sock.close(linger=0)
        done.set()
        sampler.join()
    return sum(len(f) for frames in requests for f in frames), peak - base


def test_server_memory_under_hostile_requests(tiny_dir, capsys):
    """The requests that grew an unbounded server by gigabytes are refused; the worst that is
    still allowed, replies at the limit, grows it by a bounded amount per request in flight."""
    n = 8192  # [n, 1] @ [1, n] in float64: 131 kB in, 537 MB out each on the unbounded server
    outer = [[header("Matmul", [("float32", [n, 1]), ("float32", [1, n])], wire_dtype="float64"),
              bytes(4 * n), bytes(4 * n)]] * 3
    ids = LIMIT // (64 * 4)  # Embedding at the reply limit: the largest reply per byte sent (32 x)
    widest = [[header("Embedding", [("int64", [1, ids])]), bytes(8 * ids)]] * 8
    with api.spawn_server(tiny_dir, device="cpu") as server:
        with Client(server.endpoint, timeout_s=10) as client:  # warm: allocator pools, lazy imports
            client.call("Embedding", [torch.zeros(1, ids, dtype=torch.int64)])
        sent_outer, grew_outer = most_rss_growth(server, outer)
        sent_widest, grew_widest = most_rss_growth(server, widest)
    with capsys.disabled():
        print(f"\nhostile: {len(outer)} Matmul [{n},1]@[1,{n}] float64, {sent_outer / 1e3:.0f} kB in: "
              f"RSS +{grew_outer / 2**20:.1f} MiB; {len(widest)} Embedding replies at the {LIMIT >> 20} MiB limit, "
              f"{sent_widest / 1e6:.1f} MB in: RSS +{grew_widest / 2**20:.1f} MiB")
    assert grew_outer < 100 << 20
    assert grew_widest < len(widest) * LIMIT * 3 + (100 << 20)
