"""ZeroMQ plumbing: endpoints, a request client with timeouts and wire counters, a serving loop."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import zmq

from .errors import ProtocolError, RemoteError, ServerUnreachable
from .protocol import Message, decode, encode, frames_nbytes

DEFAULT_PORT = 50051
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_TIMEOUT_S = 600.0


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


@dataclass
class WireStats:
    """What crossed the socket and where the client's time went."""

    round_trips: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    serialize_s: float = 0.0  # building frames and parsing replies
    wait_s: float = 0.0  # from send to reply: transport plus server time
    server_s: float = 0.0  # compute time the server reports (device synchronized)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class Client:
    """A REQ client. Every call has a timeout; after one, the socket is rebuilt and an error raised."""

    def __init__(self, endpoint: str, timeout_s: float = DEFAULT_TIMEOUT_S, context: zmq.Context | None = None):
        self.endpoint = client_endpoint(endpoint)
        self.timeout_s = timeout_s
        self.stats = WireStats()
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            sock = self._context.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            self._socket = sock
        return self._socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def call(self, method: str, tensors: Sequence[torch.Tensor] = (), timeout_s: float | None = None, **args: Any) -> Message:
        """One round trip. Raises RemoteError on an error reply, ServerUnreachable on timeout."""
        t0 = time.perf_counter()
        frames = encode({"method": method, "args": args}, tensors)
        sock = self._connect()
        t1 = time.perf_counter()
        sock.send_multipart(frames, copy=False)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if not sock.poll(timeout * 1000, zmq.POLLIN):
            self.close()  # a REQ socket that missed its reply cannot be reused
            raise ServerUnreachable(f"no reply from GPU server at {self.endpoint} within {timeout:g} s ({method})")
        reply_frames = sock.recv_multipart(copy=False)
        t2 = time.perf_counter()
        reply = decode(reply_frames)
        t3 = time.perf_counter()
        self.stats.round_trips += 1
        self.stats.bytes_sent += frames_nbytes(frames)
        self.stats.bytes_received += frames_nbytes(reply_frames)
        self.stats.serialize_s += (t1 - t0) + (t3 - t2)
        self.stats.wait_s += t2 - t1
        self.stats.server_s += float(reply.header.get("server_s", 0.0))
        if not reply.header.get("ok", False):
            error = reply.header.get("error") or {}
            raise RemoteError(str(error.get("code", "error")), str(error.get("message", "unknown error")))
        return reply

    def ping(self, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> dict[str, Any]:
        """Check the server answers; used before work so an absent server fails fast."""
        return self.call("Ping", timeout_s=timeout_s).header


Handler = Callable[[list[Any]], list[Any]]


def serve_forever(endpoint: str, handle: Handler, stop: threading.Event, on_ready: Callable[[], None] | None = None,
                  context: zmq.Context | None = None) -> None:
    """Answer requests on a ROUTER socket until `stop` is set. `handle` maps request frames to
    reply frames and must not raise; one client's reply always goes back to that client."""
    context = context or zmq.Context.instance()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as err:
        sock.close()
        raise ProtocolError(f"cannot bind {endpoint}: {err}") from None
    if on_ready is not None:
        on_ready()
    try:
        while not stop.is_set():
            if not sock.poll(100, zmq.POLLIN):
                continue
            frames = sock.recv_multipart(copy=False)
            # [identity, empty delimiter (from REQ), header, *payloads]
            try:
                split = next(i for i, f in enumerate(frames) if len(f.buffer) == 0)
            except StopIteration:
                continue  # not a REQ envelope: nobody to answer
            envelope, body = frames[: split + 1], frames[split + 1 :]
            sock.send_multipart([*envelope, *handle(body)], copy=False)
    finally:
        sock.close(linger=0)
