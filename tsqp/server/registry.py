"""The method registry: one row per method, declared on its handler with `@method(...)`.

A row holds everything the server checks before any work (how many tensors, of which dtypes
and ranks; the args it reads, their types and which are required; the wire dtypes its reply may
take; how many elements it would produce) next to the handler that does the work, so adding a
method touches one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ..config import ModelConfig
from ..protocol import DTYPES, WIRE_DTYPES

if TYPE_CHECKING:
    from .core import GpuServer

# The spellings a field may have (the seed's and ours), and the types of those fields.
LAYER, MODULE, SESSION = ("layer_idx", "layer"), ("module_name", "module"), ("session",)
LAYER_ARGS = {"layer_idx": (int,), "layer": (int,)}
MODULE_ARGS = {"module_name": (str,), "module": (str,)}
SESSION_ARGS = {"session": (str,)}
IDS = ("int64",)
FLOAT_DTYPES = tuple(name for name, dtype in DTYPES.items() if dtype.is_floating_point)  # float64 too

Result = tuple[list[torch.Tensor], dict[str, Any]]  # reply tensors (still on the device), extra header fields
Handler = Callable[["GpuServer", dict, list[torch.Tensor]], Result]  # (server, args, tensors on the device)
OutputRule = Callable[[ModelConfig, dict, list[list[int]]], int]  # elements a request would produce
InputRule = Callable[[ModelConfig, list[torch.Tensor]], None]  # raises BadRequest; runs on the host tensors


def produces_nothing(config: ModelConfig, args: dict, shapes: list[list[int]]) -> int:
    return 0


@dataclass(frozen=True)
class Method:
    """One method: its handler and what a request for it must be."""

    name: str
    handler: Handler
    tensors: int = 0  # how many tensors it takes (a minimum when variadic)
    dtypes: tuple[str, ...] = WIRE_DTYPES  # of the tensors it takes
    ranks: tuple[int, ...] | None = None  # exact rank of each tensor, where the method relies on it
    variadic: bool = False  # then the last tensor of the row may repeat (with its rank)
    args: Mapping[str, tuple[type, ...]] = field(default_factory=dict)  # what it reads, with their types
    required: tuple[tuple[str, ...], ...] = ()  # each entry: accepted spellings of one field
    wire: tuple[str, ...] = WIRE_DTYPES  # dtypes its reply may be asked in
    output: OutputRule = produces_nothing  # may also refuse shapes it cannot size (BadRequest)
    inputs: InputRule | None = None  # checks of the values, before any work (floats are checked finite anyway)


METHODS: dict[str, Method] = {}
# Every field any method reads, with its types, filled as methods register. A request's args are
# checked against all of them, whatever the method, so a mistyped field never passes; unknown
# fields are ignored (an older server ignores newer ones).
ARG_TYPES: dict[str, tuple[type, ...]] = {}


def method(name: str, **row: Any) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of `name`, with the rest of its row."""
    def register(handler: Handler) -> Handler:
        if name in METHODS:
            raise ValueError(f"method {name} registered twice")
        args = {"wire_dtype": (str,), **row.pop("args", {})}
        for field_name, kinds in args.items():
            if ARG_TYPES.setdefault(field_name, kinds) != kinds:
                raise ValueError(f"field '{field_name}' is declared with two types ({name})")
        METHODS[name] = Method(name, handler, args=args, **row)
        return handler

    return register
