"""Seed-compatible TEE runner entry point: `python tee_runner.py`, configured by environment variables.

LLAMA_GPU_ENDPOINT (default localhost:50051), LLAMA_MODEL_PATH (the TEE's own copy of the model
directory), PREFILL_TOKEN_LENGTH. Same as `tsqp prefill`, which also takes flags.
"""

import os
import sys

from tsqp.cli import main

PREFILL_TOKEN_LENGTH = 128  # the seed's knob; $PREFILL_TOKEN_LENGTH and --tokens override it

if __name__ == "__main__":
    os.environ.setdefault("PREFILL_TOKEN_LENGTH", str(PREFILL_TOKEN_LENGTH))
    sys.exit(main(["prefill", *sys.argv[1:]]))
