#!/usr/bin/env bash
# The GPU checks, as one call on a lent CUDA machine (see dev/LOG.md): the gpu-marked tests, then bench/model.py and
# bench/engine.py on the device in bf16, then the compiled-decode test (its compile is the slowest part). Packages
# the machine lacks: bench/device_env.sh. Logs and JSON go to $OUT (default runs/device).
set -u
OUT=${OUT:-runs/device}
source bench/device_env.sh
"$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
step gpu_tests 150 "$PY" -m pytest -m gpu tests/test_gpu.py -k "not compiled" -p no:cacheprovider -rA --durations=5
step bench_model 120 "$PY" bench/model.py --device cuda --dtype bfloat16 --repeats 10 --skip-compile --out "$OUT/model.json"
step bench_engine 150 "$PY" bench/engine.py --device cuda --dtype bfloat16 --cuda-graphs --profile --out "$OUT/engine.json"
step gpu_compiled 100 "$PY" -m pytest -m gpu tests/test_gpu.py -k compiled -p no:cacheprovider -rA
