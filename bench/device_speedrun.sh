#!/usr/bin/env bash
# Speedrun pipeline on a lent CUDA machine (see dev/LOG.md, session 10): the gpu-marked tests (not the compiled one),
# then `openzaya speedrun --preset small --no-rl` (micro model, pretraining + SFT + single vs Markovian RSA on the GPU)
# and the same with --preset nano. The machine's python3 holds a CUDA torch; packages it lacks travel as wheels in
# .whl/ (transformers, the tests' oracle) and .whl/extra/ (installed only when the module is missing), e.g.
#   pip download --only-binary=:all: --python-version 3.12 -d .whl/extra matplotlib tqdm jinja2 safetensors
# Logs and each run's small outputs (a tar.gz without weights or traces) go to $OUT (default runs/device_speedrun).
set -u
PY=${PY:-python3}
OUT=${OUT:-runs/device_speedrun}
ROOT=${ROOT:-/tmp/speedrun}
SMALL_S=${SMALL_S:-380}
NANO_S=${NANO_S:-120}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT" "$ROOT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
for pair in matplotlib:matplotlib contourpy:contourpy cycler:cycler fontTools:fonttools kiwisolver:kiwisolver \
            pyparsing:pyparsing PIL:pillow dateutil:python_dateutil packaging:packaging tqdm:tqdm jinja2:jinja2 \
            markupsafe:markupsafe safetensors:safetensors; do
  mod=${pair%%:*} whl=${pair##*:}
  if ! "$PY" -c "import $mod" 2>/dev/null && ls .whl/extra/"$whl"-*.whl >/dev/null 2>&1; then
    echo "installing $whl (no module $mod here)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/extra/"$whl"-*.whl
  fi
done
export PYTHONPATH=/tmp/site:$PWD
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, never stop the script
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: rc $? in $((SECONDS - t0)) s"
  grep -v "it/s\]\|call/s\]\|s/it\]\|s/call\]" "$OUT/$name.log" | tail -n 14
}
keep() {  # keep RUN: the run's small outputs (no weights, no traces) as one $OUT/RUN.tar.gz
  (cd "$ROOT" && tar czf "$OUT/$1.tar.gz" --exclude='*.safetensors' --exclude='*.pt' --exclude='trace_*' \
     --exclude='*corpus*' --exclude='tokenizer*' "$1")
}
nvidia-smi -L 2>&1 | head -2
"$PY" -c "import torch, transformers, matplotlib; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
ONLY=${ONLY:-gpu_tests small nano}   # which of the three steps to run
want() { [[ " $ONLY " == *" $1 "* ]]; }
want gpu_tests && step gpu_tests 60 "$PY" -m pytest -m gpu tests/test_gpu.py -k "not compiled" -p no:cacheprovider -rA --durations=5
want small && step small "$SMALL_S" "$PY" -m openzaya.cli speedrun --preset small --no-rl --device "$DEVICE" --root "$ROOT"
want small && keep small
want nano && step nano "$NANO_S" "$PY" -m openzaya.cli speedrun --preset nano --no-rl --device "$DEVICE" --root "$ROOT"
want nano && keep nano
