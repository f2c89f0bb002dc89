#!/usr/bin/env bash
# The GPU benchmark of docs/benchmarks.md in one command, for a lent H100/H200 machine that has
# CUDA torch, transformers, safetensors, tokenizers, msgpack and numpy but no pyzmq and no network.
#
# Beforehand, on a machine with pip access, put the pyzmq wheel for the GPU host's Python in .whl/
# (ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl pyzmq==27.1.0
# Then, on the GPU host, from the repository root (with .whl carried along):
#   bash scripts/device-bench.sh            # results in $OUT, or ./gpu-bench: a dozen files
# Per preset: every mode over tcp (JSON, plot, wire accuracy), then split vs whole on the
# same-host fast path (ipc:// + shared memory), both with DECODE decode steps after each prompt;
# then the fast path again (the first preset, the first prompt length) with the serving loop's
# spin off (TSQP_SERVE_SPIN_US=0), and with the client's off (TSQP_CLIENT_SPIN_US=0),
# each against its default (docs/latency.md, "Spinning");
# then the guarded modes on GUARDED; then a served decode call's timeline (scripts/call_timeline.py)
# and the transport alone (`tsqp bench --rtt`), into tables.md.
# TOKENS, REPEAT, PRESETS, MODES, DECODE (0 skips decode), GUARDED (the preset for private/verify,
# always 128 tokens x 3 runs; empty skips them), PLOT (0 skips the plots) and DEVICE override the
# defaults below;
# `DEVICE=cpu PRESETS=tiny GUARDED=tiny TOKENS=16 REPEAT=1` smoke-tests the script on a CPU.
set -euo pipefail

OUT=${OUT:-gpu-bench}
TOKENS=${TOKENS:-128,1024}
REPEAT=${REPEAT:-3}
PRESETS=${PRESETS:-"tinyllama-1.1b llama-3.2-1b"}
MODES=${MODES:-split,split-seed,whole,tee-only}
GUARDED=${GUARDED-llama-3.2-1b}
DECODE=${DECODE:-32}
PLOT=${PLOT:-1}
DEVICE=${DEVICE:-cuda:0}
mkdir -p "$OUT"

if ! python3 -c "import zmq" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TSQP_CACHE=${TSQP_CACHE:-/tmp/tsqp-models}  # random-weight presets, made once per machine

TABLES="$OUT/tables.md"  # the card, then every run's Markdown table, in order
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } \
    | tee "$TABLES"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$TABLES"

bench() {  # NAME, then tsqp bench arguments; JSON (and PNG when asked) land in $OUT
    local name=$1; shift
    echo "== $name ($(date +%T))" | tee -a "$TABLES"
    python3 -m tsqp bench --device "$DEVICE" --json "$OUT/$name.json" "$@" | tee -a "$TABLES"
}

for preset in $PRESETS; do
    plot=(); [ "$PLOT" = 1 ] && plot=(--plot "$OUT/gpu-$preset.png")
    bench "gpu-$preset" --preset "$preset" --tokens "$TOKENS" --repeat "$REPEAT" --modes "$MODES" --accuracy \
        --decode "$DECODE" "${plot[@]}"
    # the same-host fast path: on a GPU host the split is mostly transport
    bench "gpu-fast-$preset" --preset "$preset" --tokens "$TOKENS" --repeat "$REPEAT" --modes split,whole --ipc --shm \
        --decode "$DECODE"
done
# each side's spin (on by default) against none, on the same host
first=${PRESETS%% *}
TSQP_SERVE_SPIN_US=0 bench "gpu-fast-nospin-$first" --preset "$first" --tokens "${TOKENS%%,*}" --repeat "$REPEAT" \
    --modes split,whole --ipc --shm --decode "$DECODE"
TSQP_CLIENT_SPIN_US=0 bench "gpu-fast-noclientspin-$first" --preset "$first" --tokens "${TOKENS%%,*}" \
    --repeat "$REPEAT" --modes split,whole --ipc --shm --decode "$DECODE"
if [ -n "$GUARDED" ]; then
    bench "gpu-guarded-$GUARDED" --preset "$GUARDED" --tokens 128 --repeat 3 --modes split,whole \
        --protection private --verify --ipc --shm --decode "$DECODE"
fi
echo "== call timeline, tiny preset, fast link ($(date +%T))" | tee -a "$TABLES"
# what dominates a decode call, on each side; a diagnostic, so its failure does not end the run
python3 scripts/call_timeline.py --device "$DEVICE" | tee -a "$TABLES" || echo "call_timeline failed" | tee -a "$TABLES"
echo "== rtt ($(date +%T))" | tee -a "$TABLES"
python3 -m tsqp bench --rtt --device "$DEVICE" | tee -a "$TABLES"
echo "== done ($(date +%T))" | tee -a "$TABLES"
