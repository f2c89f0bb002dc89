"""Private mode hides ids, activations and logits from the server; --verify catches a lying server."""

from __future__ import annotations

import pytest
import torch

from tsqp import api, ops
from tsqp.audit import AuditLog, audited, tampering
from tsqp.server import GpuServer, ServerThread
from tsqp.tee import freivalds, masks, offline
from tsqp.tee.guard import GuardedSteps, IntegrityError, MaskReuseError
from tsqp.tee.runner import TeeRunner
from tsqp.transport import Client

from conftest import reference_logits, relative_error


def wrapped_server(model_dir, wrap) -> ServerThread:
    server = GpuServer(model_dir, "cpu")
    server.handle = wrap(server.handle)
    return ServerThread(server, api.free_endpoint())


def runner_for(endpoint, model_dir, **kwargs) -> TeeRunner:
    return TeeRunner(Client(endpoint, timeout_s=30), model_dir, **kwargs)


def random_ids(vocab: int, batch: int, seed: int, low: int = 6, high: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, int(torch.randint(low, high, (1,), generator=g))), generator=g)


@pytest.mark.parametrize("variant", ["gqa", "attention-bias", "tied", "head-dim", "llama3-rope"])
@pytest.mark.parametrize("verify", [False, True])
def test_private_logits_match_transformers(variant, verify, servers, model_dirs, references):
    runner = runner_for(servers[variant].endpoint, model_dirs[variant], protection="private", verify=verify)
    ids = random_ids(runner.config.vocab_size, 2, seed=len(variant))
    result = runner.prefill(ids, all_positions=True)
    assert relative_error(result.logits, reference_logits(references[variant], ids)) <= 1e-3
    assert result.wire.round_trips == 4 * runner.config.num_layers + 1  # no Embedding: ids stay in the TEE


def test_server_sees_no_ids_and_nothing_correlated_with_plaintext(tiny_dir, monkeypatch):
    log = AuditLog()
    plaintexts: list[torch.Tensor] = []
    original = GuardedSteps._project

    def recording_project(self, layer, group, x):
        plaintexts.append(x.reshape(-1, x.shape[-1]).double().clone())
        return original(self, layer, group, x)

    monkeypatch.setattr(GuardedSteps, "_project", recording_project)
    with wrapped_server(tiny_dir, lambda h: audited(h, log)) as server:
        runner = runner_for(server.endpoint, tiny_dir, protection="private")
        # >= 20k values per tensor, so a chance correlation of 0.05 is a 5-sigma event
        ids = random_ids(runner.config.vocab_size, 2, seed=21, low=160, high=161)
        runner.prefill(ids, all_positions=True)
    computed = [r for r in log.requests if r.method != "Ping"]
    assert {r.method for r in computed} == {"Linears"}
    assert len(computed) == len(plaintexts)
    for received, plain in zip(computed, plaintexts):
        (sent,) = received.tensors
        assert sent.dtype == torch.float64 and sent.shape == plain.shape  # no int64 ids anywhere
        pair = torch.stack([sent.reshape(-1), plain.reshape(-1)])
        assert abs(torch.corrcoef(pair)[0, 1].item()) < 0.05  # coarse; the attack is tests/test_private_attack.py
        assert not torch.isin(ids.reshape(-1).double(), sent.reshape(-1)).any()  # no id travels as a value


def test_the_same_prompt_sends_different_bytes(tiny_dir):
    log = AuditLog()
    with wrapped_server(tiny_dir, lambda h: audited(h, log)) as server:
        runner = runner_for(server.endpoint, tiny_dir, protection="private")
        ids = random_ids(runner.config.vocab_size, 1, seed=5)
        first = runner.prefill(ids).logits
        count = len(log.requests)
        second = runner.prefill(ids).logits
    one, two = log.requests[:count], log.requests[count:]
    assert len(one) == len(two) == 4 * runner.config.num_layers + 1
    for a, b in zip(one, two):
        assert a.method == b.method and not torch.equal(a.tensors[0], b.tensors[0])
    assert relative_error(first, second) < 1e-5


def test_one_time_material_is_never_reused(servers, tiny_dir):
    runner = runner_for(servers["gqa"].endpoint, tiny_dir, protection="private")
    report = runner.prepare(batch=1, tokens=12, count=2)
    assert report.prefills == 2 and report.bytes > 0 and report.seconds > 0
    secrets = runner.steps.pool.take((1, 12, False))
    secrets.take(0, "qkv")
    with pytest.raises(MaskReuseError):
        secrets.take(0, "qkv")
    with pytest.raises(MaskReuseError):  # outside a prefill there is no material to use
        h = torch.randn(1, 12, runner.config.hidden_size)
        runner.steps.gate(0, ops.rms_normalize(h, torch.ones(h.shape[-1]), 1e-5))
    ids = random_ids(runner.config.vocab_size, 1, seed=1, low=12, high=13)
    assert runner.prefill(ids).offline_s == 0.0  # the prepared set
    assert runner.prefill(ids).offline_s > 0.0  # pool empty: made on demand, timed apart


@pytest.mark.parametrize("mode", ["element", "row", "scale"])
@pytest.mark.parametrize("protection", ["none", "private"])
def test_verify_catches_a_tampering_server(mode, protection, tiny_dir):
    with wrapped_server(tiny_dir, lambda h: tampering(h, mode)) as server:
        runner = runner_for(server.endpoint, tiny_dir, protection=protection, verify=True)
        with pytest.raises(IntegrityError, match=r"integrity check failed at layer 0 q_proj"):
            runner.prefill(random_ids(runner.config.vocab_size, 1, seed=2))


def test_verify_names_the_tampered_module(tiny_dir):
    # corrupt only the 7th compute reply: layer 0's gate/up call is the 3rd; 7th is layer 1 gate/up
    with wrapped_server(tiny_dir, lambda h: tampering(h, "element", every=7)) as server:
        runner = runner_for(server.endpoint, tiny_dir, verify=True)
        with pytest.raises(IntegrityError, match=r"at layer 1 gate_proj"):
            runner.prefill(random_ids(runner.config.vocab_size, 1, seed=3))


def test_offline_material_in_blocks_matches_whole_float64_products(monkeypatch):
    """The offline phase converts weights a block of rows at a time; small blocks make several,
    the last one ragged, and the mask's image, P W, P b and (P∘P)(W∘W) must equal the whole-matrix products."""
    monkeypatch.setattr(offline, "WEIGHT_BLOCK", 4 * 24)
    monkeypatch.setattr(offline, "MASKED_WEIGHT_BLOCK", 3 * 24)
    g = torch.Generator().manual_seed(9)
    weight, bias = torch.randn(46, 24, generator=g), torch.randn(46, generator=g)
    mask = masks.secure_uniform((5, 24))
    unmask, checks = offline.module_secrets(weight, bias, mask, count=3)
    w64, b64, probes = weight.double(), bias.double(), checks.probes
    assert probes.shape == (3, 46) and bool((probes.abs() >= 0.5).all() and (probes.abs() < 1).all())
    torch.testing.assert_close(unmask, mask @ w64.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(checks.images, probes @ w64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(checks.biases, probes @ b64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(checks.squares, probes.square() @ w64.square(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(checks.bias_squares, probes.square() @ b64.square(), rtol=1e-12, atol=1e-12)
    assert offline.module_secrets(weight, None, None, count=0) == (None, None)


def test_every_product_gets_its_own_probes(tiny_dir):
    from tsqp.config import DirectoryWeights, load_config

    (secrets,), _ = offline.precompute(DirectoryWeights(tiny_dir), load_config(tiny_dir), (1, 9, False), private=False,
                                  verify=True)
    lm_head, qkv = secrets.calls[(None, "lm_head")], secrets.calls[(0, "qkv")]
    assert lm_head.checks[0].probes.shape[0] == freivalds.PROBES == 4  # the last position: one row, still four
    assert [c.probes.shape[0] for c in qkv.checks] == [freivalds.PROBES] * 3
    assert not torch.equal(qkv.checks[1].probes[:, :16], qkv.checks[2].probes[:, :16])  # k and v: fresh probes


def test_material_made_in_one_pass_for_several_passes_is_never_shared(tiny_dir):
    from tsqp.config import DirectoryWeights, load_config

    made, _ = offline.precompute(DirectoryWeights(tiny_dir), load_config(tiny_dir), (2, 1, False), private=True,
                                 verify=True, count=3)
    calls = [m.calls[(1, "gate_up")] for m in made]
    assert all(c.mask.shape == (2, 64) for c in calls)
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert not torch.isin(calls[a].mask, calls[b].mask).any()
        assert not torch.equal(calls[a].checks[0].probes, calls[b].checks[0].probes)


def test_verify_refuses_a_16_bit_wire_and_a_server_not_in_float32(servers, model_dirs, tiny_dir):
    """A 16-bit roundoff would let the tolerance outgrow the changes it must catch, so --verify
    takes float32 only; the server's word about its dtype is used only to refuse early."""
    from tsqp.errors import InputError

    with pytest.raises(InputError, match="float32 wire, not bfloat16"):
        runner_for(servers["gqa"].endpoint, model_dirs["gqa"], verify=True, wire_dtype="bfloat16")
    runner_for(servers["gqa"].endpoint, model_dirs["gqa"], verify=True, protection="private",
               wire_dtype="bfloat16")  # private mode's wire is float64 whatever was asked for
    honest, lying = GpuServer(tiny_dir, "cpu", dtype="bfloat16"), GpuServer(tiny_dir, "cpu", dtype="bfloat16")
    lying.handlers["Ping"] = lambda args, tensors: ([], {"server": "tsqp", "dtype": "float32"})  # computes in bfloat16
    with ServerThread(honest, api.free_endpoint()) as thread:
        with pytest.raises(InputError, match="this one says bfloat16"):
            runner_for(thread.endpoint, tiny_dir, verify=True)
    with ServerThread(lying, api.free_endpoint()) as thread:
        with pytest.raises(IntegrityError, match="layer 0 q_proj"):
            runner_for(thread.endpoint, tiny_dir, verify=True).prefill(random_ids(512, 1, seed=4))


def test_verify_has_no_false_alarm_in_200_honest_runs(servers, model_dirs, references):
    runners = [runner_for(servers[v].endpoint, model_dirs[v], verify=True, protection=p)
               for v, p in (("gqa", "none"), ("attention-bias", "private"), ("tied", "none"), ("mha", "private"))]
    for i in range(200):
        runner = runners[i % len(runners)]
        runner.prefill(random_ids(runner.config.vocab_size, 1 + i % 2, seed=1000 + i, low=2, high=24))


def test_guarded_modes_need_the_tee_model_directory(servers):
    from tsqp.errors import InputError

    with pytest.raises(InputError, match="own model directory"):
        runner_for(servers["gqa"].endpoint, None, protection="private")


def test_a_guarded_mode_refuses_the_seed_protocol_instead_of_ignoring_it(servers, tiny_dir):
    from tsqp.errors import InputError

    for kwargs in ({"protection": "private"}, {"verify": True}):
        with pytest.raises(InputError, match="--protocol seed cannot be combined"):
            runner_for(servers["gqa"].endpoint, tiny_dir, protocol="seed", **kwargs)
    runner = runner_for(servers["gqa"].endpoint, tiny_dir, protection="private")
    assert (runner.protocol, runner.protection, runner.verify, runner.guarded) == ("lean", "private", False, True)
