"""The server's per-call path: the registry's field types known at import, inputs checked on
the host before any device work, persistent staging buffers."""

from __future__ import annotations

import pytest
import torch

from tsqp.server import registry


def test_a_field_declared_with_two_types_is_refused_when_the_method_registers(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    monkeypatch.setattr(registry, "ARG_TYPES", dict(registry.ARG_TYPES))
    assert registry.ARG_TYPES["layer_idx"] == (int,)
    with pytest.raises(ValueError, match="'layer_idx' is declared with two types"):
        registry.method("Conflicting", args={"layer_idx": (str,)})(lambda server, args, tensors: ([], {}))
    assert "Conflicting" not in registry.METHODS
