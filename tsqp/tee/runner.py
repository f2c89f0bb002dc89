"""The forward pass across the trust boundary, for prefill and decode alike.

The TEE keeps the control flow and every non-linear step (RMSNorm, mask + softmax, SiLU,
residual adds; in the seed and guarded modes also RoPE and the product with up); a `Steps`
object (steps.py, guard.py) sends the linear algebra to the GPU server and keeps K and V where
the protocol puts them. `forward(input_ids, input_pos)` computes the tokens at positions
[input_pos, input_pos + n) of every sequence against all the keys before them, as gpt-fast's
does: a prefill starts at 0, a decode step is one token per sequence. Generation is generate.py.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import ops
from ..config import DirectoryWeights, ModelConfig, NormWeights, ProvidedWeights, load_config
from ..errors import InputError, RemoteError, TsqpError
from ..protocol import DTYPES, WIRE_DTYPES
from ..transport import Client, WireStats
from .replies import check_not_refused
from .steps import LeanSteps, SeedSteps, Steps, Window

if TYPE_CHECKING:
    from .generate import Generation

PROTOCOLS = ("lean", "seed")
PROTECTIONS = ("none", "private")


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


def check_ids(input_ids: torch.Tensor, config: ModelConfig, new_tokens: int = 0,
              source: str = "the input ids") -> torch.Tensor:
    """`input_ids` if it is an int64 [batch, seq] tensor of the model's token ids that, with
    `new_tokens` more, fits the model; else an InputError naming the problem (and `source`)."""
    if input_ids.dtype != torch.int64 or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise InputError(f"{source} must be a non-empty int64 [batch, seq] tensor, got {input_ids.dtype} "
                         f"{list(input_ids.shape)}")
    total = input_ids.shape[1] + new_tokens
    if total > config.max_position_embeddings:
        what = f"{input_ids.shape[1]} prompt + {new_tokens} new tokens" if new_tokens else f"{total} tokens"
        raise InputError(f"{what} exceed the model's max_position_embeddings ({config.max_position_embeddings})")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= config.vocab_size:
        raise InputError(f"{source} holds token id {low if low < 0 else high}, outside the model's vocabulary "
                         f"[0, {config.vocab_size})")
    return input_ids


class TeeRunner:
    """Runs prefills and generations for one model against one GPU server."""

    def __init__(self, client: Client, model_dir: str | Path | None = None, protocol: str = "lean",
                 wire_dtype: str = "float32", protection: str = "none", verify: bool = False,
                 verify_dtype: str = "float32"):
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
        check_not_refused(client.endpoint)
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
            self.steps: Steps = GuardedSteps(client, self.config, self.weights, private=protection == "private",
                                      verify=verify, wire_name=wire_dtype, verify_dtype=verify_dtype)
        elif protocol == "lean":
            weights = self.weights if isinstance(self.weights, DirectoryWeights) else None
            self.steps = LeanSteps(client, self.config, DTYPES[wire_dtype], weights)
        else:
            self.steps = SeedSteps(client, self.config, DTYPES[wire_dtype])
        self.protocol, self.wire_dtype = protocol, self.steps.wire_name
        self.protection, self.verify = protection, verify

    @property
    def guarded(self) -> bool:
        """Private and/or verified: the guarded steps, with their offline phase."""
        return self.protection == "private" or self.verify

    def prepare(self, batch: int, tokens: int, all_positions: bool = False, count: int = 1):
        """The guarded modes' offline phase, ahead of `count` forward passes of this shape
        (prefills of `tokens`, or decode steps with tokens = 1), in one pass over the weights."""
        if not self.guarded:
            raise InputError("the offline phase exists only with --protection private or --verify")
        return self.steps.prepare(batch, tokens, all_positions, count)

    def offline_for(self, batch: int, tokens: int, all_positions: bool = False, count: int = 1) -> float:
        """Make sure material for a forward pass of this shape is ready (guarded modes), making
        `count` passes' worth if none is; the seconds that took, kept apart from online time."""
        if not self.guarded or self.steps.ready(batch, tokens, all_positions):
            return 0.0
        return self.prepare(batch, tokens, all_positions, count).seconds

    def _init_from_server(self) -> tuple[ModelConfig, NormWeights, torch.Tensor, float]:
        warnings.warn("no model directory given: trusting the GPU server's Init for config, norm weights and "
                      "rope parameters (give the TEE its own copy with --model / LLAMA_MODEL_PATH)", stacklevel=3)
        reply = self.client.call("Init")
        names = reply.header["weight_names"]
        weights = ProvidedWeights(dict(zip(names, reply.tensors[: len(names)])))
        inv_freq = reply.tensors[len(names)].float()
        return ModelConfig.from_dict(reply.header["config"]), weights, inv_freq, float(reply.header["attention_scaling"])

    def check_input(self, input_ids: torch.Tensor, new_tokens: int = 0) -> torch.Tensor:
        """`input_ids`, checked against this model (check_ids)."""
        return check_ids(input_ids, self.config, new_tokens)

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
        offline_s = self.offline_for(batch, tokens, all_positions)
        before = self.client.stats.copy()
        start = time.perf_counter()
        self.steps.open(batch, tokens)
        try:
            logits = self.forward(input_ids, 0, all_positions)
        finally:
            self.steps.close()
        seconds = time.perf_counter() - start
        return PrefillResult(logits=logits, seconds=seconds, batch=batch, tokens=tokens,
                             wire=self.client.stats.since(before), offline_s=offline_s)

    def forward(self, input_ids: torch.Tensor, input_pos: int, all_positions: bool = False) -> torch.Tensor:
        """Logits [batch, 1 or n, vocab] for the n tokens of `input_ids` at positions
        [input_pos, input_pos + n), of sequences opened with `steps.open` (`steps.close` frees them)."""
        window = Window(input_pos, input_ids.shape[1], all_positions)
        self.steps.begin(window)
        try:
            with torch.inference_mode():
                return self._layers(input_ids, window)
        finally:
            self.steps.end()

    def _layers(self, input_ids: torch.Tensor, window: Window) -> torch.Tensor:
        c, w, steps = self.config, self.weights, self.steps
        positions = torch.arange(window.start, window.end)
        cos, sin = ops.rope_cos_sin(self.inv_freq, self.rope_scaling, positions)
        scaling = c.head_dim ** -0.5

        # RoPE, Q @ K^T, P @ V and * up run where the protocol puts them: all on the GPU (lean); RoPE
        # and * up in the TEE, the products on the GPU (seed); all in the TEE (guarded). Lean starts
        # each RMSNorm's projections in the call before, on h before the scale, applied after.
        h = steps.embed(input_ids)  # [GPU] Embedding (in the TEE when guarded, and for lean decode steps)
        for i in range(c.num_layers):
            # Attention
            x = ops.rms_normalize(h, w.input_norm(i), c.rms_norm_eps)  # [TEE] RMSNorm
            scores = steps.scores(i, x, cos, sin)  # [GPU] q/k/v projections, then RoPE, Q @ K^T: causal blocks
            probs = [ops.causal_softmax(b.scores, scaling, b.factor) for b in scores]  # [TEE] mask + softmax
            h = h + steps.attn_out(i, probs, h)  # P @ V, [GPU] o_proj; [TEE] residual (lean: gate & up go with it)
            # MLP
            x = ops.rms_normalize(h, w.post_attention_norm(i), c.rms_norm_eps)  # [TEE] RMSNorm
            gate = steps.gate(i, x)  # [GPU] gate & up projections
            h = h + steps.down(i, ops.silu(gate), h)  # [TEE] SiLU; * up, [GPU] down; [TEE] residual (lean: next q/k/v)
        if not window.all_positions:
            h = h[:, -1:]
        x = ops.rms_normalize(h, w.final_norm(), c.rms_norm_eps)  # [TEE] final RMSNorm
        return steps.lm_head(x)  # [GPU] LM head (lean: with the last down)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling) -> "Generation":
        """New tokens for `input_ids` [batch, prompt] as they come: iterate for each step's
        tokens [batch], then read `.result` (a GenerationResult). `sampling`: temperature,
        top_k, top_p, seed, ignore_eos, keep_logits (see generate.py)."""
        from .generate import Generation

        return Generation(self, input_ids, max_new_tokens, **sampling)
