"""ZeroMQ plumbing: endpoints, and a request client that survives lost servers and lost replies.

The client is the Lazy Pirate pattern with a socket monitor and application heartbeats (in the
Paranoid Pirate style): every call has a timeout; a dropped connection is noticed at once, a
dead host when ZMTP heartbeats stop (5 s); a reply that has not come within a second makes the
client ask whether its request is still queued or running there, and a server that answers
neither the call nor that question within a few seconds (a reply dropped on the way, a stuck
serving loop) counts as lost too. Then the socket is rebuilt and the call resent (every TSQP
method is idempotent), up to `retries` times. `timeout_s` bounds the work, not the detection.
The happy path costs nothing extra: one send, one poll, one receive per call.

The server's side of the socket, the serving loop, is tsqp.router.
"""

from __future__ import annotations

import ipaddress
import logging
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import zmq
from zmq.utils.monitor import parse_monitor_message

from .errors import RemoteError, ServerUnreachable
from .fastlink import FastLink, read_ticket, ticket_query
from .liveness import Liveness, Failure, wait_reply
from .keys import AuthenticationFailed, ClientKeys
from .logs import log_event
from .protocol import Message, decode, encode, frames_nbytes
from .router import DEFAULT_HEARTBEAT_S, set_heartbeat
from .shm import DATA_START, MAX_REPLY_ROOM, Segment, decode_reply, encode_request, footprint, reply_room
from .spinning import ReplyWait, client_spin_budget

DEFAULT_CONNECT_TIMEOUT_S = 5.0  # to (re)connect and finish the handshake
DEFAULT_TIMEOUT_S = 600.0  # for the work of one call: a long prompt on a CPU is slow
DEFAULT_RETRIES = 3  # resends of a call after a lost connection or a timeout
REPLY_SLACK = 64 << 10  # on top of an expected reply's payload: alignment of each tensor, and some to spare

client_log = logging.getLogger("tsqp.client")


def client_endpoint(endpoint: str) -> str:
    """`host:port`, `tcp://host:port` or `ipc://path` -> a ZeroMQ address to connect to."""
    endpoint = endpoint.strip()
    if endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        return endpoint
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad endpoint '{endpoint}' (expected host:port, tcp://host:port or ipc://path)")
    return f"tcp://{host}:{port}"


def bind_endpoint(port_or_endpoint: str | int, host: str = "127.0.0.1") -> str:
    """A port number or an explicit endpoint -> a ZeroMQ address to bind."""
    text = str(port_or_endpoint).strip()
    if text.isdigit():
        port = int(text)
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port} (expected 1-65535)")
        return f"tcp://{host}:{port}"
    return client_endpoint(text)


def is_loopback(endpoint: str) -> bool:
    """Whether binding `endpoint` keeps the server reachable from this host only.

    ipc:// and inproc:// are local; tcp:// is local for 127.0.0.0/8, ::1 and `localhost`.
    A wildcard, an interface name or any other host name counts as the network."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class WireStats:
    """What crossed the socket (or shared memory, with `shm`) and where the client's time went."""

    round_trips: int = 0  # completed request/reply exchanges (a retried call counts once)
    bytes_sent: int = 0  # every send, resends included
    bytes_received: int = 0
    serialize_s: float = 0.0  # building frames and parsing replies
    wait_s: float = 0.0  # from send to reply: transport plus server time (failed attempts included)
    server_s: float = 0.0  # compute time the server reports (device synchronized)
    retries: int = 0  # resends after a lost connection or a timeout

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def since(self, before: "WireStats") -> "WireStats":
        """What was counted after the snapshot `before` (taken with `copy`)."""
        return WireStats(**{k: v - getattr(before, k) for k, v in self.as_dict().items()})

    def copy(self) -> "WireStats":
        return WireStats(**self.as_dict())

    def breakdown(self, seconds: float) -> dict[str, float]:
        """Split a wall time spent around these calls: TEE compute / (de)serialization /
        transport and wait / server compute."""
        return {
            "tee_compute": max(seconds - self.serialize_s - self.wait_s, 0.0),
            "serialization": self.serialize_s,
            "transport_wait": max(self.wait_s - self.server_s, 0.0),
            "server_compute": self.server_s,
        }


_MONITORED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _unbounded_monitor(context: zmq.Context, sock: zmq.Socket) -> zmq.Socket:
    """The reading end of `sock`'s monitor, with no high-water mark: libzmq's I/O thread sends
    monitor events blocking, so 1,000 unread ones (a client with stale keys reconnecting while
    idle) would stall every socket in the context."""
    endpoint = f"inproc://tsqp-monitor-{id(sock):x}-{time.monotonic_ns():x}"
    sock.monitor(endpoint, _MONITORED)
    monitor = context.socket(zmq.PAIR)
    monitor.setsockopt(zmq.RCVHWM, 0)  # an inproc pipe is unbounded when either end's mark is 0
    monitor.connect(endpoint)
    return monitor


def _close_monitored(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    """Stop the monitor before closing its reader (an event sent to a reader that is gone
    blocks the I/O thread for good), also when a link is garbage-collected unclosed."""
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(linger=0)
    sock.close(linger=0)


class _Link(ReplyWait):
    """One DEALER socket and its monitor: knows whether the connection is up, was lost, or was refused.

    A DEALER rather than a REQ so that it can ask about a call while waiting for its reply; it
    frames requests as a REQ would (an empty delimiter first), and has one call in flight."""

    def __init__(self, context: zmq.Context, endpoint: str, keys: ClientKeys | None, heartbeat_s: float,
                 spin_s: float):
        super().__init__(spin_s)
        self.endpoint, self.curve = endpoint, keys is not None
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        set_heartbeat(self.sock, heartbeat_s)
        if keys is not None:
            keys.apply(self.sock)
        self.monitor = _unbounded_monitor(context, self.sock)
        self._closer = weakref.finalize(self, _close_monitored, self.sock, self.monitor)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.connected = self.lost = False
        self.queries = 0  # status queries sent on this socket, numbered from 0
        self.refused: str | None = None  # the server said no (ZAP): final
        self.handshake_error: str | None = None  # the handshake failed: wrong keys, or a mismatch
        self.handshake_failures = 0  # since the last success: one may be a server dying mid-handshake
        self.sock.connect(endpoint)

    def close(self) -> None:
        self._closer()

    def send(self, frames: Sequence[Any]) -> None:
        self.sock.send_multipart([b"", *frames], copy=False)
        self._sent()

    def read_events(self) -> None:
        """Apply every pending monitor event (non-blocking; asking first is cheaper than a failed receive)."""
        while self.monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            self._apply(event["event"], event["value"])

    def _apply(self, event: int, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected, self.handshake_error, self.handshake_failures = True, None, 0
        elif event == zmq.EVENT_DISCONNECTED:
            self.lost = self.lost or self.connected
            self.connected = False
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.refused = f"the GPU server at {self.endpoint} refused this client's key (status {value}): " \
                           "its public key must be in the server's --allow-keys directory"
        elif value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            self.handshake_error = ("the server does not use CurveZMQ keys but this client does" if self.curve else
                                    "the server requires CurveZMQ keys: pass --server-public-key and "
                                    "--client-secret-key")
        else:  # the server hung up mid-handshake: a verdict on the keys only if it does so again
            self.handshake_failures += 1
            if self.handshake_failures >= 2:
                self.handshake_error = ("CurveZMQ handshake failed: is --server-public-key the server's public key?"
                                        if self.curve else "the handshake failed: the server probably requires "
                                        "CurveZMQ keys (--server-public-key, --client-secret-key)")

    def receive(self) -> list[zmq.Frame] | None:
        frames = self.sock.recv_multipart(copy=False)
        self._answered()
        return frames[1:] if frames and len(frames[0]) == 0 else None  # else not an answer to a request

    def query(self, frame: bytes) -> None:
        self.sock.send_multipart([b"", frame])

    def poll(self, timeout_ms: float) -> tuple[bool, bool]:
        """(something to receive, monitor events to read). Spins first (ReplyWait)."""
        ready = dict(self._waited(timeout_ms))
        return self.sock in ready, self.monitor in ready


class Client:
    """A client with timeouts, reconnection and resends of idempotent calls (Lazy Pirate), and
    status queries while a reply is late (Paranoid Pirate's heartbeats, asked per call).

    `timeout_s` bounds the wait for one reply on a live connection (the work); `liveness` how
    soon a server that stopped answering is noticed; `connect_timeout_s` bounds each
    (re)connection; a call is sent at most `1 + retries` times, then ServerUnreachable.
    `keys` (CurveZMQ) default to $TSQP_SERVER_PUBLIC_KEY / $TSQP_CLIENT_SECRET_KEY when set.
    `shm` moves tensor payloads through a shared-memory segment (same host; see tsqp.shm), and
    headers over the server's fast link when it offers one (tsqp.fastlink; `fastlink=False`: ZeroMQ)."""

    def __init__(self, endpoint: str, timeout_s: float = DEFAULT_TIMEOUT_S, context: zmq.Context | None = None, *,
                 retries: int = DEFAULT_RETRIES, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 keys: ClientKeys | None = None, heartbeat_s: float = DEFAULT_HEARTBEAT_S, shm: bool = False,
                 liveness: Liveness = Liveness(), fastlink: bool = True):
        if timeout_s <= 0 or connect_timeout_s <= 0 or retries < 0 or min(liveness.interval_s, liveness.timeout_s) <= 0:
            raise ValueError("timeouts must be positive and retries >= 0")
        self.endpoint = client_endpoint(endpoint)
        self.timeout_s, self.connect_timeout_s, self.retries = timeout_s, connect_timeout_s, retries
        self.keys = keys if keys is not None else ClientKeys.from_env()
        self.heartbeat_s, self.liveness = heartbeat_s, liveness
        self.spin_s = client_spin_budget()  # each link's (tsqp.spinning)
        self.stats = WireStats()
        self._context = context or zmq.Context.instance()
        self._link: _Link | FastLink | None = None
        self._via: str | None = None
        self.shm, self.fastlink = shm, fastlink
        self._segment: Segment | None = None
        self._reply_room = 0  # bytes the largest reply so far needed behind a request (shm)
        # set by a caller whose calls the server runs on one core (decode steps): a reply is then
        # worth a spin however long it takes (tsqp.spinning), with the caller's own next code run
        # now and then meanwhile (`rehearse`, where given)
        self.spin_through = False
        self.rehearse: Callable[[], object] | None = None

    def _ready_link(self, connect_timeout_s: float | None = None) -> "_Link | FastLink | Failure":
        """The current link, rebuilt if its connection dropped since the last call; a new one
        asks for the server's fast link first (within `connect_timeout_s`, default the client's)
        when this client uses shared memory."""
        if connect_timeout_s is None:
            connect_timeout_s = self.connect_timeout_s
        if self._link is not None:
            self._link.read_events()
            if self._link.lost:
                self._close_link()
        if self._link is None:
            link = _Link(self._context, self.endpoint, self.keys, self.heartbeat_s, self.spin_s)
            if self.shm and self.fastlink:
                chosen = self._fast_link(link, connect_timeout_s)
                if isinstance(chosen, Failure):  # no answer: a late one must not pass for a call's reply
                    link.close()
                    return chosen
                link = chosen
            self._link = link
        return self._link

    @property
    def via(self) -> str | None:
        """What the last answered call travelled on: 'fastlink', 'zeromq', or None before the first."""
        return self._via

    def _fast_link(self, link: _Link, connect_timeout_s: float) -> "_Link | FastLink | Failure":
        """The server's fast link (tsqp.fastlink) if it offers one and it can be reached from
        here, else the ZeroMQ link the ticket was asked on; a Failure if the server answered
        nothing (this attempt's failure, as a call's would be)."""
        number = link.queries
        link.query(ticket_query(number))
        link.queries += 1
        answer = wait_reply(link, 0, connect_timeout_s, connect_timeout_s, self.liveness, ticket=number)
        if isinstance(answer, Failure):
            return answer
        ticket = read_ticket(answer, number)  # None from a server without one (or one that knows no tickets)
        if ticket is None:
            return link
        try:
            fast = FastLink.connect(*ticket, connect_timeout_s, self.spin_s)
        except OSError as err:  # not reachable from here (an enclave), or refused: ZeroMQ serves
            log_event(client_log, logging.INFO, "fastlink_unreachable", path=ticket[0], error=str(err))
            return link
        link.close()
        return fast

    def _close_link(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    def _drop_segment(self) -> None:
        if self._segment is not None:
            self._segment.close()
            self._segment = None

    def close(self) -> None:
        self._close_link()
        self._drop_segment()

    def _shared_segment(self, tensors: Sequence[torch.Tensor]) -> Segment:
        """This client's segment, made (again) large enough for the request and the reply room."""
        room = footprint(tensors) + self._reply_room
        if self._segment is None or self._segment.size - DATA_START < room:
            self._drop_segment()
            self._segment = Segment.create(room + room // 4 + (1 << 20))
        return self._segment

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def call(self, method: str, tensors: Sequence[torch.Tensor] = (), timeout_s: float | None = None, *,
             reply_bytes: int = 0, **args: Any) -> Message:
        """One round trip. Raises RemoteError on an error reply; ServerUnreachable when every
        attempt failed; AuthenticationFailed when the server refuses this client's keys.
        `reply_bytes`, the payload the caller expects back, sizes a shared-memory segment up
        front: else the first reply that outgrows it is computed twice (the fast link's `reply_room`)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if self.shm and reply_bytes > 0:
            self._reply_room = max(self._reply_room, min(reply_bytes + REPLY_SLACK, MAX_REPLY_ROOM))
        return self._request(method, tensors, args, timeout, self.retries, self.connect_timeout_s)

    def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Check the server answers, once, within `timeout_s` (default: the connect timeout)."""
        timeout = self.connect_timeout_s if timeout_s is None else timeout_s
        reply = self._request("Ping", (), {}, timeout, retries=0, connect_timeout=min(timeout, self.connect_timeout_s))
        return reply.header

    def _request(self, method: str, tensors: Sequence[torch.Tensor], args: dict[str, Any], timeout: float,
                 retries: int, connect_timeout: float) -> Message:
        header = {"method": method, "args": args}

        def prepare() -> tuple[list[Any], int]:
            """One attempt's frames and payload bytes. With shm each attempt copies the tensors into
            a segment no earlier attempt used: a server may still be working through a request
            whose reply timed out, and would write that reply over these inputs."""
            t0 = time.perf_counter()
            if self.shm:
                frames = encode_request(self._shared_segment(tensors), header, tensors)
                nbytes = frames_nbytes(frames) + sum(t.numel() * t.element_size() for t in tensors)
            else:
                frames = encode(header, tensors)  # zero-copy views of the tensors: cheap to redo
                nbytes = frames_nbytes(frames)
            self.stats.serialize_s += time.perf_counter() - t0
            return frames, nbytes

        reply = self._reply(self._exchange(method, prepare, timeout, retries, connect_timeout))
        if _error_code(reply) == "reply_room":  # the fast link's answer to a reply larger than the segment
            reply = self._reply(self._exchange(method, prepare, timeout, retries, connect_timeout))
        if not reply.header.get("ok", False):
            error = reply.header.get("error") or {}
            code, message = str(error.get("code", "error")), str(error.get("message", "unknown error"))
            if code == "unauthorized":  # the key was taken off the allow-list while connected
                raise AuthenticationFailed(f"the GPU server at {self.endpoint} refused this client: {message}")
            raise RemoteError(code, message)
        return reply

    def _reply(self, frames: list[Any]) -> Message:
        """The reply decoded (tensors copied out of shared memory) and counted."""
        t0 = time.perf_counter()
        if self.shm:
            assert self._segment is not None
            reply, shared_bytes = decode_reply(frames, self._segment)
            self._reply_room = max(self._reply_room, reply_room(reply.header))
        else:
            reply, shared_bytes = decode(frames), 0
        self.stats.serialize_s += time.perf_counter() - t0
        self.stats.round_trips += 1
        self.stats.bytes_received += frames_nbytes(frames) + shared_bytes
        self.stats.server_s += float(reply.header.get("server_s", 0.0))
        return reply

    def _exchange(self, method: str, prepare: Callable[[], tuple[list[Any], int]], timeout: float, retries: int,
                  connect_timeout: float) -> list[zmq.Frame]:
        """Send until a reply comes back or the attempts run out (Lazy Pirate)."""
        for attempt in range(retries + 1):
            frames, nbytes = prepare()
            link = self._ready_link(connect_timeout)
            if isinstance(link, Failure):
                outcome: list[Any] | Failure = link
            else:
                link.spin_through, link.rehearse = self.spin_through, self.rehearse
                t1 = time.perf_counter()
                link.send(frames)
                self.stats.bytes_sent += nbytes
                outcome = wait_reply(link, nbytes, timeout, connect_timeout, self.liveness)
                self.stats.wait_s += time.perf_counter() - t1
            if not isinstance(outcome, Failure):
                self._via = "fastlink" if isinstance(link, FastLink) else "zeromq"
                return outcome
            self._close_link()  # a late reply to this attempt must never pass for the next one's
            self._drop_segment()  # nor a segment a late reply may still land in
            if outcome.fatal:
                raise AuthenticationFailed(outcome.reason)
            if attempt < retries:
                self.stats.retries += 1
                log_event(client_log, logging.WARNING, "retry", method=method, attempt=attempt + 2,
                          attempts=retries + 1, reason=outcome.reason, endpoint=self.endpoint)
        tries = f" after {retries + 1} attempts" if retries else ""
        raise ServerUnreachable(f"no reply from GPU server at {self.endpoint} ({method}): {outcome.reason}{tries}")


def _error_code(reply: Message) -> str | None:
    error = reply.header.get("error")
    return str(error.get("code")) if not reply.header.get("ok", False) and isinstance(error, dict) else None
