"""SDXL in the shared loop (issue 17's core): a tiny SDXL built in code
(personalize/testing.py) is detected from its folder, trains LoRA on the UNet and both text
encoders, and its files load into a stock StableDiffusionXLPipeline and under the client
rules of ComfyUI / the webui / sd-scripts (tests/client_rules.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import base_config
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open

import personalize
from personalize import train
from personalize.config import from_dict
from personalize.methods.lora import KOHYA_WEIGHTS, LORA_WEIGHTS
from personalize.models import SDXL, detect_family, load_parts


def _sdxl_config(model, data, out, **sections):
    cfg = base_config(model, data, out, **sections)
    cfg["train"]["max_steps"] = sections.get("train", {}).get("max_steps", 3)
    return cfg


def _image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a photo of sks disc",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.fixture(scope="module")
def sdxl_lora_run(tiny_sdxl_model_dir, instance_dir, tmp_path_factory):
    """LoRA on the UNet and both text encoders (each its own LR), 3 steps."""
    out = tmp_path_factory.mktemp("sdxl") / "run"
    cfg = _sdxl_config(
        tiny_sdxl_model_dir,
        instance_dir,
        out,
        lora={
            "rank": 4,
            "alpha": 8.0,
            "train_text_encoder": True,
            "text_encoder_lr": 5e-4,
            "text_encoder_2_lr": 2e-4,
        },
    )
    train(from_dict(cfg))
    return out


def test_family_is_read_from_the_model_folder(tiny_sdxl_model_dir, tiny_model_dir):
    assert detect_family(str(tiny_sdxl_model_dir)) == SDXL
    assert detect_family(str(tiny_model_dir)) == "sd1"
    parts = load_parts(str(tiny_sdxl_model_dir))
    assert parts.family == SDXL and parts.is_sdxl
    assert parts.text_encoder_2 is not None and parts.tokenizer_2 is not None
    assert set(parts.modules()) == {"unet", "text_encoder", "text_encoder_2", "vae"}
    sd1 = load_parts(str(tiny_model_dir))
    assert sd1.text_encoder_2 is None and "text_encoder_2" not in sd1.modules()


def test_lora_saves_all_three_components_for_stock_diffusers(sdxl_lora_run):
    with safe_open(str(sdxl_lora_run / LORA_WEIGHTS), "pt") as f:
        prefixes = {k.split(".", 1)[0] for k in f.keys()}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}


def test_lora_loads_into_a_fresh_stock_sdxl_pipeline_and_changes_the_image(
    sdxl_lora_run, tiny_sdxl_model_dir
):
    base = _image(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    pipe.load_lora_weights(sdxl_lora_run, weight_name=LORA_WEIGHTS)
    assert {k: len(v) for k, v in pipe.get_list_adapters().items()} == {
        "unet": 1,
        "text_encoder": 1,
        "text_encoder_2": 1,
    }
    tuned = _image(pipe)
    assert np.abs(tuned - base).max() > 1e-3


@pytest.mark.parametrize("file", [LORA_WEIGHTS, KOHYA_WEIGHTS])
def test_personalize_load_applies_either_file_at_full_strength(
    sdxl_lora_run, tiny_sdxl_model_dir, file
):
    """Our loader, with the kohya file too, draws what stock diffusers draws with ours."""
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    reference.load_lora_weights(sdxl_lora_run, weight_name=LORA_WEIGHTS)
    pipe = personalize.load(
        StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir), sdxl_lora_run / file
    )
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    np.testing.assert_allclose(_image(pipe), _image(reference), atol=1e-5)
