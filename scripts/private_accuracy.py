"""Private mode's logits error against the model run whole, with and without rounding x to the
mask's grid (docs/security.md, "The cost of the rounding").

    .venv/bin/python scripts/private_accuracy.py tiny 64
    .venv/bin/python scripts/private_accuracy.py llama-3.2-1b 32      # makes the preset once (2.5 GB)

Starts a CPU server, runs three private prefills per variant, every position, and prints
max|Δ|/max|ref| for each. "unrounded" reverts the fix for the measurement only.
"""

from __future__ import annotations

import argparse

import torch

from tsqp import api
from tsqp.models import PRESETS, cached_model
from tsqp.tee import masks
from tsqp.transport import Client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("tokens", type=int)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.tokens < 1 or args.runs < 1:
        parser.error("tokens and --runs must be positive")
    model = cached_model(args.preset)
    vocab = PRESETS[args.preset]["vocab_size"]
    ids = torch.randint(0, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    rounded = masks.quantize_to_grid
    with api.spawn_server(model, device="cpu") as server:
        with Client(server.endpoint, timeout_s=600) as client:
            reference = client.call("Whole", [ids], all_positions=True).tensors[0].float()
        for label, quantize in (("rounded to the grid", rounded), ("unrounded (before the fix)", lambda x, g: x)):
            masks.quantize_to_grid = quantize
            runner = api.connect(server.endpoint, model, protection="private")
            errors = []
            for _ in range(args.runs):
                logits = runner.prefill(ids, all_positions=True).logits
                errors.append(((logits - reference).abs().max() / reference.abs().max()).item())
            runner.client.close()
            print(f"{args.preset}, {args.tokens} tokens, {label}: max|Δ|/max|ref| = "
                  + ", ".join(f"{e:.2e}" for e in errors), flush=True)
    masks.quantize_to_grid = rounded


if __name__ == "__main__":
    main()
