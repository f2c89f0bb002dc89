"""F.linear(x, W) against (W x^T)^T (tsqp.server.products.linear_transposed) at 1-4 rows, for a
model's decode weight shapes, on 1 thread and on all: the table behind the server's choice of
operand order (docs/latency.md, "The weight as the left operand"). Random weights of each shape.

    .venv/bin/python scripts/product_order.py [--model DIR | --preset llama-3.2-1b] [--runs 7]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tsqp.config import load_config
from tsqp.models import cached_model
from tsqp.server.products import alternating_medians, linear_transposed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a model directory (only its config is read)")
    source.add_argument("--preset", default="llama-3.2-1b",
                        help="a preset, made once and cached (default llama-3.2-1b)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs of each order, alternating (default 7)")
    args = parser.parse_args()
    c = load_config(args.model or cached_model(args.preset))
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"q/k/v": (q + 2 * kv, c.hidden_size), "o": (c.hidden_size, q),
              "gate/up": (2 * c.intermediate_size, c.hidden_size), "down": (c.hidden_size, c.intermediate_size),
              "LM head": (c.vocab_size, c.hidden_size)}
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    print(f"ms, medians of {args.runs}: F.linear / (W x^T)^T")
    print("| weight | threads | 1 row | 2 rows | 3 rows | 4 rows |\n|---|---:|---|---|---|---|")
    with torch.inference_mode():
        for name, shape in shapes.items():
            weight = torch.randn(shape, generator=generator)
            for count in sorted({1, threads}):
                torch.set_num_threads(count)
                cells = []
                for rows in range(1, 5):
                    x = torch.randn(rows, shape[1], generator=generator)
                    plain, swapped = alternating_medians([lambda: F.linear(x, weight),
                                                          lambda: linear_transposed(x, weight)],
                                                         args.runs, time.perf_counter)
                    cells.append(f"{plain * 1e3:.2f} / {swapped * 1e3:.2f}")
                print(f"| {name} {list(shape)} | {count} | " + " | ".join(cells) + " |")
            torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
