"""How a client's link waits for its reply (tsqp.spinning.ReplyWait), on the fast link and on
ZeroMQ alike: it spins only after a quick reply, or through a call marked so, never past the
caller's timeout, and never while its own process serves."""

from __future__ import annotations

import math
import socket
import threading
import time

import pytest
import torch
import zmq

from tsqp import api, spinning
from tsqp.fastlink import FastLink
from tsqp.router import DEFAULT_HEARTBEAT_S
from tsqp.spinning import CLIENT_SPIN_ENV, CLIENT_SPIN_US, SPIN_THROUGH_US
from tsqp.transport import Client, _Link

pytestmark = pytest.mark.usefixtures("own_servers_only")


@pytest.mark.parametrize("shm, via", [(True, "fastlink"), (False, "zeromq")])
def test_a_client_spins_for_a_server_in_another_process_not_for_one_in_its_own(shm, via, tiny_dir, tmp_path,
                                                                               monkeypatch):
    """A server thread in the client's own process would wait for the interpreter lock that the
    client's spin holds, so that link never spins; a server process gets the default budget,
    on the fast link and on ZeroMQ alike, and the caller's mark for a call reaches the link."""
    monkeypatch.delenv(CLIENT_SPIN_ENV, raising=False)
    x = torch.randn(1, 1, 64)
    spins, spin = [], spinning.spin
    monkeypatch.setattr(spinning, "spin", lambda *args: spins.append(1) or spin(*args))
    with api.start_server(tiny_dir, device="cpu", shm=shm) as here, Client(here.endpoint, shm=shm) as client:
        for mark in (False, True, False):
            client.spin_through = mark
            client.call("Linear", [x], layer_idx=0, module_name="q_proj")
        assert client.via == via and not spins
    assert not spinning.serving_here()  # the server thread stopped: this process serves no more
    endpoint = f"ipc://{tmp_path}/server.sock"
    with api.spawn_server(tiny_dir, device="cpu", endpoint=endpoint, shm=shm), \
            Client(endpoint, shm=shm, timeout_s=30) as client:
        client.call("Linear", [x], layer_idx=0, module_name="q_proj")
        assert CLIENT_SPIN_US > 0 and client.via == via
        assert client._link.spin_s == pytest.approx(CLIENT_SPIN_US * 1e-6)
        assert client._link.spin_through_s == pytest.approx(SPIN_THROUGH_US * 1e-6)
        link, marks = client._link, []  # the link's mark at each of its waits
        poll = link.poll
        link.poll = lambda timeout_ms: marks.append(link.spin_through) or poll(timeout_ms)
        for mark in (True, False):
            client.spin_through = mark
            client.call("Linear", [x], layer_idx=0, module_name="q_proj")
            assert marks and set(marks) == {mark}, marks
            marks.clear()
    assert spins  # after the first, quick reply


class QuietServer:
    """The server's end of a client link that answers only when told to, and the link, with
    the given budgets and last wait: a fast link (without the ticket) or ZeroMQ's."""

    def __init__(self, kind: str, tmp_path, spin_us: float, last_wait_s: float, through_us: float = 0.0):
        self.kind = kind
        if kind == "fastlink":
            ours, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            link = FastLink(ours, spin_us * 1e-6)
        else:
            context, endpoint = zmq.Context.instance(), f"ipc://{tmp_path}/quiet.sock"
            self.sock = context.socket(zmq.ROUTER)
            self.sock.bind(endpoint)
            link = _Link(context, endpoint, None, DEFAULT_HEARTBEAT_S, spin_us * 1e-6)
            while not link.connected:  # every monitor event read now, so that only a reply can end a wait
                link.poller.poll(100)
                link.read_events()
        link.last_wait_s = last_wait_s
        link.spin_through_s, link.spin_through = through_us * 1e-6, through_us > 0
        self.link: FastLink | _Link = link
        self.sender: bytes | None = None

    def receive(self) -> bytes:
        if self.kind == "fastlink":
            return self.sock.recv(64)
        self.sender, _, body = self.sock.recv_multipart()
        return body

    def answer(self, body: bytes) -> None:
        if self.kind == "fastlink":
            self.sock.send(body)
        else:
            self.sock.send_multipart([self.sender, b"", body])

    def close(self) -> None:
        self.link.close()
        self.sock.close()


@pytest.mark.parametrize("kind", ["fastlink", "zeromq"])
@pytest.mark.parametrize("last_wait_s, timeout_ms, through_us, spins", [
    (1e-4, 1000, 0, True), (1.0, 1000, 0, False), (math.inf, 1000, 0, False), (1e-4, 30, 0, True),
    (1.0, 1000, 150_000, True), (math.inf, 30, 150_000, True), (math.inf, 1000, 150_000, True)])
def test_the_client_spins_for_its_reply_only_after_a_quick_one_and_never_past_the_wait(kind, last_wait_s, timeout_ms,
                                                                                     through_us, spins, tmp_path):
    """A 150 ms budget: spent in full after a quick reply, not at all after a slow one (or
    none yet), and never beyond the caller's own timeout (30 ms). A call marked `spin_through`
    (a decode step's) gets its own budget whatever the last wait was, in full; the short one
    is 2 ms there. Each poll's timeout is recorded: 0 while spinning, then the blocking rest."""
    server = QuietServer(kind, tmp_path, 2_000 if through_us else 150_000, last_wait_s, through_us)
    link = server.link
    rehearsals = []  # a spin through runs the caller's, now and then; no other spin does
    link.rehearse = lambda: rehearsals.append(1)
    timeouts = []  # of every poll the link makes: 0 while it spins (counted, not timed: a spin yields its core)
    poller = link.poller
    link.poller = type("Counting", (), {"poll": lambda self, ms: timeouts.append(ms) or poller.poll(ms)})()
    try:
        link.send([b"request"])
        wall = time.perf_counter()
        late_ms = (wall - link.sent_at) * 1e3  # the spin's budget runs from the send, the wait's from here
        assert link.poll(timeout_ms if timeout_ms < 1000 else 200) == (False, False)
        wall = time.perf_counter() - wall
        assert server.receive() == b"request"
        query_sent_at = link.sent_at
        link.query(b"status")
        assert link.sent_at == query_sent_at  # a status query is not the request the reply answers
    finally:
        server.close()
    spun = timeouts.count(0)
    if spins:
        assert spun > 10, timeouts[-3:]
        assert timeouts[-1] < 60 + late_ms, timeouts[-3:]  # 150 ms of a 200 ms wait spun (or all of a 30 ms one)
        assert wall < (0.4 if timeout_ms == 1000 else 0.1), wall  # the spin is part of the wait, not added to it
    else:
        assert spun == 0 and len(timeouts) == 1, timeouts
    if not through_us:
        assert not rehearsals
    elif timeout_ms == 1000:  # 150 ms of spin through, a rehearsal every 300 µs at most
        assert 10 < len(rehearsals) <= 150_000 / spinning.REHEARSE_EVERY_US, len(rehearsals)


@pytest.mark.parametrize("kind", ["fastlink", "zeromq"])
def test_a_reply_sets_the_last_wait_from_its_request_and_ends_the_spin_at_once(kind, tmp_path):
    """A reply that comes 50 ms into a 500 ms spin is found by the spin's own polls, and its
    wait, from the request's send to the receipt, is the last wait the next call's spin is
    judged by; a slow reply (300 ms, over a 200 ms budget) stops the next call's spin."""
    server = QuietServer(kind, tmp_path, 500_000, 1e-4)
    link, timeouts = server.link, []
    poller = link.poller
    link.poller = type("Counting", (), {"poll": lambda self, ms: timeouts.append(ms) or poller.poll(ms)})()
    try:
        for delay_s, budget_us in ((0.05, 500_000), (0.3, 200_000)):
            link.spin_s = budget_us * 1e-6
            link.send([b"request"])
            assert server.receive() == b"request"
            threading.Timer(delay_s, server.answer, (b"reply",)).start()
            timeouts.clear()
            assert link.poll(2000)[0]
            assert [bytes(frame) for frame in link.receive()] == [b"reply"]
            assert delay_s - 0.01 < link.last_wait_s < delay_s + 0.2, link.last_wait_s
            spun_all = set(timeouts) == {0}
            assert spun_all if delay_s < 0.1 else not spun_all, timeouts[-3:]  # the slow one blocked after 200 ms
        link.send([b"request"])
        assert server.receive() == b"request"
        timeouts.clear()
        assert link.poll(20) == (False, False)
        assert timeouts.count(0) == 0 and len(timeouts) == 1, timeouts  # no spin after the slow reply
    finally:
        server.close()

@pytest.mark.parametrize("kind", ["fastlink", "zeromq"])
def test_a_link_made_before_its_process_serves_does_not_spin_while_it_does(kind, tmp_path):
    """Whether the process serves is asked at each wait, not when the link was made: a server
    thread may start after it, or stop."""
    server = QuietServer(kind, tmp_path, 150_000, 1e-4)
    link, timeouts = server.link, []
    poller = link.poller
    link.poller = type("Counting", (), {"poll": lambda self, ms: timeouts.append(ms) or poller.poll(ms)})()
    try:
        for serves in (True, False):
            timeouts.clear()
            link.send([b"request"])
            assert server.receive() == b"request"
            if serves:
                with spinning.serving():
                    assert link.poll(20) == (False, False)
                assert timeouts == [pytest.approx(20, abs=5)], timeouts
            else:
                assert link.poll(20) == (False, False)
                assert timeouts.count(0) > 10, timeouts[-3:]
            link.last_wait_s = 1e-4  # as if the reply had come quickly
    finally:
        server.close()
