"""Generation against a server that restarts, evicts, serves two at once, or is gone for good;
and what a private-mode server sees of it."""

from __future__ import annotations

import threading

import pytest
import torch

from tsqp import api
from tsqp.audit import AuditLog, audited
from tsqp.errors import InputError
from tsqp.server import GpuServer, Limits, ServerThread
from tsqp.tee.generate import GenerationStopped
from tsqp.tee.runner import TeeRunner
from tsqp.transport import Client


def prompt(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def uninterrupted(endpoint: str, model_dir, ids: torch.Tensor, new: int) -> torch.Tensor:
    runner = api.connect(endpoint, model_dir)
    tokens = runner.generate(ids, new, ignore_eos=True).run().tokens
    runner.client.close()
    return tokens


def test_a_server_restarted_mid_generation_is_replayed_once_and_the_output_is_the_same(tiny_dir):
    endpoint = api.free_endpoint()
    ids = prompt(2, 9, seed=1)
    first = api.spawn_server(tiny_dir, device="cpu", endpoint=endpoint)
    second = None
    try:
        expected = uninterrupted(endpoint, tiny_dir, ids, 10)
        runner = api.connect(endpoint, tiny_dir, connect_timeout_s=30, retries=3)
        generation = runner.generate(ids, 10, ignore_eos=True)
        steps = iter(generation)
        made = [next(steps) for _ in range(4)]
        first.kill()  # the session and its KV cache are gone with it
        second = api.spawn_server(tiny_dir, device="cpu", endpoint=endpoint)
        made += list(steps)
        assert torch.equal(torch.stack(made, dim=1), expected)
        assert generation.result.replays == 1 and torch.equal(generation.result.tokens, expected)
        runner.client.close()
    finally:
        first.kill()
        if second is not None:
            second.stop()


def test_sessions_evicted_for_each_other_are_replayed_and_both_stay_exact(tiny_dir):
    """A budget that holds one session: two generations taking turns evict each other's at
    every step, and every step is replayed from the prompt."""
    ids_a, ids_b = prompt(1, 8, seed=2), prompt(1, 8, seed=3)
    server = GpuServer(tiny_dir, "cpu")
    with ServerThread(server, api.free_endpoint()) as thread:
        want_a, want_b = (uninterrupted(thread.endpoint, tiny_dir, ids, 6) for ids in (ids_a, ids_b))
        kv = 2 * 2 * 2 * 14 * 16 * 4  # K and V: layers, kv heads, 14 positions, head_dim, float32
        replay = kv + 14 * 2 * 176 * 4  # and the up of a replayed history (a view of gate and up: 2 x 176 wide)
        server.sessions.budget = replay + 512  # room for one replay, not for it beside another session
        a, b = (api.connect(thread.endpoint, tiny_dir) for _ in range(2))
        gen_a, gen_b = a.generate(ids_a, 6, ignore_eos=True), b.generate(ids_b, 6, ignore_eos=True)
        steps_a, steps_b = iter(gen_a), iter(gen_b)
        for _ in range(6):  # one step each, in turn
            next(steps_a), next(steps_b)
        list(steps_a), list(steps_b)  # let both finish
        assert torch.equal(gen_a.result.tokens, want_a) and torch.equal(gen_b.result.tokens, want_b)
        assert gen_a.result.replays + gen_b.result.replays >= 5


def test_two_concurrent_generations_on_one_server_are_both_exact(tiny_dir):
    server = GpuServer(tiny_dir, "cpu")
    with ServerThread(server, api.free_endpoint()) as thread:
        prompts = [prompt(1, 6, seed=4), prompt(2, 11, seed=5)]
        expected = [uninterrupted(thread.endpoint, tiny_dir, ids, 8) for ids in prompts]
        results: list = [None, None]

        def work(i: int) -> None:
            runner = api.connect(thread.endpoint, tiny_dir)
            results[i] = runner.generate(prompts[i], 8, ignore_eos=True).run().tokens
            runner.client.close()

        workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_a_session_over_the_memory_budget_is_refused_with_the_figures(tiny_dir):
    server = GpuServer(tiny_dir, "cpu", limits=Limits(session_bytes=64 << 10))
    with ServerThread(server, api.free_endpoint()) as thread:
        runner = api.connect(thread.endpoint, tiny_dir)
        with pytest.raises(GenerationStopped, match=r"after 0 of 400 new tokens: .*too_large.* would keep \d+ bytes, "
                                                    r"over the session memory budget of 65536 bytes"):
            runner.generate(prompt(1, 50, seed=6), 400).run()


def test_a_server_without_decode_is_refused_before_any_work(tiny_dir):
    server = GpuServer(tiny_dir, "cpu")
    ping = server.handlers["Ping"]
    server.handlers["Ping"] = lambda args, tensors: (ping(args, tensors)[0], {
        k: v for k, v in ping(args, tensors)[1].items() if k != "features"})  # an older server
    with ServerThread(server, api.free_endpoint()) as thread:
        runner = api.connect(thread.endpoint, tiny_dir)
        with pytest.raises(InputError, match="cannot decode"):
            runner.generate(prompt(1, 5, seed=7), 4)
        api.connect(thread.endpoint, tiny_dir, protocol="seed").generate(prompt(1, 5, seed=7), 4).run()  # the TEE keeps K, V


def test_a_server_lost_for_good_ends_the_generation_saying_how_far_it_got(tiny_dir):
    process = api.spawn_server(tiny_dir, device="cpu")
    try:
        runner = api.connect(process.endpoint, tiny_dir, timeout_s=5, connect_timeout_s=1, retries=1)
        steps = iter(runner.generate(prompt(1, 6, seed=8), 9, ignore_eos=True))
        next(steps), next(steps), next(steps)
        process.kill()
        with pytest.raises(GenerationStopped, match="generation stopped after 3 of 9 new tokens"):
            list(steps)
    finally:
        process.kill()


def test_a_private_decode_shows_the_server_no_token_and_nothing_twice(tiny_dir, monkeypatch):
    from tsqp.tee import guard

    log = AuditLog()
    plain: list[torch.Tensor] = []
    original = guard.GuardedSteps._project

    def recording(self, layer, group, x):
        plain.append(x.reshape(-1, x.shape[-1]).double().clone())
        return original(self, layer, group, x)

    monkeypatch.setattr(guard.GuardedSteps, "_project", recording)
    server = GpuServer(tiny_dir, "cpu")
    server.handle = audited(server.handle, log)
    ids = torch.full((1, 4), 77, dtype=torch.int64)  # one token four times over: identical rows at layer 0
    with ServerThread(server, api.free_endpoint()) as thread:
        runner = TeeRunner(Client(thread.endpoint, timeout_s=30), tiny_dir, protection="private")
        result = runner.generate(ids, 12, ignore_eos=True).run()
    received = [r for r in log.requests if r.method != "Ping"]
    assert {r.method for r in received} == {"Linears"} and len(received) == len(plain)
    history = torch.cat([ids, result.tokens], dim=1)[0].tolist()
    for r, x in zip(received, plain):
        (sent,) = r.tensors
        assert sent.dtype == torch.float64  # no int64 ids anywhere, in the prompt or generated
        assert not torch.isin(torch.tensor(history, dtype=torch.float64), sent).any()
        assert float(sent.abs().amax(dim=-1).min()) >= 2.0 ** 20 * float(x.abs().max())  # at mask scale
    layer0 = [r.tensors[0] for r in received if r.args.get("layer_idx") == 0 and r.args["modules"][0] == "q_proj"]
    rows = torch.cat(layer0)  # one row per position: the prompt's, then each fed-back token's
    assert rows.shape[0] == len(history) - 1
    assert len({tuple(row.tolist()) for row in rows}) == rows.shape[0]  # the same token never crosses twice alike
