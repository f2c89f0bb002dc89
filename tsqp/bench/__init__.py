"""`tsqp bench`: what the split costs, measured in one process run, modes alternating.

Modes:
  split       the lean protocol (fused calls, V kept on the server)
  split-seed  the seed's protocol (9 round trips per layer, float32 wire), the baseline
  whole       the model run whole by transformers on the server's device: the split's speed of light
  tee-only    the model run whole by transformers on the TEE side's CPU: what splitting must beat
  split-private, split-verify, split-private+verify
              added by --protection private and/or --verify: the guarded steps; their offline
              phase (masks, probes) runs before each timed prefill and is reported apart

--decode N adds a decode row per mode: a generation of N + 1 tokens, whose N decode steps are
timed (whole and tee-only: transformers' own decoding with its KV cache). Rows give ms per token
(the median step), round trips and bytes per token, and for the guarded modes the offline phase
per token, with offline + online next to tee-only: what a user pays in all. Every split row also
gives its cost per round trip over the whole model, (split - whole) / round trips.

Every mode is warmed up first; each repetition runs every mode once, in turn (starting one mode
later each time), so drift hits all modes alike; the figure reported is the median, and under the
table each mode's ratio to split round by round (median, min–max). Server time is measured by the
server around the device work (synchronized), so time is split into TEE compute,
(de)serialization, transport and waiting, and server compute.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import asdict
from pathlib import Path

from ..spinning import CLIENT_SPIN_EPILOG
from ..tee_commands import add_fastlink_option, check_fastlink_option, resolve_verify_dtype
from .plot import check_can_plot, plot
from .results import BREAKDOWN_KEYS, ModeResult, Run, add_overheads
from .runners import (guarded_modes, measure, split_decode, split_prefill, tee_only, whole_decode,
                      whole_prefill)
from .tables import decode_table, markdown_table, paired_ratios, total_costs

__all__ = ["BREAKDOWN_KEYS", "ModeResult", "Run", "add_bench_parser", "cmd_bench", "guarded_modes", "markdown_table",
           "measure", "paired_ratios", "plot"]

MODES = ("split", "split-seed", "whole", "tee-only")


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark split vs seed protocol vs whole model vs TEE-only",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n".join(["environment:"] + [textwrap.fill(line, 100, initial_indent="  ",
                                                                              subsequent_indent="    ") for line in (
                           "$TSQP_SERVER_PUBLIC_KEY and $TSQP_CLIENT_SECRET_KEY (CurveZMQ keys of its clients, "
                           "for --endpoint)", "$TSQP_CACHE (where --preset models are made)", CLIENT_SPIN_EPILOG)]))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="local model directory (default: the cached tiny preset)")
    src.add_argument("--preset", help="make (once, cached) and use a preset: tiny, tinyllama-1.1b, llama-3.2-1b")
    p.add_argument("--endpoint", help="an already running server (default: start one locally)")
    p.add_argument("--device", help="device for the local server (default: cuda:0, or cpu)")
    p.add_argument("--ipc", action="store_true", help="talk to the local server over ipc:// instead of tcp loopback")
    p.add_argument("--shm", action="store_true",
                   help="move the split modes' tensors through shared memory and their headers over the server's "
                        "fast link (same host; tsqp/shm.py, tsqp/fastlink.py)")
    add_fastlink_option(p)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="server weights dtype (default float32)")
    p.add_argument("--tokens", default="128", help="comma-separated prompt lengths (default 128)")
    p.add_argument("--batch", type=int, default=1, help="sequences per prefill (default 1)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per mode and length (default 3)")
    p.add_argument("--rtt", action="store_true",
                   help="only the transport: an Echo of 0 B, 8 KiB, 1 MiB and 16 MiB over tcp, ipc, ipc+shm and the "
                        "fast link, "
                        "median and p99 per round trip (tsqp/bench/rtt.py); --repeat scales the calls")
    p.add_argument("--decode", type=int, default=0, metavar="N",
                   help="also time N decode steps after each prompt, per mode (default 0: prefill only)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated subset of {','.join(MODES)} (default: all four)")
    p.add_argument("--wire-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the split modes' activations on the wire (split-seed is always float32; "
                        "default float32)")
    p.add_argument("--protection", choices=("none", "private"), default="none",
                   help="private: also measure split-private (one-time masks, offline phase reported apart)")
    p.add_argument("--verify", action="store_true", help="also measure split-verify (Freivalds checks; float32 only)")
    p.add_argument("--verify-dtype", choices=("float32", "float64"),
                   help="with --verify, the products split-verify checks (default: float32)")
    p.add_argument("--accuracy", action="store_true",
                   help="also measure each wire dtype's logits error against the whole model")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="write results as JSON; '-' writes them to stdout (the table then goes to stderr)")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="plot time vs tokens and, per length, each mode's seconds by part (needs matplotlib)")
    p.set_defaults(func=cmd_bench)


def wire_accuracy(endpoint: str, model_dir: str, tokens: int, vocab_size: int) -> list[dict]:
    """Each wire dtype's logits error (all positions) against the whole model on the same server."""
    import torch

    from .. import api
    from ..transport import Client

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

    from .. import api
    from ..config import load_config
    from ..errors import InputError
    from ..models import cached_model
    from ..outputs import check_writable
    from ..report import json_to_stdout, write_json
    from ..transport import Client

    if args.rtt:
        return _cmd_rtt(args)
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
    if args.decode < 0:
        raise InputError(f"--decode must be >= 0, got {args.decode}")
    check_fastlink_option(args)
    if args.verify and args.dtype != "float32":
        raise InputError(f"--verify checks float32 products: it needs --dtype float32, not {args.dtype}")
    resolve_verify_dtype(args)
    if args.verify and args.wire_dtype != "float32":
        raise InputError(f"--verify checks float32 products: it needs --wire-dtype float32, not {args.wire_dtype}")
    if args.plot:
        check_can_plot()
    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        check_writable(path, flag)
    model_dir = str(args.model or cached_model(args.preset or "tiny"))
    config = load_config(model_dir)
    if max(token_counts) + args.decode + 1 > config.max_position_embeddings:
        raise InputError(f"{max(token_counts)} tokens (+ {args.decode + 1} generated) exceed max_position_embeddings "
                         f"({config.max_position_embeddings})")

    local = None if not args.ipc else f"ipc://{tempfile.mkdtemp(prefix='tsqp-bench-')}/server.sock"
    server = None if args.endpoint else api.spawn_server(model_dir, device=args.device, dtype=args.dtype,
                                                         endpoint=local, shm=args.shm)
    endpoint = args.endpoint or server.endpoint
    try:
        with Client(endpoint) as client:
            server_info = client.ping()
        runners: dict = {}  # by mode, or (mode, "decode")
        clients = []
        steps = args.decode
        for mode in modes:
            if mode in ("split", "split-seed"):
                # split-seed is the seed's protocol as specified: float32 on the wire, always
                wire = args.wire_dtype if mode == "split" else "float32"
                runner = api.connect(endpoint, model_dir, "lean" if mode == "split" else "seed", wire, shm=args.shm,
                                     fastlink=args.fastlink)
                clients.append(runner.client)
                runners[mode] = split_prefill(runner)
                if steps:
                    runners[(mode, "decode")] = split_decode(runner, steps)
            elif mode == "whole":
                client = api.connect(endpoint, model_dir).client
                clients.append(client)
                runners[mode] = whole_prefill(client)
                if steps:
                    runners[(mode, "decode")] = whole_decode(client, steps)
            else:
                runners[mode], decode = tee_only(model_dir, steps)
                if decode is not None:
                    runners[(mode, "decode")] = decode
        for mode, protection, verify in guarded_modes(args.protection, args.verify):
            runner = api.connect(endpoint, model_dir, "lean", args.wire_dtype, protection=protection, verify=verify,
                                 verify_dtype=args.verify_dtype, shm=args.shm,
                                 fastlink=args.fastlink)
            clients.append(runner.client)
            runners[mode] = split_prefill(runner, guarded=True)
            if steps:
                runners[(mode, "decode")] = split_decode(runner, steps)
        print(f"Benchmarking {model_dir} on server device {server_info['device']} ({server_info['dtype']}), "
              f"tokens {token_counts}, {args.repeat} run{'s' if args.repeat != 1 else ''} per mode after a warm-up",
              file=sys.stderr)
        results = measure(runners, token_counts, args.batch, args.repeat, config.vocab_size,
                          progress=sys.stderr.isatty())
        add_overheads(results)
        accuracy = wire_accuracy(endpoint, model_dir, min(token_counts), config.vocab_size) if args.accuracy else []
        fast = any(client.via == "fastlink" for client in clients)  # what the calls took, not what was asked
        for client in clients:
            client.close()
    finally:
        if server is not None:
            server.stop()

    report = {
        "device": server_info["device"], "model": model_dir, "dtype": server_info["dtype"],
        "wire_dtype": args.wire_dtype, "batch": args.batch, "repeat": args.repeat,
        "transport": endpoint.split("://", 1)[0] + ("+shm" if args.shm else "") + ("+fastlink" if fast else ""),
        "host": host_info(),
        "results": [asdict(r) for r in results], "wire_accuracy": accuracy,
    }
    out = sys.stderr if json_to_stdout(args.json) else sys.stdout
    print(markdown_table(results, args.batch), file=out)
    if steps:
        print("\n" + decode_table(results, args.batch), file=out)
    for line in paired_ratios(results) + total_costs(results):
        print(line, file=out)
    for row in accuracy:
        print(f"wire {row['wire_dtype']}: logits max|Δ|/max|ref| = {row['rel_error']:.2e} at {row['tokens']} tokens",
              file=out)
    if args.json:
        write_json(args.json, report, "results", notes=sys.stderr)
    if args.plot:
        what = "prefill and decode" if steps else "prefill"
        plot(results, args.plot, f"TSQP {what}, {Path(model_dir).name}, server {server_info['device']}")
        print(f"plot written to {args.plot}", file=sys.stderr)


def _cmd_rtt(args: argparse.Namespace) -> None:
    import torch

    from ..models import cached_model
    from ..report import json_to_stdout, write_json
    from .rtt import measure_rtt, rtt_table

    model_dir = str(args.model or cached_model(args.preset or "tiny"))
    print(f"Round trips of Echo through a server for {model_dir} (no model work), {args.repeat / 3:g} x the "
          "default calls per payload", file=sys.stderr)
    rows = measure_rtt(model_dir, args.device, scale=args.repeat / 3)
    out = sys.stderr if json_to_stdout(args.json) else sys.stdout
    print(rtt_table(rows), file=out)
    if args.json:
        report = {"model": model_dir, "host": host_info(), "rtt": rows}
        write_json(args.json, report, "results", notes=sys.stderr)


def host_info() -> dict:
    """The host, and which code ran (its directory, and its git commit where it is a checkout):
    the runs of an A/B between two checkouts must be told apart by more than their names; and
    transformers' version, since `whole` and `tee-only` are its code."""
    import torch
    import transformers

    root = Path(__file__).resolve().parents[2]
    try:
        git = [subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10).stdout
               for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])]
    except (OSError, subprocess.SubprocessError):
        git = ["", ""]
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tsqp": str(root / "tsqp"), "commit": git[0].strip() or None, "modified": bool(git[1].strip())}
