"""LoRA through the shared loop: base weights untouched, artifact loads and changes output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import base_config
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from personalize import load, train
from personalize.config import from_dict
from personalize.inference import ArtifactError, generate
from personalize.methods.lora import KOHYA_WEIGHTS, LORA_WEIGHTS, effective_scale
from personalize.models import load_parts

PROMPT = "a photo of sks disc"


def _images(pipe, prompt=PROMPT):
    return np.stack(
        [
            np.asarray(im, dtype=np.float32)
            for im in generate(pipe, [prompt], [0, 1], num_inference_steps=4, resolution=32)[0]
        ]
    )


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, instance_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = from_dict(
        base_config(tiny_model_dir, instance_dir, out, train={"max_steps": 6}, lora={"rank": 4})
    )
    trainer_parts = load_parts(str(tiny_model_dir))
    base_unet = {k: v.clone() for k, v in trainer_parts.unet.state_dict().items()}
    base_te = {k: v.clone() for k, v in trainer_parts.text_encoder.state_dict().items()}
    train(cfg, parts=trainer_parts)
    return out, trainer_parts, base_unet, base_te


def test_base_weights_bit_identical(lora_run):
    _, parts, base_unet, base_te = lora_run
    trained = parts.unet.state_dict()
    for key, value in base_unet.items():
        peft_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        now = trained[key] if key in trained else trained[peft_key]
        assert torch.equal(now, value), key
    for key, value in parts.text_encoder.state_dict().items():
        assert torch.equal(value, base_te[key]), key
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())


def test_artifact_loads_into_fresh_pipeline_with_stock_diffusers(lora_run, tiny_model_dir):
    out, *_ = lora_run
    assert (out / LORA_WEIGHTS).is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = _images(pipe)
    pipe.load_lora_weights(out)
    after = _images(pipe)
    assert np.abs(after - before).mean() > 0.5


def test_personalize_load_changes_output_and_strength_zero_does_not(lora_run, tiny_model_dir):
    out, *_ = lora_run
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = _images(pipe)
    load(pipe, out)
    assert np.abs(_images(pipe) - before).mean() > 0.5
    pipe0 = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe0.set_progress_bar_config(disable=True)
    load(pipe0, out, strength=0.0)
    assert np.abs(_images(pipe0) - before).max() <= 1.0  # rounding of uint8 only


def test_kohya_file_and_effective_scale(lora_run):
    out, *_ = lora_run
    kohya = load_file(out / KOHYA_WEIGHTS)
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith("lora_unet_") for k in downs)
    for k in downs:
        assert kohya[k].shape[0] == 4
        assert float(kohya[k.replace(".lora_down.weight", ".alpha")]) == 4.0
        assert k.replace(".lora_down.weight", ".lora_up.weight") in kohya
    assert effective_scale(out / LORA_WEIGHTS) == {"rank": 4, "alpha": 4, "scale": 1.0}


def test_kohya_file_loads_with_stock_diffusers(lora_run, tiny_model_dir):
    out, *_ = lora_run
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    ref = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out, weight_name=KOHYA_WEIGHTS)
    ref.load_lora_weights(out)
    assert np.abs(_images(pipe) - _images(ref)).max() <= 1.0


def test_text_encoder_lora(tiny_model_dir, instance_dir, tmp_path):
    cfg = from_dict(
        base_config(
            tiny_model_dir,
            instance_dir,
            tmp_path / "run",
            train={"max_steps": 2},
            lora={"train_text_encoder": True, "text_encoder_lr": 5e-4},
        )
    )
    out = train(cfg)
    keys = load_file(out / LORA_WEIGHTS).keys()
    assert any(k.startswith("text_encoder.") for k in keys)
    assert any(k.startswith("unet.") for k in keys)


def test_wrong_artifact_for_model_is_a_clear_error(tmp_path, tiny_model_dir):
    bogus = tmp_path / "pytorch_lora_weights.safetensors"
    from safetensors.torch import save_file

    save_file(
        {
            "unet.nothing.here.lora.down.weight": torch.zeros(4, 7),
            "unet.nothing.here.lora.up.weight": torch.zeros(7, 4),
        },
        str(bogus),
    )
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    with pytest.raises(ArtifactError):
        load(pipe, tmp_path)


def test_unknown_target_module_is_a_clear_error(tiny_model_dir, instance_dir, tmp_path):
    cfg = from_dict(
        base_config(
            tiny_model_dir,
            instance_dir,
            tmp_path / "run",
            lora={"unet_target_modules": ["no_such_proj"]},
        )
    )
    with pytest.raises(ValueError, match="lora.unet_target_modules"):
        train(cfg)


WIDE_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "time_emb_proj",
]


@pytest.mark.parametrize("weight_name", [LORA_WEIGHTS, KOHYA_WEIGHTS])
def test_every_adapted_layer_survives_save_and_load(
    tiny_model_dir, instance_dir, tmp_path_factory, weight_name
):
    """Adapters beyond attention (ff, proj_in, resnet convs) and the text encoder's load back
    exactly: a file that mixes the old lora.down names with lora_A once dropped them."""
    out = tmp_path_factory.mktemp("wide") / "run"
    cfg = from_dict(
        base_config(
            tiny_model_dir,
            instance_dir,
            out,
            train={"max_steps": 3},
            lora={"rank": 4, "unet_target_modules": WIDE_TARGETS, "train_text_encoder": True},
        )
    )
    parts = load_parts(str(tiny_model_dir))
    train(cfg, parts=parts)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_lora_weights(out, weight_name=weight_name)

    def adapted(model):
        return {n for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}

    assert adapted(pipe.unet) == adapted(parts.unet)
    assert adapted(pipe.text_encoder) == adapted(parts.text_encoder)
    assert any(".ff." in n for n in adapted(pipe.unet))
    ids = parts.tokenizer(
        [PROMPT],
        padding="max_length",
        return_tensors="pt",
        max_length=parts.tokenizer.model_max_length,
    ).input_ids
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, loaded_hidden = parts.text_encoder(ids)[0], pipe.text_encoder(ids)[0]
        torch.testing.assert_close(loaded_hidden, hidden)
        want = parts.unet(latents, torch.tensor([500]), hidden).sample
        got = pipe.unet(latents, torch.tensor([500]), hidden).sample
    torch.testing.assert_close(got, want)
