"""The kernels of a LLaMA layer that are not projections, as plain functions over tensors.

The TEE runs them (RMSNorm, mask + softmax, SiLU; RoPE in the seed and guarded modes), and the
server applies the same RoPE in the lean protocol: both sides import them from here. They
reproduce `transformers`' Llama semantics in float32 (RMSNorm in fp32, rotate-half RoPE with
`attention_scaling`, causal mask, softmax in fp32, the SiLU of the gated MLP).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .config import RopeConfig


@dataclass(frozen=True)
class Normalized:
    """RMSNorm(h) = weight * (h * scale) in its two parts: `scale`, one number per row and the
    norm's only non-linear part, and the product, linear in h. A projection without bias of
    RMSNorm(h) is `scale` times the projection of weight * h, so a protocol may project before
    the scale is known and apply it after (lean's AttnGate); the others take `.value`."""

    h: torch.Tensor
    weight: torch.Tensor
    scale: torch.Tensor  # [..., 1]: rsqrt(mean(h^2) + eps)

    @property
    def value(self) -> torch.Tensor:
        return self.weight * (self.h * self.scale)


def rms_normalize(h: torch.Tensor, weight: torch.Tensor, eps: float) -> Normalized:
    return Normalized(h, weight, torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_normalize(x, weight, eps).value


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scaling for the model's rope type."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, rope)
    return inv_freq, 1.0


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, scaling: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [..., seq, head_dim] for the given positions."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim] with cos/sin [seq, head_dim], or any layout they broadcast
    against (the server rotates [batch, seq, heads, head_dim] with [seq, 1, head_dim])."""
    return x * cos + rotate_half(x) * sin


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[b, n, heads * d] -> [b, heads, n, d]."""
    b, n, width = x.shape
    return x.view(b, n, width // head_dim, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[b, heads, n, d] -> [b, n, heads * d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, kv_heads, n, d] -> [b, kv_heads * groups, n, d]: each key/value head serves `groups` query heads."""
    if groups == 1:
        return x
    b, kv, n, d = x.shape
    return x[:, :, None].expand(b, kv, groups, n, d).reshape(b, kv * groups, n, d)


# Under these sizes one thread beats waking a second (docs/latency.md): a CPU worker that sleeps
# between parallel regions, as OMP_WAIT_POLICY=PASSIVE has them, takes ~50 µs to wake, while ATen
# splits a batched matmul over its batch, and a softmax over its rows, at sizes far below that.
SMALL_PRODUCT = 1 << 22  # multiply-adds
SMALL_SOFTMAX = 1 << 18  # scores
DECODE_ROWS = 4  # a decode step's rows (batch x new tokens) at most, where a server may run its products alone


def on_one_thread(fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
    """fn(*args, **kwargs) with torch's intra-op threads set to 1 for the call (0.2 µs to toggle).
    Under OpenMP, torch's CPU build, the count is the calling thread's own: a server thread in
    the client's process keeps its own."""
    threads = torch.get_num_threads()
    if threads == 1:
        return fn(*args, **kwargs)
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def alone_if(alone: bool, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """fn(*args), on the calling thread alone where `alone` (a decode step's call on a server
    that measured it as fast: tsqp.server.model.Fused)."""
    return on_one_thread(fn, *args) if alone else fn(*args)


def batched_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a [..., n, k] and b [..., k, m], on the calling thread alone when the product is
    small (a decode step's Q·K^T or P·V)."""
    batch = max(a.shape[:-2].numel(), b.shape[:-2].numel())  # the broadcast batch, at least
    if a.is_cpu and batch * a.shape[-2] * a.shape[-1] * b.shape[-1] < SMALL_PRODUCT:
        return on_one_thread(torch.matmul, a, b)
    return torch.matmul(a, b)


def causal_scores(q: torch.Tensor, keys: torch.Tensor, ends: list[int], start: int = 0) -> list[torch.Tensor]:
    """Q·K^T in causal query blocks, with K not expanded for GQA (each group of query heads
    shares its key head). q [b, heads, n, d] holds the queries at positions [start, start + n),
    keys [b, kv, >= start + n, d] every key so far; block i is [b, heads, e_i - e_(i-1), start + e_i]."""
    b, heads, n, d = q.shape
    kv = keys.shape[1]
    grouped = q.reshape(b, kv, heads // kv, n, d)
    transposed = keys.transpose(-1, -2)  # [b, kv, d, m]
    # a group's query rows stacked against their one key head: a plain batched matmul, where
    # broadcasting K over the group would copy it once per query head
    return [batched_matmul(grouped[..., a:e, :].reshape(b, kv, -1, d), transposed[..., : start + e])
            .reshape(b, heads, e - a, start + e) for a, e in zip([0, *ends], ends)]


@dataclass(frozen=True)
class ScoreBlock:
    """A causal block of Q·K^T [b, heads, n, m] and the factor its scores still need besides
    1/sqrt(d): none, or (lean) each query's RMSNorm scale times each key's, [b, 1, n, m], for
    rows projected before the scale (Q·K^T is linear in each row of either). The softmax applies
    it in the same pass as the mask."""

    scores: torch.Tensor
    factor: torch.Tensor | None = None


def score_blocks(blocks: list[torch.Tensor], query_scale: torch.Tensor | None = None,
                 key_scale: torch.Tensor | None = None) -> list[ScoreBlock]:
    """`causal_scores`' blocks, with the factors of rows projected before RMSNorm's scale when
    given: query_scale [b, n, 1] for the window's queries, key_scale [b, >= m] for every key so far."""
    if query_scale is None or key_scale is None:
        return [ScoreBlock(block) for block in blocks]
    b, begin, out = query_scale.shape[0], 0, []
    for block in blocks:
        n, m = block.shape[2], block.shape[3]
        rows = query_scale[:, begin: begin + n].reshape(b, 1, n, 1)
        out.append(ScoreBlock(block, rows * key_scale[:, None, None, :m]))
        begin += n
    return out


def attend(probs: list[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """P·V for the causal blocks of `causal_scores`, with V [b, kv, m, d] not expanded for GQA:
    [b, heads, n, d]."""
    b, kv, _, d = values.shape
    heads = probs[0].shape[1]
    outs = [batched_matmul(p.reshape(b, kv, -1, p.shape[3]), values[:, :, : p.shape[3]])
            .reshape(b, kv, heads // kv, p.shape[2], d) for p in probs]  # stacked like the scores, for the same reason
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)).reshape(b, heads, -1, d)


def query_blocks(n: int, block: int = 32, max_blocks: int = 8) -> list[int]:
    """Ends of the query blocks that causal attention is cut into. Block i needs keys [0, end_i)
    only, so scores and probabilities shrink toward half the n x n square as blocks get finer
    (8 blocks: 9/16 of it). At most 8 blocks of at least 32 queries: finer ones cost more calls'
    worth than they save (docs/benchmarks.md)."""
    count = min(max_blocks, max(1, n // block))
    return [round(n * (i + 1) / count) for i in range(count)]


@functools.lru_cache(maxsize=64)
def _causal_bias(n: int, m: int) -> torch.Tensor:
    """0 where a query may look, -inf on a key in its future: the last n queries of m positions."""
    future = torch.ones(n, m, dtype=torch.bool).triu(m - n + 1)
    return torch.zeros(n, m).masked_fill_(future, float("-inf"))


def causal_softmax(scores: torch.Tensor, scaling: float, factor: torch.Tensor | None = None) -> torch.Tensor:
    """Scale, hide future keys, softmax in fp32. scores: [b, heads, n_query, n_key], the queries
    being the last n_query of the n_key positions (a causal block); factor: one per score besides
    `scaling`, broadcast against them ([b, 1, n_query, n_key]; ScoreBlock). Scaling and masking
    are one pass (bias + scaling * scores), bit-identical to scaling then filling with -inf."""
    n, m = scores.shape[-2:]
    if factor is None:
        masked = torch.add(_causal_bias(n, m), scores, alpha=scaling)
    else:
        masked = torch.addcmul(_causal_bias(n, m), scores, factor, value=scaling)
    if masked.is_cpu and masked.numel() < SMALL_SOFTMAX:
        return on_one_thread(F.softmax, masked, dim=-1, dtype=torch.float32)
    return F.softmax(masked, dim=-1, dtype=torch.float32)


def silu(gate: torch.Tensor) -> torch.Tensor:
    """The MLP's non-linearity; the product with up that follows is linear in up."""
    return F.silu(gate)
