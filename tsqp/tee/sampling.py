"""Choosing the next token from logits, in the TEE: the server never sees these settings.

Greedy when temperature is 0; otherwise softmax(logits / temperature) restricted to the top k
tokens and to the smallest set whose probability reaches top_p, then one draw from a generator
the caller seeds (for reproducible runs) or that is seeded from os.urandom.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: from os.urandom

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:  # refuses NaN too
            raise InputError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.temperature == 0 and (self.top_k, self.top_p) != (None, None):
            raise InputError("--top-k and --top-p only apply when sampling (--temperature > 0); at 0 decoding "
                             "is greedy")

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator().manual_seed(seed)


def filtered_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """logits [batch, vocab] / temperature, with the tokens outside top-k and top-p at -inf."""
    scaled = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, sampling.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        ordered, order = torch.sort(scaled, dim=-1, descending=True)
        before = torch.softmax(ordered, dim=-1).cumsum(dim=-1) - torch.softmax(ordered, dim=-1)
        drop = before >= sampling.top_p  # the mass before a token already reaches top_p: not needed
        scaled = scaled.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return scaled


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """The next token of each sequence, [batch] int64, from logits [batch, vocab]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filtered_logits(logits, sampling), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
