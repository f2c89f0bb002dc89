"""What a server can change under --verify without being caught, and what that does to the tokens
(docs/security.md, "What the check lets through").

At the LM head of llama-3.2-1b widths (2048 -> 128,256, W ~ N(0, 0.02), rows of x ~ N(0, 1) as
after the final RMSNorm), a server that knows x and W (verify-only mode sends x in clear) moves
the two leading logits toward each other by a fraction of what it estimates the check lets
through, and so flips the greedy token wherever their gap is smaller. For float32 and float64
products it prints: the change as a fraction of the row's norm, its effect on the gap between the
two leading logits (in units of the logits' rms), how many greedy tokens it flips and how many
attempts the TEE's check caught, next to how many greedy tokens honest float32 rounding itself
changes (against the float64 product).

    .venv/bin/python scripts/verify_budget.py [--rows 64] [--budget 0.35] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from tsqp.tee.freivalds import PROBES, ROUNDOFF, VERIFY_TOLERANCE, freivalds_residual
from tsqp.tee.offline import module_secrets

IN, VOCAB = 2048, 128256


def attack(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, roundoff: float, budget: float) -> torch.Tensor:
    """y with its two leading logits per row moved toward each other by `budget` of the server's
    estimate of the tolerance (E[p^2] = 7/12 for the secret probes)."""
    spread = (x.double().square() @ weight.double().square().T * 7 / 12).sum(-1).sqrt() * IN ** 0.5
    step = (budget * VERIFY_TOLERANCE * roundoff * spread).to(y.dtype)
    top = y.topk(2, dim=-1).indices
    rows = torch.arange(y.shape[0])
    bad = y.clone()
    bad[rows, top[:, 0]] -= step
    bad[rows, top[:, 1]] += step
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="random final hidden states tried (default 64)")
    parser.add_argument("--budget", type=float, default=0.35, help="fraction of the estimated tolerance spent")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.rows < 1 or not 0 < args.budget:
        parser.error("--rows and --budget must be positive")
    g = torch.Generator().manual_seed(args.seed)
    weight = torch.randn(VOCAB, IN, generator=g) * 0.02
    x = torch.randn(args.rows, IN, generator=g)
    exact = x.double() @ weight.double().T
    honest32 = x @ weight.T
    rounding_flips = int((honest32.argmax(-1) != exact.argmax(-1)).sum())
    print(f"honest float32 rounding changes {rounding_flips} of {args.rows} greedy tokens (against float64)")
    print("| products | change / ‖y‖ per row | effect on the top-2 gap (× rms of logits) "
          "| greedy tokens flipped unseen | attempts caught |")
    print("|---|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.float64):
        xd, y = x.to(dtype), exact.to(dtype)
        bad = attack(xd, y, weight, ROUNDOFF[dtype], args.budget)
        change = ((bad - y).double().norm(dim=-1) / y.double().norm(dim=-1)).max().item()
        gap_effect = ((bad - y).double().abs().max(dim=-1).values * 2 / exact.std(dim=-1)).max().item()
        flipped = caught = 0
        _, all_checks = module_secrets(weight, None, None, PROBES * args.rows)  # fresh probes for every call
        for row in range(args.rows):
            checks = all_checks.part(row, PROBES)
            if freivalds_residual(xd[row: row + 1], bad[row: row + 1], checks, ROUNDOFF[dtype]) > VERIFY_TOLERANCE:
                caught += 1
            elif int(bad[row].argmax()) != int(y[row].argmax()):
                flipped += 1
        print(f"| {str(dtype).replace('torch.', '')} | {change:.1e} | {gap_effect:.1e} | {flipped} / {args.rows} "
              f"| {caught} / {args.rows} |", flush=True)


if __name__ == "__main__":
    main()
