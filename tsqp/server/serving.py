"""Serving: a server in a thread of this process (API, tests) or in the foreground (`tsqp serve`)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

import torch

from ..logs import log_event
from ..router import DEFAULT_HEARTBEAT_S, Handler, serve_forever
from ..transport import is_loopback
from .checks import Limits
from .core import GpuServer
from .errors import InsecureBind
from .model import parse_dtype, resolve_device

if TYPE_CHECKING:
    from ..keys import ServerKeys

log = logging.getLogger("tsqp.server")


class ServerThread:
    """A server running in a background thread of this process: for the Python API and tests.
    It does not spin between requests by default (`spin_s`): a spinning thread would hold the
    GIL its own clients in this process need."""

    def __init__(self, server: GpuServer, endpoint: str, keys: "ServerKeys | None" = None,
                 heartbeat_s: float = DEFAULT_HEARTBEAT_S, spin_s: float = 0.0):
        self.server, self.endpoint, self.keys, self.spin_s = server, endpoint, keys, spin_s
        self._stop, ready = threading.Event(), threading.Event()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, heartbeat_s), daemon=True, name="tsqp-server")
        self._thread.start()
        ready.wait(10)
        if self._errors:
            raise self._errors[0]

    def _run(self, ready: threading.Event, heartbeat_s: float) -> None:
        try:
            serve_forever(self.endpoint, self.server.handle, self._stop, ready.set, keys=self.keys,
                          max_message_bytes=self.server.service.limits.max_message_bytes, heartbeat_s=heartbeat_s,
                          fast=self.server.shared is not None, spin_s=self.spin_s)
        except BaseException as err:  # surfaced to the constructor
            self._errors.append(err)
            ready.set()
        finally:
            self.server.release()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def check_bind(endpoint: str, keys: "ServerKeys | None", insecure: bool) -> None:
    """Plaintext stays on loopback unless the operator says --insecure: the channel carries the
    activations, and without CurveZMQ anyone on the network could read them or use the server."""
    if keys is None and not is_loopback(endpoint):
        if not insecure:
            raise InsecureBind(f"refusing to serve {endpoint} in plaintext: pass --server-secret-key and "
                               "--allow-keys (CurveZMQ, see `tsqp keygen`), bind 127.0.0.1, or pass --insecure")
        log_event(log, logging.WARNING, "insecure_bind", endpoint=endpoint,
                  message="plaintext on a network interface: anyone who can reach it can read and use it")


class _LoadedOnBind:
    """The handler `run` serves with: the model loads once the endpoint is bound (a busy port
    fails in a second, not after the load), and requests that queue meanwhile wait for it."""

    def __init__(self, load: Callable[[], tuple[GpuServer, Handler]]):
        self._load = load
        self.server: GpuServer | None = None
        self._handle: Handler | None = None

    def bound(self) -> None:
        self.server, self._handle = self._load()

    def __call__(self, frames: list[Any]) -> list[Any]:
        assert self._handle is not None, "serve_forever calls on_ready before it serves"
        return self._handle(frames)

    def rehearse(self) -> None:
        if self.server is not None:
            self.server.rehearse()


def run(model_dir: str | Path, device: str | None, dtype: str, endpoint: str, stop: threading.Event | None = None,
        out: TextIO | None = None, *, keys: "ServerKeys | None" = None, insecure: bool = False,
        limits: Limits | None = None, heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        wrap: Callable[[Handler], Handler] | None = None, shm: bool = False, spin_s: float | None = None) -> None:
    """Bind, load the model, serve until `stop` is set (or forever), printing the seed's
    start-up lines to `out` (stdout). `wrap` decorates the handler (e.g. audit.audited) without
    touching the validation inside it. `spin_s`: the serving loop's spin budget (tsqp.spinning;
    None: $TSQP_SERVE_SPIN_US or the default). Everything that can be refused without the model (the
    bind policy, the device, the dtype) is, first."""
    check_bind(endpoint, keys, insecure)
    device, defaulted = resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    limits = limits or Limits()

    def say(line: str) -> None:
        print(line, file=out or sys.stdout, flush=True)

    def load() -> tuple[GpuServer, Handler]:
        if defaulted and device == "cpu":
            say("note: CUDA is not available; serving on the CPU")
        say(f"Loading model from: {model_dir}")
        say(f"Device: {device}, Dtype: {torch_dtype}")
        server = GpuServer(model_dir, device, dtype, shm=shm, limits=limits)
        say(f"✓ Model loaded: {server.config.num_layers} layers, hidden_size={server.config.hidden_size}")
        threads = torch.get_num_threads()
        if server.rows_alone:
            say(f"✓ Decode products (≤ {server.rows_alone} rows) on one thread: as fast as on all {threads} "
                "(measured at load)")
        elif server.device.type == "cpu":
            say(f"  Decode products on all {threads} threads (measured at load: one thread alone was slower, "
                "or the model too small to tell)")
        swapped = "; ".join(f"{'x'.join(map(str, shape))} at rows {', '.join(map(str, sorted(rows)))}"
                            for shape, rows in server.transposed_rows_by_shape.items() if rows)
        if swapped:
            say(f"✓ Decode products as (W x^T)^T where faster at load: {swapped}")
        say(f"✓ ZeroMQ server started on {endpoint_name(endpoint)}")
        log_event(log, logging.INFO, "start", endpoint=endpoint, model=str(model_dir), device=device, dtype=dtype,
                  curve="on" if keys else "off", shm="on" if shm else "off",
                  allowed_keys=str(keys.allowed_dir) if keys else "-",
                  max_message_bytes=limits.max_message_bytes, max_reply_bytes=server.service.limits.max_reply_bytes,
                  session_bytes=limits.session_bytes, decode_alone_rows=server.rows_alone,
                  decode_transposed=swapped or "-")
        return server, wrap(server.handle) if wrap is not None else server.handle

    serving = _LoadedOnBind(load)
    try:
        serve_forever(endpoint, serving, stop or threading.Event(), serving.bound, keys=keys,
                      max_message_bytes=limits.max_message_bytes, heartbeat_s=heartbeat_s, fast=shm, spin_s=spin_s,
                      rehearse=serving.rehearse)
    finally:
        if serving.server is not None:
            serving.server.release()
            state = serving.server.service
            log_event(log, logging.INFO, "stop", endpoint=endpoint, requests=state.requests,
                      errors=sum(state.errors.values()), uptime_s=round(time.monotonic() - state.started, 3))


def endpoint_name(endpoint: str) -> str:
    """The seed's wording: `port N` for tcp, else the endpoint itself."""
    return f"port {endpoint.rsplit(':', 1)[-1]}" if endpoint.startswith("tcp://") else endpoint
