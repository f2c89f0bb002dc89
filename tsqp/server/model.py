"""The checkpoint on its device, and the lookups every handler shares: layer, module, inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ModelConfig, load_config
from ..errors import ModelError
from ..ops import alone_if
from ..protocol import DTYPE_NAMES, DTYPES, LINEAR_MODULES, WIRE_DTYPES
from .errors import BadRequest, DeviceError, NonFinite
from .products import linear_transposed


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None) -> tuple[str, bool]:
    """The device to serve on and whether it was chosen by default; a device this machine does
    not have is refused here, before any model loads."""
    if not name:
        return default_device(), True
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device '{name}' (choose cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{name}': CUDA is not available on this machine (serve with --device cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device '{name}': this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device '{name}' (TSQP serves on cpu or cuda)")
    return name, False


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


@dataclass(frozen=True, eq=False)
class Fused:
    """Projections of one input as one weight: a layer's q, k, v, or its gate and up. One
    product instead of two or three (on a GPU, one kernel launch), and the modules keep working:
    their weights are views into this one."""

    weight: torch.Tensor  # the modules' weights stacked by rows: [sum of out_features, in_features]
    bias: torch.Tensor | None
    widths: tuple[int, ...]  # each module's out_features, in order
    rows_alone: int = 0  # a product of at most this many rows runs on the calling thread alone
    transposed_rows: frozenset[int] = frozenset()  # products of these many rows run as (W x^T)^T

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """Every module's output side by side: [..., sum of widths]. A decode step's product
        runs alone where the server measured that as fast, and with its operands swapped where
        it measured that as faster (tsqp.server.products): alone, the host's other cores stay
        free for the TEE's spin for the reply. The lean calls' products, and verify's, go here."""
        rows = x.shape[:-1].numel()
        linear = linear_transposed if rows in self.transposed_rows else torch.nn.functional.linear
        return alone_if(rows <= self.rows_alone, linear, x, self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.product(x).split(self.widths, dim=-1)


@dataclass(frozen=True, eq=False)
class FusedLayer:
    """A decoder layer's weights as plain tensors, for the lean calls: q/k/v and gate/up fused,
    o_proj and down_proj as one-module products, and the two RMSNorm weights. Calling through
    the nn.Modules costs a small call more than its product (hooks, attribute lookups)."""

    qkv: Fused
    gate_up: Fused
    o_proj: Fused
    down_proj: Fused
    attn_norm: torch.Tensor  # input_layernorm.weight
    mlp_norm: torch.Tensor  # post_attention_layernorm.weight

    PRODUCTS = ("qkv", "gate_up", "o_proj", "down_proj")  # the fields that are Fused

    def group(self, modules: list[str]) -> Fused | None:
        """The fused product of exactly these modules, in this order, if the layer has one."""
        return {("q_proj", "k_proj", "v_proj"): self.qkv, ("gate_proj", "up_proj"): self.gate_up}.get(tuple(modules))


@dataclass(frozen=True, eq=False)
class Head:
    """The final RMSNorm's weight and the LM head, as plain tensors (as FusedLayer's)."""

    norm: torch.Tensor
    lm_head: Fused


def fuse(*modules: torch.nn.Linear, rows_alone: int = 0) -> Fused:
    """Stack the modules' weights (and biases, which Llama gives all or none of them) into one
    tensor and make each module's weight a view of its rows: no second copy of the model. One
    module keeps its own weight."""
    if len(modules) == 1:
        return Fused(modules[0].weight, modules[0].bias, (modules[0].out_features,), rows_alone)
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = torch.cat([m.bias.detach() for m in modules]) if modules[0].bias is not None else None
    row = 0
    for m in modules:
        width = m.out_features
        m.weight = torch.nn.Parameter(weight[row: row + width], requires_grad=False)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[row: row + width], requires_grad=False)
        row += width
    return Fused(weight, bias, tuple(m.out_features for m in modules), rows_alone)


def fuse_layers(layers: Any, rows_alone: int = 0) -> list[FusedLayer]:
    """Each decoder layer's plain weights, one layer at a time (the unfused weights are freed
    as their modules move onto the fused ones). Call it again after moving or converting the
    model: `.to()` gives the modules new weights, and the fused ones would be left behind."""
    return [FusedLayer(fuse(block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                            rows_alone=rows_alone),
                       fuse(block.mlp.gate_proj, block.mlp.up_proj, rows_alone=rows_alone),
                       fuse(block.self_attn.o_proj, rows_alone=rows_alone),
                       fuse(block.mlp.down_proj, rows_alone=rows_alone), block.input_layernorm.weight,
                       block.post_attention_layernorm.weight) for block in layers]


def head_weights(model: Any, rows_alone: int = 0) -> Head:
    """The final norm's weight and the LM head's (its own, or the tied embedding's)."""
    return Head(model.model.norm.weight, fuse(model.lm_head, rows_alone=rows_alone))


RowsFor = Callable[[list[tuple[torch.Tensor, torch.Tensor | None]], int], frozenset[int]]


def with_transposed_rows(layers: list[FusedLayer], head: Head, rows_for: RowsFor
                         ) -> tuple[list[FusedLayer], Head, dict[tuple[int, ...], frozenset[int]]]:
    """The same weights, each product told at which row counts to swap its operands, and those
    counts by weight shape (the server's weights share one dtype). `rows_for`, which measures, is
    asked once for all the products alike in shape, dtype, bias and threads, with their
    (weight, bias) pairs: the layers'."""
    def kind(fused: Fused) -> tuple[Any, ...]:
        return (*fused.weight.shape, fused.weight.dtype, fused.bias is not None, fused.rows_alone)
    kinds: dict[tuple[Any, ...], list[Fused]] = {}
    for fused in [getattr(layer, name) for layer in layers for name in FusedLayer.PRODUCTS] + [head.lm_head]:
        kinds.setdefault(kind(fused), []).append(fused)
    chosen = {key: rows_for([(f.weight, f.bias) for f in alike], alike[0].rows_alone) for key, alike in kinds.items()}

    def with_rows(fused: Fused) -> Fused:
        return replace(fused, transposed_rows=chosen[kind(fused)])
    layers = [replace(layer, **{name: with_rows(getattr(layer, name)) for name in FusedLayer.PRODUCTS})
              for layer in layers]
    head = replace(head, lm_head=with_rows(head.lm_head))
    return layers, head, {key[:-3]: rows for key, rows in chosen.items()}


def layer_index(config: ModelConfig, args: dict) -> int:
    layer = args.get("layer_idx", args.get("layer"))
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < config.num_layers:
        raise BadRequest(f"layer index {layer!r} out of range (model has {config.num_layers} layers)")
    return layer


def linear_module(layers: Any, layer: int, name: Any) -> torch.nn.Linear:
    if name not in LINEAR_MODULES:
        raise BadRequest(f"unknown module {name!r} (choose from: {', '.join(LINEAR_MODULES)})")
    block = layers[layer]
    return getattr(block.mlp if name in ("gate_proj", "up_proj", "down_proj") else block.self_attn, name)


def float_inputs(tensors: list[torch.Tensor], count: int, names: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """`count` floating-point inputs in the compute dtype (they are already on the device)."""
    if len(tensors) != count:
        raise BadRequest(f"expected {count} tensor(s) ({names}), got {len(tensors)}")
    for t in tensors:
        if not t.is_floating_point():
            raise BadRequest(f"expected floating-point tensors ({names}), got {DTYPE_NAMES[t.dtype]}")
    return [t if t.dtype == dtype else t.to(dtype=dtype) for t in tensors]


def check_last_dim(x: torch.Tensor, size: int, what: str) -> None:
    if x.dim() < 2 or x.shape[-1] != size:
        raise BadRequest(f"{what} expects [..., {size}] input, got {list(x.shape)}")


def apply(module: torch.nn.Linear, x: torch.Tensor, what: str) -> torch.Tensor:
    check_last_dim(x, module.in_features, what)
    return module(x)


def token_ids(tensors: list[torch.Tensor], method: str) -> torch.Tensor:
    """The one int64 [batch, seq] tensor of ids that Embedding and Whole take; each in the
    vocabulary, as the row's `inputs` rule checked on the host (here it would wait for the device)."""
    if len(tensors) != 1 or tensors[0].dtype != torch.int64 or tensors[0].dim() != 2:
        raise BadRequest(f"{method} expects one int64 tensor of token ids [batch, seq]")
    return tensors[0]


def ids_in_vocabulary(config: ModelConfig, tensors: list[torch.Tensor]) -> None:
    ids = tensors[0]
    if ids.numel() and not 0 <= ids.min() <= ids.max() < config.vocab_size:
        raise BadRequest(f"token ids must lie in [0, {config.vocab_size})")


def check_finite(t: torch.Tensor, names: str) -> None:
    """One reduction, read on the host (`t` is a host tensor: no wait), in float32 at least (a
    half-precision sum overflows early); only a non-finite sum (NaN, inf or overflow) looks closer."""
    total = t.sum() if t.element_size() >= 4 else t.sum(dtype=torch.float32)
    if not math.isfinite(total.item()) and not bool(torch.isfinite(t).all()):
        raise NonFinite(f"non-finite values (NaN or infinity) in {names}")
