"""Server-side wrappers for seeing and testing what crosses the boundary.

`audited` records every request the server receives, exactly as received: for tests and for users
who want to see what the untrusted host sees (`tsqp serve --audit DIR`).
`tampering` makes a dishonest server that corrupts results, for testing `--verify`
(`tsqp serve --tamper MODE`, never for real use).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import protocol
from .errors import ProtocolError
from .router import Handler

TAMPER_MODES = ("element", "row", "scale")


@dataclass
class Received:
    """One request as the server saw it."""

    method: str
    args: dict[str, Any]
    tensors: list[torch.Tensor]


@dataclass
class AuditLog:
    """Requests in memory, and optionally on disk as `requests.jsonl` plus one .npy per tensor."""

    directory: Path | None = None
    requests: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.directory is not None:
            self.directory = Path(self.directory)
            self.directory.mkdir(parents=True, exist_ok=True)

    def record(self, frames: list[Any]) -> None:
        try:
            message = protocol.decode(frames)
            entry = Received(str(message.header.get("method")), dict(message.header.get("args") or {}),
                             [t.clone() for t in message.tensors])
        except ProtocolError as err:
            entry = Received("<malformed>", {"error": str(err)}, [])
        with self._lock:
            index = len(self.requests)
            self.requests.append(entry)
            if self.directory is not None:
                self._write(index, entry)

    def _write(self, index: int, entry: Received) -> None:
        files = []
        for j, t in enumerate(entry.tensors):
            name = f"{index:07d}-{j}.npy"
            array = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
            np.save(self.directory / name, array)
            files.append(name)
        line = {"index": index, "method": entry.method, "args": entry.args, "tensors": files,
                "specs": [protocol.tensor_spec(t) for t in entry.tensors]}
        with open(self.directory / "requests.jsonl", "a") as f:
            f.write(json.dumps(line, default=str) + "\n")


def audited(handle: Handler, log: AuditLog) -> Handler:
    def handle_and_record(frames: list[Any]) -> list[Any]:
        log.record(frames)
        return handle(frames)

    return handle_and_record


def tampering(handle: Handler, mode: str, methods: tuple[str, ...] = ("Linear", "Linears", "LMHead", "QKVScores",
                                                                      "AttnGate", "DownScores", "DownHead", "Gate",
                                                                      "GatedDown", "AttnOut", "Matmul"),
              every: int = 1) -> Handler:
    """A dishonest server: corrupts the first result tensor of every `every`-th compute reply.
    element: +1% of the tensor's largest magnitude on one element; row: one row +1%; scale: x1.001."""
    if mode not in TAMPER_MODES:
        raise ValueError(f"unknown tamper mode '{mode}' (choose from: {', '.join(TAMPER_MODES)})")
    count = 0

    def handle_and_corrupt(frames: list[Any]) -> list[Any]:
        nonlocal count
        reply_frames = handle(frames)
        try:
            method = protocol.decode(frames).header.get("method")
        except ProtocolError:
            return reply_frames
        reply = protocol.decode(reply_frames)
        if method not in methods or not reply.header.get("ok") or not reply.tensors:
            return reply_frames
        count += 1
        if count % every:
            return reply_frames
        first = reply.tensors[0].clone()
        corrupt(first, mode)
        header = {k: v for k, v in reply.header.items() if k != "tensors"}
        return protocol.encode(header, [first, *reply.tensors[1:]])

    return handle_and_corrupt


def corrupt(t: torch.Tensor, mode: str, size: float = 1e-2) -> None:
    """Change `t` in place by a small, plausible amount."""
    flat = t.view(-1, t.shape[-1])
    delta = size * flat.abs().max()
    if mode == "element":
        flat[flat.shape[0] // 2, flat.shape[1] // 3] += delta
    elif mode == "row":
        flat[flat.shape[0] // 2] += delta
    else:
        flat.mul_(1.001)

