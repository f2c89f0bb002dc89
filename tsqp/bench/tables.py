"""The benchmark's results as Markdown tables and one-line comparisons."""

from __future__ import annotations

import statistics

from .results import BREAKDOWN_KEYS, ModeResult


def _overhead(r: ModeResult) -> str:
    return f"{r.overhead_per_round_trip_s * 1e6:.0f}" if r.overhead_per_round_trip_s is not None else "–"


def markdown_table(results: list[ModeResult], batch: int) -> str:
    """The prefill rows."""
    results = [r for r in results if r.phase == "prefill"]
    whole = {r.tokens: r.median_s for r in results if r.mode == "whole"}
    seed_bytes = {r.tokens: r.bytes_sent + r.bytes_received for r in results if r.mode == "split-seed"}
    split = {r.tokens: r.median_s for r in results if r.mode == "split"}
    rows = ["| mode | tokens | median s | tokens/s | × whole | × split | round trips | MB sent | MB received "
            "| bytes × seed | TEE s | serialize s | transport+wait s | server s | offline s | µs per round trip "
            "over whole |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = f"{r.median_s / whole[r.tokens]:.3f}" if r.tokens in whole else "–"
        vs_split = f"{r.median_s / split[r.tokens]:.3f}" if r.tokens in split else "–"
        moved = r.bytes_sent + r.bytes_received
        vs_seed = f"{moved / seed_bytes[r.tokens]:.3f}" if r.tokens in seed_bytes and r.round_trips else "–"
        b = r.breakdown_s
        rows.append(f"| {r.mode} | {r.tokens} | {r.median_s:.4f} | {batch * r.tokens / r.median_s:.1f} | {ratio} "
                    f"| {vs_split} | {r.round_trips} | {r.bytes_sent / 1e6:.2f} | {r.bytes_received / 1e6:.2f} "
                    f"| {vs_seed} | " + " | ".join(f"{b.get(k, 0.0):.4f}" for k in BREAKDOWN_KEYS)
                    + (f" | {r.offline_s:.4f}" if r.offline_s else " | –") + f" | {_overhead(r)} |")
    return "\n".join(rows)


def decode_table(results: list[ModeResult], batch: int) -> str:
    """The decode rows: per token, and for the guarded modes what a user pays in total."""
    results = [r for r in results if r.phase == "decode"]
    if not results:
        return ""
    whole = {r.tokens: r.ms_per_token for r in results if r.mode == "whole"}
    split = {r.tokens: r.ms_per_token for r in results if r.mode == "split"}
    rows = ["| mode | prompt tokens | new tokens | ms/token | tokens/s | × whole | × split | round trips/token "
            "| kB/token | µs per round trip over whole | offline ms/token | online + offline ms/token |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = f"{r.ms_per_token / whole[r.tokens]:.3f}" if r.tokens in whole else "–"
        vs_split = f"{r.ms_per_token / split[r.tokens]:.3f}" if r.tokens in split else "–"
        offline = r.offline_s_per_token * 1e3 if r.offline_s_per_token else 0.0
        rows.append(f"| {r.mode} | {r.tokens} | {r.new_tokens} | {r.ms_per_token:.2f} "
                    f"| {batch * 1e3 / r.ms_per_token:.1f} | {ratio} | {vs_split} | {r.round_trips_per_token:.1f} "
                    f"| {r.bytes_per_token / 1e3:.1f} | {_overhead(r)} | {f'{offline:.2f}' if offline else '–'} "
                    f"| {r.ms_per_token + offline:.2f} |")
    return "\n".join(rows)


def paired_ratios(results: list[ModeResult], baseline: str = "split") -> list[str]:
    """Each mode's time over the baseline's in the same round, median (min–max) over rounds.
    Rounds run every mode in turn, so a ratio within one round is less sensitive than the ratio
    of two medians to a shared machine's drift between rounds (not to noise within a round)."""
    base = {(r.tokens, r.phase): r.runs_s for r in results if r.mode == baseline}
    lines = []
    for r in results:
        runs = base.get((r.tokens, r.phase))
        if r.mode == baseline or runs is None or len(r.runs_s) < 2:
            continue
        ratios = [mine / theirs for mine, theirs in zip(r.runs_s, runs)]
        phase = "" if r.phase == "prefill" else " decode"
        lines.append(f"{r.mode}{phase}, {r.tokens} tokens: {statistics.median(ratios):.3f} × {baseline} round by "
                     f"round ({min(ratios):.3f}–{max(ratios):.3f})")
    return lines


def total_costs(results: list[ModeResult]) -> list[str]:
    """A guarded mode's offline + online cost next to tee-only's: what a user pays in all."""
    tee = {(r.tokens, r.phase): r.per_token_s for r in results if r.mode == "tee-only"}
    lines = []
    for r in results:
        if not r.offline_s or (r.tokens, r.phase) not in tee:
            continue
        online = r.per_token_s
        offline = r.offline_s if r.phase == "prefill" else r.offline_s_per_token
        unit = "per prefill" if r.phase == "prefill" else "per token"
        reference = tee[(r.tokens, r.phase)]
        lines.append(f"{r.mode} {r.phase}, {r.tokens} tokens: {online * 1e3:.1f} ms online + {offline * 1e3:.1f} ms "
                     f"offline = {(online + offline) * 1e3:.1f} ms {unit}; tee-only {reference * 1e3:.1f} ms "
                     f"({(online + offline) / reference:.2f} ×)")
    return lines
