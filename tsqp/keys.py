"""CurveZMQ keys: make them, read them, and the server's allow-list of client public keys.

A key pair is two files in ZeroMQ's certificate format: `NAME.key` (public, safe to hand out)
and `NAME.key_secret` (public + secret, mode 0600). The server proves its identity with its
secret key; a client pins the server's public key and proves its own with its secret key; the
server admits only clients whose public key file lies in its allow-list directory.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils import z85

from .errors import TsqpError
from .logs import log_event

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
ENV_SERVER_SECRET_KEY = "TSQP_SERVER_SECRET_KEY"
ENV_ALLOWED_KEYS_DIR = "TSQP_ALLOWED_KEYS_DIR"
ENV_SERVER_PUBLIC_KEY = "TSQP_SERVER_PUBLIC_KEY"
ENV_CLIENT_SECRET_KEY = "TSQP_CLIENT_SECRET_KEY"

log = logging.getLogger("tsqp.server")


class SecurityError(TsqpError):
    """A key file is missing or malformed, or the channel would be less safe than asked for."""


class AuthenticationFailed(SecurityError):
    """The server refused this client's key, or the CurveZMQ handshake failed (wrong keys)."""


def require_curve() -> None:
    if not zmq.has("curve"):
        raise SecurityError("this libzmq was built without CurveZMQ support (zmq.has('curve') is False)")


@dataclass(frozen=True)
class KeyPair:
    """Z85-encoded keys (40 characters each); `secret` is None for a public-only key."""

    public: bytes
    secret: bytes | None = None


def _valid_z85(key: Any) -> bool:
    if not isinstance(key, bytes) or len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError):
        return False


def _read_key_file(path: str | os.PathLike, what: str) -> KeyPair:
    path = Path(path)
    if not path.is_file():
        raise SecurityError(f"{what} {path} not found")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise SecurityError(f"cannot read {what} {path}: {err}") from None
    if not _valid_z85(public) or (secret is not None and not _valid_z85(secret)):
        raise SecurityError(f"{what} {path} does not hold a CurveZMQ key")
    return KeyPair(public, secret)


def load_public(path: str | os.PathLike) -> bytes:
    """A public key from a `.key` file (a `.key_secret` file works too: it holds the public key)."""
    return _read_key_file(path, "public key file").public


def load_secret(path: str | os.PathLike) -> KeyPair:
    """A full key pair from a `.key_secret` file."""
    pair = _read_key_file(path, "secret key file")
    if pair.secret is None:
        raise SecurityError(f"{path} holds no secret key (pass the NAME{SECRET_SUFFIX} file, not NAME{PUBLIC_SUFFIX})")
    return pair


def load_allowed(directory: str | os.PathLike) -> frozenset[bytes]:
    """Every client public key in `directory/*.key`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SecurityError(f"allowed keys directory {directory} not found")
    return frozenset(load_public(p) for p in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")))


def _certificate(public: bytes, secret: bytes | None, name: str) -> str:
    """ZeroMQ's certificate text (the ZPL format that zmq.auth.load_certificate reads)."""
    kind = "secret" if secret else "public"
    lines = [f"#   TSQP CurveZMQ {kind} key '{name}', made {datetime.datetime.now():%Y-%m-%d %H:%M}",
             "#   " + ("Keep this file private." if secret else "Hand this file to the peer that must trust it."),
             "", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_new(path: Path, text: str, mode: int, force: bool) -> None:
    if path.exists() and not force:
        raise SecurityError(f"{path} already exists (pass --force to replace it)")
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as f:
        f.write(text)


def generate(out_dir: str | os.PathLike, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write NAME.key (public, 0644) and NAME.key_secret (0600) into `out_dir`; returns both paths."""
    require_curve()
    if not name or "/" in name or name.startswith("."):
        raise SecurityError(f"bad key name {name!r} (a plain file name, e.g. 'server' or 'tee-1')")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    public_path, secret_path = out / f"{name}{PUBLIC_SUFFIX}", out / f"{name}{SECRET_SUFFIX}"
    _write_new(secret_path, _certificate(public, secret, name), 0o600, force)
    _write_new(public_path, _certificate(public, None, name), 0o644, force)
    return public_path, secret_path


class AllowList:
    """The server's allow-list of client public keys, read from a directory.

    A new connection (the ZAP callback) always sees the directory as it is now; the per-request
    check of an established connection's key (`admits`) sees it at most `max_age_s` old. So an
    added, removed or overwritten key file takes effect without a restart, on open connections
    too. An unreadable directory keeps the last list that could be read."""

    def __init__(self, directory: str | os.PathLike, max_age_s: float = 1.0):
        self.directory = Path(directory)
        self.max_age_s = max_age_s
        self._keys: frozenset[bytes] = frozenset()
        self._read_at = -math.inf
        self._reload()

    def _reload(self) -> None:
        try:
            self._keys = load_allowed(self.directory)
        except (OSError, SecurityError) as err:  # keep the last good list
            log_event(log, logging.ERROR, "allow_list_unreadable", directory=str(self.directory), error=str(err))
        self._read_at = time.monotonic()

    def __len__(self) -> int:
        return len(self._keys)

    def admits(self, key: bytes) -> bool:
        """Whether `key` (Z85) is on the list, re-read when the copy in memory is older than max_age_s."""
        if time.monotonic() - self._read_at >= self.max_age_s:
            self._reload()
        return key in self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        self._reload()
        allowed = key in self._keys
        log_event(log, logging.INFO if allowed else logging.WARNING,
                  "client_accepted" if allowed else "client_refused", key=key.decode(errors="replace"))
        return allowed


@dataclass(frozen=True)
class ServerKeys:
    """What a CurveZMQ server needs: its own key pair and the directory of allowed client keys."""

    pair: KeyPair
    allowed_dir: Path

    @classmethod
    def from_files(cls, secret_key_file: str | os.PathLike, allowed_dir: str | os.PathLike) -> "ServerKeys":
        require_curve()
        pair = load_secret(secret_key_file)
        if not load_allowed(allowed_dir):
            raise SecurityError(f"no client public keys (*{PUBLIC_SUFFIX}) in {allowed_dir}: nobody could connect")
        return cls(pair, Path(allowed_dir))

    @classmethod
    def from_options(cls, secret_key_file: str | None, allowed_dir: str | None) -> "ServerKeys | None":
        """Both or neither: a server with a key but no allow-list would admit anyone."""
        if not secret_key_file and not allowed_dir:
            return None
        if not secret_key_file or not allowed_dir:
            raise SecurityError("CurveZMQ needs both --server-secret-key and --allow-keys "
                                f"(or ${ENV_SERVER_SECRET_KEY} and ${ENV_ALLOWED_KEYS_DIR})")
        return cls.from_files(secret_key_file, allowed_dir)

    def allow_list(self) -> AllowList:
        return AllowList(self.allowed_dir)

    def start_authenticator(self, context: zmq.Context, allow: AllowList | None = None) -> Any:
        """A ZAP handler on `context` that consults `allow` (default: a fresh AllowList); stop() it when done."""
        from zmq.auth.thread import ThreadAuthenticator

        allow = allow if allow is not None else self.allow_list()
        auth = ThreadAuthenticator(context, log=logging.getLogger("tsqp.zap"))
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=allow)
        return auth

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_server = True
        sock.curve_secretkey = self.pair.secret
        sock.curve_publickey = self.pair.public


@dataclass(frozen=True)
class ClientKeys:
    """What a CurveZMQ client needs: the server's public key (pinned) and its own key pair."""

    server_public: bytes
    pair: KeyPair

    @classmethod
    def from_files(cls, server_public_key_file: str | os.PathLike,
                   client_secret_key_file: str | os.PathLike) -> "ClientKeys":
        require_curve()
        return cls(load_public(server_public_key_file), load_secret(client_secret_key_file))

    @classmethod
    def from_options(cls, server_public_key_file: str | None,
                     client_secret_key_file: str | None) -> "ClientKeys | None":
        if not server_public_key_file and not client_secret_key_file:
            return None
        if not server_public_key_file or not client_secret_key_file:
            raise SecurityError("CurveZMQ needs both --server-public-key and --client-secret-key "
                                f"(or ${ENV_SERVER_PUBLIC_KEY} and ${ENV_CLIENT_SECRET_KEY})")
        return cls.from_files(server_public_key_file, client_secret_key_file)

    @classmethod
    def from_env(cls) -> "ClientKeys | None":
        """Keys named by $TSQP_SERVER_PUBLIC_KEY and $TSQP_CLIENT_SECRET_KEY, if set."""
        return cls.from_options(os.environ.get(ENV_SERVER_PUBLIC_KEY) or None,
                                os.environ.get(ENV_CLIENT_SECRET_KEY) or None)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.pair.public
        sock.curve_secretkey = self.pair.secret
