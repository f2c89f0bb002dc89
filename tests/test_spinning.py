"""Spin-then-block waiting (tsqp.spinning): the budget's setting, and a serving loop that spins
between quick requests but never burns a core while its clients are quiet."""

from __future__ import annotations

import threading
import time

import pytest

from tsqp import protocol
from tsqp.router import serve_forever
from tsqp.spinning import SERVER_SPIN_ENV, spin, spin_budget
from tsqp.transport import Client


def test_the_budget_comes_from_the_environment_in_microseconds(monkeypatch):
    monkeypatch.delenv(SERVER_SPIN_ENV, raising=False)
    assert spin_budget(SERVER_SPIN_ENV, 1500) == pytest.approx(1.5e-3)
    monkeypatch.setenv(SERVER_SPIN_ENV, "250")
    assert spin_budget(SERVER_SPIN_ENV, 1500) == pytest.approx(2.5e-4)
    monkeypatch.setenv(SERVER_SPIN_ENV, "0")
    assert spin_budget(SERVER_SPIN_ENV, 1500) == 0
    monkeypatch.setenv(SERVER_SPIN_ENV, "soon")
    with pytest.raises(ValueError, match=SERVER_SPIN_ENV):
        spin_budget(SERVER_SPIN_ENV, 1500)


def test_spin_returns_what_the_poll_found_or_nothing_at_the_deadline():
    polls = iter([[], [], ["ready"]])
    assert spin(lambda: next(polls), time.perf_counter() + 10) == ["ready"]
    start = time.perf_counter()
    assert spin(list, start + 0.02) == []
    assert 0.02 <= time.perf_counter() - start < 1


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
