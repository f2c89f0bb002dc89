"""Verified mode: Freivalds' check of every outsourced product (see docs/security.md).

For `y = x W^T + b` the TEE holds, per call, PROBES secret probes `p` and what it precomputed
of them offline from its own weights: `W^T p`, `b.p`, and `(W∘W)^T (p∘p)`, the scale of the
rounding noise an honest product carries into `y.p`. Every row is checked against every probe,

    | y.p - x.(W^T p) - b.p |  <=  VERIFY_TOLERANCE * u * (sqrt(in) sqrt((x∘x).((W∘W)^T (p∘p))) + |b∘p|)

with `u` the unit roundoff of the products' dtype: O(rows (in + out)) instead of O(rows in out).
The tolerance is made of values the TEE holds (x, W, b, p), never of the server's reply, so a
server cannot widen it. In private mode the check runs on the masked product the server
computed (x is then the masked input): whether it passes depends on nothing the server does not
see but the fresh probes, so an abort tells it nothing about the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import IntegrityError
from .masks import secure_uniform

# The tolerance, in units of the noise scale above (calibration: docs/security.md).
VERIFY_TOLERANCE = 50.0
# Unit roundoff of the products checked, fixed in the TEE, never taken from the server's word.
ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
# Freivalds probes per module, each checking every row: a change that one probe misses (a sum of
# its elements with secret signs that lands near zero) must slip past all of them.
PROBES = 4
FREIVALDS_BLOCK = 1 << 19  # float64 elements of y converted at once: 4 MB, cache-sized (docs/benchmarks.md)


@dataclass
class ProbeSet:
    """One module's secret probes for one call, and their images, made offline."""

    probes: torch.Tensor  # P [k, out], float64
    images: torch.Tensor  # P W [k, in]
    biases: torch.Tensor  # P b [k]
    squares: torch.Tensor  # (P∘P)(W∘W) [k, in]
    bias_squares: torch.Tensor  # (P∘P)(b∘b) [k]

    def part(self, index: int, size: int) -> "ProbeSet":
        """Probes [index * size, (index + 1) * size): one call's share of a batch made in one pass."""
        part = slice(index * size, (index + 1) * size)
        return ProbeSet(self.probes[part], self.images[part], self.biases[part], self.squares[part],
                        self.bias_squares[part])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.probes, self.images, self.biases, self.squares, self.bias_squares))


def secure_probes(count: int, size: int) -> torch.Tensor:
    """`count` Freivalds probes [count, size]: random signs, magnitudes in [0.5, 1). Bounded away
    from zero so that any single changed element moves y.p by at least half its change."""
    u = secure_uniform((count, size))
    return torch.sign(u) * (0.5 + 0.5 * u.abs()) + (u == 0)


def noise_scale(x: torch.Tensor, checks: ProbeSet, roundoff: float) -> torch.Tensor:
    """[k, rows]: the rounding noise an honest product of x (float64 [rows, in]) carries into y.p."""
    spread = torch.sqrt(checks.squares @ (x * x).T).mul_(math.sqrt(x.shape[-1]))
    return spread.add_(torch.sqrt(checks.bias_squares)[:, None]).mul_(roundoff).add_(1e-300)


def freivalds_residual(x: torch.Tensor, y: torch.Tensor, checks: ProbeSet, roundoff: float) -> float:
    """max over rows i and probes j of |y_i p_j - x_i (W^T p_j) - b.p_j| in units of `noise_scale`.

    A large y is converted to float64 a block of rows at a time, in one reused buffer that stays
    in cache, and that one pass serves every probe (a [k, out] x [out, rows] product)."""
    x2, y2 = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1])
    rows, width = y2.shape
    expected = torch.addmm(checks.biases[:, None], checks.images, x2.T)  # [k, rows]
    if rows * width <= FREIVALDS_BLOCK:  # a decode step's reply: one conversion, one product
        dots = checks.probes @ y2.double().T
    else:
        dots = torch.empty(len(checks.probes), rows, dtype=torch.float64)
        step = max(1, FREIVALDS_BLOCK // width)
        block = torch.empty(step, width, dtype=torch.float64) if y2.dtype != torch.float64 else None
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            part = y2[start:stop]  # a float64 reply is read in place
            if block is not None:
                part = block[: stop - start].copy_(part)
            torch.mm(checks.probes, part.T, out=dots[:, start:stop])
    residual = dots.sub_(expected).abs_().div_(noise_scale(x2, checks, roundoff)).max().item()
    return residual if math.isfinite(residual) else math.inf  # NaN or infinity in a reply: never honest


def freivalds_check(x: torch.Tensor, y: torch.Tensor, checks: ProbeSet, roundoff: float, where: str) -> None:
    """Raise IntegrityError unless y = x W^T + b passes every probe, in every row."""
    worst = freivalds_residual(x, y, checks, roundoff)
    if not worst <= VERIFY_TOLERANCE:  # `not <=` also catches NaN
        raise IntegrityError(f"integrity check failed at {where}: the server's result is wrong "
                             f"(Freivalds residual {worst:.1f} > {VERIFY_TOLERANCE:g} x rounding noise); "
                             "no logits returned")
