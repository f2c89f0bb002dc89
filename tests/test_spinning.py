"""Spin-then-block waiting (tsqp.spinning): the budget's setting, and a serving loop that spins
between quick requests but never burns a core while its clients are quiet; and the rehearsal
that the loop runs after a long request."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tsqp import api, cli, ops, protocol, router, spinning
from tsqp.config import ModelConfig
from tsqp.models import PRESETS
from tsqp.router import serve_forever
from tsqp.server import GpuServer
from tsqp.spinning import CLIENT_SPIN_ENV, FORMER_CLIENT_SPIN_ENV, MAX_SPIN_US, SERVER_SPIN_ENV, spin, spin_budget
from tsqp.tee.rehearsal import Rehearsal
from tsqp.tee.runner import TeeRunner
from tsqp.tee.steps import LeanSteps, Window, one_core_rows
from tsqp.transport import Client


pytestmark = pytest.mark.usefixtures("own_servers_only")


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


@pytest.mark.parametrize("variable, value", [(FORMER_CLIENT_SPIN_ENV, "0"), (CLIENT_SPIN_ENV, "soon"),
                                             (CLIENT_SPIN_ENV, "-5")])
@pytest.mark.parametrize("command", ["prefill", "generate", "bench", "demo"])
def test_a_client_command_refuses_a_bad_spin_in_one_line_before_its_work(command, variable, value, tiny_dir,
                                                                         monkeypatch, capsys):
    """A value that is no budget, or one under the former name (else ignored in silence), ends
    the command before it starts a server or loads a model, in one line naming the variable;
    the help names the variable too. A Client made with it is refused as it is made."""
    monkeypatch.delenv(FORMER_CLIENT_SPIN_ENV, raising=False)
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr(api, "spawn_server", lambda *args, **kwargs: pytest.fail("a server was started"))
    target = {"bench": ["--model", str(tiny_dir), "--tokens", "4"], "demo": [],
              "prefill": ["--model", str(tiny_dir), "--endpoint", "tcp://127.0.0.1:1", "--tokens", "4"]}
    target["generate"] = target["prefill"] + ["--max-new-tokens", "2"]
    assert cli.main([command, *target[command]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"${variable}" in err[0], err
    if variable == FORMER_CLIENT_SPIN_ENV:
        assert f"${CLIENT_SPIN_ENV}" in err[0], err
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert f"${CLIENT_SPIN_ENV}" in capsys.readouterr().out
    with pytest.raises(ValueError, match=variable):
        Client("tcp://127.0.0.1:1")


def test_a_process_is_marked_serving_before_its_server_is_ready_and_unmarked_when_the_loop_ends(tmp_path):
    """A client made as soon as an in-process server says it is ready must already see the
    mark (it must not spin), and a loop that fails leaves no mark behind."""
    seen = []

    def ready_then_fail():
        seen.append(spinning.serving_here())
        raise RuntimeError("the model did not load")

    with pytest.raises(RuntimeError, match="did not load"):
        serve_forever(f"ipc://{tmp_path}/s.sock", lambda frames: protocol.encode({"ok": True}), threading.Event(),
                      on_ready=ready_then_fail)
    assert seen == [True] and not spinning.serving_here()


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
