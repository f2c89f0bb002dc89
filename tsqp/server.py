"""The GPU side: holds the weights on its device and answers one method per request.

It is untrusted: it sees what it is sent and computes the linear algebra. Every request is
checked before it touches the model (method, fields, dtypes, shapes against bytes, sizes of
inputs and outputs, finite values, layer and module names); any failure becomes an error reply
with a code, and the loop never dies on a bad request.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from . import protocol
from .config import ModelConfig, load_config
from .errors import ModelError, ProtocolError, TsqpError
from .logs import log_event
from .protocol import DTYPES, LINEAR_MODULES, WIRE_DTYPES
from .shm import Attached, ReplyTo
from .staging import to_device, to_host
from .ops import apply_rope  # the same rotation the TEE applies in the seed protocol
from .transport import DEFAULT_HEARTBEAT_S, Handler, current_peer, is_loopback, serve_forever

if TYPE_CHECKING:
    from .keys import ServerKeys

MAX_ELEMENTS = 1 << 31  # per tensor; a guard against absurd shapes, not a tuning knob
MAX_SESSIONS = 64  # sessions whose tensors (V, up) the lean protocol keeps between calls

log = logging.getLogger("tsqp.server")


class BadRequest(Exception):
    """The request is well-formed on the wire but asks for something invalid."""

    code = "bad_request"


class MissingState(BadRequest):
    """A lean call needs state an earlier call left here (V, up), and it is gone: the server
    restarted, or dropped the session for 64 newer ones, or the call skipped its predecessor."""

    code = "missing_state"


class UnknownMethod(BadRequest):
    code = "unknown_method"


class TooLarge(BadRequest):
    """An input or the output it would produce exceeds the server's limits."""

    code = "too_large"


class NonFinite(BadRequest):
    """A floating-point input holds NaN or infinity: no honest TEE sends one."""

    code = "non_finite"


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask; a larger one gets `too_large` before any work."""

    max_message_bytes: int = 4 << 30  # ZMQ_MAXMSGSIZE, per frame: ZeroMQ drops a peer that sends more
    max_elements: int = MAX_ELEMENTS  # per input tensor, and per output a request would produce
    max_header_bytes: int = 64 << 10
    max_tensors: int = 8
    max_rank: int = 8
    max_session_chars: int = 128


@dataclass
class ServiceState:
    """Limits and counters of the serving side, for health replies and the stop log line."""

    limits: Limits = field(default_factory=Limits)
    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    errors: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class MethodSpec:
    """What a method must be sent: how many tensors, of which dtypes, and which args."""

    tensors: int
    dtypes: tuple[str, ...] = WIRE_DTYPES
    required: tuple[tuple[str, ...], ...] = ()  # each entry: accepted spellings of one field
    ranks: tuple[int, ...] | None = None  # exact rank of each tensor, where the method relies on it
    variadic: bool = False  # `tensors` is a minimum; then every tensor has rank ranks[0]


LAYER, MODULE, SESSION = ("layer_idx", "layer"), ("module_name", "module"), ("session",)
IDS = ("int64",)
FLOAT_DTYPES = tuple(name for name, dtype in DTYPES.items() if dtype.is_floating_point)
# Methods absent from this table (newer ones) still get the generic checks: dtype allow-list,
# shapes against bytes, sizes; their handlers check the rest.
METHOD_SPECS: dict[str, MethodSpec] = {
    "Ping": MethodSpec(0),
    "Init": MethodSpec(0),
    "Embedding": MethodSpec(1, IDS, ranks=(2,)),
    "Linear": MethodSpec(1, required=(LAYER, MODULE)),
    "Matmul": MethodSpec(2),
    "LMHead": MethodSpec(1),
    # x [b, n, hidden], cos and sin [n, head_dim]; V is kept as [b, kv, n, d] for AttnOut
    "QKVScores": MethodSpec(3, required=(LAYER, SESSION), ranks=(3, 2, 2)),
    "AttnOut": MethodSpec(1, required=(LAYER, SESSION), ranks=(4,), variadic=True),  # one per causal block
    "Gate": MethodSpec(1, required=(LAYER, SESSION)),  # returns gate; up is kept for GatedDown
    "GatedDown": MethodSpec(1, required=(LAYER, SESSION)),
    "Linears": MethodSpec(1, FLOAT_DTYPES, required=(("modules",),)),
    "Whole": MethodSpec(1, IDS, ranks=(2,)),
}
# Types of the args a client may send; others are ignored (older servers ignore newer fields).
ARG_TYPES: dict[str, tuple[type, ...]] = {
    "layer_idx": (int,), "layer": (int,), "module_name": (str,), "module": (str,), "session": (str,),
    "wire_dtype": (str,), "all_positions": (bool,), "modules": (list,), "blocks": (list,),
}


@dataclass
class Request:
    method: str
    args: dict[str, Any]
    tensors: list[torch.Tensor]
    reply_to: ReplyTo | None = None  # the client's shared memory and where the reply may go


_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class InsecureBind(TsqpError):
    """Binding a network interface in plaintext without saying so."""


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def parse_dtype(name: str) -> torch.dtype:
    if name not in WIRE_DTYPES:
        raise ValueError(f"unsupported dtype '{name}' (choose from: {', '.join(WIRE_DTYPES)})")
    return DTYPES[name]


def load_model(model_dir: str | Path, device: str, dtype: torch.dtype) -> tuple[Any, ModelConfig]:
    """Load a local LLaMA checkpoint with transformers; never touches the network."""
    config = load_config(model_dir)  # architecture checks with a clear message first
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    except Exception as err:
        raise ModelError(f"cannot load model from {model_dir}: {str(err).splitlines()[0]}") from None
    return model.to(device).eval(), config


@dataclass
class ServerInfo:
    model_dir: str
    device: str
    dtype: str
    num_layers: int
    hidden_size: int


class GpuServer:
    """Method handlers over a loaded model. `handle` maps request frames to reply frames."""

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: str = "float32", shm: bool = False):
        self.model_dir = Path(model_dir)
        self.shared = Attached() if shm else None  # clients' shared-memory segments, when allowed
        self.device = torch.device(device or default_device())
        self.dtype = parse_dtype(dtype)
        self.model, self.config = load_model(self.model_dir, str(self.device), self.dtype)
        self.layers = self.model.model.layers
        # what lean calls leave for later ones, by session: {("v" | "up", layer): tensor}
        self._kept: OrderedDict[str, dict[tuple[str, int], torch.Tensor]] = OrderedDict()
        self._converted: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.handlers: dict[str, Callable[[dict, list[torch.Tensor]], tuple[list[torch.Tensor], dict]]] = {
            "Ping": self.ping,
            "Init": self.init,
            "Embedding": self.embedding,
            "Linear": self.linear,
            "Matmul": self.matmul,
            "LMHead": self.lm_head,
            "QKVScores": self.qkv_scores,
            "AttnOut": self.attn_out,
            "Gate": self.gate,
            "GatedDown": self.gated_down,
            "Linears": self.linears,
            "Whole": self.whole,
        }

    @property
    def info(self) -> ServerInfo:
        return ServerInfo(str(self.model_dir), str(self.device), protocol.DTYPE_NAMES[self.dtype],
                          self.config.num_layers, self.config.hidden_size)

    # -- dispatch ---------------------------------------------------------------------------

    @property
    def service(self) -> ServiceState:
        """Limits and counters (made on first use, so the handlers' constructor stays as it is)."""
        state = self.__dict__.get("_service")
        if state is None:
            state = self.__dict__["_service"] = ServiceState()
        return state

    def handle(self, frames: list[Any]) -> list[Any]:
        """Request frames -> reply frames. Never raises: every failure is an error reply."""
        state, method, peer = self.service, "?", current_peer.get()
        state.requests += 1
        try:
            request = self.check_request(frames)
            method = request.method
            self._synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                tensors = self._on_device(request.tensors)
                outputs, extra = self.handlers[method](request.args, tensors)
                wire = request.args.get("wire_dtype", "float32")
                outputs = to_host([self._to_wire(t, wire) for t in outputs])  # complete on return
            header = {"ok": True, "server_s": time.perf_counter() - start, **extra}
            if method == "Ping":
                header.update(self.health())
            log_event(log, logging.DEBUG, "request", method=method, peer=peer, server_s=header["server_s"])
            return self._reply(header, outputs, request.reply_to)
        except BadRequest as err:
            return self._refuse(err.code, str(err), method, peer)
        except (ProtocolError, ModelError) as err:
            return self._refuse("bad_request", str(err), method, peer)
        except _OUT_OF_MEMORY as err:
            return self._refuse("out_of_memory", str(err).splitlines()[0], method, peer, failed=True)
        except Exception as err:  # a bug or a device error: report it, keep serving
            return self._refuse("internal", f"{type(err).__name__}: {err}", method, peer, failed=True)

    def _on_device(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Inputs on the device (one copy), floating-point ones checked finite there: one
        reduction each and a single wait; only a non-finite result looks at them one by one."""
        moved = to_device(tensors, self.device)
        floats = [t for t in moved if t.is_floating_point() and t.numel()]
        if floats and not bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in floats])).all()):
            for i, t in enumerate(moved):
                if t.is_floating_point():
                    self._check_finite(t, f"input tensor {i}")
        return moved

    def _refuse(self, code: str, message: str, method: str, peer: str, failed: bool = False) -> list[Any]:
        """An error reply, logged: a bad request as a warning, a failure of ours as an error."""
        self.service.errors[code] += 1
        fields = {"code": code, "method": method, "peer": peer, "message": message[:300]}
        if failed:
            log.error("request_failed", extra={"fields": fields}, exc_info=True)
        else:
            log_event(log, logging.WARNING, "bad_request", **fields)
        return protocol.encode(protocol.error_header(code, message))

    def release(self) -> None:
        """Unmap the clients' shared-memory segments (on stop)."""
        if self.shared is not None:
            self.shared.close()

    def health(self) -> dict[str, Any]:
        """What a Ping reports besides the model: uptime, traffic, errors, live sessions."""
        state = self.service
        return {"uptime_s": round(time.monotonic() - state.started, 3), "requests": state.requests,
                "errors": dict(state.errors), "sessions": len(self._kept)}

    # -- validation before work ------------------------------------------------------------------

    def check_request(self, frames: list[Any]) -> Request:
        """Decode and check a request against the method table and the limits, before any work."""
        limits = self.service.limits
        if not frames:
            raise BadRequest("empty message")
        if len(frames) - 1 > limits.max_tensors:
            raise TooLarge(f"{len(frames) - 1} payload frames (limit {limits.max_tensors})")
        head = frames[0].buffer if hasattr(frames[0], "buffer") else memoryview(frames[0])
        if head.nbytes > limits.max_header_bytes:
            raise TooLarge(f"header of {head.nbytes} bytes (limit {limits.max_header_bytes})")
        header = protocol.decode_header(frames[0])
        method = header.get("method")
        if not isinstance(method, str) or method not in self.handlers:
            raise UnknownMethod(f"unknown method {method!r}"[:200])
        args = header.get("args", {})
        if not isinstance(args, dict):
            raise BadRequest("'args' must be a map")
        self._check_args(method, args)
        payloads, reply_to = self._payloads(header, frames)
        shapes = self._check_specs(method, header.get("tensors", []), len(payloads) - 1)
        self._check_output_size(method, args, shapes)
        message = protocol.decode_payloads(header, payloads, limits.max_elements)  # payload bytes against shapes
        return Request(method, args, message.tensors, reply_to)

    def _payloads(self, header: dict, frames: list[Any]) -> tuple[list[Any], ReplyTo | None]:
        """The header frame and the payload buffers: the frames that came, or locations in the
        client's shared memory (tsqp.shm) when the request says so and this server allows it."""
        shared = header.get("shm")
        if shared is None:
            return frames, None
        if self.shared is None:
            raise BadRequest("this server does not take payloads in shared memory (start it with --shm)")
        if not isinstance(shared, dict) or len(frames) != 1:
            raise BadRequest("'shm' must be {name, key, frames, reply_at}, with no payload frames")
        views, reply_to = self.shared.request(shared)  # the segment's key first, then every location
        if len(views) > self.service.limits.max_tensors:
            raise TooLarge(f"{len(views)} payloads (limit {self.service.limits.max_tensors})")
        return [frames[0], *views], reply_to

    @staticmethod
    def _reply(header: dict, outputs: list[torch.Tensor], reply_to: ReplyTo | None) -> list[Any]:
        """Reply frames; with shared memory, the tensors go behind the request's when they fit (tsqp.shm)."""
        if reply_to is not None:
            return reply_to.encode(header, outputs)
        return protocol.encode(header, outputs)

    def _check_args(self, method: str, args: dict) -> None:
        for name, value in args.items():
            types = ARG_TYPES.get(name)
            if types and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
                wanted = " or ".join(t.__name__ for t in types)
                raise BadRequest(f"'{name}' must be {wanted}, got {type(value).__name__}")
        spec = METHOD_SPECS.get(method)
        for spellings in spec.required if spec else ():
            if not any(s in args for s in spellings):
                raise BadRequest(f"{method} needs '{spellings[0]}'")
        if "wire_dtype" in args and args["wire_dtype"] not in FLOAT_DTYPES:
            raise BadRequest(f"unsupported wire_dtype {args['wire_dtype']!r} (choose from: {', '.join(WIRE_DTYPES)})")
        if "session" in args:
            self._session(args)

    def _check_specs(self, method: str, specs: Any, payloads: int) -> list[list[int]]:
        """Tensor specs: count, dtype allow-list, rank, dims and element counts within limits."""
        limits, spec = self.service.limits, METHOD_SPECS.get(method)
        if not isinstance(specs, list) or len(specs) != payloads:
            raise BadRequest(f"header must list one spec per payload frame ({payloads} came)")
        if spec is not None and (len(specs) < spec.tensors if spec.variadic else len(specs) != spec.tensors):
            raise BadRequest(f"{method} expects {spec.tensors}{' or more' if spec.variadic else ''} tensor(s), "
                             f"got {len(specs)}")
        allowed = spec.dtypes if spec is not None else tuple(DTYPES)
        shapes = []
        for item in specs:
            if not isinstance(item, dict) or item.get("dtype") not in allowed:
                got = item.get("dtype") if isinstance(item, dict) else item
                raise BadRequest(f"{method} takes {' or '.join(allowed)} tensors, got {str(got)[:40]!r}")
            shape = item.get("shape")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise BadRequest(f"bad tensor shape {str(shape)[:80]}")
            if len(shape) > limits.max_rank:
                raise TooLarge(f"tensor of rank {len(shape)} (limit {limits.max_rank})")
            if any(d > limits.max_elements for d in shape) or math.prod(shape) > limits.max_elements:
                raise TooLarge(f"tensor of shape {shape} exceeds the limit of {limits.max_elements} elements")
            shapes.append(shape)
        ranks = spec.ranks[:1] * len(shapes) if spec is not None and spec.variadic and spec.ranks else \
            (spec.ranks if spec is not None else None)
        if ranks is not None and [len(s) for s in shapes] != list(ranks):
            raise BadRequest(f"{method} expects tensors of rank {list(ranks)}, got {[len(s) for s in shapes]}")
        return shapes

    def _check_output_size(self, method: str, args: dict, shapes: list[list[int]]) -> None:
        """A small request must not make a huge answer (Matmul [n,1]@[1,n], LMHead rows, ...)."""
        limit, out = self.service.limits.max_elements, self._output_elements(method, args, shapes)
        if out > limit:
            raise TooLarge(f"{method} would produce {out} elements (limit {limit})")

    def _output_elements(self, method: str, args: dict, shapes: list[list[int]]) -> int:
        c = self.config
        if not shapes or any(len(s) == 0 for s in shapes):
            return 0  # nothing to compute, or the handler rejects the shape
        rows = math.prod(shapes[0][:-1])
        widest = max(c.vocab_size, c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim)
        widths = {"Linears": len(args.get("modules") or ()) * widest,
                  "LMHead": c.vocab_size, "GatedDown": c.hidden_size, "Gate": c.intermediate_size,
                  "Linear": max(c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim)}
        if method in widths:
            return rows * widths[method]
        if method in ("Embedding", "Whole"):
            ids = shapes[0]
            if method == "Whole" and len(ids) == 2 and ids[1] > c.max_position_embeddings:
                raise BadRequest(f"{ids[1]} tokens exceed max_position_embeddings ({c.max_position_embeddings})")
            positions = math.prod(ids) if method == "Embedding" or args.get("all_positions") else ids[0]
            return positions * (c.hidden_size if method == "Embedding" else max(c.vocab_size, c.hidden_size))
        a, b = shapes[0], shapes[-1]
        if method == "Matmul" and len(a) >= 2 and len(b) >= 2:
            try:
                batch = torch.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
            except RuntimeError:
                return 0  # the handler names the mismatch
            return math.prod(batch) * a[-2] * b[-1]
        if method == "QKVScores" and len(a) == 3:
            return a[0] * c.num_heads * a[1] * a[1]  # at most: the whole n x n square
        if method == "AttnOut" and all(len(s) == 4 for s in shapes):
            return a[0] * sum(s[2] for s in shapes) * max(c.hidden_size, c.num_heads * c.head_dim)
        return 0

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @staticmethod
    def _to_wire(t: torch.Tensor, wire: Any) -> torch.Tensor:
        """`t` in the request's wire dtype, still on the device (integers travel as they are)."""
        if not t.is_floating_point():
            return t
        if wire not in WIRE_DTYPES and wire != "float64":
            raise BadRequest(f"unsupported wire_dtype {wire!r} (choose from: {', '.join(WIRE_DTYPES)})")
        return t.to(dtype=DTYPES[wire])

    # -- argument checks ----------------------------------------------------------------------

    def _layer(self, args: dict) -> int:
        layer = args.get("layer_idx", args.get("layer"))
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.config.num_layers:
            raise BadRequest(f"layer index {layer!r} out of range (model has {self.config.num_layers} layers)")
        return layer

    def _inputs(self, tensors: list[torch.Tensor], count: int, names: str) -> list[torch.Tensor]:
        if len(tensors) != count:
            raise BadRequest(f"expected {count} tensor(s) ({names}), got {len(tensors)}")
        for t in tensors:
            if not t.is_floating_point():
                raise BadRequest(f"expected floating-point tensors ({names}), got {protocol.DTYPE_NAMES[t.dtype]}")
        return [t.to(self.device, self.dtype) for t in tensors]

    @staticmethod
    def _check_finite(t: torch.Tensor, names: str) -> None:
        """One reduction on the device; only a non-finite sum (NaN, inf or overflow) looks closer."""
        if t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float32))) and not bool(torch.isfinite(t).all()):
            raise NonFinite(f"non-finite values (NaN or infinity) in {names}")

    @staticmethod
    def _check_last_dim(x: torch.Tensor, size: int, what: str) -> None:
        if x.dim() < 2 or x.shape[-1] != size:
            raise BadRequest(f"{what} expects [..., {size}] input, got {list(x.shape)}")

    def _module(self, layer: int, name: Any) -> torch.nn.Linear:
        if name not in LINEAR_MODULES:
            raise BadRequest(f"unknown module {name!r} (choose from: {', '.join(LINEAR_MODULES)})")
        block = self.layers[layer]
        return getattr(block.mlp if name in ("gate_proj", "up_proj", "down_proj") else block.self_attn, name)

    def _apply(self, module: torch.nn.Linear, x: torch.Tensor, what: str) -> torch.Tensor:
        self._check_last_dim(x, module.in_features, what)
        return module(x)

    def _session(self, args: dict) -> str:
        session = args.get("session")
        if not isinstance(session, str) or not session:
            raise BadRequest("'session' must be a non-empty string")
        if len(session) > self.service.limits.max_session_chars:
            raise TooLarge(f"'session' longer than {self.service.limits.max_session_chars} characters")
        return session

    # -- seed methods ---------------------------------------------------------------------------

    def ping(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        return [], {"server": "tsqp", **self.info.__dict__}

    def init(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """The seed's Init: config, rope parameters and every RMSNorm weight. Kept for the seed's
        flow; the TEE prefers its own model directory and does not trust this answer."""
        names, weights = [], []
        for i, block in enumerate(self.layers):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                names.append(f"model.layers.{i}.{norm}.weight")
                weights.append(getattr(block, norm).weight)
        names.append("model.norm.weight")
        weights.append(self.model.model.norm.weight)
        rotary = self.model.model.rotary_emb
        raw = json.loads((self.model_dir / "config.json").read_text())
        extra = {"config": raw, "weight_names": names, "attention_scaling": float(rotary.attention_scaling)}
        return [*(w.float() for w in weights), rotary.inv_freq.float()], extra

    def embedding(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        if len(tensors) != 1 or tensors[0].dtype != torch.int64 or tensors[0].dim() != 2:
            raise BadRequest("Embedding expects one int64 tensor of token ids [batch, seq]")
        ids = tensors[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise BadRequest(f"token ids must lie in [0, {self.config.vocab_size})")
        return [self.model.model.embed_tokens(ids.to(self.device))], {}

    def linear(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        layer = self._layer(args)
        module = self._module(layer, args.get("module_name", args.get("module")))
        (x,) = self._inputs(tensors, 1, "hidden_states")
        return [self._apply(module, x, f"layer {layer} {args.get('module_name', args.get('module'))}")], {}

    def matmul(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        a, b = self._inputs(tensors, 2, "a, b")
        if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
            raise BadRequest(f"Matmul shapes do not agree: {list(a.shape)} @ {list(b.shape)}")
        try:
            return [torch.matmul(a, b)], {}
        except RuntimeError as err:
            raise BadRequest(f"Matmul shapes do not agree: {list(a.shape)} @ {list(b.shape)} ({err})") from None

    def lm_head(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """The seed's LMHead. A lean prefill names its `session`: its last call, so the state it
        left here (V, up) is freed."""
        (x,) = self._inputs(tensors, 1, "hidden_states")
        logits = self._apply(self.model.lm_head, x, "LMHead")
        if "session" in args:
            self._kept.pop(self._session(args), None)
        return [logits], {}

    # -- lean methods: fused, V stays here --------------------------------------------------------

    def qkv_scores(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """q, k, v from one input, RoPE with the TEE's cos/sin tables, then Q @ K^T with K
        un-expanded (each group of query heads shares its key head), cut into causal query blocks:
        block i holds queries [end_(i-1), end_i) against keys [0, end_i). q and k never cross the
        wire; V is kept for AttnOut."""
        layer, session = self._layer(args), self._session(args)
        x, cos, sin = self._inputs(tensors, 3, "hidden_states [b, n, hidden], cos [n, d], sin [n, d]")
        c = self.config
        self._check_last_dim(x, c.hidden_size, f"layer {layer} QKVScores")
        b, n, _ = x.shape
        if cos.shape != (n, c.head_dim) or sin.shape != (n, c.head_dim):
            raise BadRequest(f"QKVScores expects cos and sin [{n}, {c.head_dim}] for {n} positions, got "
                             f"{list(cos.shape)} and {list(sin.shape)}")
        ends = self._block_ends(args.get("blocks", [n]), n)
        attn = self.layers[layer].self_attn
        q = attn.q_proj(x).view(b, n, c.num_heads, c.head_dim).transpose(1, 2)  # [b, heads, n, d]
        k = attn.k_proj(x).view(b, n, c.num_kv_heads, c.head_dim).transpose(1, 2)  # [b, kv, n, d]
        self._keep(session, "v", layer, attn.v_proj(x).view(b, n, c.num_kv_heads, c.head_dim).transpose(1, 2))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        grouped = q.view(b, c.num_kv_heads, c.kv_groups, n, c.head_dim)
        keys = k.unsqueeze(2).transpose(-1, -2)  # [b, kv, 1, d, n]
        return [(grouped[..., start:end, :] @ keys[..., :end]).reshape(b, c.num_heads, end - start, end)
                for start, end in zip([0, *ends], ends)], {}

    def _block_ends(self, ends: Any, n: int) -> list[int]:
        """Causal block ends: increasing, ending at n, no more than AttnOut will take back."""
        limit = min(n, self.service.limits.max_tensors)
        if not isinstance(ends, list) or not ends or len(ends) > limit or ends[-1] != n \
                or any(type(e) is not int for e in ends) or any(a >= b for a, b in zip([0, *ends], ends)):
            raise BadRequest(f"'blocks' must be at most {limit} increasing block ends ending at {n}, "
                             f"got {str(ends)[:80]}")
        return ends

    def attn_out(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """P @ V with the V kept from QKVScores, then o_proj: one round trip instead of two. The
        probabilities come as the causal query blocks that QKVScores produced."""
        layer, session = self._layer(args), self._session(args)
        probs = self._inputs(tensors, len(tensors), "probs [b, heads, n_i, end_i] per causal block")
        v = self._kept_tensor(session, "v", layer, "QKVScores")
        c = self.config
        b, kv, m, d = v.shape
        start, outs = 0, []
        for p in probs:
            end = start + (p.shape[2] if p.dim() == 4 else 0)
            if p.dim() != 4 or p.shape[0] != b or p.shape[1] != c.num_heads or p.shape[3] != end or end > m:
                raise BadRequest(f"AttnOut expects causal blocks of probs [{b}, {c.num_heads}, n_i, end_i] with "
                                 f"end_i the running total of n_i, up to {m}; got {[list(t.shape) for t in probs]}")
            n_i = end - start
            outs.append(p.view(b, kv, c.kv_groups, n_i, end) @ v[:, :, None, :end])  # [b, kv, g, n_i, d]
            start = end
        if start != m:
            raise BadRequest(f"AttnOut blocks cover {start} queries, V has {m} positions")
        out = torch.cat(outs, dim=3).view(b, c.num_heads, m, d).transpose(1, 2).reshape(b, m, c.num_heads * d)
        return [self.layers[layer].self_attn.o_proj(out)], {}

    def gate(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """gate and up projections of one input: gate goes back for the TEE's SiLU; up stays for
        GatedDown, since the only op that touches it is the element-wise product (linear in it)."""
        layer, session = self._layer(args), self._session(args)
        (x,) = self._inputs(tensors, 1, "hidden_states")
        mlp = self.layers[layer].mlp
        self._check_last_dim(x, self.config.hidden_size, f"layer {layer} Gate")
        gate = mlp.gate_proj(x)
        kept = self._kept.get(session, {})
        for key in [key for key in kept if key[0] == "up"]:
            del kept[key]  # one layer's up per session: the prefill has moved on
        self._keep(session, "up", layer, mlp.up_proj(x))
        return [gate], {}

    def gated_down(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """down_proj(SiLU(gate) * up), with SiLU(gate) from the TEE and the up kept from Gate.
        up stays until the session's next Gate, so a resent call gets the same answer."""
        layer, session = self._layer(args), self._session(args)
        (activated,) = self._inputs(tensors, 1, "SiLU(gate)")
        up = self._kept_tensor(session, "up", layer, "Gate")
        if activated.shape != up.shape:
            raise BadRequest(f"GatedDown expects SiLU(gate) of shape {list(up.shape)} (as Gate made it), "
                             f"got {list(activated.shape)}")
        return [self.layers[layer].mlp.down_proj(activated * up)], {}

    def _keep(self, session: str, name: str, layer: int, t: torch.Tensor) -> None:
        """Keep `t` for a later call of the same session; the oldest sessions are dropped first."""
        self._kept.setdefault(session, {})[(name, layer)] = t
        self._kept.move_to_end(session)
        while len(self._kept) > MAX_SESSIONS:
            self._kept.popitem(last=False)

    def _kept_tensor(self, session: str, name: str, layer: int, maker: str) -> torch.Tensor:
        t = self._kept.get(session, {}).get((name, layer))
        if t is None:
            raise MissingState(f"no {name} for session {session!r} layer {layer}: call {maker} first")
        return t

    def linears(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """Several projections of one input (the guarded modes). A float64 input (one-time-masked,
        private mode) is multiplied in float64 so the mask's headroom costs no precision."""
        modules = args.get("modules")
        if not isinstance(modules, list) or not modules or len(modules) > len(LINEAR_MODULES):
            raise BadRequest("'modules' must be a non-empty list of module names")
        x = tensors[0]  # one floating-point tensor, already on the device (METHOD_SPECS)
        dtype = torch.float64 if x.dtype == torch.float64 else self.dtype
        if modules == ["lm_head"]:
            targets = [self.model.lm_head]
        else:
            layer = self._layer(args)
            targets = [self._module(layer, name) for name in modules]
        outputs = []
        for module in targets:
            self._check_last_dim(x, module.in_features, "Linears")
            weight, bias = self._weights_in(module, dtype)
            outputs.append(torch.nn.functional.linear(x.to(dtype), weight, bias))
        return outputs, {}

    def _weights_in(self, module: torch.nn.Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The module's weight and bias in `dtype`; float64 copies are made once and kept
        (private mode multiplies in float64 on every call; converting each time costs more)."""
        if dtype == self.dtype:
            return module.weight, module.bias
        key = (id(module), dtype)
        if key not in self._converted:
            bias = module.bias.to(dtype) if module.bias is not None else None
            self._converted[key] = (module.weight.to(dtype), bias)
        return self._converted[key]

    def whole(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """The model run whole with transformers: the benchmark's speed of light."""
        if len(tensors) != 1 or tensors[0].dtype != torch.int64 or tensors[0].dim() != 2:
            raise BadRequest("Whole expects one int64 tensor of token ids [batch, seq]")
        ids = tensors[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise BadRequest(f"token ids must lie in [0, {self.config.vocab_size})")
        keep = 0 if args.get("all_positions") else 1
        out = self.model(input_ids=ids.to(self.device), use_cache=False, logits_to_keep=keep)
        return [out.logits], {}


class ServerThread:
    """A server running in a background thread of this process: for the Python API and tests."""

    def __init__(self, server: GpuServer, endpoint: str, keys: "ServerKeys | None" = None,
                 heartbeat_s: float = DEFAULT_HEARTBEAT_S):
        self.server, self.endpoint, self.keys = server, endpoint, keys
        self._stop, ready = threading.Event(), threading.Event()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, heartbeat_s), daemon=True, name="tsqp-server")
        self._thread.start()
        ready.wait(10)
        if self._errors:
            raise self._errors[0]

    def _run(self, ready: threading.Event, heartbeat_s: float) -> None:
        try:
            serve_forever(self.endpoint, self.server.handle, self._stop, ready.set, keys=self.keys,
                          max_message_bytes=self.server.service.limits.max_message_bytes, heartbeat_s=heartbeat_s)
        except BaseException as err:  # surfaced to the constructor
            self._errors.append(err)
            ready.set()
        finally:
            self.server.release()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def check_bind(endpoint: str, keys: "ServerKeys | None", insecure: bool) -> None:
    """Plaintext stays on loopback unless the operator says --insecure: the channel carries the
    activations, and without CurveZMQ anyone on the network could read them or use the server."""
    if keys is None and not is_loopback(endpoint):
        if not insecure:
            raise InsecureBind(f"refusing to serve {endpoint} in plaintext: pass --server-secret-key and "
                               "--allow-keys (CurveZMQ, see `tsqp keygen`), bind 127.0.0.1, or pass --insecure")
        log_event(log, logging.WARNING, "insecure_bind", endpoint=endpoint,
                  message="plaintext on a network interface: anyone who can reach it can read and use it")


def run(model_dir: str | Path, device: str | None, dtype: str, endpoint: str, stop: threading.Event | None = None,
        out=sys.stdout, *, keys: "ServerKeys | None" = None, insecure: bool = False, limits: Limits | None = None,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S, wrap: Callable[[Handler], Handler] | None = None,
        shm: bool = False) -> None:
    """Load the model and serve until `stop` is set (or forever), printing the seed's start-up lines.
    `wrap` decorates the handler (e.g. audit.audited) without touching the validation inside it."""
    check_bind(endpoint, keys, insecure)  # before the model loads: fail fast
    device = device or default_device()
    if device == "cpu" and not torch.cuda.is_available():
        print("note: CUDA is not available; serving on the CPU", file=out, flush=True)
    print(f"Loading model from: {model_dir}", file=out, flush=True)
    print(f"Device: {device}, Dtype: {parse_dtype(dtype)}", file=out, flush=True)
    server = GpuServer(model_dir, device, dtype, shm=shm)
    if limits is not None:
        server.service.limits = limits
    print(f"✓ Model loaded: {server.config.num_layers} layers, hidden_size={server.config.hidden_size}", file=out, flush=True)
    where = f"port {endpoint.rsplit(':', 1)[-1]}" if endpoint.startswith("tcp://") else endpoint

    def ready() -> None:
        print(f"✓ ZeroMQ server started on {where}", file=out, flush=True)
        log_event(log, logging.INFO, "start", endpoint=endpoint, model=str(model_dir), device=device, dtype=dtype,
                  curve="on" if keys else "off", shm="on" if shm else "off",
                  allowed_keys=str(keys.allowed_dir) if keys else "-",
                  max_message_bytes=server.service.limits.max_message_bytes)

    try:
        handle = wrap(server.handle) if wrap is not None else server.handle
        serve_forever(endpoint, handle, stop or threading.Event(), ready, keys=keys,
                      max_message_bytes=server.service.limits.max_message_bytes, heartbeat_s=heartbeat_s)
    finally:
        server.release()
        state = server.service
        log_event(log, logging.INFO, "stop", endpoint=endpoint, requests=state.requests,
                  errors=sum(state.errors.values()), uptime_s=round(time.monotonic() - state.started, 3))
