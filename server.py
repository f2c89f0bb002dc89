"""Seed-compatible GPU server entry point: `python server.py`, configured by environment variables.

LLAMA_MODEL_PATH (model directory), LLAMA_GPU_DEVICE (default cuda:0, or cpu without CUDA),
LLAMA_DTYPE (float32), LLAMA_GPU_PORT (50051). Same as `tsqp serve`, which also takes flags.
"""

import sys

from tsqp.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
