"""What `tsqp prefill`, `tsqp generate` and the demo tell the user about a run, as text and as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

RULE = "=" * 60

# Which side runs what, by the steps a runner uses: the protocol's, or the guarded ones (which
# --protection private and --verify share; the protocol is then lean and adds nothing).
OPERATIONS = {
    "seed": ("Softmax, RMSNorm, RotaryEmbedding, SiLU", "Linear, Embedding, Matmul"),
    "lean": ("Softmax, RMSNorm, SiLU (and the rotary tables)",
             "Embedding, QKVScores (q/k/v, RoPE, Q·K^T), AttnGate (P·V + o_proj, then gate, up), "
             "DownScores (· up, down_proj, then the next layer's QKVScores), DownHead (the last down, lm_head)"),
    "guarded": ("Embedding, Softmax, RMSNorm, RotaryEmbedding, SiLU, Q·K^T, P·V",
                "Linears (the projections and the LM head)"),
}
PROTECTIONS = {"none": "none (the server sees ids, activations and logits)", "private": "private (one-time masks)"}


def protection_line(runner) -> str:
    verify = "on (Freivalds checks on every product)" if runner.verify else "off"
    return f"Protection: {PROTECTIONS[runner.protection]}; verify: {verify}"


def _carrier(client) -> str:
    """What the calls travelled on, beyond the socket: shared memory, and its fast link if used."""
    if not client.shm:
        return ""
    return ", shared memory and the fast link" if client.via == "fastlink" else ", shared memory"


def print_report(result, runner, offline=None, out: TextIO | None = None) -> None:
    """The seed's report, with the protocol and the protection as two settings."""
    out = out or sys.stdout  # looked up per call: whoever redirects stdout gets the report
    w = result.wire
    tee_ops, gpu_ops = OPERATIONS["guarded" if runner.guarded else runner.protocol]
    via = _carrier(runner.client)
    lines = [
        RULE, "Running Prefill Benchmark", RULE,
        f"Token length: {result.tokens}" + (f" x batch {result.batch}" if result.batch > 1 else ""),
        f"TEE operations: {tee_ops}",
        f"GPU operations: {gpu_ops}",
        f"Protocol: {runner.protocol} (wire {runner.wire_dtype}{via}), {w.round_trips} round trips, "
        f"{w.bytes_sent / 1e6:.2f} MB sent, {w.bytes_received / 1e6:.2f} MB received",
        protection_line(runner),
        RULE,
        f"Prefill time: {result.seconds:.4f} seconds",
        f"Throughput: {result.throughput:.2f} tokens/sec",
    ]
    if offline is not None:
        lines.append(f"Offline phase (not in the prefill time): {offline.seconds:.4f} seconds, "
                     f"{offline.bytes / 1e6:.1f} MB of one-time material for {offline.prefills} prefill")
    lines += [f"Breakdown (s): {', '.join(f'{k} {v:.4f}' for k, v in result.breakdown_s.items())}",
              f"Logits shape: {result.logits.shape}", RULE]
    print(*lines, sep="\n", file=out, flush=True)


def run_settings(runner) -> dict[str, Any]:
    """How a run crossed the boundary: the settings every --json document states."""
    return {"protocol": runner.protocol, "wire_dtype": runner.wire_dtype, "endpoint": runner.client.endpoint,
            "protection": runner.protection, "verify": runner.verify}


def result_json(result, runner) -> dict[str, Any]:
    return {
        "tokens": result.tokens, "batch": result.batch, **run_settings(runner),
        "prefill_s": result.seconds, "throughput_tokens_per_s": result.throughput,
        "round_trips": result.wire.round_trips, "bytes_sent": result.wire.bytes_sent,
        "bytes_received": result.wire.bytes_received, "breakdown_s": result.breakdown_s,
        "logits_shape": list(result.logits.shape),
    }


def json_to_stdout(path: Path | None) -> bool:
    """`--json -`: the JSON is the command's stdout, so everything else goes to stderr."""
    return path is not None and str(path) == "-"


def write_json(path: Path, document: dict[str, Any], what: str, notes: TextIO) -> None:
    """Write `document` to `path`, or to stdout for `-` (then nothing else goes there)."""
    text = json.dumps(document, indent=2) + "\n"
    if json_to_stdout(path):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path.write_text(text)
    print(f"{what} written to {path}", file=notes)


def print_generation(result, runner, out: TextIO | None = None) -> None:
    """What a generation cost: time to the first token, then per token."""
    out = out or sys.stdout
    decode = result.decode_wire
    steps = max(len(result.token_s), 1)
    via = _carrier(runner.client)
    stopped = "at the end-of-sequence token" if result.stopped == "eos" else "after the new tokens asked for"
    lines = [
        RULE, "Generation", RULE,
        f"Prompt tokens: {result.prompt_tokens}" + (f" x batch {result.batch}" if result.batch > 1 else ""),
        f"New tokens: {result.new_tokens} per sequence (stopped {stopped})",
        f"Time to first token: {result.ttft_s:.4f} seconds",
        f"Inter-token latency: median {result.itl_median_s:.4f} s, p90 {result.itl_p90_s:.4f} s",
        f"Throughput: {result.tokens_per_s:.2f} tokens/sec (decode, every sequence)",
        f"Protocol: {runner.protocol} (wire {runner.wire_dtype}{via}), {decode.round_trips / steps:.1f} round trips "
        f"and {(decode.bytes_sent + decode.bytes_received) / steps / 1e3:.1f} kB per token",
        protection_line(runner),
    ]
    if result.offline_s:
        lines.append(f"Offline phase (not in the times above): {result.offline_s:.4f} seconds, "
                     f"{result.offline_s / result.new_tokens:.4f} per token")
    if result.replays:
        lines.append(f"The server lost the session {result.replays} time(s): the prompt and the tokens so far "
                     "were replayed")
    print(*lines, RULE, sep="\n", file=out, flush=True)


def generation_json(result, runner, sampling: dict[str, Any]) -> dict[str, Any]:
    steps = max(len(result.token_s), 1)
    decode = result.decode_wire
    return {
        **run_settings(runner), "sampling": sampling,
        "prompt_tokens": result.prompt_tokens, "new_tokens": result.new_tokens, "batch": result.batch,
        "stopped": result.stopped, "ttft_s": result.ttft_s, "token_s": result.token_s,
        "itl_median_s": result.itl_median_s, "itl_p90_s": result.itl_p90_s, "tokens_per_s": result.tokens_per_s,
        "round_trips_per_token": decode.round_trips / steps,
        "bytes_per_token": (decode.bytes_sent + decode.bytes_received) / steps,
        "offline_s": result.offline_s, "replays": result.replays, "tokens": result.tokens.tolist(),
        "prefill_wire": result.prefill_wire.as_dict(), "decode_wire": decode.as_dict(),
    }
