"""The guarded steps: private (one-time masks) and verified (Freivalds) outsourcing of every
projection, with attention and the embedding lookup kept in the TEE (see docs/security.md).

Private (`--protection private`): each call's input travels as `x_q + s*r` (tsqp.tee.masks) and
is multiplied in float64; the TEE subtracts `s * (r W^T)`, precomputed offline.
Verified (`--verify`): every reply is checked against secret probes (tsqp.tee.freivalds).
The attention products (Q K^T, P V) and the embedding stay in the TEE: they have no fixed
operand to precompute against, and the lookup would reveal the token ids.
"""

from __future__ import annotations

import time

import torch

from .. import ops
from ..config import DirectoryWeights, ModelConfig
from ..errors import InputError, IntegrityError, MaskReuseError
from ..kv_cache import KVCache
from ..protocol import DTYPES
from ..transport import Client
from .freivalds import ROUNDOFF, freivalds_check
from .masks import exponent_above, mask_input, vocabulary_exponent
from .offline import GROUPS, CallSecrets, ForwardSecrets, OfflineReport, OneTimePool, precompute
from .replies import check_finite, check_not_refused, check_shapes, refuse
from .steps import Window

__all__ = ["GuardedSteps", "IntegrityError", "MaskReuseError"]


class GuardedSteps:
    """Steps for the runner that keep attention and the embedding in the TEE and guard every
    outsourced projection with a one-time mask (private) and/or a Freivalds check (verify)."""

    def __init__(self, client: Client, config: ModelConfig, weights: DirectoryWeights, private: bool, verify: bool,
                 wire_name: str = "float32", verify_dtype: str = "float32"):
        self.client, self.config, self.weights = client, config, weights
        self.private, self.verify = private, verify
        if verify_dtype not in ("float32", "float64"):
            raise InputError(f"--verify-dtype must be float32 or float64, not {verify_dtype}")
        # Private mode's products are float64 (the mask's headroom); so are verify's, if asked.
        self.wire_name = "float64" if private or verify_dtype == "float64" else wire_name
        if verify and self.wire_name != "float64" and wire_name != "float32":
            raise InputError(f"--verify needs the float32 wire, not {wire_name}: a 16-bit wire rounds a product "
                             "by as much as the changes the check must catch")
        if verify and (server_dtype := str(client.ping().get("dtype"))) != "float32":
            # Only ever a reason to refuse: a server that claims float32 and computes in less is caught.
            raise InputError(f"--verify needs a server computing in float32; this one says {server_dtype} "
                             "(start it with --dtype float32)")
        self.roundoff = ROUNDOFF[DTYPES[self.wire_name]]
        self._vocabulary_exponent = vocabulary_exponent(weights, config) if private else 0
        self.pool = OneTimePool()
        self.current: ForwardSecrets | None = None
        self.cache: KVCache | None = None  # K and V in the TEE: the server never sees them
        self.batch, self.window = 0, Window(0, 0)
        self._up: torch.Tensor | None = None  # between gate and down

    # -- offline ------------------------------------------------------------------------------

    def prepare(self, batch: int, tokens: int, all_positions: bool = False, count: int = 1) -> OfflineReport:
        """Run the offline phase for `count` future forward passes of this shape (a prefill of
        `tokens`, or decode steps: tokens = 1) in one pass over the weights; report it."""
        start = time.perf_counter()
        made, size = precompute(self.weights, self.config, (batch, tokens, all_positions), self.private,
                                self.verify, count)
        for secrets in made:
            self.pool.add(secrets)
        return OfflineReport(seconds=time.perf_counter() - start, bytes=size, prefills=count)

    def ready(self, batch: int, tokens: int, all_positions: bool = False) -> int:
        """How many forward passes of this shape have their material made."""
        return self.pool.count((batch, tokens, all_positions))

    # -- the sequence and the pass --------------------------------------------------------------

    def open(self, batch: int, capacity: int) -> None:
        c = self.config
        self.batch = batch
        self.cache = KVCache.allocate(c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim)

    def begin(self, window: Window) -> float:
        """Take this pass's material, precomputing it now (timed apart) if none is ready."""
        self.window = window
        shape = (self.batch, window.tokens, window.all_positions)
        secrets = self.pool.take(shape)
        spent = 0.0
        if secrets is None:
            start = time.perf_counter()
            (secrets,), _ = precompute(self.weights, self.config, shape, self.private, self.verify)
            spent = time.perf_counter() - start
        self.current = secrets
        return spent

    def end(self) -> None:
        self.current = None  # nothing of a finished pass's material can be used again
        self._up = None

    def close(self) -> None:
        self.cache = None

    # -- one guarded call -----------------------------------------------------------------------

    def _project(self, layer: int | None, group: str, x: torch.Tensor) -> list[torch.Tensor]:
        if self.current is None:
            raise MaskReuseError("no one-time material for this call: forward passes must go through TeeRunner")
        secrets = self.current.take(layer, group)
        modules = GROUPS.get(group, ("lm_head",))
        flat = x.reshape(-1, x.shape[-1])
        where = f"layer {layer} {group}" if layer is not None else "lm_head"
        if self.private:
            exponent = exponent_above(flat.abs().max(), where)
            if (layer, group) == (0, "qkv"):  # a function of the tokens alone: one scale for the vocabulary
                exponent = max(exponent, self._vocabulary_exponent)
            sent, scale = mask_input(flat, secrets.mask, exponent)
        else:
            sent, scale = flat.to(DTYPES[self.wire_name]), 0.0
        method_args = {"modules": list(modules), "wire_dtype": self.wire_name}
        if layer is not None:
            method_args["layer_idx"] = layer
        check_not_refused(self.client.endpoint)
        width = sum(self.config.out_features(m) for m in modules)
        reply_bytes = sent.shape[0] * width * DTYPES[self.wire_name].itemsize  # sized up front (tsqp.fastlink)
        replies = self.client.call("Linears", [sent], reply_bytes=reply_bytes, **method_args).tensors
        try:
            return self._outputs(layer, group, x, sent, replies, secrets, scale)
        except IntegrityError:
            refuse(self.client.endpoint)
            raise

    def _outputs(self, layer: int | None, group: str, x: torch.Tensor, sent: torch.Tensor,
                 replies: list[torch.Tensor], secrets: CallSecrets, scale: float) -> list[torch.Tensor]:
        """The checked, unmasked results of one call. The check runs on what the server computed
        (in private mode, the masked product), so its outcome depends on nothing the server does
        not know but the fresh probes."""
        modules, where = GROUPS.get(group, ("lm_head",)), f"layer {layer} {group}" if layer is not None else "lm_head"
        check_shapes(replies, [(sent.shape[0], self.config.out_features(m)) for m in modules], f"Linears ({where})",
                     IntegrityError)
        outputs = []
        for i, (module, y) in enumerate(zip(modules, replies)):
            if self.verify:
                named = f"layer {layer} {module}" if layer is not None else "lm_head"
                freivalds_check(sent, y, secrets.checks[i], self.roundoff, named)
            if self.private:
                y = torch.sub(y.double(), secrets.unmasks[i], alpha=scale)
            outputs.append(y.float().reshape(*x.shape[:-1], -1))
        check_finite(outputs, f"Linears ({where})", IntegrityError)  # a float64 reply beyond float32's range too
        return outputs

    # -- the runner's steps ---------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weights.rows("model.embed_tokens.weight", input_ids)  # token ids never leave the TEE

    def scores(self, layer: int, x: ops.Normalized, cos: torch.Tensor, sin: torch.Tensor) -> list[ops.ScoreBlock]:
        """Projections outsourced (guarded); RoPE and Q·K^T here, as causal query blocks."""
        c, cache = self.config, self.cache
        assert cache is not None
        q, k, v = (ops.split_heads(t, c.head_dim) for t in self._project(layer, "qkv", x.value))
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        keys, _ = cache.update(layer, self.window.start, k, v)
        return ops.score_blocks(ops.causal_scores(q, keys, ops.query_blocks(q.shape[2]), self.window.start))

    def attn_out(self, layer: int, probs: list[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        assert self.cache is not None
        out = ops.attend(probs, self.cache.values[layer][:, :, : self.window.end])
        return self._project(layer, "o", ops.merge_heads(out))[0]

    def gate(self, layer: int, x: ops.Normalized) -> torch.Tensor:
        gate, self._up = self._project(layer, "gate_up", x.value)
        return gate

    def down(self, layer: int, activated: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        assert self._up is not None
        product, self._up = activated * self._up, None  # in the TEE: private mode's server has only a masked up
        return self._project(layer, "down", product)[0]

    def lm_head(self, x: ops.Normalized) -> torch.Tensor:
        return self._project(None, "lm_head", x.value)[0]
