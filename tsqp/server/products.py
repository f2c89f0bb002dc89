"""How a decode-sized product runs fastest on this server's CPU, measured once at load.

A decode step multiplies a few rows by each weight, and streams the weight once doing it. Two
choices change its speed without changing what it computes (docs/latency.md): the threads it
runs on (on a small host one core streams a weight through F.linear as fast as all of them, and
leaves the others to the TEE's spin), and the order of its operands (x W^T or (W x^T)^T: at 2-3
rows MKL reads the weight once per row in the first, once in all in the second). The order is
measured on the threads the first choice gave. Neither is a choice on a GPU.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..ops import DECODE_ROWS, SMALL_PRODUCT, alone_if

Clock = Callable[[], float]


def linear_transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) as (weight @ x^T)^T: the weight as the product's left operand.
    The same sums in another order, so equal to F.linear's within float rounding, not bitwise."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.mm(weight, rows.T).T.contiguous()
    if bias is not None:
        out.add_(bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def alternating_medians(fns: list[Callable[[], object]], runs: int, clock: Clock) -> list[float]:
    """Each fn's median seconds over `runs` runs, the fns taking turns (so that a host's drift
    hits them alike) after a first round that warms up."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs + 1):
        for fn, seconds in zip(fns, times):
            start = clock()
            fn()
            seconds.append(clock() - start)
    return [statistics.median(seconds[1:]) for seconds in times]


def one_thread_keeps_up(weight: torch.Tensor, rows: int = DECODE_ROWS, runs: int = 5,
                        clock: Clock = time.perf_counter) -> bool:
    """Whether a product of `rows` rows with `weight` takes no longer (within 5 %) on the calling
    thread alone than on torch's threads, medians of `runs` alternating runs of each. A decode
    step's products stream their weights once and are bound by memory, which one core of a small
    host can keep busy alone; a many-core host's bus may need them all. Never on a GPU, with
    one thread, or for a product too small to be worth measuring."""
    if not weight.is_cpu or torch.get_num_threads() == 1 or rows * weight.numel() < SMALL_PRODUCT:
        return False
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    with torch.inference_mode():
        alone, shared = alternating_medians([lambda: alone_if(True, F.linear, x, weight),
                                             lambda: F.linear(x, weight)], runs, clock)
    return alone <= 1.05 * shared


def transposed_rows(weights: Sequence[tuple[torch.Tensor, torch.Tensor | None]], rows_alone: int, runs: int = 3,
                    clock: Clock = time.perf_counter) -> frozenset[int]:
    """The row counts, 2 to DECODE_ROWS, at which linear_transposed beats F.linear by 5 % or more
    for products with `weights` (one shape's weight and bias in each layer), each measured on the
    threads its product will run on (alone up to `rows_alone`, as Fused.product runs it). Each
    run takes the next weight in turn, so that it reads its weight from memory, as a served step
    does, and not from the cache the last run left it in. None on a GPU, or for a product too
    small to be worth measuring. One row stays F.linear's: faster in isolation at some shapes,
    the swap made a served 1B decode step no faster (docs/latency.md)."""
    weight = weights[0][0]
    if not weight.is_cpu:
        return frozenset()
    faster, turns = set(), itertools.cycle(weights)
    with torch.inference_mode():
        for rows in range(2, DECODE_ROWS + 1):
            if rows * weight.numel() < SMALL_PRODUCT:
                continue
            x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
            alone = rows <= rows_alone
            plain, transposed = alternating_medians([lambda fn=fn: alone_if(alone, fn, x, *next(turns))
                                                     for fn in (F.linear, linear_transposed)], runs, clock)
            if transposed <= 0.95 * plain:
                faster.add(rows)
    return frozenset(faster)
