"""Keys and values of one batch of sequences, preallocated to a capacity and written by position.

Both sides keep one: the TEE where it computes attention itself (the seed protocol, the guarded
modes), the server where it does (the lean protocol). Writes go to explicit positions, never by
appending, so a call that is sent twice writes the same slots twice and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Post-RoPE K and V per layer, each [batch, kv_heads, capacity, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    filled: list[int]  # per layer: positions [0, filled) hold keys and values

    @classmethod
    def allocate(cls, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        shape = (batch, kv_heads, capacity, head_dim)
        return cls(keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                   values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                   filled=[0] * layers)

    @staticmethod
    def nbytes_for(layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, itemsize: int = 4) -> int:
        return 2 * layers * batch * kv_heads * capacity * head_dim * itemsize

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def check_room(self, layer: int, start: int, count: int) -> str | None:
        """Why positions [start, start + count) cannot be written now, or None."""
        if start < 0 or start + count > self.capacity:
            return f"positions [{start}, {start + count}) lie outside the cache's {self.capacity}"
        if start > self.filled[layer]:
            return f"position {start} would leave a gap: layer {layer} holds positions [0, {self.filled[layer]})"
        return None

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [batch, kv_heads, n, head_dim] at positions [start, start + n); return every
        key and value up to there. The caller checked the room (`check_room`)."""
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.filled[layer] = max(self.filled[layer], end)
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
