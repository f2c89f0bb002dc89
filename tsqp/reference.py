"""transformers' own model, run whole: what the split is measured against."""

from __future__ import annotations

import inspect
import time
from typing import Callable

import torch


def greedy_step_seconds(model, input_ids: torch.Tensor, steps: int,
                        synchronize: Callable[[], None] = lambda: None) -> list[float]:
    """A prefill of `input_ids`, then `steps` greedy decode steps with transformers' KV cache:
    the seconds each step took (the device synchronized around each)."""
    times = []
    # transformers 5.2x names the cache `cache`; earlier versions `past_key_values`
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            synchronize()
            start = time.perf_counter()
            out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{name: getattr(out, name)})
            synchronize()
            times.append(time.perf_counter() - start)
    return times
