"""`tsqp bench`: what the split costs, measured in one process run, modes alternating.

Modes:
  split       the lean protocol (fused calls, V kept on the server)
  split-seed  the seed's protocol (9 round trips per layer, float32 wire), the baseline
  whole       the model run whole by transformers on the server's device: the split's speed of light
  tee-only    the model run whole by transformers on the TEE side's CPU: what splitting must beat
  split-private, split-verify, split-private+verify
              added by --protection private and/or --verify: the guarded steps; their offline
              phase (masks, probes) runs before each timed prefill and is reported apart

Every mode is warmed up first; each repetition runs every mode once, in turn (starting one mode
later each time), so drift hits all modes alike; the figure reported is the median, and under the
table each mode's ratio to split round by round (median, min–max). Server time is measured by the
server around the device work (synchronized), so time is split into TEE compute,
(de)serialization, transport and waiting, and server compute.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch is imported when a benchmark runs, not when `tsqp` builds its parser
    import torch

MODES = ("split", "split-seed", "whole", "tee-only")
BREAKDOWN_KEYS = ("tee_compute", "serialization", "transport_wait", "server_compute")
# In the plot a colour is a mode, in both panels; the parts of a mode's time are shades of grey.
MODE_COLORS = {"split": "tab:blue", "split-seed": "tab:orange", "whole": "tab:green", "tee-only": "tab:red",
               "split-private": "tab:purple", "split-verify": "tab:brown", "split-private+verify": "tab:pink"}
PART_GREYS = dict(zip(BREAKDOWN_KEYS, ("#303030", "#707070", "#a8a8a8", "#dcdcdc")))


@dataclass
class Run:
    seconds: float
    round_trips: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    breakdown_s: dict[str, float] = field(default_factory=dict)
    offline_s: float = 0.0


@dataclass
class ModeResult:
    """One (mode, tokens) cell; the JSON shape is kept stable across versions."""

    mode: str
    tokens: int
    median_s: float
    runs_s: list[float]
    round_trips: int
    bytes_sent: int
    bytes_received: int
    breakdown_s: dict[str, float]
    offline_s: float = 0.0  # guarded modes: the offline phase for one prefill (not in median_s)

    @classmethod
    def from_runs(cls, mode: str, tokens: int, runs: list[Run]) -> "ModeResult":
        keys = runs[0].breakdown_s.keys()
        return cls(mode=mode, tokens=tokens, median_s=statistics.median(r.seconds for r in runs),
                   runs_s=[r.seconds for r in runs], round_trips=runs[0].round_trips,
                   bytes_sent=runs[0].bytes_sent, bytes_received=runs[0].bytes_received,
                   breakdown_s={k: statistics.median(r.breakdown_s[k] for r in runs) for k in keys},
                   offline_s=statistics.median(r.offline_s for r in runs))


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark split vs seed protocol vs whole model vs TEE-only",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="environment: $TSQP_SERVER_PUBLIC_KEY and $TSQP_CLIENT_SECRET_KEY (CurveZMQ keys "
                              "of its clients, for --endpoint); $TSQP_CACHE (where --preset models are made)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="local model directory (default: the cached tiny preset)")
    src.add_argument("--preset", help="make (once, cached) and use a preset: tiny, tinyllama-1.1b, llama-3.2-1b")
    p.add_argument("--endpoint", help="an already running server (default: start one locally)")
    p.add_argument("--device", help="device for the local server (default: cuda:0, or cpu)")
    p.add_argument("--ipc", action="store_true", help="talk to the local server over ipc:// instead of tcp loopback")
    p.add_argument("--shm", action="store_true",
                   help="move the split modes' tensors through shared memory (same host; tsqp/shm.py)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="server weights dtype (default float32)")
    p.add_argument("--tokens", default="128", help="comma-separated prompt lengths (default 128)")
    p.add_argument("--batch", type=int, default=1, help="sequences per prefill (default 1)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per mode and length (default 3)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--wire-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the split modes' activations on the wire (split-seed is always float32; "
                        "default float32)")
    p.add_argument("--protection", choices=("none", "private"), default="none",
                   help="private: also measure split-private (one-time masks, offline phase reported apart)")
    p.add_argument("--verify", action="store_true", help="also measure split-verify (Freivalds checks; float32 only)")
    p.add_argument("--accuracy", action="store_true",
                   help="also measure each wire dtype's logits error against the whole model")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="write results as JSON; '-' writes them to stdout (the table then goes to stderr)")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="plot time vs tokens and, per length, each mode's seconds by part (needs matplotlib)")
    p.set_defaults(func=cmd_bench)


def _split_runner(runner, guarded: bool = False) -> Callable[[torch.Tensor], Run]:
    def run(ids: torch.Tensor) -> Run:
        offline = runner.prepare(*ids.shape).seconds if guarded else 0.0  # offline phase, not timed online
        r = runner.prefill(ids)
        return Run(r.seconds, r.wire.round_trips, r.wire.bytes_sent, r.wire.bytes_received, r.breakdown_s,
                   offline_s=offline + r.offline_s)

    return run


def _whole_runner(client) -> Callable[[torch.Tensor], Run]:
    def run(ids: torch.Tensor) -> Run:
        before = client.stats.copy()
        start = time.perf_counter()
        client.call("Whole", [ids])
        seconds = time.perf_counter() - start
        wire = client.stats.since(before)
        return Run(seconds, wire.round_trips, wire.bytes_sent, wire.bytes_received, wire.breakdown(seconds))

    return run


def _tee_only_runner(model_dir: str) -> Callable[[torch.Tensor], Run]:
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()

    def run(ids: torch.Tensor) -> Run:
        start = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        seconds = time.perf_counter() - start
        return Run(seconds, breakdown_s={"tee_compute": seconds, "serialization": 0.0, "transport_wait": 0.0,
                                         "server_compute": 0.0})

    return run


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


def measure(runners: dict[str, Callable[[torch.Tensor], Run]], token_counts: list[int], batch: int, repeat: int,
            vocab_size: int, progress: bool = True) -> list[ModeResult]:
    """Warm up each mode, then `repeat` rounds of every mode in turn, for each length. Each round
    starts one mode later than the last, so no mode always follows the same one (a guarded mode's
    offline phase, for one, leaves the caches and memory in a different state)."""
    import torch
    from tqdm import tqdm

    results = []
    total = len(token_counts) * (repeat + 1) * len(runners)
    with tqdm(total=total, desc="bench", disable=not progress, file=sys.stderr) as bar:
        for n in token_counts:
            ids = torch.randint(0, vocab_size, (batch, n), generator=torch.Generator().manual_seed(n))
            runs: dict[str, list[Run]] = {mode: [] for mode in runners}
            order = list(runners)
            for round_ in range(repeat + 1):
                for mode in order[round_ % len(order):] + order[: round_ % len(order)]:
                    bar.set_postfix_str(f"{mode} {n} tokens")
                    outcome = runners[mode](ids)
                    if round_ > 0:  # round 0 is the warm-up
                        runs[mode].append(outcome)
                    bar.update()
            results += [ModeResult.from_runs(mode, n, runs[mode]) for mode in runners]
    return results


def markdown_table(results: list[ModeResult], batch: int) -> str:
    whole = {r.tokens: r.median_s for r in results if r.mode == "whole"}
    seed_bytes = {r.tokens: r.bytes_sent + r.bytes_received for r in results if r.mode == "split-seed"}
    split = {r.tokens: r.median_s for r in results if r.mode == "split"}
    rows = ["| mode | tokens | median s | tokens/s | × whole | × split | round trips | MB sent | MB received "
            "| bytes × seed | TEE s | serialize s | transport+wait s | server s | offline s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = f"{r.median_s / whole[r.tokens]:.3f}" if r.tokens in whole else "–"
        vs_split = f"{r.median_s / split[r.tokens]:.3f}" if r.tokens in split else "–"
        moved = r.bytes_sent + r.bytes_received
        vs_seed = f"{moved / seed_bytes[r.tokens]:.3f}" if r.tokens in seed_bytes and r.round_trips else "–"
        b = r.breakdown_s
        rows.append(f"| {r.mode} | {r.tokens} | {r.median_s:.4f} | {batch * r.tokens / r.median_s:.1f} | {ratio} "
                    f"| {vs_split} | {r.round_trips} | {r.bytes_sent / 1e6:.2f} | {r.bytes_received / 1e6:.2f} "
                    f"| {vs_seed} | " + " | ".join(f"{b.get(k, 0.0):.4f}" for k in BREAKDOWN_KEYS)
                    + (f" | {r.offline_s:.4f} |" if r.offline_s else " | – |"))
    return "\n".join(rows)


def paired_ratios(results: list[ModeResult], baseline: str = "split") -> list[str]:
    """Each mode's time over the baseline's in the same round, median (min–max) over rounds.
    Rounds run every mode in turn, so a ratio within one round is less sensitive than the ratio
    of two medians to a shared machine's drift between rounds (not to noise within a round)."""
    base = {r.tokens: r.runs_s for r in results if r.mode == baseline}
    lines = []
    for r in results:
        if r.mode == baseline or r.tokens not in base or len(r.runs_s) < 2:
            continue
        ratios = [mine / theirs for mine, theirs in zip(r.runs_s, base[r.tokens])]
        lines.append(f"{r.mode}, {r.tokens} tokens: {statistics.median(ratios):.3f} × {baseline} round by round "
                     f"({min(ratios):.3f}–{max(ratios):.3f})")
    return lines


def plot(results: list[ModeResult], path: Path, title: str) -> None:
    """Left: median prefill time against prompt length, one line per mode. Right: one panel per
    length, a bar per mode of its median seconds, stacked by part (same mode colours as the left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import NullLocator

    modes = list(dict.fromkeys(r.mode for r in results))
    tokens = sorted({r.tokens for r in results})
    spare = iter(plt.get_cmap("tab10").colors[7:] * len(modes))  # modes this table does not know
    colors = {mode: MODE_COLORS.get(mode) or next(spare) for mode in modes}
    fig = plt.figure(figsize=(max(9.0, 2.5 + 0.55 * len(modes) * len(tokens)), 9.5))
    grid = fig.add_gridspec(2, len(tokens), height_ratios=(1, 1.15))
    line = fig.add_subplot(grid[0, :])
    bars = [fig.add_subplot(grid[1, j]) for j in range(len(tokens))]
    for mode in modes:
        points = sorted((r.tokens, r.median_s) for r in results if r.mode == mode)
        line.plot([t for t, _ in points], [s for _, s in points], marker="o", color=colors[mode], label=mode)
    line.set(xlabel="prompt tokens", ylabel="prefill time, median (s)", title="Prefill time", xscale="log",
             yscale="log")
    line.set_xticks(tokens, [str(t) for t in tokens])
    line.xaxis.set_minor_locator(NullLocator())
    line.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="mode")
    for ax, n in zip(bars, tokens):
        cells = [r for r in results if r.tokens == n]
        for x, r in enumerate(cells):
            bottom = 0.0
            for key in BREAKDOWN_KEYS:
                value = r.breakdown_s.get(key, 0.0)
                ax.bar(x, value, 0.75, bottom=bottom, color=PART_GREYS[key], edgecolor="white", linewidth=0.5)
                bottom += value
            ax.bar(x, bottom, 0.75, fill=False, edgecolor=colors[r.mode], linewidth=2)
            ax.text(x, bottom, f"{r.median_s:.3g} s", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(cells)), [r.mode for r in cells], rotation=35, ha="right", fontsize=8)
        for label, r in zip(ax.get_xticklabels(), cells):
            label.set_color(colors[r.mode])
        ax.set_title(f"{n} tokens", fontsize=10)
        ax.margins(y=0.12)
    bars[0].set_ylabel("where the time goes: seconds, median")
    parts = [Patch(facecolor=PART_GREYS[key], edgecolor="black", linewidth=0.5, label=key.replace("_", " "))
             for key in BREAKDOWN_KEYS]
    fig.legend(handles=parts, loc="lower center", ncol=len(parts), fontsize=8, frameon=False,
               title="parts of a mode's time (its bar's outline is the mode's colour)", title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _check_can_plot() -> None:
    """--plot needs matplotlib (the `bench` extra): say so before the benchmark, not after it."""
    from .errors import InputError

    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise InputError(f"--plot needs matplotlib, which cannot be imported here ({err}); "
                         "pip install 'tsqp[bench]'") from None


def wire_accuracy(endpoint: str, model_dir: str, tokens: int, vocab_size: int) -> list[dict]:
    """Each wire dtype's logits error (all positions) against the whole model on the same server."""
    import torch

    from . import api
    from .transport import Client

    ids = torch.randint(0, vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    with Client(endpoint) as client:
        reference = client.call("Whole", [ids], all_positions=True).tensors[0].float()
    rows = []
    for wire in ("float32", "float16", "bfloat16"):
        runner = api.connect(endpoint, model_dir, wire_dtype=wire)
        logits = runner.prefill(ids, all_positions=True).logits
        runner.client.close()
        error = ((logits - reference).abs().max() / reference.abs().max()).item()
        rows.append({"wire_dtype": wire, "tokens": tokens, "rel_error": error})
    return rows


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from . import api
    from .config import load_config
    from .errors import InputError
    from .models import cached_model
    from .report import json_to_stdout, write_json
    from .transport import Client

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise InputError(f"unknown mode(s) {', '.join(unknown) or '(none)'} (choose from: {', '.join(MODES)})")
    try:
        token_counts = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        raise InputError(f"--tokens must be comma-separated integers, got '{args.tokens}'") from None
    if min(token_counts) < 1 or args.repeat < 1 or args.batch < 1:
        raise InputError("--tokens, --repeat and --batch must be positive")
    if args.verify and args.dtype != "float32":
        raise InputError(f"--verify checks float32 products: it needs --dtype float32, not {args.dtype}")
    if args.verify and args.wire_dtype != "float32":
        raise InputError(f"--verify checks float32 products: it needs --wire-dtype float32, not {args.wire_dtype}")
    if args.plot:
        _check_can_plot()
    model_dir = str(args.model or cached_model(args.preset or "tiny"))
    config = load_config(model_dir)
    if max(token_counts) > config.max_position_embeddings:
        raise InputError(f"{max(token_counts)} tokens exceed max_position_embeddings ({config.max_position_embeddings})")

    local = None if not args.ipc else f"ipc://{tempfile.mkdtemp(prefix='tsqp-bench-')}/server.sock"
    server = None if args.endpoint else api.spawn_server(model_dir, device=args.device, dtype=args.dtype,
                                                         endpoint=local, shm=args.shm)
    endpoint = args.endpoint or server.endpoint
    try:
        with Client(endpoint) as client:
            server_info = client.ping()
        runners: dict[str, Callable[[torch.Tensor], Run]] = {}
        clients = []
        for mode in modes:
            if mode in ("split", "split-seed"):
                # split-seed is the seed's protocol as specified: float32 on the wire, always
                wire = args.wire_dtype if mode == "split" else "float32"
                runner = api.connect(endpoint, model_dir, "lean" if mode == "split" else "seed", wire, shm=args.shm)
                clients.append(runner.client)
                runners[mode] = _split_runner(runner)
            elif mode == "whole":
                client = api.connect(endpoint, model_dir).client
                clients.append(client)
                runners[mode] = _whole_runner(client)
            else:
                runners[mode] = _tee_only_runner(model_dir)
        for mode, protection, verify in guarded_modes(args.protection, args.verify):
            runner = api.connect(endpoint, model_dir, "lean", args.wire_dtype, protection=protection, verify=verify,
                                 shm=args.shm)
            clients.append(runner.client)
            runners[mode] = _split_runner(runner, guarded=True)
        print(f"Benchmarking {model_dir} on server device {server_info['device']} ({server_info['dtype']}), "
              f"tokens {token_counts}, {args.repeat} runs per mode after a warm-up", file=sys.stderr)
        results = measure(runners, token_counts, args.batch, args.repeat, config.vocab_size)
        accuracy = wire_accuracy(endpoint, model_dir, min(token_counts), config.vocab_size) if args.accuracy else []
        for client in clients:
            client.close()
    finally:
        if server is not None:
            server.stop()

    report = {
        "device": server_info["device"], "model": model_dir, "dtype": server_info["dtype"],
        "wire_dtype": args.wire_dtype, "batch": args.batch, "repeat": args.repeat,
        "transport": ("ipc" if args.ipc else "tcp") + ("+shm" if args.shm else ""),
        "host": {"machine": platform.machine(), "cpus": __import__("os").cpu_count(), "torch": torch.__version__},
        "results": [asdict(r) for r in results], "wire_accuracy": accuracy,
    }
    out = sys.stderr if json_to_stdout(args.json) else sys.stdout
    print(markdown_table(results, args.batch), file=out)
    for line in paired_ratios(results):
        print(line, file=out)
    for row in accuracy:
        print(f"wire {row['wire_dtype']}: logits max|Δ|/max|ref| = {row['rel_error']:.2e} at {row['tokens']} tokens",
              file=out)
    if args.json:
        write_json(args.json, report, "results", notes=sys.stderr)
    if args.plot:
        plot(results, args.plot, f"TSQP prefill, {Path(model_dir).name}, server {server_info['device']}")
        print(f"plot written to {args.plot}", file=sys.stderr)
