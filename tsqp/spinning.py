"""Spin, then block: how both ends wait for a peer that answers within microseconds.

A thread that blocks in poll() is woken by the kernel when its peer writes, and on this
project's 2-vCPU host that wake-up, and the cold caches it runs with after, cost more than a
small call's own work (docs/latency.md). Polling without blocking for a short budget first
keeps the waiting thread on its core. The budget is spent only while the previous wait ended
within it: a peer that takes longer (a big model's matmul, a long prefill's softmax) gets a
plain blocking wait and its core to itself. Between two polls the spinning thread yields, so a
thread that becomes runnable on its core (an OpenMP worker of either side's matmul) runs at
once instead of at the end of the spinner's time slice.

Yielding is not enough for a long wait on a peer whose threads use every core: the spinner
still takes a share of its core from them (docs/latency.md). A decode step's products run on
one core where that is as fast (tsqp.server.products), so the lean runner marks its
decode calls `spin_through`: the client spins through them however long they take, up to
SPIN_THROUGH_US, and the thread never blocks, to be woken late and with cold caches. While it
spins through, it also runs its own next code now and then on stand-in tensors
(tsqp.tee.rehearsal), which the call's weights would otherwise have pushed out of the caches.

A client waits so over either link, the fast link or ZeroMQ (ReplyWait). It never spins in a
process that also serves (`serving()`): the serving thread would wait for the interpreter lock.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from .environment import env

T = TypeVar("T")
log = logging.getLogger("tsqp.spinning")

SERVER_SPIN_ENV = "TSQP_SERVE_SPIN_US"  # the serving loop, between requests
CLIENT_SPIN_ENV = "TSQP_CLIENT_SPIN_US"  # a client, for its reply (fast link or ZeroMQ)
FORMER_CLIENT_SPIN_ENV = "TSQP_FASTLINK_SPIN_US"  # its name until the ZeroMQ client spun too
SERVER_SPIN_US = 2000.0
CLIENT_SPIN_US = 2000.0
# a client, for a call whose server leaves its core alone (a decode step's): longer than
# any 1B decode call on this project's CPU host (the LM head's, ~50 ms), short enough that a stalled
# server costs a quarter of a second of one core before the client blocks
SPIN_THROUGH_US = 250_000.0
# between two rehearsals in a spin through: short against a 1B call's milliseconds, so its
# weights cannot evict the code in between, long against a rehearsal, since a reply that
# arrives mid-rehearsal waits for its end (docs/latency.md)
REHEARSE_EVERY_US = 300.0
MAX_SPIN_US = 1e6  # a spin does not look at `stop` or deadlines: it must end soon
CLIENT_SPIN_EPILOG = (f"${CLIENT_SPIN_ENV} (microseconds a client polls for a quick reply before it blocks; "
                      f"default {CLIENT_SPIN_US:g}, 0: always block)")


def check_spin_us(value: float, name: str) -> float:
    """`value` µs as seconds, if it is a budget: finite, 0 (off) to MAX_SPIN_US."""
    if not (math.isfinite(value) and 0 <= value <= MAX_SPIN_US):
        raise ValueError(f"{name} must be 0 (off) to {MAX_SPIN_US:g} microseconds, got {value:g}")
    return value * 1e-6


def spin_budget(name: str, default_us: float) -> float:
    """The spin budget in seconds from the environment variable `name` (µs), else the default."""
    text = env(name)
    if text is None:
        return default_us * 1e-6
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"${name} must be a number of microseconds, got {text!r}") from None
    return check_spin_us(value, f"${name}")


def spin(poll: Callable[[], T], until: float, rehearse: Callable[[], object] | None = None) -> T:
    """poll() until it returns something true or time.perf_counter() reaches `until`, yielding
    the core between polls to any other thread that wants it; with `rehearse`, running that
    instead once every REHEARSE_EVERY_US (the waiting side's own next code, kept in its caches)."""
    rehearse_at = time.perf_counter() + REHEARSE_EVERY_US * 1e-6
    while True:
        ready = poll()
        now = time.perf_counter()
        if ready or now >= until:
            return ready
        if rehearse is not None and now >= rehearse_at:
            try:
                rehearse()
            except Exception:  # it only warms the caches: the wait, and its reply, must go on
                log.warning("a rehearsal failed; not rehearsing for the rest of this wait", exc_info=True)
                rehearse = None
            rehearse_at = time.perf_counter() + REHEARSE_EVERY_US * 1e-6
        else:
            os.sched_yield()


def client_spin_budget() -> float:
    """A client's spin budget in seconds, from $TSQP_CLIENT_SPIN_US: read when the Client is
    made (and by each command that calls a server, before its work), so that a bad value, or
    one under the former name, is refused before the first call."""
    if env(FORMER_CLIENT_SPIN_ENV) is not None:  # else a setting would be ignored in silence
        raise ValueError(f"${FORMER_CLIENT_SPIN_ENV} is now ${CLIENT_SPIN_ENV}: set that instead")
    return spin_budget(CLIENT_SPIN_ENV, CLIENT_SPIN_US)


_serving_loops = 0  # serving loops running in this process (tsqp.router)
_serving_lock = threading.Lock()


@contextmanager
def serving() -> Iterator[None]:
    """Marks this process as one that serves, for as long as a serving loop runs in it."""
    global _serving_loops
    with _serving_lock:
        _serving_loops += 1
    try:
        yield
    finally:
        with _serving_lock:
            _serving_loops -= 1


def _forget_serving_loops() -> None:
    """A forked child runs none of its parent's serving threads."""
    global _serving_loops, _serving_lock
    _serving_loops, _serving_lock = 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_serving_loops)


def serving_here() -> bool:
    """Whether a serving loop runs in this process now: its clients must not spin."""
    return _serving_loops > 0


class ReplyWait:
    """How a client's link waits for a reply on its `poller`: spins within the budget after the
    request left, while the last reply came within it, or through a call its caller marked
    `spin_through`, within the longer budget, rehearsing; then blocks. Never while this process
    serves (asked at each wait: a server thread may start or stop after the link is made): the
    serving thread would wait for the interpreter lock the spin holds."""

    poller: Any  # the link's: zmq.Poller or select.poll, whose poll(ms) lists what is ready

    def __init__(self, spin_s: float) -> None:
        self.spin_s = spin_s  # client_spin_budget(), read by the Client
        self.spin_through_s = SPIN_THROUGH_US * 1e-6 if spin_s > 0 else 0.0  # no spin at all stays none
        self.sent_at, self.last_wait_s = 0.0, math.inf
        self.spin_through = False  # the Client's, for the wait at hand
        self.rehearse: Callable[[], object] | None = None  # the Client's too: run now and then in a spin through

    def _sent(self) -> None:
        self.sent_at = time.perf_counter()

    def _answered(self) -> None:
        """A status answer counts too: it also says the reply is not quick."""
        self.last_wait_s = time.perf_counter() - self.sent_at

    def _waited(self, timeout_ms: float) -> list:
        """What the poller found within `timeout_ms`: spinning first where the rule allows,
        then blocking for the rest."""
        now = time.perf_counter()
        deadline = now + timeout_ms * 1e-3
        until = min(self.sent_at + (self.spin_through_s if self.spin_through else self.spin_s), deadline)
        if (self.spin_through or self.last_wait_s <= self.spin_s) and now < until and not serving_here():
            ready = spin(lambda: self.poller.poll(0), until, self.rehearse if self.spin_through else None)
            if ready:
                return ready
            timeout_ms = max(deadline - time.perf_counter(), 0.0) * 1e3
        return self.poller.poll(timeout_ms)
