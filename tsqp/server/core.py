"""The GPU side's dispatch: check a request, run its method's handler, reply.

The server is untrusted: it sees what it is sent and computes the linear algebra. `handle` never
raises: every failure, a bad request or a fault of ours, becomes an error reply with a code, and
the serving loop never dies on a bad request.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .. import protocol
from ..config import model_identity
from ..errors import ModelError, ProtocolError
from ..logs import log_event
from ..ops import DECODE_ROWS
from ..protocol import DTYPES
from ..shm import Attached, ReplyTo
from ..staging import Staging
from ..router import current_peer
from . import lean, stateless  # noqa: F401  (their @method rows fill the registry)
from .checks import Limits, Request, check_request, default_reply_bytes
from .errors import BadRequest
from .model import (check_finite, fuse_layers, head_weights, load_model, parse_dtype, resolve_device,
                    with_transposed_rows)
from .products import one_thread_keeps_up, transposed_rows
from .registry import METHODS
from .sessions import SessionStore

log = logging.getLogger("tsqp.server")

_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class ServiceState:
    """Limits and counters of the serving side, for health replies and the stop log line."""

    limits: Limits
    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    errors: Counter = field(default_factory=Counter)


@dataclass
class ServerInfo:
    model_dir: str
    device: str
    dtype: str
    num_layers: int
    hidden_size: int


class GpuServer:
    """A model on its device, the sessions its clients keep here, and `handle`: request frames
    to reply frames. The methods themselves are the registry's (stateless.py, lean.py)."""

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: str = "float32", shm: bool = False,
                 limits: Limits | None = None):
        self.model_dir = Path(model_dir)
        self.device = torch.device(resolve_device(device)[0])
        self.dtype = parse_dtype(dtype)
        self.model, self.config = load_model(self.model_dir, str(self.device), self.dtype)
        self.layers = self.model.model.layers
        self.take_plain_weights()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the unfused weights' blocks, which the caching allocator would keep
        self.identity = model_identity(self.model_dir)  # what Ping reports, for the TEE to compare
        limits = limits or Limits()
        if limits.max_reply_bytes is None:
            limits = replace(limits, max_reply_bytes=default_reply_bytes(self.config))
        self.service = ServiceState(limits)
        self.sessions = SessionStore(limits.session_bytes, limits.session_idle_s)
        self.shared = Attached() if shm else None  # clients' shared-memory segments, when allowed
        self.staging = Staging(self.device)
        # the registry's handlers bound to this server (one can be replaced here, e.g. by a test's liar)
        self.handlers = {name: partial(row.handler, self) for name, row in METHODS.items()}
        self._converted: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._rehearsal = [bytes(f) for f in protocol.encode({"method": "Echo", "args": {}},
                                                             [torch.zeros(1, 1, self.config.hidden_size)])]

    @property
    def info(self) -> ServerInfo:
        return ServerInfo(str(self.model_dir), str(self.device), protocol.DTYPE_NAMES[self.dtype],
                          self.config.num_layers, self.config.hidden_size)

    @property
    def one_core_rows(self) -> int:
        """Calls of at most this many rows keep this server to one core of the host (their products
        and attention run alone, or on the GPU): a client on the same host may spin through them
        on another. On CUDA, DECODE_ROWS and not more: a long prefill's wait is not worth a core."""
        return DECODE_ROWS if self.device.type == "cuda" else self.rows_alone

    def health(self) -> dict[str, Any]:
        """What a Ping reports besides the model: uptime, traffic, errors, live sessions."""
        state = self.service
        self.sessions.expire()
        return {"uptime_s": round(time.monotonic() - state.started, 3), "requests": state.requests,
                "errors": dict(state.errors), "sessions": len(self.sessions), "session_bytes": self.sessions.nbytes}

    def release(self) -> None:
        """Free every session and unmap the clients' shared-memory segments (on stop)."""
        self.sessions.clear()
        if self.shared is not None:
            self.shared.close()

    def take_plain_weights(self) -> None:
        """The lean calls' weights as plain tensors (q/k/v and gate/up fused), from the model as
        it is now: again after moving or converting it, whose `.to()` leaves them behind."""
        probe = self.layers[0].mlp.gate_proj.weight
        self.rows_alone = DECODE_ROWS if one_thread_keeps_up(probe) else 0  # on the CPU, measured
        self.fused, self.head, self.transposed_rows_by_shape = with_transposed_rows(
            fuse_layers(self.layers, self.rows_alone), head_weights(self.model, self.rows_alone),
            transposed_rows)  # measured too, per weight shape

    def handle(self, frames: list[Any]) -> list[Any]:
        """Request frames -> reply frames. Never raises: every failure is an error reply."""
        state, method, peer = self.service, "?", current_peer.get()
        state.requests += 1
        try:
            request = check_request(frames, self.config, state.limits, self.shared)
            method = request.method.name
            start = time.perf_counter()  # the device is idle: the last call waited for its reply
            outputs, extra = self._run(request)
            header = {"ok": True, "server_s": time.perf_counter() - start, **extra}
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

    def rehearse(self) -> None:
        """Go through a small call's path (an Echo of one decode-sized row: checks, framing, a
        torch op, the reply's encoding), uncounted, the reply dropped. The serving loop runs it
        after a long call while the client computes: on the CPU that call's weights pushed this
        code out of the caches, and the next request finds it back there (docs/latency.md,
        "Rehearsal"). On a GPU the weights never pass through the host's caches: nothing to do."""
        if self.device.type != "cpu":
            return
        request = check_request(self._rehearsal, self.config, self.service.limits, None)
        outputs, _ = self._run(request)
        self._reply({"ok": True, "server_s": 0.0}, outputs, None)

    def _run(self, request: Request) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """A checked request's method on the device; its outputs on the host, in the wire dtype."""
        with torch.inference_mode():
            outputs, extra = self.handlers[request.method.name](request.args, self._inputs(request))
            wire = DTYPES[request.args.get("wire_dtype", "float32")]  # the row allows it (checks)
            return self.staging.to_host([t.to(dtype=wire) if t.is_floating_point() and t.dtype != wire else t
                                           for t in outputs]), extra

    def weights_in(self, module: torch.nn.Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The module's weight and bias in `dtype`; float64 copies are made once and kept
        (private mode multiplies in float64 on every call; converting each time costs more)."""
        if dtype == self.dtype:
            return module.weight, module.bias
        key = (id(module), dtype)
        if key not in self._converted:
            bias = module.bias.to(dtype) if module.bias is not None else None
            self._converted[key] = (module.weight.to(dtype), bias)
        return self._converted[key]

    def _inputs(self, request: Request) -> list[torch.Tensor]:
        """The request's tensors on the device, checked on the host where they arrived (while
        they are copied), so that no check waits for the device: floating-point ones finite,
        and what the method's row adds (token ids in the vocabulary)."""
        moved = self.staging.to_device(request.tensors)
        for i, t in enumerate(request.tensors):
            if t.is_floating_point():
                check_finite(t, f"input tensor {i}")
        if request.method.inputs is not None:
            request.method.inputs(self.config, request.tensors)
        return moved

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _refuse(self, code: str, message: str, method: str, peer: str, failed: bool = False) -> list[Any]:
        """An error reply, logged: a bad request as a warning, a failure of ours as an error."""
        self.service.errors[code] += 1
        fields = {"code": code, "method": method, "peer": peer, "message": message[:300]}
        if failed:
            log.error("request_failed", extra={"fields": fields}, exc_info=True)
        else:
            log_event(log, logging.WARNING, "bad_request", **fields)
        return protocol.encode(protocol.error_header(code, message))

    @staticmethod
    def _reply(header: dict, outputs: list[torch.Tensor], reply_to: ReplyTo | None) -> list[Any]:
        """Reply frames; with shared memory, the tensors go behind the request's when they fit (tsqp.shm)."""
        if reply_to is not None:
            return reply_to.encode(header, outputs)
        return protocol.encode(header, outputs)
