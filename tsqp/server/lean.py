"""The session methods: the lean protocol's fused calls, which keep V and up here between calls,
and Release, which frees them.

A lean prefill's session keeps V for every layer (each layer's AttnOut needs its own) and the
latest layer's up (GatedDown follows its Gate); LMHead or Release frees them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..config import ModelConfig
from ..ops import apply_rope  # the same rotation the TEE applies in the seed protocol
from .errors import BadRequest, MissingState
from .model import check_last_dim, float_inputs, layer_index
from .registry import LAYER, LAYER_ARGS, SESSION, SESSION_ARGS, Result, method
from .sessions import current_owner
from .stateless import rows

if TYPE_CHECKING:
    from .core import GpuServer

LAYER_SESSION = {**LAYER_ARGS, **SESSION_ARGS}


def _kept(server: "GpuServer", args: dict, name: str, layer: int, maker: str) -> torch.Tensor:
    """A tensor an earlier call of this session left; the same answer whether the session is
    gone, never existed, or belongs to another client."""
    session = server.sessions.find(current_owner(), args["session"])
    t = session.tensors.get((name, layer)) if session is not None else None
    if t is None:
        raise MissingState(f"no {name} for session {args['session']!r} layer {layer}: call {maker} first")
    return t


def _qkv_output(c: ModelConfig, args: dict, shapes: list[list[int]]) -> int:
    b, n, _ = shapes[0]
    return b * c.num_heads * n * n  # at most: the whole n x n square


@method("QKVScores", tensors=3, ranks=(3, 2, 2), args={**LAYER_SESSION, "blocks": (list,)},
        required=(LAYER, SESSION), output=_qkv_output)
def qkv_scores(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """q, k, v from one input, RoPE with the TEE's cos/sin tables, then Q @ K^T with K
    un-expanded (each group of query heads shares its key head), cut into causal query blocks:
    block i holds queries [end_(i-1), end_i) against keys [0, end_i). q and k never cross the
    wire; V is kept for AttnOut. x is [b, n, hidden], cos and sin [n, head_dim]."""
    c, layer = server.config, layer_index(server.config, args)
    x, cos, sin = float_inputs(tensors, 3, "hidden_states [b, n, hidden], cos [n, d], sin [n, d]", server.dtype)
    check_last_dim(x, c.hidden_size, f"layer {layer} QKVScores")
    b, n, _ = x.shape
    if cos.shape != (n, c.head_dim) or sin.shape != (n, c.head_dim):
        raise BadRequest(f"QKVScores expects cos and sin [{n}, {c.head_dim}] for {n} positions, got "
                         f"{list(cos.shape)} and {list(sin.shape)}")
    ends = _block_ends(args.get("blocks", [n]), n, server.service.limits.max_tensors)
    session = server.sessions.open(current_owner(), args["session"])
    server.sessions.reserve(session, ("v", layer), b * n * c.num_kv_heads * c.head_dim * x.element_size())
    attn = server.layers[layer].self_attn
    q = attn.q_proj(x).view(b, n, c.num_heads, c.head_dim).transpose(1, 2)  # [b, heads, n, d]
    k = attn.k_proj(x).view(b, n, c.num_kv_heads, c.head_dim).transpose(1, 2)  # [b, kv, n, d]
    v = attn.v_proj(x).view(b, n, c.num_kv_heads, c.head_dim).transpose(1, 2)
    server.sessions.keep(session, ("v", layer), v)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    grouped = q.view(b, c.num_kv_heads, c.kv_groups, n, c.head_dim)
    keys = k.unsqueeze(2).transpose(-1, -2)  # [b, kv, 1, d, n]
    return [(grouped[..., start:end, :] @ keys[..., :end]).reshape(b, c.num_heads, end - start, end)
            for start, end in zip([0, *ends], ends)], {}


def _block_ends(ends: Any, n: int, max_tensors: int) -> list[int]:
    """Causal block ends: increasing, ending at n, no more than AttnOut will take back."""
    limit = min(n, max_tensors)
    if not isinstance(ends, list) or not ends or len(ends) > limit or ends[-1] != n \
            or any(type(e) is not int for e in ends) or any(a >= b for a, b in zip([0, *ends], ends)):
        raise BadRequest(f"'blocks' must be at most {limit} increasing block ends ending at {n}, "
                         f"got {str(ends)[:80]}")
    return ends


def _attn_output(c: ModelConfig, args: dict, shapes: list[list[int]]) -> int:
    return shapes[0][0] * sum(s[2] for s in shapes) * max(c.hidden_size, c.num_heads * c.head_dim)


@method("AttnOut", tensors=1, ranks=(4,), variadic=True, args=LAYER_SESSION, required=(LAYER, SESSION),
        output=_attn_output)
def attn_out(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """P @ V with the V kept from QKVScores, then o_proj: one round trip instead of two. The
    probabilities come as the causal query blocks that QKVScores produced, one tensor each."""
    c, layer = server.config, layer_index(server.config, args)
    probs = float_inputs(tensors, len(tensors), "probs [b, heads, n_i, end_i] per causal block",
                         server.dtype)
    v = _kept(server, args, "v", layer, "QKVScores")
    b, kv, m, d = v.shape
    start, outs = 0, []
    for p in probs:
        end = start + (p.shape[2] if p.dim() == 4 else 0)
        if p.dim() != 4 or p.shape[0] != b or p.shape[1] != c.num_heads or p.shape[3] != end or end > m:
            raise BadRequest(f"AttnOut expects causal blocks of probs [{b}, {c.num_heads}, n_i, end_i] with "
                             f"end_i the running total of n_i, up to {m}; got {[list(t.shape) for t in probs]}")
        n_i = end - start
        outs.append(p.view(b, kv, c.kv_groups, n_i, end) @ v[:, :, None, :end])  # [b, kv, g, n_i, d]
        start = end
    if start != m:
        raise BadRequest(f"AttnOut blocks cover {start} queries, V has {m} positions")
    out = torch.cat(outs, dim=3).view(b, c.num_heads, m, d).transpose(1, 2).reshape(b, m, c.num_heads * d)
    return [server.layers[layer].self_attn.o_proj(out)], {}


@method("Gate", tensors=1, args=LAYER_SESSION, required=(LAYER, SESSION),
        output=lambda c, args, shapes: rows(shapes) * c.intermediate_size)
def gate(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """gate and up projections of one input: gate goes back for the TEE's SiLU; up stays for
    GatedDown, since the only op that touches it is the element-wise product (linear in it)."""
    layer = layer_index(server.config, args)
    (x,) = float_inputs(tensors, 1, "hidden_states", server.dtype)
    mlp = server.layers[layer].mlp
    check_last_dim(x, server.config.hidden_size, f"layer {layer} Gate")
    session = server.sessions.open(current_owner(), args["session"])
    server.sessions.discard(session, lambda key: key[0] == "up")  # one layer's up per session: the prefill moved on
    server.sessions.reserve(session, ("up", layer), rows([list(x.shape)]) * mlp.up_proj.out_features * x.element_size())
    g = mlp.gate_proj(x)
    server.sessions.keep(session, ("up", layer), mlp.up_proj(x))
    return [g], {}


@method("GatedDown", tensors=1, args=LAYER_SESSION, required=(LAYER, SESSION),
        output=lambda c, args, shapes: rows(shapes) * c.hidden_size)
def gated_down(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """down_proj(SiLU(gate) * up), with SiLU(gate) from the TEE and the up kept from Gate.
    up stays until the session's next Gate, so a resent call gets the same answer."""
    layer = layer_index(server.config, args)
    (activated,) = float_inputs(tensors, 1, "SiLU(gate)", server.dtype)
    up = _kept(server, args, "up", layer, "Gate")
    if activated.shape != up.shape:
        raise BadRequest(f"GatedDown expects SiLU(gate) of shape {list(up.shape)} (as Gate made it), "
                         f"got {list(activated.shape)}")
    return [server.layers[layer].mlp.down_proj(activated * up)], {}


@method("Release", args=SESSION_ARGS, required=(SESSION,))
def release(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """Free everything a session keeps. Idempotent: an unknown session (released, expired,
    another client's) is fine."""
    server.sessions.release(current_owner(), args["session"])
    return [], {}
