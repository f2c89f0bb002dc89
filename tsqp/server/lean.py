"""The session methods: the lean protocol's fused calls, which keep K, V and up here between
calls, and Release, which frees them.

AttnGate, DownScores and DownHead go on to the next RMSNorm's projections in the same call, on
its weight times its input h, before the norm's scale (one number per row, the TEE's: it
commutes with a projection without bias); the TEE applies the scale to what comes back.

A session holds one KV cache for its batch of sequences, allocated for the capacity the client
states when it starts them (QKVScores at position 0) and written at explicit positions, so that
a resent call changes nothing; and the latest layer's up (for the down projection after its
Gate or AttnGate). A decode step writes its keys at the next position: its queries see every key
kept so far. Release (or LMHead with the session) frees it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..config import ModelConfig
from ..kv_cache import KVCache
from ..ops import alone_if, apply_rope, attend, causal_scores, merge_heads  # attention: the TEE's in the other modes
from .errors import BadRequest, MissingState, Unsupported
from .model import check_last_dim, float_inputs, layer_index
from .registry import LAYER, LAYER_ARGS, SESSION, SESSION_ARGS, Result, method
from .sessions import Session, current_owner
from .stateless import rows

if TYPE_CHECKING:
    from .core import GpuServer

LAYER_SESSION = {**LAYER_ARGS, **SESSION_ARGS}


def _kept(server: "GpuServer", args: dict, name: str, layer: int | None, maker: str) -> Any:
    """What an earlier call of this session left (under `name`, or (name, layer)); the same
    answer whether the session is gone, never existed, or belongs to another client."""
    session = server.sessions.find(current_owner(), args["session"])
    key = name if layer is None else (name, layer)
    kept = session.tensors.get(key) if session is not None else None
    if kept is None:
        where = "" if layer is None else f" layer {layer}"
        raise MissingState(f"no {name} for session {args['session']!r}{where}: call {maker} first")
    return kept


def _window(c: ModelConfig, args: dict, n: int) -> tuple[int, int]:
    """The positions a QKVScores writes, [start, start + n), and the cache capacity it needs."""
    start, capacity = args.get("start", 0), args.get("capacity", args.get("start", 0) + n)
    if start < 0 or capacity < start + n or capacity > c.max_position_embeddings:
        raise BadRequest(f"QKVScores at positions [{start}, {start + n}) needs 0 <= start and start + n <= capacity "
                         f"<= max_position_embeddings ({c.max_position_embeddings}); got capacity {capacity}")
    return start, capacity


def _qkv_output(c: ModelConfig, args: dict, shapes: list[list[int]]) -> int:
    b, n, _ = shapes[0]
    start, _ = _window(c, args, n)
    return b * c.num_heads * n * (start + n)  # at most: every new query against every key so far


def _cache(server: "GpuServer", session: Session, b: int, start: int, n: int, capacity: int, layer: int) -> KVCache:
    """The session's KV cache, allocated (after the budget says yes) when a batch of sequences
    starts at position 0 with a shape the session does not hold yet."""
    c, cache = server.config, session.tensors.get("kv")
    if start == 0 and (cache is None or (cache.batch, cache.capacity) != (b, capacity)):
        server.sessions.reserve(session, "kv", KVCache.nbytes_for(c.num_layers, b, c.num_kv_heads, capacity,
                                                                  c.head_dim, server.dtype.itemsize))
        cache = KVCache.allocate(c.num_layers, b, c.num_kv_heads, capacity, c.head_dim, server.dtype, server.device)
        server.sessions.keep(session, "kv", cache)
    if cache is None:
        raise MissingState(f"no KV cache for session {session.id!r}: start its sequences at position 0 first")
    if cache.batch != b:
        raise BadRequest(f"session {session.id!r} holds {cache.batch} sequences, this call sends {b}")
    problem = cache.check_room(layer, start, n)
    if problem is not None:
        raise (MissingState if start > cache.filled[layer] else BadRequest)(f"layer {layer} QKVScores: {problem}")
    return cache


SCORE_ARGS = {**LAYER_SESSION, "blocks": (list,), "start": (int,), "capacity": (int,)}


@method("QKVScores", tensors=3, ranks=(3, 2, 2), args=SCORE_ARGS, required=(LAYER, SESSION), output=_qkv_output)
def qkv_scores(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """q, k, v of the tokens at positions [start, start + n), RoPE with the TEE's cos/sin tables
    for those positions, K and V written into the session's cache there, then Q @ K^T against
    every key so far with K un-expanded (each group of query heads shares its key head), cut
    into causal query blocks: block i holds the new queries [end_(i-1), end_i) against keys
    [0, start + end_i). q and k never cross the wire. x is [b, n, hidden], cos and sin [n, head_dim]."""
    layer = layer_index(server.config, args)
    x, cos, sin = float_inputs(tensors, 3, "hidden_states [b, n, hidden], cos [n, d], sin [n, d]", server.dtype)
    return _scores(server, layer, x, cos, sin, _score_plan(server, args, layer, x, cos, sin, "QKVScores")), {}


def _score_plan(server: "GpuServer", args: dict, layer: int, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, method: str) -> tuple[list[int], int, KVCache]:
    """Every check of a QKVScores before its work, those that touch no state first: the input's
    width, the tables, the causal blocks, the window, then the cache's room (which a batch that
    starts at position 0 allocates); the blocks' ends, the window's start and the cache."""
    c = server.config
    check_last_dim(x, c.hidden_size, f"layer {layer} {method}")
    b, n, _ = x.shape
    if cos.shape != (n, c.head_dim) or sin.shape != (n, c.head_dim):
        raise BadRequest(f"{method} expects cos and sin [{n}, {c.head_dim}] for {n} positions, got "
                         f"{list(cos.shape)} and {list(sin.shape)}")
    ends = _block_ends(args.get("blocks", [n]), n, server.service.limits.max_tensors)
    start, capacity = _window(c, args, n)
    cache = _cache(server, server.sessions.open(current_owner(), args["session"]), b, start, n, capacity, layer)
    return ends, start, cache


def _scores(server: "GpuServer", layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            plan: tuple[list[int], int, KVCache]) -> list[torch.Tensor]:
    (ends, start, cache), c = plan, server.config
    b, n, _ = x.shape
    heads, rotated = c.num_heads, c.num_heads + c.num_kv_heads
    qkv = server.fused[layer].qkv.product(x).view(b, n, -1, c.head_dim)  # [b, n, heads + 2 kv, d]
    qk = apply_rope(qkv[:, :, :rotated], cos[:, None], sin[:, None])  # q's heads and k's in one rotation
    keys, _ = cache.update(layer, start, qk[:, :, heads:].transpose(1, 2), qkv[:, :, rotated:].transpose(1, 2))
    alone = b * n <= server.rows_alone  # as the products, so that the Ping holds (GpuServer.one_core_rows)
    return alone_if(alone, causal_scores, qk[:, :, :heads].transpose(1, 2), keys, ends, start)


def _block_ends(ends: Any, n: int, max_tensors: int) -> list[int]:
    """Causal block ends: increasing, ending at n, no more than AttnGate will take back (with
    the residual)."""
    limit = min(n, max_tensors - 1)
    if not isinstance(ends, list) or not ends or len(ends) > limit or ends[-1] != n \
            or any(type(e) is not int for e in ends) or any(a >= b for a, b in zip([0, *ends], ends)):
        raise BadRequest(f"'blocks' must be at most {limit} increasing block ends ending at {n}, "
                         f"got {str(ends)[:80]}")
    return ends


def _attn_output(c: ModelConfig, args: dict, shapes: list[list[int]]) -> int:
    return shapes[0][0] * sum(s[2] for s in shapes) * max(c.hidden_size, c.num_heads * c.head_dim)


def _attention(server: "GpuServer", args: dict, layer: int, probs: list[torch.Tensor]) -> torch.Tensor:
    """o_proj(P·V) with the V kept in the session's cache, for the causal query blocks that
    QKVScores produced, one tensor each: block i is [b, heads, n_i, start + end_i], end_i the
    running total of the n_i."""
    c, cache = server.config, _kept(server, args, "kv", None, "QKVScores")
    n = sum(p.shape[2] for p in probs)
    start = end = probs[-1].shape[3] - n  # the keys before the first new query
    for p in probs:
        end += p.shape[2]
        if p.shape[0] != cache.batch or p.shape[1] != c.num_heads or p.shape[3] != end or start < 0 \
                or end > cache.filled[layer]:
            raise BadRequest(f"layer {layer} expects causal blocks of probs [{cache.batch}, {c.num_heads}, n_i, "
                             f"start + end_i] over the {cache.filled[layer]} positions it holds; got "
                             f"{[list(t.shape) for t in probs]}")
    alone = cache.batch * n <= server.rows_alone  # as in _scores
    return server.fused[layer].o_proj.product(merge_heads(alone_if(alone, attend, probs, cache.values[layer])))


def _gate_keeping_up(server: "GpuServer", args: dict, layer: int, x: torch.Tensor) -> torch.Tensor:
    """gate_proj(x) for the TEE's SiLU; up_proj(x) stays for GatedDown, since the only op that
    touches it is the element-wise product (linear in it). One layer's up per session."""
    fused = server.fused[layer].gate_up
    session = server.sessions.open(current_owner(), args["session"])
    server.sessions.discard(session, lambda key: key[0] == "up")  # the prefill moved on
    # up is a view of gate and up's one product, which it keeps whole
    server.sessions.reserve(session, ("up", layer), rows([list(x.shape)]) * sum(fused.widths) * x.element_size())
    g, up = fused(x)
    server.sessions.keep(session, ("up", layer), up)
    return g


@method("AttnOut", tensors=1, ranks=(4,), variadic=True, args=LAYER_SESSION, required=(LAYER, SESSION),
        output=_attn_output)
def attn_out(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """P @ V with the V kept in the session's cache, then o_proj: one round trip instead of two."""
    layer = layer_index(server.config, args)
    probs = float_inputs(tensors, len(tensors), "probs [b, heads, n_i, start + end_i] per causal block",
                         server.dtype)
    return [_attention(server, args, layer, probs)], {}


def _attn_gate_output(c: ModelConfig, args: dict, shapes: list[list[int]]) -> int:
    return _attn_output(c, args, shapes[1:]) + rows(shapes) * c.intermediate_size


@method("AttnGate", tensors=2, ranks=(3, 4), variadic=True, args=LAYER_SESSION, required=(LAYER, SESSION),
        output=_attn_gate_output)
def attn_gate(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """AttnOut and Gate in one round trip: o = o_proj(P·V), then gate and up of
    post_attention_layernorm.weight * (h + o), for the residual h the TEE sends. That is the
    RMSNorm without its scale per row, the norm's non-linear part: the TEE computes it from its
    own h + o and applies it to the gate it gets back and to the SiLU(gate) it sends to
    GatedDown, which a projection without bias lets it do. o goes back for the TEE's residual add."""
    c, layer = server.config, layer_index(server.config, args)
    if c.mlp_bias:
        raise Unsupported("AttnGate needs an MLP without biases (they do not commute with RMSNorm's scale); "
                         "this model has them: call AttnOut, then Gate")
    residual, *probs = float_inputs(tensors, len(tensors), "residual [b, n, hidden], then probs per causal block",
                                    server.dtype)
    o = _attention(server, args, layer, probs)
    if residual.shape != o.shape:
        raise BadRequest(f"AttnGate expects the residual [{o.shape[0]}, {o.shape[1]}, {c.hidden_size}] of its "
                         f"{o.shape[1]} queries, got {list(residual.shape)}")
    norm = server.fused[layer].mlp_norm
    return [o, _gate_keeping_up(server, args, layer, norm * (residual + o))], {}


@method("Gate", tensors=1, args=LAYER_SESSION, required=(LAYER, SESSION),
        output=lambda c, args, shapes: rows(shapes) * c.intermediate_size)
def gate(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """gate and up projections of one input: gate goes back for the TEE's SiLU; up stays."""
    layer = layer_index(server.config, args)
    (x,) = float_inputs(tensors, 1, "hidden_states", server.dtype)
    check_last_dim(x, server.config.hidden_size, f"layer {layer} Gate")
    return [_gate_keeping_up(server, args, layer, x)], {}


@method("GatedDown", tensors=1, args=LAYER_SESSION, required=(LAYER, SESSION),
        output=lambda c, args, shapes: rows(shapes) * c.hidden_size)
def gated_down(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """down_proj(SiLU(gate) * up), with SiLU(gate) from the TEE and the up kept from Gate.
    up stays until the session's next Gate, so a resent call gets the same answer."""
    layer = layer_index(server.config, args)
    (activated,) = float_inputs(tensors, 1, "SiLU(gate)", server.dtype)
    return [_down(server, args, layer, activated)], {}


def _up(server: "GpuServer", args: dict, layer: int, activated: torch.Tensor) -> torch.Tensor:
    """The up this layer's Gate or AttnGate kept, if SiLU(gate) matches it."""
    up = _kept(server, args, "up", layer, "Gate")
    if activated.shape != up.shape:
        raise BadRequest(f"layer {layer}'s down projection expects SiLU(gate) of shape {list(up.shape)} (as its Gate "
                         f"or AttnGate made it), got {list(activated.shape)}")
    return up


def _down(server: "GpuServer", args: dict, layer: int, activated: torch.Tensor) -> torch.Tensor:
    return server.fused[layer].down_proj.product(activated * _up(server, args, layer, activated))


def _down_scores_output(c: ModelConfig, args: dict, shapes: list[list[int]]) -> int:
    return rows(shapes) * c.hidden_size + _qkv_output(c, args, shapes[1:])


@method("DownScores", tensors=4, ranks=(3, 3, 2, 2), args=SCORE_ARGS, required=(LAYER, SESSION),
        output=_down_scores_output)
def down_scores(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """GatedDown of layer i and QKVScores of layer i + 1 in one round trip. d = down_proj(SiLU(gate)
    * up) goes back for the TEE's residual add, and layer i + 1's q, k, v are projected from
    input_layernorm.weight * (h + d), for the residual h the TEE sends: RMSNorm without its scale
    per row, the TEE's. K and V are kept so, and the TEE applies the scale of each query and key
    to the scores and of each key to the probabilities (Q·K^T and P·V are linear in each row).
    Tensors: SiLU(gate) [b, n, intermediate], h [b, n, hidden], cos and sin [n, head_dim]."""
    c, layer = server.config, layer_index(server.config, args)
    if c.attention_bias or server.dtype == torch.float16:
        raise Unsupported("DownScores needs attention projections without biases (they do not commute with "
                          "RMSNorm's scale) and a server dtype with float32's range (unscaled scores are larger "
                          "by both rows' RMS): call GatedDown, then QKVScores")
    if layer + 1 >= c.num_layers:
        raise BadRequest(f"DownScores of layer {layer} has no next layer (the model has {c.num_layers}): "
                         "call GatedDown")
    activated, residual, cos, sin = float_inputs(tensors, 4, "SiLU(gate), residual, cos, sin", server.dtype)
    rows_of_d = [*activated.shape[:-1], c.hidden_size]
    if list(residual.shape) != rows_of_d:
        raise BadRequest(f"DownScores expects the residual {rows_of_d} of its rows, got {list(residual.shape)}")
    up = _up(server, args, layer, activated)
    plan = _score_plan(server, args, layer + 1, residual, cos, sin, "DownScores")  # before any work
    d = server.fused[layer].down_proj.product(activated * up)
    norm = server.fused[layer + 1].attn_norm
    return [d, *_scores(server, layer + 1, norm * (residual + d), cos, sin, plan)], {}


def _down_head_output(c: ModelConfig, args: dict, shapes: list[list[int]]) -> int:
    b, n, _ = shapes[0]
    return rows(shapes) * c.hidden_size + b * (n if args.get("all_positions") else 1) * c.vocab_size


@method("DownHead", tensors=2, ranks=(3, 3), args={**LAYER_SESSION, "all_positions": (bool,)},
        required=(LAYER, SESSION), output=_down_head_output)
def down_head(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """The last layer's GatedDown and the LM head in one round trip: d = down_proj(SiLU(gate) * up)
    goes back for the TEE's residual add, and the logits of model.norm.weight * (h + d) at the
    last position (every position with `all_positions`), for the residual h the TEE sends there:
    the final RMSNorm without its scale, which the TEE applies to the logits (the LM head has no
    bias). The session keeps what it holds, so that a resent DownHead gets the same answer."""
    c, layer = server.config, layer_index(server.config, args)
    if layer != c.num_layers - 1:
        raise BadRequest(f"DownHead follows the last layer ({c.num_layers - 1}), not layer {layer}: call DownScores")
    activated, residual = float_inputs(tensors, 2, "SiLU(gate), residual", server.dtype)
    d = _down(server, args, layer, activated)
    last = d if args.get("all_positions") else d[:, -1:]
    if residual.shape != last.shape:
        raise BadRequest(f"DownHead expects the residual {list(last.shape)} of the rows it makes logits for, got "
                         f"{list(residual.shape)}")
    return [d, server.head.lm_head.product(server.head.norm * (residual + last))], {}


@method("Release", args=SESSION_ARGS, required=(SESSION,))
def release(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """Free everything a session keeps. Idempotent: an unknown session (released, expired,
    another client's) is fine."""
    server.sessions.release(current_owner(), args["session"])
    return [], {}
