"""make-model: random local LLaMA directories must look like the real thing to transformers."""

import json
import os
import random
import time

import pytest
import tokenizers
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tsqp import models
from tsqp.errors import InputError, ModelError
from tsqp.models import (
    PRESETS,
    build_config,
    cached_model,
    default_model_cache,
    make_model,
)
from tsqp.text import encode_prompt, fit_prompt, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    start = time.monotonic()
    path = make_model("tiny", tmp_path_factory.mktemp("m") / "tiny", seed=0)
    return path, time.monotonic() - start


def load(path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, local_files_only=True)


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def llama_params(c: LlamaConfig) -> int:
    """Parameter count of a LLaMA config, from the architecture's shapes."""
    head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
    q = c.hidden_size * c.num_attention_heads * head_dim
    kv = 2 * c.hidden_size * c.num_key_value_heads * head_dim
    o = c.num_attention_heads * head_dim * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    layer = q + kv + o + mlp + 2 * c.hidden_size
    embed = c.vocab_size * c.hidden_size
    lm_head = 0 if c.tie_word_embeddings else embed
    return embed + c.num_hidden_layers * layer + c.hidden_size + lm_head


def test_tiny_builds_fast_and_loads(tiny):
    path, seconds = tiny
    assert seconds < 30  # includes the one-off transformers import
    assert {"config.json", "model.safetensors", "tokenizer.json", models.MARKER} <= {
        p.name for p in path.iterdir()
    }
    model = load(path)
    assert model.config.architectures == ["LlamaForCausalLM"]
    for key, value in PRESETS["tiny"].items():
        assert getattr(model.config, key) == value, key
    assert model.dtype == torch.float32
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, 512)
    assert torch.isfinite(logits).all()


def test_saved_shapes_follow_gqa_config(tiny):
    w = weights(tiny[0])
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 2 kv heads x 16
    assert w["model.layers.1.mlp.down_proj.weight"].shape == (64, 176)
    assert w["lm_head.weight"].shape == (512, 64)
    assert not torch.equal(w["lm_head.weight"], w["model.embed_tokens.weight"])


def test_norm_weights_are_random_not_ones(tiny):
    model = load(tiny[0])
    norms = [m.weight for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 2 * 2 + 1
    for w in norms:
        assert not torch.allclose(w, torch.ones_like(w))
        assert 0.9 < w.mean().item() < 1.1
    assert not torch.equal(norms[0], norms[1])


def test_same_seed_identical_other_seed_differs(tiny, tmp_path):
    again = weights(make_model("tiny", tmp_path / "again", seed=0))
    other = weights(make_model("tiny", tmp_path / "other", seed=1))
    first = weights(tiny[0])
    assert first.keys() == again.keys() == other.keys()
    for name in first:
        assert torch.equal(first[name], again[name]), name
        assert not torch.equal(first[name], other[name]), name
    tok = (tiny[0] / "tokenizer.json").read_text()
    assert (tmp_path / "other" / "tokenizer.json").read_text() == tok


def test_bfloat16_rounds_the_same_draws(tiny, tmp_path):
    path = make_model("tiny", tmp_path / "bf16", seed=0, dtype="bfloat16")
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    half, full = weights(path), weights(tiny[0])
    for name in full:
        assert half[name].dtype == torch.bfloat16
        assert torch.equal(half[name], full[name].to(torch.bfloat16)), name


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_key_value_heads": 4},  # MHA
        {"head_dim": 32, "num_key_value_heads": 1},  # head_dim != hidden / heads, MQA
        {"attention_bias": True, "mlp_bias": True},
        {"tie_word_embeddings": True},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 1234.0},
    ],
)
def test_overrides_build_loadable_variants(tmp_path, overrides):
    path = make_model("tiny", tmp_path / "v", overrides=overrides)
    model = load(path)
    c, w = model.config, weights(path)
    attn = model.model.layers[0].self_attn
    head_dim = overrides.get("head_dim", 16)
    assert attn.q_proj.weight.shape == (4 * head_dim, 64)
    assert attn.k_proj.weight.shape == (c.num_key_value_heads * head_dim, 64)
    if overrides.get("attention_bias"):
        assert attn.q_proj.bias is not None and attn.q_proj.bias.abs().sum() > 0
        assert w["model.layers.0.mlp.up_proj.bias"].abs().sum() > 0
    if overrides.get("tie_word_embeddings"):
        assert "lm_head.weight" not in w
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    if "rope_scaling" in overrides:
        assert c.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1234.0}
    assert model(torch.tensor([[1, 2, 3, 4]])).logits.shape == (1, 4, 512)


def test_tokenizer_loads_offline_and_round_trips(tiny):
    path = tiny[0]
    config = json.loads((path / "config.json").read_text())
    rng = random.Random(7)
    text = " ".join(rng.choice(["zebra", "Quantum", "naïve", "42", "the", "model", "🙂", "x=y;"])
                    for _ in range(20))
    raw = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = raw.encode(text).ids
    assert ids[0] == config["bos_token_id"] == hf.bos_token_id
    assert hf.eos_token_id == config["eos_token_id"]
    assert max(ids) < config["vocab_size"] and raw.get_vocab_size() <= config["vocab_size"]
    assert hf(text).input_ids == ids
    assert raw.decode(ids) == text
    assert hf.decode(ids, skip_special_tokens=True) == text
    assert load_tokenizer(path).encode(text).ids == ids


def test_load_tokenizer_absent_or_corrupt(tmp_path):
    assert load_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("n_tokens", [1, 3, 200])
def test_fit_prompt_exact_shape(tiny, n_tokens):
    tok = load_tokenizer(tiny[0])
    text = "The cat reads a letter."
    body = tok.encode(text, add_special_tokens=False).ids
    assert 3 < len(body) < 150
    out = fit_prompt(tok, text, n_tokens, batch=3)
    assert out.shape == (3, n_tokens) and out.dtype == torch.int64
    assert out[0, 0].item() == tok.token_to_id("<s>")
    assert torch.equal(out[0], out[2])
    expected = ([tok.token_to_id("<s>")] + body * (n_tokens // len(body) + 1))[:n_tokens]
    assert out[0].tolist() == expected


def test_fit_prompt_accepts_transformers_tokenizer(tiny):
    hf = AutoTokenizer.from_pretrained(tiny[0], local_files_only=True)
    raw = load_tokenizer(tiny[0])
    assert torch.equal(fit_prompt(hf, "hello", 9, 2), fit_prompt(raw, "hello", 9, 2))


def test_encode_prompt_runs_as_tokenized_and_says_how_it_was_fitted(tiny):
    raw = load_tokenizer(tiny[0])
    hf = AutoTokenizer.from_pretrained(tiny[0], local_files_only=True)  # the reference encoder
    rng = random.Random(3)
    words = "the model keeps a secret key under the old bridge while rain falls".split()
    for _ in range(5):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        expected = hf(text)["input_ids"]
        as_is = encode_prompt(raw, text, batch=2)
        assert as_is.ids.tolist() == [expected, expected] and as_is.tokenized == len(expected)
        assert as_is.describe() == f"Prompt: {len(expected)} tokens as tokenized (the tokenizer added BOS <s> in front)"
        n = rng.randint(1, 60)
        fitted = encode_prompt(raw, text, n)
        assert torch.equal(fitted.ids, fit_prompt(raw, text, n, 1))
        how = ("" if n == len(expected) else f"; fitted to {n} by keeping its first {n}" if n < len(expected)
               else f"; fitted to {n} by repeating its {len(expected) - 1} text tokens after <s>")
        assert fitted.describe() == as_is.describe() + how


def test_encode_prompt_says_when_no_bos_is_added(tiny):
    plain = tokenizers.Tokenizer.from_file(str(tiny[0] / "tokenizer.json"))
    plain.post_processor = None  # a tokenizer that adds no special tokens
    prompt = encode_prompt(plain, "the cat", 5)
    assert prompt.ids[0, 0].item() != plain.token_to_id("<s>")
    assert "(no BOS: the tokenizer adds no special token in front); fitted to 5 by repeating its" in prompt.describe()


def test_fit_prompt_rejects_empty(tiny):
    tok = load_tokenizer(tiny[0])
    with pytest.raises(InputError):
        fit_prompt(tok, "", 8, 1)
    with pytest.raises(InputError):
        fit_prompt(tok, "hi", 0, 1)


def test_unknown_preset_and_bad_arguments(tmp_path):
    msg = "unknown preset 'x' (choose from: tiny, tinyllama-1.1b, llama-3.2-1b)"
    with pytest.raises(ModelError) as err:
        make_model("x", tmp_path / "m")
    assert str(err.value) == msg
    with pytest.raises(ModelError, match="unknown dtype"):
        make_model("tiny", tmp_path / "m", dtype="int8")
    with pytest.raises(ModelError, match="num_kv_heads"):
        make_model("tiny", tmp_path / "m", overrides={"num_kv_heads": 1})
    assert not (tmp_path / "m").exists()


def test_refuses_foreign_directory_and_replaces_own(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="not a tsqp model"):
        make_model("tiny", foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    make_model("tiny", empty, seed=0)
    before = weights(empty)
    with pytest.raises(ModelError, match="already holds a tsqp model"):
        make_model("tiny", empty, seed=1)  # a model is replaced only when asked to
    assert torch.equal(before["model.norm.weight"], weights(empty)["model.norm.weight"])
    make_model("tiny", empty, seed=1, force=True)
    assert not torch.equal(before["model.norm.weight"], weights(empty)["model.norm.weight"])
    leftovers = {p.name for p in tmp_path.iterdir()}
    assert leftovers == {"foreign", "empty"}  # no temp or old directories left behind


def test_cached_model_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TSQP_CACHE", str(tmp_path / "cache"))
    assert default_model_cache() == tmp_path / "cache"
    path = cached_model("tiny", seed=3)
    assert path == tmp_path / "cache" / "tiny-seed3"
    assert json.loads((path / models.MARKER).read_text())["seed"] == 3

    def no_rebuild(*args, **kwargs):
        raise AssertionError("cached model was rebuilt")

    monkeypatch.setattr(models, "make_model", no_rebuild)
    assert cached_model("tiny", seed=3) == path


def test_cached_model_rebuilds_half_written(tmp_path, monkeypatch):
    monkeypatch.setenv("TSQP_CACHE", str(tmp_path))
    half = tmp_path / "tiny-seed0"
    half.mkdir()
    (half / "config.json").write_text("{}")  # no marker: an interrupted build
    assert cached_model("tiny", 0) == half
    assert (half / models.MARKER).is_file() and (half / "model.safetensors").is_file()
    with pytest.raises(ModelError, match="unknown preset"):
        cached_model("nope")


def test_default_cache_without_env(monkeypatch, tmp_path):
    monkeypatch.delenv("TSQP_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_model_cache() == tmp_path / ".cache" / "tsqp"


@pytest.mark.parametrize(
    "preset, params",
    [("tinyllama-1.1b", 1_100_048_384), ("llama-3.2-1b", 1_235_814_400)],
)
def test_big_presets_match_real_architectures(preset, params):
    config = build_config(preset)
    assert llama_params(config) == params
    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == params
    tokenizer_vocab = min(config.vocab_size, models.TOKENIZER_VOCAB_CAP)
    assert 512 < tokenizer_vocab <= config.vocab_size


def test_llama32_rope_and_heads():
    c = build_config("llama-3.2-1b")
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 8, 64)
    assert c.tie_word_embeddings and c.max_position_embeddings == 131072
    assert c.rope_parameters == {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    }
    t = build_config("tinyllama-1.1b")
    assert (t.num_key_value_heads, t.rope_parameters["rope_theta"], t.tie_word_embeddings) == (
        4, 10000.0, False)
    assert PRESETS["tiny"]["rope_parameters"]["rope_theta"] == 10000.0  # presets not mutated


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_build_model", boom)
    with pytest.raises(RuntimeError):
        make_model("tiny", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_output_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = make_model("tiny", tmp_path / "m")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in path.iterdir()} == {0o644}
