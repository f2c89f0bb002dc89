"""Shared fixtures: small random models made locally, in-process servers, a transformers reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    "attention-bias": {"attention_bias": True},
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
