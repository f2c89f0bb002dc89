"""Same-host fast path: tensor payloads through a shared-memory segment instead of the socket.

A client that asks for it (`--shm`) creates one segment in /dev/shm, readable by its own user
only, and copies each request's tensors into it; the header frame, which says where they are,
goes over ZeroMQ or the server's fast link (tsqp.fastlink). A server that allows it (`serve
--shm`) maps the segment by name, reads the tensors in place, and writes its reply tensors behind
the request's, when they fit (otherwise they travel as frames, or come back as `reply_room` on
the fast link, and the client grows its segment). One user-space copy
each way replaces the socket's path through the kernel.

A segment is usable only by the client that made it: its first bytes hold a random key, which
only the segment's owner and the server can read, and every request naming the segment must
present it (compared in constant time) before the server reads or writes there. Names in
/dev/shm are visible to every local user and the server maps them with its own rights, so
without the key anyone who can reach the server could read or overwrite another client's
tensors through it.

Nothing in shared memory is trusted more than a frame would be: the client copies reply
tensors out before it looks at them (the server could still write there), and the server
bounds-checks every location. A client that shrinks its segment while the server reads it can
crash the server (SIGBUS), so servers allow this only with `serve --shm`.
"""

from __future__ import annotations

import hmac
import mmap
import os
import re
import secrets
import stat
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import ProtocolError
from .protocol import Message, decode_header, decode_payloads, encode, encode_header, tensor_frame

SHM_DIR = Path("/dev/shm")
NAME = re.compile(r"tsqp-[0-9a-f]{32}")  # the only names a server will open: no paths, no other files
ALIGN = 64
KEY_BYTES = 32  # the segment's key, at offset 0
DATA_START = ALIGN  # tensors and replies lie behind the key, never over it
MAX_ATTACHED = 64  # segments a server keeps mapped (least recently used are dropped)
MAX_REPLY_ROOM = 1 << 34  # the most reply room a server may make a client set aside (16 GiB)

Location = list[int]  # [offset, nbytes]


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def footprint(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes `tensors` take in a segment, alignment included."""
    return sum(aligned(t.numel() * t.element_size()) for t in tensors)


class Segment:
    """One mapped shared-memory segment."""

    def __init__(self, name: str, mapping: mmap.mmap, owner: bool):
        self.name, self.map, self.owner = name, mapping, owner
        self.size = len(mapping)
        self.key = bytes(mapping[:KEY_BYTES])

    @classmethod
    def create(cls, size: int) -> "Segment":
        """A new segment with `size` bytes of room (the client's), private to this user, keyed."""
        name = f"tsqp-{uuid.uuid4().hex}"
        fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, DATA_START + max(size, 0))
            mapping = mmap.mmap(fd, DATA_START + max(size, 0))
            mapping[:KEY_BYTES] = secrets.token_bytes(KEY_BYTES)
            segment = cls(name, mapping, owner=True)
        finally:
            os.close(fd)
        weakref.finalize(segment, (SHM_DIR / name).unlink, missing_ok=True)  # even if never closed
        return segment

    @classmethod
    def attach(cls, name: Any) -> "Segment":
        """Map a client's segment by name (the server's side)."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ProtocolError(f"bad shared-memory segment name {str(name)[:60]!r}")
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as err:
            raise ProtocolError(f"cannot open shared memory {name} ({err.strerror}): the client must run on the "
                                "server's host, as the same user") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise ProtocolError(f"shared memory {name} is not a file of this server's user")
            size = info.st_size
            if size < DATA_START:
                raise ProtocolError(f"shared memory {name} is too small to hold a key")
            return cls(name, mmap.mmap(fd, size), owner=False)
        finally:
            os.close(fd)

    def write(self, tensors: Sequence[torch.Tensor], start: int) -> list[Location]:
        """Copy `tensors` in from `start` (aligned); their locations. The caller checked the room."""
        if self.map.closed:
            raise ProtocolError(f"shared-memory segment {self.name} is closed")
        locations, at = [], aligned(start)
        for t in tensors:
            data = tensor_frame(t)
            self.map[at: at + data.nbytes] = data  # a plain memcpy: beat torch's copy_ at every size measured
            locations.append([at, data.nbytes])
            at = aligned(at + data.nbytes)
        return locations

    def views(self, locations: Any) -> list[memoryview]:
        """Buffers at `locations`, each checked to lie inside the segment's data (behind the key)."""
        if not isinstance(locations, list):
            raise ProtocolError("shared-memory 'frames' must be a list of [offset, nbytes]")
        whole, views = memoryview(self.map), []
        for loc in locations:
            if not (isinstance(loc, list) and len(loc) == 2 and all(type(v) is int and v >= 0 for v in loc)
                    and loc[0] >= DATA_START and loc[0] + loc[1] <= self.size):
                raise ProtocolError(f"shared-memory location {str(loc)[:40]} lies outside the data "
                                    f"[{DATA_START}, {self.size}) of the segment")
            views.append(whole[loc[0]: loc[0] + loc[1]])
        return views

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with it
            pass
        if self.owner:
            (SHM_DIR / self.name).unlink(missing_ok=True)


def encode_request(segment: Segment, header: dict[str, Any], tensors: Sequence[torch.Tensor]) -> list[bytes]:
    """A request whose tensors are copied into `segment`: one header frame, no payload frames.
    The reply may use the room behind them."""
    locations = segment.write(tensors, DATA_START)
    end = locations[-1][0] + locations[-1][1] if locations else DATA_START
    shared = {"name": segment.name, "key": segment.key, "frames": locations, "reply_at": aligned(end)}
    return [encode_header(dict(header, shm=shared), tensors)]


def reply_room(header: dict[str, Any]) -> int:
    """The room a framed reply says it needed (`shm_room`), checked: the server is not trusted."""
    room = header.get("shm_room", 0)
    if type(room) is not int or not 0 <= room <= MAX_REPLY_ROOM:
        raise ProtocolError(f"bad 'shm_room' in the server's reply: {str(room)[:40]}")
    return room


def decode_reply(frames: Sequence[Any], segment: Segment) -> tuple[Message, int]:
    """A reply whose tensors may lie in `segment`: copied out (the server could still write
    there) before anyone looks at them. Also the bytes that came through shared memory."""
    header = decode_header(frames[0])
    shared = header.get("shm")
    if not isinstance(shared, dict) or len(frames) != 1:
        return decode_payloads(header, frames), 0
    views = segment.views(shared.get("frames"))
    message = decode_payloads(header, [frames[0], *views])
    message.tensors = [t.clone() for t in message.tensors]
    return message, sum(v.nbytes for v in views)


@dataclass
class ReplyTo:
    """Where a request said its reply may go: behind its tensors in the client's segment."""

    segment: Segment
    at: int

    def encode(self, header: dict[str, Any], outputs: Sequence[torch.Tensor]) -> list[Any]:
        """Reply frames: the tensors written at `at` when they fit, else sent as frames with the
        room they needed (`shm_room`), so the client can grow its segment."""
        need = footprint(outputs)
        if aligned(self.at) + need <= self.segment.size:
            header["shm"] = {"frames": self.segment.write(outputs, self.at)}
            return [encode_header(header, outputs)]
        header["shm_room"] = need
        return encode(header, outputs)


class Attached:
    """The server's mapped client segments, by name, least recently used dropped first."""

    def __init__(self, limit: int = MAX_ATTACHED):
        self.limit = limit
        self._segments: OrderedDict[str, Segment] = OrderedDict()

    def request(self, shared: dict[str, Any]) -> tuple[list[memoryview], ReplyTo]:
        """A request's `shm` field, checked: the segment's key before anything there is read or
        written, then every location, `reply_at` included, inside the segment's data."""
        key, at = shared.get("key"), shared.get("reply_at")
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ProtocolError(f"'shm' must carry the segment's {KEY_BYTES}-byte 'key'")
        segment = self.get(shared.get("name"), key)
        views = segment.views(shared.get("frames"))
        if type(at) is not int or not DATA_START <= at <= segment.size:
            raise ProtocolError(f"shared-memory 'reply_at' {str(at)[:40]} lies outside the data "
                                f"[{DATA_START}, {segment.size}] of the segment")
        return views, ReplyTo(segment, at)

    def get(self, name: Any, key: bytes) -> Segment:
        """The segment called `name`, if `key` is its key (constant time); mapped once, kept."""
        segment = self._segments.get(name) if isinstance(name, str) else None
        if segment is not None:  # names are never reused: a client that outgrows its segment makes a new one
            _check_key(segment, key)
            self._segments.move_to_end(name)
            return segment
        segment = Segment.attach(name)
        try:
            _check_key(segment, key)
        except ProtocolError:
            segment.close()
            raise
        for gone in [n for n in self._segments if not (SHM_DIR / n).exists()]:
            self._segments.pop(gone).close()  # its client closed or outgrew it: free the memory now
        self._segments[name] = segment
        while len(self._segments) > self.limit:
            self._segments.popitem(last=False)[1].close()
        return segment

    def close(self) -> None:
        for segment in self._segments.values():
            segment.close()
        self._segments.clear()


def _check_key(segment: Segment, key: bytes) -> None:
    if not hmac.compare_digest(segment.key, key):
        raise ProtocolError(f"wrong key for shared memory {segment.name}: a segment serves only the client "
                            "that created it")
