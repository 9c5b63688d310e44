"""Kill a real training process with SIGKILL at random points, resume, and compare.

The promise: a run killed at any moment (mid-step, mid-checkpoint, mid-artifact write) and
resumed with `resume=latest` ends with exactly the weights of a run that never stopped.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import base_config
from helpers import ROOT
from safetensors.torch import load_file

from personalize.training import checkpoint as ckpt

MAX_STEPS = 12

# Per method: config sections for a fast run, and the artifact file whose tensors we compare.
METHODS = {
    "lora": ({"lora": {"rank": 4, "dropout": 0.1}}, "pytorch_lora_weights.safetensors"),
    "hypernetwork": ({"hn": {"enable_sizes": [32, 64], "name": "kill"}}, "kill.safetensors"),
    "textual_inversion": (
        {
            "ti": {
                "placeholder_token": "<sks-disc>",
                "initializer_token": "o",
                "num_vectors": 2,
                "learnable_property": "object",
            }
        },
        "learned_embeds.safetensors",
    ),
    "dreambooth": (
        {
            "db": {
                "with_prior_preservation": True,
                "class_prompt": "a photo of a disc",
                "num_class_images": 4,
                "class_num_inference_steps": 2,
                "sample_batch_size": 2,
            }
        },
        "unet/diffusion_pytorch_model.safetensors",
    ),
}


def _env(fault: str | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("PERSONALIZE_FAULT", None)
    if fault:
        env["PERSONALIZE_FAULT"] = fault
    return env


def _cmd(cfg_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "personalize", "train", str(cfg_path), *overrides]


def _logged_step(out: Path) -> int:
    log = out / "train_log.jsonl"
    if not log.is_file():
        return 0
    steps = [
        json.loads(line).get("step", 0)
        for line in log.read_text().splitlines()
        if line.strip().endswith("}")
    ]
    return max(steps, default=0)


def _checkpoint_step(out: Path) -> int:
    found = ckpt.complete_checkpoints(out)
    return ckpt.read_state(found[-1])["step"] if found else 0


def _run_and_kill_after(
    cfg_path: Path, out: Path, step: int, extra_delay: float, *overrides: str
) -> int:
    """Start training, SIGKILL it shortly after it logs `step`; return its exit code."""
    base = _checkpoint_step(out)
    proc = subprocess.Popen(
        _cmd(cfg_path, *overrides), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    truncated = False  # the resumed run first drops the rows of the steps it lost
    while proc.poll() is None and time.monotonic() < deadline:
        logged = _logged_step(out)
        truncated = truncated or logged <= base
        if truncated and logged >= step:
            time.sleep(extra_delay)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    return proc.wait(timeout=240)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sigkill_anywhere_then_resume_matches_uninterrupted(
    method, tiny_model_dir, instance_dir, tmp_path
):
    sections, artifact = METHODS[method]
    rng = random.Random(f"kill-{method}")

    def write_cfg(out: Path) -> Path:
        cfg = base_config(
            tiny_model_dir,
            instance_dir,
            out,
            method=method,
            train={"max_steps": MAX_STEPS, "checkpoint_every": 2, "batch_size": 3, "log_every": 1},
            data={"random_flip": True},
            **sections,
        )
        if "db" in cfg:  # each run generates (identical, seeded) class images of its own
            cfg["db"] = dict(cfg["db"], class_data_dir=str(out) + "-class-images")
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    straight = tmp_path / "straight"
    subprocess.run(_cmd(write_cfg(straight)), env=_env(), check=True, capture_output=True)
    reference = _weights(straight / artifact)

    out = tmp_path / "killed"
    cfg_path = write_cfg(out)
    kills = 0
    # 1. A kill in the middle of writing the step-4 checkpoint (after accelerate wrote its
    #    files, before the checkpoint is committed): it must never be picked as "latest".
    proc = subprocess.run(
        _cmd(cfg_path), env=_env("checkpoint-before-commit:4"), capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL
    kills += 1
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-000002"]
    assert (ckpt.checkpoint_root(out) / ".tmp-step-000004").is_dir()
    # 2. Kills at random moments after random logged steps, each followed by a resume.
    for _ in range(3):
        if _checkpoint_step(out) + 1 > MAX_STEPS - 1:
            break
        at = rng.randint(_checkpoint_step(out) + 1, MAX_STEPS - 1)
        code = _run_and_kill_after(cfg_path, out, at, rng.uniform(0.0, 0.15), "resume=latest")
        kills += code == -signal.SIGKILL
    # 3. Finish the run.
    subprocess.run(_cmd(cfg_path, "resume=latest"), env=_env(), check=True, capture_output=True)
    assert kills >= 2
    resumed = _weights(out / artifact)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert not list(ckpt.checkpoint_root(out).glob(".tmp-step-*"))
