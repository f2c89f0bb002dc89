"""Seed-compatible TEE runner entry point: `python tee_runner.py`, configured by environment variables.

LLAMA_GPU_ENDPOINT (default localhost:50051), LLAMA_MODEL_PATH (the TEE's own copy of the model
directory), PREFILL_TOKEN_LENGTH. Same as `tsqp prefill`, which also takes flags.

It is also the Gramine enclave's entry point (gramine/tee_runner.manifest.template), which sets two
more: TSQP_INTEROP_THREADS (torch reads no variable for its inter-op pool, so this script sizes it
before any work starts) and TSQP_ENCLAVE=gramine (refuse endpoints that cannot leave the enclave).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from tsqp.cli import build_parser, main
from tsqp.transport import client_endpoint, is_loopback

PREFILL_TOKEN_LENGTH = 128  # the seed's knob; $PREFILL_TOKEN_LENGTH and --tokens override it
INTEROP_ENV = "TSQP_INTEROP_THREADS"
ENCLAVE_ENV = "TSQP_ENCLAVE"


def interop_threads() -> int | None:
    """$TSQP_INTEROP_THREADS as a positive int, None when unset; ValueError naming it otherwise."""
    text = os.environ.get(INTEROP_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{INTEROP_ENV} must be a positive integer (got '{os.environ[INTEROP_ENV]}')")
    return int(text)


def enclave_endpoint_problem(endpoint: str, shm: bool) -> str | None:
    """Why `endpoint` cannot reach a server from inside a Gramine enclave, or None if it can.

    Gramine gives UNIX sockets per-instance names, so an ipc:// path never meets the native
    server's; with --shm the server must be on this host, hence tcp loopback."""
    address = client_endpoint(endpoint)
    if not address.startswith("tcp://"):
        return (f"endpoint {endpoint} cannot be reached from inside the Gramine enclave: Gramine renames "
                f"UNIX sockets per instance, so ipc:// does not cross the enclave boundary; use tcp://127.0.0.1:PORT")
    if shm and not is_loopback(address):
        return (f"endpoint {endpoint}: with --shm the server shares this host's /dev/shm, so inside the "
                f"Gramine enclave its header channel must be tcp loopback (tcp://127.0.0.1:PORT)")
    return None


def prepare(argv: Sequence[str]) -> None:
    """What must happen before the prefill: size torch's inter-op pool, and inside the enclave
    refuse an endpoint it cannot reach. ValueError with one line saying what is wrong."""
    threads = interop_threads()
    if threads is not None:  # before anything runs on the pool: torch refuses a resize after that
        import torch  # loaded by tsqp.cli already, after its OpenMP setting

        torch.set_num_interop_threads(threads)
    if os.environ.get(ENCLAVE_ENV) == "gramine":
        args = build_parser().parse_args(["prefill", *argv])
        problem = enclave_endpoint_problem(args.endpoint, args.shm)
        if problem:
            raise ValueError(problem)


def run(argv: Sequence[str]) -> int:
    try:
        prepare(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return main(["prefill", *argv])


if __name__ == "__main__":
    os.environ.setdefault("PREFILL_TOKEN_LENGTH", str(PREFILL_TOKEN_LENGTH))
    sys.exit(run(sys.argv[1:]))
