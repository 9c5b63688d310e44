"""Resumable checkpoints: written atomically, pruned to the last K, found again by step.

A checkpoint is `output_dir/checkpoints/step-000123/` holding accelerate's state (optimizer,
LR scheduler, grad scaler, every process's RNG states), the method's trainable weights as
safetensors, and `state.json` (step, epoch, ...) written last. It is built under a temporary
name and renamed into place, so a run killed mid-save never leaves a folder that looks
complete; `latest` only ever picks folders whose `state.json` exists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from personalize.errors import CheckpointError, CheckpointMismatch, CheckpointNotFoundError
from personalize.io import atomic_write_json, atomic_write_text
from personalize.logs import quieted
from personalize.training import faults, sharding

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from, or None to start fresh."""
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            logger.warning(
                "resume=latest but %s has no complete checkpoint: starting fresh",
                checkpoint_root(output_dir),
            )
            return None
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointNotFoundError(
            f"resume={resume}: not a complete checkpoint folder (no {STATE_FILE}); "
            f"use 'latest' or one of {[str(p) for p in complete_checkpoints(output_dir)]}"
        )
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


write_json_atomic = atomic_write_json  # the name loop.py uses


def truncate_jsonl_after(path: Path, step: int) -> None:
    """Drop rows with a step past `step` (and a torn last line) from a JSONL log."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def save_checkpoint(
    accelerator, output_dir: str | Path, step: int, state: dict[str, Any], keep: int
) -> Path:
    """Every process calls this (accelerate writes per-process RNG files); returns the folder."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a run killed mid-save
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        with quieted("accelerate"):  # its five per-file INFO lines; ours names the checkpoint
            accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            faults.kill_point("checkpoint-before-commit", step)
            write_json_atomic(tmp / STATE_FILE, {"step": step, **state})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except OSError as e:  # disk full, quota, read-only file system...
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(output_dir)
        kept = (
            f"The previous checkpoint {previous[-1]} is intact."
            if previous
            else "There is no earlier checkpoint."
        )
        raise CheckpointError(
            f"could not write the step-{step} checkpoint to {root}: {e}. {kept} Free some "
            "space (or lower train.checkpoints_total_limit) and resume with resume=latest."
        ) from e
    if accelerator.is_main_process:
        _prune(root, keep, step)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _step_of(folder: Path) -> int:
    return int(_STEP_DIR.match(folder.name).group(1))


def _prune(root: Path, keep: int, saved_step: int) -> None:
    """Keep the checkpoint just saved at `saved_step` and the `keep - 1` before it.

    Checkpoints of later steps are a future this run replaced (it resumed from an earlier
    checkpoint): kept, they would be `latest` and outrank the one just saved (a signal's
    included), so they go, with a log line."""
    found = complete_checkpoints(root.parent)
    later = [d for d in found if _step_of(d) > saved_step]
    earlier = [d for d in found if _step_of(d) < saved_step]
    if later:
        logger.warning(
            "removed checkpoints %s: they are past step %d, from the run this one replaced "
            "when it resumed from an earlier checkpoint",
            ", ".join(d.name for d in later),
            saved_step,
        )
    extra = len(earlier) - max(keep - 1, 0)
    for old in later + (earlier[:extra] if extra > 0 else []):
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


class TrainableState:
    """What a checkpoint holds of the model: only the method's trainable weights (a LoRA
    checkpoint is megabytes, not the whole UNet), through accelerate's save/load hooks;
    accelerate still saves optimizer, LR scheduler, grad scaler and RNG states."""

    def __init__(self, accelerator, method, parts):
        self.accelerator, self.method, self.parts = accelerator, method, parts
        accelerator.register_save_state_pre_hook(self._save)
        accelerator.register_load_state_pre_hook(self._load)

    def _save(self, models, weights, output_dir) -> None:
        state = None
        if sharding.is_fsdp(self.accelerator):
            # Sharded weights are gathered by every rank (a collective), saved by the main one.
            state = sharding.full_state(self.method.trainable_state_dict(self.parts))
        elif sharding.is_deepspeed(self.accelerator):
            # ZeRO-3 partitions: gathered by every rank (a collective), copied out inside.
            with sharding.full_weights(self.accelerator, self._modules()):
                state = {
                    k: v.detach().float().cpu().clone()
                    for k, v in self.method.trainable_state_dict(self.parts).items()
                }
        if self.accelerator.is_main_process:
            state = state or self.method.trainable_state_dict(self.parts)
            save_file(
                {k: v.float().cpu().contiguous() for k, v in state.items()},
                str(Path(output_dir) / TRAINABLE_FILE),
            )
        weights.clear()

    def _modules(self) -> list:
        return list(self.parts.modules().values())

    def _load(self, models, input_dir) -> None:
        path = Path(input_dir) / TRAINABLE_FILE
        try:
            state = load_file(str(path))
            if sharding.is_fsdp(self.accelerator):
                # Each rank keeps its own shard of the full weights in the file.
                like = self.method.trainable_state_dict(self.parts)
                state = sharding.shard_like(state, like)
            # DeepSpeed's engine checkpoint already restored its weights (and fp32 masters);
            # the same values are written again, through a ZeRO-3 gather.
            gathered = (
                sharding.full_weights(self.accelerator, self._modules(), modify=True)
                if sharding.is_deepspeed(self.accelerator)
                else contextlib.nullcontext()
            )
            with gathered:
                self.method.load_trainable_state_dict(self.parts, state)
        except (ValueError, OSError, SafetensorError) as e:
            raise CheckpointMismatch(str(e)) from e
        models.clear()


def resume_from(accelerator, checkpoint: Path, log_file: Path) -> dict[str, Any]:
    """Load `checkpoint` into the run (weights, optimizer, RNG...); return its state.json."""
    with quieted("accelerate"):  # its per-file INFO lines; the loop names the checkpoint
        accelerator.load_state(str(checkpoint))
    state = read_state(checkpoint)
    if accelerator.is_main_process:
        # Rows logged after this checkpoint belong to the killed run's lost steps.
        truncate_jsonl_after(log_file, int(state["step"]))
    return state
