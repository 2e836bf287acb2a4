# Sourced by bench/device_check.sh and bench/device_speedrun.sh on a lent CUDA machine: that machine's python3 holds
# a CUDA torch; what it lacks travels as wheels, .whl/*.whl always installed (transformers >= 5.23, the tests'
# oracle) and .whl/extra/*.whl installed only when the module is missing (matplotlib and its deps, tqdm, ...):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl transformers==5.24.0
#   pip download --only-binary=:all: --python-version 3.12 -d .whl/extra matplotlib tqdm jinja2 safetensors
# Defines step NAME SECONDS CMD... (time limit, log to $OUT/NAME.log, never stops the calling script).
PY=${PY:-python3}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)   # absolute: callers cd elsewhere
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
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: rc $? in $((SECONDS - t0)) s"
  grep -v "it/s\]\|call/s\]\|s/it\]\|s/call\]" "$OUT/$name.log" | tail -n 14
}
nvidia-smi -L 2>&1 | head -2
