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
from typing import TYPE_CHECKING, Callable, Sequence

# The TEE side and a CPU server often share cores, and take turns: OpenMP workers that spin while
# their process waits steal cycles from the other one (measured: split 1.18x -> 1.05x of whole).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .api import env  # noqa: E402  (imports torch, after the OpenMP setting)

if TYPE_CHECKING:
    import torch

if TYPE_CHECKING:
    from .keys import ClientKeys

RULE = "=" * 60


def _common_runner_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", choices=("lean", "seed"), default="lean",
                   help="lean: fused calls, 4 round trips per layer (default); seed: the seed's 9 per layer "
                        "(lean only with --protection private / --verify)")
    p.add_argument("--wire-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype of activations on the wire (float32 is exact; default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait for any one server reply on a live connection (default: %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="S",
                   help="seconds to (re)connect to the server, handshake included (default: %(default)s)")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="resends of a call after a lost connection or a timeout (default: %(default)s)")
    p.add_argument("--shm", action="store_true",
                   help="move tensors through shared memory instead of the socket (same host; the server needs --shm)")
    p.add_argument("--server-public-key", metavar="FILE", default=env("TSQP_SERVER_PUBLIC_KEY"),
                   help="CurveZMQ: the server's public key file (pinned) [$TSQP_SERVER_PUBLIC_KEY]")
    p.add_argument("--client-secret-key", metavar="FILE", default=env("TSQP_CLIENT_SECRET_KEY"),
                   help="CurveZMQ: this client's NAME.key_secret file [$TSQP_CLIENT_SECRET_KEY]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsqp", description="LLaMA inference split between a TEE (control flow, non-linear ops) and an "
                                 "untrusted GPU server (linear algebra), over ZeroMQ.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the GPU server", description="Load a local LLaMA model directory and "
                       "serve the linear algebra over ZeroMQ (REQ clients, a ROUTER server; msgpack header + raw tensor frames).")
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
    p.add_argument("--server-secret-key", metavar="FILE", default=env("TSQP_SERVER_SECRET_KEY"),
                   help="CurveZMQ: the server's NAME.key_secret file (`tsqp keygen`) [$TSQP_SERVER_SECRET_KEY]")
    p.add_argument("--allow-keys", metavar="DIR", default=env("TSQP_ALLOWED_KEYS_DIR"),
                   help="CurveZMQ: directory of client public keys (*.key) allowed in [$TSQP_ALLOWED_KEYS_DIR]")
    p.add_argument("--insecure", action="store_true",
                   help="allow plaintext on a non-loopback interface (without it, such a bind needs keys)")
    p.add_argument("--max-message-mb", type=float, default=4096, metavar="MB",
                   help="largest frame accepted; a bigger one drops its sender (default: %(default)g)")
    p.add_argument("--shm", action="store_true",
                   help="also take tensors through shared memory from clients on this host that ask (--shm); "
                        "only for trusted local clients (see tsqp/shm.py)")
    p.add_argument("--audit", type=Path, metavar="DIR",
                   help="record every request as received (DIR/requests.jsonl + .npy tensors): what the host sees")
    p.add_argument("--tamper", choices=("element", "row", "scale"),
                   help="TESTING ONLY: corrupt every compute reply, to see --verify catch it")
    p.add_argument("--log-level", default=env("TSQP_LOG_LEVEL", "INFO"), choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="structured key=value logs on stderr; DEBUG adds a line per request [$TSQP_LOG_LEVEL; INFO]")
    p.add_argument("--parent-pid", type=int, metavar="PID",
                   help="stop when process PID is no longer this one's parent (a benchmark or script that "
                        "started this server and was killed); set by the Python API's spawn_server")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keygen", help="write a CurveZMQ key pair (NAME.key, NAME.key_secret)",
                       description="Write a CurveZMQ key pair: NAME.key (public: give it to the peer that must "
                                   "trust you; clients' go in the server's --allow-keys directory) and "
                                   "NAME.key_secret (mode 0600: keep it).")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write into (created)")
    p.add_argument("--name", required=True, help="file name stem, e.g. server or tee-1")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_keygen)

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
    p.add_argument("--protection", choices=("none", "private"), default="none",
                   help="private: the server never sees token ids, activations or logits in clear (one-time "
                        "masks, attention and embedding in the TEE; docs/security.md). default: none")
    p.add_argument("--verify", action="store_true",
                   help="check every outsourced product with Freivalds' algorithm; stop on a wrong result "
                        "(float32 products only: a float32 server and wire)")
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
    from .keys import ServerKeys
    from .logs import configure
    from .transport import bind_endpoint

    if not args.model:
        raise SystemExit("error: no model: pass --model DIR or set LLAMA_MODEL_PATH")
    if args.max_message_mb <= 0:
        raise ValueError("--max-message-mb must be positive")
    if args.shm and (args.audit or args.tamper):
        raise ValueError("--audit and --tamper work on the socket's frames: use them without --shm")
    if args.parent_pid is not None and args.parent_pid != os.getppid():
        raise ValueError(f"--parent-pid {args.parent_pid} is not this server's parent (that is {os.getppid()})")
    configure(args.log_level)
    endpoint = args.endpoint or bind_endpoint(args.port, args.host)
    keys = ServerKeys.from_options(args.server_secret_key, args.allow_keys)
    limits = server.Limits(max_message_bytes=int(args.max_message_mb * (1 << 20)))
    stop = threading.Event()
    _install_stop_handlers(stop)
    if args.parent_pid is not None:
        _stop_when_orphaned(stop, args.parent_pid)
    server.run(args.model, args.device, args.dtype, endpoint, stop, keys=keys, insecure=args.insecure, limits=limits,
               wrap=_server_wrapper(args), shm=args.shm)
    print("server stopped", flush=True)


def _server_wrapper(args: argparse.Namespace):
    """--audit and --tamper as one handler decorator (or None)."""
    from . import audit

    wrappers = []
    if args.tamper:
        print(f"warning: --tamper {args.tamper}: this server returns WRONG results (testing only)", file=sys.stderr)
        wrappers.append(lambda handle: audit.tampering(handle, args.tamper))
    if args.audit:
        log = audit.AuditLog(args.audit)
        wrappers.append(lambda handle: audit.audited(handle, log))
    if not wrappers:
        return None

    def wrap(handle):
        for wrapper in wrappers:
            handle = wrapper(handle)
        return handle

    return wrap


def _stop_when_orphaned(stop: threading.Event, parent_pid: int, every_s: float = 0.5) -> None:
    """Set `stop` once `parent_pid` is no longer our parent: it died, however (even SIGKILL), and
    a server nobody will stop must not hold its model and port forever."""
    def watch() -> None:
        while not stop.wait(every_s):
            if os.getppid() != parent_pid:
                print(f"parent process {parent_pid} is gone: stopping", file=sys.stderr, flush=True)
                stop.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _install_stop_handlers(stop: threading.Event) -> None:
    """SIGINT/SIGTERM: finish the request in progress, then stop. A second one exits at once."""
    import logging

    from .logs import log_event

    def on_signal(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log_event(logging.getLogger("tsqp.server"), logging.WARNING, "forced_exit", signal=name)
            os._exit(128 + signum)
        log_event(logging.getLogger("tsqp.server"), logging.INFO, "stopping", signal=name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


def cmd_keygen(args: argparse.Namespace) -> None:
    from .keys import generate, load_public

    public, secret = generate(args.out, args.name, force=args.force)
    print(f"public key: {public}  ({load_public(public).decode()})")
    print(f"secret key: {secret}  (mode 0600: keep it on this host)")


def _client_options(args: argparse.Namespace) -> dict:
    """api.connect keywords from the runner options: timeouts, retries, CurveZMQ keys, shm."""
    from .keys import ClientKeys

    if args.retries < 0 or args.timeout <= 0 or args.connect_timeout <= 0:
        raise ValueError("--timeout and --connect-timeout must be positive, --retries >= 0")
    return {"timeout_s": args.timeout, "connect_timeout_s": args.connect_timeout, "retries": args.retries,
            "keys": ClientKeys.from_options(args.server_public_key, args.client_secret_key), "shm": args.shm}


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


def print_report(result, runner, offline=None, out=sys.stdout) -> None:
    w = result.wire
    print(RULE, "Running Prefill Benchmark", RULE, sep="\n", file=out)
    print(f"Token length: {result.tokens}" + (f" x batch {result.batch}" if result.batch > 1 else ""), file=out)
    if runner.guarded:
        guards = [g for g, on in (("private: one-time masks", runner.protection == "private"),
                                  ("verify: Freivalds checks", runner.verify)) if on]
        print("TEE operations: Embedding, Softmax, RMSNorm, RotaryEmbedding, SiLU, Q·K^T, P·V", file=out)
        print(f"GPU operations: Linear ({', '.join(guards)})", file=out)
    else:
        if runner.protocol == "seed":
            print("TEE operations: Softmax, RMSNorm, RotaryEmbedding, SiLU", file=out)
            print("GPU operations: Linear, Embedding, Matmul", file=out)
        else:
            print("TEE operations: Softmax, RMSNorm, SiLU (and the rotary tables)", file=out)
            print("GPU operations: Embedding, QKVScores (q/k/v, RoPE, Q·K^T), AttnOut (P·V + o_proj), "
                  "Gate (gate, up), GatedDown (· up, down_proj), LMHead", file=out)
    via = ", shared memory" if runner.client.shm else ""
    print(f"Protocol: {runner.protocol} (wire {runner.wire_dtype}{via}), {w.round_trips} round trips, "
          f"{w.bytes_sent / 1e6:.2f} MB sent, {w.bytes_received / 1e6:.2f} MB received", file=out)
    print(RULE, file=out)
    print(f"Prefill time: {result.seconds:.4f} seconds", file=out)
    print(f"Throughput: {result.throughput:.2f} tokens/sec", file=out)
    if offline is not None:
        print(f"Offline phase (not in the prefill time): {offline.seconds:.4f} seconds, "
              f"{offline.bytes / 1e6:.1f} MB of one-time material for {offline.prefills} prefill", file=out)
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
        "logits_shape": list(result.logits.shape), "protection": runner.protection, "verify": runner.verify,
    }


def run_prefill(args: argparse.Namespace, runner, input_ids: "torch.Tensor") -> None:
    import numpy as np

    runner.check_input(input_ids)
    for _ in range(args.warmup):
        runner.prefill(input_ids, all_positions=args.all_positions)
    offline = runner.prepare(*input_ids.shape, all_positions=args.all_positions) if runner.guarded else None
    result = runner.prefill(input_ids, all_positions=args.all_positions)
    print_report(result, runner, offline)
    if args.save_logits:
        np.save(args.save_logits, result.logits.float().numpy())
        print(f"logits written to {args.save_logits}")
    if args.json:
        figures = {**result_json(result, runner), "offline_s": offline.seconds if offline else 0.0}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {args.json}")


def cmd_prefill(args: argparse.Namespace) -> None:
    from . import api
    from .config import load_config
    from .errors import InputError

    if args.warmup < 0:
        raise InputError("--warmup must be >= 0")
    # Everything local is checked before the server is contacted.
    config = load_config(args.model) if args.model else None
    input_ids = _input_ids(args, config.vocab_size) if config else None
    if config and input_ids.shape[1] > config.max_position_embeddings:
        raise InputError(f"{input_ids.shape[1]} tokens exceed the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = api.connect(args.endpoint, args.model, args.protocol, args.wire_dtype, protection=args.protection,
                             verify=args.verify, **_client_options(args))
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


def _demo_keys(key_dir: Path) -> tuple[dict, "ClientKeys | None"]:
    """Fresh server and client key pairs for the demo (none where libzmq lacks CurveZMQ)."""
    import shutil

    import zmq

    from .keys import ClientKeys, generate

    if not zmq.has("curve"):
        return {}, None
    server_public, server_secret = generate(key_dir, "server")
    tee_public, tee_secret = generate(key_dir, "tee")
    allowed = key_dir / "allowed"
    allowed.mkdir()
    shutil.copy(tee_public, allowed)  # the allow-list holds public keys only
    keys = ClientKeys.from_files(server_public, tee_secret)
    return {"server_secret_key": server_secret, "allow_keys": allowed, "client_keys": keys}, keys


def _demo_prefill(runner, model_dir: Path, tokens: int):
    from .models import fit_prompt, load_tokenizer

    print(f"✓ TEE model initialized from {model_dir}: {runner.config.num_layers} layers\n")
    prompt = "The enclave keeps the softmax; the server does the matrix work."
    input_ids = fit_prompt(load_tokenizer(model_dir), prompt, tokens, 1)
    try:
        runner.prefill(input_ids)  # warm-up
        result = runner.prefill(input_ids)
    finally:
        runner.client.close()
    print_report(result, runner)
    return result, input_ids


def cmd_demo(args: argparse.Namespace) -> None:
    import tempfile

    import torch

    from . import api
    from .models import cached_model

    model_dir = cached_model("tiny")
    print(f"Model: {model_dir} (random tiny LLaMA, made locally)")
    with tempfile.TemporaryDirectory(prefix="tsqp-demo-keys-") as key_dir:
        server_options, keys = _demo_keys(Path(key_dir))
        with api.spawn_server(model_dir, device="cpu", **server_options) as server:
            channel = "CurveZMQ, ephemeral keys" if keys else "plaintext: this libzmq has no CurveZMQ"
            print(f"✓ GPU server started at {server.endpoint} (pid {server.process.pid}; {channel})")
            runner = api.connect(server.endpoint, model_dir=model_dir, keys=keys)
            result, input_ids = _demo_prefill(runner, model_dir, args.tokens)
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    reference = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    with torch.inference_mode():
        expected = reference(input_ids, logits_to_keep=1).logits
    error = ((result.logits - expected).abs().max() / expected.abs().max()).item()
    print(f"Check against transformers' LlamaForCausalLM: max|Δ|/max|ref| = {error:.2e} "
          f"({'OK' if error <= 1e-4 else 'MISMATCH'})")
    print("✓ server stopped")
    if error > 1e-4:
        raise SystemExit(1)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread: a client unwinds as on ^C and removes its shared memory."""


def _on_sigterm(signum: int, _frame) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import TsqpError

    handler: Callable[[argparse.Namespace], None] = args.func
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None  # serve installs its own
    try:
        handler(args)
    except (TsqpError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
