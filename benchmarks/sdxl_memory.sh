#!/usr/bin/env bash
# SDXL LoRA memory matrix of docs/benchmarks.md ("SDXL: memory"): SDXL base's architecture
# (random weights built in code, benchmarks/sdxl_model.py), 1024 px, batch 1, bf16 frozen
# weights, rank 16; one row per memory option, peak GPU memory (max_memory_allocated) and
# it/s, ours and diffusers' train_dreambooth_lora_sdxl.py with the matching flags.
#
#   DIFFUSERS_EXAMPLES=/path/to/diffusers/examples bash benchmarks/sdxl_memory.sh
#   # its CPU path, end to end in minutes (the tiny SDXL, small images, fp32):
#   DEVICE=cpu MODEL=tiny-sdxl RESOLUTION=64 MIXED_PRECISION=no STEPS=8 REPEATS=1 \
#     DIFFUSERS_EXAMPLES=... bash benchmarks/sdxl_memory.sh
#
# Run it from an environment with torchvision (the example imports it), bitsandbytes (8-bit
# Adam) and this project installed (pip install -e .). Results:
# benchmarks/results/lora-$MODEL-${RESOLUTION}px-b1-<option>-$DEVICE.json, then a table.
set -euo pipefail
: "${DIFFUSERS_EXAMPLES:?set DIFFUSERS_EXAMPLES to diffusers/examples}"
HERE="$(cd "$(dirname "$0")" && pwd)"
MODEL="${MODEL:-sdxl}"
RESOLUTION="${RESOLUTION:-1024}"
DEVICE="${DEVICE:-cuda}"
MIXED_PRECISION="${MIXED_PRECISION:-bf16}"
STEPS="${STEPS:-30}"
WARMUP="${WARMUP:-5}"
REPEATS="${REPEATS:-2}"
RANK="${RANK:-16}"
WORK="${WORK:-/tmp/sdxl-memory}"
OUT="${OUT:-$HERE/results}"
PYTHON="${PYTHON:-python}"
REFERENCE="$DIFFUSERS_EXAMPLES/dreambooth/train_dreambooth_lora_sdxl.py"

# name | train_speed.py flags | whether the reference runs too. The reference has no latent
# cache and always encodes its one prompt once with both encoders staying on the device,
# so the cache rows are ours alone (its baseline row is the comparison).
ROWS=(
  "baseline||yes"
  "gradient-checkpointing|--gradient-checkpointing|yes"
  "cached-text|--cache text|no"
  "cached-latents|--cache latents|no"
  "8bit-adam|--use-8bit-adam|yes"
  "all|--gradient-checkpointing --cache all --use-8bit-adam|yes"
)
files=()
for row in "${ROWS[@]}"; do
  IFS='|' read -r name flags with_reference <<<"$row"
  out="$OUT/lora-$MODEL-${RESOLUTION}px-b1-$name-$DEVICE.json"
  only=(--only ours)
  [ "$with_reference" = yes ] && only=()
  # shellcheck disable=SC2086  # $flags is a list of flags
  "$PYTHON" "$HERE/train_speed.py" --method lora --model "$MODEL" --device "$DEVICE" \
    --resolution "$RESOLUTION" --batch-size 1 --rank "$RANK" --num-images 4 \
    --mixed-precision "$MIXED_PRECISION" --steps "$STEPS" --warmup "$WARMUP" \
    --repeats "$REPEATS" --work "$WORK" --cache none $flags "${only[@]}" \
    --reference "$REFERENCE" --out "$out"
  files+=("$out")
done
"$PYTHON" "$HERE/results_table.py" "${files[@]}"
