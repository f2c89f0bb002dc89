"""State that session methods keep between requests, owned per session and bounded in bytes.

A session is named by its client and belongs to whoever opened it: under CurveZMQ the client's
authenticated key, on a plaintext socket nobody in particular (there the id, 128 random bits
from the TEE, is all that keeps it apart). The store holds each session's tensors under keys
the methods choose (the KV cache, allocated once for the session's capacity and written at
positions; ("up", layer)), counts their bytes against one budget, drops the least recently used
sessions to make room, and drops sessions left idle too long.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from ..kv_cache import KVCache
from ..logs import log_event
from ..router import current_peer
from .errors import TooLarge

log = logging.getLogger("tsqp.server")


def current_owner() -> str:
    """Whom the sessions of the request being served belong to: the client's CurveZMQ key; on a
    plaintext socket nobody (its routing identity changes on every reconnect, and a TEE
    reconnects and resends)."""
    peer = current_peer.get()
    return peer if peer.startswith("key:") else ""


def tensor_bytes(t: "torch.Tensor | KVCache") -> int:
    """What keeping `t` holds in memory: a tensor's whole storage, not only the view's elements."""
    return t.untyped_storage().nbytes() if isinstance(t, torch.Tensor) else t.nbytes


@dataclass
class Session:
    owner: str
    id: str
    tensors: dict[Hashable, "torch.Tensor | KVCache"] = field(default_factory=dict)
    nbytes: int = 0
    used: float = 0.0  # the store's clock at the last request that named it


class SessionStore:
    """Sessions by (owner, id), least recently used first; every lookup counts as a use."""

    def __init__(self, budget_bytes: int, idle_s: float, clock: Callable[[], float] = time.monotonic):
        if budget_bytes <= 0 or idle_s <= 0:
            raise ValueError("the session memory budget and idle timeout must be positive")
        self.budget, self.idle_s, self.clock = budget_bytes, idle_s, clock
        self._sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def find(self, owner: str, sid: str) -> Session | None:
        """The session, if `owner` has one of that id; another owner's is not found."""
        self.expire()
        session = self._sessions.get((owner, sid))
        if session is not None:
            self._sessions.move_to_end((owner, sid))
            session.used = self.clock()
        return session

    def open(self, owner: str, sid: str) -> Session:
        """The session, made empty if it does not exist."""
        session = self.find(owner, sid)
        if session is None:
            session = self._sessions[(owner, sid)] = Session(owner, sid, used=self.clock())
        return session

    def reserve(self, session: Session, key: Hashable, nbytes: int) -> None:
        """Make room for `nbytes` under `key` (replacing what is there) before it is allocated:
        older sessions are dropped as needed; a session that alone would exceed the budget is
        refused."""
        old = session.tensors.get(key)
        growth = nbytes - (tensor_bytes(old) if old is not None else 0)
        if session.nbytes + growth > self.budget:
            if not session.tensors:
                self.release(session.owner, session.id)  # nothing to keep it for
            raise TooLarge(f"session {session.id!r} would keep {session.nbytes + growth} bytes, over the session "
                           f"memory budget of {self.budget} bytes (serve --session-memory-mb)")
        while self.nbytes + growth > self.budget:
            oldest = next(s for s in self._sessions.values() if s is not session)
            self._drop(oldest, "memory")

    def keep(self, session: Session, key: Hashable, t: torch.Tensor) -> None:
        """Keep `t` under `key` for the session's later requests."""
        nbytes = tensor_bytes(t)
        self.reserve(session, key, nbytes)
        self._forget(session, key)
        session.tensors[key] = t
        session.nbytes += nbytes
        self.nbytes += nbytes

    def discard(self, session: Session, which: Callable[[Hashable], bool]) -> None:
        """Drop the session's tensors whose key matches (it keeps existing, maybe empty)."""
        for key in [k for k in session.tensors if which(k)]:
            self._forget(session, key)

    def _forget(self, session: Session, key: Hashable) -> None:
        kept = session.tensors.pop(key, None)
        if kept is not None:
            freed = tensor_bytes(kept)
            session.nbytes -= freed
            self.nbytes -= freed

    def release(self, owner: str, sid: str) -> None:
        """Drop the session and everything it keeps; an unknown one is fine (a resend, or expired)."""
        session = self._sessions.get((owner, sid))
        if session is not None:
            self._drop(session, None)

    def expire(self) -> None:
        """Drop sessions idle longer than the timeout (the least recently used come first)."""
        horizon = self.clock() - self.idle_s
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest.used > horizon:
                return
            self._drop(oldest, "idle")

    def clear(self) -> None:
        for session in list(self._sessions.values()):
            self._drop(session, None)

    def _drop(self, session: Session, reason: str | None) -> None:
        del self._sessions[(session.owner, session.id)]
        self.nbytes -= session.nbytes
        if reason is not None:  # dropped before its client was done with it: worth a line
            log_event(log, logging.INFO, "session_dropped", reason=reason, owner=session.owner or "-",
                      session_bytes=session.nbytes, sessions=len(self._sessions))
