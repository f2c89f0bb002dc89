"""What the TEE side knows about the model, read from a local model directory it trusts.

The TEE never takes the architecture, the norm weights or the rope parameters from the GPU
server: `ModelConfig` comes from `config.json` and `DirectoryWeights` reads the tensors it needs
straight from the safetensors files (tsqp.checkpoint), lazily. `model_identity` lets it check
that a server holds the same model, to catch a mix-up at connect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any]) -> "RopeConfig":
        """Accept both the transformers 5 `rope_parameters` and the 4.x `rope_theta`+`rope_scaling`."""
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelError(f"unsupported rope type '{rope_type}' (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelError("partial_rotary_factor != 1 is not supported")
        kwargs = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor") if k in params}
        if "original_max_position_embeddings" in params:
            kwargs["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
        return cls(theta=float(theta), rope_type=rope_type, **kwargs)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()  # generation stops at any of them (config or generation_config)

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def out_features(self, module: str) -> int:
        """Width of a projection's output (module: q/k/v/o/gate/up/down_proj or lm_head)."""
        widths = {"q_proj": self.num_heads * self.head_dim, "k_proj": self.num_kv_heads * self.head_dim,
                  "v_proj": self.num_kv_heads * self.head_dim, "gate_proj": self.intermediate_size,
                  "up_proj": self.intermediate_size, "lm_head": self.vocab_size}
        return widths.get(module, self.hidden_size)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(f"unsupported architecture: model_type '{model_type}' (TSQP splits LLaMA-family models: llama)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelError(f"unsupported activation '{cfg['hidden_act']}' (LLaMA uses silu)")
        try:
            heads = int(cfg["num_attention_heads"])
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            hidden = int(cfg["hidden_size"])
            config = cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rope=RopeConfig.from_config_dict(cfg),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                eos_token_ids=_token_ids(cfg.get("eos_token_id")),
            )
        except KeyError as missing:
            raise ModelError(f"config.json lacks required field {missing}") from None
        if heads % kv_heads:
            raise ModelError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        return config


def _model_dir(path: str | Path) -> Path:
    model_dir = Path(path).expanduser()
    if not model_dir.exists():
        raise ModelError(f"model directory not found: {model_dir}")
    if not model_dir.is_dir():
        raise ModelError(f"not a model directory (a file, not a directory): {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"not a model directory (no config.json): {model_dir}")
    return model_dir


def load_config(path: str | Path) -> ModelConfig:
    config_path = _model_dir(path) / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read {config_path}: {err}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{config_path} is not a JSON object")
    generation = _read_optional_json(config_path.with_name("generation_config.json"))
    if generation.get("eos_token_id") is not None:  # what generation uses, where the checkpoint says
        raw = dict(raw, eos_token_id=generation["eos_token_id"])
    return ModelConfig.from_dict(raw)


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read {path}: {err}") from None
    return value if isinstance(value, dict) else {}


def _token_ids(value: Any) -> tuple[int, ...]:
    """An `eos_token_id` field: one id, a list of them, or none."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ModelError(f"eos_token_id must be a token id or a list of them, got {str(value)[:60]}")
    return tuple(values)


class NormWeights:
    """The RMSNorm weights the TEE applies, by their checkpoint names, as float32."""

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def input_norm(self, layer: int) -> torch.Tensor:
        return self.get(f"model.layers.{layer}.input_layernorm.weight")

    def post_attention_norm(self, layer: int) -> torch.Tensor:
        return self.get(f"model.layers.{layer}.post_attention_layernorm.weight")

    def final_norm(self) -> torch.Tensor:
        return self.get("model.norm.weight")


class DirectoryWeights(NormWeights):
    """The TEE's own copy of the weights: small tensors kept after their first read, large ones
    streamed (the offline phase), each read by byte range from one open handle per file."""

    def __init__(self, model_dir: str | Path):
        from .checkpoint import Checkpoint

        self.model_dir = _model_dir(model_dir)
        self.checkpoint = Checkpoint(self.model_dir)
        self._cache: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        """A small tensor in float32, kept after the first read."""
        if name not in self._cache:
            self._cache[name] = self.read(name)
        return self._cache[name]

    def has(self, name: str) -> bool:
        return self.checkpoint.has(name)

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor read now and not kept: for streaming large matrices through the offline phase."""
        return self.checkpoint.read(name, dtype)

    def table(self, name: str) -> torch.Tensor:
        """A whole matrix in its stored dtype, read once, sequentially, and kept: a lookup into
        it then reads no file at a position that depends on which rows are wanted."""
        key = f"table:{name}"
        if key not in self._cache:
            self._cache[key] = self.checkpoint.read(name)
        return self._cache[key]

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a matrix, in float32, from the whole table (the private lookup: file
        reads that do not depend on the ids)."""
        return self.table(name)[ids.reshape(-1)].to(torch.float32).reshape(*ids.shape, -1)

    def read_rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a matrix, in float32, each read from the file by its own byte range."""
        return self.checkpoint.read_rows(name, ids).to(torch.float32)


class ProvidedWeights(NormWeights):
    """Weights handed over by someone else (the server's Init): only for the seed's fallback flow."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = {k: v.to(torch.float32) for k, v in tensors.items()}

    def get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise ModelError(f"weight '{name}' missing from the server's Init reply")
        return self._tensors[name]


def model_identity(model_dir: str | Path) -> dict[str, Any]:
    """What two sides compare to tell whether they hold the same model: the architecture and a
    per-tensor fingerprint of the weights (tsqp.checkpoint). Cheap enough for every start-up."""
    from dataclasses import asdict

    from .checkpoint import Checkpoint

    checkpoint = Checkpoint(_model_dir(model_dir))
    try:
        config = json.loads(json.dumps(asdict(load_config(model_dir))))  # as it reads after msgpack: lists
        return {"config": config, "weights": checkpoint.fingerprint()}
    finally:
        checkpoint.close()


def identity_mismatch(mine: dict[str, Any], theirs: Any) -> str | None:
    """None if both identities agree, else what differs, in a few words."""
    if not isinstance(theirs, dict) or not isinstance(theirs.get("config"), dict) \
            or not isinstance(theirs.get("weights"), dict):
        return "the server did not say which model it holds"
    config, other = mine["config"], theirs["config"]
    for key in config:
        if config[key] != other.get(key):
            return f"config {key}: {config[key]} here, {other.get(key)} on the server"
    weights, other_weights = mine["weights"], theirs["weights"]
    if set(weights) != set(other_weights):
        missing = sorted(set(weights) ^ set(other_weights))
        return f"tensor {missing[0]} is in only one of the two checkpoints ({len(missing)} such)"
    for name in weights:
        if weights[name] != other_weights[name]:
            changed = sum(weights[n] != other_weights[n] for n in weights)
            return f"weights differ: {changed} of the {len(weights)} tensors, {name} the first"
    return None
