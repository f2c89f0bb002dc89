"""The same-host fast link (tsqp.fastlink): exact, survives lost and restarted servers, resends and
malformed input, and gives nothing to a local process without a ticket."""

from __future__ import annotations

import signal
import socket
import threading
import time

import msgpack
import pytest
import torch
import zmq

from tsqp import api, protocol
from tsqp.errors import RemoteError, ServerUnreachable
from tsqp.fastlink import ACCEPTED, MAX_DATAGRAM, MAX_PEERS, TOKEN_BYTES, TOKEN_WAIT_S, read_ticket, ticket_query
from tsqp.router import serve_forever
from tsqp.server import GpuServer, ServerThread
from tsqp.transport import Client, Liveness

QUICK = Liveness(interval_s=0.3, timeout_s=1.0)


@pytest.fixture(scope="module")
def fast_server(tiny_dir):
    with api.start_server(tiny_dir, device="cpu", shm=True) as server:
        yield server


def q_proj(references, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return references["gqa"].model.layers[0].self_attn.q_proj(x)


def ticket(endpoint: str) -> tuple[str, bytes]:
    """What a client is given when it asks on the ZeroMQ socket."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"", ticket_query(7)])
        assert sock.poll(10_000)
        issued = read_ticket(msgpack.unpackb(sock.recv_multipart()[1]), 7)
    finally:
        sock.close(linger=0)
    assert issued is not None
    return issued


def raw_link(issued: tuple[str, bytes], expect_accepted: bool = True) -> socket.socket:
    """A link opened by hand with the ticket `issued`; the server's acceptance read (if expected)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(issued[0])
    sock.send(issued[1])
    if expect_accepted:
        assert sock.recv(16) == ACCEPTED
    return sock


def refused(sock: socket.socket, datagram: bytes) -> bool:
    """Whether the server closes the link rather than answer `datagram` on it."""
    try:
        sock.send(datagram)
        return sock.recv(1 << 16) == b""
    except (BrokenPipeError, ConnectionResetError):
        return True


def test_calls_over_the_fast_link_are_exact_and_counted(fast_server, references):
    g = torch.Generator().manual_seed(4)
    with Client(fast_server.endpoint, timeout_s=30, shm=True) as fast, \
            Client(fast_server.endpoint, timeout_s=30) as framed:
        for n in (1, 3, 17):
            x = torch.randn(2, n, 64, generator=g)
            (got,) = fast.call("Linear", [x], layer_idx=0, module_name="q_proj").tensors
            (plain,) = framed.call("Linear", [x], layer_idx=0, module_name="q_proj").tensors
            # bit-equality is not promised: BLAS may sum in another order for a differently aligned input
            torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(got, q_proj(references, x), rtol=1e-5, atol=1e-6)
        assert fast.stats.round_trips == 3 and fast.stats.retries == 0
        assert fast.via == "fastlink" and framed.via == "zeromq"


def test_a_reply_larger_than_the_segment_is_resent_once_into_a_grown_one(fast_server):
    """The link carries headers only: a reply that does not fit comes back as `reply_room`, and the
    client grows its segment and asks again; the next such call fits at once."""
    payload = torch.randn(3 << 20)  # 12 MiB: more than a fresh segment's spare room behind it
    with Client(fast_server.endpoint, timeout_s=30, shm=True) as client:
        client.ping()
        (echoed,) = client.call("Echo", [payload]).tensors
        assert torch.equal(echoed, payload) and client.stats.round_trips == 3  # ping, refused, resent
        (again,) = client.call("Echo", [payload * 2]).tensors
        assert torch.equal(again, payload * 2) and client.stats.round_trips == 4


def test_a_server_killed_mid_call_is_noticed_at_once_and_a_restarted_one_found_again(tiny_dir, tmp_path):
    """The socket closes with the process: a call in flight fails at once (no status queries
    needed), one made after the kill is never sent into the dead link, and the restarted server's
    new link gives the same answer."""
    endpoint = f"ipc://{tmp_path}/server.sock"
    x = torch.randn(1, 4, 64)
    with Client(endpoint, timeout_s=30, shm=True, retries=0, connect_timeout_s=1) as client:
        with api.spawn_server(tiny_dir, device="cpu", endpoint=endpoint, shm=True) as first:
            (before,) = client.call("Linear", [x], layer_idx=1, module_name="o_proj").tensors
            assert client.via == "fastlink"
            killer = threading.Timer(0.2, first.process.send_signal, (signal.SIGKILL,))
            killer.start()
            start = time.monotonic()
            with pytest.raises(ServerUnreachable, match="connection was lost"):  # 256 x 500 greedy steps: seconds
                client.call("WholeDecode", [torch.randint(0, 256, (256, 4))], steps=500)
            assert time.monotonic() - start < 3.0
            killer.join()
            first.process.wait(10)
            with pytest.raises(ServerUnreachable, match="could not connect"):
                client.call("Linear", [x], layer_idx=1, module_name="o_proj")
        with api.spawn_server(tiny_dir, device="cpu", endpoint=endpoint, shm=True):
            (after,) = client.call("Linear", [x], layer_idx=1, module_name="o_proj").tensors
            assert torch.equal(before, after) and client.via == "fastlink"


def test_a_slow_server_is_waited_for(tiny_dir):
    """Status queries travel on the link: a long call is answered 'pending' meanwhile, so it is not
    taken for a lost one (a frozen server: tests/test_transport.py)."""
    server = GpuServer(tiny_dir, "cpu", shm=True)
    real = server.handle

    def slow(frames):
        if protocol.decode_header(frames[0]).get("method") == "Linear":
            time.sleep(2.0)  # longer than the silence QUICK allows
        return real(frames)

    server.handle = slow
    x = torch.randn(1, 2, 64)
    with ServerThread(server, api.free_endpoint()) as thread:
        with Client(thread.endpoint, timeout_s=60, retries=0, shm=True, liveness=QUICK) as client:
            client.call("Linear", [x], layer_idx=0, module_name="k_proj")
            assert client.stats.retries == 0 and client.via == "fastlink"


def test_no_ticket_no_link_and_a_ticket_serves_once(fast_server):
    issued = ticket(fast_server.endpoint)
    ping = protocol.encode({"method": "Ping", "args": {}})[0]
    assert refused(raw_link((issued[0], bytes(TOKEN_BYTES)), expect_accepted=False), ping)  # the token is the secret
    holder = raw_link(issued)
    holder.send(ping)
    assert msgpack.unpackb(holder.recv(1 << 16))["ok"]
    assert refused(raw_link(issued, expect_accepted=False), ping)  # the same ticket again
    holder.close()


@pytest.mark.parametrize("datagram", [b"\x00", b"\x92\xa6status", msgpack.packb({"method": "Linear", "args": 3}),
                                      msgpack.packb({"method": "Nope"}), b"\xc1" * 70_000, b"\xc1" * 120_000],
                         ids=["garbage", "bad-status", "bad-args", "unknown", "too-large", "truncated"])
def test_malformed_datagrams_get_an_error_or_a_closed_link_and_the_server_serves_on(fast_server, datagram):
    link = raw_link(ticket(fast_server.endpoint))
    link.send(datagram)
    try:
        answer = link.recv(1 << 16)
    except ConnectionResetError:
        answer = b""
    if answer:
        reply = msgpack.unpackb(answer)
        assert reply["ok"] is False and reply["error"]["code"] in ("bad_request", "unknown_method", "too_large"), reply
    else:
        assert len(datagram) > MAX_DATAGRAM  # only a datagram it cannot read whole closes the link
    link.close()
    with Client(fast_server.endpoint, timeout_s=10, shm=True) as client:
        assert client.ping()["ok"] and client.via == "fastlink"


def test_a_peer_that_never_reads_is_dropped_and_others_are_served(fast_server):
    link = raw_link(ticket(fast_server.endpoint))
    link.setblocking(False)
    ping = protocol.encode({"method": "Ping", "args": {}})[0]
    sent = 0
    for _ in range(20_000):  # replies pile up in its socket until the server gives up on it
        try:
            link.send(ping)
            sent += 1
        except BlockingIOError:
            time.sleep(0.001)
        except (BrokenPipeError, ConnectionResetError):
            break
    else:
        pytest.fail(f"the server kept a peer that read none of {sent} replies")
    with Client(fast_server.endpoint, timeout_s=10, shm=True) as client:
        assert client.ping()["ok"]


def test_a_client_may_keep_to_zeromq_and_a_server_without_shm_offers_no_link(tiny_dir, fast_server):
    with Client(fast_server.endpoint, timeout_s=10, shm=True, fastlink=False) as client:
        assert client.ping()["ok"] and client.via == "zeromq"
    with api.start_server(tiny_dir, device="cpu") as plain:
        with Client(plain.endpoint, timeout_s=10, shm=True) as client:
            with pytest.raises(RemoteError, match="--shm"):  # the call itself is refused, on ZeroMQ
                client.ping()
            assert client.via == "zeromq"


def test_a_remote_error_travels_back_on_the_link(fast_server):
    with Client(fast_server.endpoint, timeout_s=10, shm=True) as client:
        with pytest.raises(RemoteError) as caught:
            client.call("Linear", [torch.randn(1, 2, 63)], layer_idx=0, module_name="q_proj")
        assert caught.value.code == "bad_request" and client.via == "fastlink"


def test_a_ticket_answered_late_never_passes_for_a_calls_reply(tmp_path):
    """A server that binds, then takes longer to be ready than the client waits for its ticket:
    the ticket's late answer must not be taken for a call's reply, and every reply must be its
    own call's (each names the method it answers)."""
    def handle(frames):
        return protocol.encode({"ok": True, "method": protocol.decode_header(frames[0]).get("method")})

    stop, endpoint = threading.Event(), f"ipc://{tmp_path}/slow.sock"
    thread = threading.Thread(target=serve_forever, args=(endpoint, handle, stop, lambda: time.sleep(2.5)),
                              kwargs={"fast": True}, daemon=True)
    thread.start()
    try:
        with Client(endpoint, shm=True, retries=0, timeout_s=30, connect_timeout_s=1) as client:
            answered = []
            for method in ("A", "B", "C", "D", "E"):
                try:
                    answered.append((method, client.call(method).header["method"]))
                except ServerUnreachable:
                    pass
            assert answered and all(asked == got for asked, got in answered), answered
            assert client.via == "fastlink"
    finally:
        stop.set()
        thread.join(5)


def test_a_full_or_refusing_link_leaves_the_client_on_zeromq_and_silent_peers_are_dropped(fast_server):
    """Connections that never show a token fill the server's table; a client refused for that
    works on ZeroMQ instead of failing, and after TOKEN_WAIT_S the silent ones are gone."""
    path, _ = ticket(fast_server.endpoint)
    squatters = []
    for _ in range(MAX_PEERS + 4):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        squatters.append(sock)
    try:
        time.sleep(0.5)  # the serving loop accepts them
        with Client(fast_server.endpoint, timeout_s=10, shm=True) as client:
            assert client.ping()["ok"] and client.via == "zeromq"
        time.sleep(TOKEN_WAIT_S + 0.5)
        with Client(fast_server.endpoint, timeout_s=10, shm=True) as client:
            assert client.ping()["ok"] and client.via == "fastlink"
    finally:
        for sock in squatters:
            sock.close()


@pytest.mark.parametrize("flags, carrier", [((), "shared memory and the fast link"),
                                            (("--no-fastlink",), "shared memory)")])
def test_generate_reports_what_its_calls_travelled_on(fast_server, tiny_dir, flags, carrier):
    from conftest import run_cli

    result = run_cli("generate", "--model", str(tiny_dir), "--endpoint", fast_server.endpoint, "--tokens", "6",
                     "--max-new-tokens", "3", "--ignore-eos", "--shm", *flags)
    assert result.returncode == 0, result.stderr
    protocol_line = next(line for line in result.stdout.splitlines() if line.startswith("Protocol:"))
    assert carrier in protocol_line


@pytest.mark.parametrize("protection", ["none", "private"])
def test_a_long_prefill_over_the_fast_link_computes_every_call_once(tiny_dir, references, protection):
    """The runner tells the client how large each reply will be, so its segment is grown before
    a call, not after: no reply comes back as `reply_room`, no call is computed twice."""
    from conftest import reference_logits, relative_error
    from tsqp.tee.runner import TeeRunner

    server = GpuServer(tiny_dir, "cpu", shm=True)
    handled: list[tuple] = []
    serve = server.handle

    def counting(frames):
        header = protocol.decode_header(frames[0])
        args = header.get("args", {})
        handled.append((header.get("method"), args.get("layer_idx"), str(args.get("modules"))))
        return serve(frames)

    server.handle = counting
    ids = torch.randint(0, 512, (1, 500), generator=torch.Generator().manual_seed(5))  # 2.3 MB of scores
    with ServerThread(server, api.free_endpoint()) as thread:
        runner = TeeRunner(Client(thread.endpoint, timeout_s=60, shm=True), tiny_dir, protection=protection)
        handled.clear()
        result = runner.prefill(ids)
        assert runner.client.via == "fastlink" and result.wire.round_trips == len(handled)
        assert len(set(handled)) == len(handled), [call for call in handled if handled.count(call) > 1]
        tolerance = 1e-3 if protection == "private" else 1e-4
        assert relative_error(result.logits, reference_logits(references["gqa"], ids)[:, -1:]) <= tolerance
        runner.client.close()
