"""FSDP2 on the tiny SDXL (docs/scaling.md), 2 CPU ranks (gloo): LoRA on the UNet and both
text encoders, and DreamBooth's full UNet, are sharded, match a DDP run step by step, save
the artifact DDP saves and resume bit-identically. One set of runs per method serves every
assert (3 steps, a checkpoint at step 2)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import base_config
from helpers import launch_two_processes
from safetensors.torch import load_file
from test_scaling import (
    _assert_close,
    _assert_equal,
    _assert_sharded,
    _launch_fsdp,
    _losses,
    _run,
    _write,
)

from personalize.training import checkpoint as ckpt

STEPS = 3


def _three_runs(tmp: Path, config, state_dict_type: str) -> SimpleNamespace:
    """The FSDP run, the DDP run (same seed and data), and the FSDP run resumed at step 2."""
    fsdp, ddp, resumed = tmp / "fsdp", tmp / "ddp", tmp / "resumed"
    _run(_launch_fsdp(_write(tmp, "fsdp", config(fsdp)), state_dict_type))
    _run(launch_two_processes("personalize", "train", str(_write(tmp, "ddp", config(ddp)))))
    step2 = ckpt.checkpoint_root(fsdp) / "step-000002"
    _run(_launch_fsdp(_write(tmp, "r", config(resumed, resume=str(step2))), state_dict_type))
    return SimpleNamespace(fsdp=fsdp, ddp=ddp, resumed=resumed)


def _assert_matches_ddp_and_resumes(runs: SimpleNamespace, files: list[str]) -> None:
    fsdp, ddp = _losses(runs.fsdp), _losses(runs.ddp)
    assert fsdp.keys() == ddp.keys() == set(range(1, STEPS + 1))
    for step in fsdp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-5, abs=1e-6), step
    assert _losses(runs.resumed) == {k: v for k, v in fsdp.items() if k > 2}
    for name in files:
        saved = load_file(runs.fsdp / name)
        _assert_close(saved, load_file(runs.ddp / name), 1e-5)
        _assert_equal(load_file(runs.resumed / name), saved)


@pytest.fixture(scope="module")
def sdxl_lora_runs(tiny_sdxl_model_dir, instance_dir, tmp_path_factory):
    def config(out: Path, **extra) -> dict:
        return base_config(
            tiny_sdxl_model_dir,
            instance_dir,
            out,
            lora={"rank": 4, "train_text_encoder": True},
            train={"max_steps": STEPS, "checkpoint_every": 2},
            **extra,
        )

    return _three_runs(tmp_path_factory.mktemp("sdxl_lora_scale"), config, "SHARDED_STATE_DICT")


def test_fsdp_sdxl_lora_shards_unet_and_both_text_encoders(sdxl_lora_runs):
    from personalize.methods.lora import LORA_WEIGHTS

    _assert_sharded(sdxl_lora_runs.fsdp, ["unet", "text_encoder", "text_encoder_2"])
    saved = load_file(sdxl_lora_runs.fsdp / LORA_WEIGHTS)
    assert any(k.startswith("text_encoder_2") for k in saved)  # the second encoder trained
    _assert_matches_ddp_and_resumes(sdxl_lora_runs, [LORA_WEIGHTS])


@pytest.fixture(scope="module")
def sdxl_dreambooth_runs(tiny_sdxl_model_dir, instance_dir, tmp_path_factory):
    def config(out: Path, **extra) -> dict:
        return base_config(
            tiny_sdxl_model_dir,
            instance_dir,
            out,
            method="dreambooth",
            train={"max_steps": STEPS, "checkpoint_every": 2},
            **extra,
        )

    return _three_runs(tmp_path_factory.mktemp("sdxl_db_scale"), config, "FULL_STATE_DICT")


def test_fsdp_sdxl_dreambooth_shards_the_full_unet(sdxl_dreambooth_runs):
    _assert_sharded(sdxl_dreambooth_runs.fsdp, ["unet"])
    _assert_matches_ddp_and_resumes(
        sdxl_dreambooth_runs, ["unet/diffusion_pytorch_model.safetensors"]
    )
