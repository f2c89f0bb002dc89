"""Under CurveZMQ a session belongs to the client key that opened it: another allowed client
that names it gets what an unknown session gets, and cannot read, overwrite or free it."""

from __future__ import annotations

import shutil

import pytest
import torch
import zmq

from tsqp import api, keys
from tsqp.errors import RemoteError
from tsqp.keys import ClientKeys, ServerKeys
from tsqp.transport import Client

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CurveZMQ")


@pytest.fixture(scope="module", params=[False, True], ids=["zeromq", "fastlink"])
def two_clients(request, tmp_path_factory, tiny_dir):
    """Alice and Mallory, both on the allow-list; over the fast link (shm) their links speak for
    the key that asked for them."""
    root = tmp_path_factory.mktemp("owner-keys")
    server_public, server_secret = keys.generate(root, "server")
    allowed = root / "allowed"
    allowed.mkdir()
    for name in ("alice", "mallory"):
        keys.generate(root, name)
        shutil.copy(root / f"{name}.key", allowed)
    shm = request.param
    with api.start_server(tiny_dir, device="cpu", keys=ServerKeys.from_files(server_secret, allowed), shm=shm) as server:
        alice, mallory = (Client(server.endpoint, timeout_s=10, shm=shm, keys=ClientKeys.from_files(
            server_public, root / f"{name}.key_secret")) for name in ("alice", "mallory"))
        assert alice.ping()["ok"] and mallory.ping()["ok"]
        assert alice.via == mallory.via == ("fastlink" if shm else "zeromq")
        yield alice, mallory
        alice.close()
        mallory.close()


def qkv(client: Client, x: torch.Tensor, session: str) -> None:
    g = torch.Generator().manual_seed(1)
    n = x.shape[1]
    client.call("QKVScores", [x, torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)], layer_idx=0,
                session=session)


def refusal(client: Client, method: str, tensors: list, **args) -> tuple[str, str]:
    with pytest.raises(RemoteError) as caught:
        client.call(method, tensors, **args)
    return caught.value.code, str(caught.value)


def test_another_key_cannot_read_overwrite_or_free_a_session(two_clients):
    alice, mallory = two_clients
    g = torch.Generator().manual_seed(4)
    mine, theirs = torch.randn(1, 6, 64, generator=g), torch.randn(1, 6, 64, generator=g)
    probs = torch.softmax(torch.randn(1, 4, 6, 6, generator=g), dim=-1)
    sid = "alice-session"
    qkv(alice, mine, sid)
    (expected,) = alice.call("AttnOut", [probs], layer_idx=0, session=sid).tensors

    # read: exactly the answer a session nobody opened gets
    stolen = refusal(mallory, "AttnOut", [probs], layer_idx=0, session=sid)
    unknown = refusal(mallory, "AttnOut", [probs], layer_idx=0, session="x" * len(sid))
    assert stolen[0] == unknown[0] == "missing_state"
    assert stolen[1].replace(sid, "x" * len(sid)) == unknown[1]

    # overwrite and free: mallory only ever touches a session of her own
    qkv(mallory, theirs, sid)
    mallory.call("Release", session=sid)
    mallory.call("LMHead", [torch.randn(1, 1, 64)], session=sid)
    (again,) = alice.call("AttnOut", [probs], layer_idx=0, session=sid).tensors
    assert torch.allclose(again, expected, rtol=1e-6, atol=1e-7)

    # and alice's own Release does free it
    alice.call("Release", session=sid)
    assert refusal(alice, "AttnOut", [probs], layer_idx=0, session=sid)[0] == "missing_state"
