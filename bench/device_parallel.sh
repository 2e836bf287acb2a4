#!/usr/bin/env bash
# GPU check of the parallel trainer (openzaya/parallel.py), as one call on a lent CUDA machine: one FSDP2 + EP
# training step (NCCL, bf16 compute, fp32 master weights and reduction) on a ~1B-parameter ZAYA-shaped model
# (bench/parallel.py --preset zaya_1b) under torchrun on every GPU present, printing tokens/s, MFU and peak memory,
# then the same step with activation checkpointing. EP = the number of GPUs (16 experts: 1, 2, 4, 8 or 16 GPUs).
# NOTE: with one GPU, world size 1 runs unwrapped (no FSDP2, no EP: openzaya keeps one process plain), so the
# numbers are the single-GPU baseline; FSDP2 + EP needs >= 2 GPUs. Packages: bench/device_env.sh. Logs and JSON go
# to $OUT (default runs/device_parallel).
set -u
OUT=${OUT:-runs/device_parallel}
source bench/device_env.sh
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
"$PY" -c "import torch; print(torch.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0))"
[ "$NGPU" -lt 2 ] && echo "one GPU: the step below runs unwrapped (FSDP2 + EP need >= 2 GPUs)"
step fsdp2_ep 300 "$PY" bench/parallel.py --device cuda --nproc "$NGPU" --preset zaya_1b --layouts fsdp2_ep \
    --micro-batch 2 --seq-len 4096 --warmup 2 --steps 3 --out "$OUT/parallel.json"
step fsdp2_ep_ac 300 "$PY" bench/parallel.py --device cuda --nproc "$NGPU" --preset zaya_1b --layouts fsdp2_ep \
    --micro-batch 2 --seq-len 4096 --warmup 2 --steps 3 --activation-checkpointing --out "$OUT/parallel_ac.json"
