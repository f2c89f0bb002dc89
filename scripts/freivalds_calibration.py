"""Reproduce the Freivalds calibration table of docs/security.md.

For products shaped like a llama-3.2-1b prefill's (and the tiny test model's), with random weights
W ~ N(0, 0.02) and activations whose rows have scales 0.3-3 and 1% outlier features at 100x, an
honest product (float32, or float64 with --dtype float64) is checked with the same code the TEE
runs (tsqp.tee.freivalds). It prints:

  - the worst honest residual over the trials, in units of the noise scale (tolerance: 50);
  - the smallest change to a single output element that the check catches, in units of rms(y):
    the range over trials (each trial: a random element, a fresh probe);
  - how often three changes spread over many elements are caught: one row scaled by 1.01, the
    whole output scaled by 1.001, and the same vector v added to every row, ‖v‖ = 0.1% of a
    row's norm (a shifted bias: rows cannot multiply the chances).

    .venv/bin/python scripts/freivalds_calibration.py [--trials 20] [--seed 0] [--only NAME] [--probes K]
                                                      [--dtype float32|float64]

--probes overrides the number of probes per module that the TEE draws (tsqp.tee.freivalds.PROBES, each
checking every row), e.g. `--only "k/v" --probes 1 --trials 300` against the default.

The seed fixes weights and activations; the probes come from os.urandom, as the TEE draws them,
so the figures move a little from run to run.
"""

from __future__ import annotations

import argparse
import math

import torch

from tsqp.tee.freivalds import PROBES, ROUNDOFF, VERIFY_TOLERANCE, freivalds_residual
from tsqp.tee.offline import module_secrets

SHAPES = [  # rows, in -> out, what it stands for
    (128, 2048, 8192, "gate/up"),
    (128, 8192, 2048, "down"),
    (512, 2048, 512, "k/v"),
    (40, 64, 176, "tiny"),
    (1, 2048, 128256, "LM head, last position"),
]
STEPS = torch.logspace(-14, 0, 281).tolist()  # single-element changes tried, in units of rms(y)


def activations(rows: int, width: int, g: torch.Generator) -> torch.Tensor:
    scales = 0.3 + 2.7 * torch.rand(rows, 1, generator=g)
    x = torch.randn(rows, width, generator=g) * scales
    outliers = torch.randperm(width, generator=g)[: max(1, width // 100)]
    x[:, outliers] *= 100.0
    return x


def smallest_caught(x, y, check, g: torch.Generator) -> float:
    """The smallest step (x rms(y)) at which a change to one random element of y is caught."""
    row, col = (int(torch.randint(0, n, (1,), generator=g)) for n in y.shape)
    rms = y.double().pow(2).mean().sqrt().item()

    def caught_at(step: float) -> bool:
        bad = y.clone()
        bad[row, col] += step * rms
        return check(bad) > VERIFY_TOLERANCE

    if not caught_at(STEPS[-1]):
        return math.inf
    low, high = 0, len(STEPS) - 1  # bisection: a larger change is never easier to miss
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if caught_at(STEPS[mid]) else (mid + 1, high)
    return STEPS[low]


def calibrate(rows: int, width: int, out: int, trials: int, probes_per_module: int | None, dtype: torch.dtype,
              g: torch.Generator) -> dict:
    weight = torch.randn(out, width, generator=g) * 0.02
    honest, caught, counts = 0.0, [], {"row": 0, "scale": 0, "shift": 0}
    for _ in range(trials):
        x = activations(rows, width, g).to(dtype)
        y = x @ weight.to(dtype).T  # the honest server
        _, probes = module_secrets(weight, None, None, probes_per_module or PROBES)  # as the TEE draws them

        def check(y: torch.Tensor) -> float:
            return freivalds_residual(x, y, probes, ROUNDOFF[dtype])

        honest = max(honest, check(y))
        caught.append(smallest_caught(x, y, check, g))
        bad_row = y.clone()
        bad_row[int(torch.randint(0, rows, (1,), generator=g))] *= 1.01
        shift = torch.randn(out, generator=g, dtype=dtype)
        shift *= 1e-3 * y.norm(dim=-1).mean() / shift.norm()
        counts["row"] += check(bad_row) > VERIFY_TOLERANCE
        counts["scale"] += check(y * 1.001) > VERIFY_TOLERANCE
        counts["shift"] += check(y + shift) > VERIFY_TOLERANCE
    return {"honest": honest, "caught": (min(caught), max(caught)), **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="trials per shape (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and activations (default 0)")
    parser.add_argument("--only", help="only the shapes whose name contains this (e.g. 'LM head')")
    parser.add_argument("--probes", type=int, help=f"probes per module (default {PROBES}, as the TEE draws them)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="the products' dtype (float64: private mode, or --verify-dtype float64)")
    args = parser.parse_args()
    if args.trials < 1 or (args.probes is not None and args.probes < 1):
        parser.error("--trials and --probes must be positive")
    if args.only and not any(args.only in name for *_, name in SHAPES):
        parser.error(f"--only {args.only!r} matches no shape (names: {', '.join(name for *_, name in SHAPES)})")
    g = torch.Generator().manual_seed(args.seed)
    print(f"{args.dtype} products, tolerance {VERIFY_TOLERANCE:g} x the noise scale, {args.trials} trials per "
          f"shape, probes per module: {args.probes or PROBES}\n")
    print("| rows × in → out | worst honest residual | single element caught from (× rms(y)) "
          "| one row × 1.01 caught | all × 1.001 caught | every row + v caught |")
    print("|---|---:|---:|---:|---:|---:|")
    for rows, width, out, name in SHAPES:
        if args.only and args.only not in name:
            continue
        r = calibrate(rows, width, out, args.trials, args.probes, getattr(torch, args.dtype), g)
        low, high = r["caught"]
        print(f"| {rows} × {width} → {out} ({name}) | {r['honest']:.2f} | {low:.0e} – {high:.0e} "
              + "".join(f"| {r[k]}/{args.trials} " for k in ("row", "scale", "shift")) + "|", flush=True)


if __name__ == "__main__":
    main()
