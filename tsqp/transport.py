"""ZeroMQ plumbing: endpoints, a request client that survives lost servers, a serving loop.

The client is the Lazy Pirate pattern with a socket monitor: every call has a timeout; a lost
connection (the server died, or ZMTP heartbeats stopped) is noticed within about a second even
while a long call is legitimately in progress; then the REQ socket is rebuilt and the call resent
(every TSQP method is idempotent), up to `retries` times. The happy path costs nothing extra:
one send, one poll, one receive per call.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import zmq
from zmq.utils.monitor import parse_monitor_message

from .errors import ProtocolError, RemoteError, ServerUnreachable
from .keys import AuthenticationFailed, ClientKeys
from .logs import log_event
from .protocol import Message, decode, encode, frames_nbytes
from .shm import DATA_START, Segment, decode_reply, encode_request, footprint, reply_room

if TYPE_CHECKING:
    from .keys import ServerKeys

DEFAULT_CONNECT_TIMEOUT_S = 5.0  # to (re)connect and finish the handshake
DEFAULT_TIMEOUT_S = 600.0  # for one reply on a live connection: a long prompt on a CPU is slow
DEFAULT_RETRIES = 3  # resends of a call after a lost connection or a timeout
DEFAULT_HEARTBEAT_S = 1.0  # ZMTP ping interval; a peer silent for 5 intervals is dropped

client_log = logging.getLogger("tsqp.client")
server_log = logging.getLogger("tsqp.server")


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


def _set_heartbeat(sock: zmq.Socket, heartbeat_s: float) -> None:
    if heartbeat_s > 0:
        ivl = max(int(heartbeat_s * 1000), 10)
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5 * ivl)
        sock.setsockopt(zmq.HEARTBEAT_TTL, 5 * ivl)


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


@dataclass
class _Failure:
    """Why one attempt got no reply; `fatal` ones (authentication) are not retried."""

    reason: str
    fatal: bool = False


_MONITORED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class _Link:
    """One REQ socket and its monitor: knows whether the connection is up, was lost, or was refused."""

    def __init__(self, context: zmq.Context, endpoint: str, keys: ClientKeys | None, heartbeat_s: float):
        self.endpoint, self.curve = endpoint, keys is not None
        self.sock = context.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        _set_heartbeat(self.sock, heartbeat_s)
        if keys is not None:
            keys.apply(self.sock)
        self.monitor = self.sock.get_monitor_socket(_MONITORED)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.connected = self.lost = False
        self.refused: str | None = None  # the server said no (ZAP): final
        self.handshake_error: str | None = None  # the handshake failed: wrong keys, or a mismatch
        self.sock.connect(endpoint)

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=0)

    def read_events(self) -> None:
        """Apply every pending monitor event (non-blocking)."""
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self._apply(event["event"], event["value"])

    def _apply(self, event: int, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected, self.handshake_error = True, None
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
        else:
            self.handshake_error = ("CurveZMQ handshake failed: is --server-public-key the server's public key?"
                                    if self.curve else "the handshake failed: the server probably requires "
                                    "CurveZMQ keys (--server-public-key, --client-secret-key)")

    def wait_reply(self, timeout_s: float, connect_timeout_s: float) -> list[zmq.Frame] | _Failure:
        """The reply to the request just sent, or why none came: `connect_timeout_s` to get a
        connection up, `timeout_s` for the reply once it is; a drop ends the wait at once."""
        start = time.monotonic()
        reply_deadline, connect_deadline = start + timeout_s, start + connect_timeout_s
        while True:
            deadline = reply_deadline if self.connected else min(reply_deadline, connect_deadline)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready = dict(self.poller.poll(max(remaining * 1000, 1)))
            if self.sock in ready:
                return self.sock.recv_multipart(copy=False)
            if self.monitor in ready:
                self.read_events()
                if self.refused:
                    return _Failure(self.refused, fatal=True)
                if self.lost:
                    return _Failure("the connection was lost")
        if self.handshake_error:
            return _Failure(self.handshake_error, fatal=True)
        if not self.connected:
            return _Failure(f"could not connect within {connect_timeout_s:g} s")
        return _Failure(f"no reply within {timeout_s:g} s")


class Client:
    """A REQ client with timeouts, reconnection and resends of idempotent calls (Lazy Pirate).

    `timeout_s` bounds the wait for one reply on a live connection; `connect_timeout_s` bounds
    each (re)connection; a call is sent at most `1 + retries` times, then ServerUnreachable.
    `keys` (CurveZMQ) default to $TSQP_SERVER_PUBLIC_KEY / $TSQP_CLIENT_SECRET_KEY when set.
    `shm` moves tensor payloads through a shared-memory segment (same host; see tsqp.shm)."""

    def __init__(self, endpoint: str, timeout_s: float = DEFAULT_TIMEOUT_S, context: zmq.Context | None = None, *,
                 retries: int = DEFAULT_RETRIES, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 keys: ClientKeys | None = None, heartbeat_s: float = DEFAULT_HEARTBEAT_S, shm: bool = False):
        if timeout_s <= 0 or connect_timeout_s <= 0 or retries < 0:
            raise ValueError("timeouts must be positive and retries >= 0")
        self.endpoint = client_endpoint(endpoint)
        self.timeout_s, self.connect_timeout_s, self.retries = timeout_s, connect_timeout_s, retries
        self.keys = keys if keys is not None else ClientKeys.from_env()
        self.heartbeat_s = heartbeat_s
        self.stats = WireStats()
        self._context = context or zmq.Context.instance()
        self._link: _Link | None = None
        self.shm = shm
        self._segment: Segment | None = None
        self._reply_room = 0  # bytes the largest reply so far needed behind a request (shm)

    def _ready_link(self) -> _Link:
        """The current link, rebuilt if its connection dropped since the last call."""
        if self._link is not None:
            self._link.read_events()
            if self._link.lost:
                self._close_link()
        if self._link is None:
            self._link = _Link(self._context, self.endpoint, self.keys, self.heartbeat_s)
        return self._link

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

    def call(self, method: str, tensors: Sequence[torch.Tensor] = (), timeout_s: float | None = None, **args: Any) -> Message:
        """One round trip. Raises RemoteError on an error reply; ServerUnreachable when every
        attempt failed; AuthenticationFailed when the server refuses this client's keys."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
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

        reply_frames = self._exchange(method, prepare, timeout, retries, connect_timeout)
        t2 = time.perf_counter()
        if self.shm:
            assert self._segment is not None
            reply, shared_bytes = decode_reply(reply_frames, self._segment)
            self._reply_room = max(self._reply_room, reply_room(reply.header))
        else:
            reply, shared_bytes = decode(reply_frames), 0
        self.stats.serialize_s += time.perf_counter() - t2
        self.stats.round_trips += 1
        self.stats.bytes_received += frames_nbytes(reply_frames) + shared_bytes
        self.stats.server_s += float(reply.header.get("server_s", 0.0))
        if not reply.header.get("ok", False):
            error = reply.header.get("error") or {}
            raise RemoteError(str(error.get("code", "error")), str(error.get("message", "unknown error")))
        return reply

    def _exchange(self, method: str, prepare: Callable[[], tuple[list[Any], int]], timeout: float, retries: int,
                  connect_timeout: float) -> list[zmq.Frame]:
        """Send until a reply comes back or the attempts run out (Lazy Pirate)."""
        for attempt in range(retries + 1):
            frames, nbytes = prepare()
            link = self._ready_link()
            t1 = time.perf_counter()
            link.sock.send_multipart(frames, copy=False)
            self.stats.bytes_sent += nbytes
            outcome = link.wait_reply(timeout, connect_timeout)
            self.stats.wait_s += time.perf_counter() - t1
            if not isinstance(outcome, _Failure):
                return outcome
            self._close_link()  # a REQ socket that missed its reply cannot be reused
            self._drop_segment()  # nor a segment a late reply may still land in
            if outcome.fatal:
                raise AuthenticationFailed(outcome.reason)
            if attempt < retries:
                self.stats.retries += 1
                log_event(client_log, logging.WARNING, "retry", method=method, attempt=attempt + 2,
                          attempts=retries + 1, reason=outcome.reason, endpoint=self.endpoint)
        tries = f" after {retries + 1} attempts" if retries else ""
        raise ServerUnreachable(f"no reply from GPU server at {self.endpoint} ({method}): {outcome.reason}{tries}")


Handler = Callable[[list[Any]], list[Any]]
# Who sent the request being handled (socket identity, or `key:…` under CurveZMQ), for the logs.
current_peer: contextvars.ContextVar[str] = contextvars.ContextVar("tsqp_peer", default="-")


def _peer(envelope: list[zmq.Frame], body: list[zmq.Frame], curve: bool) -> str:
    """Who sent a request, for the logs: the authenticated key if any, else the socket identity."""
    if curve and body:
        try:
            user = body[0].get("User-Id")
        except zmq.ZMQError:
            user = None
        if user:
            return f"key:{user}"
    return envelope[0].bytes.hex() if envelope else "-"


def serve_forever(endpoint: str, handle: Handler, stop: threading.Event, on_ready: Callable[[], None] | None = None,
                  context: zmq.Context | None = None, *, keys: "ServerKeys | None" = None,
                  max_message_bytes: int | None = None, heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> None:
    """Answer requests on a ROUTER socket until `stop` is set; the request in progress is answered first.

    `handle(frames)` maps request frames to reply frames and must not raise; `current_peer`
    names the sender meanwhile. Requests from
    many clients interleave; each reply goes back to the identity that sent the request. A frame
    over `max_message_bytes` makes ZeroMQ drop its sender. With `keys`, only CurveZMQ clients on
    the allow-list get in (a ZAP handler on a context of this server's own)."""
    own_context = context is None
    context = context or zmq.Context()
    auth = keys.start_authenticator(context) if keys is not None else None
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    _set_heartbeat(sock, heartbeat_s)
    if max_message_bytes:
        sock.setsockopt(zmq.MAXMSGSIZE, int(max_message_bytes))
    if keys is not None:
        keys.apply(sock)
    try:
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as err:
            raise ProtocolError(f"cannot bind {endpoint}: {err}") from None
        if on_ready is not None:
            on_ready()
        _serve_loop(sock, handle, stop, curve=keys is not None)
    finally:
        sock.close(linger=0)
        if auth is not None:
            auth.stop()
        if own_context:
            context.term()


def _serve_loop(sock: zmq.Socket, handle: Handler, stop: threading.Event, curve: bool) -> None:
    while not stop.is_set():
        if not sock.poll(100, zmq.POLLIN):
            continue
        frames = sock.recv_multipart(copy=False)
        # [identity, (more routing frames,) empty delimiter, header, *payloads]
        split = next((i for i, f in enumerate(frames) if len(f.buffer) == 0), None)
        if split is None:
            log_event(server_log, logging.DEBUG, "ignored", reason="no envelope delimiter", frames=len(frames))
            continue  # not a REQ envelope: nobody to answer
        envelope, body = frames[: split + 1], frames[split + 1:]
        current_peer.set(_peer(envelope, body, curve))
        reply = handle(body)
        try:
            sock.send_multipart([*envelope, *reply], copy=False)
        except zmq.ZMQError as err:  # the peer is gone: its reply has nowhere to go
            log_event(server_log, logging.WARNING, "reply_dropped", error=str(err))
