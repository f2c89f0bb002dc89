"""Same-host fast link: one Unix-socket datagram each way per call, tensors in shared memory.

A shared-memory client (`--shm`) still pays ZeroMQ's path for every header: its I/O thread on
each side, four thread wake-ups per round trip. The fast link sends the same header frame
(tensors already in the client's segment, tsqp.shm) as one SOCK_SEQPACKET datagram straight
between the two application threads, which the serving loop polls beside its ROUTER socket.

Getting one: over its ZeroMQ connection (CurveZMQ or not) the client asks for a ticket, a
control message like a status query. The server answers with the socket's path, in a directory
only its own user can enter, and a one-time random token; the client connects, sends the token
first, and once the server accepts it the link speaks for the identity that asked (its CurveZMQ
key, which owns its sessions). Each side checks the other's uid (SO_PEERCRED). A server without
`--shm`, a path the client cannot reach (another mount namespace, an enclave), or a refused token
leaves the client on ZeroMQ.

What the link keeps from ZeroMQ's: status queries and their answers travel on it too, so a late
reply is handled as on the socket; a server that exits closes the socket, which the client sees
at once; a client that stops reading fills its socket's buffer and is dropped. What it gives
up: a reply too large for the client's segment cannot be framed here, so the server answers
`reply_room` with the room it needs and the client resends once, grown (every method may be
resent): the first call whose reply outgrows the segment is computed twice, unless the caller
said how large a reply to expect (`Client.call(..., reply_bytes=)`, as the runner's steps do).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import select
import shutil
import socket
import struct
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import msgpack

from .errors import ProtocolError
from .logs import log_event
from .spinning import ReplyWait

TOKEN_BYTES = 32
MAX_DATAGRAM = 96 << 10  # a request header is at most 64 KiB (server Limits); replies through the link are headers
SOCKET_NAME = "fast.sock"
MAX_TICKETS = 64  # issued, not yet used: the oldest are forgotten first
MAX_PEERS = 256
MAX_BATCH = 64  # datagrams taken from one peer per wake: a busy peer cannot hold the loop
TOKEN_WAIT_S = 2.0  # a connection that has not shown a token by then is dropped
ACCEPTED = b"\x01"  # the server's answer to a live token; to anything else it closes the link
TICKET_QUERY = "fastlink"
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

log = logging.getLogger("tsqp.server")


def ticket_query(number: int) -> bytes:
    """The control message that asks the server for a fast link (answered like a status query)."""
    return msgpack.packb([TICKET_QUERY, number])


def ticket_answer(number: int, ticket: tuple[str, bytes] | None) -> bytes:
    """[fastlink, n, path, token], or [fastlink, n] from a server that offers none."""
    return msgpack.packb([TICKET_QUERY, number, *(ticket or ())])


def read_ticket(answer: list, number: int) -> tuple[str, bytes] | None:
    """The path and token in a server's answer, if it offered a link (checked: the server is untrusted)."""
    if len(answer) != 4 or answer[:2] != [TICKET_QUERY, number]:
        return None
    path, token = answer[2], answer[3]
    if not (isinstance(path, str) and path.startswith("/") and path.endswith("/" + SOCKET_NAME)
            and len(path.encode()) < 108 and isinstance(token, bytes) and len(token) == TOKEN_BYTES):
        return None
    return path, token


def _peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))[1]


def _as_bytes(frame: Any) -> bytes:
    return frame if isinstance(frame, bytes) else bytes(frame)


class Peer:
    """One client's end of the link, on the server. `name` is whom it speaks for, once it showed its token."""

    def __init__(self, sock: socket.socket):
        self.sock, self.name, self.since = sock, None, time.monotonic()
        self.key = (b"fast", sock.fileno().to_bytes(4, "little"), secrets.token_bytes(8))  # never a ROUTER identity
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)

    def readable(self) -> bool:
        """Whether a receive would find something (a datagram, or the end): a poll costs a third
        of the receive that fails when nothing is there."""
        return bool(self._poller.poll(0))

    def send(self, frames: Sequence[Any]) -> bool:
        """One datagram; never blocks the serving loop. A reply that is not one frame (it did not
        fit the client's segment) becomes `reply_room`, for the client to grow and resend."""
        frame = _as_bytes(frames[0]) if len(frames) == 1 else _reply_room(frames[0])
        try:
            self.sock.send(frame, socket.MSG_DONTWAIT)
            return True
        except OSError as err:  # full (a client that does not read) or gone: drop it
            log_event(log, logging.WARNING, "fastlink_dropped", peer=self.name or "-", error=str(err))
            return False


def _reply_room(header_frame: Any) -> bytes:
    header = msgpack.unpackb(_as_bytes(header_frame))
    room = header.get("shm_room", 0)
    return msgpack.packb({"ok": False, "shm_room": room, "error": {
        "code": "reply_room", "message": f"the reply needs {room} bytes of shared memory behind the request"}})


class Listener:
    """The server's side: a listening socket in a private directory, the tickets it issued, its peers."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tsqp-fast-"))  # mode 0700: only this user gets in
        self.path = str(self.dir / SOCKET_NAME)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.tickets: OrderedDict[bytes, str] = OrderedDict()  # token -> the peer name that asked
        self.peers: dict[int, Peer] = {}  # by file descriptor

    def fileno(self) -> int:
        return self.sock.fileno()

    def ticket(self, name: str) -> tuple[str, bytes]:
        token = secrets.token_bytes(TOKEN_BYTES)
        self.tickets[token] = name
        while len(self.tickets) > MAX_TICKETS:
            self.tickets.popitem(last=False)
        return self.path, token

    def accept(self) -> tuple[Peer | None, list[int]]:
        """A new connection from this user, not yet authenticated (None if refused), and the
        descriptors of connections dropped for never showing a token."""
        stale = [fd for fd, p in self.peers.items() if p.name is None and time.monotonic() - p.since > TOKEN_WAIT_S]
        for fd in stale:
            self.drop(fd)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return None, stale
        if _peer_uid(conn) != os.geteuid() or len(self.peers) >= MAX_PEERS:
            conn.close()
            return None, stale
        conn.setblocking(False)
        peer = self.peers[conn.fileno()] = Peer(conn)
        return peer, stale

    def receive(self, fd: int) -> tuple[Peer, list[bytes]]:
        """The datagrams waiting on a peer's socket. A peer that closed, sent something oversized,
        or opened with anything but a live token is dropped (its list ends empty)."""
        peer, datagrams = self.peers[fd], []
        while len(datagrams) < MAX_BATCH:
            try:
                data, _, flags, _ = peer.sock.recvmsg(MAX_DATAGRAM)
            except BlockingIOError:
                return peer, datagrams
            except OSError:
                data, flags = b"", 0
            if not data or flags & socket.MSG_TRUNC:
                self.drop(fd)
                return peer, datagrams
            if peer.name is None:
                peer.name = self._redeem(data)
                if peer.name is None or not peer.send([ACCEPTED]):
                    self.drop(fd)
                    return peer, []
            else:
                datagrams.append(data)
            if not peer.readable():
                break
        return peer, datagrams

    def _redeem(self, token: bytes) -> str | None:
        for issued in list(self.tickets):
            if hmac.compare_digest(issued, token):
                return self.tickets.pop(issued)
        return None

    def drop(self, fd: int) -> None:
        peer = self.peers.pop(fd, None)
        if peer is not None:
            peer.sock.close()

    def close(self) -> None:
        for fd in list(self.peers):
            self.drop(fd)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class FastLink(ReplyWait):
    """The client's side, with the interface of the ZeroMQ link (tsqp.transport) that the call
    loop needs: connected from the start; `lost` once the server closed its end."""

    connected, refused, handshake_error = True, None, None

    def __init__(self, sock: socket.socket, spin_s: float):
        """Over `sock`, a connected socket the server has accepted."""
        super().__init__(spin_s)
        self.sock = sock
        self.sock.setblocking(True)
        self.poller = select.poll()
        self.poller.register(self.sock.fileno(), select.POLLIN)
        self.lost, self.queries = False, 0

    @classmethod
    def connect(cls, path: str, token: bytes, connect_timeout_s: float, spin_s: float) -> "FastLink":
        """Connect, show the token, and wait for the server to accept it (OSError if it does not)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(connect_timeout_s)
        try:
            sock.connect(path)
            if _peer_uid(sock) != os.geteuid():
                raise OSError(f"{path} is served by another user")
            sock.send(token)
            if sock.recv(16) != ACCEPTED:
                raise OSError("the server refused the ticket")
        except OSError:
            sock.close()
            raise
        return cls(sock, spin_s)

    def send(self, frames: Sequence[Any]) -> None:
        if len(frames) != 1:
            raise ValueError("the fast link carries header frames only (tensors go through shared memory)")
        if len(frames[0]) > MAX_DATAGRAM:
            raise ProtocolError(f"a request header of {len(frames[0])} bytes is over the fast link's "
                                f"{MAX_DATAGRAM} (and the server's limit)")
        self._send(_as_bytes(frames[0]))
        self._sent()

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError:
            self.lost = True  # the wait that follows reports it

    def query(self, frame: bytes) -> None:
        self._send(frame)

    def poll(self, timeout_ms: float) -> tuple[bool, bool]:
        """(something to receive, link events): the socket's end is an event too. Spins first
        (ReplyWait)."""
        if self.lost:
            return False, True
        return bool(self._waited(timeout_ms)), False

    def receive(self) -> list[bytes] | None:
        try:
            data = self.sock.recv(MAX_DATAGRAM)
        except OSError:
            data = b""
        if not data:
            self.lost = True
            return None
        self._answered()
        return [data]

    def read_events(self) -> None:
        """Between calls: a server that closed its end (exited, restarted) is lost now, not at the next send."""
        if any(events & (select.POLLHUP | select.POLLERR) for _, events in self.poller.poll(0)):
            self.lost = True

    def close(self) -> None:
        self.sock.close()
