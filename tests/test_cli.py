"""The entry points as a user runs them: the seed's scripts, `tsqp`, and every bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from tsqp import api

from conftest import REPO, reference_logits, relative_error, run_cli


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never printed {needle!r}: {''.join(lines)}")


def one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr


def test_seed_entry_points_with_environment_variables_only(tiny_dir, references):
    endpoint = api.free_endpoint()
    port = endpoint.rsplit(":", 1)[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLAMA_MODEL_PATH": str(tiny_dir), "LLAMA_GPU_PORT": port,
           "LLAMA_GPU_DEVICE": "cpu", "LLAMA_DTYPE": "float32", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "server.py"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        startup = "".join(wait_for_line(server, "ZeroMQ server started"))
        assert f"Loading model from: {tiny_dir}" in startup
        assert "Device: cpu, Dtype: torch.float32" in startup
        assert "✓ Model loaded: 2 layers, hidden_size=64" in startup
        assert f"✓ ZeroMQ server started on port {port}" in startup
        runner_env = {"LLAMA_GPU_ENDPOINT": f"localhost:{port}", "LLAMA_MODEL_PATH": str(tiny_dir),
                      "PREFILL_TOKEN_LENGTH": "32"}
        result = run_cli(env=runner_env, script="tee_runner.py")
        assert result.returncode == 0, result.stderr
        for expected in (f"✓ Connected to GPU server at localhost:{port}", "✓ TEE model initialized: 2 layers",
                         "Token length: 32", "Prefill time:", "Throughput:", "Logits shape: torch.Size([1, 1, 512])"):
            assert expected in result.stdout
        # The flags a guarded Gramine manifest bakes into tee_runner.py's command line.
        guarded = run_cli("--protection", "private", "--verify", env=runner_env, script="tee_runner.py")
        assert guarded.returncode == 0, guarded.stderr
        assert "GPU operations: Linear (private: one-time masks, verify: Freivalds checks)" in guarded.stdout
        assert "Logits shape: torch.Size([1, 1, 512])" in guarded.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0  # graceful shutdown


def test_prefill_cli_saves_exact_logits_for_given_ids(servers, model_dirs, references, tmp_path):
    variant = "attention-bias"
    ids = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(4))
    np.save(tmp_path / "ids.npy", ids.numpy())
    result = run_cli("prefill", "--endpoint", servers[variant].endpoint, "--model", str(model_dirs[variant]),
                     "--input-ids", str(tmp_path / "ids.npy"), "--save-logits", str(tmp_path / "logits.npy"),
                     "--all-positions", "--json", str(tmp_path / "run.json"), "--protocol", "seed")
    assert result.returncode == 0, result.stderr
    logits = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    assert logits.dtype == torch.float32 and logits.shape == (2, 21, 512)
    assert relative_error(logits, reference_logits(references[variant], ids)) <= 1e-4
    figures = json.loads((tmp_path / "run.json").read_text())
    assert figures["round_trips"] == 9 * 2 + 2 and figures["tokens"] == 21 and figures["batch"] == 2


def test_prompt_is_tokenized_and_fitted(servers, tiny_dir, tmp_path):
    result = run_cli("prefill", "--endpoint", servers["gqa"].endpoint, "--model", str(tiny_dir), "--tokens", "40",
                     "--batch", "2", "--prompt", "a short prompt", "--save-logits", str(tmp_path / "l.npy"))
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "l.npy").shape == (2, 1, 512)


def test_missing_model_directory(servers, tmp_path):
    one_error_line(run_cli("prefill", "--endpoint", servers["gqa"].endpoint, "--model", str(tmp_path / "nope")),
                   "model directory not found")
    one_error_line(run_cli("serve", "--model", str(tmp_path / "nope"), "--device", "cpu", "--port", "1"),
                   "model directory not found")


def test_invalid_model_directory(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    one_error_line(run_cli("serve", "--model", str(tmp_path), "--device", "cpu"), "cannot read", "config.json")


def test_non_llama_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    one_error_line(run_cli("serve", "--model", str(tmp_path), "--device", "cpu"), "unsupported architecture", "gpt2")


def test_unknown_preset(tmp_path):
    one_error_line(run_cli("make-model", "--preset", "llama-9000", "--out", str(tmp_path / "m")), "unknown preset")


def test_more_tokens_than_the_model_supports(servers, tiny_dir):
    one_error_line(run_cli("prefill", "--endpoint", servers["gqa"].endpoint, "--model", str(tiny_dir),
                           "--tokens", "100000"), "max_position_embeddings")


def test_unreachable_server_fails_within_a_timeout(tiny_dir):
    start = time.monotonic()
    result = run_cli("prefill", "--endpoint", api.free_endpoint(), "--model", str(tiny_dir), timeout=60)
    one_error_line(result, "no reply from GPU server")
    assert time.monotonic() - start < 30


def test_bad_endpoint_and_bad_ids_file(tiny_dir, tmp_path):
    one_error_line(run_cli("prefill", "--endpoint", "nowhere", "--model", str(tiny_dir)), "bad endpoint")
    np.save(tmp_path / "f.npy", np.zeros((2, 3), dtype=np.float32))
    one_error_line(run_cli("prefill", "--endpoint", api.free_endpoint(), "--model", str(tiny_dir),
                           "--input-ids", str(tmp_path / "f.npy")), "int64")


def test_shm_without_a_willing_server_and_with_audit(servers, tiny_dir, tmp_path):
    one_error_line(run_cli("prefill", "--endpoint", servers["gqa"].endpoint, "--model", str(tiny_dir), "--shm",
                           "--tokens", "8"), "--shm")
    one_error_line(run_cli("serve", "--model", str(tiny_dir), "--device", "cpu", "--shm", "--audit",
                           str(tmp_path / "audit")), "--audit")


def test_verify_refuses_16_bit_products(servers, tiny_dir):
    one_error_line(run_cli("prefill", "--endpoint", servers["gqa"].endpoint, "--model", str(tiny_dir), "--verify",
                           "--wire-dtype", "bfloat16", "--tokens", "8"), "--verify needs the float32 wire")
    one_error_line(run_cli("bench", "--model", str(tiny_dir), "--verify", "--dtype", "bfloat16"),
                   "--verify checks float32 products", "--dtype float32")


def test_serve_refuses_a_parent_pid_that_is_not_its_parent(tiny_dir):
    one_error_line(run_cli("serve", "--model", str(tiny_dir), "--device", "cpu", "--parent-pid", "1"),
                   "--parent-pid 1", "not this server's parent")
