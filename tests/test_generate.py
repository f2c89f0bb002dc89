"""Generation across the boundary equals transformers' greedy decoding, in every mode, and
survives a server that loses its state mid-generation."""

from __future__ import annotations

import pytest
import torch

from tsqp import api, ops
from tsqp.errors import InputError

from conftest import VARIANTS, record_calls, relative_error

NEW = 12
MODES = {"lean": {}, "seed": {"protocol": "seed"}, "private": {"protection": "private"}, "verify": {"verify": True},
         "private+verify": {"protection": "private", "verify": True}}


def reference_greedy(model, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' model run whole at every step (no cache), argmax: tokens [b, new] and the
    logits each was chosen from [b, new, vocab]. Computed independently of our code."""
    seq, logits = ids.clone(), []
    with torch.inference_mode():
        for _ in range(new):
            last = model(input_ids=seq, use_cache=False).logits[:, -1].float()
            logits.append(last)
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return seq[:, ids.shape[1]:], torch.stack(logits, dim=1)


def prompt(vocab: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    length = int(torch.randint(5, 20, (1,), generator=g))
    return torch.randint(3, vocab, (batch, length), generator=g)  # 0-2 are special; EOS would stop early


CASES = [(variant, mode, batch) for variant in VARIANTS for mode in ("lean", "seed") for batch in (1, 2)]
CASES += [(variant, mode, 1 + i % 2) for i, variant in enumerate(VARIANTS) for mode in
          ("private", "verify", "private+verify")]


@pytest.mark.parametrize("variant, mode, batch", CASES)
def test_greedy_generation_matches_transformers(variant, mode, batch, servers, model_dirs, references):
    runner = api.connect(servers[variant].endpoint, model_dirs[variant], **MODES[mode])
    ids = prompt(runner.config.vocab_size, batch, seed=sum(map(ord, variant + mode)) + batch)
    want, want_logits = reference_greedy(references[variant], ids, NEW)
    result = runner.generate(ids, NEW, ignore_eos=True, keep_logits=True).run()
    runner.client.close()
    assert torch.equal(result.tokens, want)
    tolerance = 1e-3 if "private" in mode else 1e-4
    for step in range(NEW):
        assert relative_error(result.logits[:, step], want_logits[:, step]) <= tolerance
    per_token = result.decode_wire.round_trips / (NEW - 1)
    layers = runner.config.num_layers
    lean = 4 * layers if runner.config.mlp_bias else 2 * layers + 1  # AttnGate, DownScores, unless biases; DownHead
    assert per_token == {"lean": lean, "seed": 9 * layers + 2}.get(mode, 4 * layers + 1)


@pytest.mark.parametrize("variant, mode, batch", [("gqa", "lean", 2), ("attention-bias", "lean", 1),
                                                  ("head-dim", "verify", 2)])
def test_generation_with_every_product_transposed_matches_transformers(variant, mode, batch, model_dirs, references,
                                                                         monkeypatch):
    """A server that measured (W x^T)^T as faster at every decode-sized row count (on this
    tiny model nothing is big enough to measure) still generates transformers' tokens, within
    the same tolerance, biases and Freivalds' checks included."""
    from tsqp.server import core, model, products

    used, transposed = [], products.linear_transposed
    monkeypatch.setattr(core, "transposed_rows", lambda weights, rows_alone: frozenset(range(1, ops.DECODE_ROWS + 1)))
    monkeypatch.setattr(model, "linear_transposed", lambda *args: used.append(args[1].shape) or transposed(*args))
    with api.start_server(model_dirs[variant], device="cpu") as here:
        chosen = here.server.transposed_rows_by_shape
        assert chosen and all(rows == set(range(1, ops.DECODE_ROWS + 1)) for rows in chosen.values())
        runner = api.connect(here.endpoint, model_dirs[variant], **MODES[mode])
        ids = prompt(runner.config.vocab_size, batch, seed=batch + len(variant))
        want, want_logits = reference_greedy(references[variant], ids, NEW)
        result = runner.generate(ids, NEW, ignore_eos=True, keep_logits=True).run()
        runner.client.close()
    assert torch.equal(result.tokens, want)
    assert max(relative_error(result.logits[:, step], want_logits[:, step]) for step in range(NEW)) <= 1e-4
    assert len(used) >= 2 * (NEW - 1) * references[variant].config.num_hidden_layers  # each step's q/k/v, gate/up
    if mode == "lean":  # the head of each token too (the prefill's: its last rows)
        assert used.count(tuple(references[variant].lm_head.weight.shape)) == NEW


def test_tokens_stream_as_they_are_made(servers, tiny_dir):
    runner = api.connect(servers["gqa"].endpoint, tiny_dir)
    generation = runner.generate(prompt(512, 1, seed=1), 5, ignore_eos=True)
    streamed = [token.clone() for token in generation]
    assert len(streamed) == 5 and all(t.shape == (1,) for t in streamed)
    assert torch.equal(torch.stack(streamed, dim=1), generation.result.tokens)
    r = generation.result
    assert r.ttft_s > 0 and len(r.token_s) == 4 and r.itl_median_s > 0 and r.tokens_per_s > 0


def test_generation_stops_at_the_models_eos_unless_told_not_to(servers, tiny_dir, references):
    """tiny's EOS is id 2 (config and generation_config): force it to be the greedy choice by
    finding a prompt whose greedy continuation reaches it, then check both behaviours."""
    runner = api.connect(servers["gqa"].endpoint, tiny_dir)
    assert runner.config.eos_token_ids == (2,)
    for seed in range(400):
        ids = prompt(512, 1, seed=seed)
        want, _ = reference_greedy(references["gqa"], ids, 16)
        if 2 in want[0].tolist():
            break
    else:
        pytest.skip("no prompt of 400 reaches EOS greedily on this model")
    stop = want[0].tolist().index(2)
    ended = runner.generate(ids, 16).run()
    assert ended.stopped == "eos" and ended.tokens[0].tolist() == want[0, : stop + 1].tolist()
    assert torch.equal(runner.generate(ids, 16, ignore_eos=True).run().tokens, want)


def test_bad_generation_requests_are_refused_before_any_work(servers, tiny_dir):
    runner = api.connect(servers["gqa"].endpoint, tiny_dir)
    before = runner.client.stats.round_trips
    with pytest.raises(InputError, match="--max-new-tokens must be >= 1"):
        runner.generate(prompt(512, 1, seed=2), 0)
    with pytest.raises(InputError, match=r"500 prompt \+ 13 new tokens exceed the model's max_position_embeddings"):
        runner.generate(torch.randint(3, 512, (1, 500)), 13)
    with pytest.raises(InputError, match="unequal length"):
        runner.generate([[5, 6, 7], [8, 9]], 4)
    with pytest.raises(InputError, match="--temperature must be a finite number >= 0"):
        runner.generate(prompt(512, 1, seed=2), 4, temperature=-1.0)
    assert runner.client.stats.round_trips == before


@pytest.mark.parametrize("biases, per_token", [({"mlp_bias": True}, "3L + 1"), ({"attention_bias": True}, "3L")])
def test_one_kind_of_bias_keeps_only_its_own_calls_apart(biases, per_token, tmp_path):
    """MLP biases: AttnOut + Gate, DownScores still; attention biases: QKVScores + GatedDown,
    AttnGate still. Greedy tokens and logits against transformers either way."""
    from transformers import LlamaForCausalLM

    from tsqp.models import make_model

    model_dir = make_model("tiny", tmp_path / "biased", seed=7, overrides=biases)
    reference = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    with api.start_server(model_dir, device="cpu") as server:
        runner = api.connect(server.endpoint, model_dir)
        ids = prompt(runner.config.vocab_size, 2, seed=len(per_token))
        want, want_logits = reference_greedy(reference, ids, 6)
        result = runner.generate(ids, 6, ignore_eos=True, keep_logits=True).run()
        runner.client.close()
    assert torch.equal(result.tokens, want)
    assert all(relative_error(result.logits[:, s], want_logits[:, s]) <= 1e-4 for s in range(6))
    layers = runner.config.num_layers
    calls = {"3L + 1": 3 * layers + 1, "3L": 3 * layers}[per_token]
    assert result.decode_wire.round_trips / 5 == calls
    assert result.prefill_wire.round_trips == calls + 1  # its Embedding; no call was refused


@pytest.mark.parametrize("missing", [("AttnGate", "DownScores", "DownHead"), ("DownHead",), ("DownScores",)])
def test_a_server_without_fused_calls_gets_the_unfused_ones_and_stays_exact(missing, tiny_dir, references,
                                                                             monkeypatch):
    """An older server knows some of AttnGate, DownScores, DownHead not (`unknown_method`): each is
    tried once, and the runner goes on with AttnOut + Gate, GatedDown + QKVScores, or GatedDown +
    LMHead in their place; its greedy tokens and logits still are transformers'."""
    from tsqp.server import checks

    older = {name: row for name, row in checks.METHODS.items() if name not in missing}
    monkeypatch.setattr(checks, "METHODS", older)
    with api.start_server(tiny_dir, device="cpu") as server:
        runner = api.connect(server.endpoint, tiny_dir)
        _, refused = record_calls(runner)
        ids = prompt(runner.config.vocab_size, 2, seed=11 + len(missing))
        want, want_logits = reference_greedy(references["gqa"], ids, 6)
        result = runner.generate(ids, 6, ignore_eos=True, keep_logits=True).run()
        runner.client.close()
    assert sorted(refused) == sorted((method, "unknown_method") for method in missing)
    assert torch.equal(result.tokens, want)
    assert all(relative_error(result.logits[:, s], want_logits[:, s]) <= 1e-4 for s in range(6))
    layers = runner.config.num_layers
    per_token = {3: 4 * layers + 1, 1: 2 * layers + 2 if missing == ("DownHead",) else 3 * layers}[len(missing)]
    assert result.decode_wire.round_trips / 5 == per_token


def test_a_fused_call_refused_after_it_has_answered_is_an_error(tiny_dir):
    """Only a server that never ran a fused method gets the unfused calls in its place."""
    from tsqp.errors import RemoteError
    from tsqp.server.core import GpuServer
    from tsqp.server.errors import Unsupported
    from tsqp.server.serving import ServerThread

    server = GpuServer(tiny_dir, "cpu")
    with ServerThread(server, api.free_endpoint()) as thread:
        runner = api.connect(thread.endpoint, tiny_dir)
        ids = prompt(runner.config.vocab_size, 1, seed=12)
        runner.prefill(ids)

        def refusing(args, tensors):
            raise Unsupported("AttnGate is not available any more")

        server.handlers["AttnGate"] = refusing
        with pytest.raises(RemoteError, match="unsupported"):
            runner.prefill(ids)
        runner.client.close()
