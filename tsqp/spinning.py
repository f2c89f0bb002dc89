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
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable, TypeVar

from .environment import env

T = TypeVar("T")
log = logging.getLogger("tsqp.spinning")

SERVER_SPIN_ENV = "TSQP_SERVE_SPIN_US"  # the serving loop, between requests
CLIENT_SPIN_ENV = "TSQP_FASTLINK_SPIN_US"  # a fast-link client, for its reply
SERVER_SPIN_US = 2000.0
CLIENT_SPIN_US = 2000.0
# a fast-link client, for a call whose server leaves its core alone (a decode step's): longer than
# any 1B decode call on this project's CPU host (the LM head's, ~50 ms), short enough that a stalled
# server costs a quarter of a second of one core before the client blocks
SPIN_THROUGH_US = 250_000.0
# between two rehearsals in a spin through: short against a 1B call's milliseconds, so its
# weights cannot evict the code in between, long against a rehearsal, since a reply that
# arrives mid-rehearsal waits for its end (docs/latency.md)
REHEARSE_EVERY_US = 300.0
MAX_SPIN_US = 1e6  # a spin does not look at `stop` or deadlines: it must end soon


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
