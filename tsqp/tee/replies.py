"""What the TEE checks of every reply before it uses it: the server is not trusted to get even
the shapes right, and a NaN or infinity it sends would otherwise flow into the logits."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import IntegrityError, ProtocolError

# Servers whose replies failed an integrity check in this process, refused for the rest of it:
# each failed run would otherwise be one more try at whatever the server wants to learn or do.
_refused: set[str] = set()


def refuse(endpoint: str) -> None:
    _refused.add(endpoint)


def check_not_refused(endpoint: str) -> None:
    if endpoint in _refused:
        raise IntegrityError(f"refusing the GPU server at {endpoint}: it failed an integrity check earlier in "
                             "this process")


def checked_reply(tensors: Sequence[torch.Tensor], expect: Sequence[tuple[int, ...]], what: str,
                  error: type[Exception] = ProtocolError) -> list[torch.Tensor]:
    """`tensors` as float32 if they are floating-point tensors of the `expect`ed shapes and
    finite; else `error` naming `what` (a method, and its layer)."""
    check_shapes(tensors, expect, what, error)
    out = [t if t.dtype == torch.float32 else t.float() for t in tensors]
    check_finite(out, what, error)
    return out


def check_shapes(tensors: Sequence[torch.Tensor], expect: Sequence[tuple[int, ...]], what: str,
                 error: type[Exception] = ProtocolError) -> None:
    shapes = [tuple(t.shape) for t in tensors]
    if shapes != [tuple(s) for s in expect] or not all(t.is_floating_point() for t in tensors):
        raise error(f"the server's {what} reply holds {len(shapes)} tensor(s) of shapes {[list(s) for s in shapes]}, "
                    f"expected float tensors of {[list(s) for s in expect]}")


def check_finite(tensors: Sequence[torch.Tensor], what: str, error: type[Exception] = ProtocolError) -> None:
    """One reduction per tensor, and their total: only a non-finite total (NaN, infinity, or a
    sum that overflows) looks at every element."""
    if math.isfinite(sum(t.sum().item() for t in tensors)):
        return
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise error(f"the server's {what} reply holds NaN or infinity")
