#!/usr/bin/env bash
# The GPU benchmark of docs/benchmarks.md in one command, for a lent H100/H200 machine that has
# CUDA torch, transformers, safetensors, tokenizers, msgpack and numpy but no pyzmq and no network.
#
# Beforehand, on a machine with pip access, put the pyzmq wheel for the GPU host's Python in .whl/
# (ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl pyzmq==27.1.0
# Then, on the GPU host, from the repository root (with .whl carried along):
#   bash scripts/device-bench.sh            # results in $OUT, or ./gpu-bench: 8 files at most
# TOKENS, REPEAT, PRESETS, GUARDED (the preset for private/verify, always 128 tokens x 3 runs) and
# DEVICE override the defaults below;
# `DEVICE=cpu PRESETS=tiny GUARDED=tiny TOKENS=16 REPEAT=1` smoke-tests the script on a CPU.
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

TABLES="$OUT/tables.md"  # every run's Markdown table, in order
: > "$TABLES"
bench() {  # NAME, then tsqp bench arguments; JSON (and PNG when asked) land in $OUT
    local name=$1; shift
    echo "== $name ($(date +%T))" | tee -a "$TABLES"
    python3 -m tsqp bench --device "$DEVICE" --json "$OUT/$name.json" "$@" | tee -a "$TABLES"
}

for preset in $PRESETS; do
    bench "gpu-$preset" --preset "$preset" --tokens "$TOKENS" --repeat "$REPEAT" --accuracy --plot "$OUT/gpu-$preset.png"
done
# the same-host fast path: on a GPU host the split is mostly transport
bench "gpu-shm-$GUARDED" --preset "$GUARDED" --tokens "$TOKENS" --repeat "$REPEAT" --modes split,whole --shm
bench "gpu-guarded-$GUARDED" --preset "$GUARDED" --tokens 128 --repeat 3 --modes split,whole --protection private \
    --verify --shm
echo "== done ($(date +%T))" | tee -a "$TABLES"
