"""Wire format, fused methods and the counters of what crossed the socket."""

from __future__ import annotations

import msgpack
import pytest
import torch
import zmq

from tsqp import api, protocol
from tsqp import ops
from tsqp.errors import ProtocolError, RemoteError
from tsqp.transport import Client


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_tensors_round_trip_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    tensors = [(torch.randn(3, 5, 7, generator=g) * 100).to(dtype), torch.randn(0, 4, generator=g).to(dtype)]
    frames = protocol.encode({"method": "X"}, tensors)
    message = protocol.decode([bytes(f) for f in frames])
    for sent, got in zip(tensors, message.tensors):
        assert got.dtype == sent.dtype and got.shape == sent.shape and torch.equal(got, sent)


@pytest.mark.parametrize("frames, problem", [
    ([], "empty"),
    ([b"\xc1garbage"], "msgpack"),
    ([msgpack.packb([1, 2])], "map"),
    ([msgpack.packb({"tensors": [{"dtype": "float32", "shape": [2]}]})], "payload frames"),
    ([msgpack.packb({"tensors": [{"dtype": "float32", "shape": [3]}]}), b"\0" * 8], "does not match"),
    ([msgpack.packb({"tensors": [{"dtype": "complex64", "shape": [1]}]}), b"\0" * 8], "unsupported dtype"),
    ([msgpack.packb({"tensors": [{"dtype": "float32", "shape": [-1]}]}), b""], "shape"),
])
def test_malformed_messages_are_named(frames, problem):
    with pytest.raises(ProtocolError, match=problem):
        protocol.decode(frames)


def test_bad_requests_get_error_replies_and_the_server_keeps_serving(servers, model_dirs):
    endpoint = servers["gqa"].endpoint
    client = Client(endpoint, timeout_s=10)
    hidden = torch.randn(1, 4, 64)
    bad_calls = [
        ("Teleport", [], {}),
        ("Linear", [hidden], {"layer_idx": 99, "module_name": "q_proj"}),
        ("Linear", [hidden], {"layer_idx": 0, "module_name": "rm_rf"}),
        ("Linear", [torch.randn(1, 4, 63)], {"layer_idx": 0, "module_name": "q_proj"}),
        ("Matmul", [torch.randn(2, 3), torch.randn(4, 5)], {}),
        ("Embedding", [torch.tensor([[1, 10**6]])], {}),
        ("AttnOut", [torch.randn(1, 4, 4, 4)], {"layer_idx": 0, "session": "never-seen"}),
        ("QKVScores", [hidden, torch.randn(4, 16), torch.randn(4, 16)], {"layer_idx": 0}),  # no session
        ("QKVScores", [hidden, torch.randn(5, 16), torch.randn(5, 16)], {"layer_idx": 0, "session": "s"}),
    ]
    for method, tensors, args in bad_calls:
        with pytest.raises(RemoteError) as caught:
            client.call(method, tensors, **args)
        assert caught.value.code in ("bad_request", "unknown_method", "missing_state"), caught.value
    # raw garbage on the socket: an error reply, not a dead server
    raw = zmq.Context.instance().socket(zmq.REQ)
    raw.connect(endpoint)
    raw.send_multipart([b"\x00\xff not msgpack", b"extra"])
    assert raw.poll(5000)
    reply = protocol.decode(raw.recv_multipart())
    assert reply.header["ok"] is False and reply.header["error"]["code"] == "bad_request"
    raw.close(linger=0)
    # and a valid call still works
    out = client.call("Linear", [hidden], layer_idx=1, module_name="q_proj")
    assert out.tensors[0].shape == (1, 4, 64)
    client.close()


def test_round_trips_and_bytes_are_counted_from_the_socket(servers, model_dirs):
    seed = api.connect(servers["gqa"].endpoint, model_dirs["gqa"], protocol="seed")
    lean = api.connect(servers["gqa"].endpoint, model_dirs["gqa"], protocol="lean")
    c = seed.config
    batch, n = 2, 70  # 2 causal blocks
    ids = torch.randint(0, c.vocab_size, (batch, n))
    s, l = seed.prefill(ids), lean.prefill(ids)
    assert s.wire.round_trips == 9 * c.num_layers + 2
    assert l.wire.round_trips == 2 * c.num_layers + 3  # AttnGate, DownScores (DownHead): 2 per layer; Release
    # payload bytes the lean protocol must move, float32 on the wire: no q, k, v or up
    tok, f = batch * n, 4
    h, i = c.hidden_size, c.intermediate_size
    ends = ops.query_blocks(n)
    scores = batch * c.num_heads * sum((b - a) * b for a, b in zip([0, *ends], ends))  # causal blocks only
    rope = 2 * n * c.head_dim  # the cos and sin tables, sent with every QKVScores
    sent = ids.numel() * 8 + c.num_layers * (tok * f * (h + h + i) + scores * f + rope * f) + batch * h * f
    received = tok * h * f + c.num_layers * (tok * f * (h + i + h) + scores * f) + batch * c.vocab_size * f
    rounds = l.wire.round_trips
    assert sent <= l.wire.bytes_sent <= sent + 300 * rounds  # headers are small
    assert received <= l.wire.bytes_received <= received + 300 * rounds
    assert l.wire.bytes_sent + l.wire.bytes_received < s.wire.bytes_sent + s.wire.bytes_received
    assert l.wire.server_s > 0 and l.wire.wait_s >= l.wire.server_s


def test_each_fused_method_equals_its_unfused_computation(servers, model_dirs, references):
    """QKVScores, AttnOut, Gate, GatedDown against the same math on transformers' own modules."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = references["head-dim"]  # heads * head_dim != hidden, 1 kv head: the awkward shapes
    c = model.config
    block = model.model.layers[1]
    client = Client(servers["head-dim"].endpoint, timeout_s=10)
    b, n, h, kv, d = 2, 11, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, n, c.hidden_size, generator=g)
    with torch.inference_mode():
        cos, sin = model.model.rotary_emb(x, torch.arange(n)[None])
        (scores,) = client.call("QKVScores", [x, cos[0], sin[0]], layer_idx=1, session="s1").tensors
        q = block.self_attn.q_proj(x).view(b, n, h, d).transpose(1, 2)
        k = block.self_attn.k_proj(x).view(b, n, kv, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        expected = q @ k.repeat_interleave(h // kv, dim=1).transpose(-1, -2)
        assert torch.allclose(scores, expected, rtol=1e-5, atol=1e-5)
        probs = torch.softmax(torch.randn(b, h, n, n, generator=g), dim=-1)
        (out,) = client.call("AttnOut", [probs], layer_idx=1, session="s1").tensors
        v = block.self_attn.v_proj(x).view(b, n, kv, d).transpose(1, 2).repeat_interleave(h // kv, dim=1)
        expected = block.self_attn.o_proj((probs @ v).transpose(1, 2).reshape(b, n, h * d))
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
        (gate,) = client.call("Gate", [x], layer_idx=1, session="s1").tensors
        assert torch.allclose(gate, block.mlp.gate_proj(x), rtol=1e-5, atol=1e-6)
        activated = torch.randn(b, n, c.intermediate_size, generator=g)  # any SiLU(gate) the TEE sends
        (down,) = client.call("GatedDown", [activated], layer_idx=1, session="s1").tensors
        assert torch.allclose(down, block.mlp.down_proj(activated * block.mlp.up_proj(x)), rtol=1e-5, atol=1e-6)
        (again,) = client.call("GatedDown", [activated], layer_idx=1, session="s1").tensors  # a resend
        assert torch.allclose(again, down, rtol=1e-6, atol=1e-7)
        with pytest.raises(RemoteError, match="SiLU"):  # not the shape Gate made
            client.call("GatedDown", [activated[:, :-1]], layer_idx=1, session="s1")
        client.call("Gate", [x], layer_idx=0, session="s1")  # the next layer's Gate replaces up
        with pytest.raises(RemoteError, match="call Gate first") as caught:
            client.call("GatedDown", [activated], layer_idx=1, session="s1")
        assert caught.value.code == "missing_state"
        sessions = client.ping()["sessions"]
        client.call("LMHead", [torch.randn(1, 1, c.hidden_size)], session="s1")  # a lean prefill's last call
        assert client.ping()["sessions"] == sessions - 1
        (many,) = client.call("Linears", [x], layer_idx=1, modules=["q_proj"]).tensors
        assert torch.allclose(many, block.self_attn.q_proj(x), rtol=1e-5, atol=1e-6)
    client.close()


def test_attn_gate_is_attn_out_then_gate_and_up_of_the_unscaled_norm(servers, references):
    """AttnGate: o_proj(P·V) and gate_proj(w * (h + o)) against transformers' modules, up kept
    for GatedDown; a model with MLP biases refuses it (the bias would not commute with the scale)."""
    model = references["mha"]
    c, block = model.config, model.model.layers[1]
    client = Client(servers["mha"].endpoint, timeout_s=10)
    b, n, heads, d = 2, 6, c.num_attention_heads, c.head_dim
    g = torch.Generator().manual_seed(11)
    x, h = torch.randn(b, n, c.hidden_size, generator=g), torch.randn(b, n, c.hidden_size, generator=g) * 3
    cos, sin = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    client.call("QKVScores", [x, cos, sin], layer_idx=1, session="fused")
    probs = torch.softmax(torch.randn(b, heads, n, n, generator=g), dim=-1)
    o, gate = client.call("AttnGate", [h, probs], layer_idx=1, session="fused").tensors
    again = client.call("AttnGate", [h, probs], layer_idx=1, session="fused").tensors  # a resend
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip((o, gate), again))
    with torch.inference_mode():
        v = block.self_attn.v_proj(x).view(b, n, heads, d).transpose(1, 2)
        expected_o = block.self_attn.o_proj((probs @ v).transpose(1, 2).reshape(b, n, heads * d))
        unscaled = block.post_attention_layernorm.weight * (h + expected_o)
        assert torch.allclose(o, expected_o, rtol=1e-5, atol=1e-6)
        assert torch.allclose(gate, block.mlp.gate_proj(unscaled), rtol=1e-5, atol=1e-5)
        activated = torch.randn(b, n, c.intermediate_size, generator=g)
        (down,) = client.call("GatedDown", [activated], layer_idx=1, session="fused").tensors
        assert torch.allclose(down, block.mlp.down_proj(activated * block.mlp.up_proj(unscaled)), rtol=1e-5,
                              atol=1e-5)
    with pytest.raises(RemoteError, match="residual"):  # the residual of other queries
        client.call("AttnGate", [h[:, :-1], probs], layer_idx=1, session="fused")
    with pytest.raises(RemoteError, match="rank"):  # the residual must come first
        client.call("AttnGate", [probs, h], layer_idx=1, session="fused")
    client.close()
    biased = Client(servers["attention-bias"].endpoint, timeout_s=10)
    biased.call("QKVScores", [x, cos, sin], layer_idx=0, session="biased")
    with pytest.raises(RemoteError, match="biases"):
        biased.call("AttnGate", [h, torch.softmax(torch.randn(b, heads, n, n, generator=g), dim=-1)], layer_idx=0,
                    session="biased")
    biased.close()


def test_down_scores_is_gated_down_then_the_next_layers_scores_before_the_norms_scale(servers, references):
    """DownScores: down_proj(SiLU(gate) * up), then layer i + 1's Q·K^T (RoPE'd, causal blocks)
    of w * (h + d), with K and V kept so: against transformers' modules; refused for the last
    layer and for a model with attention biases."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = references["gqa"]
    c, first, second = model.config, model.model.layers[0], model.model.layers[1]
    client = Client(servers["gqa"].endpoint, timeout_s=10)
    b, n, heads, kv, d = 2, 5, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    g = torch.Generator().manual_seed(12)
    x, h = torch.randn(b, n, c.hidden_size, generator=g), torch.randn(b, n, c.hidden_size, generator=g) * 3
    activated = torch.randn(b, n, c.intermediate_size, generator=g)
    with torch.inference_mode():
        cos, sin = model.model.rotary_emb(x, torch.arange(n)[None])
        client.call("QKVScores", [x, cos[0], sin[0]], layer_idx=0, session="down")
        client.call("Gate", [x], layer_idx=0, session="down")
        down, *blocks = client.call("DownScores", [activated, h, cos[0], sin[0]], layer_idx=0, session="down",
                                    blocks=[2, n]).tensors
        again = client.call("DownScores", [activated, h, cos[0], sin[0]], layer_idx=0, session="down",
                            blocks=[2, n]).tensors  # a resend writes the same keys and values again
        assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip([down, *blocks], again))
        expected_down = first.mlp.down_proj(activated * first.mlp.up_proj(x))
        torch.testing.assert_close(down, expected_down, rtol=1e-5, atol=1e-5)
        unscaled = second.input_layernorm.weight * (h + expected_down)
        q = second.self_attn.q_proj(unscaled).view(b, n, heads, d).transpose(1, 2)
        k = second.self_attn.k_proj(unscaled).view(b, n, kv, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        full = q @ k.repeat_interleave(heads // kv, dim=1).transpose(-1, -2)
        assert [list(t.shape) for t in blocks] == [[b, heads, 2, 2], [b, heads, 3, n]]
        torch.testing.assert_close(blocks[0], full[:, :, :2, :2], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(blocks[1], full[:, :, 2:, :n], rtol=1e-4, atol=1e-4)
        probs = torch.softmax(torch.randn(b, heads, n, n, generator=g), dim=-1)
        (out,) = client.call("AttnOut", [probs], layer_idx=1, session="down").tensors
        v = second.self_attn.v_proj(unscaled).view(b, n, kv, d).transpose(1, 2).repeat_interleave(heads // kv, dim=1)
        expected = second.self_attn.o_proj((probs @ v).transpose(1, 2).reshape(b, n, heads * d))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # V was kept before the scale too
    client.call("Gate", [x], layer_idx=1, session="down")
    with pytest.raises(RemoteError, match="no next layer"):
        client.call("DownScores", [activated, h, cos[0], sin[0]], layer_idx=1, session="down")
    client.close()
    biased = Client(servers["attention-bias"].endpoint, timeout_s=10)
    with pytest.raises(RemoteError, match="biases"):
        biased.call("DownScores", [activated, h, cos[0], sin[0]], layer_idx=0, session="biased")
    biased.close()


def test_down_head_is_the_last_down_then_the_logits_before_the_final_norms_scale(servers, references):
    """DownHead: down_proj(SiLU(gate) * up) and lm_head(norm.weight * (h + d)) at the last
    position or every one, against transformers' modules, the same when resent; refused before
    the last layer."""
    model = references["tied"]
    c, last = model.config, model.model.layers[-1]
    client = Client(servers["tied"].endpoint, timeout_s=10)
    b, n = 2, 4
    g = torch.Generator().manual_seed(13)
    x, h = torch.randn(b, n, c.hidden_size, generator=g), torch.randn(b, n, c.hidden_size, generator=g) * 3
    activated = torch.randn(b, n, c.intermediate_size, generator=g)
    client.call("Gate", [x], layer_idx=c.num_hidden_layers - 1, session="head")
    with torch.inference_mode():
        expected_down = last.mlp.down_proj(activated * last.mlp.up_proj(x))
        expected = model.lm_head(model.model.norm.weight * (h + expected_down))
        d, logits = client.call("DownHead", [activated, h], layer_idx=c.num_hidden_layers - 1, session="head",
                                all_positions=True).tensors
        torch.testing.assert_close(d, expected_down, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        for _ in range(2):  # a resend gets the same answer
            _, last_logits = client.call("DownHead", [activated, h[:, -1:]], layer_idx=c.num_hidden_layers - 1,
                                         session="head").tensors
            torch.testing.assert_close(last_logits, expected[:, -1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(RemoteError, match="last layer"):
        client.call("DownHead", [activated, h], layer_idx=0, session="head")
    with pytest.raises(RemoteError, match="residual"):  # every row's, where only the last gets logits
        client.call("DownHead", [activated, h], layer_idx=c.num_hidden_layers - 1, session="head")
    client.call("Release", session="head")
    client.close()


def test_v_is_kept_per_session(servers):
    """Two runners' V tensors never mix: AttnOut uses the V of its own session."""
    client = Client(servers["gqa"].endpoint, timeout_s=10)
    g = torch.Generator().manual_seed(8)
    x1, x2 = torch.randn(1, 5, 64, generator=g), torch.randn(1, 5, 64, generator=g)
    cos, sin = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    client.call("QKVScores", [x1, cos, sin], layer_idx=0, session="a")
    client.call("QKVScores", [x2, cos, sin], layer_idx=0, session="b")
    probs = torch.softmax(torch.randn(1, 4, 5, 5, generator=g), dim=-1)
    (a,) = client.call("AttnOut", [probs], layer_idx=0, session="a").tensors
    (b,) = client.call("AttnOut", [probs], layer_idx=0, session="b").tensors
    client.call("QKVScores", [x1, cos, sin], layer_idx=0, session="b")
    (b_again,) = client.call("AttnOut", [probs], layer_idx=0, session="b").tensors
    # bit-equality is not promised: BLAS may sum in another order for differently aligned frames
    assert not torch.allclose(a, b, rtol=1e-3) and torch.allclose(a, b_again, rtol=1e-6, atol=1e-7)
    client.close()


def test_scores_and_attn_out_by_causal_blocks(servers, references):
    """Blocks hold exactly the causal part of the full products, and nothing above the diagonal."""
    c = references["gqa"].config
    client = Client(servers["gqa"].endpoint, timeout_s=10)
    b, n, h, d = 1, 10, c.num_attention_heads, c.head_dim
    g = torch.Generator().manual_seed(5)
    x = torch.randn(b, n, c.hidden_size, generator=g)
    cos, sin = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    blocks = client.call("QKVScores", [x, cos, sin], layer_idx=0, session="blocks", blocks=[3, 7, 10]).tensors
    (full,) = client.call("QKVScores", [x, cos, sin], layer_idx=0, session="blocks").tensors
    assert [list(t.shape) for t in blocks] == [[b, h, 3, 3], [b, h, 4, 7], [b, h, 3, 10]]
    for (start, end), block in zip([(0, 3), (3, 7), (7, 10)], blocks):
        assert torch.allclose(block, full[:, :, start:end, :end], rtol=1e-6, atol=1e-6)
    causal = torch.softmax(full.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")), dim=-1)
    (whole,) = client.call("AttnOut", [causal], layer_idx=0, session="blocks").tensors
    parts = [causal[:, :, s:e, :e].contiguous() for s, e in [(0, 3), (3, 7), (7, 10)]]
    (blocked,) = client.call("AttnOut", parts, layer_idx=0, session="blocks").tensors
    assert torch.allclose(blocked, whole, rtol=1e-5, atol=1e-6)
    for bad in ([3, 3, 10], [4, 9], [0, 10], "all"):
        with pytest.raises(RemoteError, match="blocks"):
            client.call("QKVScores", [x, cos, sin], layer_idx=0, session="blocks", blocks=bad)
    with pytest.raises(RemoteError, match="causal blocks"):
        client.call("AttnOut", [parts[0], parts[2]], layer_idx=0, session="blocks")
    client.close()


@pytest.mark.parametrize("method, protection", [("QKVScores", "none"), ("AttnGate", "none"), ("DownScores", "none"),
                                                ("DownHead", "none"),
                                                ("Linears", "private")])
def test_a_reply_of_the_wrong_shape_is_refused(method, protection, servers, model_dirs):
    """The TEE checks what comes back: one column short is an error naming the method, not a crash."""
    from tsqp.tee.guard import IntegrityError

    runner = api.connect(servers["gqa"].endpoint, model_dirs["gqa"], protection=protection)
    original = runner.client.call

    def short_reply(name, tensors=(), **args):
        reply = original(name, tensors, **args)
        if name == method:
            reply.tensors[-1] = reply.tensors[-1][..., :-1]
        return reply

    runner.client.call = short_reply
    ids = torch.randint(0, runner.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(9))
    error = IntegrityError if protection == "private" else ProtocolError
    with pytest.raises(error, match=method if method != "Linears" else "shapes"):
        runner.prefill(ids)
    runner.client.close()
