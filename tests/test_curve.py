"""CurveZMQ: keys, the server's allow-list, a client that pins the server's key, refusals."""

from __future__ import annotations

import logging
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from tsqp import api, keys
from tsqp.errors import ServerUnreachable
from tsqp.keys import AuthenticationFailed, ClientKeys, SecurityError, ServerKeys

from conftest import reference_logits, relative_error, run_cli

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CurveZMQ")


@dataclass
class Keys:
    root: Path
    server_public: Path
    server_secret: Path
    allowed: Path

    def client(self, name: str, server_public: Path | None = None) -> ClientKeys:
        return ClientKeys.from_files(server_public or self.server_public, self.root / f"{name}.key_secret")


@pytest.fixture(scope="module")
def key_files(tmp_path_factory) -> Keys:
    root = tmp_path_factory.mktemp("keys")
    server_public, server_secret = keys.generate(root, "server")
    for name in ("alice", "mallory"):
        keys.generate(root, name)
    allowed = root / "allowed"
    allowed.mkdir()
    shutil.copy(root / "alice.key", allowed)
    return Keys(root, server_public, server_secret, allowed)


@pytest.fixture(scope="module")
def secure_server(tiny_dir, key_files):
    server_keys = ServerKeys.from_files(key_files.server_secret, key_files.allowed)
    with api.start_server(tiny_dir, device="cpu", keys=server_keys) as server:
        yield server


def test_keygen_writes_a_private_secret_and_a_public_key(tmp_path):
    public, secret = keys.generate(tmp_path, "tee-1")
    assert (public.name, secret.name) == ("tee-1.key", "tee-1.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pair = keys.load_secret(secret)
    assert keys.load_public(public) == pair.public and len(pair.secret) == 40
    with pytest.raises(SecurityError, match="already exists"):
        keys.generate(tmp_path, "tee-1")
    with pytest.raises(SecurityError, match="holds no secret key"):
        keys.load_secret(public)
    (tmp_path / "junk.key").write_text("not a key\n")
    with pytest.raises(SecurityError, match="junk.key"):
        keys.load_public(tmp_path / "junk.key")


def test_allowed_client_gets_exact_logits(secure_server, key_files, references, tiny_dir):
    runner = api.connect(secure_server.endpoint, tiny_dir, keys=key_files.client("alice"))
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(3))
    logits = runner.prefill(ids, all_positions=True).logits
    runner.client.close()
    assert relative_error(logits, reference_logits(references["gqa"], ids)) <= 1e-4


def test_client_not_on_the_allow_list_is_refused_at_once(secure_server, key_files, tiny_dir, caplog):
    caplog.set_level(logging.INFO, logger="tsqp.server")
    start = time.monotonic()
    with pytest.raises(AuthenticationFailed, match="refused this client's key"):
        api.connect(secure_server.endpoint, tiny_dir, keys=key_files.client("mallory"), connect_timeout_s=5)
    assert time.monotonic() - start < 2
    mallory = keys.load_public(key_files.root / "mallory.key").decode()
    refused = [r for r in caplog.records if r.getMessage() == "client_refused"]
    assert refused and refused[-1].fields["key"] == mallory and refused[-1].levelno == logging.WARNING


def test_client_without_keys_is_refused_with_a_clear_error(secure_server, tiny_dir):
    start = time.monotonic()
    with pytest.raises(AuthenticationFailed, match="requires CurveZMQ keys"):
        api.connect(secure_server.endpoint, tiny_dir, connect_timeout_s=1)
    assert time.monotonic() - start < 3


def test_client_pinning_the_wrong_server_key_is_refused(secure_server, key_files, tiny_dir):
    wrong = key_files.client("alice", server_public=key_files.root / "mallory.key")
    with pytest.raises(AuthenticationFailed, match="server-public-key"):
        api.connect(secure_server.endpoint, tiny_dir, keys=wrong, connect_timeout_s=1)


def test_a_key_added_to_the_allow_list_needs_no_restart(tiny_dir, key_files, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(key_files.root / "alice.key", allowed)
    with api.start_server(tiny_dir, device="cpu", keys=ServerKeys.from_files(key_files.server_secret, allowed)) as s:
        with pytest.raises(AuthenticationFailed):
            api.connect(s.endpoint, tiny_dir, keys=key_files.client("mallory"))
        time.sleep(0.01)  # a distinct directory mtime
        shutil.copy(key_files.root / "mallory.key", allowed)
        runner = api.connect(s.endpoint, tiny_dir, keys=key_files.client("mallory"))
        assert runner.client.ping()["ok"]
        runner.client.close()


def test_plaintext_client_of_a_curve_server_never_reads_a_reply(secure_server):
    """Not even a ping: the handshake fails before any message is delivered."""
    from tsqp.transport import Client

    with Client(secure_server.endpoint, connect_timeout_s=1, retries=0) as client:
        with pytest.raises((AuthenticationFailed, ServerUnreachable)):
            client.ping()


def test_an_idle_client_whose_handshakes_keep_failing_stalls_no_other_connection(secure_server, key_files,
                                                                                  monkeypatch):
    """libzmq's I/O thread sends monitor events blocking: a client with a stale server key,
    reconnecting while nobody reads its events, used to stall every socket of the process
    after 1,000 failed handshakes (here one per millisecond)."""
    from tsqp import transport

    def fast_reconnects(sock, heartbeat_s):
        sock.setsockopt(zmq.RECONNECT_IVL, 1)
        original(sock, heartbeat_s)

    original = transport.set_heartbeat
    monkeypatch.setattr(transport, "set_heartbeat", fast_reconnects)
    stale = transport.Client(secure_server.endpoint, retries=0,
                             keys=key_files.client("alice", server_public=key_files.root / "mallory.key"))
    link = stale._ready_link()  # connects in the background; its events go unread
    try:
        time.sleep(3)
        with transport.Client(secure_server.endpoint, keys=key_files.client("alice"), connect_timeout_s=3,
                              retries=0) as client:
            assert client.ping()["ok"]
    finally:
        while link.monitor.poll(0):  # unstalls the I/O thread if it is stalled, so that close cannot hang
            link.monitor.recv_multipart()
        stale.close()


def test_server_keys_need_an_allow_list(key_files, tmp_path):
    with pytest.raises(SecurityError, match="both --server-secret-key and --allow-keys"):
        ServerKeys.from_options(str(key_files.server_secret), None)
    with pytest.raises(SecurityError, match="no client public keys"):
        ServerKeys.from_files(key_files.server_secret, tmp_path)


def test_client_keys_from_the_environment(secure_server, key_files, monkeypatch):
    from tsqp.transport import Client

    monkeypatch.setenv("TSQP_SERVER_PUBLIC_KEY", str(key_files.server_public))
    monkeypatch.setenv("TSQP_CLIENT_SECRET_KEY", str(key_files.root / "alice.key_secret"))
    with Client(secure_server.endpoint) as client:
        assert client.ping()["ok"]
    monkeypatch.delenv("TSQP_CLIENT_SECRET_KEY")
    with pytest.raises(SecurityError, match="both --server-public-key and --client-secret-key"):
        Client(secure_server.endpoint)


def test_cli_keygen_serve_and_prefill_over_curve(tiny_dir, references, tmp_path, capsys):
    from tsqp.cli import main

    assert main(["keygen", "--out", str(tmp_path / "k"), "--name", "server"]) == 0
    assert "public key:" in capsys.readouterr().out and (tmp_path / "k" / "server.key_secret").is_file()
    assert main(["keygen", "--out", str(tmp_path / "k"), "--name", "server"]) == 1
    assert "already exists" in capsys.readouterr().err
    keys.generate(tmp_path / "k" / "clients", "tee")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(tmp_path / "k" / "clients" / "tee.key", allowed)
    client_keys = ClientKeys.from_files(tmp_path / "k" / "server.key", tmp_path / "k" / "clients" / "tee.key_secret")
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(8))
    np.save(tmp_path / "ids.npy", ids.numpy())
    with api.spawn_server(tiny_dir, device="cpu", server_secret_key=tmp_path / "k" / "server.key_secret",
                          allow_keys=allowed, client_keys=client_keys) as server:
        ok = run_cli("prefill", "--endpoint", server.endpoint, "--model", str(tiny_dir), "--input-ids",
                     str(tmp_path / "ids.npy"), "--save-logits", str(tmp_path / "logits.npy"), "--all-positions",
                     "--server-public-key", str(tmp_path / "k" / "server.key"),
                     "--client-secret-key", str(tmp_path / "k" / "clients" / "tee.key_secret"))
        refused = run_cli("prefill", "--endpoint", server.endpoint, "--model", str(tiny_dir), "--tokens", "8",
                          "--connect-timeout", "2")
    assert ok.returncode == 0, ok.stderr
    logits = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    assert relative_error(logits, reference_logits(references["gqa"], ids)) <= 1e-4
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: ") and "CurveZMQ" in refused.stderr
    assert "curve=on" in server.output()


def _until(condition, seconds: float = 10.0) -> bool:
    """Poll `condition` (a per-request check sees the allow-list at most a second old)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _refused(client) -> bool:
    try:
        client.ping()
        return False
    except AuthenticationFailed as err:
        assert "allow-list" in str(err)
        return True


def test_a_key_overwritten_in_place_takes_effect_at_once_for_new_connections(tiny_dir, key_files, tmp_path):
    """Overwriting a key file leaves the directory's mtime alone: the new key must get in, the old one not."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(key_files.root / "alice.key", allowed / "tee.key")
    with api.start_server(tiny_dir, device="cpu", keys=ServerKeys.from_files(key_files.server_secret, allowed)) as s:
        api.connect(s.endpoint, tiny_dir, keys=key_files.client("alice")).client.close()
        stamp = allowed.stat().st_mtime_ns
        (allowed / "tee.key").write_bytes((key_files.root / "mallory.key").read_bytes())
        assert allowed.stat().st_mtime_ns == stamp  # the case a directory-mtime check misses
        runner = api.connect(s.endpoint, tiny_dir, keys=key_files.client("mallory"))
        assert runner.client.ping()["ok"]
        runner.client.close()
        with pytest.raises(AuthenticationFailed, match="refused this client's key"):
            api.connect(s.endpoint, tiny_dir, keys=key_files.client("alice"))


def test_a_revoked_key_stops_working_on_an_established_connection(tiny_dir, key_files, tmp_path, references):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    for name in ("alice", "mallory"):
        shutil.copy(key_files.root / f"{name}.key", allowed)
    with api.start_server(tiny_dir, device="cpu", keys=ServerKeys.from_files(key_files.server_secret, allowed)) as s:
        alice = api.connect(s.endpoint, tiny_dir, keys=key_files.client("alice"))
        mallory = api.connect(s.endpoint, tiny_dir, keys=key_files.client("mallory"))
        ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(12))
        assert relative_error(mallory.prefill(ids).logits, reference_logits(references["gqa"], ids)[:, -1:]) <= 1e-4
        (allowed / "mallory.key").unlink()
        assert _until(lambda: _refused(mallory.client)), "the revoked key still works on its open connection"
        with pytest.raises(AuthenticationFailed):
            mallory.prefill(ids)  # a prefill fails at once, with one clear error, never retried
        assert alice.client.ping()["ok"]  # the other client is untouched
        shutil.copy(key_files.root / "mallory.key", allowed)  # and it works again once put back
        assert _until(lambda: not _refused(mallory.client))
        alice.client.close()
        mallory.client.close()
