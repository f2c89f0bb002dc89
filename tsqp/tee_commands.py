"""The TEE side's commands: `tsqp prefill` and `tsqp generate` (their options, the prompt, the
connection and what they print)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .environment import env, env_int
from .report import json_to_stdout, print_generation, print_report, result_json, write_json
from .spinning import CLIENT_SPIN_EPILOG

if TYPE_CHECKING:
    import torch

DEFAULT_TOKENS = 128  # the seed's PREFILL_TOKEN_LENGTH
NPY_MAGIC = b"\x93NUMPY"


def add_tee_parsers(sub) -> None:
    p = sub.add_parser("prefill", help="run one split prefill against a server and report it",
                       description="The TEE side: reads config, norm weights and rope parameters from its own copy "
                                   "of the model directory, sends the linear algebra to the server.",
                       epilog=f"environment: {CLIENT_SPIN_EPILOG}")
    _connection_options(p)
    _prompt_options(p, "seed for the random ids (default 0; generate's seeds its sampling, from os.urandom without it)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed prefills before the timed one (default 1)")
    p.add_argument("--save-logits", type=Path, metavar="FILE.npy", help="write float32 logits")
    p.add_argument("--all-positions", action="store_true", help="logits for every position, not only the last")
    _output_options(p)
    p.set_defaults(func=cmd_prefill)

    p = sub.add_parser("generate", help="generate text across the boundary, streamed as it comes",
                       description="The TEE side of generation: a split prefill of the prompt, then one token per "
                                   "sequence per step, sampled in the TEE (the server never sees the sampling "
                                   "settings, nor, in private mode, any token). The text streams to stdout; then a "
                                   "report: time to first token, inter-token latency, tokens/s.",
                       epilog=f"environment: {CLIENT_SPIN_EPILOG}")
    _connection_options(p)
    _prompt_options(p, "seed for sampling (and for random ids); default: none, sampling draws from os.urandom "
                      "(prefill's is 0: it seeds random ids only)")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the tokenizer's chat template, as a user turn")
    p.add_argument("--max-new-tokens", type=int, required=True, metavar="N", help="tokens to generate per sequence")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy")
    p.add_argument("--top-k", type=int, metavar="K",
                   help="sample among the K most likely tokens only (default: all; needs --temperature)")
    p.add_argument("--top-p", type=float, metavar="P",
                   help="sample among the fewest tokens whose probability reaches P (default 1: all; needs --temperature)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the model's end-of-sequence token(s)")
    p.add_argument("--save-ids", type=Path, metavar="FILE.npy", help="write int64 [batch, prompt + new], prompt first")
    p.add_argument("--save-logits", type=Path, metavar="FILE.npy",
                   help="write float32 [batch, new, vocab]: the logits each new token was chosen from")
    _output_options(p)
    p.set_defaults(func=cmd_generate)


def _connection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default=env("LLAMA_GPU_ENDPOINT", "localhost:50051"),
                   help="server address, host:port or ipc://path [$LLAMA_GPU_ENDPOINT; default localhost:50051]")
    p.add_argument("--model", default=env("LLAMA_MODEL_PATH"),
                   help="the TEE's local model directory (config, norm weights, tokenizer) [$LLAMA_MODEL_PATH]; "
                        "without it the server's Init is trusted, with a warning")


def _prompt_options(p: argparse.ArgumentParser, seed_help: str) -> None:
    # None = not given: a prompt is fitted only to a --tokens the user asked for, and options the
    # ids' source does not use are refused rather than ignored.
    p.add_argument("--tokens", type=int, metavar="N",
                   help=f"length of the random ids [$PREFILL_TOKEN_LENGTH; default {DEFAULT_TOKENS}]; with --prompt, "
                        "fit the text to N tokens (without it the prompt runs as tokenized)")
    p.add_argument("--batch", type=int, metavar="B", help="sequences at once (default 1; not with --input-ids)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text, tokenized with the model's tokenizer (with the BOS it adds, if any)")
    src.add_argument("--input-ids", type=Path, metavar="FILE.npy",
                     help="a .npy file (numpy.save) of int64 [batch, seq] token ids, used as given")
    p.add_argument("--seed", type=int, help=seed_help)


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="write the run's figures as JSON; '-' writes them to stdout (everything else then goes to "
                        "stderr)")
    p.add_argument("--protection", choices=("none", "private"), default="none",
                   help="private: the server never sees token ids, activations or logits in clear (one-time "
                        "masks, attention and embedding in the TEE; docs/security.md). default: none")
    p.add_argument("--verify", action="store_true",
                   help="check every outsourced product with Freivalds' algorithm; stop on a wrong result "
                        "(a float32 server and wire)")
    p.add_argument("--verify-dtype", choices=("float32", "float64"),
                   help="with --verify, the products it checks: float64 leaves a server no room to move a near-tie "
                        "(docs/security.md), at the cost of float64 GEMMs (default: float32)")
    p.add_argument("--protocol", choices=("lean", "seed"), default="lean",
                   help="lean: fused calls, 2 round trips per layer (default); seed: the seed's 9 per layer "
                        "(refused with --protection private or --verify, whose guarded steps replace lean's)")
    p.add_argument("--wire-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype of activations on the wire (float32 is exact; default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait for any one server reply on a live connection (default: %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="S",
                   help="seconds to (re)connect to the server, handshake included (default: %(default)s)")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="resends of a call after a lost connection or a timeout (default: %(default)s)")
    p.add_argument("--shm", action="store_true",
                   help="move tensors through shared memory and headers over the server's fast link instead of "
                        "the socket (same host; the server needs --shm)")
    add_fastlink_option(p)
    p.add_argument("--server-public-key", metavar="FILE", default=env("TSQP_SERVER_PUBLIC_KEY"),
                   help="CurveZMQ: the server's public key file (pinned) [$TSQP_SERVER_PUBLIC_KEY]")
    p.add_argument("--client-secret-key", metavar="FILE", default=env("TSQP_CLIENT_SECRET_KEY"),
                   help="CurveZMQ: this client's NAME.key_secret file [$TSQP_CLIENT_SECRET_KEY]")


# -- the prompt -----------------------------------------------------------------------------------


def _read_ids_file(path: Path) -> "torch.Tensor":
    import numpy as np
    import torch

    from .errors import InputError

    wanted = "an int64 [batch, seq] array written by numpy.save (.npy)"
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
        array = np.load(path, allow_pickle=False) if magic == NPY_MAGIC else None
    except ValueError as err:
        if "allow_pickle" in str(err):  # an object array: what numpy makes of rows of unequal length
            raise InputError(f"--input-ids {path} holds Python objects, not int64 [batch, seq] (prompts of "
                             "unequal length? a batch's prompts must have the same length)") from None
        raise InputError(f"cannot read --input-ids {path}: {err}") from None
    except OSError as err:
        raise InputError(f"cannot read --input-ids {path}: {err}") from None
    if array is None:
        raise InputError(f"--input-ids {path} is not a .npy file: it must hold {wanted}")
    if array.dtype != np.int64 or array.ndim != 2 or array.size == 0:
        raise InputError(f"--input-ids must hold int64 [batch, seq], got {array.dtype} {list(array.shape)}")
    return torch.from_numpy(array)


def _check_ids_options(args: argparse.Namespace, seed_seeds_sampling: bool = False) -> None:
    """Before anything else runs: the options the ids' source takes, and only those. For random
    ids, --tokens is then set (from $PREFILL_TOKEN_LENGTH or the default when not given)."""
    from .errors import InputError

    for flag, value in (("--tokens", args.tokens), ("--batch", args.batch)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be positive, got {value}")
    ids_seed = None if seed_seeds_sampling else args.seed
    if args.input_ids is not None:
        given = [flag for flag, value in (("--tokens", args.tokens), ("--batch", args.batch), ("--seed", ids_seed))
                 if value is not None]
        if given:
            raise InputError(f"{' and '.join(given)} cannot be used with --input-ids: the file's [batch, seq] "
                             "shape and ids are the prompt")
    if args.prompt is not None:
        if ids_seed is not None:
            raise InputError("--seed cannot be used with --prompt: it seeds random ids only")
        if not args.model:
            raise InputError("--prompt needs a tokenizer.json in the model directory (--model)")
    elif args.input_ids is None and args.tokens is None:  # random ids: the variable is read (and checked) now
        args.tokens = env_int("PREFILL_TOKEN_LENGTH", DEFAULT_TOKENS)
    if getattr(args, "chat", False) and args.prompt is None:
        raise InputError("--chat needs --prompt: it wraps the text in the chat template")


def _input_ids(args: argparse.Namespace, vocab_size: int, out: TextIO) -> "torch.Tensor":
    """The prompt: a file of ids, a text (fitted only to an explicit --tokens, and said so; with
    --chat in the tokenizer's template), or seeded random ids (after _check_ids_options)."""
    import torch

    from .errors import InputError

    if args.input_ids is not None:
        return _read_ids_file(args.input_ids)
    if args.prompt is not None:
        from .text import chat_text, encode_prompt, load_tokenizer

        tokenizer = load_tokenizer(args.model)
        if tokenizer is None:
            raise InputError(f"--prompt needs a tokenizer.json in the model directory, and {args.model} has none")
        chat = getattr(args, "chat", False)
        text = chat_text(args.model, args.prompt) if chat else args.prompt
        prompt = encode_prompt(tokenizer, text, args.tokens, args.batch or 1, special_tokens=not chat)
        print(prompt.describe() + (" (in the chat template)" if chat else ""), file=out)
        return prompt.ids
    generator = torch.Generator().manual_seed(args.seed or 0)
    return torch.randint(0, vocab_size, (args.batch or 1, args.tokens), generator=generator)


# -- connecting -----------------------------------------------------------------------------------


def add_fastlink_option(p: argparse.ArgumentParser) -> None:
    """--no-fastlink, for the TEE commands and the benchmark alike (checked by check_fastlink_option)."""
    p.add_argument("--no-fastlink", dest="fastlink", action="store_false",
                   help="with --shm: send the headers over ZeroMQ, not the server's fast link (to compare, or "
                        "where its Unix socket cannot be reached)")


def check_fastlink_option(args: argparse.Namespace) -> None:
    """--no-fastlink without --shm would change nothing: refused, so nobody thinks it measured something."""
    if not args.fastlink and not args.shm:
        raise ValueError("--no-fastlink only applies with --shm (without it every header goes over ZeroMQ)")


def resolve_verify_dtype(args: argparse.Namespace) -> None:
    """--verify-dtype without --verify would check nothing: refused; else float32 when not given."""
    if args.verify_dtype is not None and not args.verify:
        raise ValueError("--verify-dtype only applies with --verify")
    args.verify_dtype = args.verify_dtype or "float32"


def _client_options(args: argparse.Namespace) -> dict:
    """api.connect keywords from the runner options: timeouts, retries, CurveZMQ keys, shm, fast link."""
    from .keys import ClientKeys

    if args.retries < 0 or args.timeout <= 0 or args.connect_timeout <= 0:
        raise ValueError("--timeout and --connect-timeout must be positive, --retries >= 0")
    check_fastlink_option(args)
    return {"timeout_s": args.timeout, "connect_timeout_s": args.connect_timeout, "retries": args.retries,
            "keys": ClientKeys.from_options(args.server_public_key, args.client_secret_key), "shm": args.shm,
            "fastlink": args.fastlink}


def _connect(args: argparse.Namespace, out: TextIO):
    from . import api

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = api.connect(args.endpoint, args.model, args.protocol, args.wire_dtype, protection=args.protection,
                             verify=args.verify, verify_dtype=args.verify_dtype, **_client_options(args))
    print(f"✓ Connected to GPU server at {args.endpoint}", file=out)
    if args.model:
        print(f"Read model config and norm weights from {args.model} (TEE-local, not from the server)", file=out)
    else:
        print("Initializing model from GPU server...", file=out)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"✓ TEE model initialized: {runner.config.num_layers} layers\n", file=out, flush=True)
    return runner


def _local_prompt(args: argparse.Namespace, out: TextIO, new_tokens: int = 0):
    """The config and prompt from the TEE's own directory, checked before the server is contacted."""
    from .config import load_config
    from .tee.runner import check_ids

    config = load_config(args.model) if args.model else None
    input_ids = _input_ids(args, config.vocab_size, out) if config else None
    if config:
        source = f"--input-ids {args.input_ids}" if args.input_ids is not None else "the prompt"
        check_ids(input_ids, config, new_tokens, source)
    return config, input_ids


# -- the commands ---------------------------------------------------------------------------------


def _check_outputs(args: argparse.Namespace, *names: str) -> None:
    """The files the command will write, refused before any work, naming the flag."""
    from .outputs import check_writable

    for name in names:
        check_writable(getattr(args, name), "--" + name.replace("_", "-"))


def run_prefill(args: argparse.Namespace, runner, input_ids: "torch.Tensor", out: TextIO) -> None:
    import numpy as np

    runner.check_input(input_ids)
    for _ in range(args.warmup):
        runner.prefill(input_ids, all_positions=args.all_positions)
    offline = runner.prepare(*input_ids.shape, all_positions=args.all_positions) if runner.guarded else None
    result = runner.prefill(input_ids, all_positions=args.all_positions)
    print_report(result, runner, offline, out=out)
    if args.save_logits:
        np.save(args.save_logits, result.logits.float().numpy())
        print(f"logits written to {args.save_logits}", file=out)
    if args.json:
        figures = {**result_json(result, runner), "offline_s": offline.seconds if offline else 0.0}
        write_json(args.json, figures, "figures", notes=out)


def cmd_prefill(args: argparse.Namespace) -> None:
    from .errors import InputError

    out = sys.stderr if json_to_stdout(args.json) else sys.stdout
    if args.warmup < 0:
        raise InputError("--warmup must be >= 0")
    _check_outputs(args, "save_logits", "json")
    resolve_verify_dtype(args)
    _check_ids_options(args)  # before torch is even imported
    _, input_ids = _local_prompt(args, out)
    runner = _connect(args, out)
    try:
        if input_ids is None:
            input_ids = _input_ids(args, runner.config.vocab_size, out)
        run_prefill(args, runner, input_ids, out)
    finally:
        runner.client.close()


def cmd_generate(args: argparse.Namespace) -> None:
    from .errors import InputError
    from .tee.sampling import Sampling

    out = sys.stderr if json_to_stdout(args.json) else sys.stdout
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    Sampling(args.temperature, args.top_k, args.top_p, args.seed)  # refuses bad settings now
    _check_outputs(args, "save_ids", "save_logits", "json")
    resolve_verify_dtype(args)
    _check_ids_options(args, seed_seeds_sampling=True)
    _, input_ids = _local_prompt(args, out, args.max_new_tokens)
    runner = _connect(args, out)
    try:
        if input_ids is None:
            input_ids = _input_ids(args, runner.config.vocab_size, out)
        generation = runner.generate(input_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos,
                                     keep_logits=args.save_logits is not None)
        _stream(generation, args.model, input_ids.shape[0], out)
        result = generation.result
    finally:
        runner.client.close()
    print_generation(result, runner, out=out)
    _save_generation(args, runner, input_ids, result, out)


def _stream(generation, model_dir, batch: int, out: TextIO) -> None:
    """Each step's tokens as they come: the text of a single sequence when there is a tokenizer,
    else the ids; a batch's texts once it is done."""
    from .text import TextStream, load_tokenizer

    tokenizer = load_tokenizer(model_dir) if model_dir else None
    stream = TextStream(tokenizer) if tokenizer is not None and batch == 1 else None
    for tokens in generation:
        piece = stream.add(int(tokens[0])) if stream is not None else " ".join(map(str, tokens.tolist())) + "\n"
        print(piece, end="", file=out, flush=True)
    print(file=out)
    if tokenizer is not None and batch > 1:
        for i, row in enumerate(generation.result.tokens.tolist()):
            print(f"[{i}] {tokenizer.decode(row, skip_special_tokens=True)}", file=out)


def _save_generation(args: argparse.Namespace, runner, input_ids: "torch.Tensor", result, out: TextIO) -> None:
    import numpy as np
    import torch

    from .report import generation_json

    if args.save_ids:
        np.save(args.save_ids, torch.cat([input_ids, result.tokens], dim=1).numpy())
        print(f"ids written to {args.save_ids}", file=out)
    if args.save_logits:
        np.save(args.save_logits, result.logits.float().numpy())
        print(f"logits written to {args.save_logits}", file=out)
    if args.json:
        sampling = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "seed", "ignore_eos")}
        write_json(args.json, generation_json(result, runner, sampling), "figures", notes=out)
