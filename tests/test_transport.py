"""The transport under a server that stays connected but stops answering, and under a peer that
never reads: status queries notice the first within seconds without cutting off long work, and
the serving loop bounds what the second can pin."""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable

import msgpack
import pytest
import torch
import zmq

from tsqp import api, protocol
from tsqp.errors import ServerUnreachable
from tsqp.server import GpuServer, Limits, ServerThread
from tsqp.transport import Client, Liveness

QUICK = Liveness(interval_s=0.2, timeout_s=1.0)  # detection in about a second, for the slow-path tests


class Proxy:
    """A ZeroMQ hop between clients and a server that forwards every request, and the server's
    i-th message (replies and status answers, counted from 0) only if `keep(i)`, after
    `delay(frames)` seconds (holding everything behind it, as a slow link would)."""

    def __init__(self, server_endpoint: str, keep: Callable[[int], bool],
                 delay: Callable[[list[zmq.Frame]], float] = lambda frames: 0.0):
        self.endpoint, self.keep, self.delay = api.free_endpoint(), keep, delay
        self.forwarded = self.dropped = 0
        context = zmq.Context.instance()
        self._front, self._back = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
        self._front.bind(self.endpoint)
        self._back.connect(server_endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        poller.register(self._back, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(50))
            if self._front in ready:
                self._back.send_multipart(self._front.recv_multipart(copy=False), copy=False)
            if self._back in ready:
                frames = self._back.recv_multipart(copy=False)
                i = self.forwarded + self.dropped
                if not self.keep(i):
                    self.dropped += 1
                    continue
                time.sleep(self.delay(frames))
                self._front.send_multipart(frames, copy=False)
                self.forwarded += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._front.close(linger=0)
        self._back.close(linger=0)


@pytest.fixture(scope="module")
def server(tiny_dir):
    with api.start_server(tiny_dir, device="cpu") as running:
        yield running


def q_proj(references, x: torch.Tensor) -> torch.Tensor:
    """The reference: transformers' own module on the same weights."""
    with torch.inference_mode():
        return references["gqa"].model.layers[0].self_attn.q_proj(x)


def linear(client: Client, x: torch.Tensor) -> torch.Tensor:
    return client.call("Linear", [x], layer_idx=0, module_name="q_proj").tensors[0]


def test_a_link_that_drops_every_reply_is_noticed_within_seconds(server, references):
    proxy = Proxy(server.endpoint, keep=lambda i: i < 10)
    g = torch.Generator().manual_seed(1)
    try:
        with Client(proxy.endpoint, timeout_s=60, retries=1) as client:  # default liveness: ask at 1 s, lost at 5 s
            for _ in range(10):
                x = torch.randn(1, int(torch.randint(1, 9, (1,), generator=g)), 64, generator=g)
                assert torch.allclose(linear(client, x), q_proj(references, x), rtol=1e-5, atol=1e-6)
            start = time.monotonic()
            with pytest.raises(ServerUnreachable, match="neither the call nor a status query") as caught:
                linear(client, torch.randn(1, 3, 64, generator=g))
            elapsed = time.monotonic() - start
    finally:
        proxy.close()
    assert "after 2 attempts" in str(caught.value) and client.stats.retries == 1
    assert elapsed < 30, f"{elapsed:.1f} s"  # 2 x (1 s + 5 s) and a reconnect; never the 60 s timeout
    assert proxy.dropped >= 2  # both replies, and the status answers after them


def test_a_reply_lost_once_is_resent_and_the_call_completes(server, references):
    proxy = Proxy(server.endpoint, keep=lambda i: i != 3)
    g = torch.Generator().manual_seed(2)
    try:
        with Client(proxy.endpoint, timeout_s=60, retries=2) as client:
            results = []
            start = time.monotonic()
            for _ in range(6):
                x = torch.randn(2, int(torch.randint(1, 9, (1,), generator=g)), 64, generator=g)
                results.append((linear(client, x), q_proj(references, x)))
            elapsed = time.monotonic() - start
    finally:
        proxy.close()
    assert proxy.dropped == 1 and client.stats.retries == 1 and client.stats.round_trips == 6
    assert all(torch.allclose(y, expected, rtol=1e-5, atol=1e-6) for y, expected in results)
    assert elapsed < 20, f"{elapsed:.1f} s"  # asked at 1 s, told 'unknown', resent at once


def _slow_server(tiny_dir, seconds: float) -> tuple[GpuServer, list[str]]:
    """A real server whose Linear calls take `seconds` longer: an honest, long computation."""
    server = GpuServer(tiny_dir, "cpu")
    real, seen = server.handle, []

    def slow(frames):
        method = protocol.decode_header(frames[0]).get("method")
        seen.append(method)
        if method == "Linear":
            time.sleep(seconds)
        return real(frames)

    server.handle = slow
    return server, seen


def test_a_long_honest_computation_is_not_cut_off_and_others_wait_their_turn(tiny_dir, references):
    server, seen = _slow_server(tiny_dir, seconds=3.0)  # three times the detection time below
    with ServerThread(server, api.free_endpoint()) as thread:
        x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(3))
        with Client(thread.endpoint, timeout_s=60, retries=0, liveness=QUICK) as client:
            client.ping()
            time.sleep(1.5)  # a quiet server: its stand-in sleeps until the next request starts
            replies: dict[str, object] = {}

            def old_style_ping() -> None:  # a REQ socket, as the seed's client has
                sock = zmq.Context.instance().socket(zmq.REQ)
                sock.connect(thread.endpoint)
                sock.send_multipart(protocol.encode({"method": "Ping", "args": {}}))
                if sock.poll(30_000):
                    replies["req"] = protocol.decode(sock.recv_multipart()).header
                sock.close(linger=0)

            other = threading.Thread(target=old_style_ping, daemon=True)
            timer = threading.Timer(0.5, other.start)  # while the long call runs
            timer.start()
            start = time.monotonic()
            y = linear(client, x)
            elapsed = time.monotonic() - start
            other.join(30)
    assert torch.allclose(y, q_proj(references, x), rtol=1e-5, atol=1e-6)
    assert client.stats.retries == 0 and elapsed >= 3.0
    assert replies["req"]["ok"] and seen == ["Ping", "Linear", "Ping"]  # served after the long call, not during


@pytest.mark.parametrize("shm", [False, True], ids=["zeromq", "fastlink"])
def test_a_frozen_server_is_noticed_by_its_silence(tiny_dir, shm):
    """Over ZeroMQ and over the fast link (whose status queries travel on the link itself)."""
    with api.spawn_server(tiny_dir, device="cpu", shm=shm) as process:
        # ZMTP heartbeats every 60 s would take 5 minutes to notice: only status queries can be that fast
        with Client(process.endpoint, timeout_s=60, retries=0, heartbeat_s=60, shm=shm) as client:
            client.ping()
            assert client.via == ("fastlink" if shm else "zeromq")
            process.process.send_signal(signal.SIGSTOP)  # no FIN, no replies: a hung host
            try:
                start = time.monotonic()
                with pytest.raises(ServerUnreachable, match="neither the call nor a status query"):
                    client.call("Ping")
                elapsed = time.monotonic() - start
            finally:
                process.process.send_signal(signal.SIGCONT)
    assert elapsed < 20, f"{elapsed:.1f} s"  # 1 s + 5 s, not the 60 s timeout


def seed_scores(batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's Q·Kᵀ at the tiny model's full length: 8 MiB sent, a 64 MiB reply."""
    return torch.randn(batch, 4, 512, 16), torch.randn(batch, 4, 16, 512)


def test_a_large_reply_announced_is_given_time_to_cross_a_slow_link(tiny_dir):
    """A reply of 64 MiB held 3 s on the way (a slow link): its notice extends the silence the
    client allows, so it is not mistaken for a lost reply (the client would give up after 1 s)."""
    sizes: list[int] = []

    def hold_the_reply(frames: list[zmq.Frame]) -> float:
        return 3.0 if sum(len(f) for f in frames) > 32 << 20 else 0.0

    a, b = seed_scores()
    with api.start_server(tiny_dir, device="cpu", limits=Limits(max_reply_bytes=64 << 20)) as server:
        proxy = Proxy(server.endpoint, keep=lambda i: True, delay=hold_the_reply)
        try:
            with Client(proxy.endpoint, timeout_s=60, retries=0, liveness=QUICK) as client:
                client.ping()
                start = time.monotonic()
                (product,) = client.call("Matmul", [a, b]).tensors
                elapsed = time.monotonic() - start
                sizes.append(product.numel() * 4)
        finally:
            proxy.close()
    assert torch.equal(product, a @ b) and client.stats.retries == 0 and elapsed >= 3.0
    assert sizes == [64 << 20]


def test_a_peer_that_never_reads_cannot_pin_the_servers_memory(tiny_dir):
    """A DEALER that asks for 64 MiB replies and never reads them: after its first replies the
    server refuses it until it reads, so twelve such requests grow the server by little more
    than the bound (64 MiB) and one reply, not by 768 MiB."""
    a, b = seed_scores()
    request = protocol.encode({"method": "Matmul", "args": {}}, [a, b])
    with api.spawn_server(tiny_dir, device="cpu", extra_args=("--max-reply-mb", "64")) as process:
        with Client(process.endpoint, timeout_s=60) as reader:
            reader.call("Matmul", [a, b])  # warm-up: allocator pools, lazy imports
            time.sleep(0.5)
            before = process.rss_bytes()
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.RCVBUF, 1 << 16)  # and a small receive buffer: the kernel holds little
            sock.setsockopt(zmq.RCVHWM, 1)
            sock.connect(process.endpoint)
            for _ in range(12):  # one at a time, as a client that reads nothing would send them
                sock.send_multipart([b"", *request], copy=False)
                time.sleep(0.3)
            reader.ping()  # served after every one of those: the server is done with them
            during = process.rss_bytes()
            codes = []
            while len(codes) < 12:  # now it reads
                assert sock.poll(30_000)
                header = msgpack.unpackb(sock.recv_multipart()[1])
                if isinstance(header, dict):  # not the notice that comes before a large reply
                    codes.append("ok" if header["ok"] else header["error"]["code"])
            sock.send_multipart([b"", *request], copy=False)  # and is served again
            replies = [msgpack.unpackb(sock.recv_multipart()[1]) for _ in range(2) if sock.poll(30_000)]
            assert replies and replies[-1]["ok"], replies
            sock.close(linger=0)
    growth_mib = (during - before) / 2**20
    print(f"\nnon-reader: 12 x 64 MiB replies asked, server RSS growth {growth_mib:+.0f} MiB; replies {codes}")
    assert codes[0] == "ok" and codes.count("unread_replies") >= 8, codes
    assert growth_mib < 400, f"{growth_mib:.0f} MiB"


def test_the_timeout_bounds_the_work_and_a_flood_on_one_connection_is_refused(tiny_dir):
    server, seen = _slow_server(tiny_dir, seconds=2.0)
    with ServerThread(server, api.free_endpoint()) as thread:
        with Client(thread.endpoint, timeout_s=1.2, retries=0, liveness=QUICK) as client:
            start = time.monotonic()  # the server keeps saying 'running': only the timeout ends the wait
            with pytest.raises(ServerUnreachable, match="no reply within 1.2 s"):
                linear(client, torch.randn(1, 2, 64))
            assert 1.2 <= time.monotonic() - start < 5
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(thread.endpoint)
        request = protocol.encode({"method": "Linear", "args": {"layer_idx": 0, "module_name": "q_proj"}},
                                  [torch.randn(1, 2, 64)])
        for _ in range(8):  # all at once, on one connection
            sock.send_multipart([b"", *request], copy=False)
        codes = []
        while len(codes) < 8 and sock.poll(30_000):
            header = msgpack.unpackb(sock.recv_multipart()[1])
            codes.append("ok" if header["ok"] else header["error"]["code"])
        sock.close(linger=0)
    assert sorted(codes) == ["busy"] * 4 + ["ok"] * 4, codes


def test_a_status_answer_that_comes_after_its_reply_is_not_taken_for_the_next_call():
    """The server may answer a status query after it has sent the reply (the query crossed the
    reply on the way): that 'unknown' belongs to the finished call, not to the next one."""
    endpoint = api.free_endpoint()
    ok = msgpack.packb({"ok": True, "tensors": []})
    bound = threading.Event()

    def serve() -> None:  # the socket lives and dies in this thread
        router = zmq.Context.instance().socket(zmq.ROUTER)
        router.bind(endpoint)
        bound.set()

        def receive() -> list[bytes] | None:
            return router.recv_multipart() if router.poll(10_000) else None

        try:
            first = receive()  # the first call: [identity, b"", header]
            query = receive()  # wait for its status query, then answer in the worst order
            if first is None or query is None:
                return
            router.send_multipart([*first[:2], ok])
            router.send_multipart([*query[:2], msgpack.packb(["unknown", msgpack.unpackb(query[2])[1]])])
            second = receive()
            if second is not None:
                router.send_multipart([*second[:2], ok])
        finally:
            router.close(linger=1000)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert bound.wait(10)
    with Client(endpoint, timeout_s=30, retries=0, liveness=QUICK) as client:
        assert client.call("Ping").header["ok"]
        time.sleep(0.2)  # the late answer is in the socket by now
        assert client.call("Ping").header["ok"] and client.stats.retries == 0
    thread.join(15)


def test_a_server_that_dies_mid_handshake_is_retried_not_taken_for_a_key_problem(tiny_dir):
    """One handshake cut short (a server exiting as the client connects) says nothing about the
    keys: the call is resent, and completes once a server is back on that address."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def die_mid_handshake():
        peer, _ = listener.accept()
        peer.sendall(b"\xff" + bytes(8) + b"\x01\x7f")  # the start of a ZMTP greeting, then gone
        time.sleep(0.05)
        peer.close()
        listener.close()

    threading.Thread(target=die_mid_handshake, daemon=True).start()
    endpoint = f"tcp://127.0.0.1:{port}"
    with Client(endpoint, connect_timeout_s=1.0, retries=3) as client:
        restart = threading.Timer(1.5, lambda: holder.append(ServerThread(GpuServer(tiny_dir, "cpu"), endpoint)))
        holder: list[ServerThread] = []
        restart.start()
        try:
            reply = client.call("Echo", [torch.arange(6.0)])
            assert torch.equal(reply.tensors[0], torch.arange(6.0))
            assert client.stats.retries >= 1
        finally:
            restart.join()
            for thread in holder:
                thread.stop()
