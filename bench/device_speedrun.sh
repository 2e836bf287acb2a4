#!/usr/bin/env bash
# Speedrun pipeline on a lent CUDA machine (see dev/LOG.md, session 10): the gpu-marked tests (not the compiled one),
# then `openzaya speedrun --preset small --no-rl` (micro model, pretraining + SFT + single vs Markovian RSA on the GPU)
# and the same with --preset nano. Packages the machine lacks: bench/device_env.sh.
# Logs and each run's small outputs (a tar.gz without weights or traces) go to $OUT (default runs/device_speedrun).
set -u
OUT=${OUT:-runs/device_speedrun}
ROOT=${ROOT:-/tmp/speedrun}
SMALL_S=${SMALL_S:-380}
NANO_S=${NANO_S:-120}
DEVICE=${DEVICE:-cuda}
mkdir -p "$ROOT"
source bench/device_env.sh
keep() {  # keep RUN: the run's small outputs (no weights, no traces) as one $OUT/RUN.tar.gz
  (cd "$ROOT" && tar czf "$OUT/$1.tar.gz" --exclude='*.safetensors' --exclude='*.pt' --exclude='trace_*' \
     --exclude='*corpus*' --exclude='tokenizer*' "$1")
}
"$PY" -c "import torch, transformers, matplotlib; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
ONLY=${ONLY:-gpu_tests small nano}   # which of the three steps to run
want() { [[ " $ONLY " == *" $1 "* ]]; }
want gpu_tests && step gpu_tests 60 "$PY" -m pytest -m gpu tests/test_gpu.py -k "not compiled" -p no:cacheprovider -rA --durations=5
want small && step small "$SMALL_S" "$PY" -m openzaya.cli speedrun --preset small --no-rl --device "$DEVICE" --root "$ROOT"
want small && keep small
want nano && step nano "$NANO_S" "$PY" -m openzaya.cli speedrun --preset nano --no-rl --device "$DEVICE" --root "$ROOT"
want nano && keep nano
