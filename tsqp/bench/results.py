"""One measured run, and one cell of the benchmark's results (a mode, a prompt length, a phase)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

BREAKDOWN_KEYS = ("tee_compute", "serialization", "transport_wait", "server_compute")


@dataclass
class Run:
    seconds: float  # a prefill; or, for decode, its decode steps together
    round_trips: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    breakdown_s: dict[str, float] = field(default_factory=dict)
    offline_s: float = 0.0
    token_s: list[float] = field(default_factory=list)  # decode: each step's seconds


@dataclass
class ModeResult:
    """One (mode, tokens, phase) cell; the JSON shape only grows across versions."""

    mode: str
    tokens: int  # prompt tokens
    median_s: float
    runs_s: list[float]
    round_trips: int
    bytes_sent: int
    bytes_received: int
    breakdown_s: dict[str, float]
    offline_s: float = 0.0  # guarded modes: the offline phase for one run (not in median_s)
    phase: str = "prefill"  # or "decode": the new tokens after the prefill, one step each
    new_tokens: int | None = None  # decode: steps per run
    ms_per_token: float | None = None  # decode: the median step, over every step of every run
    round_trips_per_token: float | None = None
    bytes_per_token: float | None = None
    offline_s_per_token: float | None = None  # guarded decode: one-time material per step
    overhead_per_round_trip_s: float | None = None  # split modes: (this - whole) / round trips

    @classmethod
    def from_runs(cls, mode: str, tokens: int, runs: list[Run], phase: str = "prefill") -> "ModeResult":
        keys = runs[0].breakdown_s.keys()
        cell = cls(mode=mode, tokens=tokens, median_s=statistics.median(r.seconds for r in runs),
                   runs_s=[r.seconds for r in runs], round_trips=runs[0].round_trips,
                   bytes_sent=runs[0].bytes_sent, bytes_received=runs[0].bytes_received,
                   breakdown_s={k: statistics.median(r.breakdown_s[k] for r in runs) for k in keys},
                   offline_s=statistics.median(r.offline_s for r in runs), phase=phase)
        if phase == "decode":
            steps = len(runs[0].token_s)
            cell.new_tokens = steps
            cell.ms_per_token = 1e3 * statistics.median(t for r in runs for t in r.token_s)
            cell.round_trips_per_token = cell.round_trips / steps
            cell.bytes_per_token = (cell.bytes_sent + cell.bytes_received) / steps
            cell.offline_s_per_token = cell.offline_s / steps if cell.offline_s else None
        return cell

    @property
    def per_token_s(self) -> float:
        """What one unit of this row costs: a prefill, or one decode step."""
        return self.median_s if self.phase == "prefill" else self.ms_per_token / 1e3

    @property
    def round_trips_per_unit(self) -> float:
        return self.round_trips if self.phase == "prefill" else self.round_trips_per_token


def add_overheads(results: list[ModeResult]) -> None:
    """Each split row's cost per round trip over the model run whole: (split - whole) / round trips,
    prefill against prefill, a decode step against a decode step."""
    whole = {(r.tokens, r.phase): r.per_token_s for r in results if r.mode == "whole"}
    for r in results:
        if r.mode.startswith("split") and (r.tokens, r.phase) in whole and r.round_trips_per_unit:
            r.overhead_per_round_trip_s = (r.per_token_s - whole[(r.tokens, r.phase)]) / r.round_trips_per_unit
