"""The shared-memory fast path: exact, counted, bounded, and refused where not allowed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

from tsqp import api, protocol
from tsqp.errors import ProtocolError, RemoteError
from tsqp.server import GpuServer, ServerThread
from tsqp.shm import SHM_DIR, Attached, Segment, reply_room
from tsqp.transport import Client

from conftest import REPO, reference_logits, relative_error, run_cli


@pytest.fixture(scope="module")
def shm_server(tiny_dir):
    with api.start_server(tiny_dir, device="cpu", shm=True) as server:
        yield server


@pytest.mark.parametrize("protocol_name", ["lean", "seed"])
def test_prefill_through_shared_memory_is_exact_and_counted(protocol_name, shm_server, tiny_dir, references):
    shared = api.connect(shm_server.endpoint, tiny_dir, protocol_name, shm=True)
    framed = api.connect(shm_server.endpoint, tiny_dir, protocol_name)
    ids = torch.randint(0, shared.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(21))
    first = shared.prefill(ids, all_positions=True)  # starts small: early replies come as frames, then it grows
    again = shared.prefill(ids, all_positions=True)
    plain = framed.prefill(ids, all_positions=True)
    expected = reference_logits(references["gqa"], ids)
    for result in (first, again):
        assert relative_error(result.logits, expected) <= 1e-4
        assert torch.allclose(result.logits, plain.logits, rtol=0, atol=1e-6)
    # payload bytes count wherever they travelled; only the headers differ a little
    rounds = again.wire.round_trips
    assert rounds == plain.wire.round_trips
    assert abs(again.wire.bytes_sent - plain.wire.bytes_sent) <= 200 * rounds
    assert abs(again.wire.bytes_received - plain.wire.bytes_received) <= 200 * rounds
    segment = shared.client._segment
    assert segment is not None and (SHM_DIR / segment.name).exists()
    shared.client.close()
    assert not (SHM_DIR / segment.name).exists()  # closing the client removes its segment
    framed.client.close()


def test_reply_tensors_are_copies_not_views_of_shared_memory(shm_server):
    """The server could still write into the segment after replying: the TEE must not read there."""
    client = Client(shm_server.endpoint, timeout_s=10, shm=True)
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(2))
    client.call("Linear", [x], layer_idx=0, module_name="q_proj")  # sizes the segment for its reply
    (y,) = client.call("Linear", [x], layer_idx=0, module_name="q_proj").tensors
    before = y.clone()
    client._segment.map[:] = b"\xff" * client._segment.size  # what a hostile server could do afterwards
    assert torch.equal(y, before)
    client.close()


def test_a_server_without_shm_says_how_to_enable_it(servers, tiny_dir):
    with pytest.raises(RemoteError, match="--shm") as caught:
        api.connect(servers["gqa"].endpoint, tiny_dir, shm=True)  # its first ping already asks for shm
    assert caught.value.code == "bad_request"


def _raw_request(endpoint: str, shared: dict, spec_shape=(1, 2, 64)) -> dict:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(endpoint)
    try:
        header = {"method": "Linear", "args": {"layer_idx": 0, "module_name": "q_proj"},
                  "tensors": [{"dtype": "float32", "shape": list(spec_shape)}], "shm": shared}
        sock.send_multipart([msgpack.packb(header)])
        assert sock.poll(10_000)
        return protocol.decode(sock.recv_multipart()).header
    finally:
        sock.close(linger=0)


def test_bad_shared_memory_requests_get_error_replies(shm_server, tmp_path):
    segment = Segment.create(4096)  # data at [64, 4160)
    key = segment.key
    link = SHM_DIR / f"tsqp-{uuid.uuid4().hex}"
    (tmp_path / "target").write_bytes(bytes(4096))
    link.symlink_to(tmp_path / "target")  # a name the server would open, pointing elsewhere
    try:
        bad = [
            ({"name": link.name, "key": key, "frames": [[64, 512]], "reply_at": 576}, "cannot open"),
            ({"name": "../../etc/passwd", "key": key, "frames": [[64, 512]], "reply_at": 576}, "segment name"),
            ({"name": "tsqp-" + "0" * 32, "key": key, "frames": [[64, 512]], "reply_at": 576}, "cannot open"),
            ({"name": segment.name, "frames": [[64, 512]], "reply_at": 576}, "key"),
            ({"name": segment.name, "key": key.hex(), "frames": [[64, 512]], "reply_at": 576}, "key"),
            ({"name": segment.name, "key": bytes(32), "frames": [[64, 512]], "reply_at": 576}, "wrong key"),
            ({"name": segment.name, "key": key, "frames": [[4000, 512]], "reply_at": 64}, "outside"),
            ({"name": segment.name, "key": key, "frames": [[64, -1]], "reply_at": 64}, "outside"),
            ({"name": segment.name, "key": key, "frames": [[0, 512]], "reply_at": 576}, "outside"),  # the key's bytes
            ({"name": segment.name, "key": key, "frames": "all", "reply_at": 64}, "list"),
            ({"name": segment.name, "key": key, "frames": [[64, 512]]}, "reply_at"),
            ({"name": segment.name, "key": key, "frames": [[64, 256]], "reply_at": 320}, "does not match"),
        ]
        for reply_at in (0, 32, -64, 4161, 1 << 40, 64.0, "64", None):  # outside the data, or not an offset
            bad.append(({"name": segment.name, "key": key, "frames": [[64, 512]], "reply_at": reply_at}, "reply_at"))
        for shared, problem in bad:
            header = _raw_request(shm_server.endpoint, shared)
            assert header["ok"] is False and problem in header["error"]["message"], (shared, header)
        assert segment.key == key  # nothing was written over the key
        # a reply that does not fit goes back as frames, and says how much room it needed
        segment.map[64:576] = torch.randn(128).numpy().tobytes()
        header = _raw_request(shm_server.endpoint, {"name": segment.name, "key": key, "frames": [[64, 512]],
                                                    "reply_at": segment.size})
        assert header["ok"] is True and header["shm_room"] >= 2 * 64 * 4 and "shm" not in header
    finally:
        segment.close()
        link.unlink()
    with Client(shm_server.endpoint, timeout_s=10, shm=True) as client:  # and the server still serves
        assert client.call("Linear", [torch.randn(1, 2, 64)], layer_idx=0, module_name="q_proj").tensors[0].shape \
            == (1, 2, 64)


def test_a_resent_call_never_shares_a_segment_with_the_late_original(tiny_dir):
    """The server may still answer a call the client gave up on: that reply must not land on the
    resent call's inputs, so a resend copies them into a fresh segment."""
    server = GpuServer(tiny_dir, "cpu", shm=True)
    real, seen = server.handle, []

    def slow_once(frames):
        seen.append(1)
        if len(seen) == 2:  # the first call after the ping
            time.sleep(1.5)
        return real(frames)

    server.handle = slow_once
    with ServerThread(server, api.free_endpoint()) as thread:
        client = Client(thread.endpoint, timeout_s=0.5, retries=3, shm=True)
        client.ping()
        first = client._segment.name
        x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(4))
        (y,) = client.call("Linear", [x], layer_idx=0, module_name="q_proj").tensors
        assert client.stats.retries >= 1 and client._segment.name != first and not (SHM_DIR / first).exists()
        with torch.inference_mode():
            assert torch.allclose(y, server.layers[0].self_attn.q_proj(x), rtol=1e-5, atol=1e-6)
        client.close()


@pytest.mark.parametrize("room", ["lots", -1, 1 << 40, 1.5, True])
def test_a_server_cannot_make_the_client_reserve_absurd_room(room):
    with pytest.raises(ProtocolError, match="shm_room"):
        reply_room({"ok": True, "shm_room": room})
    assert reply_room({"ok": True}) == 0 and reply_room({"shm_room": 4096}) == 4096


@pytest.mark.parametrize("flags, transport", [((), "ipc+shm+fastlink"), (("--no-fastlink",), "ipc+shm")])
def test_bench_over_the_same_host_fast_path(tiny_dir, tmp_path, flags, transport):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--model", str(tiny_dir), "--tokens", "40", "--repeat", "1", "--modes", "split,whole",
                     "--ipc", "--shm", *flags, "--json", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["transport"] == transport  # what the calls travelled on
    split = next(r for r in report["results"] if r["mode"] == "split")
    assert split["round_trips"] == 2 * 2 + 3 and split["bytes_received"] > 40 * 64 * 4


def test_the_server_unmaps_segments_whose_clients_are_gone():
    attached = Attached()
    first, second = Segment.create(4096), Segment.create(4096)
    attached.get(first.name, first.key)
    first.close()  # its client closed (or outgrew it): the file is gone
    attached.get(second.name, second.key)  # the next attach drops the stale mapping
    assert list(attached._segments) == [second.name]
    attached.close()  # on stop
    assert not attached._segments
    second.close()


def test_segment_writes_read_back_exactly_for_every_wire_dtype_and_layout():
    generator = torch.Generator().manual_seed(11)
    tensors = [torch.randn(5, 7, generator=generator), torch.randint(-9, 9, (13,), generator=generator),
               torch.randn(3, 3, generator=generator).to(torch.bfloat16), torch.randn(2, 9, generator=generator).half(),
               torch.randn(6, 4, generator=generator, dtype=torch.float64).t(), torch.tensor(2.5), torch.empty(0, 3)]
    segment = Segment.create(1 << 16)
    try:
        locations = segment.write(tensors, 100)
        assert all(at % 64 == 0 and at >= 100 for at, _ in locations)
        header = {"tensors": [protocol.tensor_spec(t) for t in tensors]}
        back = protocol.decode_payloads(header, [b"", *segment.views(locations)]).tensors
        assert all(b.dtype == t.dtype and torch.equal(b, t) for b, t in zip(back, tensors))
        del back
    finally:
        segment.close()


# -- one client's segment is no other local user's ----------------------------------------------------------

NOBODY = 65534


def _as_other_user(work) -> dict:
    """`work()` in a forked child that dropped to user nobody (no exec: the interpreter may not be
    readable by nobody); its JSON result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no torch, only sockets and files
        status = 0
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = work()
        except BaseException as err:  # reported to the parent, which fails the test with it
            result, status = {"child_error": repr(err)}, 1
        os.write(write_fd, json.dumps(result).encode())
        os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "child_error" not in result, result
    return result


def _request_as(endpoint: str, header: dict) -> dict:
    context = zmq.Context()  # the forked child's own: the parent's I/O threads do not exist here
    try:
        sock = context.socket(zmq.REQ)
        sock.connect(endpoint)
        sock.send_multipart([msgpack.packb(header)])
        if not sock.poll(20_000):
            return {"no_reply": True}
        reply = msgpack.unpackb(sock.recv_multipart()[0])
        sock.close(linger=0)
        return reply
    finally:
        context.term()


@pytest.mark.skipif(not hasattr(os, "setuid") or os.geteuid() != 0, reason="needs root to act as a second user")
def test_another_local_user_can_neither_read_nor_write_a_segment_through_the_server(
        shm_server, tiny_dir, references):
    victim = api.connect(shm_server.endpoint, tiny_dir, shm=True)
    g = torch.Generator().manual_seed(31)
    ids = torch.randint(0, victim.config.vocab_size, (1, 24), generator=g)
    expected = reference_logits(references["gqa"], ids)
    assert relative_error(victim.prefill(ids, all_positions=True).logits, expected) <= 1e-4
    secret = torch.randn(1, 8, 64, generator=g)
    victim.client.call("Linear", [secret], layer_idx=0, module_name="q_proj")  # its tensors now lie in the segment
    segment = victim.client._segment
    name, before = segment.name, bytes(segment.map)
    start = 64  # where a request's first tensor lies (behind the key)
    shape = [1, 8, 64]
    nbytes = 8 * 64 * 4
    forged_key = bytes(32)

    def attack() -> dict:
        try:
            open(SHM_DIR / name, "rb").close()
            return {"could_open": True}
        except PermissionError:
            pass
        results = {}
        for label, key in (("no_key", None), ("forged_key", forged_key)):
            shared = {"name": name, "frames": [[start, nbytes]], "reply_at": 1 << 40}
            if key is not None:
                shared["key"] = key
            read = {"method": "Linear", "args": {"layer_idx": 0, "module_name": "q_proj"},
                    "tensors": [{"dtype": "float32", "shape": shape}], "shm": shared}
            results[f"read_{label}"] = _request_as(shm_server.endpoint, read)
            write = {"method": "Matmul", "args": {}, "tensors": [{"dtype": "float32", "shape": [1, 1]},
                                                                 {"dtype": "float32", "shape": [1, 128]}],
                     "shm": dict(shared, frames=[[start, 4], [start + 64, 512]], reply_at=start)}
            results[f"write_{label}"] = _request_as(shm_server.endpoint, write)
        return results

    results = _as_other_user(attack)
    if results.get("could_open"):
        pytest.skip("user nobody can open this user's segments itself here")
    for what, reply in results.items():
        assert reply.get("ok") is False, (what, reply)  # no product of the victim's bytes came back
        assert "key" in reply["error"]["message"], (what, reply)
    assert bytes(segment.map) == before  # nothing was written into the victim's segment
    for _ in range(2):
        assert relative_error(victim.prefill(ids, all_positions=True).logits, expected) <= 1e-4
    victim.client.close()


def _segments_mapped_by(pid: int) -> set[Path]:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {Path(line.split()[-1]) for line in maps.splitlines() if f"{SHM_DIR}/tsqp-" in line}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see a process's segment")
def test_sigterm_to_a_client_command_leaves_no_segment_behind(tiny_dir):
    with api.spawn_server(tiny_dir, device="cpu", shm=True) as server:
        client = subprocess.Popen([sys.executable, "-m", "tsqp", "prefill", "--model", str(tiny_dir), "--endpoint",
                                   server.endpoint, "--shm", "--tokens", "8", "--warmup", "1000000"],
                                  cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not (segments := _segments_mapped_by(client.pid)) and time.monotonic() < deadline:
                assert client.poll() is None, client.stderr.read()
                time.sleep(0.05)
            assert segments, "the client never mapped a segment"
            time.sleep(0.5)  # well inside its prefills
            client.send_signal(signal.SIGTERM)
            _, stderr = client.communicate(timeout=30)
        finally:
            client.kill()
    assert client.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == "terminated"
    assert not [s for s in segments if s.exists()]
