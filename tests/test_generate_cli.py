"""`tsqp generate` as a user runs it: text streamed, ids and logits saved exactly, bad input refused
with one line before any work."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli

from test_generate import reference_greedy


def test_generate_streams_text_and_saves_exact_ids_and_logits(servers, tiny_dir, references, tmp_path):
    ids = torch.randint(3, 512, (1, 9), generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "ids.npy", ids.numpy())
    result = run_cli("generate", "--model", str(tiny_dir), "--endpoint", servers["gqa"].endpoint,
                     "--input-ids", str(tmp_path / "ids.npy"), "--max-new-tokens", "10", "--ignore-eos",
                     "--save-ids", str(tmp_path / "out.npy"), "--save-logits", str(tmp_path / "logits.npy"),
                     "--json", str(tmp_path / "run.json"))
    assert result.returncode == 0, result.stderr
    want, want_logits = reference_greedy(references["gqa"], ids, 10)
    saved = np.load(tmp_path / "out.npy")
    assert saved.dtype == np.int64 and np.array_equal(saved, torch.cat([ids, want], dim=1).numpy())
    logits = np.load(tmp_path / "logits.npy")
    assert logits.dtype == np.float32 and logits.shape == (1, 10, 512)
    assert float(np.abs(logits - want_logits.numpy()).max() / np.abs(want_logits.numpy()).max()) <= 1e-4
    from tsqp.text import load_tokenizer

    text = load_tokenizer(tiny_dir).decode(want[0].tolist(), skip_special_tokens=True)
    assert text.replace("\ufffd", "")[:8] in result.stdout.replace("\ufffd", "")
    for line in ("Time to first token:", "Inter-token latency: median", "Throughput:", "Prompt tokens: 9",
                 "New tokens: 10 per sequence"):
        assert line in result.stdout
    figures = json.loads((tmp_path / "run.json").read_text())
    assert figures["tokens"] == want.tolist() and figures["round_trips_per_token"] == 2 * 2 + 1
    assert (figures["protocol"], figures["protection"], figures["verify"]) == ("lean", "none", False)
    assert figures["sampling"] == {"temperature": 0.0, "top_k": None, "top_p": None, "seed": None, "ignore_eos": True}


def test_generate_from_a_chat_prompt_and_random_ids(servers, tiny_dir, tmp_path):
    model = tmp_path / "chat-model"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}" \
                              "{% if add_generation_prompt %}[assistant]{% endif %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    result = run_cli("generate", "--model", str(model), "--endpoint", servers["gqa"].endpoint, "--prompt", "hello",
                     "--chat", "--max-new-tokens", "3", "--save-ids", str(tmp_path / "chat.npy"))
    assert result.returncode == 0, result.stderr
    from tsqp.text import load_tokenizer

    expected = load_tokenizer(model).encode("<s>[user] hello\n[assistant]", add_special_tokens=False).ids
    assert np.load(tmp_path / "chat.npy")[0, : len(expected)].tolist() == expected
    assert "in the chat template" in result.stdout
    result = run_cli("generate", "--model", str(tiny_dir), "--endpoint", servers["gqa"].endpoint, "--tokens", "7",
                     "--batch", "2", "--seed", "4", "--temperature", "0.8", "--max-new-tokens", "3")
    assert result.returncode == 0 and "Prompt tokens: 7 x batch 2" in result.stdout, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--max-new-tokens", "20", "--tokens", "500"], "500 prompt + 20 new tokens exceed the model's "
                                                    "max_position_embeddings (512)"),
    (["--max-new-tokens", "2", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--max-new-tokens", "2", "--top-p", "2"], "--top-p must lie in (0, 1]"),
    (["--max-new-tokens", "2", "--chat"], "--chat needs --prompt"),
    (["--max-new-tokens", "2", "--prompt", "hi", "--chat"], "has no chat template"),
])
def test_bad_generate_input_is_one_line_before_any_work(tiny_dir, args, message):
    """The endpoint answers nothing: each error must come before a connection is tried."""
    result = run_cli("generate", "--model", str(tiny_dir), "--endpoint", "tcp://127.0.0.1:9", *args, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr
