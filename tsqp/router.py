"""The serving loop on the ROUTER socket: requests handled one at a time, status queries answered meanwhile.

A client that has waited a second for its reply asks whether its request is still queued or
running (a status query, tsqp.transport), and a server that answers neither within seconds
counts as lost: so a reply dropped on the way, or a frozen server, is noticed in seconds, and a
long computation is never mistaken for either. The handler runs on the loop's own thread (a
thread switch per call would add to every small call's round trip); when a request has run
for STAND_IN_AFTER_S, a stand-in thread takes the socket (one owner at a time, by a lock),
answers status queries and queues new requests until the handler returns. The loop also sees
every reply leave: it follows each large reply frame until ZeroMQ has released it, and refuses
requests from a peer whose unread replies pin more than a bound, so a peer that never reads
cannot pin the server's memory.

Plain REQ clients (the seed's) are served as before: they never send status queries.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import msgpack
import zmq

from . import protocol
from .errors import ProtocolError
from .fastlink import TICKET_QUERY, Listener, Peer, ticket_answer
from .logs import log_event
from .spinning import SERVER_SPIN_ENV, SERVER_SPIN_US, serving, spin, spin_budget

if TYPE_CHECKING:
    from .keys import AllowList, ServerKeys

DEFAULT_HEARTBEAT_S = 1.0  # ZMTP ping interval; a peer silent for 5 intervals is dropped
DEFAULT_MAX_UNREAD_BYTES = 64 << 20  # reply bytes a peer may leave unread before its requests are refused
MAX_PENDING_PER_PEER = 4  # our clients have one request in flight per connection; more is a flood
SEND_HWM = 64  # messages queued per peer: bounds the small (copied, untracked) replies a non-reader pins
TRACK_MIN_BYTES = zmq.COPY_THRESHOLD  # frames pyzmq sends without copying, and so can follow to release
NOTICE_BYTES = 16 << 20  # a reply this large is announced first: the client allows for its transfer time
UNREAD_GRACE_S = 0.1  # pyzmq marks a frame released from its own thread, a moment after libzmq did
STAND_IN_AFTER_S = 0.2  # a request running this long gets the stand-in answering status queries
STAND_IN_POLL_S = 0.05  # how often the stand-in looks while requests run; an idle server wakes it never
STAND_IN_IDLE_S = 1.0  # no request for this long: the stand-in sleeps until the next one
REHEARSE_AFTER_S = 1e-3  # on the CPU, a call this long has streamed megabytes of weights through the caches

# Status frames are short msgpack arrays; every TSQP header is a map, so the two never mix. A query
# is ["status", n] and its answer [state, n]: "pending" (the connection's request is queued or
# running) or "unknown" (not here: answered already, so the reply was lost, or it never came).
# The client numbers its queries, so an answer that comes after its call's reply is not taken
# for the next call's.
STATUS_MAX_BYTES = 24

Handler = Callable[[list[Any]], list[Any]]
# Who sent the request being handled (socket identity, or `key:…` under CurveZMQ), for the logs.
current_peer: contextvars.ContextVar[str] = contextvars.ContextVar("tsqp_peer", default="-")

log = logging.getLogger("tsqp.server")


def set_heartbeat(sock: zmq.Socket, heartbeat_s: float) -> None:
    if heartbeat_s > 0:
        ivl = max(int(heartbeat_s * 1000), 10)
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5 * ivl)
        sock.setsockopt(zmq.HEARTBEAT_TTL, 5 * ivl)


def status_query(number: int) -> bytes:
    return msgpack.packb(["status", number])


def _control_query(frame: "zmq.Frame | bytes") -> tuple[str, int] | None:
    """A status query or a fast-link ticket request (kind, number), else None (any request
    header is a longer map)."""
    if not 0 < len(frame) <= STATUS_MAX_BYTES:
        return None
    raw = frame if isinstance(frame, bytes) else frame.bytes
    if raw[0] != 0x92:  # a 2-element array
        return None
    try:
        kind, number = msgpack.unpackb(raw)
    except ValueError:
        return None
    return (kind, number) if kind in ("status", TICKET_QUERY) and type(number) is int else None


def sending_notice(nbytes: int) -> bytes:
    """Sent before a reply of `nbytes` >= NOTICE_BYTES: its transfer is not a silent server."""
    return msgpack.packb(["sending", nbytes])


def _peer_name(envelope: list[zmq.Frame], user: str | None) -> str:
    """Who sent a request, for the logs: the authenticated key if any, else the socket identity."""
    if user:
        return f"key:{user}"
    return envelope[0].bytes.hex() if envelope else "-"


def _user_id(frame: zmq.Frame) -> str | None:
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:
        return None


Key = tuple[bytes, ...]  # a request's envelope: whom to answer, and what a status query names


Envelope = "list[zmq.Frame] | Peer"  # where the answer goes: a ROUTER envelope, or a fast-link peer


@dataclass(slots=True)
class _Job:
    key: Key
    envelope: Envelope
    body: list[Any]
    peer: str
    started: float = 0.0


@dataclass
class _Unread:
    """Large reply frames sent to one connection that ZeroMQ still holds: it has not read them."""

    frames: list[tuple[zmq.MessageTracker, int]] = field(default_factory=list)
    refusing: bool = False  # over the bound at the last check: refuse again without the grace wait

    def nbytes(self) -> int:
        self.frames = [(tracker, n) for tracker, n in self.frames if not tracker.done]
        return sum(n for _, n in self.frames)


class _Loop:
    """The serving loop. Whoever holds `owner` may use the socket: the loop, except while a
    long request runs, when the stand-in thread may take it to answer status queries."""

    def __init__(self, sock: zmq.Socket, handle: Handler, allow: "AllowList | None", max_unread_bytes: int,
                 fast: Listener | None = None, spin_s: float = 0.0, rehearse: Callable[[], None] | None = None):
        self.sock, self.handle, self.allow, self.max_unread, self.fast = sock, handle, allow, max_unread_bytes, fast
        self.pending: dict[Key, int] = {}  # requests queued or running, per connection
        self.unread: dict[Key, _Unread] = {}
        self.backlog: deque[_Job] = deque()  # received, not yet handled
        self.running: _Job | None = None
        self.owner = threading.Lock()
        self._closing = threading.Event()
        self._busy = threading.Event()  # set when a request starts after a quiet spell: wakes the stand-in
        self._wake_read, self._wake_write = os.pipe()  # the loop asks the stand-in for the socket back
        os.set_blocking(self._wake_read, False)
        self.poller = zmq.Poller()  # polled by whoever holds `owner`
        for source in (sock, self._wake_read, *([fast.fileno()] if fast else [])):
            self.poller.register(source, zmq.POLLIN)
        self._swept = time.monotonic()
        self.spin_s, self._gap_s = spin_s, math.inf
        self.rehearse = rehearse

    def run(self, stop: threading.Event) -> None:
        self.owner.acquire()
        stand_in = threading.Thread(target=self._stand_in, name="tsqp-status", daemon=True)
        stand_in.start()
        try:
            while not stop.is_set():
                if self.backlog:
                    self._serve(self.backlog.popleft())
                elif not self._take_next():
                    self._sweep()
        finally:  # the request in progress was answered; queued ones are dropped (their clients resend)
            self._closing.set()
            self._busy.set()
            self.owner.release()
            stand_in.join()
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _take_next(self) -> bool:
        """Wait for what comes next and take it in; False after the spin and 100 ms of nothing.
        Spins first while the last gap before a request was within the budget (tsqp.spinning);
        anything else that ends a wait (a status query, a new link, silence) is no sign that a
        request follows soon."""
        started = time.perf_counter()
        ready = {}
        if self.spin_s and self._gap_s <= self.spin_s:
            ready = dict(spin(lambda: self.poller.poll(0), started + self.spin_s))
        ready = ready or dict(self.poller.poll(100))
        if ready:
            self._dispatch(ready)
        self._gap_s = time.perf_counter() - started if self.backlog else math.inf
        return bool(ready)

    def _serve(self, job: _Job) -> None:
        current_peer.set(job.peer)
        job.started = time.monotonic()
        self.running = job
        if not self._busy.is_set():  # once per busy spell, not per request
            self._busy.set()
        self.owner.release()
        handled_from = time.perf_counter()
        try:
            reply = self.handle(job.body)
        except Exception as err:  # handlers must not raise; if one does, the client still gets an answer
            log.error("handler_raised", extra={"fields": {"error": repr(err)[:300]}}, exc_info=True)
            reply = protocol.encode(protocol.error_header("internal", f"{type(err).__name__}: {err}"))
        finally:
            self.running = None
            if not self.owner.acquire(blocking=False):
                os.write(self._wake_write, b"\0")  # the stand-in has the socket: hand it back now
                self.owner.acquire()
        self._send_reply(job, reply)
        if self.rehearse is not None and time.perf_counter() - handled_from >= REHEARSE_AFTER_S \
                and not self.backlog and not self.poller.poll(0):
            self._rehearse()

    def _rehearse(self) -> None:
        """The rehearsal, while the client computes (nothing is waiting); a request that comes
        meanwhile waits for its end. One that fails is not worth another try."""
        assert self.rehearse is not None
        try:
            self.rehearse()
        except Exception as err:
            log_event(log, logging.WARNING, "rehearsal_failed", error=repr(err)[:300])
            self.rehearse = None

    def _stand_in(self) -> None:
        """Hold the socket while a request runs long: answer status queries, queue requests."""
        quiet_since = time.monotonic()
        while not self._closing.wait(STAND_IN_POLL_S):
            if not self._busy.is_set():  # a quiet server: sleep until a request starts
                self._busy.wait()
                quiet_since = time.monotonic()
                continue
            job, now = self.running, time.monotonic()
            if job is None:
                if now - quiet_since >= STAND_IN_IDLE_S:
                    self._busy.clear()
                    if self.running is not None:  # a request started meanwhile and saw the event still set
                        self._busy.set()
                continue
            quiet_since = now
            if now - job.started < STAND_IN_AFTER_S:
                continue
            with self.owner:
                while self.running is job and not self._closing.is_set():
                    self._dispatch(dict(self.poller.poll(100)))

    def _dispatch(self, ready: dict) -> None:
        """Take in whatever `ready` (a poll's result) says is waiting: requests are queued."""
        if self.sock in ready:
            self._receive()
        if self._wake_read in ready:
            try:
                os.read(self._wake_read, 1 << 16)
            except BlockingIOError:
                pass
        if self.fast is not None:
            self._receive_fast(ready)

    def _receive_fast(self, ready: dict) -> None:
        assert self.fast is not None
        if self.fast.fileno() in ready:
            peer, stale = self.fast.accept()
            for fd in stale:
                self.poller.unregister(fd)
            if peer is not None:
                self.poller.register(peer.sock.fileno(), zmq.POLLIN)
        for fd in [fd for fd in ready if isinstance(fd, int) and fd in self.fast.peers]:
            peer, datagrams = self.fast.receive(fd)
            if fd not in self.fast.peers:  # closed, refused, or sent nonsense
                self.poller.unregister(fd)
            for datagram in datagrams:
                self._route(peer, [datagram])

    def _receive(self) -> None:
        """Route what the socket holds (it polled readable), up to a batch: then the loop serves it."""
        for _ in range(256):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            # [identity, (more routing frames,) empty delimiter, header, *payloads]
            split = next((i for i, f in enumerate(frames) if len(f) == 0), None)
            if split is not None:
                self._route(frames[: split + 1], frames[split + 1:])
            else:  # not a REQ envelope: nobody to answer
                log_event(log, logging.DEBUG, "ignored", reason="no envelope delimiter", frames=len(frames))
            if not self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # cheaper than a receive that fails
                return

    def _route(self, envelope: Envelope, body: list[Any]) -> None:
        fast = isinstance(envelope, Peer)
        key = envelope.key if fast else tuple(f.bytes for f in envelope)
        query = _control_query(body[0]) if len(body) == 1 else None
        if query is not None and query[0] == "status":
            self._send(envelope, [msgpack.packb(["pending" if key in self.pending else "unknown", query[1]])])
            return
        if fast:
            name = envelope.name
            user = name[len("key:"):] if name.startswith("key:") else None
        else:
            user = _user_id(body[0]) if self.allow is not None and body else None
            name = _peer_name(envelope, user)
        if query is not None and query[0] == TICKET_QUERY:  # for this peer's identity, if it may use the server
            admitted = self.allow is None or (user is not None and self.allow.admits(user.encode()))
            ticket = self.fast.ticket(name) if self.fast is not None and admitted and not fast else None
            self._send(envelope, [ticket_answer(query[1], ticket)])
            return
        pending = self.pending.get(key, 0)
        if self.allow is not None and not (user and self.allow.admits(user.encode())):
            self._refuse(envelope, name, "unauthorized", "this client's key is no longer on the server's allow-list")
        elif pending >= MAX_PENDING_PER_PEER:
            self._refuse(envelope, name, "busy", f"{pending} requests of this connection are already queued or "
                         "running: wait for their replies")
        elif key in self.unread and self._over_unread(key):
            self._refuse(envelope, name, "unread_replies", f"{self.unread[key].nbytes() / 2**20:.0f} MiB of "
                         f"replies to this connection are unread (limit {self.max_unread / 2**20:.0f} MiB): "
                         "read them first")
        else:
            self.pending[key] = pending + 1
            self.backlog.append(_Job(key, envelope, body, name))

    def _over_unread(self, key: Key) -> bool:
        unread = self.unread[key]
        if unread.nbytes() <= self.max_unread:
            unread.refusing = False
            return False
        if not unread.refusing:  # a reply just read may not be marked released yet: wait a moment, once
            deadline = time.monotonic() + UNREAD_GRACE_S
            for tracker, _ in unread.frames:
                try:
                    tracker.wait(max(deadline - time.monotonic(), 0.001))
                except zmq.NotDone:
                    break
        unread.refusing = unread.nbytes() > self.max_unread
        return unread.refusing

    def _refuse(self, envelope: Envelope, name: str, code: str, message: str) -> None:
        log_event(log, logging.WARNING, "refused", code=code, peer=name, message=message)
        self._send(envelope, protocol.encode(protocol.error_header(code, message)))

    def _send_reply(self, job: _Job, reply: list[Any]) -> None:
        left = self.pending.pop(job.key) - 1
        if left:
            self.pending[job.key] = left
        frames, tracked = _tracked(reply) if not isinstance(job.envelope, Peer) else (reply, [])
        if not tracked:
            self._send(job.envelope, frames)
            return
        nbytes = sum(n for _, n in tracked)
        if nbytes >= NOTICE_BYTES:
            self._send(job.envelope, [sending_notice(nbytes)])
        if self._send(job.envelope, frames):
            self.unread.setdefault(job.key, _Unread()).frames.extend(tracked)

    def _send(self, envelope: Envelope, frames: list[Any]) -> bool:
        if isinstance(envelope, Peer):
            if not envelope.send(frames) and self.fast is not None:
                fd = envelope.sock.fileno()
                if self.fast.peers.get(fd) is envelope:
                    self.poller.unregister(fd)
                    self.fast.drop(fd)
                return False
            return True
        try:
            self.sock.send_multipart([*envelope, *frames], copy=False)
            return True
        except zmq.ZMQError as err:  # the peer is gone: its reply has nowhere to go
            log_event(log, logging.WARNING, "reply_dropped", error=str(err))
            return False

    def _sweep(self, every_s: float = 5.0) -> None:
        """Forget connections whose replies were all released (read, or dropped with the connection)."""
        now = time.monotonic()
        if now - self._swept >= every_s:
            self._swept = now
            for key in [k for k, unread in self.unread.items() if not unread.nbytes()]:
                del self.unread[key]


def _tracked(reply: list[Any]) -> tuple[list[Any], list[tuple[zmq.MessageTracker, int]]]:
    """The reply's frames, the large ones wrapped so that ZeroMQ's release of them can be seen."""
    frames, tracked = [], []
    for part in reply:
        nbytes = part.nbytes if isinstance(part, memoryview) else len(part)
        if nbytes >= TRACK_MIN_BYTES and not isinstance(part, zmq.Frame):
            part = zmq.Frame(part, track=True, copy=False)
            tracked.append((part.tracker, nbytes))
        frames.append(part)
    return frames, tracked


def _listener() -> Listener | None:
    try:
        return Listener()
    except OSError as err:  # e.g. a $TMPDIR too long for a socket path: serve without the fast link
        log_event(log, logging.WARNING, "fastlink_unavailable", error=str(err))
        return None


def serve_forever(endpoint: str, handle: Handler, stop: threading.Event, on_ready: Callable[[], None] | None = None,
                  context: zmq.Context | None = None, *, keys: "ServerKeys | None" = None,
                  max_message_bytes: int | None = None, heartbeat_s: float = DEFAULT_HEARTBEAT_S,
                  max_unread_bytes: int = DEFAULT_MAX_UNREAD_BYTES, fast: bool = False,
                  spin_s: float | None = None, rehearse: Callable[[], None] | None = None) -> None:
    """Answer requests on a ROUTER socket until `stop` is set; the request in progress is answered first.

    `handle(frames)` maps request frames to reply frames (one request at a time, on this
    thread) and must not raise; `current_peer` names the sender meanwhile. Requests from many clients
    interleave; each reply goes back to the identity that sent the request. A frame over
    `max_message_bytes` makes ZeroMQ drop its sender. With `keys`, only CurveZMQ clients on the
    allow-list get in (a ZAP handler on a context of this server's own), and every request's
    key is checked again, so a key removed from the list stops working on open connections too.
    `fast` also serves same-host shared-memory clients over a Unix socket (tsqp.fastlink).
    `spin_s`: how long to poll for the next request before blocking, while requests come that
    quickly (tsqp.spinning; default $TSQP_SERVE_SPIN_US, else SERVER_SPIN_US). `rehearse()`, if
    given, runs after a request that took REHEARSE_AFTER_S or longer, when nothing else waits: a
    small call's path run again, so that it is back in the caches for the next (GpuServer.rehearse)."""
    spin_s = spin_budget(SERVER_SPIN_ENV, SERVER_SPIN_US) if spin_s is None else spin_s
    own_context = context is None
    context = context or zmq.Context()
    allow = keys.allow_list() if keys is not None else None
    auth = keys.start_authenticator(context, allow) if keys is not None else None
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SEND_HWM)
    set_heartbeat(sock, heartbeat_s)
    if max_message_bytes:
        sock.setsockopt(zmq.MAXMSGSIZE, int(max_message_bytes))
    if keys is not None:
        keys.apply(sock)
    listener: Listener | None = None
    try:
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as err:
            hint = "; is another server running there? stop it, or choose another port or endpoint" \
                if err.errno == zmq.EADDRINUSE else ""
            raise ProtocolError(f"cannot bind {endpoint}: {err}{hint}") from None
        listener = _listener() if fast else None
        with serving():  # before on_ready: a client made once the server is ready must not spin here
            if on_ready is not None:
                on_ready()
            _Loop(sock, handle, allow, max_unread_bytes, listener, spin_s, rehearse).run(stop)
    finally:
        if listener is not None:
            listener.close()
        sock.close(linger=0)
        if auth is not None:
            auth.stop()
        if own_context:
            context.term()
