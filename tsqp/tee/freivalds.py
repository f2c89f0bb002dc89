"""Verified mode: Freivalds' check of every outsourced product (see docs/security.md).

For `y = x W^T + b` the TEE holds, per call, PROBES secret probes `p` and their images `W^T p`
and `b.p` (made offline from its own weights) and checks `y p == x (W^T p) + b.p` in every row,
for every probe, within a floating-point tolerance: O(rows (in + out)) instead of the product's
O(rows in out). A mismatch raises IntegrityError naming the layer and module.
"""

from __future__ import annotations

import math

import torch

from ..errors import IntegrityError
from .masks import secure_uniform

# Freivalds tolerance, in units of the rounding noise an honest product carries:
# VERIFY_EPS * sqrt(in_features) * ||y||_2 per row (calibration in docs/security.md).
VERIFY_TOLERANCE = 50.0
# float32's unit roundoff: --verify takes float32 products only (a float64 wire in private mode,
# whose unmasking costs less than that). Fixed in the TEE, never taken from what the server says:
# at 16-bit roundoff the tolerance outgrows the changes it must catch.
VERIFY_EPS = 2.0 ** -24
# Freivalds probes per module, each checking every row: a change that one probe misses (a sum of
# its elements with secret signs that lands near zero) must slip past all of them.
PROBES = 4
FREIVALDS_BLOCK = 1 << 19  # float64 elements of y converted at once: 4 MB, cache-sized (docs/benchmarks.md)


def secure_probes(count: int, size: int) -> torch.Tensor:
    """`count` Freivalds probes [count, size]: random signs, magnitudes in [0.5, 1). Bounded away
    from zero so that any single changed element moves y.p by at least half its change."""
    u = secure_uniform((count, size))
    return torch.sign(u) * (0.5 + 0.5 * u.abs()) + (u == 0)


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
