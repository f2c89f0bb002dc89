"""The methods that keep nothing between requests: health, the seed's five, the guarded modes'
Linears, and the whole model (the benchmark's baseline)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import torch

from ..config import ModelConfig
from ..ops import batched_matmul
from ..protocol import LINEAR_MODULES, WIRE_DTYPES
from ..reference import greedy_step_seconds
from .errors import BadRequest
from .model import apply, check_last_dim, float_inputs, ids_in_vocabulary, layer_index, linear_module, token_ids
from .sessions import current_owner
from .registry import (FLOAT_DTYPES, IDS, LAYER, LAYER_ARGS, MODULE, MODULE_ARGS, SESSION_ARGS, Result,
                       method)

if TYPE_CHECKING:
    from .core import GpuServer


def rows(shapes: list[list[int]]) -> int:
    """Rows of the first input: every dim but the last."""
    return math.prod(shapes[0][:-1])


# What a client may rely on beyond the seed's methods; "decode": lean sessions keep K and V by position.
FEATURES = ["decode"]


@method("Ping")
def ping(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """Health, and which model this server holds (the TEE compares it with its own copy's)."""
    return [], {"server": "tsqp", **server.info.__dict__, "identity": server.identity, "features": FEATURES,
                "one_core_rows": server.one_core_rows, **server.health()}


@method("Init")
def init(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """The seed's Init: config, rope parameters and every RMSNorm weight. Kept for the seed's
    flow; the TEE prefers its own model directory and does not trust this answer."""
    names, weights = [], []
    for i, block in enumerate(server.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names.append(f"model.layers.{i}.{norm}.weight")
            weights.append(getattr(block, norm).weight)
    names.append("model.norm.weight")
    weights.append(server.model.model.norm.weight)
    rotary = server.model.model.rotary_emb
    raw = json.loads((server.model_dir / "config.json").read_text())
    extra = {"config": raw, "weight_names": names, "attention_scaling": float(rotary.attention_scaling)}
    return [*(w.float() for w in weights), rotary.inv_freq.float()], extra


def _embedding_output(c: ModelConfig, args: dict, shapes: list[list[int]]) -> int:
    return math.prod(shapes[0]) * c.hidden_size


@method("Embedding", tensors=1, dtypes=IDS, ranks=(2,), inputs=ids_in_vocabulary, output=_embedding_output)
def embedding(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    ids = token_ids(tensors, "Embedding")
    return [server.model.model.embed_tokens(ids)], {}


def _linear_output(c: ModelConfig, args: dict, shapes: list[list[int]]) -> int:
    name = args.get("module_name", args.get("module"))
    return rows(shapes) * c.out_features(name) if name in LINEAR_MODULES else 0  # else the handler refuses


@method("Linear", tensors=1, args={**LAYER_ARGS, **MODULE_ARGS}, required=(LAYER, MODULE), output=_linear_output)
def linear(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    layer = layer_index(server.config, args)
    name = args.get("module_name", args.get("module"))
    module = linear_module(server.layers, layer, name)
    (x,) = float_inputs(tensors, 1, "hidden_states", server.dtype)
    return [apply(module, x, f"layer {layer} {name}")], {}


def seed_product(c: ModelConfig, a: list[int], b: list[int]) -> int:
    """Elements of a·b if it is one of the seed's attention products for n new queries against
    m >= n keys, Q·Kᵀ [b, H, n, D] @ [b, H, D, m] or P·V [b, H, n, m] @ [b, H, m, D]: anything
    else lets a small request ask for a huge reply ([n, 1] @ [1, n])."""
    h, d, keys, out = c.num_heads, c.head_dim, -1, 0
    if len(a) == 4 and len(b) == 4:
        batch, n = a[0], a[2]
        if a == [batch, h, n, d] and b[:3] == [batch, h, d]:  # Q·Kᵀ
            keys, out = b[3], b[3]
        elif a[:3] == [batch, h, n] and b == [batch, h, a[3], d]:  # P·V
            keys, out = a[3], d
    if keys < 0 or not a[2] <= keys <= c.max_position_embeddings:
        raise BadRequest(f"Matmul takes the seed's attention products only, Q·Kᵀ [b, {h}, n, {d}] @ [b, {h}, {d}, m] "
                         f"or P·V [b, {h}, n, m] @ [b, {h}, m, {d}] with n <= m <= {c.max_position_embeddings}; "
                         f"got {a} @ {b}")
    return a[0] * h * a[2] * out


@method("Matmul", tensors=2, output=lambda c, args, shapes: seed_product(c, *shapes))
def matmul(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    a, b = float_inputs(tensors, 2, "a, b", server.dtype)
    seed_product(server.config, list(a.shape), list(b.shape))
    return [batched_matmul(a, b)], {}


@method("LMHead", tensors=1, args=SESSION_ARGS, output=lambda c, args, shapes: rows(shapes) * c.vocab_size)
def lm_head(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """The seed's LMHead. A lean prefill names its `session`: its last call, so the state it
    left here (V, up) is freed."""
    (x,) = float_inputs(tensors, 1, "hidden_states", server.dtype)
    logits = apply(server.model.lm_head, x, "LMHead")
    if "session" in args:
        server.sessions.release(current_owner(), args["session"])
    return [logits], {}


def _linears_output(c: ModelConfig, args: dict, shapes: list[list[int]]) -> int:
    modules = args.get("modules")
    known = [m for m in modules if m in (*LINEAR_MODULES, "lm_head")] if isinstance(modules, list) else []
    return rows(shapes) * sum(c.out_features(m) for m in known)  # unknown names: the handler refuses


@method("Linears", tensors=1, dtypes=FLOAT_DTYPES, args={**LAYER_ARGS, "modules": (list,)},
        required=(("modules",),), wire=(*WIRE_DTYPES, "float64"), output=_linears_output)
def linears(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """Several projections of one input (the guarded modes). A float64 input (one-time-masked,
    private mode) is multiplied in float64 so the mask's headroom costs no precision."""
    modules = args.get("modules")
    if not isinstance(modules, list) or not modules or len(modules) > len(LINEAR_MODULES):
        raise BadRequest("'modules' must be a non-empty list of module names")
    x = tensors[0]  # one floating-point tensor (the row's dtypes)
    dtype = torch.float64 if x.dtype == torch.float64 else server.dtype
    fused = None
    if modules == ["lm_head"]:
        targets = [server.model.lm_head]
    else:
        layer = layer_index(server.config, args)
        targets = [linear_module(server.layers, layer, name) for name in modules]
        fused = server.fused[layer].group(modules) if dtype == server.dtype else None  # verify's q/k/v, gate/up
    for module in targets:
        check_last_dim(x, module.in_features, "Linears")
    if fused is not None:
        return list(fused(x.to(dtype))), {}
    return [torch.nn.functional.linear(x.to(dtype), *server.weights_in(module, dtype)) for module in targets], {}


def _whole_output(c: ModelConfig, args: dict, shapes: list[list[int]]) -> int:
    batch, n = shapes[0]
    if n > c.max_position_embeddings:
        raise BadRequest(f"{n} tokens exceed max_position_embeddings ({c.max_position_embeddings})")
    return (batch * n if args.get("all_positions") else batch) * max(c.vocab_size, c.hidden_size)


@method("Whole", tensors=1, dtypes=IDS, ranks=(2,), args={"all_positions": (bool,)}, inputs=ids_in_vocabulary,
        output=_whole_output)
def whole(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """The model run whole with transformers: the benchmark's speed of light."""
    ids = token_ids(tensors, "Whole")
    keep = 0 if args.get("all_positions") else 1
    return [server.model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits], {}


def _whole_decode_output(c: ModelConfig, args: dict, shapes: list[list[int]]) -> int:
    steps = args.get("steps", 0)
    if steps < 1 or shapes[0][1] + steps > c.max_position_embeddings:
        raise BadRequest(f"WholeDecode needs 1 <= steps and prompt + steps <= max_position_embeddings "
                         f"({c.max_position_embeddings}); got {shapes[0][1]} + {steps}")
    return 0  # the reply is the steps' seconds, in its header


@method("WholeDecode", tensors=1, dtypes=IDS, ranks=(2,), args={"steps": (int,)}, required=(("steps",),),
        inputs=ids_in_vocabulary, output=_whole_decode_output)
def whole_decode(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """transformers' own greedy decoding with its KV cache on this device: the speed of light
    for a decode step. Replies with each step's seconds (synchronized)."""
    ids = token_ids(tensors, "WholeDecode")
    return [], {"step_s": greedy_step_seconds(server.model, ids, args["steps"], server.synchronize)}


@method("Echo", tensors=1, output=lambda c, args, shapes: math.prod(shapes[0]))
def echo(server: "GpuServer", args: dict, tensors: list[torch.Tensor]) -> Result:
    """Its one tensor back, through the device: a round trip of the transport and staging alone
    (`tsqp bench --rtt`). No larger than what it was sent."""
    return [tensors[0]], {}
