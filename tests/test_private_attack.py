"""Private mode against the strongest attack we know: a curious server that knows the weights and
our code, and enumerates the vocabulary against the masked input of layer 0 (a function of the
token alone). It must learn nothing; with the grid rounding reverted it recovers every token.
"""

from __future__ import annotations

import math

import pytest
import torch

from tsqp import api, ops
from tsqp.audit import AuditLog, audited
from tsqp.config import DirectoryWeights, load_config
from tsqp.models import make_model
from tsqp.server import GpuServer, ServerThread
from tsqp.tee import guard, masks
from tsqp.tee.runner import TeeRunner
from tsqp.transport import Client

# Wide enough that each row has dozens of elements below max|x|/64: those carried the leak.
WIDE = {"hidden_size": 1024, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 8,
        "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("wide") / "model", seed=13, overrides=WIDE)


def layer0_candidates(model_dir) -> torch.Tensor:
    """What the server computes for every token: layer 0's q/k/v input, as the TEE's code does."""
    weights, config = DirectoryWeights(model_dir), load_config(model_dir)
    table = weights.table("model.embed_tokens.weight").float()
    return ops.rms_norm(table, weights.input_norm(0), config.rms_norm_eps)


def received_layer0_input(model_dir, ids: torch.Tensor) -> torch.Tensor:
    """Run a private prefill and return the tensor the server received for layer 0's q/k/v."""
    log = AuditLog()
    server = GpuServer(model_dir, "cpu")
    server.handle = audited(server.handle, log)
    with ServerThread(server, api.free_endpoint()) as thread:
        runner = TeeRunner(Client(thread.endpoint, timeout_s=60), model_dir, protection="private")
        runner.prefill(ids)
        runner.client.close()
    (first,) = [r for r in log.requests if r.method == "Linears" and r.args.get("layer_idx") == 0
                and r.args["modules"][0] == "q_proj"]
    return first.tensors[0]


def grid_of(sent: torch.Tensor) -> float:
    """The mask's grid as the server can read it off the bytes: s ~ max|v|, g = s 2^-52."""
    return 2.0 ** (round(math.log2(sent.abs().max().item())) - masks.GRID_BITS)


def low_bits_attack(sent: torch.Tensor, candidates: torch.Tensor) -> list[int]:
    """Per row, the one candidate t for which v - x_t lies within half an ulp of v of a multiple
    of the grid in every element (-1 when none or several do): fl(x + s r) kept x's bits below g."""
    grid = grid_of(sent)
    v = sent.double() / grid  # powers of two: exact
    frac_v = v - v.floor()
    x = candidates.double() / grid
    frac_x = x - x.floor()
    ulp = torch.ldexp(torch.ones_like(sent, dtype=torch.float64), torch.frexp(sent.double()).exponent - 53)
    tolerance = ulp / (2 * grid) + 1e-12
    guesses = []
    for row in range(sent.shape[0]):
        d = torch.remainder(frac_v[row] - frac_x, 1.0)
        survivors = (torch.minimum(d, 1 - d) <= tolerance[row]).all(dim=-1).nonzero().flatten()
        guesses.append(int(survivors[0]) if len(survivors) == 1 else -1)
    return guesses


def support_attack(sent: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Per row, how many candidates the received values are possible for at all: v/g - x_q/g
    must be a mask integer in [-2^52, 2^52). A likelihood attack can do no better than this
    filter, since every such candidate is equally likely."""
    grid = grid_of(sent)
    n = sent.double() / grid
    x_int = torch.round(candidates.double() / grid)
    counts = []
    for row in range(sent.shape[0]):
        u = n[row] - x_int
        counts.append(int(((u >= -2.0 ** 52) & (u < 2.0 ** 52)).all(dim=-1).sum()))
    return torch.tensor(counts)


def prompt(vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 40), generator=g)


def test_the_low_bits_attack_recovers_nothing(wide_dir):
    candidates = layer0_candidates(wide_dir)
    ids = prompt(candidates.shape[0], seed=1)
    sent = received_layer0_input(wide_dir, ids)
    guesses = torch.tensor(low_bits_attack(sent, candidates))
    recovered = int((guesses == ids.reshape(-1)).sum())
    assert recovered <= 1, f"the server recovered {recovered} of {ids.numel()} prompt tokens"
    possible = support_attack(sent, candidates)
    assert int(possible.min()) >= 0.99 * candidates.shape[0]  # every token stays possible


def test_the_attack_recovers_every_token_without_the_grid_rounding(wide_dir, monkeypatch):
    """The same attack against the flawed masking (x + s r without rounding x to the grid)."""
    monkeypatch.setattr(masks, "quantize_to_grid", lambda x, grid: x)
    candidates = layer0_candidates(wide_dir)
    ids = prompt(candidates.shape[0], seed=2)
    guesses = torch.tensor(low_bits_attack(received_layer0_input(wide_dir, ids), candidates))
    assert torch.equal(guesses, ids.reshape(-1))


@pytest.mark.parametrize("magnitude", [1e-30, 1e-3, 1.0, 3e5, 1e37])
def test_the_masked_value_is_the_rounded_input_plus_exactly_the_mask(magnitude):
    g = torch.Generator().manual_seed(int(math.log10(magnitude)) + 40)
    x = (torch.randn(16, 300, generator=g) * magnitude * torch.logspace(-9, 0, 300)).float()
    x[0, 0] = 0.0
    r = masks.secure_uniform((16, 300))
    exponent = masks.exponent_above(x.abs().max())
    sent, scale = masks.mask_input(x, r, exponent)
    grid = scale * 2.0 ** -masks.GRID_BITS
    units = sent / grid
    assert sent.dtype == torch.float64 and torch.equal(units, units.round())  # nothing below the grid
    assert bool((units.abs() < 2.0 ** 53).all())  # so the sum was exact
    quantized = masks.quantize_to_grid(x.double(), grid)
    assert torch.equal(sent - quantized, scale * r)  # v - x_q is the mask, bit for bit
    # the rounding moves no element by more than 2^-29 of the bound 2^e > max|x|
    assert float((quantized - x.double()).abs().max()) <= 2.0 ** (exponent - 29)


def test_every_value_sent_in_a_private_prefill_lies_on_its_mask_grid(tiny_dir, monkeypatch):
    scales: list[float] = []
    original = masks.mask_input

    def recording(x, r, exponent):
        sent, scale = original(x, r, exponent)
        scales.append(scale)
        return sent, scale

    monkeypatch.setattr(guard, "mask_input", recording)
    log = AuditLog()
    server = GpuServer(tiny_dir, "cpu")
    server.handle = audited(server.handle, log)
    with ServerThread(server, api.free_endpoint()) as thread:
        runner = TeeRunner(Client(thread.endpoint, timeout_s=60), tiny_dir, protection="private")
        runner.prefill(prompt(runner.config.vocab_size, seed=3), all_positions=True)
    sent = [r.tensors[0] for r in log.requests if r.method == "Linears"]
    assert len(sent) == len(scales) == 4 * runner.config.num_layers + 1
    for tensor, scale in zip(sent, scales):
        units = tensor / (scale * 2.0 ** -masks.GRID_BITS)
        assert torch.equal(units, units.round())


def test_layer_0_has_one_scale_for_the_whole_vocabulary(wide_dir):
    """Layer 0's input is a function of the token alone: a scale from max|x| would sort tokens
    into classes. Single-token prompts of the tokens with the smallest and largest exponent
    must show the server the same scale."""
    candidates = layer0_candidates(wide_dir)
    exponents = torch.frexp(candidates.abs().max(dim=-1).values).exponent
    assert int(exponents.max()) > int(exponents.min())  # this model's tokens do fall into classes
    seen = set()
    for token in (int(exponents.argmin()), int(exponents.argmax())):
        sent = received_layer0_input(wide_dir, torch.tensor([[token]]))
        seen.add(grid_of(sent))
    assert len(seen) == 1


def test_a_non_finite_activation_is_refused_not_masked():
    with pytest.raises(masks.MaskError, match="non-finite activation at layer 3 qkv"):
        masks.exponent_above(torch.tensor(float("inf")), "layer 3 qkv")
    assert masks.exponent_above(torch.tensor(1e300, dtype=torch.float64)) == 997


def received_decode_inputs(model_dir, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A private generation's layer-0 q/k/v inputs as the server received them at each decode
    step (one row each), and the tokens they stand for (each step feeds back the last one made)."""
    log = AuditLog()
    server = GpuServer(model_dir, "cpu")
    server.handle = audited(server.handle, log)
    with ServerThread(server, api.free_endpoint()) as thread:
        runner = TeeRunner(Client(thread.endpoint, timeout_s=60), model_dir, protection="private")
        tokens = runner.generate(ids, new, ignore_eos=True).run().tokens
        runner.client.close()
    layer0 = [r.tensors[0] for r in log.requests if r.method == "Linears" and r.args.get("layer_idx") == 0
              and r.args["modules"][0] == "q_proj"]
    return torch.cat(layer0[1:]), tokens[0, :-1]  # the prefill's call first, then one per decode step


@pytest.mark.parametrize("reverted", [False, True])
def test_the_low_bits_attack_against_decode_steps(wide_dir, monkeypatch, reverted):
    """Each decode step sends one masked row of layer 0's input: the token fed back. The attack
    must recover none of them, and all of them against the flawed masking."""
    if reverted:
        monkeypatch.setattr(masks, "quantize_to_grid", lambda x, grid: x)
    candidates = layer0_candidates(wide_dir)
    sent, fed_back = received_decode_inputs(wide_dir, prompt(candidates.shape[0], seed=4)[:1, :6], 8)
    guesses = torch.tensor([low_bits_attack(row[None], candidates)[0] for row in sent])
    recovered = int((guesses == fed_back).sum())
    assert recovered == (len(fed_back) if reverted else 0), f"recovered {recovered} of {len(fed_back)}"
