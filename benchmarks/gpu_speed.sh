#!/usr/bin/env bash
# The GPU speed matrix of docs/benchmarks.md: SD1.5 architecture (random weights built in
# code), 512 px, bf16, batch 1 and 4, LoRA and full DreamBooth, ours against the diffusers
# example scripts, plus one run of ours per fast path switched off (or on, for compile).
#
#   DIFFUSERS_EXAMPLES=/path/to/diffusers/examples bash benchmarks/gpu_speed.sh
#
# Run it from an environment with torchvision (the examples import it) and this project
# installed (pip install -e .). Results: benchmarks/results/*-sd15-512px-b*-cuda.json.
set -euo pipefail
: "${DIFFUSERS_EXAMPLES:?set DIFFUSERS_EXAMPLES to diffusers/examples}"
HERE="$(cd "$(dirname "$0")" && pwd)"
WORK="${WORK:-/tmp/train-speed-gpu}"
STEPS="${STEPS:-60}"
REPEATS="${REPEATS:-3}"
VARIANTS=(
  --variant "no-cache:data.cache_latents=false,data.cache_text_embeddings=false"
  --variant "no-fused-adamw:train.fused_optimizer=false"
  --variant "no-tf32:train.allow_tf32=false"
  --variant "channels-last:train.channels_last=true"
  --variant "compile:train.compile_unet=true"
  --variant "workers-2:data.num_workers=2"
)
for batch in 1 4; do
  python "$HERE/train_speed.py" --method lora --model sd15 --resolution 512 \
    --batch-size "$batch" --mixed-precision bf16 --steps "$STEPS" --warmup 10 \
    --repeats "$REPEATS" --work "$WORK" "${VARIANTS[@]}" \
    --reference "$DIFFUSERS_EXAMPLES/dreambooth/train_dreambooth_lora.py"
  python "$HERE/train_speed.py" --method dreambooth --model sd15 --resolution 512 \
    --batch-size "$batch" --mixed-precision bf16 --steps "$STEPS" --warmup 10 \
    --repeats "$REPEATS" --work "$WORK" "${VARIANTS[@]}" \
    --reference "$DIFFUSERS_EXAMPLES/dreambooth/train_dreambooth.py"
done
