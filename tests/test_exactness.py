"""The split forward must give transformers' logits on the same weights, at every position."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tsqp import api
from tsqp import ops
from tsqp.server import model, products
from tsqp.server.model import Fused

from conftest import REPO, VARIANTS, record_calls, reference_logits, relative_error

TOLERANCE = 1e-4  # max|Δ| / max|ref| in float32


def case_seed(variant: str, batch: int, draw: int) -> int:
    """A seed per test case from stable values: hash() of a str is salted per process."""
    return 100 * list(VARIANTS).index(variant) + 10 * batch + draw


def random_ids(vocab: int, batch: int, seed: int) -> torch.Tensor:
    """Random, varied ids and lengths: identical tokens would hide a missing causal mask."""
    g = torch.Generator().manual_seed(seed)
    length = int(torch.randint(9, 48, (1,), generator=g))
    return torch.randint(0, vocab, (batch, length), generator=g)


@pytest.mark.parametrize("protocol", ["lean", "seed"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_split_logits_match_transformers(variant, batch, protocol, servers, model_dirs, references):
    runner = api.connect(servers[variant].endpoint, model_dirs[variant], protocol=protocol)
    for seed in range(2):
        ids = random_ids(runner.config.vocab_size, batch, seed=case_seed(variant, batch, seed))
        result = runner.prefill(ids, all_positions=True)
        expected = reference_logits(references[variant], ids)
        assert result.logits.shape == expected.shape
        assert relative_error(result.logits, expected) <= TOLERANCE
        last = runner.prefill(ids)  # the seed's default: the last position only
        assert last.logits.shape == (batch, 1, runner.config.vocab_size)
        assert relative_error(last.logits, expected[:, -1:]) <= TOLERANCE
    runner.client.close()


def test_case_seeds_are_the_same_in_every_process():
    """Two interpreters with different hash salts draw the same cases (so a failure reproduces)."""
    code = ("import json; from test_exactness import case_seed, VARIANTS; "
            "print(json.dumps([case_seed(v, b, d) for v in VARIANTS for b in (1, 2) for d in (0, 1)]))")
    seeds = {subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                            env={**os.environ, "PYTHONHASHSEED": salt, "PYTHONPATH": str(REPO)}, check=True).stdout
             for salt in ("1", "2")}
    assert len(seeds) == 1 and len(set(json.loads(seeds.pop()))) == 4 * len(VARIANTS)


def test_a_missing_causal_mask_is_caught(servers, model_dirs, references, monkeypatch):
    """The exactness check above must fail if the TEE forgets the mask."""
    def unmasked_softmax(scores, scaling, factor=None):
        return torch.softmax(scores * scaling * (1 if factor is None else factor), dim=-1, dtype=torch.float32)

    monkeypatch.setattr(ops, "causal_softmax", unmasked_softmax)
    runner = api.connect(servers["gqa"].endpoint, model_dirs["gqa"])
    ids = random_ids(runner.config.vocab_size, 1, seed=7)
    result = runner.prefill(ids, all_positions=True)
    assert relative_error(result.logits, reference_logits(references["gqa"], ids)) > 1e-2


def test_future_tokens_do_not_change_earlier_logits(servers, model_dirs):
    runner = api.connect(servers["gqa"].endpoint, model_dirs["gqa"])
    ids = random_ids(runner.config.vocab_size, 1, seed=11)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % runner.config.vocab_size
    a = runner.prefill(ids, all_positions=True).logits
    b = runner.prefill(changed, all_positions=True).logits
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_16_bit_wire_is_close_but_not_exact(wire, servers, model_dirs, references):
    runner = api.connect(servers["gqa"].endpoint, model_dirs["gqa"], wire_dtype=wire)
    ids = random_ids(runner.config.vocab_size, 2, seed=5)
    error = relative_error(runner.prefill(ids, all_positions=True).logits, reference_logits(references["gqa"], ids))
    assert 0 < error < 5e-2


def test_a_float16_server_refuses_unscaled_scores_and_the_runner_takes_the_unfused_calls(tiny_dir, references):
    """Q·K^T before RMSNorm's scale is larger by both rows' RMS: a float16 server refuses
    DownScores (code `unsupported`) and the runner goes on with GatedDown and QKVScores."""
    with api.start_server(tiny_dir, device="cpu", dtype="float16") as server:
        runner = api.connect(server.endpoint, tiny_dir)
        methods, refused = record_calls(runner)
        ids = random_ids(runner.config.vocab_size, 1, seed=4)
        first, second = runner.prefill(ids), runner.prefill(ids)
        runner.client.close()
    assert refused == [("DownScores", "unsupported")] and methods.count("DownScores") == 1
    assert "GatedDown" in methods and methods.count("QKVScores") == 2 * runner.config.num_layers
    want = reference_logits(references["gqa"], ids)[:, -1:]
    for result in (first, second):
        assert relative_error(result.logits, want) <= 5e-2  # float16 products


def test_norm_weights_and_config_come_from_the_tee_directory(servers, model_dirs, monkeypatch):
    """With a model directory the TEE never asks the server for Init."""
    runner = api.connect(servers["gqa"].endpoint, model_dirs["gqa"])
    methods = []
    original = runner.client.call
    monkeypatch.setattr(runner.client, "call", lambda method, *a, **k: methods.append(method) or original(method, *a, **k))
    runner.prefill(random_ids(runner.config.vocab_size, 1, seed=3))
    assert "Init" not in methods and methods[0] == "Embedding" and methods[-2:] == ["DownHead", "Release"]


def test_init_fallback_warns_and_matches(servers, references):
    with pytest.warns(UserWarning, match="trusting the GPU server"):
        runner = api.connect(servers["llama3-rope"].endpoint, None, protocol="seed")
    ids = random_ids(runner.config.vocab_size, 1, seed=9)
    expected = reference_logits(references["llama3-rope"], ids)
    assert relative_error(runner.prefill(ids, all_positions=True).logits, expected) <= TOLERANCE


@pytest.mark.parametrize("protocol", ["lean", "seed"])
def test_long_prompts_cut_into_causal_blocks_stay_exact(protocol, servers, model_dirs, references):
    """The lean protocol sends only the causal blocks of the scores: 8 of them at 300 tokens."""
    ends = ops.query_blocks(300)
    assert len(ends) == 8 and ends[-1] == 300 and min(b - a for a, b in zip([0, *ends], ends)) >= 32
    for n in range(1, 700):  # never more than 8 blocks, none under 32 queries unless n is
        sizes = [b - a for a, b in zip([0, *ops.query_blocks(n)], ops.query_blocks(n))]
        assert sum(sizes) == n and len(sizes) <= 8 and min(sizes) >= min(n, 32)
    runner = api.connect(servers["gqa"].endpoint, model_dirs["gqa"], protocol=protocol)
    ids = torch.randint(0, runner.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(30))
    result = runner.prefill(ids, all_positions=True)
    assert relative_error(result.logits, reference_logits(references["gqa"], ids)) <= TOLERANCE
    runner.client.close()


@pytest.mark.parametrize("n, m", [(1, 1), (1, 9), (5, 5), (7, 23), (32, 128)])
@pytest.mark.parametrize("per_score", [False, True])
def test_causal_softmax_of_a_block_matches_softmax_over_each_querys_past(n, m, per_score):
    """Block queries are the last n of m positions: query i sees keys [0, m - n + i]. The
    scaling is a number, or (lean) a factor per query and key."""
    generator = torch.Generator().manual_seed(n * 1000 + m)
    scores, scaling = torch.randn(2, 3, n, m, generator=generator) * 4, 0.3
    factor = torch.rand(2, 1, n, m, generator=generator) + 0.1 if per_score else None
    probs = ops.causal_softmax(scores, scaling, factor)
    for i in range(n):
        seen = m - n + i + 1
        expected = scores[:, :, i, :seen] * scaling
        expected = torch.softmax(expected if factor is None else expected * factor[:, :, i, :seen], dim=-1)
        torch.testing.assert_close(probs[:, :, i, :seen], expected, rtol=1e-6, atol=1e-7)
        assert not probs[:, :, i, seen:].any()  # the future gets exactly zero weight


@pytest.mark.parametrize("shape", [(1, 2, 4, 16, 33), (2, 8, 128, 64, 160)])  # a decode's product, a prefill's
def test_small_ops_on_one_thread_give_the_same_result_and_keep_the_thread_count(shape, monkeypatch):
    """Small products and softmaxes run on one thread (ops.SMALL_PRODUCT, SMALL_SOFTMAX), big
    ones on all; either way the result is the op's, and the caller's thread count is back
    afterwards, also after an error."""
    b, kv, n, d, m = shape
    small = b * kv * n * d * m < ops.SMALL_PRODUCT
    threads_seen, matmul = [], torch.matmul

    def recording_matmul(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return matmul(*args, **kwargs)
    generator = torch.Generator().manual_seed(m)
    a, k = torch.randn(b, kv, n, d, generator=generator), torch.randn(b, kv, d, m, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = torch.matmul(a, k)
        monkeypatch.setattr(torch, "matmul", recording_matmul)
        torch.testing.assert_close(ops.batched_matmul(a, k), expected, rtol=0, atol=0)
        assert threads_seen == [1 if small else 2] and torch.get_num_threads() == 2
        # a broadcast batch counts: one [n, d] against many keys is as big as it looks
        assert ops.batched_matmul(a[0, 0], k.expand(64, *k.shape)).shape == (64, b, kv, n, m)
        assert threads_seen[-1] == (1 if small and 64 * n * d * m * b * kv < ops.SMALL_PRODUCT else 2)
        with pytest.raises(RuntimeError):
            ops.batched_matmul(a, k[..., :-1, :])  # mismatched inner dims
        assert torch.get_num_threads() == 2
        scores = torch.randn(b, kv, n, m, generator=generator)
        expected = torch.softmax(scores * 0.5 + ops._causal_bias(n, m), dim=-1)
        torch.testing.assert_close(ops.causal_softmax(scores, 0.5), expected, rtol=1e-6, atol=1e-7)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_a_decode_product_runs_alone_where_the_server_measured_that_it_keeps_up(monkeypatch):
    """Fused.product of at most `rows_alone` rows runs on one thread, a larger one (or any, at
    rows_alone 0) on all, with F.linear's result either way. The probe that sets rows_alone
    says yes within 5 % of all threads' time, no past it, and no where there is nothing to
    choose: one thread, a small product, weights off the CPU."""
    generator = torch.Generator().manual_seed(11)
    weight, bias = torch.randn(48, 32, generator=generator), torch.randn(48, generator=generator)
    alone, shared = Fused(weight, bias, (16, 32), rows_alone=ops.DECODE_ROWS), Fused(weight, bias, (16, 32))
    threads_seen, linear = [], F.linear

    def recording_linear(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return linear(*args, **kwargs)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(F, "linear", recording_linear)
        for rows, fused, expect in ((1, alone, 1), (ops.DECODE_ROWS, alone, 1), (ops.DECODE_ROWS + 1, alone, 2),
                                    (1, shared, 2)):
            x = torch.randn(1, rows, 32, generator=generator)
            torch.testing.assert_close(fused.product(x), linear(x, weight, bias), rtol=0, atol=0)
            assert threads_seen[-1] == expect and torch.get_num_threads() == 2, (rows, threads_seen)
        monkeypatch.setattr(F, "linear", linear)
        big = torch.randn(ops.SMALL_PRODUCT // ops.DECODE_ROWS // 512, 512)
        assert not products.one_thread_keeps_up(big.to("meta"))
        assert not products.one_thread_keeps_up(weight)  # 48 x 32: one thread either way

        def clock(alone_s: float, shared_s: float):  # each run reads it twice, alone first
            return itertools.accumulate(itertools.cycle([alone_s, 0, shared_s, 0]), initial=100.0).__next__
        assert products.one_thread_keeps_up(big, clock=clock(1.04, 1.0))
        assert not products.one_thread_keeps_up(big, clock=clock(1.06, 1.0))
        assert products.one_thread_keeps_up(big, clock=clock(0.5, 1.0))
        torch.set_num_threads(1)
        assert not products.one_thread_keeps_up(big)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape, bias", [((1, 1, 96), True), ((2, 1, 96), False), ((1, 3, 96), True), ((4, 96), False)])
def test_a_transposed_product_is_f_linears_within_rounding(shape, bias, monkeypatch):
    """(W x^T)^T equals F.linear(x, W, b) as closely as two float32 sums of one product can (both
    against float64), in x's shape; Fused.product takes it at exactly its transposed row counts."""
    generator = torch.Generator().manual_seed(sum(shape))
    x, weight = torch.randn(shape, generator=generator), torch.randn(80, 96, generator=generator)
    b = torch.randn(80, generator=generator) if bias else None
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    out = products.linear_transposed(x, weight, b)
    assert out.shape == (*shape[:-1], 80) and out.dtype == torch.float32 and out.is_contiguous()
    error = (out.double() - exact).abs().max().item()
    assert error <= 4 * (F.linear(x, weight, b).double() - exact).abs().max().item() + 1e-6

    used, transposed = [], products.linear_transposed
    monkeypatch.setattr(model, "linear_transposed", lambda *args: used.append(args[0].shape) or transposed(*args))
    rows = x.shape[:-1].numel()
    fused = Fused(weight, b, (30, 50), transposed_rows=frozenset({rows}))
    torch.testing.assert_close(fused.product(x), out, rtol=0, atol=0)
    assert used == [x.shape]
    other = torch.randn(rows + 1, 96, generator=generator)
    torch.testing.assert_close(fused.product(other), F.linear(other, weight, b), rtol=0, atol=0)
    assert used == [x.shape]


def test_the_probe_swaps_operands_only_where_that_is_5_percent_faster_on_the_products_own_threads(monkeypatch):
    """transposed_rows: each row count of 2 to DECODE_ROWS big enough to measure, timed on the
    threads its product will run on (alone up to rows_alone), each run with the next layer's
    weight and bias; none off the CPU or for a small weight, and never one row."""
    generator = torch.Generator().manual_seed(5)
    out = ops.SMALL_PRODUCT // 3 // 512 + 1  # 2 rows too few to measure, 3 and up not
    layers = [(torch.randn(out, 512, generator=generator), torch.randn(out, generator=generator)) for _ in range(3)]

    def clock(plain_s: float, transposed_s: float):  # each run reads it twice, F.linear first
        return itertools.accumulate(itertools.cycle([plain_s, 0, transposed_s, 0]), initial=100.0).__next__
    assert products.transposed_rows(layers, 0, clock=clock(1.0, 0.94)) == set(range(3, ops.DECODE_ROWS + 1))
    assert products.transposed_rows([(torch.randn(ops.SMALL_PRODUCT // 512, 512), None)], 0,
                                    clock=clock(1.0, 0.5)) == set(range(2, ops.DECODE_ROWS + 1))
    assert products.transposed_rows(layers, 0, clock=clock(1.0, 0.96)) == frozenset()
    assert products.transposed_rows([(w.to("meta"), b.to("meta")) for w, b in layers], 0) == frozenset()
    assert products.transposed_rows([(torch.randn(48, 32), None)], 0) == frozenset()

    runs, linear, transposed = [], F.linear, products.linear_transposed  # (order, rows, threads, weight, bias)

    def recorder(order: str, fn):
        return lambda x, w, b: runs.append((order, x.shape[0], torch.get_num_threads(), w, b)) or fn(x, w, b)
    monkeypatch.setattr(F, "linear", recorder("plain", linear))
    monkeypatch.setattr(products, "linear_transposed", recorder("transposed", transposed))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        products.transposed_rows(layers, rows_alone=3, runs=1)
    finally:
        torch.set_num_threads(threads)
    assert {(order, rows, count) for order, rows, count, _, _ in runs} == {
        (order, rows, 1 if rows == 3 else 2) for order in ("plain", "transposed") for rows in (3, 4)}
    turns = [next(i for i, (w, _) in enumerate(layers) if w is run[3]) for run in runs]
    assert turns == [i % 3 for i in range(len(runs))]  # never the weight the last run read
    assert all(run[4] is layers[i][1] for run, i in zip(runs, turns))  # with its own bias
