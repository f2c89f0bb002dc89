"""Private mode's one-time additive masks, and the exact arithmetic that makes them hide x.

For `y = x W^T + b` the TEE sends `v = x_q + s*r` and later subtracts `s * (r W^T)`:
- `r = u * 2^-GRID_BITS`, `u` uniform over the integers in [-2^GRID_BITS, 2^GRID_BITS), from
  os.urandom, drawn offline and used once;
- `s = 2^(e + MASK_BITS)`, a power of two, with `max|x| < 2^e`;
- `x_q` is x rounded to the mask's own grid `g = s * 2^-GRID_BITS`.
Both terms are integer multiples of `g` below 2^53 g, so the float64 sum is exact and
`v / g = x_q / g + u`: a uniform integer shifted by at most 2^(GRID_BITS - MASK_BITS). Without
the rounding, `fl(x + s*r)` kept the bits of x below `g`, and a server that enumerates the
vocabulary against layer 0's input recovered every token (docs/security.md).
"""

from __future__ import annotations

import math
import os

import torch

from .. import ops
from ..config import DirectoryWeights, ModelConfig
from ..errors import TsqpError

MASK_BITS = 24  # s / 2^e: the statistical distance between two inputs' masked values is at most 2^-MASK_BITS
GRID_BITS = 52  # u has GRID_BITS + 1 random bits: x_q / g + u stays below 2^53, exact in float64
TABLE_ROWS = 4096  # embedding rows normalized at once when the vocabulary's exponent is found


class MaskError(TsqpError):
    """An activation cannot be masked (NaN or infinity): the run stops instead of sending it."""


def secure_uniform(shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """u * 2^-GRID_BITS with u uniform over the integers in [-2^GRID_BITS, 2^GRID_BITS), from
    os.urandom: masks must be unpredictable, not just random-looking. In [-1, 1)."""
    count = math.prod(shape)
    raw = bytearray(os.urandom(8 * count))
    bits = torch.frombuffer(raw, dtype=torch.int64) if count else torch.zeros(0, dtype=torch.int64)
    u = (bits & ((1 << (GRID_BITS + 1)) - 1)) - (1 << GRID_BITS)
    return (u.to(torch.float64) * 2.0 ** -GRID_BITS).reshape(shape).to(dtype)


def exponent_above(top: float | torch.Tensor, where: str = "") -> int:
    """The least e with |t| < 2^e for a magnitude `top` (0 for zero); refuses NaN and infinity."""
    top = torch.as_tensor(top, dtype=torch.float64)
    if not bool(torch.isfinite(top)):
        raise MaskError(f"private mode: a non-finite activation{' at ' + where if where else ''} cannot be masked")
    if top == 0:
        return 0
    return int(torch.frexp(top).exponent)  # top = m * 2^e, 0.5 <= m < 1


def quantize_to_grid(x: torch.Tensor, grid: float) -> torch.Tensor:
    """Float64 x rounded to the nearest multiple of `grid` (a power of two), in place: adding
    1.5 * 2^52 * grid rounds to that grid (its ulp there), and subtracting it again is exact,
    for |x| < 2^51 grid (here |x| < 2^(GRID_BITS - MASK_BITS) grid)."""
    magic = 1.5 * 2.0 ** 52 * grid
    return x.add_(magic).sub_(magic)


def mask_input(x: torch.Tensor, r: torch.Tensor, exponent: int) -> tuple[torch.Tensor, float]:
    """`x_q + s*r` in float64, exact, and the scale s; needs max|x| < 2^exponent."""
    scale = 2.0 ** (exponent + MASK_BITS)
    grid = scale * 2.0 ** -GRID_BITS
    quantized = quantize_to_grid(x.to(torch.float64, copy=True), grid)
    return quantized.add_(r, alpha=scale), scale


def vocabulary_exponent(weights: DirectoryWeights, config: ModelConfig) -> int:
    """The exponent of layer 0's q/k/v input over every token of the vocabulary. That input,
    RMSNorm(embedding[id]), is a function of the token alone, so a scale taken from it would
    tell the server which class of tokens it holds; one scale for the whole vocabulary tells
    nothing. Reads the embedding table whole (the private lookup keeps it anyway)."""
    table, norm = weights.table("model.embed_tokens.weight"), weights.input_norm(0)
    top = 0.0
    for start in range(0, table.shape[0], TABLE_ROWS):
        rows = ops.rms_norm(table[start: start + TABLE_ROWS].float(), norm, config.rms_norm_eps)
        top = max(top, rows.abs().max().item())
    return exponent_above(top, "the embedding table")
