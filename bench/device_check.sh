#!/usr/bin/env bash
# The GPU checks, as one call on a lent CUDA machine (see dev/LOG.md): the gpu-marked tests, then bench/model.py and
# bench/engine.py on the device in bf16, then the compiled-decode test (its compile is the slowest part). The
# machine's own python3 holds a CUDA torch; transformers >= 5.23 (the parity oracle) travels as a wheel in .whl/:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl transformers==5.24.0
# Logs and JSON go to $OUT (default runs/device).
set -u
PY=${PY:-python3}
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, never stop the script
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: rc $? in $((SECONDS - t0)) s"
  tail -n 12 "$OUT/$name.log"
}
nvidia-smi -L 2>&1 | head -2
"$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
step gpu_tests 150 "$PY" -m pytest -m gpu tests/test_gpu.py -k "not compiled" -p no:cacheprovider -rA --durations=5
step bench_model 120 "$PY" bench/model.py --device cuda --dtype bfloat16 --repeats 10 --out "$OUT/model.json"
step bench_engine 150 "$PY" bench/engine.py --device cuda --dtype bfloat16 --cuda-graphs --profile --out "$OUT/engine.json"
step gpu_compiled 100 "$PY" -m pytest -m gpu tests/test_gpu.py -k compiled -p no:cacheprovider -rA
