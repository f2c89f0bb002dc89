"""What each benchmark mode runs once, and the rounds that run them all in turn."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable

from .results import ModeResult, Run

if TYPE_CHECKING:
    import torch

Runner = Callable[["torch.Tensor"], Run]


def split_prefill(runner, guarded: bool = False) -> Runner:
    def run(ids: "torch.Tensor") -> Run:
        offline = runner.prepare(*ids.shape).seconds if guarded else 0.0  # offline phase, not timed online
        r = runner.prefill(ids)
        return Run(r.seconds, r.wire.round_trips, r.wire.bytes_sent, r.wire.bytes_received, r.breakdown_s,
                   offline_s=offline + r.offline_s)

    return run


def split_decode(runner, steps: int) -> Runner:
    """A generation of steps + 1 tokens: the prefill makes the first, the steps are timed."""
    def run(ids: "torch.Tensor") -> Run:
        runner.offline_for(*ids.shape)  # the prefill's own material is no decode step's cost
        result = runner.generate(ids, steps + 1, ignore_eos=True).run()
        wire, seconds = result.decode_wire, sum(result.token_s)
        return Run(seconds, wire.round_trips, wire.bytes_sent, wire.bytes_received, wire.breakdown(seconds),
                   offline_s=result.offline_s, token_s=result.token_s)

    return run


def whole_prefill(client) -> Runner:
    def run(ids: "torch.Tensor") -> Run:
        before = client.stats.copy()
        start = time.perf_counter()
        client.call("Whole", [ids])
        seconds = time.perf_counter() - start
        wire = client.stats.since(before)
        return Run(seconds, wire.round_trips, wire.bytes_sent, wire.bytes_received, wire.breakdown(seconds))

    return run


def whole_decode(client, steps: int) -> Runner:
    """transformers' decoding with its KV cache on the server's device, timed there per step."""
    def run(ids: "torch.Tensor") -> Run:
        step_s = [float(s) for s in client.call("WholeDecode", [ids], steps=steps).header["step_s"]]
        return server_only(sum(step_s), step_s)

    return run


def server_only(seconds: float, token_s: list[float] | None = None, part: str = "server_compute") -> Run:
    breakdown = dict.fromkeys(("tee_compute", "serialization", "transport_wait", "server_compute"), 0.0)
    breakdown[part] = seconds
    return Run(seconds, breakdown_s=breakdown, token_s=token_s or [])


def tee_only(model_dir: str, steps: int = 0) -> tuple[Runner, Runner | None]:
    """The model run whole by transformers on the TEE side's CPU: a prefill, and decode steps."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from ..reference import greedy_step_seconds

    hf_logging.disable_progress_bar()
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()

    def prefill(ids: "torch.Tensor") -> Run:
        start = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return server_only(time.perf_counter() - start, part="tee_compute")

    def decode(ids: "torch.Tensor") -> Run:
        step_s = greedy_step_seconds(model, ids, steps)
        return server_only(sum(step_s), step_s, part="tee_compute")

    return prefill, (decode if steps else None)


def guarded_modes(protection: str, verify: bool) -> list[tuple[str, str, bool]]:
    """(mode name, protection, verify) for each guarded configuration the flags ask for."""
    modes = []
    if protection == "private":
        modes.append(("split-private", "private", False))
    if verify:
        modes.append(("split-verify", "none", True))
    if protection == "private" and verify:
        modes.append(("split-private+verify", "private", True))
    return modes


def measure(runners: dict, token_counts: list[int], batch: int, repeat: int, vocab_size: int,
            progress: bool = True) -> list[ModeResult]:
    """Warm up each runner, then `repeat` rounds of every runner in turn, for each length. A
    runner is keyed by its mode, or by (mode, phase) for decode. Each round starts one runner
    later than the last, so none always follows the same one (a guarded mode's offline phase,
    for one, leaves the caches and memory in a different state)."""
    import torch
    from tqdm import tqdm

    results = []
    total = len(token_counts) * (repeat + 1) * len(runners)
    with tqdm(total=total, desc="bench", disable=not progress, file=sys.stderr) as bar:
        for n in token_counts:
            ids = torch.randint(0, vocab_size, (batch, n), generator=torch.Generator().manual_seed(n))
            runs: dict = {key: [] for key in runners}
            order = list(runners)
            for round_ in range(repeat + 1):
                for key in order[round_ % len(order):] + order[: round_ % len(order)]:
                    bar.set_postfix_str(f"{key if isinstance(key, str) else ' '.join(key)} {n} tokens")
                    outcome = runners[key](ids)
                    if round_ > 0:  # round 0 is the warm-up
                        runs[key].append(outcome)
                    bar.update()
            for key in runners:
                mode, phase = (key, "prefill") if isinstance(key, str) else key
                results.append(ModeResult.from_runs(mode, n, runs[key], phase))
    return results
