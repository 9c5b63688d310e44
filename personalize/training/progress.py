"""What a run tells its user while it trains: the progress bar, the JSONL training log
(output_dir/LOG_FILE, main process) and accelerate's trackers (TensorBoard, wandb...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class Progress:
    def __init__(self, accelerator, log_file: Path):
        self.accelerator = accelerator
        self.log_file = log_file
        self.bar = None

    def start(self, total: int, initial: int, desc: str) -> None:
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            disable=not self.accelerator.is_local_main_process,
        )

    def step_done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

    def log(self, row: dict[str, Any]) -> None:
        """One row ({"step": N, name: number...}) to the trackers and the JSONL log."""
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if self.accelerator.is_main_process:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def log_training(self, step: int, numbers: dict[str, Any], lr: float) -> None:
        """The NaN guard's numbers since the last log row (training/guard.py), and the LR."""
        row = {"step": step, "loss": numbers["loss"], "lr": lr, "grad_norm": numbers["grad_norm"]}
        if numbers["skipped"]:
            row["skipped_steps"] = numbers["skipped"]
        self.log(row)
        self.bar.set_postfix(loss=f"{numbers['loss']:.4f}")
