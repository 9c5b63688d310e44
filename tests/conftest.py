"""Shared fixtures: a tiny Stable Diffusion model on disk and a few instance images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from personalize.testing import (
    save_tiny_pipeline,
    save_tiny_sd2_pipeline,
    save_tiny_sdxl_pipeline,
    write_synthetic_images,
)

# The models here are tiny: one thread per process is as fast as two on an idle machine and
# far faster on a busy one, and subprocess ranks (2-process tests) then don't oversubscribe.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("model") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd2_model_dir(tmp_path_factory) -> Path:
    """SD 2.x-shaped: v-prediction, OpenCLIP-style 48-wide text encoder, linear proj_in."""
    return save_tiny_sd2_pipeline(tmp_path_factory.mktemp("model") / "tiny-sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusionXLPipeline folder (two text encoders, text_time conditioning)."""
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("model") / "tiny-sdxl")


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("instance")
    write_synthetic_images(folder, count=4)
    return folder


def base_config(model_dir: Path, data_dir: Path, out: Path, **sections) -> dict:
    """A fast config on the tiny model; tests override what they check."""
    cfg = {
        "method": "lora",
        "output_dir": str(out),
        "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_dir), "prompt": "a photo of sks disc"},
        "train": {
            "max_steps": 4,
            "resolution": 32,
            "batch_size": 2,
            "lr": 1e-3,
            "report_to": "none",
            "log_every": 1,
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg
