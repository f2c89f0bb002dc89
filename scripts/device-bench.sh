#!/usr/bin/env bash
# The GPU benchmark of docs/benchmarks.md in one command, for a lent H100/H200 machine that has
# CUDA torch, transformers, safetensors, tokenizers, msgpack and numpy but no pyzmq and no network.
#
# Beforehand, on a machine with pip access, put the pyzmq wheel for the GPU host's Python in .whl/
# (ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl pyzmq==27.1.0
# Then, on the GPU host, from the repository root (with .whl carried along):
#   bash scripts/device-bench.sh            # results in $OUT, or ./gpu-bench
# TOKENS, REPEAT, PRESETS, GUARDED (the preset for private/verify) and DEVICE override the defaults
# below; `DEVICE=cpu PRESETS=tiny GUARDED=tiny TOKENS=16 REPEAT=1` smoke-tests the script on a CPU.
set -euo pipefail

OUT=${OUT:-gpu-bench}
TOKENS=${TOKENS:-128,1024}
REPEAT=${REPEAT:-3}
PRESETS=${PRESETS:-"tinyllama-1.1b llama-3.2-1b"}
GUARDED=${GUARDED:-llama-3.2-1b}
DEVICE=${DEVICE:-cuda:0}
mkdir -p "$OUT"

if ! python3 -c "import zmq" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TSQP_CACHE=${TSQP_CACHE:-/tmp/tsqp-models}  # random-weight presets, made once per machine

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } \
    | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"

for preset in $PRESETS; do
    echo "== $preset: split, split-seed, whole, tee-only at $TOKENS tokens ($(date +%T))"
    python3 -m tsqp bench --preset "$preset" --device "$DEVICE" --tokens "$TOKENS" --repeat "$REPEAT" --accuracy \
        --json "$OUT/gpu-$preset.json" --plot "$OUT/gpu-$preset.png" | tee "$OUT/gpu-$preset.md"
done

echo "== $GUARDED: private and verified modes at 128 tokens ($(date +%T))"
python3 -m tsqp bench --preset "$GUARDED" --device "$DEVICE" --tokens 128 --repeat 3 --modes split,whole \
    --protection private --verify --json "$OUT/gpu-guarded.json" | tee "$OUT/gpu-guarded.md"
echo "== done ($(date +%T))"
