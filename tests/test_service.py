"""The server as a service: validation before work, lost peers, many clients, operations.

(CurveZMQ has its own file, test_curve.py; the fuzzer is test_fuzz.py.)
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time

import msgpack
import pytest
import torch
import zmq

from tsqp import api, protocol
from tsqp.errors import RemoteError, ServerUnreachable, TsqpError
from tsqp.server import InsecureBind, Limits, check_bind
from tsqp.transport import Client, is_loopback

from conftest import reference_logits, relative_error, run_cli

OK_REPLY = [msgpack.packb({"ok": True, "tensors": []})]


# -- validation before work ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_limits_server(tiny_dir):
    """A server with tight limits, so `too_large` is cheap to reach."""
    limits = Limits(max_elements=20_000, max_message_bytes=1 << 20)
    with api.start_server(tiny_dir, device="cpu", limits=limits) as server:
        yield server


def raw_call(endpoint: str, frames: list) -> dict:
    """Send hand-made frames on a REQ socket; the reply's header."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(10_000), "no reply"
        return protocol.decode(sock.recv_multipart()).header
    finally:
        sock.close(linger=0)


def header(method, args=None, tensors=()) -> bytes:
    return msgpack.packb({"method": method, "args": args or {}, "tensors": list(tensors)})


BAD_REQUESTS = [  # (frames, expected code, what the message names)
    ([header("Teleport")], "unknown_method", "Teleport"),
    ([header(7)], "unknown_method", "7"),
    ([msgpack.packb({"args": {}})], "unknown_method", "None"),
    ([header("Linear", {"module_name": "q_proj"}, [{"dtype": "float32", "shape": [1, 64]}]), bytes(256)],
     "bad_request", "layer_idx"),
    ([header("Linear", {"layer_idx": True, "module_name": "q_proj"}, [{"dtype": "float32", "shape": [1, 64]}]),
      bytes(256)], "bad_request", "int"),
    ([header("QKVScores", {"layer_idx": 0}, [{"dtype": "float32", "shape": [1, 1, 64]},
                                              {"dtype": "float32", "shape": [1, 16]},
                                              {"dtype": "float32", "shape": [1, 16]}]),
      bytes(256), bytes(64), bytes(64)], "bad_request", "session"),
    ([header("Embedding", {}, [{"dtype": "float32", "shape": [1, 2]}]), bytes(8)], "bad_request", "int64"),
    ([header("LMHead", {}, [{"dtype": "int64", "shape": [1, 64]}]), bytes(512)], "bad_request", "float"),
    ([header("LMHead", {}, [{"dtype": "complex64", "shape": [1]}]), bytes(8)], "bad_request", "complex64"),
    ([header("LMHead", {}, [{"dtype": "float32", "shape": [1, 64]}]), bytes(255)], "bad_request", "does not match"),
    ([header("LMHead", {}, [{"dtype": "float32", "shape": [1, -64]}]), bytes(256)], "bad_request", "shape"),
    ([header("LMHead", {}, [{"dtype": "float32", "shape": [1, 64]}])], "bad_request", "payload"),
    ([header("LMHead", {"wire_dtype": "int64"}, [{"dtype": "float32", "shape": [1, 64]}]), bytes(256)],
     "bad_request", "wire_dtype"),
    ([header("Matmul", {}, [{"dtype": "float32", "shape": [2, 3]}]), bytes(24)], "bad_request", "2 tensor"),
    ([header("Whole", {}, [{"dtype": "int64", "shape": [1, 10_000]}]), bytes(80_000)], "bad_request",
     "max_position_embeddings"),
    ([b"\xc1 not msgpack"], "bad_request", "msgpack"),
    ([msgpack.packb([1, 2])], "bad_request", "map"),
    ([header("Ping", {"session": "s" * 500})], "too_large", "session"),
    ([header("Ping", {"pad": "x" * 70_000})], "too_large", "header"),
    ([header("Ping"), *[b"x"] * 10], "too_large", "frames"),
    ([header("LMHead", {}, [{"dtype": "float32", "shape": [2 ** 40, 2 ** 40]}]), b""], "too_large", "elements"),
    ([header("LMHead", {}, [{"dtype": "float32", "shape": [1] * 9}]), bytes(4)], "too_large", "rank"),
    ([header("Matmul", {}, [{"dtype": "float32", "shape": [1, 4, 100, 16]}, {"dtype": "float32", "shape": [1, 4, 16, 100]}]),
      bytes(25_600), bytes(25_600)], "too_large", "would produce"),
    ([header("Matmul", {}, [{"dtype": "float32", "shape": [200, 1]}, {"dtype": "float32", "shape": [1, 200]}]),
      bytes(800), bytes(800)], "bad_request", "attention products"),
    ([header("LMHead", {}, [{"dtype": "float32", "shape": [100, 64]}]), bytes(25_600)], "too_large", "would produce"),
]


@pytest.mark.parametrize("frames, code, named", BAD_REQUESTS, ids=[f"{c}-{n}" for _, c, n in BAD_REQUESTS])
def test_bad_requests_get_a_code_and_a_message(small_limits_server, frames, code, named):
    reply = raw_call(small_limits_server.endpoint, frames)
    assert reply["ok"] is False and reply["error"]["code"] == code, reply
    assert named in reply["error"]["message"], reply


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_refused_before_the_model(servers, value):
    x = torch.randn(1, 3, 64)
    x[0, 1, 5] = value
    with Client(servers["gqa"].endpoint, timeout_s=10) as client:
        for method, args in (("Linear", {"layer_idx": 0, "module_name": "q_proj"}),
                             ("Gate", {"layer_idx": 1, "session": "s"}), ("LMHead", {})):
            with pytest.raises(RemoteError) as caught:
                client.call(method, [x], **args)
            assert caught.value.code == "non_finite"
        # large but finite values whose sum overflows are not refused
        big = torch.full((1, 3, 64), 3e38)
        assert client.call("Linear", [big], layer_idx=0, module_name="q_proj").tensors[0].shape == (1, 3, 64)


def test_a_non_finite_input_is_named_by_its_position(servers):
    """The server checks all inputs with one wait; a failure then names the tensor that has it."""
    hidden, cos, sin = torch.randn(1, 4, 64), torch.randn(4, 16), torch.randn(4, 16)
    sin[2, 3] = float("nan")
    with Client(servers["gqa"].endpoint, timeout_s=10) as client:
        with pytest.raises(RemoteError) as caught:
            client.call("QKVScores", [hidden, cos, sin], layer_idx=0, session="nan-test", blocks=[4])
    assert caught.value.code == "non_finite" and "input tensor 2" in str(caught.value)


def test_bad_requests_are_logged_as_such_and_never_as_success(small_limits_server, caplog):
    caplog.set_level(logging.DEBUG, logger="tsqp.server")
    with Client(small_limits_server.endpoint, timeout_s=10) as client:
        client.ping()
        with pytest.raises(RemoteError):
            client.call("Linear", [torch.randn(1, 2, 63)], layer_idx=0, module_name="q_proj")
        with pytest.raises(RemoteError):
            client.call("Nope")
        client.call("Linear", [torch.randn(1, 2, 64)], layer_idx=0, module_name="q_proj")
    time.sleep(0.2)
    events = [(r.levelno, r.getMessage(), getattr(r, "fields", {})) for r in caplog.records if r.name == "tsqp.server"]
    successes = [f["method"] for level, event, f in events if event == "request"]
    failures = [(level, f["code"], f["method"]) for level, event, f in events if event == "bad_request"]
    assert successes == ["Ping", "Linear"]
    assert failures == [(logging.WARNING, "bad_request", "Linear"), (logging.WARNING, "unknown_method", "?")]


def test_a_frame_over_the_message_limit_drops_only_its_sender(small_limits_server):
    with Client(small_limits_server.endpoint, timeout_s=600, retries=0) as client:
        start = time.monotonic()
        with pytest.raises(ServerUnreachable, match="connection was lost"):  # not "no reply within 600 s"
            client.call("LMHead", [torch.zeros(1, 5000, 64)])  # 1.3 MB > 1 MiB
        assert time.monotonic() - start < 60
        assert client.ping()["ok"]  # a new connection is served


def test_ping_reports_health(small_limits_server):
    with Client(small_limits_server.endpoint) as client:
        health = client.ping()
    assert health["ok"] and health["server"] == "tsqp" and health["num_layers"] == 2
    assert health["requests"] >= 1 and health["uptime_s"] > 0 and isinstance(health["errors"], dict)


# -- lost peers ------------------------------------------------------------------------------------


class FakeServer:
    """A ROUTER in a thread whose behaviour per request is scripted: 'reply', 'drop' (never answer)
    or 'close' (close the socket: to the client, the server died)."""

    def __init__(self, script: list[str]):
        self.endpoint = api.free_endpoint()
        self.script, self.received = list(script), 0
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.bind(self.endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self.script:
            if not self._sock.poll(10_000):
                break
            frames = self._sock.recv_multipart()
            self.received += 1
            action = self.script.pop(0)
            if action == "reply":
                self._sock.send_multipart([*frames[:2], *OK_REPLY])
            elif action == "close":
                self._sock.close(linger=0)
                return

    def join(self) -> None:
        self._thread.join(15)
        if not self._sock.closed:
            self._sock.close(linger=1000)  # let the last reply out


def test_a_lost_reply_is_resent_on_a_new_socket():
    fake = FakeServer(["drop", "reply"])
    with Client(fake.endpoint, timeout_s=0.5, retries=2) as client:
        reply = client.call("Ping")
        assert reply.header["ok"]
        assert client.stats.round_trips == 1 and client.stats.retries == 1
        sent = len(protocol.encode({"method": "Ping", "args": {}})[0])
        assert client.stats.bytes_sent == 2 * sent  # what crossed the socket, both sends
    fake.join()
    assert fake.received == 2


def test_a_server_gone_mid_call_is_noticed_at_once_despite_a_long_timeout():
    fake = FakeServer(["close"])
    with Client(fake.endpoint, timeout_s=600, retries=2, connect_timeout_s=1) as client:
        start = time.monotonic()
        with pytest.raises(ServerUnreachable, match="after 3 attempts") as caught:
            client.call("Linear", [torch.zeros(2, 2)])
        assert time.monotonic() - start < 60  # 1 lost + 2 failed reconnects of 1 s, never 600 s
    assert "connection was lost" in str(caught.value) or "could not connect" in str(caught.value)


FAKE_PROCESS = textwrap.dedent("""
    import sys, time, zmq
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(sys.argv[1])
    print("ready", flush=True)
    frames = sock.recv_multipart()
    time.sleep(float(sys.argv[2]))  # busy: the I/O thread still answers heartbeats
    sock.send_multipart([*frames[:2], sys.argv[3].encode("latin-1")])
    time.sleep(60)
""")


def fake_process(tmp_path, busy_s: float) -> tuple[subprocess.Popen, str]:
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_PROCESS)
    endpoint = api.free_endpoint()
    reply = msgpack.packb({"ok": True, "tensors": []}).decode("latin-1")
    proc = subprocess.Popen([sys.executable, str(script), endpoint, str(busy_s), reply], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc, endpoint


def test_heartbeats_keep_a_long_call_alive_and_catch_a_frozen_server(tmp_path):
    busy, endpoint = fake_process(tmp_path, busy_s=4.0)
    try:  # 4 s of silence > the 2.5 s heartbeat timeout: still one call, no retry
        with Client(endpoint, timeout_s=30, heartbeat_s=0.5, retries=0) as client:
            assert client.call("Ping").header["ok"] and client.stats.retries == 0
    finally:
        busy.kill()
    frozen, endpoint = fake_process(tmp_path, busy_s=600)
    try:
        with Client(endpoint, timeout_s=600, heartbeat_s=0.2, retries=0) as client:
            client.connect_timeout_s = 30
            client._ready_link()
            time.sleep(0.5)
            frozen.send_signal(signal.SIGSTOP)  # no FIN, no heartbeats: a host that vanished
            start = time.monotonic()
            with pytest.raises(ServerUnreachable, match="connection was lost"):  # not "no reply within 600 s"
                client.call("Ping")
            assert time.monotonic() - start < 60
    finally:
        frozen.send_signal(signal.SIGCONT)
        frozen.kill()


def test_server_restarted_mid_prefill(tiny_dir, references):
    """SIGKILL the server in the middle of a prefill, start another on the same endpoint: every
    prefill completes with exact logits or fails with a clear TsqpError; nothing hangs."""
    endpoint = api.free_endpoint()
    first = api.spawn_server(tiny_dir, device="cpu", endpoint=endpoint)
    second = None
    try:
        runner = api.connect(endpoint, tiny_dir, timeout_s=60, connect_timeout_s=30, retries=3)
        ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(5))
        expected = reference_logits(references["gqa"], ids)[:, -1:]
        calls_per_prefill = 4 * runner.config.num_layers + 2
        kill_at = calls_per_prefill + 3  # the 2nd prefill's first AttnOut: its V is on the server that dies
        calls, at_kill, killed = 0, threading.Event(), threading.Event()
        original = runner.client.call

        def call(method, *args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == kill_at:
                at_kill.set()
                killed.wait(60)
            return original(method, *args, **kwargs)

        runner.client.call = call
        outcomes: list = []

        def work() -> None:
            for _ in range(4):
                try:
                    outcomes.append(runner.prefill(ids).logits)
                except TsqpError as err:
                    outcomes.append(err)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        assert at_kill.wait(60)
        first.kill()
        killed.set()
        second = api.spawn_server(tiny_dir, device="cpu", endpoint=endpoint)
        worker.join(120)
        assert not worker.is_alive(), "a prefill hung"
        assert len(outcomes) == 4
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, Exception):  # only the prefill that straddled the restart may fail, clearly
                assert i == 1 and isinstance(outcome, TsqpError) and str(outcome), outcome
            else:
                assert relative_error(outcome, expected) <= 1e-4, f"prefill {i}"
        runner.client.close()
    finally:
        first.kill()
        if second is not None:
            second.stop()


def test_unreachable_server_is_a_clear_error_within_the_connect_timeout(tiny_dir):
    start = time.monotonic()
    with pytest.raises(ServerUnreachable, match="no reply from GPU server .* could not connect within 1 s"):
        api.connect(api.free_endpoint(), tiny_dir, connect_timeout_s=1)
    assert time.monotonic() - start < 30  # not the 600 s reply timeout


# -- many clients ------------------------------------------------------------------------------------


def test_four_concurrent_clients_each_get_their_own_exact_logits(servers, model_dirs, references):
    endpoint, barrier = servers["gqa"].endpoint, threading.Barrier(4)
    results: dict[int, list] = {}

    def client(i: int) -> None:
        runner = api.connect(endpoint, model_dirs["gqa"], protocol="lean" if i % 2 == 0 else "seed", timeout_s=60)
        g = torch.Generator().manual_seed(100 + i)
        runs = []
        barrier.wait(30)
        for _ in range(3):
            ids = torch.randint(0, 512, (1 + i % 2, int(torch.randint(8, 40, (1,), generator=g))), generator=g)
            runs.append((ids, runner.prefill(ids, all_positions=True).logits))
        runner.client.close()
        results[i] = runs

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2, 3], "a client failed or hung"
    for i, runs in results.items():
        for ids, logits in runs:
            assert logits.shape == (ids.shape[0], ids.shape[1], 512)
            assert relative_error(logits, reference_logits(references["gqa"], ids)) <= 1e-4, f"client {i}"


# -- operations -------------------------------------------------------------------------------------


def test_loopback_detection():
    for endpoint in ("tcp://127.0.0.1:5", "tcp://127.1.2.3:5", "tcp://localhost:5", "tcp://[::1]:5", "ipc:///tmp/x"):
        assert is_loopback(endpoint), endpoint
    for endpoint in ("tcp://0.0.0.0:5", "tcp://*:5", "tcp://10.0.0.2:5", "tcp://eth0:5", "tcp://gpu-host:5"):
        assert not is_loopback(endpoint), endpoint


def test_bind_policy_plaintext_stays_on_loopback_unless_insecure(caplog):
    check_bind("tcp://127.0.0.1:5", None, insecure=False)
    with pytest.raises(InsecureBind, match="--insecure"):
        check_bind("tcp://0.0.0.0:5", None, insecure=False)
    check_bind("tcp://0.0.0.0:5", None, insecure=True)
    assert [r.getMessage() for r in caplog.records] == ["insecure_bind"]


def test_serve_refuses_a_network_interface_in_plaintext(tiny_dir):
    result = run_cli("serve", "--model", str(tiny_dir), "--device", "cpu", "--host", "0.0.0.0", "--port", "50999")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: refusing to serve tcp://0.0.0.0:50999 in plaintext") and "--insecure" in last
    assert "Loading model" not in result.stdout  # refused before any work


def test_structured_logs_and_graceful_shutdown_on_sigterm(tiny_dir):
    server = api.spawn_server(tiny_dir, device="cpu", log_level="DEBUG")
    with Client(server.endpoint, timeout_s=10) as client:
        client.ping()
        with pytest.raises(RemoteError):
            client.call("Nope")
    server.stop()
    assert server.process.returncode == 0
    lines = server.output().splitlines()
    events = {line.split(" event=")[1].split(" ")[0]: line for line in lines if " event=" in line}
    assert {"start", "request", "bad_request", "stopping", "stop"} <= events.keys(), lines
    assert "level=warning" in events["bad_request"] and "code=unknown_method" in events["bad_request"]
    assert "signal=SIGTERM" in events["stopping"] and "requests=" in events["stop"]
    assert "server stopped" in lines[-1]


def test_a_spawned_server_stops_when_the_process_that_started_it_is_killed(tiny_dir):
    """SIGKILL runs no cleanup, so only the server itself can notice that its parent is gone."""
    script = textwrap.dedent(f"""
        import sys, time
        from tsqp import api
        server = api.spawn_server({str(tiny_dir)!r}, device="cpu")
        print(server.pid, server.endpoint, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid, endpoint = parent.stdout.readline().split()
        with Client(endpoint, timeout_s=10) as client:
            client.ping()
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(int(pid)):
        time.sleep(0.2)
    assert not _alive(int(pid)), "the orphaned server is still running"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in status)
    except FileNotFoundError:
        return False


def test_soak_200_prefills_server_memory_growth(tiny_dir, capsys):
    """200 prefills in a row against a server process: nothing a prefill leaves may accumulate.
    The session store is checked exactly; resident memory, which allocators move by a few MB
    as they please, only against a generous bound."""
    with api.spawn_server(tiny_dir, device="cpu") as server:
        runner = api.connect(server.endpoint, tiny_dir, timeout_s=60)
        g = torch.Generator().manual_seed(9)
        for _ in range(10):  # warm-up: allocator pools, lazy imports
            runner.prefill(torch.randint(0, 512, (1, 32), generator=g))
        before = server.rss_bytes()
        start = time.monotonic()
        for i in range(200):
            runner.prefill(torch.randint(0, 512, (1, 16 + i % 32), generator=g))
        seconds = time.monotonic() - start
        after = server.rss_bytes()
        health = runner.client.ping()
        runner.client.close()
    assert (health["sessions"], health["session_bytes"]) == (0, 0)
    assert before and after
    growth_mb = (after - before) / 2 ** 20
    with capsys.disabled():
        print(f"\nsoak: 200 prefills in {seconds:.1f} s; server RSS {before / 2 ** 20:.1f} MB -> "
              f"{after / 2 ** 20:.1f} MB (growth {growth_mb:+.1f} MB)")
    assert growth_mb < 100  # coarse: leaked V or up would be a few MB here, which the session check catches
