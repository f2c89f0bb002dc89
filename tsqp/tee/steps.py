"""How a forward pass sends its linear algebra to the server: the `Steps` protocol and its
unguarded implementations.

* `SeedSteps`: the seed's RPCs, one projection or product per round trip (9 per layer + 2);
  the TEE rotates q and k (RoPE), keeps K and V, and expands them for GQA before sending them
  to `Matmul` with each step, as the seed does;
* `LeanSteps`: fused calls, 2 per layer + 1 for a decode step (a prefill adds its Embedding and
  a Release). q/k/v, RoPE and Q·K^T are one call: RoPE is a linear, position-wise rotation, so
  the server applies it with cos/sin tables the TEE computes from its own config, and keeps K
  and V by position for its session; q, k, v never cross the wire. Of gate and up only gate
  comes back, for SiLU: the product with up is linear in up, so the server applies it in front
  of down_proj. And each call goes on to the next projections:
  RMSNorm's one non-linear part is a scale per row, which commutes with a projection without
  bias, so the server projects weight * h before the scale and the TEE applies it to what comes
  back. P·V and o_proj go with the gate and up of the next RMSNorm (AttnGate), down_proj with the
  next layer's q/k/v and Q·K^T (DownScores; K and V stay unscaled on the server, and the TEE
  scales the scores by each query's and key's scale and the probabilities by each key's), the
  last layer's down_proj with the LM head of the final norm (DownHead).
  Biases in the MLP or the attention, or a float16 wire or server, keep their calls apart (up
  to 4 per layer). The sequences' state on the server goes with a Release when they end.

The guarded steps (private, verify) are in guard.py.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Protocol

import torch

from .. import ops
from ..config import DirectoryWeights, ModelConfig
from ..errors import RemoteError, ServerUnreachable, TsqpError
from ..kv_cache import KVCache
from ..protocol import DTYPE_NAMES
from ..transport import Client
from .rehearsal import Rehearsal
from .replies import checked_reply


@dataclass(frozen=True)
class Window:
    """The positions one forward pass computes: tokens [start, start + tokens) of every sequence."""

    start: int
    tokens: int
    all_positions: bool = False  # logits for every new position, not only the last

    @property
    def end(self) -> int:
        return self.start + self.tokens


class Steps(Protocol):
    """What the runner's forward pass calls; each implementation owns the state it keeps."""

    wire_name: str

    def open(self, batch: int, capacity: int) -> None:
        """A new batch of sequences of at most `capacity` positions."""

    def begin(self, window: Window) -> float:
        """Set up one forward pass; seconds spent making one-time material for it, if any."""

    def end(self) -> None:
        """After one forward pass, successful or not."""

    def close(self) -> None:
        """The sequences are done: free what they kept, here and on the server."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def scores(self, layer: int, x: ops.Normalized, cos: torch.Tensor, sin: torch.Tensor) -> list[ops.ScoreBlock]:
        """Q·K^T of the window's queries (of RMSNorm(h)) against every key so far, as causal
        query blocks, before 1/sqrt(d)."""

    def attn_out(self, layer: int, probs: list[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        """o_proj(P·V) for the probabilities of `scores`' blocks (which it may overwrite); `residual`
        is the h it is added to, for a protocol that starts the MLP's projections in the same call."""

    def gate(self, layer: int, x: ops.Normalized) -> torch.Tensor:
        """The gate projection of RMSNorm(h) (up is made alongside, for `down`)."""

    def down(self, layer: int, activated: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """down_proj(SiLU(gate) * up) for the TEE's SiLU(gate) (which it may overwrite); `residual`
        is the h it is added to, for a protocol that starts the next layer's projections in the same call."""

    def lm_head(self, x: ops.Normalized) -> torch.Tensor:
        """Logits of the final RMSNorm's output."""


class Caller:
    """One checked call: float tensors in the wire dtype, the `exact` ones (small tables) in
    float32, and a reply that must hold finite float tensors of the expected shapes."""

    def __init__(self, client: Client, wire_dtype: torch.dtype):
        self.client, self.wire, self.wire_name = client, wire_dtype, DTYPE_NAMES[wire_dtype]
        self.reachable = True  # False after a call found no server: nothing more is worth sending

    def __call__(self, method: str, *tensors: torch.Tensor, expect: list[tuple[int, ...]],
                 exact: tuple[torch.Tensor, ...] = (), **args) -> list[torch.Tensor]:
        sent = [t.to(self.wire) if t.is_floating_point() and t.dtype != self.wire else t for t in tensors]
        reply_bytes = sum(math.prod(shape) for shape in expect) * self.wire.itemsize
        try:
            reply = self.client.call(method, [*sent, *exact], wire_dtype=self.wire_name, reply_bytes=reply_bytes,
                                     **args)
        except ServerUnreachable:
            self.reachable = False
            raise
        self.reachable = True
        where = f" (layer {args['layer_idx']})" if "layer_idx" in args else ""
        return checked_reply(reply.tensors, expect, method + where)


def rows(x: torch.Tensor, width: int) -> list[tuple[int, ...]]:
    """The one expected output of a projection of x: x's leading dims, `width` wide."""
    return [(*x.shape[:-1], width)]


def causal_blocks(window: Window, x: torch.Tensor, heads: int) -> tuple[list[int], list[tuple[int, ...]]]:
    """Ends of the window's query blocks (relative to the window) and the score shapes they give:
    block i holds its queries against keys [0, start + end_i)."""
    ends = ops.query_blocks(window.tokens)
    shapes = [(x.shape[0], heads, end - begin, window.start + end) for begin, end in zip([0, *ends], ends)]
    return ends, shapes


def one_core_rows(ping: dict) -> int:
    """The most rows a call may have and keep the server to one core of the host, by its Ping
    (`one_core_rows`: its products and attention run alone, or on a GPU); 0 from a server that
    does not say, or says what cannot be (it is not trusted; a wrong answer costs only spinning)."""
    rows = ping.get("one_core_rows", 0)
    return rows if type(rows) is int and 0 <= rows <= ops.DECODE_ROWS else 0


class SeedSteps:
    """The seed's protocol: Embedding, Linear (one module), Matmul, LMHead; K and V in the TEE."""

    def __init__(self, client: Client, config: ModelConfig, wire_dtype: torch.dtype):
        self.config, self.call = config, Caller(client, wire_dtype)
        self.wire_name = self.call.wire_name
        self.cache: KVCache | None = None
        self.window = Window(0, 0)
        self._up: torch.Tensor | None = None  # between gate and down

    def open(self, batch: int, capacity: int) -> None:
        c = self.config
        self.cache = KVCache.allocate(c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim)

    def begin(self, window: Window) -> float:
        self.window = window
        return 0.0

    def end(self) -> None:
        self._up = None

    def close(self) -> None:
        self.cache = None

    def _linear(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        expect = rows(x, self.config.out_features(module))
        return self.call("Linear", x, expect=expect, layer_idx=layer, module_name=module)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.call("Embedding", input_ids, expect=[(*input_ids.shape, self.config.hidden_size)])[0]

    def scores(self, layer: int, x: ops.Normalized, cos: torch.Tensor, sin: torch.Tensor) -> list[ops.ScoreBlock]:
        """The seed's one block: every new query against every key so far."""
        c, cache, normed = self.config, self.cache, x.value
        assert cache is not None
        q, k, v = (self._linear(layer, m, normed) for m in ("q_proj", "k_proj", "v_proj"))  # [GPU] Q/K/V projections
        q, k, v = (ops.split_heads(t, c.head_dim) for t in (q, k, v))
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)  # [TEE] RoPE
        keys, _ = cache.update(layer, self.window.start, k, v)
        b, h, n, _ = q.shape
        keys_t = ops.repeat_kv(keys, c.kv_groups).transpose(2, 3)  # [TEE] Repeat KV
        return ops.score_blocks(self.call("Matmul", q, keys_t, expect=[(b, h, n, self.window.end)]))  # [GPU] Q·K^T

    def attn_out(self, layer: int, probs: list[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        assert self.cache is not None and len(probs) == 1
        values = ops.repeat_kv(self.cache.values[layer][:, :, : self.window.end], self.config.kv_groups)
        b, h, n, _ = probs[0].shape
        out = self.call("Matmul", probs[0], values, expect=[(b, h, n, self.config.head_dim)])[0]  # [GPU] P·V
        return self._linear(layer, "o_proj", ops.merge_heads(out))  # [GPU] o_proj

    def gate(self, layer: int, x: ops.Normalized) -> torch.Tensor:
        normed = x.value
        gate = self._linear(layer, "gate_proj", normed)  # [GPU] gate projection
        self._up = self._linear(layer, "up_proj", normed)  # [GPU] up projection
        return gate

    def down(self, layer: int, activated: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        assert self._up is not None
        product, self._up = activated * self._up, None  # [TEE] * up
        return self._linear(layer, "down_proj", product)  # [GPU] down projection

    def lm_head(self, x: ops.Normalized) -> torch.Tensor:
        return self.call("LMHead", x.value, expect=rows(x.h, self.config.vocab_size))[0]


class LeanSteps:
    """Fused calls; K, V and up stay on the server, in this runner's session there."""

    def __init__(self, client: Client, config: ModelConfig, wire_dtype: torch.dtype,
                 weights: DirectoryWeights | None = None):
        self.config, self.client, self.call = config, client, Caller(client, wire_dtype)
        self.weights = weights  # the TEE's own copy: decode steps look their token up here
        self.wire_name = self.call.wire_name
        self.session: str | None = None
        self.capacity = self.batch = 0
        self.spin_rows = 0  # rows per pass worth spinning through: set by Generation from the server's Ping; 0 = never
        self._rehearsal: Rehearsal | None = None  # what the client runs while it spins through (made at the first)
        self.window = Window(0, 0)
        # A bias does not commute with RMSNorm's scale; nor may unscaled scores meet float16's range.
        self.fused_mlp = not config.mlp_bias  # AttnGate
        self.fused_attn = not config.attention_bias and wire_dtype != torch.float16  # DownScores
        self.fused_head = True  # DownHead
        self._answered: set[str] = set()  # the fused methods this server has run: their errors are errors
        self.key_scales = torch.ones(0)  # [layers, b, capacity]: each key's scale, where the server keeps it unscaled
        self._tables: tuple[torch.Tensor, torch.Tensor] = (torch.ones(0), torch.ones(0))  # this pass's cos, sin
        self._gate: torch.Tensor | None = None  # AttnGate's gate of weight * h, before the scale
        self._scale: torch.Tensor | None = None  # that scale, for the SiLU(gate) that down sends
        self._scores: list[torch.Tensor] | None = None  # DownScores' blocks of the next layer, before the scales
        self._logits: torch.Tensor | None = None  # DownHead's, before the final norm's scale

    def open(self, batch: int, capacity: int) -> None:
        self.session, self.capacity, self.batch = secrets.token_hex(16), capacity, batch
        self.key_scales = torch.ones(self.config.num_layers, batch, capacity)

    def begin(self, window: Window) -> float:
        """A pass of at most `spin_rows` rows (a decode step's, or a prefill as short) keeps the
        server to one core of the host, so its calls are worth spinning for on another,
        rehearsing this side's own per-call code meanwhile (tsqp.spinning, tsqp.tee.rehearsal)."""
        self.window = window
        through = self.batch * window.tokens <= self.spin_rows
        if through and self._rehearsal is None:  # made once; unused where the link never spins
            self._rehearsal = Rehearsal(self.config, self.call.wire)
        self.client.spin_through, self.client.rehearse = through, self._rehearsal if through else None
        return 0.0

    def end(self) -> None:
        self._gate = self._scale = self._scores = self._logits = None
        self.client.spin_through, self.client.rehearse = False, None

    def close(self) -> None:
        """Free the session's state on the server (a Release, not a flag on the last call, so that
        every call before it can be resent harmlessly; a run that cannot reach the server leaves
        it there until it is evicted)."""
        session, self.session = self.session, None
        if session is not None and self.call.reachable:
            try:
                self.client.call("Release", session=session)
            except TsqpError:  # best effort: the server drops idle sessions anyway
                pass

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A decode step reads its token's row from the TEE's copy, saving a round trip (the
        server learns the token from the logits anyway); a prefill asks the server, as the seed."""
        if self.window.start > 0 and self.weights is not None:
            return self.weights.read_rows("model.embed_tokens.weight", input_ids)
        return self.call("Embedding", input_ids, expect=[(*input_ids.shape, self.config.hidden_size)])[0]

    def scores(self, layer: int, x: ops.Normalized, cos: torch.Tensor, sin: torch.Tensor) -> list[ops.ScoreBlock]:
        """One call: projections, RoPE and Q·K^T on the server, K and V kept there by position.
        Only the causal blocks come back, toward half the square. After the first layer they
        came with the last call (DownScores), with the scales the softmax applies."""
        self._tables = (cos, sin)
        if self._keys_unscaled(layer) != (self._scores is not None):
            raise TsqpError(f"layer {layer}: its scores must come from DownScores exactly when its keys are kept "
                            "before the scale")
        if self._scores is None:
            ends, shapes = causal_blocks(self.window, x.h, self.config.num_heads)
            return ops.score_blocks(self.call("QKVScores", x.value, exact=(cos, sin), expect=shapes, layer_idx=layer,
                                              session=self.session, blocks=ends, start=self.window.start,
                                              capacity=self.capacity))
        blocks, self._scores = self._scores, None
        self.key_scales[layer, :, self.window.start: self.window.end] = x.scale[..., 0]
        return ops.score_blocks(blocks, x.scale, self.key_scales[layer])

    def attn_out(self, layer: int, probs: list[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        """o_proj(P·V); with it (AttnGate) the gate of post_attention_layernorm.weight * (h + o),
        which `gate` scales."""
        c, out = self.config, rows(residual, self.config.hidden_size)
        if self._keys_unscaled(layer):  # this layer's V too
            probs = [p.mul_(self.key_scales[layer, :, None, None, : p.shape[3]]) for p in probs]
        if self.fused_mlp:
            fused = self._fused("AttnGate", residual, *probs, expect=[*out, *rows(residual, c.intermediate_size)],
                                layer_idx=layer, session=self.session)
            if fused is not None:
                o, self._gate = fused
                return o
            self.fused_mlp = False
        return self.call("AttnOut", *probs, expect=out, layer_idx=layer, session=self.session)[0]

    def gate(self, layer: int, x: ops.Normalized) -> torch.Tensor:
        if self._gate is None:
            return self.call("Gate", x.value, expect=rows(x.h, self.config.intermediate_size), layer_idx=layer,
                             session=self.session)[0]
        gate, self._gate, self._scale = self._gate * x.scale, None, x.scale
        return gate

    def down(self, layer: int, activated: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """down_proj(SiLU(gate) * up); after AttnGate the server keeps up before the scale, so
        SiLU(gate) goes with it. With it (DownScores) the next layer's scores, which `scores` scales."""
        if self._scale is not None:
            activated, self._scale = activated.mul_(self._scale), None
        c, w, out = self.config, self.window, rows(activated, self.config.hidden_size)
        if layer + 1 == c.num_layers and self.fused_head:  # the LM head has no bias: it commutes with the scale
            head = (activated.shape[0], w.tokens if w.all_positions else 1, c.vocab_size)
            last = residual if w.all_positions else residual[:, -1:]  # the rows that get logits
            fused = self._fused("DownHead", activated, last, expect=[*out, head], layer_idx=layer,
                                session=self.session, all_positions=w.all_positions)
            if fused is not None:
                d, self._logits = fused
                return d
            self.fused_head = False
        elif layer + 1 < c.num_layers and self.fused_attn:
            ends, shapes = causal_blocks(self.window, residual, self.config.num_heads)
            fused = self._fused("DownScores", activated, residual, exact=self._tables, expect=[*out, *shapes],
                                layer_idx=layer, session=self.session, blocks=ends, start=self.window.start,
                                capacity=self.capacity)
            if fused is not None:
                d, *self._scores = fused
                return d
            self.fused_attn = False
        return self.call("GatedDown", activated, expect=out, layer_idx=layer, session=self.session)[0]

    def _fused(self, method: str, *tensors: torch.Tensor, **args) -> list[torch.Tensor] | None:
        """A fused call's reply, or None where this server cannot run the method at all (a float16
        server's `unsupported` DownScores, an older server's `unknown_method`): the caller then takes
        the unfused calls from here on. Only until the method has answered once: then its errors are errors."""
        try:
            reply = self.call(method, *tensors, **args)
        except RemoteError as err:
            if err.code not in ("unsupported", "unknown_method") or method in self._answered:
                raise
            return None
        self._answered.add(method)
        return reply

    def _keys_unscaled(self, layer: int) -> bool:
        """Whether the server keeps this layer's K and V before RMSNorm's scale (DownScores)."""
        return self.fused_attn and layer > 0

    def lm_head(self, x: ops.Normalized) -> torch.Tensor:
        """The logits DownHead made before the final norm's scale, scaled; LMHead's, from a server without DownHead."""
        if not self.fused_head:
            return self.call("LMHead", x.value, expect=rows(x.h, self.config.vocab_size))[0]
        if self._logits is None:
            raise TsqpError("lm_head before DownHead: the last layer's down makes the logits")
        logits, self._logits = self._logits * x.scale, None
        return logits
