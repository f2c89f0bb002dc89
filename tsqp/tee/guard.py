"""Private and verified outsourcing of the linear layers (see docs/security.md).

Private (`--protection private`), Slalom-style: for `y = x W^T + b` the TEE sends `x + s*r`
where `r` is a one-time mask drawn offline from the OS's CSPRNG, uniform in [-1, 1), and `s` a
power of two 2^MASK_BITS above max|x|; the server returns `(x + s*r) W^T + b` and the TEE
subtracts `s * (r W^T)`, precomputed offline from weights it reads itself. Masked values travel
and are multiplied in float64 so that the 2^MASK_BITS headroom costs no accuracy that matters.
Each mask is handed out once; `OneTimePool` refuses a second use.

Verified (`--verify`), Freivalds: for every product the TEE draws PROBES secret probes `p` (per
module per prefill, offline) and checks `y p == x (W^T p) + b.p` for every row and every probe,
within a floating point tolerance; a mismatch raises IntegrityError naming the layer and module.

Both keep the attention products (Q K^T, P V) and the embedding lookup inside the TEE: they
have no fixed operand to precompute against, and the lookup would reveal the token ids.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..config import DirectoryWeights, ModelConfig
from ..errors import InputError, TsqpError
from ..protocol import DTYPES
from ..transport import Client
from .. import ops

MASK_BITS = 24  # mask magnitude / max|x|: each coordinate's leak bound is 2^-MASK_BITS (docs/security.md)
# Freivalds tolerance, in units of the rounding noise an honest product carries:
# VERIFY_EPS * sqrt(in_features) * ||y||_2 per row (calibration in docs/security.md).
VERIFY_TOLERANCE = 50.0
# float32's unit roundoff: --verify takes float32 products only (a float64 wire in private mode,
# whose unmasking costs less than that). Fixed in the TEE, never taken from what the server says:
# at 16-bit roundoff the tolerance outgrows the changes it must catch.
VERIFY_EPS = 2.0 ** -24
# float64 elements of a weight converted at once in the offline phase (measured best here):
# 2 MB blocks for the probes' images P W, 8 MB when a mask's GEMM runs per block.
WEIGHT_BLOCK, MASKED_WEIGHT_BLOCK = 1 << 18, 1 << 20
# Freivalds probes per module, each checking every row: a change that one probe misses (a sum of
# its elements with secret signs that lands near zero) must slip past all of them. Four cost the
# online check ~20% more than one did (one float64 pass over y serves them all: freivalds_residual).
PROBES = 4
# float64 elements of y converted at once: 4 MB (1<<17..1<<19 within 5% here, 1<<16 and 1<<20 ~10% slower).
FREIVALDS_BLOCK = 1 << 19

# The outsourced projections, by the group that shares one input (and so one mask).
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
_MLP = {"gate_proj", "up_proj", "down_proj"}


class IntegrityError(TsqpError):
    """The server's answer failed its Freivalds check: no logits are returned."""


class MaskReuseError(TsqpError):
    """One-time material was asked for twice."""


def weight_name(config: ModelConfig, layer: int | None, module: str, kind: str = "weight") -> str:
    if module == "lm_head":
        if kind == "weight" and config.tie_word_embeddings:
            return "model.embed_tokens.weight"
        return f"lm_head.{kind}"
    block = "mlp" if module in _MLP else "self_attn"
    return f"model.layers.{layer}.{block}.{module}.{kind}"


def secure_uniform(shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Uniform in [-1, 1) from os.urandom: masks must be unpredictable, not just random-looking."""
    count = math.prod(shape)
    bits = torch.frombuffer(bytearray(os.urandom(8 * count)), dtype=torch.int64) if count else torch.zeros(0, dtype=torch.int64)
    mantissa = ((bits >> 11) & ((1 << 53) - 1)).to(torch.float64) * 2.0 ** -52  # 53 random bits in [0, 2)
    return (mantissa - 1.0).reshape(shape).to(dtype)


def secure_probes(count: int, size: int) -> torch.Tensor:
    """`count` Freivalds probes [count, size]: random signs, magnitudes in [0.5, 1). Bounded away
    from zero so that any single changed element moves y.p by at least half its change."""
    u = secure_uniform((count, size))
    return torch.sign(u) * (0.5 + 0.5 * u.abs()) + (u == 0)


@dataclass
class CallSecrets:
    """One-time material for one outsourced call (one input, one or more projections)."""

    mask: torch.Tensor | None  # r [rows, in], float64 (private)
    unmasks: list[torch.Tensor]  # r W_m^T [rows, out_m], float64, per module (private)
    probes: list[torch.Tensor]  # P_m [probes, out_m], float64 (verify)
    probe_images: list[torch.Tensor]  # P_m W_m [probes, in], float64 (verify)
    probe_biases: list[torch.Tensor]  # P_m b_m [probes], float64 (verify)


@dataclass
class PrefillSecrets:
    """Everything one prefill of a given shape consumes; taken whole, used once."""

    shape: tuple[int, int, bool]  # batch, tokens, all_positions
    calls: dict[tuple[int | None, str], CallSecrets]
    _taken: set = field(default_factory=set)

    def take(self, layer: int | None, group: str) -> CallSecrets:
        key = (layer, group)
        if key in self._taken:
            raise MaskReuseError(f"one-time material for layer {layer} {group} was already used")
        self._taken.add(key)
        return self.calls[key]


@dataclass
class OfflineReport:
    seconds: float = 0.0
    bytes: int = 0  # memory the material occupies
    prefills: int = 0  # prefills it serves (one each: nothing is reused)


class OneTimePool:
    """Precomputed material, one `PrefillSecrets` per future prefill, each handed out once."""

    def __init__(self) -> None:
        self._ready: deque[PrefillSecrets] = deque()

    def add(self, secrets: PrefillSecrets) -> None:
        self._ready.append(secrets)

    def take(self, shape: tuple[int, int, bool]) -> PrefillSecrets | None:
        for i, secrets in enumerate(self._ready):
            if secrets.shape == shape:
                del self._ready[i]
                return secrets
        return None

    def __len__(self) -> int:
        return len(self._ready)


def float64_blocks(weight: torch.Tensor, elements: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """`weight`'s rows in float64, `elements` at a time in one reused buffer: the offline
    phase never makes a whole float64 copy of a matrix (those copies were 3/4 of a verify precompute).
    Each block is overwritten by the next: use it before asking for another."""
    out, width = weight.shape
    step = max(1, min(out, elements // width))
    buffer = torch.empty(step, width, dtype=torch.float64)
    for start in range(0, out, step):
        stop = min(start + step, out)
        block = buffer[: stop - start]
        block.copy_(weight[start:stop])
        yield slice(start, stop), block


def module_secrets(weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None,
                   count: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                                        torch.Tensor | None]:
    """For one module: the mask's image r W^T (if masked) and, if `count` > 0, that many
    Freivalds probes P [count, out] with their images P W and P b."""
    out, width = weight.shape
    unmask = None
    if mask is not None:
        unmask = torch.empty(mask.shape[0], out, dtype=torch.float64)
        for rows, block in float64_blocks(weight, MASKED_WEIGHT_BLOCK):
            unmask[:, rows] = mask @ block.T
    if not count:
        return unmask, None, None, None
    probes = secure_probes(count, out)
    images = torch.zeros(count, width, dtype=torch.float64)
    for rows, block in float64_blocks(weight, WEIGHT_BLOCK):  # its own pass: smaller blocks suit it
        images.addmm_(probes[:, rows], block)
    biases = probes @ bias.double() if bias is not None else torch.zeros(count, dtype=torch.float64)
    return unmask, probes, images, biases


def precompute(weights: DirectoryWeights, config: ModelConfig, shape: tuple[int, int, bool], private: bool,
               verify: bool) -> tuple[PrefillSecrets, int]:
    """The offline phase for one prefill: masks and their images, Freivalds probes and theirs.
    Streams one weight matrix at a time; returns the material and its size in bytes."""
    batch, tokens, all_positions = shape
    calls: dict[tuple[int | None, str], CallSecrets] = {}
    plan = [(layer, group, modules, batch * tokens) for layer in range(config.num_layers)
            for group, modules in GROUPS.items()]
    plan.append((None, "lm_head", ("lm_head",), batch * (tokens if all_positions else 1)))
    size = 0
    for layer, group, modules, rows in plan:
        mats = [weights.read(weight_name(config, layer, m)) for m in modules]  # float32, streamed below
        bias_names = [weight_name(config, layer, m, "bias") for m in modules]
        biases = [weights.read(name) if weights.has(name) else None for name in bias_names]
        mask = secure_uniform((rows, mats[0].shape[1]), torch.float64) if private else None
        secrets = CallSecrets(mask=mask, unmasks=[], probes=[], probe_images=[], probe_biases=[])
        for weight, bias in zip(mats, biases):
            unmask, probes, images, probe_biases = module_secrets(weight, bias, mask, PROBES if verify else 0)
            if unmask is not None:
                secrets.unmasks.append(unmask)
            if verify:
                secrets.probes.append(probes)
                secrets.probe_images.append(images)
                secrets.probe_biases.append(probe_biases)
        kept = [mask] if mask is not None else []
        kept += secrets.unmasks + secrets.probes + secrets.probe_images + secrets.probe_biases
        size += sum(t.numel() * t.element_size() for t in kept)
        calls[(layer, group)] = secrets
    return PrefillSecrets(shape=shape, calls=calls), size


def freivalds_residual(x: torch.Tensor, y: torch.Tensor, probes: torch.Tensor, images: torch.Tensor,
                       biases: torch.Tensor) -> float:
    """max over rows i and probes j of |y_i p_j - x_i (W^T p_j) - b.p_j|, in units of the rounding
    noise an honest product carries, VERIFY_EPS * sqrt(in) * ||y_i|| (probes [k, out] with |p| < 1,
    images P W [k, in], biases P b [k]).

    y is converted to float64 a block of rows at a time, in one reused buffer that stays in cache,
    and that one pass serves every probe (a [k, out] x [out, rows] product) and the rows' norms:
    a whole float64 copy of y (8 MB for a 128-token gate) would cost more than the check."""
    x2, y2 = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1])
    rows, width = y2.shape
    expected = images @ x2.T + biases[:, None]  # [k, rows]
    dots = torch.empty(len(probes), rows, dtype=torch.float64)
    norms = torch.empty(rows, dtype=torch.float64)
    step = max(1, min(rows, FREIVALDS_BLOCK // width))
    block = torch.empty(step, width, dtype=torch.float64) if y2.dtype != torch.float64 else None
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        part = y2[start:stop]  # private mode's unmasked reply is float64 already: read it in place
        if block is not None:
            part = block[: stop - start].copy_(part)  # float64: products round at 2^-53, far below the noise
        torch.mm(probes, part.T, out=dots[:, start:stop])
        torch.linalg.vector_norm(part, dim=-1, out=norms[start:stop])
    noise = VERIFY_EPS * math.sqrt(x2.shape[-1]) * norms + 1e-300
    if not bool(torch.isfinite(noise).all()):  # inf/NaN, or a float64 reply whose norm overflows: never honest
        return math.inf
    return ((dots - expected).abs() / noise).max().item()


def freivalds_check(x: torch.Tensor, y: torch.Tensor, probes: torch.Tensor, images: torch.Tensor,
                    biases: torch.Tensor, where: str) -> None:
    """Raise IntegrityError unless y = x W^T + b passes every probe, in every row, within VERIFY_TOLERANCE."""
    worst = freivalds_residual(x, y, probes, images, biases)
    if not worst <= VERIFY_TOLERANCE:  # `not <=` also catches NaN
        raise IntegrityError(f"integrity check failed at {where}: the server's result is wrong "
                             f"(Freivalds residual {worst:.1f} > {VERIFY_TOLERANCE:g} x rounding noise); "
                             "no logits returned")


class GuardedSteps:
    """Steps for the runner that keep attention and the embedding in the TEE and guard every
    outsourced projection with a one-time mask (private) and/or a Freivalds check (verify)."""

    def __init__(self, client: Client, config: ModelConfig, weights: DirectoryWeights, private: bool, verify: bool,
                 wire_name: str = "float32"):
        self.client, self.config, self.weights = client, config, weights
        self.private, self.verify = private, verify
        self.wire_name = "float64" if private else wire_name
        if verify and self.wire_name not in ("float32", "float64"):
            raise InputError(f"--verify needs the float32 wire, not {wire_name}: a 16-bit wire rounds a product "
                             "by as much as the changes the check must catch")
        if verify and (server_dtype := str(client.ping().get("dtype"))) != "float32":
            # Only ever a reason to refuse: a server that claims float32 and computes in less is caught.
            raise InputError(f"--verify needs a server computing in float32; this one says {server_dtype} "
                             "(start it with --dtype float32)")
        self.pool = OneTimePool()
        self.current: PrefillSecrets | None = None
        self._values: torch.Tensor | None = None  # V, expanded for GQA, between scores and attn_out
        self._up: torch.Tensor | None = None  # between gate and down

    # -- offline ------------------------------------------------------------------------------

    def prepare(self, batch: int, tokens: int, all_positions: bool = False, count: int = 1) -> OfflineReport:
        """Run the offline phase for `count` future prefills of this shape; report this run of it."""
        report = OfflineReport()
        start = time.perf_counter()
        for _ in range(count):
            secrets, size = precompute(self.weights, self.config, (batch, tokens, all_positions), self.private,
                                       self.verify)
            self.pool.add(secrets)
            report.bytes += size
            report.prefills += 1
        report.seconds = time.perf_counter() - start
        return report

    def begin(self, batch: int, tokens: int, all_positions: bool) -> float:
        """Take this prefill's material, precomputing it now (timed apart) if none is ready."""
        shape = (batch, tokens, all_positions)
        secrets = self.pool.take(shape)
        spent = 0.0
        if secrets is None:
            start = time.perf_counter()
            secrets, _ = precompute(self.weights, self.config, shape, self.private, self.verify)
            spent = time.perf_counter() - start
        self.current = secrets
        return spent

    def end(self) -> None:
        self.current = None  # nothing of a finished prefill's material can be used again
        self._values = self._up = None

    # -- one guarded call -----------------------------------------------------------------------

    def _project(self, layer: int | None, group: str, x: torch.Tensor) -> list[torch.Tensor]:
        if self.current is None:
            raise MaskReuseError("no one-time material for this call: prefills must go through TeeRunner.prefill")
        secrets = self.current.take(layer, group)
        modules = GROUPS.get(group, ("lm_head",))
        flat = x.reshape(-1, x.shape[-1])
        if self.private:
            top = flat.abs().max().item()
            scale = 2.0 ** (math.ceil(math.log2(top)) + MASK_BITS) if top > 0 else 2.0 ** MASK_BITS
            sent = torch.add(flat.double(), secrets.mask, alpha=scale)  # scale is a power of 2: exact
        else:
            sent = flat.to(DTYPES[self.wire_name])
        method_args = {"modules": list(modules), "wire_dtype": self.wire_name}
        if layer is not None:
            method_args["layer_idx"] = layer
        replies = self.client.call("Linears", [sent], **method_args).tensors
        shapes = [list(y.shape) for y in replies]
        expected = [[flat.shape[0], self.config.out_features(m)] for m in modules]
        if shapes != expected or not all(y.is_floating_point() for y in replies):
            raise IntegrityError(f"server sent results of shapes {shapes} for {group}, expected float {expected}")
        outputs = []
        checked = (flat if self.private else sent).double() if self.verify else None  # once per group
        for i, (module, y) in enumerate(zip(modules, replies)):
            if self.private:
                y = torch.sub(y.double(), secrets.unmasks[i], alpha=scale)
            if self.verify:  # on the unmasked result, so the tolerance is relative to y, not to the mask
                where = f"layer {layer} {module}" if layer is not None else "lm_head"
                freivalds_check(checked, y, secrets.probes[i], secrets.probe_images[i], secrets.probe_biases[i], where)
            outputs.append(y.float().reshape(*x.shape[:-1], -1))
        return outputs

    # -- the runner's steps ---------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weights.rows("model.embed_tokens.weight", input_ids)  # token ids never leave the TEE

    def scores(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
        """Projections outsourced (guarded); RoPE and Q·K^T here, as causal query blocks."""
        c = self.config
        q, k, v = (ops.split_heads(t, c.head_dim) for t in self._project(layer, "qkv", x))
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        self._values = ops.repeat_kv(v, c.kv_groups)
        k = ops.repeat_kv(k, c.kv_groups).transpose(-1, -2)
        ends = ops.query_blocks(q.shape[2])
        return [q[:, :, start:end] @ k[..., :end] for start, end in zip([0, *ends], ends)]

    def attn_out(self, layer: int, probs: list[torch.Tensor]) -> torch.Tensor:
        assert self._values is not None
        v, self._values = self._values, None
        out = torch.cat([p @ v[:, :, : p.shape[-1]] for p in probs], dim=2)
        return self._project(layer, "o", ops.merge_heads(out))[0]

    def gate(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        gate, self._up = self._project(layer, "gate_up", x)
        return gate

    def down(self, layer: int, activated: torch.Tensor) -> torch.Tensor:
        assert self._up is not None
        product, self._up = activated * self._up, None  # in the TEE: private mode's server has only a masked up
        return self._project(layer, "down", product)[0]

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        return self._project(None, "lm_head", h)[0]
