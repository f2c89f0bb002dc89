"""The Python API the CLI is a thin layer over: start or connect to a server, run prefills.

    from tsqp import api
    with api.spawn_server("models/tiny") as server:
        runner = api.connect(server.endpoint, model_dir="models/tiny")
        result = runner.prefill(torch.randint(0, 512, (1, 128)))
        result.logits, result.seconds, result.breakdown_s
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import identity_mismatch, model_identity
from .errors import ModelError, ServerUnreachable, TsqpError
from .keys import ClientKeys, ServerKeys
from .server import GpuServer, Limits, ServerThread
from .tee.runner import TeeRunner
from .transport import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_HEARTBEAT_S, DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, Client


def free_endpoint(host: str = "127.0.0.1") -> str:
    """A tcp endpoint on a port nobody is listening on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def connect(endpoint: str, model_dir: str | Path | None = None, protocol: str = "lean", wire_dtype: str = "float32",
            timeout_s: float = DEFAULT_TIMEOUT_S, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, *,
            retries: int = DEFAULT_RETRIES, keys: ClientKeys | None = None,
            heartbeat_s: float = DEFAULT_HEARTBEAT_S, protection: str = "none", verify: bool = False,
            verify_dtype: str = "float32", shm: bool = False, fastlink: bool = True) -> TeeRunner:
    """A TEE runner for the server at `endpoint`; fails fast if the server does not answer.

    `timeout_s` bounds one reply, `connect_timeout_s` each (re)connection, `retries` the resends
    of a call after a lost connection. `keys` (CurveZMQ) default to $TSQP_SERVER_PUBLIC_KEY and
    $TSQP_CLIENT_SECRET_KEY when those are set; `ClientKeys.from_files(...)` makes them.
    `protection`, `verify` and `verify_dtype` go to the TeeRunner (private mode, Freivalds checks
    of float32 or float64 products). `shm` moves
    tensors through shared memory (same host, a server started with shm; tsqp.shm), and headers
    over the server's fast link unless `fastlink` is False (tsqp.fastlink). With a
    `model_dir`, a server holding another model is refused (ModelError)."""
    client = Client(endpoint, timeout_s=timeout_s, retries=retries, connect_timeout_s=connect_timeout_s, keys=keys,
                    heartbeat_s=heartbeat_s, shm=shm, fastlink=fastlink)
    try:
        health = client.ping(timeout_s=connect_timeout_s)
        if model_dir is not None:
            check_same_model(model_dir, health, client.endpoint)
        return TeeRunner(client, model_dir, protocol=protocol, wire_dtype=wire_dtype, protection=protection,
                         verify=verify, verify_dtype=verify_dtype)
    except BaseException:
        client.close()
        raise


def check_same_model(model_dir: str | Path, health: dict[str, Any], endpoint: str) -> None:
    """Refuse a server whose model is not this directory's (a mix-up, not an attack: a lying
    server can report any identity; --verify is what checks its answers)."""
    differs = identity_mismatch(model_identity(model_dir), health.get("identity"))
    if differs is not None:
        raise ModelError(f"the GPU server at {endpoint} holds another model than {model_dir}: {differs}")


def start_server(model_dir: str | Path, device: str | None = None, dtype: str = "float32",
                 endpoint: str | None = None, *, keys: ServerKeys | None = None, limits: Limits | None = None,
                 heartbeat_s: float = DEFAULT_HEARTBEAT_S, shm: bool = False) -> ServerThread:
    """A server in a thread of this process (shares the GIL: for tests and notebooks)."""
    server = GpuServer(model_dir, device, dtype, shm=shm, limits=limits)
    return ServerThread(server, endpoint or free_endpoint(), keys=keys, heartbeat_s=heartbeat_s)


class ServerProcess:
    """A server in its own process, as in a real deployment: for the demo, the benchmark, and tests
    that kill and restart it. With `server_secret_key`/`allow_keys` it serves CurveZMQ only, and
    `client_keys` (one on its allow-list) is what the start-up ping uses. `shm` lets local clients
    send tensors through shared memory (`serve --shm`). The server stops by itself if this process
    dies without stopping it (`serve --parent-pid`)."""

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: str = "float32",
                 endpoint: str | None = None, ready_timeout_s: float = 600.0, extra_args: tuple[str, ...] = (), *,
                 server_secret_key: str | Path | None = None, allow_keys: str | Path | None = None,
                 client_keys: ClientKeys | None = None, log_level: str = "INFO", shm: bool = False):
        self.endpoint = endpoint or free_endpoint()
        self.client_keys = client_keys
        cmd = [sys.executable, "-m", "tsqp", "serve", "--model", str(model_dir), "--dtype", dtype,
               "--endpoint", self.endpoint, "--log-level", log_level, "--parent-pid", str(os.getpid()), *extra_args]
        if device:
            cmd += ["--device", device]
        if shm:
            cmd.append("--shm")
        if server_secret_key or allow_keys:
            cmd += ["--server-secret-key", str(server_secret_key), "--allow-keys", str(allow_keys)]
        self._log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, text=True)
        self._wait_ready(ready_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with Client(self.endpoint, keys=self.client_keys) as client:
            while True:
                if self.process.poll() is not None:
                    lines = self.output().strip().splitlines()
                    raise TsqpError(f"server exited during start-up: {lines[-1] if lines else 'no output'}")
                try:
                    client.ping(timeout_s=0.5)
                    return
                except ServerUnreachable:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise TsqpError(f"server did not answer within {timeout_s:g} s of start-up") from None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (graceful: the request in progress is answered), then SIGKILL after `timeout_s`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-whatever, as a crash or a lost host would."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def rss_bytes(self) -> int | None:
        """The server's resident memory (Linux /proc), or None where that is not available."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def output(self) -> str:
        """Everything the server process has printed so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def spawn_server(model_dir: str | Path, **kwargs: Any) -> ServerProcess:
    return ServerProcess(model_dir, **kwargs)
