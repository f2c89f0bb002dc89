"""The forward pass across the trust boundary.

The TEE keeps the control flow and every non-linear step (RMSNorm, mask + softmax, SiLU,
residual adds; in the seed and guarded modes also RoPE and the product with up); a `Steps`
object sends the linear algebra to the GPU server. Two protocols implement `Steps`:

* `SeedSteps`: the seed's RPCs, one projection or product per round trip (9 per layer + 2);
  the TEE rotates q and k (RoPE) and expands K and V for GQA before sending them back;
* `LeanSteps`: fused calls, 4 per layer + 2, and only what a non-linear step needs comes back.
  q/k/v, RoPE and Q·K^T are one call: RoPE is a linear, position-wise rotation, so the server
  applies it with cos/sin tables the TEE computes from its own config, and q, k, v never cross
  the wire. P·V goes with o_proj. Of gate and up only gate comes back, for SiLU: the product
  with up is linear in up, so the server applies it in front of down_proj.
"""

from __future__ import annotations

import secrets
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DirectoryWeights, ModelConfig, NormWeights, ProvidedWeights, load_config
from ..errors import InputError, ProtocolError, RemoteError, TsqpError
from ..protocol import DTYPES, WIRE_DTYPES
from ..transport import Client, WireStats
from .. import ops

PROTOCOLS = ("lean", "seed")
PROTECTIONS = ("none", "private")


class SeedSteps:
    """The seed's protocol: Embedding, Linear (one module), Matmul, LMHead."""

    def __init__(self, client: Client, config: ModelConfig, wire_dtype: torch.dtype):
        self.client, self.config, self.wire = client, config, wire_dtype
        self.wire_name = {v: k for k, v in DTYPES.items()}[wire_dtype]
        # V [b, kv, n, d] between scores and attn_out, up between gate and down (the lean protocol
        # leaves both on the server instead)
        self._values: torch.Tensor | None = None
        self._up: torch.Tensor | None = None

    def _call(self, method: str, *tensors: torch.Tensor, expect: list[tuple[int, ...]],
              exact: tuple[torch.Tensor, ...] = (), **args) -> list[torch.Tensor]:
        """Float tensors travel in the wire dtype, the `exact` ones (small tables) in float32.
        The reply must hold floating-point tensors of the `expect`ed shapes: the server is not
        trusted to get even that right."""
        sent = [t.to(self.wire) if t.is_floating_point() else t for t in tensors]
        reply = self.client.call(method, [*sent, *exact], wire_dtype=self.wire_name, **args)
        shapes = [tuple(t.shape) for t in reply.tensors]
        if shapes != expect or not all(t.is_floating_point() for t in reply.tensors):
            raise ProtocolError(f"the server's {method} reply holds {len(shapes)} tensor(s) of shapes "
                                f"{[list(x) for x in shapes]}, expected float tensors of {[list(x) for x in expect]}")
        return [t.float() for t in reply.tensors]

    def begin(self, batch: int, tokens: int, all_positions: bool) -> float:
        """Per-prefill setup (guarded steps take their one-time material here); seconds spent."""
        return 0.0

    def end(self) -> None:
        """Per-prefill teardown."""
        self._values = self._up = None

    def _rows(self, x: torch.Tensor, width: int) -> list[tuple[int, ...]]:
        """The one expected output: x's leading dims, `width` wide."""
        return [(*x.shape[:-1], width)]

    def _linear(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        expect = self._rows(x, self.config.out_features(module))
        return self._call("Linear", x, expect=expect, layer_idx=layer, module_name=module)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._call("Embedding", input_ids, expect=[(*input_ids.shape, self.config.hidden_size)])[0]

    def scores(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
        """Attention scores Q·K^T (unscaled) as causal query blocks; the seed's: one n x n block."""
        c = self.config
        q, k, v = (self._linear(layer, m, x) for m in ("q_proj", "k_proj", "v_proj"))  # [GPU] Q/K/V projections
        q, k, v = (ops.split_heads(t, c.head_dim) for t in (q, k, v))
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)  # [TEE] RoPE
        self._values = v
        b, h, n, _ = q.shape
        return self._call("Matmul", q, ops.repeat_kv(k, c.kv_groups).transpose(2, 3),  # [TEE] Repeat KV
                          expect=[(b, h, n, n)])  # [GPU] Q·K^T

    def attn_out(self, layer: int, probs: list[torch.Tensor]) -> torch.Tensor:
        """o_proj(P·V) for the probabilities of `scores`' blocks."""
        assert self._values is not None and len(probs) == 1
        v, self._values = ops.repeat_kv(self._values, self.config.kv_groups), None  # [TEE] Repeat KV
        out = self._call("Matmul", probs[0], v, expect=[tuple(v.shape)])[0]  # [GPU] P·V
        return self._linear(layer, "o_proj", ops.merge_heads(out))  # [GPU] o_proj

    def gate(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The gate projection of x; up is made alongside, for `down`."""
        gate = self._linear(layer, "gate_proj", x)  # [GPU] gate projection
        self._up = self._linear(layer, "up_proj", x)  # [GPU] up projection
        return gate

    def down(self, layer: int, activated: torch.Tensor) -> torch.Tensor:
        """down_proj(SiLU(gate) * up) for the TEE's SiLU(gate)."""
        assert self._up is not None
        product, self._up = activated * self._up, None  # [TEE] * up
        return self._linear(layer, "down_proj", product)  # [GPU] down projection

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        return self._call("LMHead", h, expect=self._rows(h, self.config.vocab_size))[0]


class LeanSteps(SeedSteps):
    """Fused calls; only what a TEE op touches comes back (scores, not q, k or v)."""

    def __init__(self, client: Client, config: ModelConfig, wire_dtype: torch.dtype):
        super().__init__(client, config, wire_dtype)
        self.session = secrets.token_hex(16)  # unguessable: on a plaintext socket the id is all that guards it
        self._held = False  # whether the server may hold this session's V and up

    def scores(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
        """One call: projections, RoPE and Q·K^T on the server, V kept there. Only the causal
        blocks come back, toward half the n x n square."""
        b, n, _ = x.shape
        ends = ops.query_blocks(n)
        blocks = [(b, self.config.num_heads, end - start, end) for start, end in zip([0, *ends], ends)]
        self._held = True
        return self._call("QKVScores", x, exact=(cos, sin), expect=blocks, layer_idx=layer, session=self.session,
                          blocks=ends)

    def attn_out(self, layer: int, probs: list[torch.Tensor]) -> torch.Tensor:
        b, _, _, n = probs[-1].shape
        return self._call("AttnOut", *probs, expect=[(b, n, self.config.hidden_size)], layer_idx=layer,
                          session=self.session)[0]

    def gate(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """gate and up on the server; up stays there for GatedDown."""
        return self._call("Gate", x, expect=self._rows(x, self.config.intermediate_size), layer_idx=layer,
                          session=self.session)[0]

    def down(self, layer: int, activated: torch.Tensor) -> torch.Tensor:
        """* up and down_proj on the server."""
        return self._call("GatedDown", activated, expect=self._rows(activated, self.config.hidden_size),
                          layer_idx=layer, session=self.session)[0]

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """The last call: the server frees what this prefill left there."""
        logits = self._call("LMHead", h, expect=self._rows(h, self.config.vocab_size), session=self.session)[0]
        self._held = False
        return logits

    def end(self) -> None:
        """A prefill that stopped before LMHead left V and up on the server: Release frees them
        (best effort: a server that cannot be reached drops them when the session goes idle)."""
        super().end()
        if self._held:
            try:
                self.client.call("Release", session=self.session)
                self._held = False
            except TsqpError:
                pass


@dataclass
class PrefillResult:
    """Logits of one prefill and where its time went."""

    logits: torch.Tensor  # float32 [batch, 1 or seq, vocab]
    seconds: float  # wall time of the whole prefill, as the TEE sees it
    batch: int
    tokens: int
    wire: WireStats = field(default_factory=WireStats)
    offline_s: float = 0.0  # one-time material made on demand for this prefill (guarded modes), not in `seconds`

    @property
    def throughput(self) -> float:
        """Prompt tokens processed per second (all sequences of the batch)."""
        return self.batch * self.tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def breakdown_s(self) -> dict[str, float]:
        """TEE compute / (de)serialization / transport and wait / server compute."""
        return self.wire.breakdown(self.seconds)


class TeeRunner:
    """Runs prefills for one model against one GPU server."""

    def __init__(self, client: Client, model_dir: str | Path | None = None, protocol: str = "lean",
                 wire_dtype: str = "float32", protection: str = "none", verify: bool = False):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol '{protocol}' (choose from: {', '.join(PROTOCOLS)})")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"unsupported wire dtype '{wire_dtype}' (choose from: {', '.join(WIRE_DTYPES)})")
        if protection not in PROTECTIONS:
            raise ValueError(f"unknown protection '{protection}' (choose from: {', '.join(PROTECTIONS)})")
        guarded = protection == "private" or verify
        if guarded and model_dir is None:
            raise InputError("--protection private and --verify need the TEE's own model directory (--model)")
        if guarded and protocol != "lean":
            raise InputError(f"--protocol {protocol} cannot be combined with --protection private or --verify: the "
                             "guarded steps are the lean protocol's, with attention and the embedding in the TEE")
        self.client = client
        if model_dir is not None:
            self.config: ModelConfig = load_config(model_dir)
            self.weights: NormWeights = DirectoryWeights(model_dir)
            self.inv_freq, self.rope_scaling = ops.rope_inv_freq(self.config.rope, self.config.head_dim)
        else:
            self.config, self.weights, self.inv_freq, self.rope_scaling = self._init_from_server()
        if guarded:
            from .guard import GuardedSteps

            assert isinstance(self.weights, DirectoryWeights)
            self.steps = GuardedSteps(client, self.config, self.weights, private=protection == "private",
                                      verify=verify, wire_name=wire_dtype)
        else:
            self.steps = (LeanSteps if protocol == "lean" else SeedSteps)(client, self.config, DTYPES[wire_dtype])
        self.protocol, self.wire_dtype = protocol, self.steps.wire_name
        self.protection, self.verify = protection, verify

    @property
    def guarded(self) -> bool:
        """Private and/or verified: the guarded steps, with their offline phase."""
        return self.protection == "private" or self.verify

    def prepare(self, batch: int, tokens: int, all_positions: bool = False, count: int = 1):
        """The guarded modes' offline phase, ahead of `count` prefills of this shape."""
        if not self.guarded:
            raise InputError("the offline phase exists only with --protection private or --verify")
        return self.steps.prepare(batch, tokens, all_positions, count)

    def _init_from_server(self) -> tuple[ModelConfig, NormWeights, torch.Tensor, float]:
        warnings.warn("no model directory given: trusting the GPU server's Init for config, norm weights and "
                      "rope parameters (give the TEE its own copy with --model / LLAMA_MODEL_PATH)", stacklevel=3)
        reply = self.client.call("Init")
        names = reply.header["weight_names"]
        weights = ProvidedWeights(dict(zip(names, reply.tensors[: len(names)])))
        inv_freq = reply.tensors[len(names)].float()
        return ModelConfig.from_dict(reply.header["config"]), weights, inv_freq, float(reply.header["attention_scaling"])

    def check_input(self, input_ids: torch.Tensor) -> torch.Tensor:
        c = self.config
        if input_ids.dtype != torch.int64 or input_ids.dim() != 2 or input_ids.numel() == 0:
            raise InputError(f"input ids must be a non-empty int64 [batch, seq] tensor, got {input_ids.dtype} "
                             f"{list(input_ids.shape)}")
        if input_ids.shape[1] > c.max_position_embeddings:
            raise InputError(f"{input_ids.shape[1]} tokens exceed the model's max_position_embeddings "
                             f"({c.max_position_embeddings})")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= c.vocab_size:
            raise InputError(f"token ids must lie in [0, {c.vocab_size})")
        return input_ids

    def prefill(self, input_ids: torch.Tensor, all_positions: bool = False) -> PrefillResult:
        """Logits for `input_ids` [batch, seq]: the last position, or every position.

        Either the whole prefill succeeds or it raises: if the server lost the state a lean call
        left there (it restarted), the prefill is run again once from the start."""
        input_ids = self.check_input(input_ids)
        try:
            return self._timed_prefill(input_ids, all_positions)
        except RemoteError as err:
            if err.code != "missing_state":
                raise
        try:
            return self._timed_prefill(input_ids, all_positions)
        except RemoteError as err:
            if err.code == "missing_state":
                raise TsqpError("the GPU server lost this prefill's state twice (restarting?); no logits") from None
            raise

    def _timed_prefill(self, input_ids: torch.Tensor, all_positions: bool) -> PrefillResult:
        batch, tokens = input_ids.shape
        offline_s = self.steps.begin(batch, tokens, all_positions)
        before = self.client.stats.copy()
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                logits = self._forward(input_ids, all_positions)
        finally:
            self.steps.end()
        seconds = time.perf_counter() - start
        wire = self.client.stats.since(before)
        return PrefillResult(logits=logits, seconds=seconds, batch=batch, tokens=tokens, wire=wire,
                             offline_s=offline_s)

    def _forward(self, input_ids: torch.Tensor, all_positions: bool) -> torch.Tensor:
        c, w, steps = self.config, self.weights, self.steps
        batch, n = input_ids.shape
        cos, sin = ops.rope_cos_sin(self.inv_freq, self.rope_scaling, torch.arange(n))
        scaling = c.head_dim ** -0.5

        # RoPE, Q @ K^T, P @ V and * up run where the protocol puts them: all on the GPU (lean); RoPE
        # and * up in the TEE, the products on the GPU (seed); all in the TEE (guarded).
        h = steps.embed(input_ids)  # [GPU] Embedding (in the TEE when guarded)
        for i in range(c.num_layers):
            # Attention
            x = ops.rms_norm(h, w.input_norm(i), c.rms_norm_eps)  # [TEE] RMSNorm
            scores = steps.scores(i, x, cos, sin)  # [GPU] q/k/v projections, then RoPE, Q @ K^T: causal blocks
            probs = [ops.causal_softmax(block, scaling) for block in scores]  # [TEE] mask + softmax
            h = h + steps.attn_out(i, probs)  # P @ V, [GPU] o_proj; [TEE] residual
            # MLP
            x = ops.rms_norm(h, w.post_attention_norm(i), c.rms_norm_eps)  # [TEE] RMSNorm
            gate = steps.gate(i, x)  # [GPU] gate & up projections
            h = h + steps.down(i, ops.silu(gate))  # [TEE] SiLU; * up, [GPU] down; [TEE] residual
        if not all_positions:
            h = h[:, -1:]
        h = ops.rms_norm(h, w.final_norm(), c.rms_norm_eps)  # [TEE] final RMSNorm
        return steps.lm_head(h)  # [GPU] LM head
