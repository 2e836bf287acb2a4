#!/usr/bin/env bash
# GPU check of RL at scale (openzaya/rl_loop.py, rollout.py, weight_sync.py), as one call on a lent CUDA machine:
# the trainer on CUDA (bf16 compute, fp32 master weights) with `openzaya serve --device cuda` as its rollout server,
# one short stage of the digits task (bench/rl_pool.py: a random `micro` model, reward = share of digits), weights
# pushed from disk and verified at every step; prints the reward, rollout tokens/s, push latency and the
# trainer-vs-server logprob mismatch. With two GPUs or more, the same run with two servers and then by NCCL broadcast
# (NCCL refuses two ranks on one GPU: the trainer and each server need a GPU of their own; CUDA_VISIBLE_DEVICES
# pins them). Packages: bench/device_env.sh. Logs and JSON go to $OUT (default runs/device_rl).
# NOTE: written without a GPU to run it on: unrun so far.
set -u
OUT=${OUT:-runs/device_rl}
STEPS=${STEPS:-8}
source bench/device_env.sh
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
"$PY" -c "import torch; print(torch.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0))"
step rl_1server_disk 400 "$PY" bench/rl_pool.py --device cuda --server-device cuda --preset micro --steps "$STEPS" \
    --runs 1:disk --max-new-tokens 64 --out "$OUT/rl_1server_disk.json"
if [ "$NGPU" -ge 3 ]; then   # trainer on GPU 0, servers on 1 and 2 (each server process sees its own GPU)
  step rl_2servers 500 "$PY" bench/rl_pool.py --device cuda:0 --server-device cuda --preset micro \
      --steps "$STEPS" --runs 2:disk,2:broadcast --max-new-tokens 64 --spread-gpus --out "$OUT/rl_2servers.json"
fi
