#!/usr/bin/env bash
# Two real CPU processes (gloo), e.g. to check a multi-process run without GPUs:
#   bash launch/cpu_2proc.sh configs/lora.yaml data.path=my_images
# accelerate's own `--cpu --num_processes 2` starts ONE process unless mpirun is set up,
# so this launches torchrun-style ranks and tells accelerate to stay on the CPU.
set -euo pipefail
export ACCELERATE_USE_CPU=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec accelerate launch --multi_gpu --num_processes "${NUM_PROCESSES:-2}" --num_machines 1 \
  --mixed_precision no --dynamo_backend no -m personalize train "$@"
