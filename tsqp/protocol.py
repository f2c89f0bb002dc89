"""The wire format: one small msgpack header frame, then one raw frame per tensor.

Request:  [header, *tensor frames]   header = {"method": str, "args": {...}, "tensors": [spec...]}
Reply:    [header, *tensor frames]   header = {"ok": True, "tensors": [spec...], "server_s": float}
          [header]                   header = {"ok": False, "error": {"code": str, "message": str}}

A tensor spec is {"dtype": name, "shape": [...]}; the payload frame holds its bytes in C order.
Payloads never go through msgpack or Python lists: a frame is the tensor's own buffer
(zero-copy on send), and a received frame becomes a tensor without a copy.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np
import torch

from .errors import ProtocolError

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,  # one-time-masked activations (private mode)
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
WIRE_DTYPES = ("float32", "float16", "bfloat16")

# Numpy has no bfloat16: such payloads are carried as int16 and reinterpreted.
_NUMPY_CARRIER = {torch.bfloat16: torch.int16}
_ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in DTYPES.values()}
# A received frame is read-only and a tensor over it is never written to, so it is used without a
# copy; torch's warning about that, silenced once here (a catch_warnings per tensor cost ~10 µs).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
_NUMPY_DTYPE = {dtype: torch.empty((), dtype=_NUMPY_CARRIER.get(dtype, dtype)).numpy().dtype
                for dtype in DTYPES.values()}


@dataclass
class Message:
    """A decoded message: its header fields and its tensors, in order."""

    header: dict[str, Any]
    tensors: list[torch.Tensor] = field(default_factory=list)


def tensor_spec(t: torch.Tensor) -> dict[str, Any]:
    if t.dtype not in DTYPE_NAMES:
        raise ProtocolError(f"dtype {t.dtype} cannot travel on the wire")
    return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}


def tensor_frame(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a buffer ZeroMQ can send without copying."""
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    carrier = _NUMPY_CARRIER.get(t.dtype)
    array = (t.view(carrier) if carrier else t).numpy()
    return memoryview(array.reshape(-1).view(np.uint8))


def encode_header(header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> bytes:
    """The header frame, listing `tensors`' specs (their payloads travel separately)."""
    return msgpack.packb(dict(header, tensors=[tensor_spec(t) for t in tensors]), use_bin_type=True)


def encode(header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> list[Any]:
    return [encode_header(header, tensors), *(tensor_frame(t) for t in tensors)]


def _frame_buffer(frame: Any) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def decode(frames: Sequence[Any], max_elements: int | None = None) -> Message:
    """Parse and validate a message; raises ProtocolError naming what is wrong."""
    if not frames:
        raise ProtocolError("empty message")
    return decode_payloads(decode_header(frames[0]), frames, max_elements)


def decode_header(frame: Any) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(_frame_buffer(frame), raw=False, strict_map_key=True)
    except Exception as err:
        raise ProtocolError(f"header is not valid msgpack: {err}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    return header


def decode_payloads(header: dict[str, Any], frames: Sequence[Any], max_elements: int | None = None) -> Message:
    """The tensors of a message whose header is already parsed, checked against their specs."""
    specs = header.get("tensors", [])
    if not isinstance(specs, list):
        raise ProtocolError("'tensors' must be a list")
    if len(specs) != len(frames) - 1:
        raise ProtocolError(f"header lists {len(specs)} tensors but {len(frames) - 1} payload frames came")
    tensors = [_tensor_from_frame(spec, frame, max_elements) for spec, frame in zip(specs, frames[1:])]
    return Message(header=header, tensors=tensors)


def _tensor_from_frame(spec: Any, frame: Any, max_elements: int | None) -> torch.Tensor:
    if not isinstance(spec, dict):
        raise ProtocolError("tensor spec must be a map")
    dtype = DTYPES.get(spec.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise ProtocolError(f"unsupported dtype {spec.get('dtype')!r} (allowed: {', '.join(DTYPES)})")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):  # bool is no dim
        raise ProtocolError(f"bad tensor shape {shape!r}")
    numel = math.prod(shape)  # Python ints: no overflow, however absurd the shape
    if max_elements is not None and numel > max_elements:
        raise ProtocolError(f"tensor of {numel} elements exceeds the limit of {max_elements}")
    return tensor_from_frame(dtype, shape, frame)


def tensor_from_frame(dtype: torch.dtype, shape: list[int], frame: Any) -> torch.Tensor:
    """The tensor a payload frame holds, for a spec already checked (a known dtype, a list of
    non-negative ints): only the byte count is checked here."""
    buffer = _frame_buffer(frame)
    if buffer.nbytes != math.prod(shape) * _ITEMSIZE[dtype]:
        raise ProtocolError(f"payload of {buffer.nbytes} bytes does not match {DTYPE_NAMES[dtype]}{shape}")
    # shaped by numpy, whose reshape costs a third of torch's at a decode step's sizes
    tensor = torch.from_numpy(np.frombuffer(buffer, dtype=_NUMPY_DTYPE[dtype]).reshape(shape))
    return tensor.view(dtype) if dtype in _NUMPY_CARRIER else tensor


def frames_nbytes(frames: Sequence[Any]) -> int:
    return sum(_frame_buffer(f).nbytes for f in frames)


def error_header(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}
