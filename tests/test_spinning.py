"""Spin-then-block waiting (tsqp.spinning): the budget's setting, and a serving loop that spins
between quick requests but never burns a core while its clients are quiet; and the rehearsal
that the loop runs after a long request."""

from __future__ import annotations

import math
import select
import socket
import threading
import time

import pytest
import torch
import zmq

from tsqp import api, cli, ops, protocol, router, spinning
from tsqp.config import ModelConfig
from tsqp.fastlink import FastLink
from tsqp.models import PRESETS
from tsqp.router import DEFAULT_HEARTBEAT_S, serve_forever
from tsqp.server import GpuServer
from tsqp.spinning import (CLIENT_SPIN_ENV, CLIENT_SPIN_US, FORMER_CLIENT_SPIN_ENV, MAX_SPIN_US, SERVER_SPIN_ENV,
                           SPIN_THROUGH_US, ReplyWait, spin, spin_budget)
from tsqp.tee.rehearsal import Rehearsal
from tsqp.tee.runner import TeeRunner
from tsqp.tee.steps import LeanSteps, Window, one_core_rows
from tsqp.transport import Client, _Link


@pytest.fixture(autouse=True)
def _no_server_thread_yet(monkeypatch):
    """The session's in-process servers (conftest's `servers`) would make every client here one
    of a process that serves, which never spins; these tests start the servers they need."""
    monkeypatch.setattr(spinning, "_serving", 0)


def test_the_budget_comes_from_the_environment_in_microseconds(monkeypatch):
    monkeypatch.delenv(SERVER_SPIN_ENV, raising=False)
    assert spin_budget(SERVER_SPIN_ENV, 1500) == pytest.approx(1.5e-3)
    monkeypatch.setenv(SERVER_SPIN_ENV, "250")
    assert spin_budget(SERVER_SPIN_ENV, 1500) == pytest.approx(2.5e-4)
    monkeypatch.setenv(SERVER_SPIN_ENV, "0")
    assert spin_budget(SERVER_SPIN_ENV, 1500) == 0
    for bad in ("soon", "-5", "inf", "nan", str(2 * MAX_SPIN_US)):
        monkeypatch.setenv(SERVER_SPIN_ENV, bad)
        with pytest.raises(ValueError, match=SERVER_SPIN_ENV):
            spin_budget(SERVER_SPIN_ENV, 1500)


@pytest.mark.parametrize("flag, variable", [(["--spin-us", "-1"], None), (["--spin-us", "inf"], None),
                                            ([], "soon"), ([], "-5")])
def test_serve_refuses_a_spin_that_is_no_budget_in_one_line_naming_its_source(flag, variable, monkeypatch,
                                                                                capsys, tmp_path):
    if variable is None:
        monkeypatch.delenv(SERVER_SPIN_ENV, raising=False)
    else:
        monkeypatch.setenv(SERVER_SPIN_ENV, variable)
    assert cli.main(["serve", "--model", str(tmp_path), *flag]) == 1  # refused before the model is looked at
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert ("--spin-us" if variable is None else f"${SERVER_SPIN_ENV}") in err[0], err


@pytest.mark.parametrize("command", ["prefill", "generate", "bench"])
def test_a_client_refuses_the_spins_former_variable_in_one_line_naming_the_new_one(command, tiny_dir, monkeypatch,
                                                                                   capsys):
    """Else a setting under the old name would be ignored in silence; the help names the new one."""
    monkeypatch.setenv(FORMER_CLIENT_SPIN_ENV, "0")
    target = ["--model", str(tiny_dir)] + (["--tokens", "4"] if command == "bench" else
                                           ["--endpoint", "tcp://127.0.0.1:1", "--tokens", "4"])
    if command == "generate":
        target += ["--max-new-tokens", "2"]
    assert cli.main([command, *target]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and FORMER_CLIENT_SPIN_ENV in err[0] and f"${CLIENT_SPIN_ENV}" in err[0], err
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert f"${CLIENT_SPIN_ENV}" in capsys.readouterr().out


def test_spin_returns_what_the_poll_found_or_nothing_at_the_deadline():
    polls = iter([[], [], ["ready"]])
    assert spin(lambda: next(polls), time.perf_counter() + 10) == ["ready"]
    start = time.perf_counter()
    assert spin(list, start + 0.02) == []
    assert 0.02 <= time.perf_counter() - start < 1


def test_a_spin_yields_its_core_between_polls(monkeypatch):
    """Another thread that wants the spinner's core (an OpenMP worker of a matmul) gets it at
    the next poll, not at the end of the spinner's time slice."""
    yields = []
    monkeypatch.setattr(spinning.os, "sched_yield", lambda: yields.append(1))
    polls = iter([[], [], [], ["ready"]])
    assert spin(lambda: next(polls), time.perf_counter() + 10) == ["ready"]
    assert len(yields) == 3


def test_a_spin_with_a_rehearsal_runs_it_on_its_period_instead_of_yielding(monkeypatch):
    """Given a rehearsal, a spin runs it once every REHEARSE_EVERY_US in place of a yield: at a
    period of 0, at every poll that finds nothing; at a period longer than the spin, never."""
    yields, rehearsals = [], []
    monkeypatch.setattr(spinning.os, "sched_yield", lambda: yields.append(1))
    monkeypatch.setattr(spinning, "REHEARSE_EVERY_US", 0.0)
    polls = iter([[], [], [], ["ready"]])
    assert spin(lambda: next(polls), time.perf_counter() + 10, lambda: rehearsals.append(1)) == ["ready"]
    assert len(rehearsals) == 3 and not yields
    monkeypatch.setattr(spinning, "REHEARSE_EVERY_US", 1e6)
    polls = iter([[], [], [], ["ready"]])
    assert spin(lambda: next(polls), time.perf_counter() + 10, lambda: rehearsals.append(1)) == ["ready"]
    assert len(rehearsals) == 3 and len(yields) == 3


def test_a_rehearsal_that_fails_ends_the_rehearsals_not_the_wait(monkeypatch):
    """A failing rehearsal (it only warms caches) is dropped for the rest of the wait, which
    goes on to its reply: the call it waits for must not be left half-done."""
    monkeypatch.setattr(spinning, "REHEARSE_EVERY_US", 0.0)
    rehearsals = []

    def failing():
        rehearsals.append(1)
        raise RuntimeError("no rehearsal today")
    polls = iter([[], [], [], ["ready"]])
    assert spin(lambda: next(polls), time.perf_counter() + 10, failing) == ["ready"]
    assert rehearsals == [1]


@pytest.mark.parametrize("wire", [torch.float32, torch.bfloat16])
def test_the_rehearsal_runs_the_tees_decode_code_on_its_own_tensors(wire):
    """A rehearsal of the 1B's shapes runs in the wire dtype (its reply decodes and passes the
    checks) and leaves everything as it was: its stand-in tensors and bytes, torch's threads and
    its random state, so that running it any number of times changes nothing of a generation's."""
    config = ModelConfig.from_dict({"model_type": "llama", **PRESETS["llama-3.2-1b"]})
    rehearsal = Rehearsal(config, wire)
    stand_ins = lambda: [rehearsal.h, rehearsal.norm, rehearsal.scores, rehearsal.factor]  # noqa: E731
    before, payloads = [t.clone() for t in stand_ins()], [bytes(p) for p in rehearsal.payloads]
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    for _ in range(3):
        rehearsal()
    assert all(torch.equal(a, b) for a, b in zip(before, stand_ins()))
    assert [bytes(p) for p in rehearsal.payloads] == payloads and rehearsal.shapes == [(1, 1, 2048), (1, 1, 8192)]
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), rng)


@pytest.mark.parametrize("shm, via", [(True, "fastlink"), (False, "zeromq")])
def test_a_client_spins_for_a_server_in_another_process_not_for_one_in_its_own(shm, via, tiny_dir, tmp_path,
                                                                               monkeypatch):
    """A server thread in the client's own process would wait for the interpreter lock that the
    client's spin holds, so that link never spins; a server process gets the default budget,
    on the fast link and on ZeroMQ alike, and the caller's mark for a call reaches the link."""
    monkeypatch.delenv(CLIENT_SPIN_ENV, raising=False)
    x = torch.randn(1, 1, 64)
    with api.start_server(tiny_dir, device="cpu", shm=shm) as here, Client(here.endpoint, shm=shm) as client:
        client.call("Linear", [x], layer_idx=0, module_name="q_proj")
        assert client.via == via and client._link.spin_s == 0 and client._link.spin_through_s == 0
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


@pytest.mark.parametrize("ping, batch, tokens, through", [
    ({"one_core_rows": 4}, 1, 1, True), ({"one_core_rows": 4}, 4, 1, True), ({"one_core_rows": 4}, 5, 1, False),
    ({"one_core_rows": 4}, 1, 7, False), ({"one_core_rows": 0}, 1, 1, False), ({}, 1, 1, False),
    ({"one_core_rows": 10 ** 9}, 1, 1, False), ({"one_core_rows": True}, 1, 1, False)])
def test_the_lean_runner_spins_through_the_passes_its_server_runs_on_one_core_only(ping, batch, tokens, through):
    """A pass of at most the Ping's `one_core_rows` rows (a decode step's) keeps the server to
    one core, so the client may spin through each reply; a prefill's products take every core,
    as may the Release after a pass. A server that says nothing, or nonsense, gets no spin."""
    client = type("Client", (), {"spin_through": False, "rehearse": None})()
    steps = LeanSteps(client, ModelConfig.from_dict({"model_type": "llama", **PRESETS["tiny"]}), torch.float32)
    steps.spin_rows = one_core_rows(ping)
    steps.open(batch, 16)
    steps.begin(Window(3 if tokens == 1 else 0, tokens))
    assert client.spin_through is through
    assert isinstance(client.rehearse, Rehearsal) if through else client.rehearse is None
    steps.end()
    assert client.spin_through is False and client.rehearse is None


def serving_cpu_s(endpoint: str, pause_s: float, monkeypatch, budget_us: float) -> float:
    """CPU seconds the serving thread used during `pause_s` of quiet after a burst of quick calls."""
    monkeypatch.setenv(SERVER_SPIN_ENV, str(budget_us))
    stop = threading.Event()
    thread = threading.Thread(target=serve_forever, args=(endpoint, lambda frames: protocol.encode({"ok": True}), stop),
                              kwargs={"fast": True}, daemon=True)
    thread.start()
    try:
        with Client(endpoint, shm=True, timeout_s=10) as client:
            for _ in range(20):
                client.call("Anything")
            clock = time.pthread_getcpuclockid(thread.ident)
            before = time.clock_gettime(clock)
            time.sleep(pause_s)
            return time.clock_gettime(clock) - before
    finally:
        stop.set()
        thread.join(5)


def test_the_serving_loop_spins_after_quick_requests_and_then_blocks(tmp_path, monkeypatch):
    """With a 200 ms budget, the loop spins through most of a 100 ms pause after quick calls (a
    decode's next call), and in a 1.5 s pause stops after one budget: it never keeps a core."""
    spun = serving_cpu_s(f"ipc://{tmp_path}/a.sock", 0.1, monkeypatch, 200_000)
    quiet = serving_cpu_s(f"ipc://{tmp_path}/b.sock", 1.5, monkeypatch, 200_000)
    off = serving_cpu_s(f"ipc://{tmp_path}/c.sock", 0.1, monkeypatch, 0)
    assert spun > 0.03, spun
    assert quiet < 0.6, quiet
    assert off < 0.02, off


class QuietServer:
    """The server's end of a client link that answers only when told to, and the link, set to
    the given budgets as its __init__ leaves it: a fast link (without the ticket) or ZeroMQ's."""

    def __init__(self, kind: str, tmp_path, spin_us: float, last_wait_s: float, through_us: float = 0.0):
        self.kind = kind
        if kind == "fastlink":
            ours, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            link = FastLink.__new__(FastLink)
            ReplyWait.__init__(link)
            link.sock, link.lost, link.queries = ours, False, 0
            link.poller = select.poll()
            link.poller.register(ours.fileno(), select.POLLIN)
        else:
            context, endpoint = zmq.Context.instance(), f"ipc://{tmp_path}/quiet.sock"
            self.sock = context.socket(zmq.ROUTER)
            self.sock.bind(endpoint)
            link = _Link(context, endpoint, None, DEFAULT_HEARTBEAT_S)
            while not link.connected:  # every monitor event read now, so that only a reply can end a wait
                link.poller.poll(100)
                link.read_events()
        link.spin_s, link.last_wait_s = spin_us * 1e-6, last_wait_s
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


def rehearsals_after(tmp_path, monkeypatch, calls) -> int:
    """Rehearsals the serving loop ran while `calls(endpoint)` made its requests; a `Slow`
    request takes 5 times the threshold (set to 50 ms, so that no quick call ever reaches it)."""
    monkeypatch.setattr(router, "REHEARSE_AFTER_S", 0.05)
    rehearsals = []

    def handle(frames):
        if protocol.decode_header(frames[0])["method"] == "Slow":
            time.sleep(0.25)
        return protocol.encode({"ok": True})

    endpoint, stop = f"ipc://{tmp_path}/s.sock", threading.Event()
    thread = threading.Thread(target=serve_forever, args=(endpoint, handle, stop),
                              kwargs={"fast": True, "rehearse": lambda: rehearsals.append(1)}, daemon=True)
    thread.start()
    try:
        calls(endpoint)
    finally:
        stop.set()
        thread.join(5)
    return len(rehearsals)


def test_the_serving_loop_rehearses_after_a_long_request_only(tmp_path, monkeypatch):
    def calls(endpoint):
        with Client(endpoint, shm=True, timeout_s=10) as client:
            for _ in range(5):
                client.call("Quick")
            client.call("Slow")
            time.sleep(0.2)  # the rehearsal follows the reply, when no request waits: send none yet

    assert rehearsals_after(tmp_path, monkeypatch, calls) == 1


def test_no_rehearsal_keeps_a_waiting_request_waiting(tmp_path, monkeypatch):
    """A request that came in during the long one is served at once, not after a rehearsal."""
    def calls(endpoint):
        with Client(endpoint, shm=True, timeout_s=10) as slow, Client(endpoint, shm=True, timeout_s=10) as other:
            other.call("Quick")  # its link is open before the long request starts
            behind = threading.Timer(0.1, other.call, ("Quick",))
            behind.start()
            slow.call("Slow")
            behind.join()

    assert rehearsals_after(tmp_path, monkeypatch, calls) == 0


def test_a_failed_rehearsal_is_not_tried_again_and_serving_goes_on(tmp_path, monkeypatch):
    def failing():
        raise RuntimeError("no rehearsal today")

    monkeypatch.setattr(router, "REHEARSE_AFTER_S", 0.0)
    endpoint, stop = f"ipc://{tmp_path}/f.sock", threading.Event()
    thread = threading.Thread(target=serve_forever, args=(endpoint, lambda frames: protocol.encode({"ok": True}), stop),
                              kwargs={"rehearse": failing}, daemon=True)
    thread.start()
    try:
        with Client(endpoint, timeout_s=10) as client:
            assert all(client.call("Quick").header["ok"] for _ in range(3))
    finally:
        stop.set()
        thread.join(5)


def test_a_rehearsal_runs_a_small_call_uncounted_on_the_cpu_only(tiny_dir, monkeypatch):
    server = GpuServer(tiny_dir)
    echoed = []
    echo = server.handlers["Echo"]
    monkeypatch.setitem(server.handlers, "Echo", lambda args, tensors: echoed.append(1) or echo(args, tensors))
    requests = server.service.requests
    server.rehearse()
    assert echoed == [1] and server.service.requests == requests and not server.service.errors
    monkeypatch.setattr(server, "device", torch.device("cuda"))  # weights in GPU memory: nothing to bring back
    server.rehearse()
    assert echoed == [1]


def test_a_generation_marks_its_decode_steps_spin_through_where_the_servers_ping_says_so(tiny_dir, monkeypatch):
    """The server's Ping gives `one_core_rows` from its probe (a tiny model's products are too
    small to choose: 0); a generation's lean steps take it, and only its decode steps' calls are
    marked. The server keeps its side of the Ping: a decode step's attention runs alone too, as
    long as its context grows (here every product counts as large). A pass that fails half-way
    leaves no mark behind."""
    marks, products = [], []  # the client's mark at each call; (query rows, threads) of each attention product
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the server's thread starts with it
    try:
        here = api.start_server(tiny_dir, device="cpu")
    finally:
        torch.set_num_threads(threads)
    matmul = ops.batched_matmul
    monkeypatch.setattr(ops, "SMALL_PRODUCT", 0)  # after the server's probe
    monkeypatch.setattr(ops, "batched_matmul",
                        lambda a, b: products.append((a.shape[-2], torch.get_num_threads())) or matmul(a, b))
    with here, Client(here.endpoint) as client:
        assert client.ping()["one_core_rows"] == here.server.rows_alone == 0
        here.server.rows_alone = ops.DECODE_ROWS  # as a probe on a large model would say here
        runner = TeeRunner(client, tiny_dir)
        call = client.call
        client.call = lambda *args, **kwargs: marks.append(client.spin_through) or call(*args, **kwargs)
        tokens = list(runner.generate(torch.randint(0, runner.config.vocab_size, (1, 9)), 3, ignore_eos=True))
    assert len(tokens) == 3 and runner.steps.spin_rows == ops.DECODE_ROWS
    calls_per_step = 2 * runner.config.num_layers + 1
    assert marks[-2 * calls_per_step - 1:] == [True] * (2 * calls_per_step) + [False]  # two decode steps, Release
    assert not any(marks[:-2 * calls_per_step - 1])  # the prefill (the Ping is not a client.call)
    groups = runner.config.num_heads // runner.config.num_kv_heads  # a decode step's query rows per key head
    assert {t for rows, t in products if rows == groups} == {1} and {t for rows, t in products if rows > groups} == {2}
    monkeypatch.undo()

    def failing_third(*args, **kwargs):  # of a decode step's calls
        marks.append(client.spin_through)
        if len(marks) == 3:
            raise ConnectionError("server lost mid-pass")
        return call(*args, **kwargs)

    with api.start_server(tiny_dir, device="cpu") as here, Client(here.endpoint) as client:
        runner = TeeRunner(client, tiny_dir)
        runner.steps.spin_rows = ops.DECODE_ROWS
        runner.steps.open(1, 8)
        runner.forward(torch.randint(0, runner.config.vocab_size, (1, 4)), 0)
        call, marks = client.call, []
        client.call = failing_third
        with pytest.raises(ConnectionError, match="mid-pass"):
            runner.forward(torch.randint(0, runner.config.vocab_size, (1, 1)), 4)
    assert marks == [True] * 3 and client.spin_through is False and client.rehearse is None


def test_a_generation_that_rehearses_while_it_spins_through_gives_the_same_logits(tiny_dir, tmp_path, monkeypatch):
    """Over a spawned server's fast link, with the decode steps spun through (as a probe on a
    large model would have the Ping say), the client rehearses while it waits, and every token
    and logit equals those of the same generation without (the server's own threads differ
    from an in-process one's, and with them the last bit: both runs here are spawned)."""
    from tsqp.tee import generate, rehearsal

    monkeypatch.delenv(CLIENT_SPIN_ENV, raising=False)
    prompt = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(5))
    endpoint = f"ipc://{tmp_path}/server.sock"

    def logits() -> torch.Tensor:
        with api.spawn_server(tiny_dir, device="cpu", endpoint=endpoint, shm=True), \
                Client(endpoint, shm=True, timeout_s=30) as client:
            run = TeeRunner(client, tiny_dir).generate(prompt, 6, ignore_eos=True, keep_logits=True)
            list(run)
            assert client.via == "fastlink" and client.rehearse is None
            return run.result.logits

    runs, call = [], rehearsal.Rehearsal.__call__
    monkeypatch.setattr(rehearsal.Rehearsal, "__call__", lambda self: runs.append(1) or call(self))
    expected = logits()
    assert not runs
    monkeypatch.setattr(generate, "one_core_rows", lambda ping: ops.DECODE_ROWS)
    monkeypatch.setattr(spinning, "REHEARSE_EVERY_US", 0.0)  # tiny calls are quick: rehearse at every poll
    got = logits()
    assert runs and torch.equal(got, expected)
