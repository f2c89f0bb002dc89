"""Sampling in the TEE: reproducible with a seed, greedy at top_k = 1, softmax at temperature 1."""

from __future__ import annotations

import math

import pytest
import torch

from tsqp import api
from tsqp.errors import InputError
from tsqp.tee.sampling import Sampling, filtered_logits, sample


def test_at_temperature_1_one_step_draws_from_the_softmax():
    """A chi-square test of 6000 draws from fixed logits against softmax(logits)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    probs = torch.softmax(logits, dim=-1)[0]
    settings = Sampling(temperature=1.0, seed=3)
    generator = settings.generator()
    draws = torch.stack([sample(logits, settings, generator) for _ in range(6000)]).flatten()
    counts = torch.bincount(draws, minlength=6).double()
    expected = probs.double() * draws.numel()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # 5 degrees of freedom: p = 0.001
    peaked = Sampling(temperature=0.25, seed=3)  # a lower temperature sharpens the distribution
    sharp = torch.stack([sample(logits, peaked, peaked.generator()) for _ in range(200)])
    assert float((sharp == 0).double().mean()) > float(probs[0]) + 0.2


def test_top_k_and_top_p_keep_exactly_the_tokens_they_should():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    kept = torch.isfinite(filtered_logits(logits, Sampling(temperature=1.0, top_k=2)))
    assert kept.tolist() == [[True, True, False, False, False]]
    probs = torch.softmax(logits, dim=-1)[0].tolist()  # 0.636, 0.234, 0.086, ...
    for top_p, count in ((0.5, 1), (probs[0] + 0.01, 2), (probs[0] + probs[1] + 0.01, 3), (1.0, 5)):
        kept = torch.isfinite(filtered_logits(logits, Sampling(temperature=1.0, top_p=top_p)))
        assert int(kept.sum()) == count and bool(kept[0, :count].all())
    shuffled = logits[:, [3, 0, 4, 1, 2]]  # the same logits, in another order: the same tokens kept
    kept = torch.isfinite(filtered_logits(shuffled, Sampling(temperature=1.0, top_p=probs[0] + 0.01)))
    assert kept.tolist() == [[False, True, False, True, False]]


@pytest.mark.parametrize("bad, message", [({"temperature": -0.5}, "--temperature"), ({"temperature": math.nan},
                                          "--temperature"), ({"top_k": 0}, "--top-k"), ({"top_p": 0.0}, "--top-p"),
                                          ({"top_p": 1.5}, "--top-p"), ({"temperature": math.inf}, "--temperature"),
                                          ({"top_k": 5}, "only apply when sampling"),
                                          ({"top_p": 0.9}, "only apply when sampling")])
def test_bad_settings_are_named(bad, message):
    with pytest.raises(InputError, match=message):
        Sampling(**bad)


def test_a_seed_reproduces_a_generation_and_top_k_1_is_greedy(servers, tiny_dir):
    runner = api.connect(servers["gqa"].endpoint, tiny_dir)
    ids = torch.randint(3, 512, (2, 7), generator=torch.Generator().manual_seed(4))
    hot = {"temperature": 1.3, "top_p": 0.95, "ignore_eos": True}
    one = runner.generate(ids, 10, seed=11, **hot).run().tokens
    assert torch.equal(one, runner.generate(ids, 10, seed=11, **hot).run().tokens)
    assert not torch.equal(one, runner.generate(ids, 10, seed=12, **hot).run().tokens)
    greedy = runner.generate(ids, 10, ignore_eos=True).run().tokens
    assert torch.equal(runner.generate(ids, 10, temperature=1.0, top_k=1, seed=5, ignore_eos=True).run().tokens,
                       greedy)
    runner.client.close()
