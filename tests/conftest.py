"""Shared fixtures: small random models made locally, in-process servers, a transformers reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zmq

from tsqp import api
from tsqp.models import make_model

REPO = Path(__file__).resolve().parent.parent

# Architectural variants the split must reproduce exactly (overrides of the `tiny` preset).
VARIANTS: dict[str, dict] = {
    "gqa": {},  # tiny: 4 query heads share 2 key/value heads
    "mha": {"num_key_value_heads": 4},
    "llama3-rope": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 16}},
    "tied": {"tie_word_embeddings": True},
    "head-dim": {"head_dim": 32, "num_key_value_heads": 1},  # heads * head_dim != hidden_size
    "attention-bias": {"attention_bias": True, "mlp_bias": True},  # biases: lean takes AttnOut + Gate
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: make_model("tiny", root / name, seed=i + 1, overrides=overrides)
            for i, (name, overrides) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="session")
def tiny_dir(model_dirs) -> Path:
    return model_dirs["gqa"]


@pytest.fixture(scope="session")
def servers(model_dirs):
    """One in-process server per variant, for the whole session."""
    running = {name: api.start_server(path, device="cpu") for name, path in model_dirs.items()}
    yield running
    for server in running.values():
        server.stop()


@pytest.fixture
def own_servers_only(monkeypatch):
    """The session's in-process servers (`servers`) make this a process that serves, whose
    clients never spin (tsqp.spinning): a test of spinning counts the serving loops it starts."""
    from tsqp import spinning

    before = spinning._serving_loops
    monkeypatch.setattr(spinning, "serving_here", lambda: spinning._serving_loops > before)


@pytest.fixture(scope="session")
def references(model_dirs):
    """transformers' own LlamaForCausalLM on the same weights: the independent reference."""
    from transformers import LlamaForCausalLM

    return {name: LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
            for name, path in model_dirs.items()}


def reference_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=input_ids, use_cache=False).logits.float()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def record_calls(runner) -> tuple[list[str], list[tuple[str, str]]]:
    """Every method the runner's client calls from now on, and the (method, code) of each the
    server refuses; both lists fill as it runs."""
    from tsqp.errors import RemoteError

    methods, refused, original = [], [], runner.client.call

    def recording(method, *args, **kwargs):
        methods.append(method)
        try:
            return original(method, *args, **kwargs)
        except RemoteError as err:
            refused.append((method, err.code))
            raise

    runner.client.call = recording
    return methods, refused


def run_cli(*args: str, env: dict | None = None, timeout: float = 120, script: str | None = None) -> subprocess.CompletedProcess:
    """Run `tsqp ARGS` (or a root script) in a fresh process, as a user would."""
    cmd = [sys.executable, script] if script else [sys.executable, "-m", "tsqp"]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([*cmd, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _forget_refused_servers():
    """Each test is its own process as far as refusals go: a tampering server in one test must
    not make a later server on a reused port look refused (tsqp.tee.replies)."""
    from tsqp.tee import replies

    yield
    replies._refused.clear()


def _io_thread_answers(context: zmq.Context, timeout_ms: int = 3000) -> bool:
    """Whether a message sent from `context` over tcp arrives: it does not when that context's
    I/O thread is blocked."""
    probe_context = zmq.Context()
    server, client = probe_context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    try:
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"probe")
        return bool(server.poll(timeout_ms))
    finally:
        client.close(linger=0)
        server.close(linger=0)
        probe_context.term()


@pytest.fixture(scope="module", autouse=True)
def _module_zmq_context():
    """Each test module's clients share a ZeroMQ context of its own: a module that blocks
    libzmq's I/O thread fails here, by name, instead of every module after it failing to connect."""
    zmq.Context._instance = None  # Context.instance() makes a fresh one
    yield
    context = zmq.Context._instance
    if context is not None and not context.closed and not _io_thread_answers(context):
        pytest.fail("this module left its ZeroMQ context's I/O thread blocked: nothing sent through it arrives")
