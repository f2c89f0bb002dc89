"""The server's per-call path: the registry's field types known at import, inputs checked on
the host before any device work, persistent staging buffers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tsqp.server import registry


def test_a_field_declared_with_two_types_is_refused_when_the_method_registers(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    monkeypatch.setattr(registry, "ARG_TYPES", dict(registry.ARG_TYPES))
    assert registry.ARG_TYPES["layer_idx"] == (int,)
    with pytest.raises(ValueError, match="'layer_idx' is declared with two types"):
        registry.method("Conflicting", args={"layer_idx": (str,)})(lambda server, args, tensors: ([], {}))
    assert "Conflicting" not in registry.METHODS


def _request(method: str, tensors: list[torch.Tensor], **args) -> list:
    from tsqp import protocol

    return protocol.encode({"method": method, "args": args}, tensors)


def test_no_method_reads_a_device_value_before_the_reply(tiny_dir):
    """At most one wait for the device per call, the reply's: with the model and the inputs on
    torch's meta device, any host read of a device value (a finiteness or range check there,
    `.item()`, `bool(tensor)`) fails the call. The checks run on the host copies instead."""
    from tsqp import protocol
    from tsqp.server.core import GpuServer
    from tsqp.staging import Staging

    server = GpuServer(tiny_dir, device="cpu")
    server.model.to("meta")
    server.take_plain_weights()  # on meta too
    server.device = torch.device("meta")
    server.staging = Staging(server.device)
    server.staging.to_host = lambda tensors: [torch.zeros(t.shape, dtype=t.dtype) for t in tensors]
    c, g = server.config, torch.Generator().manual_seed(7)
    n, d, h = 5, c.head_dim, c.hidden_size
    session = {"layer_idx": 1, "session": "s"}
    calls = [
        _request("Embedding", [torch.randint(0, c.vocab_size, (2, n), generator=g)]),
        _request("Linear", [torch.randn(2, n, h, generator=g)], layer_idx=0, module_name="q_proj"),
        _request("Linears", [torch.randn(2, n, h, generator=g)], layer_idx=0, modules=["k_proj", "v_proj"]),
        _request("QKVScores", [torch.randn(2, n, h, generator=g), torch.randn(n, d, generator=g),
                               torch.randn(n, d, generator=g)], blocks=[2, n], start=0, capacity=n + 1, **session),
        _request("AttnOut", [torch.rand(2, c.num_heads, 2, 2, generator=g),
                             torch.rand(2, c.num_heads, n - 2, n, generator=g)], **session),
        _request("Gate", [torch.randn(2, n, h, generator=g)], **session),
        _request("GatedDown", [torch.randn(2, n, c.intermediate_size, generator=g)], **session),
        _request("LMHead", [torch.randn(2, 1, h, generator=g)], session="s"),
        _request("Echo", [torch.randn(3, generator=g)]),
    ]
    for frames in calls:
        header = protocol.decode_header(server.handle(frames)[0])
        assert header["ok"], header


def test_refused_inputs_are_refused_before_the_device_sees_them(tiny_dir):
    """NaN, infinity and out-of-vocabulary ids are still refused, with the index of the tensor."""
    from tsqp import protocol
    from tsqp.server.core import GpuServer

    server = GpuServer(tiny_dir, device="cpu")
    c, g = server.config, torch.Generator().manual_seed(8)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(1, 4, c.head_dim, generator=g)
        x[0, int(torch.randint(0, 4, (1,), generator=g)), 1] = bad
        frames = _request("QKVScores", [torch.randn(1, 4, c.hidden_size, generator=g), x[0], x[0].clone()],
                          layer_idx=0, session="t", blocks=[4], start=0)
        error = protocol.decode_header(server.handle(frames)[0])["error"]
        assert error["code"] == "non_finite" and "input tensor 1" in error["message"]
        assert server.sessions.find("", "t") is None  # refused before the session was opened
    for ids in (torch.tensor([[0, c.vocab_size]]), torch.tensor([[-1, 3]])):
        error = protocol.decode_header(server.handle(_request("Embedding", [ids]))[0])["error"]
        assert error["code"] == "bad_request" and "token ids must lie in" in error["message"]


def test_a_refused_down_scores_runs_no_projection_and_leaves_the_session_as_it_was(tiny_dir):
    """DownScores checks its up, the next layer's blocks, window and residual, and the cache's
    room before its down projection; a refusal creates no session and replaces no cache."""
    from tsqp import protocol
    from tsqp.server.core import GpuServer

    server = GpuServer(tiny_dir, device="cpu")
    c, g, n = server.config, torch.Generator().manual_seed(9), 3
    session = {"session": "d", "layer_idx": 0}
    tables = [torch.randn(n, c.head_dim, generator=g), torch.randn(n, c.head_dim, generator=g)]
    for layer in (0, 1):
        frames = _request("QKVScores", [torch.randn(1, n, c.hidden_size, generator=g), *tables], blocks=[n], start=0,
                          capacity=n, **{**session, "layer_idx": layer})
        assert protocol.decode_header(server.handle(frames)[0])["ok"]
    assert protocol.decode_header(server.handle(_request("Gate", [torch.randn(1, n, c.hidden_size, generator=g)],
                                                         **session))[0])["ok"]
    downs, cache, held = [], server.sessions.find("", "d").tensors["kv"], server.sessions.nbytes
    down_proj = server.fused[0].down_proj

    class Counted:  # the lean calls multiply by the plain weights, not through the module
        def product(self, x: torch.Tensor) -> torch.Tensor:
            downs.append(1)
            return down_proj.product(x)

    server.fused[0] = dataclasses.replace(server.fused[0], down_proj=Counted())
    activated, residual = torch.randn(1, n, c.intermediate_size, generator=g), torch.randn(1, n, c.hidden_size)
    wrong_width = torch.randn(1, n, c.intermediate_size - 1, generator=g)
    for code, tensors, args in (("bad_request", (activated, residual), {"blocks": [n + 1]}),
                                ("bad_request", (activated, residual), {"start": 1}),
                                ("bad_request", (activated, residual[:, :2]), {}),
                                ("bad_request", (wrong_width, residual), {"capacity": n + 4}),  # a new cache's shape
                                ("missing_state", (activated, residual), {"session": "evicted"})):
        frames = _request("DownScores", [*tensors, *tables], **{"blocks": [n], "start": 0, "capacity": n,
                                                                **session, **args})
        assert protocol.decode_header(server.handle(frames)[0])["error"]["code"] == code
    assert downs == [] and server.sessions.find("", "evicted") is None
    assert server.sessions.find("", "d").tensors["kv"] is cache and server.sessions.nbytes == held
    frames = _request("DownScores", [activated, residual, *tables], blocks=[n], start=0, capacity=n, **session)
    assert protocol.decode_header(server.handle(frames)[0])["ok"] and downs == [1]


@pytest.mark.parametrize("variant", ["gqa", "attention-bias"])
def test_fused_projections_are_the_checkpoint_s_weights_held_once(variant, model_dirs):
    """q/k/v and gate/up run as one product each; each module's weight (and bias) is a view of
    its rows in the fused one, so the server holds the model once, and they equal the checkpoint."""
    from safetensors.torch import load_file

    from tsqp.server.core import GpuServer

    server = GpuServer(model_dirs[variant], device="cpu")
    stored = {}
    for path in sorted(model_dirs[variant].glob("*.safetensors")):
        stored.update(load_file(path))
    for i, fused in enumerate(server.fused):
        attn, mlp = server.layers[i].self_attn, server.layers[i].mlp
        for group, modules, names in ((fused.qkv, (attn.q_proj, attn.k_proj, attn.v_proj), ("self_attn.q_proj",
                                       "self_attn.k_proj", "self_attn.v_proj")),
                                      (fused.gate_up, (mlp.gate_proj, mlp.up_proj), ("mlp.gate_proj", "mlp.up_proj"))):
            assert group.widths == tuple(m.out_features for m in modules)
            for m, name in zip(modules, names):
                assert m.weight.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
                assert torch.equal(m.weight, stored[f"model.layers.{i}.{name}.weight"])
                if group.bias is not None:
                    assert m.bias.untyped_storage().data_ptr() == group.bias.untyped_storage().data_ptr()
                    assert torch.equal(m.bias, stored[f"model.layers.{i}.{name}.bias"])
            assert torch.equal(group.weight, torch.cat([stored[f"model.layers.{i}.{n}.weight"] for n in names]))
    assert (server.fused[0].qkv.bias is not None) == (variant == "attention-bias")
