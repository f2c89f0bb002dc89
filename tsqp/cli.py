"""`tsqp`: serve a model, run a split prefill, make local models, demo, benchmark."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, Sequence

# The TEE side and a CPU server often share cores, and take turns: OpenMP workers that spin while
# their process waits steal cycles from the other one (measured: split 1.18x -> 1.05x of whole).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .api import env  # noqa: E402  (imports torch, after the OpenMP setting)

RULE = "=" * 60


def _common_runner_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", choices=("lean", "seed"), default="lean",
                   help="lean: fused calls, 5 round trips per layer (default); seed: the seed's 9 per layer")
    p.add_argument("--wire-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype of activations on the wire (float32 is exact; default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait for any one server reply (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsqp", description="LLaMA inference split between a TEE (control flow, non-linear ops) and an "
                                 "untrusted GPU server (linear algebra), over ZeroMQ.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the GPU server", description="Load a local LLaMA model directory and "
                       "serve the linear algebra over ZeroMQ (REQ-REP, msgpack header + raw tensor frames).")
    p.add_argument("--model", default=env("LLAMA_MODEL_PATH"), help="local HF model directory [$LLAMA_MODEL_PATH]")
    p.add_argument("--device", default=env("LLAMA_GPU_DEVICE"),
                   help="torch device [$LLAMA_GPU_DEVICE; default cuda:0, or cpu without CUDA]")
    p.add_argument("--dtype", default=env("LLAMA_DTYPE", "float32"), choices=("float32", "float16", "bfloat16"),
                   help="weights and compute dtype [$LLAMA_DTYPE; default float32]")
    p.add_argument("--port", default=env("LLAMA_GPU_PORT", "50051"), help="tcp port [$LLAMA_GPU_PORT; default 50051]")
    p.add_argument("--host", default=env("LLAMA_GPU_HOST", "127.0.0.1"),
                   help="interface to bind [$LLAMA_GPU_HOST; default 127.0.0.1, loopback only]")
    p.add_argument("--endpoint", help="explicit ZeroMQ bind address (tcp://host:port or ipc://path); "
                   "overrides --host/--port")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("prefill", help="run one split prefill against a server and report it",
                       description="The TEE side: reads config, norm weights and rope parameters from its own copy "
                                   "of the model directory, sends the linear algebra to the server.")
    p.add_argument("--endpoint", default=env("LLAMA_GPU_ENDPOINT", "localhost:50051"),
                   help="server address, host:port or ipc://path [$LLAMA_GPU_ENDPOINT; default localhost:50051]")
    p.add_argument("--model", default=env("LLAMA_MODEL_PATH"),
                   help="the TEE's local model directory (config, norm weights, tokenizer) [$LLAMA_MODEL_PATH]; "
                        "without it the server's Init is trusted, with a warning")
    p.add_argument("--tokens", type=int, default=int(env("PREFILL_TOKEN_LENGTH", "128") or 128),
                   help="prompt length [$PREFILL_TOKEN_LENGTH; default 128]")
    p.add_argument("--batch", type=int, default=1, help="sequences per prefill (default 1)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text, tokenized with the model's tokenizer and fitted to --tokens")
    src.add_argument("--input-ids", type=Path, metavar="FILE.npy", help="int64 [batch, seq] token ids, used as given")
    p.add_argument("--seed", type=int, default=0, help="seed for random token ids (default 0)")
    p.add_argument("--warmup", type=int, default=1, help="untimed prefills before the timed one (default 1)")
    p.add_argument("--save-logits", type=Path, metavar="FILE.npy", help="write float32 logits")
    p.add_argument("--all-positions", action="store_true", help="logits for every position, not only the last")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the run's figures as JSON")
    _common_runner_options(p)
    p.set_defaults(func=cmd_prefill)

    p = sub.add_parser("make-model", help="write a random-weight LLaMA model directory (no network)")
    p.add_argument("--preset", required=True, help="tiny, tinyllama-1.1b or llama-3.2-1b")
    p.add_argument("--out", required=True, type=Path, help="directory to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="storage dtype (default: float32 for tiny, bfloat16 for the 1B presets)")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("demo", help="make the tiny model, serve it, run a split prefill, check it, stop")
    p.add_argument("--tokens", type=int, default=128)
    p.set_defaults(func=cmd_demo)

    from .bench import add_bench_parser

    add_bench_parser(sub)
    return parser


# -- commands ---------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    from . import server
    from .transport import bind_endpoint

    if not args.model:
        raise SystemExit("error: no model: pass --model DIR or set LLAMA_MODEL_PATH")
    endpoint = args.endpoint or bind_endpoint(args.port, args.host)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.run(args.model, args.device, args.dtype, endpoint, stop)
    print("server stopped", flush=True)


def _read_ids_file(path: Path) -> "torch.Tensor":
    import numpy as np
    import torch

    from .errors import InputError

    try:
        array = np.load(path)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read --input-ids {path}: {err}") from None
    if array.dtype != np.int64 or array.ndim != 2 or array.size == 0:
        raise InputError(f"--input-ids must hold int64 [batch, seq], got {array.dtype} {list(array.shape)}")
    return torch.from_numpy(array)


def _input_ids(args: argparse.Namespace, vocab_size: int) -> "torch.Tensor":
    """The prompt: a file of ids, a text fitted to --tokens, or seeded random ids."""
    import torch

    from .errors import InputError

    if args.input_ids is not None:
        return _read_ids_file(args.input_ids)
    if args.tokens < 1 or args.batch < 1:
        raise InputError("--tokens and --batch must be positive")
    if args.prompt is not None:
        from .models import fit_prompt, load_tokenizer

        tokenizer = load_tokenizer(args.model) if args.model else None
        if tokenizer is None:
            raise InputError("--prompt needs a tokenizer.json in the model directory (--model)")
        return fit_prompt(tokenizer, args.prompt, args.tokens, args.batch)
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab_size, (args.batch, args.tokens), generator=generator)


def print_report(result, runner, out=sys.stdout) -> None:
    w = result.wire
    print(RULE, "Running Prefill Benchmark", RULE, sep="\n", file=out)
    print(f"Token length: {result.tokens}" + (f" x batch {result.batch}" if result.batch > 1 else ""), file=out)
    print("TEE operations: Softmax, RMSNorm, RotaryEmbedding, SiLU", file=out)
    print("GPU operations: Linear, Embedding, Matmul", file=out)
    print(f"Protocol: {runner.protocol} (wire {runner.wire_dtype}), {w.round_trips} round trips, "
          f"{w.bytes_sent / 1e6:.2f} MB sent, {w.bytes_received / 1e6:.2f} MB received", file=out)
    print(RULE, file=out)
    print(f"Prefill time: {result.seconds:.4f} seconds", file=out)
    print(f"Throughput: {result.throughput:.2f} tokens/sec", file=out)
    parts = ", ".join(f"{k} {v:.4f}" for k, v in result.breakdown_s.items())
    print(f"Breakdown (s): {parts}", file=out)
    print(f"Logits shape: {result.logits.shape}", file=out)
    print(RULE, file=out, flush=True)


def result_json(result, runner) -> dict:
    return {
        "tokens": result.tokens, "batch": result.batch, "protocol": runner.protocol,
        "wire_dtype": runner.wire_dtype, "endpoint": runner.client.endpoint,
        "prefill_s": result.seconds, "throughput_tokens_per_s": result.throughput,
        "round_trips": result.wire.round_trips, "bytes_sent": result.wire.bytes_sent,
        "bytes_received": result.wire.bytes_received, "breakdown_s": result.breakdown_s,
        "logits_shape": list(result.logits.shape),
    }


def run_prefill(args: argparse.Namespace, runner, input_ids: "torch.Tensor") -> None:
    import numpy as np

    runner.check_input(input_ids)
    for _ in range(args.warmup):
        runner.prefill(input_ids, all_positions=args.all_positions)
    result = runner.prefill(input_ids, all_positions=args.all_positions)
    print_report(result, runner)
    if args.save_logits:
        np.save(args.save_logits, result.logits.float().numpy())
        print(f"logits written to {args.save_logits}")
    if args.json:
        args.json.write_text(json.dumps(result_json(result, runner), indent=2) + "\n")
        print(f"figures written to {args.json}")


def cmd_prefill(args: argparse.Namespace) -> None:
    from . import api
    from .config import load_config
    from .errors import InputError

    if args.warmup < 0:
        raise InputError("--warmup must be >= 0")
    # Everything local is checked before the server is contacted.
    input_ids = _input_ids(args, load_config(args.model).vocab_size) if args.model else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = api.connect(args.endpoint, args.model, args.protocol, args.wire_dtype, timeout_s=args.timeout)
    print(f"✓ Connected to GPU server at {args.endpoint}")
    if args.model:
        print(f"Read model config and norm weights from {args.model} (TEE-local, not from the server)")
    else:
        print("Initializing model from GPU server...")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"✓ TEE model initialized: {runner.config.num_layers} layers\n", flush=True)
    try:
        if input_ids is None:
            input_ids = _input_ids(args, runner.config.vocab_size)
        run_prefill(args, runner, input_ids)
    finally:
        runner.client.close()


def cmd_make_model(args: argparse.Namespace) -> None:
    from .models import make_model

    dtype = args.dtype or ("float32" if args.preset == "tiny" else "bfloat16")
    print(f"Making preset '{args.preset}' (seed {args.seed}, {dtype}) in {args.out} ...", flush=True)
    path = make_model(args.preset, args.out, seed=args.seed, dtype=dtype)
    print(f"✓ model written to {path}")


def cmd_demo(args: argparse.Namespace) -> None:
    import torch

    from . import api
    from .models import cached_model, fit_prompt, load_tokenizer

    model_dir = cached_model("tiny")
    print(f"Model: {model_dir} (random tiny LLaMA, made locally)")
    with api.spawn_server(model_dir, device="cpu") as server:
        print(f"✓ GPU server started at {server.endpoint} (pid {server.process.pid})")
        runner = api.connect(server.endpoint, model_dir=model_dir)
        print(f"✓ TEE model initialized from {model_dir}: {runner.config.num_layers} layers\n")
        prompt = "The enclave keeps the softmax; the server does the matrix work."
        input_ids = fit_prompt(load_tokenizer(model_dir), prompt, args.tokens, 1)
        runner.prefill(input_ids)  # warm-up
        result = runner.prefill(input_ids)
        print_report(result, runner)
        runner.client.close()
    from transformers import LlamaForCausalLM

    reference = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    with torch.inference_mode():
        expected = reference(input_ids, logits_to_keep=1).logits
    error = ((result.logits - expected).abs().max() / expected.abs().max()).item()
    print(f"Check against transformers' LlamaForCausalLM: max|Δ|/max|ref| = {error:.2e} "
          f"({'OK' if error <= 1e-4 else 'MISMATCH'})")
    print("✓ server stopped")
    if error > 1e-4:
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import TsqpError

    handler: Callable[[argparse.Namespace], None] = args.func
    try:
        handler(args)
    except (TsqpError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
