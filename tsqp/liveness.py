"""Waiting for one call's reply on a link (ZeroMQ or the fast link) without mistaking a slow
server for a lost one, or a lost one for a slow one: the call's deadlines, and the status
queries the client asks while a reply is late (tsqp.router answers them)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import msgpack

from .fastlink import TICKET_QUERY
from .router import status_query

if TYPE_CHECKING:
    from .fastlink import FastLink
    from .transport import _Link

DEFAULT_STATUS_INTERVAL_S = 1.0  # without a reply for this long, ask whether the request is still in progress
DEFAULT_STATUS_TIMEOUT_S = 5.0  # a server silent for this long (no reply, no status answer) is lost
CONTROL_MAX_BYTES = 256  # status answers, notices and tickets are short arrays; replies are maps
SLOWEST_TRANSFER_BYTES_S = 10e6  # the link speed (100 Mbit/s) a large request or announced reply is allowed


@dataclass
class Failure:
    """Why one attempt got no reply; `fatal` ones (authentication) are not retried."""

    reason: str
    fatal: bool = False


@dataclass(frozen=True)
class Liveness:
    """When to ask the server about a call still unanswered, and how long a silence means it is lost."""

    interval_s: float = DEFAULT_STATUS_INTERVAL_S
    timeout_s: float = DEFAULT_STATUS_TIMEOUT_S


def status_answer(body: Sequence[Any]) -> list | None:
    """The server's answer to a status query (or its notice of a large reply, or a fast-link
    ticket), else None: a reply."""
    if len(body) != 1 or not 0 < len(body[0]) <= CONTROL_MAX_BYTES:
        return None
    raw = body[0] if isinstance(body[0], bytes) else body[0].bytes
    if not 0x90 <= raw[0] <= 0x9F:  # a msgpack array; every reply header is a map
        return None
    try:
        answer = msgpack.unpackb(raw)
    except ValueError:
        return None
    return answer if isinstance(answer, list) and answer and isinstance(answer[0], str) else None


class _Watch:
    """Application heartbeats for one call: ask after `interval_s` without a reply; lost after
    `timeout_s` with neither a reply nor a status answer, plus the time a large message may
    take on a slow link (the request until the server first answers; then an announced reply)."""

    def __init__(self, liveness: Liveness, request_bytes: int, now: float, first_query: int):
        self.liveness = liveness
        self.first_query = first_query  # answers to queries numbered below it are about earlier calls
        self.heard = now  # the last sign that the server has the call (or the time it was sent)
        self.grace = request_bytes / SLOWEST_TRANSFER_BYTES_S  # the server cannot answer before it has it all
        self.asked = -math.inf

    def step(self, now: float) -> tuple[str | None, float]:
        """What to do now ('ask', 'lost' or nothing) and when to look again."""
        lost_at = self.heard + self.grace + self.liveness.timeout_s
        if now >= lost_at:
            return "lost", now
        ask_at = max(self.heard, self.asked) + self.liveness.interval_s
        if now >= ask_at:
            self.asked = now
            return "ask", min(now + self.liveness.interval_s, lost_at)
        return None, min(ask_at, lost_at)

    def answered(self, answer: list, now: float) -> Failure | None:
        if len(answer) != 2 or type(answer[1]) is not int or answer[0] not in ("sending", "pending", "unknown"):
            return None  # e.g. a fast-link ticket asked for before this call, come late
        if answer[0] == "sending" and answer[1] > 0:
            self.heard, self.grace = now, answer[1] / SLOWEST_TRANSFER_BYTES_S
            return None
        if answer[1] < self.first_query:
            return None  # an answer about an earlier call, come after its reply
        self.heard, self.grace = now, 0.0
        if answer[0] == "pending":
            return None
        return Failure("the server has no record of this call: its reply (or the request) was lost on the way")

    def silence(self) -> str:
        return f"the server answered neither the call nor a status query for {self.liveness.timeout_s:g} s"


def wait_reply(link: "_Link | FastLink", request_bytes: int, timeout_s: float, connect_timeout_s: float,
               liveness: Liveness, ticket: int | None = None) -> list[Any] | Failure:
    """The reply to the request just sent on `link`, or why none came: `connect_timeout_s` to get
    a connection up, `timeout_s` for the reply once it is; a drop, or a server that stops
    answering status queries (`liveness`), ends the wait early. With `ticket`, the request was
    the fast-link ticket query of that number, and its answer (a decoded list) is the reply."""
    start = time.monotonic()
    reply_deadline, connect_deadline = start + timeout_s, start + connect_timeout_s
    up_at = start if link.connected else None  # the request leaves once the connection is up
    watch: _Watch | None = None  # made when the reply is late: most calls never need one
    while True:
        now = time.monotonic()
        deadline = reply_deadline if link.connected else min(reply_deadline, connect_deadline)
        if now >= deadline:
            break
        if link.connected:
            up_at = now if up_at is None else up_at
            if watch is None and now - up_at < liveness.interval_s:
                deadline = min(deadline, up_at + liveness.interval_s)
            else:
                watch = watch or _Watch(liveness, request_bytes, up_at, link.queries)
                action, wake = watch.step(now)
                if action == "lost":
                    return Failure(watch.silence())
                if action == "ask":
                    link.query(status_query(link.queries))
                    link.queries += 1
                deadline = min(deadline, wake)
        readable, events = link.poll(max((deadline - now) * 1000, 1))
        if readable:
            body = link.receive()
            answer = status_answer(body) if body is not None else None
            if answer is not None and ticket is not None and answer[:2] == [TICKET_QUERY, ticket]:
                return answer
            if answer is not None:  # a status answer, or the notice of a large reply (which may come early)
                now = time.monotonic()
                watch = watch or _Watch(liveness, request_bytes, now if up_at is None else up_at, link.queries)
                failure = watch.answered(answer, now)
                if failure is not None:
                    return failure
            elif body is not None:
                return body
        if events or link.lost:
            link.read_events()
            if link.refused:
                return Failure(link.refused, fatal=True)
            if link.lost:
                return Failure("the connection was lost")
    if link.handshake_error:
        return Failure(link.handshake_error, fatal=True)
    if not link.connected:
        return Failure(f"could not connect within {connect_timeout_s:g} s")
    return Failure(f"no reply within {timeout_s:g} s")


