"""A request checked against the method registry and the server's limits, in one pass, before
any work: header, method, args and their types, wire dtype, session name, tensor specs (count,
dtypes, ranks, sizes), the size of the reply it would produce, then payload bytes against shapes.
Every failure is a BadRequest subclass, whose code the error reply carries."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from .. import protocol
from ..config import ModelConfig
from ..protocol import DTYPES
from .errors import BadRequest, TooLarge, UnknownMethod
from .registry import ARG_TYPES, METHODS, Method

if TYPE_CHECKING:
    from ..shm import Attached, ReplyTo

MAX_ELEMENTS = 1 << 31  # per tensor; a guard against absurd shapes, not a tuning knob
REPLY_SPARE = 4  # the default reply limit holds this many of the model's longest honest replies
REPLY_CAP = 4 << 30  # and never more than the largest frame a server takes by default


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask, and on what sessions may keep between requests."""

    max_message_bytes: int = 4 << 30  # ZMQ_MAXMSGSIZE, per frame: ZeroMQ drops a peer that sends more
    max_elements: int = MAX_ELEMENTS  # per input tensor, and per output a request would produce
    max_reply_bytes: int | None = None  # what one request may produce, in its wire dtype (None: from the model)
    max_header_bytes: int = 64 << 10
    max_tensors: int = 9  # AttnGate: the residual and 8 causal blocks
    max_rank: int = 8
    max_session_chars: int = 128
    session_bytes: int = 2048 << 20  # all sessions' kept tensors together (least recently used go first)
    session_idle_s: float = 300.0  # a session unused this long is dropped


def honest_reply_bytes(config: ModelConfig) -> int:
    """The largest reply an honest TEE asks for, one sequence of the model's full length: the
    seed's Q·Kᵀ in float32 or, in private mode, every position's logits or a projection group in
    float64 (lean's causal score blocks are smaller than the seed's square)."""
    c, n = config, config.max_position_embeddings
    scores = c.num_heads * n * n * 4
    private = n * max(c.vocab_size, 2 * c.intermediate_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim) * 8
    return max(scores, private)


def default_reply_bytes(config: ModelConfig) -> int:
    return min(REPLY_SPARE * honest_reply_bytes(config), REPLY_CAP)


@dataclass
class Request:
    method: Method
    args: dict[str, Any]
    tensors: list[torch.Tensor]
    reply_to: "ReplyTo | None" = None  # the client's shared memory and where the reply may go


def check_request(frames: list[Any], config: ModelConfig, limits: Limits, shared: "Attached | None") -> Request:
    """Decode and check a request against its method's row and the limits, before any work."""
    if not frames:
        raise BadRequest("empty message")
    if len(frames) - 1 > limits.max_tensors:
        raise TooLarge(f"{len(frames) - 1} payload frames (limit {limits.max_tensors})")
    head = frames[0].buffer if hasattr(frames[0], "buffer") else memoryview(frames[0])
    if head.nbytes > limits.max_header_bytes:
        raise TooLarge(f"header of {head.nbytes} bytes (limit {limits.max_header_bytes})")
    header = protocol.decode_header(frames[0])
    name = header.get("method")
    row = METHODS.get(name) if isinstance(name, str) else None
    if row is None:
        raise UnknownMethod(f"unknown method {name!r}"[:200])
    args = header.get("args", {})
    if not isinstance(args, dict):
        raise BadRequest("'args' must be a map")
    check_args(row, args, limits)
    payloads, reply_to = _payloads(header, frames, shared, limits)
    specs = _check_specs(row, header.get("tensors", []), len(payloads) - 1, limits)
    shapes = [shape for _, shape in specs]
    _check_output(row, args, shapes, config, limits)
    tensors = [protocol.tensor_from_frame(DTYPES[name], shape, frame)  # payload bytes against shapes
               for (name, shape), frame in zip(specs, payloads[1:])]
    return Request(row, args, tensors, reply_to)


def check_args(row: Method, args: dict, limits: Limits) -> None:
    """Types of every known field, the method's required ones, its wire dtype, the session name."""
    for name, value in args.items():
        types = ARG_TYPES.get(name)
        if types and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            wanted = " or ".join(t.__name__ for t in types)
            raise BadRequest(f"'{name}' must be {wanted}, got {type(value).__name__}")
    for spellings in row.required:
        if spellings[0] not in args and not any(s in args for s in spellings[1:]):
            raise BadRequest(f"{row.name} needs '{spellings[0]}'")
    if "wire_dtype" in args and args["wire_dtype"] not in row.wire:
        raise BadRequest(f"unsupported wire_dtype {args['wire_dtype']!r} for {row.name} "
                         f"(choose from: {', '.join(row.wire)})")
    if "session" in args:
        session = args["session"]
        if not session:
            raise BadRequest("'session' must be a non-empty string")
        if len(session) > limits.max_session_chars:
            raise TooLarge(f"'session' longer than {limits.max_session_chars} characters")


def _check_specs(row: Method, specs: Any, payloads: int, limits: Limits) -> list[tuple[str, list[int]]]:
    """Tensor specs: count, dtype allow-list, rank, dims and element counts within limits; each
    one's dtype name and shape."""
    if not isinstance(specs, list) or len(specs) != payloads:
        raise BadRequest(f"header must list one spec per payload frame ({payloads} came)")
    if len(specs) < row.tensors if row.variadic else len(specs) != row.tensors:
        raise BadRequest(f"{row.name} expects {row.tensors}{' or more' if row.variadic else ''} tensor(s), "
                         f"got {len(specs)}")
    checked = []
    for item in specs:
        if not isinstance(item, dict) or item.get("dtype") not in row.dtypes:
            got = item.get("dtype") if isinstance(item, dict) else item
            raise BadRequest(f"{row.name} takes {' or '.join(row.dtypes)} tensors, got {str(got)[:40]!r}")
        shape, most = item.get("shape"), limits.max_elements
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d <= most for d in shape)):
            _refuse_shape(shape, most)
        if len(shape) > limits.max_rank:
            raise TooLarge(f"tensor of rank {len(shape)} (limit {limits.max_rank})")
        if math.prod(shape) > most:
            _refuse_shape(shape, most)
        checked.append((item["dtype"], shape))
    ranks = row.ranks
    if row.variadic and ranks:  # the last rank repeats
        ranks = ranks[:-1] + ranks[-1:] * (len(checked) - len(ranks) + 1)
    if ranks is not None and [len(s) for _, s in checked] != list(ranks):
        raise BadRequest(f"{row.name} expects tensors of rank {list(ranks)}, got {[len(s) for _, s in checked]}")
    return checked


def _refuse_shape(shape: Any, most: int) -> NoReturn:
    """The error for a shape that failed the one-pass check: malformed, or too large."""
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest(f"bad tensor shape {str(shape)[:80]}")
    raise TooLarge(f"tensor of shape {shape} exceeds the limit of {most} elements")


def _check_output(row: Method, args: dict, shapes: list[list[int]], config: ModelConfig, limits: Limits) -> None:
    """A small request must not make a huge reply (LMHead rows, score blocks, ...): its elements,
    and its bytes in the wire dtype it asks for."""
    elements = row.output(config, args, shapes) if shapes and all(shapes) else 0  # else: the handler refuses
    if elements > limits.max_elements:
        raise TooLarge(f"{row.name} would produce {elements} elements (limit {limits.max_elements})")
    wire = args.get("wire_dtype", "float32")
    nbytes, most = elements * DTYPES[wire].itemsize, limits.max_reply_bytes
    if most is not None and nbytes > most:
        raise TooLarge(f"{row.name} would produce {nbytes} bytes of {wire} (limit {most} bytes: "
                       "serve --max-reply-mb)")


def _payloads(header: dict, frames: list[Any], shared: "Attached | None",
              limits: Limits) -> tuple[list[Any], "ReplyTo | None"]:
    """The header frame and the payload buffers: the frames that came, or locations in the
    client's shared memory (tsqp.shm) when the request says so and this server allows it."""
    spot = header.get("shm")
    if spot is None:
        return frames, None
    if shared is None:
        raise BadRequest("this server does not take payloads in shared memory (start it with --shm)")
    if not isinstance(spot, dict) or len(frames) != 1:
        raise BadRequest("'shm' must be {name, key, frames, reply_at}, with no payload frames")
    views, reply_to = shared.request(spot)  # the segment's key first, then every location
    if len(views) > limits.max_tensors:
        raise TooLarge(f"{len(views)} payloads (limit {limits.max_tensors})")
    return [frames[0], *views], reply_to
