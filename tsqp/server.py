"""The GPU side: holds the weights on its device and answers one method per request.

It is untrusted: it sees what it is sent and computes the linear algebra. Each handler checks its
arguments before touching the model, and any failure becomes an error reply; the loop never dies
on a bad request.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import protocol
from .config import ModelConfig, load_config
from .errors import ModelError, ProtocolError
from .protocol import DTYPES, LINEAR_MODULES, WIRE_DTYPES
from .transport import serve_forever

MAX_ELEMENTS = 1 << 31  # per tensor; a guard against absurd shapes, not a tuning knob
MAX_SESSIONS = 64  # sessions whose V tensors the lean protocol keeps between calls


class BadRequest(Exception):
    """The request is well-formed on the wire but asks for something invalid."""

    code = "bad_request"


class MissingState(BadRequest):
    """A lean call needs state an earlier call left here (V), and it is gone (e.g. a restart)."""

    code = "missing_state"


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

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: str = "float32"):
        self.model_dir = Path(model_dir)
        self.device = torch.device(device or default_device())
        self.dtype = parse_dtype(dtype)
        self.model, self.config = load_model(self.model_dir, str(self.device), self.dtype)
        self.layers = self.model.model.layers
        self._values: OrderedDict[str, dict[int, torch.Tensor]] = OrderedDict()
        self.handlers: dict[str, Callable[[dict, list[torch.Tensor]], tuple[list[torch.Tensor], dict]]] = {
            "Ping": self.ping,
            "Init": self.init,
            "Embedding": self.embedding,
            "Linear": self.linear,
            "Matmul": self.matmul,
            "LMHead": self.lm_head,
            "QKV": self.qkv,
            "Scores": self.scores,
            "AttnOut": self.attn_out,
            "GateUp": self.gate_up,
            "Down": self.down,
            "Linears": self.linears,
            "Whole": self.whole,
        }

    @property
    def info(self) -> ServerInfo:
        return ServerInfo(str(self.model_dir), str(self.device), protocol.DTYPE_NAMES[self.dtype],
                          self.config.num_layers, self.config.hidden_size)

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, frames: list[Any]) -> list[Any]:
        try:
            request = protocol.decode(frames, max_elements=MAX_ELEMENTS)
            method = request.header.get("method")
            args = request.header.get("args", {})
            if not isinstance(method, str) or method not in self.handlers:
                return protocol.encode(protocol.error_header("unknown_method", f"unknown method {method!r}"))
            if not isinstance(args, dict):
                raise BadRequest("'args' must be a map")
            self._synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                outputs, extra = self.handlers[method](args, request.tensors)
                wire = args.get("wire_dtype", "float32")
                outputs = [self._to_wire(t, wire) for t in outputs]
            self._synchronize()
            header = {"ok": True, "server_s": time.perf_counter() - start, **extra}
            return protocol.encode(header, outputs)
        except BadRequest as err:
            return protocol.encode(protocol.error_header(err.code, str(err)))
        except (ProtocolError, ModelError) as err:
            return protocol.encode(protocol.error_header("bad_request", str(err)))
        except Exception as err:  # a bug or a device error: report it, keep serving
            return protocol.encode(protocol.error_header("internal", f"{type(err).__name__}: {err}"))

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @staticmethod
    def _to_wire(t: torch.Tensor, wire: Any) -> torch.Tensor:
        if not t.is_floating_point():
            return t.cpu()
        if wire not in WIRE_DTYPES and wire != "float64":
            raise BadRequest(f"unsupported wire_dtype {wire!r} (choose from: {', '.join(WIRE_DTYPES)})")
        return t.to(dtype=DTYPES[wire]).cpu()

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
        (x,) = self._inputs(tensors, 1, "hidden_states")
        return [self._apply(self.model.lm_head, x, "LMHead")], {}

    # -- lean methods: fused, V stays here --------------------------------------------------------

    def qkv(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """q, k and v from one input; v is kept for AttnOut since no TEE op touches it."""
        layer, session = self._layer(args), self._session(args)
        (x,) = self._inputs(tensors, 1, "hidden_states")
        attn = self.layers[layer].self_attn
        self._check_last_dim(x, self.config.hidden_size, f"layer {layer} QKV")
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        c = self.config
        v = v.view(*x.shape[:-1], c.num_kv_heads, c.head_dim).transpose(-3, -2)  # [b, kv, n, d]
        self._values.setdefault(session, {})[layer] = v
        self._values.move_to_end(session)
        while len(self._values) > MAX_SESSIONS:
            self._values.popitem(last=False)
        return [q, k], {}

    def scores(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """Q @ K^T with K un-expanded: each group of query heads shares its key head."""
        q, k = self._inputs(tensors, 2, "q [b, heads, n, d], k [b, kv_heads, n, d]")
        c = self.config
        if q.dim() != 4 or k.dim() != 4 or q.shape[1] != c.num_heads or k.shape[1] != c.num_kv_heads \
                or q.shape[-1] != c.head_dim or k.shape[-1] != c.head_dim or q.shape[0] != k.shape[0]:
            raise BadRequest(f"Scores expects q [b, {c.num_heads}, n, {c.head_dim}] and k [b, {c.num_kv_heads}, m, "
                             f"{c.head_dim}], got {list(q.shape)} and {list(k.shape)}")
        b, _, n, d = q.shape
        grouped = q.view(b, c.num_kv_heads, c.kv_groups, n, d)
        scores = grouped @ k.unsqueeze(2).transpose(-1, -2)
        return [scores.view(b, c.num_heads, n, k.shape[2])], {}

    def attn_out(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """P @ V with the V kept from QKV, then o_proj: one round trip instead of two."""
        layer, session = self._layer(args), self._session(args)
        (p,) = self._inputs(tensors, 1, "probs [b, heads, n, m]")
        v = self._values.get(session, {}).get(layer)
        if v is None:
            raise MissingState(f"no V for session {session!r} layer {layer}: call QKV first")
        c = self.config
        b, kv, m, d = v.shape
        if p.dim() != 4 or p.shape[0] != b or p.shape[1] != c.num_heads or p.shape[-1] != m:
            raise BadRequest(f"AttnOut expects probs [{b}, {c.num_heads}, n, {m}], got {list(p.shape)}")
        n = p.shape[2]
        out = p.view(b, kv, c.kv_groups, n, m) @ v.unsqueeze(2)  # [b, kv, g, n, d]
        out = out.view(b, c.num_heads, n, d).transpose(1, 2).reshape(b, n, c.num_heads * d)
        return [self.layers[layer].self_attn.o_proj(out)], {}

    def gate_up(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        layer = self._layer(args)
        (x,) = self._inputs(tensors, 1, "hidden_states")
        mlp = self.layers[layer].mlp
        self._check_last_dim(x, self.config.hidden_size, f"layer {layer} GateUp")
        return [mlp.gate_proj(x), mlp.up_proj(x)], {}

    def down(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        layer = self._layer(args)
        (h,) = self._inputs(tensors, 1, "hidden_states")
        return [self._apply(self.layers[layer].mlp.down_proj, h, f"layer {layer} Down")], {}

    def linears(self, args: dict, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """Several projections of one input (the guarded modes). A float64 input (one-time-masked,
        private mode) is multiplied in float64 so the mask's headroom costs no precision."""
        modules = args.get("modules")
        if not isinstance(modules, list) or not modules or len(modules) > len(LINEAR_MODULES):
            raise BadRequest("'modules' must be a non-empty list of module names")
        if len(tensors) != 1 or tensors[0].dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            raise BadRequest("Linears expects one floating-point tensor")
        x = tensors[0].to(self.device)
        dtype = torch.float64 if x.dtype == torch.float64 else self.dtype
        if modules == ["lm_head"]:
            targets = [self.model.lm_head]
        else:
            layer = self._layer(args)
            targets = [self._module(layer, name) for name in modules]
        outputs = []
        for module, name in zip(targets, modules):
            self._check_last_dim(x, module.in_features, f"Linears {name}")
            bias = module.bias.to(dtype) if module.bias is not None else None
            outputs.append(torch.nn.functional.linear(x.to(dtype), module.weight.to(dtype), bias))
        return outputs, {}

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

    def __init__(self, server: GpuServer, endpoint: str):
        self.server, self.endpoint = server, endpoint
        self._stop, ready = threading.Event(), threading.Event()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True, name="tsqp-server")
        self._thread.start()
        ready.wait(10)
        if self._errors:
            raise self._errors[0]

    def _run(self, ready: threading.Event) -> None:
        try:
            serve_forever(self.endpoint, self.server.handle, self._stop, ready.set)
        except BaseException as err:  # surfaced to the constructor
            self._errors.append(err)
            ready.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run(model_dir: str | Path, device: str | None, dtype: str, endpoint: str, stop: threading.Event | None = None,
        out=sys.stdout) -> None:
    """Load the model and serve until `stop` is set (or forever), printing the seed's start-up lines."""
    device = device or default_device()
    if device == "cpu" and not torch.cuda.is_available():
        print("note: CUDA is not available; serving on the CPU", file=out, flush=True)
    print(f"Loading model from: {model_dir}", file=out, flush=True)
    print(f"Device: {device}, Dtype: {parse_dtype(dtype)}", file=out, flush=True)
    server = GpuServer(model_dir, device, dtype)
    print(f"✓ Model loaded: {server.config.num_layers} layers, hidden_size={server.config.hidden_size}", file=out, flush=True)
    where = f"port {endpoint.rsplit(':', 1)[-1]}" if endpoint.startswith("tcp://") else endpoint
    serve_forever(endpoint, server.handle, stop or threading.Event(),
                  lambda: print(f"✓ ZeroMQ server started on {where}", file=out, flush=True))
