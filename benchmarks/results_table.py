"""A markdown table of train_speed.py result files: one row per trainer per file.

    python benchmarks/results_table.py benchmarks/results/lora-sdxl-1024px-b1-*-cuda.json

Peak memory is max_memory_allocated on CUDA and the process's peak RSS on CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def options(result: dict) -> str:
    parts = []
    if result.get("gradient_checkpointing"):
        parts.append("gradient checkpointing")
    if result.get("cache") not in (None, "default", "none"):
        parts.append(f"cache {result['cache']}")
    if result.get("use_8bit_adam"):
        parts.append("8-bit Adam")
    return ", ".join(parts) or "none"


def rows(result: dict) -> list[str]:
    out = []
    summary = result["summary"]
    ratio = summary.get("ratio_ours_over_reference", {})
    for trainer in ("ours", "reference"):
        numbers = summary.get(trainer)
        if not numbers:
            continue
        its = numbers.get("steady_it_per_s")
        peak = numbers.get("peak_memory_bytes")
        cells = [
            options(result),
            trainer,
            f"{peak / 2**30:.2f}" if peak else "failed",
            f"{its:.3f}" if its else "failed",
        ]
        if trainer == "ours" and ratio:
            mem, speed = ratio.get("peak_memory_bytes"), ratio.get("steady_it_per_s")
            cells += [f"{mem:.2f}" if mem else "", f"{speed:.2f}" if speed else ""]
        else:
            cells += ["", ""]
        out.append("| " + " | ".join(cells) + " |")
    return out


def table(paths: list[Path]) -> str:
    lines = [
        "| options | trainer | peak memory GiB | it/s | memory ours/ref | it/s ours/ref |",
        "|---|---|---|---|---|---|",
    ]
    for path in paths:
        lines += rows(json.loads(Path(path).read_text()))
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(table([Path(p) for p in sys.argv[1:]]))
