"""The session store: bytes accounted, least recently used dropped first, idle timeout, Release,
and a failed lean prefill that leaves nothing behind."""

from __future__ import annotations

import pytest
import torch

from tsqp import api
from tsqp.errors import RemoteError
from tsqp.server import Limits, SessionStore, TooLarge
from tsqp.transport import Client


class Clock:
    """A clock the test moves: idle timeouts without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def floats(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.float32)


def test_bytes_are_accounted_per_session_and_in_total():
    store = SessionStore(budget_bytes=1 << 20, idle_s=60)
    a, b = store.open("", "a"), store.open("key:x", "a")
    store.keep(a, ("v", 0), floats(10, 10))
    store.keep(a, ("v", 1), floats(5, 4).t())  # a view: its storage counts
    store.keep(b, ("up", 0), floats(3))
    assert (a.nbytes, b.nbytes, store.nbytes) == (480, 12, 492)
    store.keep(a, ("v", 0), floats(2))  # replaced, not added
    assert (a.nbytes, store.nbytes) == (88, 100)
    store.discard(a, lambda key: key[0] == "v")
    assert (a.nbytes, store.nbytes, len(store)) == (0, 12, 2)
    store.release("", "a")
    store.release("", "a")  # idempotent
    store.release("key:nobody", "zzz")
    assert (store.nbytes, len(store)) == (12, 1)


def test_the_least_recently_used_make_room_and_reads_count_as_use():
    store = SessionStore(budget_bytes=3 * 400, idle_s=60)
    for name in ("a", "b", "c"):
        store.keep(store.open("", name), "t", floats(100))
    assert store.find("", "a") is not None  # a read: a is now the most recent, b the oldest
    store.keep(store.open("", "d"), "t", floats(100))
    assert [store.find("", n) is not None for n in "abcd"] == [True, False, True, True]
    big = store.open("", "e")
    store.keep(big, "t", floats(250))  # needs 1000 bytes: drops as many old ones as that takes
    assert [store.find("", n) is not None for n in "acde"] == [False, False, False, True]
    assert store.nbytes == 1000 <= store.budget


def test_a_session_that_alone_exceeds_the_budget_is_refused_with_the_figures():
    store = SessionStore(budget_bytes=1000, idle_s=60)
    other = store.open("", "other")
    store.keep(other, "t", floats(100))
    greedy = store.open("", "greedy")
    store.keep(greedy, "small", floats(50))
    with pytest.raises(TooLarge) as caught:
        store.keep(greedy, "big", floats(201))
    assert "1004 bytes" in str(caught.value) and "1000 bytes" in str(caught.value)
    assert greedy.nbytes == 200 and store.find("", "other") is not None  # nothing dropped, nothing kept
    with pytest.raises(TooLarge):
        store.reserve(greedy, "big", 10_000)  # the check before an allocation


def test_idle_sessions_are_dropped_and_each_use_restarts_the_clock():
    clock = Clock()
    store = SessionStore(budget_bytes=1 << 20, idle_s=300, clock=clock)
    store.keep(store.open("", "idle"), "t", floats(10))
    store.keep(store.open("", "busy"), "t", floats(10))
    for _ in range(3):
        clock.now += 200
        assert store.find("", "busy") is not None
    assert store.find("", "idle") is None
    assert (len(store), store.nbytes) == (1, 40)


def test_sessions_are_per_owner():
    store = SessionStore(budget_bytes=1 << 20, idle_s=60)
    store.keep(store.open("key:alice", "s"), "t", floats(1))
    assert store.find("key:mallory", "s") is None and store.find("", "s") is None
    store.release("key:mallory", "s")
    assert store.find("key:alice", "s") is not None


# -- in the server ---------------------------------------------------------------------------------

H, KV, D, HEADS = 64, 2, 16, 4  # the tiny preset


def qkv(client: Client, session: str, n: int = 8, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    client.call("QKVScores", [torch.randn(1, n, H, generator=g), torch.randn(n, D, generator=g),
                              torch.randn(n, D, generator=g)], layer_idx=0, session=session)


def attn_out(client: Client, session: str, n: int = 8) -> torch.Tensor:
    probs = torch.softmax(torch.randn(1, HEADS, n, n, generator=torch.Generator().manual_seed(1)), dim=-1)
    return client.call("AttnOut", [probs], layer_idx=0, session=session).tensors[0]


V_BYTES = 2 * 2 * 8 * KV * D * 4  # a session's KV cache: K and V, both layers, 8 positions


@pytest.fixture()
def budget_server(tiny_dir):
    """Room for the V of three 8-position sessions, no more."""
    with api.start_server(tiny_dir, device="cpu", limits=Limits(session_bytes=3 * V_BYTES)) as server:
        yield server


def test_the_server_drops_the_least_recently_used_session_to_make_room(budget_server):
    with Client(budget_server.endpoint, timeout_s=10) as client:
        for name in ("a", "b", "c"):
            qkv(client, name)
        attn_out(client, "a")  # a read makes a the most recent
        qkv(client, "d")
        with pytest.raises(RemoteError, match="call QKVScores first") as caught:
            attn_out(client, "b")
        assert caught.value.code == "missing_state"
        for name in ("a", "c", "d"):
            attn_out(client, name)
        health = client.ping()
        assert (health["sessions"], health["session_bytes"]) == (3, 3 * V_BYTES)


def test_the_server_refuses_a_session_larger_than_its_budget(budget_server):
    with Client(budget_server.endpoint, timeout_s=10) as client:
        qkv(client, "small")
        with pytest.raises(RemoteError) as caught:
            qkv(client, "huge", n=32)  # 4 x the budget of 3 small ones
        assert caught.value.code == "too_large"
        assert f"{4 * V_BYTES} bytes" in str(caught.value) and f"{3 * V_BYTES} bytes" in str(caught.value)
        attn_out(client, "small")  # nobody was dropped for it
        assert client.ping()["sessions"] == 1  # and the refused one keeps nothing, not even its name


def test_the_server_drops_idle_sessions(tiny_dir):
    clock = Clock()
    with api.start_server(tiny_dir, device="cpu", limits=Limits(session_idle_s=300)) as server:
        server.server.sessions.clock = clock
        with Client(server.endpoint, timeout_s=10) as client:
            qkv(client, "kept")
            qkv(client, "left")
            clock.now += 200
            attn_out(client, "kept")
            clock.now += 200
            attn_out(client, "kept")
            with pytest.raises(RemoteError) as caught:
                attn_out(client, "left")
            assert caught.value.code == "missing_state"
            assert client.ping()["sessions"] == 1


def test_release_frees_a_session_and_is_idempotent(servers):
    with Client(servers["gqa"].endpoint, timeout_s=10) as client:
        qkv(client, "to-release")
        before = client.ping()
        assert client.call("Release", session="to-release").header["ok"]
        after = client.ping()
        assert (after["sessions"], after["session_bytes"]) == (before["sessions"] - 1, before["session_bytes"] - V_BYTES)
        with pytest.raises(RemoteError) as caught:
            attn_out(client, "to-release")
        assert caught.value.code == "missing_state"
        assert client.call("Release", session="to-release").header["ok"]  # again: fine
        assert client.call("Release", session="never-seen").header["ok"]
        with pytest.raises(RemoteError) as caught:
            client.call("Release")
        assert caught.value.code == "bad_request" and "session" in str(caught.value)


@pytest.mark.parametrize("fail_at, nth", [("AttnGate", 2), ("DownScores", 1), ("DownHead", 2)])
def test_a_failed_lean_prefill_leaves_nothing_on_the_server(fail_at, nth, tiny_dir):
    with api.start_server(tiny_dir, device="cpu") as server:
        runner = api.connect(server.endpoint, tiny_dir)
        original, seen = runner.client.call, []

        def failing(method, tensors=(), **args):
            seen.append(method)
            if method == fail_at and seen.count(method) == nth:  # e.g. the second layer's, or the second prefill's
                raise RemoteError("internal", "injected failure")
            return original(method, tensors, **args)

        runner.client.call = failing
        ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
        if fail_at == "DownHead":
            runner.prefill(ids)  # a whole prefill first: it ends with a Release too
            assert seen[-2:] == ["DownHead", "Release"]
            health = runner.client.ping()
            assert (health["sessions"], health["session_bytes"]) == (0, 0)
        with pytest.raises(RemoteError, match="injected"):
            runner.prefill(ids)
        assert seen[-1] == "Release"
        health = runner.client.ping()
        assert (health["sessions"], health["session_bytes"]) == (0, 0)
        runner.client.close()


def test_lean_session_ids_are_random_128_bit_hex(servers, tiny_dir):
    one, two = (api.connect(servers["gqa"].endpoint, tiny_dir) for _ in range(2))
    for runner in (one, two):
        runner.steps.open(1, 8)  # each batch of sequences gets its own session
    ids = {one.steps.session, two.steps.session}
    assert len(ids) == 2 and all(len(s) == 32 and int(s, 16) >= 0 for s in ids)
    one.client.close()
    two.client.close()
