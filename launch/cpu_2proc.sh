#!/usr/bin/env bash
# Two real CPU processes (gloo), e.g. to check a multi-process run without GPUs:
#   bash launch/cpu_2proc.sh configs/lora.yaml data.path=my_images
# accelerate's simple launcher alone would start ONE process for `--cpu --num_processes 2`
# (it needs mpirun for more); personalize's CLI sees that and starts the ranks itself.
# MASTER_PORT=29612 picks another rendezvous port when 29500 is taken (two runs at once).
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec accelerate launch --cpu --num_processes "${NUM_PROCESSES:-2}" --num_machines 1 \
  --main_process_port "${MASTER_PORT:-29500}" \
  --mixed_precision no --dynamo_backend no -m personalize train "$@"
