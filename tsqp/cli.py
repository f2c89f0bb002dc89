"""`tsqp`: serve a model, run a split prefill or a generation, make local models, demo, benchmark."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn, Sequence

from . import __version__
from .environment import blame, check_choices, env, values_from_environment
from .heap import keep_freed_memory
from .logs import configure as configure_logs
from .report import print_generation, print_report
from .spinning import (CLIENT_SPIN_ENV, CLIENT_SPIN_EPILOG, SERVER_SPIN_ENV, SERVER_SPIN_US, check_spin_us,
                       client_spin_budget, spin_budget)
from .tee_commands import DEFAULT_TOKENS

# The TEE side and a CPU server often share cores, and take turns: OpenMP workers that spin while
# their process waits steal cycles from the other one (docs/benchmarks.md).
# Set before anything imports torch; nothing above does (`tsqp keygen` never loads it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if TYPE_CHECKING:
    from .keys import ClientKeys


class OneLineErrors(argparse.ArgumentParser):
    """argparse's parser, whose usage errors (a missing option, a bad value) are one line like
    every other error of tsqp's; the usage is one --help away. Its sub-parsers are of its class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="tsqp", description="LLaMA inference split between a TEE (control flow, non-linear ops) and an "
                                 "untrusted GPU server (linear algebra), over ZeroMQ.",
        epilog="Each command has --help; environment variables it reads are named there as [$NAME].")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the GPU server", description="Load a local LLaMA model directory and "
                       "serve its linear algebra to TEE runners over ZeroMQ, many clients at once; every request "
                       "is checked before any work, and a bad one gets an error reply (README: Protocol, "
                       "Operations).")
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
    p.add_argument("--max-reply-mb", type=float, metavar="MB",
                   help="most one request may produce, in its wire dtype (default: 4 x the model's largest honest "
                        "reply at full length, at most 4096)")
    p.add_argument("--session-memory-mb", type=float, default=2048, metavar="MB",
                   help="memory all sessions' kept tensors (V, up) may take; the least recently used are dropped "
                        "first (default: %(default)g)")
    p.add_argument("--session-idle-s", type=float, default=300, metavar="S",
                   help="drop a session unused this long (default: %(default)g)")
    p.add_argument("--shm", action="store_true",
                   help="also take tensors through shared memory, and headers over a Unix socket, from clients on "
                        "this host that ask for it (their own --shm); only for trusted local clients (see "
                        "tsqp/shm.py, tsqp/fastlink.py)")
    p.add_argument("--spin-us", type=float, metavar="US",
                   help="poll this long for the next request before blocking, while requests come that quickly, "
                        f"as a decode's calls do; 0: always block [${SERVER_SPIN_ENV}; default {SERVER_SPIN_US:g}]")
    p.add_argument("--audit", type=Path, metavar="DIR",
                   help="record every request as received (DIR/requests.jsonl + .npy tensors): what the host sees")
    p.add_argument("--tamper", choices=("element", "row", "scale"),
                   help="TESTING ONLY: corrupt every compute reply, to see --verify catch it")
    p.add_argument("--log-level", default=env("TSQP_LOG_LEVEL", "INFO"), choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="structured key=value logs on stderr; DEBUG adds a line per request "
                        "[$TSQP_LOG_LEVEL; default INFO]")
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

    from .tee_commands import add_tee_parsers

    add_tee_parsers(sub)

    p = sub.add_parser("make-model", help="write a random-weight LLaMA model directory (no network)",
                       description="Write a Hugging Face LLaMA model directory with seeded random weights and a "
                                   "small locally trained BPE tokenizer: real shapes, no download. Nothing "
                                   "half-written is ever left at --out.")
    p.add_argument("--preset", required=True, help="tiny, tinyllama-1.1b or llama-3.2-1b")
    p.add_argument("--out", required=True, type=Path, help="directory to create")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="storage dtype (default: float32 for tiny, bfloat16 for the 1B presets)")
    p.add_argument("--force", action="store_true", help="replace a tsqp model already at --out")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("demo", help="make the tiny model, serve it, run a split prefill and a generation, check "
                                    "them, stop",
                       description="Make (once, cached) the tiny random model, start a server for it in its own "
                                   "process, run a split prefill of a fixed sentence and generate a few tokens from "
                                   "it, check the logits and the tokens against transformers' LlamaForCausalLM, "
                                   "and stop the server.",
                       epilog="environment: $TSQP_CACHE, where the model is cached (default ~/.cache/tsqp); "
                              f"{CLIENT_SPIN_EPILOG}")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, metavar="N",
                   help="fit the demo's sentence to N tokens (default %(default)s)")
    p.set_defaults(func=cmd_demo)

    from .bench import add_bench_parser

    add_bench_parser(sub)
    for command in sub.choices.values():  # main() reads each command's own options and variables
        command.set_defaults(command_parser=command)
    return parser


# -- commands ---------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    from . import server
    from .config import load_config
    from .keys import ServerKeys
    from .logs import configure
    from .outputs import make_dir
    from .transport import bind_endpoint

    if not args.model:
        raise SystemExit("error: no model: pass --model DIR or set LLAMA_MODEL_PATH")
    for flag in ("max_message_mb", "max_reply_mb", "session_memory_mb", "session_idle_s"):
        value = getattr(args, flag)
        if value is not None and not 0 < value < math.inf:  # refuses NaN too
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive number, got {value}")
    spin_s = (check_spin_us(args.spin_us, "--spin-us") if args.spin_us is not None
              else spin_budget(SERVER_SPIN_ENV, SERVER_SPIN_US))
    if args.shm and (args.audit or args.tamper):
        raise ValueError("--audit and --tamper work on the socket's frames: use them without --shm")
    if args.parent_pid is not None and args.parent_pid != os.getppid():
        raise ValueError(f"--parent-pid {args.parent_pid} is not this server's parent (that is {os.getppid()})")
    make_dir(args.audit, "--audit")
    endpoint = bind_endpoint(args.endpoint) if args.endpoint else bind_endpoint(args.port, args.host)
    load_config(args.model)  # a directory that is no model is named before the port is taken
    configure(args.log_level)
    keys = ServerKeys.from_options(args.server_secret_key, args.allow_keys)
    mib = 1 << 20
    limits = server.Limits(max_message_bytes=int(args.max_message_mb * mib),
                           max_reply_bytes=int(args.max_reply_mb * mib) if args.max_reply_mb else None,
                           session_bytes=int(args.session_memory_mb * mib), session_idle_s=args.session_idle_s)
    stop = threading.Event()
    _install_stop_handlers(stop)
    if args.parent_pid is not None:
        _stop_when_orphaned(stop, args.parent_pid)
    server.run(args.model, args.device, args.dtype, endpoint, stop, keys=keys, insecure=args.insecure, limits=limits,
               wrap=_server_wrapper(args), shm=args.shm, spin_s=spin_s)
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


def cmd_make_model(args: argparse.Namespace) -> None:
    from .errors import InputError
    from .models import PRESETS, check_target, make_model
    from .outputs import make_dir

    if args.preset not in PRESETS:
        raise InputError(f"unknown preset '{args.preset}' (choose from: {', '.join(PRESETS)})")
    make_dir(args.out.parent, "--out")
    check_target(args.out.expanduser().absolute(), args.force)  # refused before it is announced
    dtype = args.dtype or ("float32" if args.preset == "tiny" else "bfloat16")
    print(f"Making preset '{args.preset}' (seed {args.seed}, {dtype}) in {args.out} ...", flush=True)
    path = make_model(args.preset, args.out, seed=args.seed, dtype=dtype, force=args.force)
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


DEMO_PROMPT = "The enclave keeps the softmax; the server does the matrix work."
DEMO_NEW_TOKENS = 12


def _demo_run(runner, model_dir: Path, tokens: int):
    """A warm prefill of the demo's sentence, then a short greedy generation from it."""
    from .tee_commands import _stream
    from .text import encode_prompt, load_tokenizer

    print(f"✓ TEE model initialized from {model_dir}: {runner.config.num_layers} layers\n")
    prompt = encode_prompt(load_tokenizer(model_dir), DEMO_PROMPT, tokens)
    print(prompt.describe())
    try:
        runner.prefill(prompt.ids)  # warm-up
        result = runner.prefill(prompt.ids)
        print_report(result, runner)
        print(f"\nGenerating {DEMO_NEW_TOKENS} tokens (greedy; the model's weights are random, so is its text):")
        generation = runner.generate(prompt.ids, DEMO_NEW_TOKENS, ignore_eos=True)
        _stream(generation, model_dir, 1, sys.stdout)
    finally:
        runner.client.close()
    print_generation(generation.result, runner)
    return result, prompt.ids, generation.result.tokens


def cmd_demo(args: argparse.Namespace) -> None:
    import tempfile

    import torch

    from . import api
    from .config import load_config
    from .errors import InputError
    from .models import cached_model

    model_dir = cached_model("tiny")
    longest = load_config(model_dir).max_position_embeddings - DEMO_NEW_TOKENS
    if not 1 <= args.tokens <= longest:
        raise InputError(f"--tokens must be 1 to {longest} (the tiny model's {longest + DEMO_NEW_TOKENS} positions "
                         f"less the {DEMO_NEW_TOKENS} the demo generates), got {args.tokens}")
    print(f"Model: {model_dir} (random tiny LLaMA, made locally)")
    with tempfile.TemporaryDirectory(prefix="tsqp-demo-keys-") as key_dir:
        server_options, keys = _demo_keys(Path(key_dir))
        with api.spawn_server(model_dir, device="cpu", **server_options) as server:
            channel = "CurveZMQ, ephemeral keys" if keys else "plaintext: this libzmq has no CurveZMQ"
            print(f"✓ GPU server started at {server.endpoint} (pid {server.process.pid}; {channel})")
            runner = api.connect(server.endpoint, model_dir=model_dir, keys=keys)
            result, input_ids, generated = _demo_run(runner, model_dir, args.tokens)
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    reference = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    with torch.inference_mode():
        expected = reference(input_ids, logits_to_keep=1).logits
        greedy = reference.generate(input_ids, max_new_tokens=DEMO_NEW_TOKENS, do_sample=False, min_new_tokens=
                                    DEMO_NEW_TOKENS, pad_token_id=0)[:, input_ids.shape[1]:]
    error = ((result.logits - expected).abs().max() / expected.abs().max()).item()
    same = torch.equal(generated, greedy)
    print(f"Check against transformers' LlamaForCausalLM: max|Δ|/max|ref| = {error:.2e} "
          f"({'OK' if error <= 1e-4 else 'MISMATCH'}); generated tokens {'the same' if same else 'DIFFERENT'} "
          f"as its greedy decoding ({'OK' if same else 'MISMATCH'})")
    print("✓ server stopped")
    if error > 1e-4 or not same:
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
    taken = values_from_environment(args.command_parser, args)
    keep_freed_memory()  # the server, the TEE side and the benchmark's whole model alike
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None  # serve installs its own
    try:
        check_choices(args.command_parser, args)
        if f"${CLIENT_SPIN_ENV}" in (args.command_parser.epilog or ""):  # a command that calls a server
            client_spin_budget()  # refused before its work (a model to load), not at its first call
        if args.command != "serve":  # the client's warnings (a retry, a lost link) as the server's: key=value
            configure_logs("WARNING")
        handler(args)
    except (TsqpError, ValueError, OSError) as err:  # OSError: a file the user named (--json, --out...)
        print(f"error: {blame(str(err), taken)}", file=sys.stderr)
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
