"""`tsqp serve` start-up: what it refuses before the model loads, what it prints, in which order."""

from __future__ import annotations

import contextlib
import io
import socket
import threading

import pytest
import torch

from tsqp import api
from tsqp.server import run
from tsqp.transport import Client

from conftest import run_cli
from test_cli import one_error_line

def refused_before_loading(result, *fragments: str) -> None:
    one_error_line(result, *fragments)
    assert "Loading model" not in result.stdout


BAD_DEVICES = ["gpu", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda:0"])


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_a_device_this_machine_lacks_is_one_error_line(tiny_dir, device):
    port = api.free_endpoint().rsplit(":", 1)[1]
    refused_before_loading(run_cli("serve", "--model", str(tiny_dir), "--device", device, "--port", port), device)


def test_the_seed_entry_point_refuses_a_missing_device_the_same_way(tiny_dir):
    port = api.free_endpoint().rsplit(":", 1)[1]
    env = {"LLAMA_MODEL_PATH": str(tiny_dir), "LLAMA_GPU_DEVICE": "cuda:99", "LLAMA_GPU_PORT": port}
    refused_before_loading(run_cli(env=env, script="server.py"), "cuda:99")


def test_a_busy_port_fails_before_the_model_loads(tiny_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--model", str(tiny_dir), "--device", "cpu", "--port", str(port))
    refused_before_loading(result, f"cannot bind tcp://127.0.0.1:{port}", "another server running there?")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the notice is about a machine without CUDA")
@pytest.mark.parametrize("device", [None, "cpu"])
def test_the_cpu_notice_only_when_the_cpu_was_not_asked_for(tiny_dir, device, monkeypatch):
    monkeypatch.delenv("LLAMA_GPU_DEVICE", raising=False)
    with api.spawn_server(tiny_dir, device=device) as server:
        output = server.output()
    assert "✓ ZeroMQ server started" in output and "Device: cpu" in output
    assert ("note: CUDA is not available; serving on the CPU" in output) == (device is None)


def test_run_prints_to_the_stdout_of_the_moment(tiny_dir):
    """`out` defaults to sys.stdout as it is when run is called, not as it was at import."""
    endpoint, stop, printed = api.free_endpoint(), threading.Event(), io.StringIO()
    with contextlib.redirect_stdout(printed):
        thread = threading.Thread(target=run, args=(tiny_dir, "cpu", "float32", endpoint, stop), daemon=True)
        thread.start()
        with Client(endpoint, connect_timeout_s=60) as client:
            assert client.ping()["ok"]
        stop.set()
        thread.join(10)
    assert f"Loading model from: {tiny_dir}" in printed.getvalue()
    assert "✓ ZeroMQ server started" in printed.getvalue()
