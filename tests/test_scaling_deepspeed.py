"""DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes (docs/scaling.md): deepspeed's CPU accelerator
on gloo, launched with the shipped `launch/deepspeed_zero*.yaml`. Skipped where deepspeed is
not installed (it is not a dependency of personalize). LoRA on the UNet and text encoder
under ZeRO-2, DreamBooth (full UNet + text encoder) under ZeRO-3: per-step losses and the
artifact equal a DDP run's, ZeRO-3 partitions the weights, and a ZeRO-3 run resumed from its
step-2 checkpoint is bit-identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import base_config
from helpers import ROOT, free_port, launch_two_processes
from safetensors.torch import load_file
from test_scaling import _assert_close, _assert_equal, _losses, _write

from personalize.training import checkpoint as ckpt

pytest.importorskip("deepspeed")

STEPS = 3
UNET = "unet/diffusion_pytorch_model.safetensors"
TEXT_ENCODER = "text_encoder/model.safetensors"


def _launch_deepspeed(stage: int, cfg_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "launch" / f"deepspeed_zero{stage}.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "personalize",
        "train",
        str(cfg_path),
    ]


def _run(cmd: list[str], **env) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _deepspeed(stage: int, cfg_path: Path) -> None:
    # No ACCELERATE_USE_CPU: accelerate would then drop DeepSpeed for plain CPU DDP.
    _run(_launch_deepspeed(stage, cfg_path), DS_ACCELERATOR="cpu")


def _ddp(cfg_path: Path) -> None:
    _run(launch_two_processes("personalize", "train", str(cfg_path)), ACCELERATE_USE_CPU="1")


def _assert_losses_match(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert la.keys() == lb.keys() == set(range(1, STEPS + 1))
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5, abs=1e-6), step


@pytest.fixture(scope="module")
def zero3_dreambooth(tiny_model_dir, instance_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")

    def config(out: Path, **extra) -> dict:
        return base_config(
            tiny_model_dir,
            instance_dir,
            out,
            method="dreambooth",
            dreambooth={"train_text_encoder": True},
            train={"max_steps": STEPS, "checkpoint_every": 2},
            **extra,
        )

    ds, ddp, resumed = tmp / "ds", tmp / "ddp", tmp / "resumed"
    _deepspeed(3, _write(tmp, "ds", config(ds)))
    _ddp(_write(tmp, "ddp", config(ddp)))
    step2 = ckpt.checkpoint_root(ds) / "step-000002"
    _deepspeed(3, _write(tmp, "r", config(resumed, resume=str(step2))))
    return SimpleNamespace(ds=ds, ddp=ddp, resumed=resumed)


def test_zero3_partitions_the_unet_and_text_encoder(zero3_dreambooth):
    reports = [
        json.loads((zero3_dreambooth.ds / "logs" / f"deepspeed_rank{r}.json").read_text())
        for r in (0, 1)
    ]
    for name in ("unet", "text_encoder"):
        numel = reports[0][name]["numel"]
        for report in reports:
            assert report[name]["dtensors"] == report[name]["params"] > 0
            assert report[name]["local_numel"] < 0.6 * numel  # each rank holds about half
    # DeepSpeed's own engine checkpoint, beside our gathered trainable weights.
    step2 = ckpt.checkpoint_root(zero3_dreambooth.ds) / "step-000002"
    assert (step2 / "pytorch_model").is_dir() and (step2 / ckpt.TRAINABLE_FILE).is_file()


def test_zero3_dreambooth_matches_ddp(zero3_dreambooth):
    _assert_losses_match(zero3_dreambooth.ds, zero3_dreambooth.ddp)
    # ZeRO-3 reduce-scatters gradients where DDP all-reduces them: the sums differ in the
    # last bits, and AdamW's m/sqrt(v) blows that up for weights whose gradient is near zero
    # (a handful of the UNet's 0.8M weights moved up to 8e-5 by step 4, at lr 1e-3).
    for name, atol in ((UNET, 2e-4), (TEXT_ENCODER, 1e-5)):
        _assert_close(
            load_file(zero3_dreambooth.ds / name), load_file(zero3_dreambooth.ddp / name), atol
        )


def test_zero3_resume_is_bit_identical(zero3_dreambooth):
    ds = _losses(zero3_dreambooth.ds)
    assert _losses(zero3_dreambooth.resumed) == {k: v for k, v in ds.items() if k > 2}
    for name in (UNET, TEXT_ENCODER):
        _assert_equal(
            load_file(zero3_dreambooth.resumed / name), load_file(zero3_dreambooth.ds / name)
        )


def test_zero2_lora_matches_ddp(tiny_model_dir, instance_dir, tmp_path):
    from personalize.methods.lora import LORA_WEIGHTS

    def config(out: Path) -> dict:
        lora = {"rank": 4, "train_text_encoder": True}
        return base_config(tiny_model_dir, instance_dir, out, lora=lora, train={"max_steps": STEPS})

    ds, ddp = tmp_path / "ds", tmp_path / "ddp"
    _deepspeed(2, _write(tmp_path, "ds", config(ds)))
    _ddp(_write(tmp_path, "ddp", config(ddp)))
    _assert_losses_match(ds, ddp)
    saved = load_file(ds / LORA_WEIGHTS)
    assert any(k.startswith("text_encoder") for k in saved)
    _assert_close(saved, load_file(ddp / LORA_WEIGHTS), 1e-5)
