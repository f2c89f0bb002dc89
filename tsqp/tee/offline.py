"""The guarded modes' offline phase: one-time masks and Freivalds probes, made ahead of use.

Every outsourced call of a future prefill gets its own material: a mask `r` and its images
`r W^T` (private), probes `P` and their images `P W`, `P b` (verify). Weights are streamed from
the TEE's own model directory one matrix at a time, converted to float64 a block of rows at a
time. Each call's material is handed out once (`PrefillSecrets.take`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..config import DirectoryWeights, ModelConfig
from ..errors import MaskReuseError
from .freivalds import PROBES, ProbeSet, secure_probes
from .masks import secure_uniform

# float64 elements of a weight converted at once: 2 MB blocks for the probes' images P W, 8 MB
# when a mask's GEMM runs per block (docs/benchmarks.md).
WEIGHT_BLOCK, MASKED_WEIGHT_BLOCK = 1 << 18, 1 << 20

# The outsourced projections, by the group that shares one input (and so one mask).
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
_MLP = {"gate_proj", "up_proj", "down_proj"}


def weight_name(config: ModelConfig, layer: int | None, module: str, kind: str = "weight") -> str:
    if module == "lm_head":
        if kind == "weight" and config.tie_word_embeddings:
            return "model.embed_tokens.weight"
        return f"lm_head.{kind}"
    block = "mlp" if module in _MLP else "self_attn"
    return f"model.layers.{layer}.{block}.{module}.{kind}"



@dataclass
class CallSecrets:
    """One-time material for one outsourced call (one input, one or more projections)."""

    mask: torch.Tensor | None  # r [rows, in], float64 (private)
    unmasks: list[torch.Tensor] = field(default_factory=list)  # r W_m^T [rows, out_m], per module (private)
    checks: list[ProbeSet] = field(default_factory=list)  # per module (verify)

    @property
    def nbytes(self) -> int:
        tensors = ([self.mask] if self.mask is not None else []) + self.unmasks
        return sum(t.numel() * t.element_size() for t in tensors) + sum(c.nbytes for c in self.checks)


@dataclass
class ForwardSecrets:
    """Everything one forward pass of a given shape consumes (a prefill, or one decode step);
    taken whole, each call's part used once."""

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
    prefills: int = 0  # forward passes it serves (one each: nothing is reused)


class OneTimePool:
    """Precomputed material, one `ForwardSecrets` per future forward pass, each handed out once."""

    def __init__(self) -> None:
        self._ready: deque[ForwardSecrets] = deque()

    def add(self, secrets: ForwardSecrets) -> None:
        self._ready.append(secrets)

    def take(self, shape: tuple[int, int, bool]) -> ForwardSecrets | None:
        for i, secrets in enumerate(self._ready):
            if secrets.shape == shape:
                del self._ready[i]
                return secrets
        return None

    def count(self, shape: tuple[int, int, bool]) -> int:
        return sum(secrets.shape == shape for secrets in self._ready)

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
                   count: int) -> tuple[torch.Tensor | None, ProbeSet | None]:
    """For one module: the mask's image r W^T (if masked) and, if `count` > 0, that many
    Freivalds probes P [count, out] with their images P W, P b, (P∘P)(W∘W) and (P∘P)(b∘b)."""
    out, width = weight.shape
    unmask = None
    if mask is not None:
        unmask = torch.empty(mask.shape[0], out, dtype=torch.float64)
        for rows, block in float64_blocks(weight, MASKED_WEIGHT_BLOCK):
            unmask[:, rows] = mask @ block.T
    if not count:
        return unmask, None
    probes = secure_probes(count, out)
    squared_probes = probes * probes
    images = torch.zeros(count, width, dtype=torch.float64)
    squares = torch.zeros(count, width, dtype=torch.float64)
    for rows, block in float64_blocks(weight, WEIGHT_BLOCK):  # its own pass: smaller blocks suit it
        images.addmm_(probes[:, rows], block)
        squares.addmm_(squared_probes[:, rows], block.square_())  # the block is not read again
    b = bias.double() if bias is not None else torch.zeros(out, dtype=torch.float64)
    return unmask, ProbeSet(probes, images, probes @ b, squares, squared_probes @ (b * b))


def precompute(weights: DirectoryWeights, config: ModelConfig, shape: tuple[int, int, bool], private: bool,
               verify: bool, count: int = 1) -> tuple[list[ForwardSecrets], int]:
    """The offline phase for `count` forward passes of one shape: masks and their images,
    Freivalds probes and theirs. Streams each weight matrix once for all of them (one GEMM over
    every pass's masks); returns the material and its size in bytes."""
    batch, tokens, all_positions = shape
    sets: list[dict[tuple[int | None, str], CallSecrets]] = [{} for _ in range(count)]
    plan = [(layer, group, modules, batch * tokens) for layer in range(config.num_layers)
            for group, modules in GROUPS.items()]
    plan.append((None, "lm_head", ("lm_head",), batch * (tokens if all_positions else 1)))
    size = 0
    for layer, group, modules, rows in plan:
        mats = [weights.read(weight_name(config, layer, m)) for m in modules]  # float32, streamed below
        bias_names = [weight_name(config, layer, m, "bias") for m in modules]
        biases = [weights.read(name) if weights.has(name) else None for name in bias_names]
        masks = secure_uniform((count * rows, mats[0].shape[1]), torch.float64) if private else None
        calls = [CallSecrets(mask=masks[i * rows: (i + 1) * rows] if masks is not None else None)
                 for i in range(count)]
        for weight, bias in zip(mats, biases):
            unmask, checks = module_secrets(weight, bias, masks, count * PROBES if verify else 0)
            for i, call in enumerate(calls):
                if unmask is not None:
                    call.unmasks.append(unmask[i * rows: (i + 1) * rows])
                if checks is not None:
                    call.checks.append(checks.part(i, PROBES))
        for i, call in enumerate(calls):
            size += call.nbytes
            sets[i][(layer, group)] = call
    return [ForwardSecrets(shape=shape, calls=calls) for calls in sets], size
