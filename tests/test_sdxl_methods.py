"""DreamBooth and hypernetworks on SDXL (issue 17), on the tiny SDXL built in code
(personalize/testing.py): full fine-tuning of the UNet and both text encoders with prior
preservation and the regularizers, the saved pipeline in stock StableDiffusionXLPipeline,
the SGM-layout single file through diffusers' single-file reader, and the webui
hypernetwork keyed by SDXL's context width."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
import yaml
from conftest import base_config
from diffusers import StableDiffusionXLPipeline
from helpers import ROOT, launch_two_processes
from PIL import Image
from safetensors import safe_open

import personalize
from personalize import train
from personalize.adapters.kohya import sdxl_unet_path
from personalize.config import from_dict
from personalize.methods.base import StepOutputs, get_method
from personalize.models import load_parts
from personalize.testing import TINY_SDXL_TEXT_WIDTH, TINY_SDXL_TEXT_WIDTH_2
from personalize.training.loop import Trainer

PROMPT = "a photo of sks disc"
SDXL_WIDTH = TINY_SDXL_TEXT_WIDTH + TINY_SDXL_TEXT_WIDTH_2  # both encoders' context, joined


def _image(pipe, prompt: str = PROMPT) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def _config(model_dir, data_dir, out, **sections):
    cfg = base_config(model_dir, data_dir, out, **sections)
    cfg["train"]["max_steps"] = 3
    return cfg


def _changed(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return any(not torch.equal(v, sb[k]) for k, v in a.state_dict().items())


# ------------------------------------------------------------------ DreamBooth


@pytest.fixture(scope="module")
def sdxl_db_run(tiny_sdxl_model_dir, instance_dir, tmp_path_factory):
    """DreamBooth on the UNet and both text encoders (each its own LR), prior preservation
    with class images the SDXL pipeline generates, a single file; 3 steps."""
    out = tmp_path_factory.mktemp("sdxl_db") / "db"
    cfg = _config(
        tiny_sdxl_model_dir,
        instance_dir,
        out,
        method="dreambooth",
        dreambooth={
            "train_text_encoder": True,
            "text_encoder_lr": 5e-4,
            "text_encoder_2_lr": 2e-4,
            "save_single_file": True,
        },
        prior={
            "enabled": True,
            "class_prompt": "a photo of a disc",
            "num_class_images": 2,
            "generation_steps": 2,
            "generation_batch_size": 2,
        },
    )
    train(from_dict(cfg))
    return out


def test_dreambooth_trains_both_text_encoders_each_with_its_own_lr(
    tiny_sdxl_model_dir, instance_dir, tmp_path
):
    cfg = _config(
        tiny_sdxl_model_dir,
        instance_dir,
        tmp_path / "run",
        method="dreambooth",
        dreambooth={"train_text_encoder": True, "text_encoder_lr": 5e-4, "text_encoder_2_lr": 2e-4},
    )
    trainer = Trainer(from_dict(cfg))
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 5e-4, 2e-4]
    assert trainer.trains["text_encoder"] and trainer.trains["text_encoder_2"]
    state = trainer.method.trainable_state_dict(trainer.parts)
    assert any(k.startswith("text_encoder_2.") for k in state)


def test_dreambooth_folder_loads_in_stock_sdxl_and_changes_the_image(
    sdxl_db_run, tiny_sdxl_model_dir
):
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    tuned = StableDiffusionXLPipeline.from_pretrained(sdxl_db_run)
    assert {"text_encoder_2", "tokenizer_2"} <= set(tuned.components)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert _changed(getattr(tuned, name), getattr(base, name)), name
    assert not _changed(tuned.vae, base.vae)  # untouched: copied from the base model
    assert np.abs(_image(tuned) - _image(base)).max() > 1e-3
    # personalize.load swaps the UNet and both text encoders into a base pipeline.
    loaded = personalize.load(
        StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir), sdxl_db_run
    )
    np.testing.assert_allclose(_image(loaded), _image(tuned), atol=1e-6)


def test_class_images_are_generated_with_the_sdxl_pipeline(sdxl_db_run):
    images = sorted((sdxl_db_run / "class_images").glob("*.png"))
    assert len(images) == 2
    for path in images:
        pixels = np.asarray(Image.open(path), dtype=np.float32)
        assert pixels.shape == (32, 32, 3) and pixels.std() > 0  # drawn, not blank


def test_single_file_is_the_sgm_layout_and_loads_back_with_the_same_weights(sdxl_db_run):
    path = sdxl_db_run / f"{sdxl_db_run.name}.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        projection = f.get_tensor("conditioner.embedders.1.model.text_projection")
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "conditioner"}
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.ln_final.weight" in keys
    # The UNet names agree with the kohya LoRA writer's independent SDXL name map.
    tuned = StableDiffusionXLPipeline.from_pretrained(sdxl_db_run)
    for key in tuned.unet.state_dict():
        module, _, leaf = key.rpartition(".")
        if ".attentions." in key or ".resnets." in key:
            original = sdxl_unet_path(module, tuned.unet.config)
            assert f"model.diffusion_model.{original}.{leaf}" in keys, key
    # OpenCLIP holds the projection as (width, projection): the Linear weight transposed.
    torch.testing.assert_close(projection, tuned.text_encoder_2.text_projection.weight.T)
    single = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(sdxl_db_run), local_files_only=True
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want = getattr(tuned, name).state_dict()
        got = getattr(single, name).state_dict()
        assert set(got) == set(want), name
        for k, v in want.items():
            assert torch.equal(got[k], v), f"{name}.{k}"


def _step_outputs(parts, batch_size: int = 2) -> tuple[dict, StepOutputs]:
    torch.manual_seed(0)
    noisy = torch.randn(batch_size, 4, 16, 16)
    timesteps = torch.tensor([10, 500])
    batch = {"time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * batch_size)}
    dummy = torch.zeros(())
    return batch, StepOutputs(dummy, dummy, noisy, timesteps, dummy, dummy, dummy, parts.unet)


def test_l2sp_and_distillation_on_sdxl_are_zero_at_the_start_and_see_all_three_models(
    tiny_sdxl_model_dir, instance_dir, tmp_path
):
    """Both terms cover the UNet and both text encoders; the distillation teacher is run
    with SDXL's pooled text and size ids (a UNet called without them fails)."""
    cfg = from_dict(
        _config(
            tiny_sdxl_model_dir,
            instance_dir,
            tmp_path / "run",
            method="dreambooth",
            dreambooth={"train_text_encoder": True},
            regularization={"weight_constraint": "l2sp", "weight_constraint_lambda": 1.0},
            prior={"enabled": True, "kind": "distillation", "class_prompt": "a photo of a disc"},
        )
    )
    parts = load_parts(str(tiny_sdxl_model_dir))
    method = get_method("dreambooth")(cfg)
    method.setup(parts)
    terms = method.regularizers.terms
    distill = terms["distillation"]
    assert set(distill.teacher_text_encoders) == {"text_encoder", "text_encoder_2"}
    batch, outputs = _step_outputs(parts)
    with torch.no_grad():
        assert terms["l2sp"](batch, outputs, parts).item() == 0.0
        assert distill(batch, outputs, parts).item() < 1e-10  # rounding only
        # A change in either text encoder moves both terms: text_encoder's token
        # embeddings reach the hidden states, text_encoder_2's projection only the pooled
        # text the UNet gets in added_cond_kwargs.
        for weight in (
            parts.text_encoder.get_input_embeddings().weight,
            parts.text_encoder_2.text_projection.weight,
        ):
            saved = weight.clone()
            weight.add_(0.05 * torch.randn_like(weight))
            assert terms["l2sp"](batch, outputs, parts).item() > 0
            assert distill(batch, outputs, parts).item() > 1e-6
            weight.copy_(saved)


def test_l2sp_and_distillation_train_on_sdxl(tiny_sdxl_model_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _config(
        tiny_sdxl_model_dir,
        instance_dir,
        out,
        method="dreambooth",
        dreambooth={"train_text_encoder": True},
        regularization={"weight_constraint": "l2sp", "weight_constraint_lambda": 0.1},
        prior={"enabled": True, "kind": "distillation", "class_prompt": "a photo of a disc"},
    )
    cfg["train"]["max_steps"] = 2
    train(from_dict(cfg))
    tuned = StableDiffusionXLPipeline.from_pretrained(out)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    assert _changed(tuned.unet, base.unet) and _changed(tuned.text_encoder_2, base.text_encoder_2)


def test_lora_regularizers_on_sdxl_cover_text_encoder_2s_adapters(
    tiny_sdxl_model_dir, instance_dir, tmp_path
):
    """LoRA's L2-SP sums text_encoder_2's adapters too, and its distillation teacher (the
    model with the adapters off) has them off on text_encoder_2 as well."""
    cfg = from_dict(
        _config(
            tiny_sdxl_model_dir,
            instance_dir,
            tmp_path / "run",
            lora={"rank": 4, "train_text_encoder": True},
            regularization={"weight_constraint": "l2sp", "weight_constraint_lambda": 1.0},
            prior={"enabled": True, "kind": "distillation", "class_prompt": "a photo of a disc"},
        )
    )
    parts = load_parts(str(tiny_sdxl_model_dir))
    method = get_method("lora")(cfg)
    method.setup(parts)
    terms = method.regularizers.terms
    batch, outputs = _step_outputs(parts)
    with torch.no_grad():
        # peft starts lora_B at zero: student == teacher, no weight change.
        assert terms["l2sp"](batch, outputs, parts).item() == 0.0
        assert terms["distillation"](batch, outputs, parts).item() < 1e-10
        for name, p in parts.text_encoder_2.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
        assert terms["l2sp"](batch, outputs, parts).item() > 0
        assert terms["distillation"](batch, outputs, parts).item() > 1e-6


# ------------------------------------------------------------------ LoRA tools on SDXL


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl_model_dir, instance_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl_lora") / "lora"
    cfg = _config(tiny_sdxl_model_dir, instance_dir, out, lora={"rank": 4})
    cfg["train"]["lr"] = 5e-3
    train(from_dict(cfg))
    return out


def test_merge_single_file_on_sdxl_loads_back_with_the_merged_weights(
    tiny_sdxl_model_dir, sdxl_lora, tmp_path
):
    from personalize.tools.lora_merge import merge

    merged_dir = merge(str(tiny_sdxl_model_dir), [(str(sdxl_lora), 1.0)], tmp_path / "m", True)
    merged = StableDiffusionXLPipeline.from_pretrained(merged_dir)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    assert _changed(merged.unet, base.unet)
    single = StableDiffusionXLPipeline.from_single_file(
        str(merged_dir / "m.safetensors"), config=str(merged_dir), local_files_only=True
    )
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        got = getattr(single, name).state_dict()
        for k, v in getattr(merged, name).state_dict().items():
            assert torch.equal(got[k], v), f"{name}.{k}"


def test_evaluate_draws_sdxl_columns_with_size_conditioning_at_the_resolution(
    tiny_sdxl_model_dir, sdxl_lora, tmp_path
):
    """`personalize evaluate` on an SDXL model: each column is a fresh SDXL pipeline, and
    its image is what a stock pipeline with the LoRA draws when told original and target
    size = the generation resolution."""
    from diffusers import DDIMScheduler

    from personalize.evaluation import evaluate, evaluation_from_dict

    out = tmp_path / "eval"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    cfg = evaluation_from_dict(
        {
            "model": str(tiny_sdxl_model_dir),
            "output_dir": str(out),
            "artifacts": [{"path": str(sdxl_lora), "label": "lora"}],
            "prompts": {"file": str(prompts), "class_prompts": []},
            "generation": {
                "seeds": [3],
                "num_inference_steps": 2,
                "guidance_scale": 5.0,
                "resolution": 32,
                "scheduler": "DDIM",
            },
        }
    )
    evaluate(cfg)
    drawn = {p.parent.parent.name: p for p in (out / "images").rglob("seed3.png")}
    assert set(drawn) == {"base", "lora"}
    base, lora = (np.asarray(Image.open(drawn[c]), dtype=np.int16) for c in ("base", "lora"))
    assert base.shape == (32, 32, 3) and np.abs(lora - base).max() > 0
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(sdxl_lora)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(
        [PROMPT],
        generator=[torch.Generator().manual_seed(3)],
        num_inference_steps=2,
        guidance_scale=5.0,
        height=32,
        width=32,
        original_size=(32, 32),
        target_size=(32, 32),
    ).images[0]
    assert np.abs(lora - np.asarray(want, dtype=np.int16)).max() <= 1


# ------------------------------------------------------------------ hypernetwork

# The tiny SDXL UNet's attention context widths: the joined text context (80) and the
# self-attention of its one attention level (64); its first level (32) has none, as SDXL's.
SDXL_HN_SIZES = [SDXL_WIDTH, 64]

# The real SDXL base UNet's shape (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json).
SDXL_BASE_UNET = {
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "layers_per_block": 2,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}


@pytest.fixture(scope="module")
def sdxl_hn_run(tiny_sdxl_model_dir, instance_dir, tmp_path_factory):
    """A hypernetwork on the tiny SDXL; enable_sizes given SD 1.x's way (768 = the text)."""
    out = tmp_path_factory.mktemp("sdxl_hn") / "hn"
    cfg = _config(
        tiny_sdxl_model_dir,
        instance_dir,
        out,
        method="hypernetwork",
        hypernetwork={"enable_sizes": [768, 64], "name": "hnxl"},
    )
    cfg["train"]["lr"] = 1e-2
    train(from_dict(cfg))
    return out


def test_default_hypernetwork_sizes_on_the_real_sdxl_shape():
    """SD 1.x's default [768, 320, 640, 1280] on SDXL's UNet: the text context is 2048
    wide (what the webui's apply_hypernetworks reads as context.shape[2] there), and no
    attention reads 320 (SDXL's first level has none)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from personalize.adapters.hypernetwork import attention_widths
    from personalize.methods.hypernetwork import sizes_for_model
    from personalize.models import SDParts

    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
    assert sorted(attention_widths(unet)) == [640, 1280, 2048]
    parts = SDParts(None, None, None, unet, None, family="sdxl")
    assert sizes_for_model([768, 320, 640, 1280], parts) == [2048, 640, 1280]
    assert sizes_for_model([2048, 1280], parts) == [2048, 1280]


def test_sdxl_hypernetwork_file_is_keyed_by_the_sdxl_context_width(sdxl_hn_run):
    from client_rules import comfyui_hypernetwork, webui_safe_check

    webui_safe_check(sdxl_hn_run / "hnxl.pt")
    raw = torch.load(sdxl_hn_run / "hnxl.pt", weights_only=True)
    assert sorted(k for k in raw if isinstance(k, int)) == sorted(SDXL_HN_SIZES)
    assert sorted(comfyui_hypernetwork(raw)) == sorted(SDXL_HN_SIZES)


@pytest.mark.parametrize("file", ["hnxl.pt", "hnxl.safetensors"])
def test_personalize_load_applies_the_hypernetwork_to_an_sdxl_pipeline(
    sdxl_hn_run, tiny_sdxl_model_dir, file
):
    base = _image(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir))
    pipe = personalize.load(
        StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir), sdxl_hn_run / file
    )
    assert np.abs(_image(pipe) - base).max() > 1e-4


# ------------------------------------------------------------------ two processes


def test_two_process_sdxl_dreambooth_with_class_images_and_both_text_encoders(
    tiny_sdxl_model_dir, instance_dir, tmp_path
):
    """accelerate launch, 2 CPU ranks (gloo): the SDXL class images are generated split
    across the ranks, the UNet and both text encoders train under DDP with L2-SP, and the
    main process saves one SDXL pipeline."""
    out = tmp_path / "run"
    cfg = _config(
        tiny_sdxl_model_dir,
        instance_dir,
        out,
        method="dreambooth",
        dreambooth={"train_text_encoder": True},
        regularization={"weight_constraint": "l2sp", "weight_constraint_lambda": 1.0},
        prior={
            "enabled": True,
            "class_prompt": "a photo of a disc",
            "num_class_images": 2,
            "generation_steps": 2,
            "generation_batch_size": 1,
        },
    )
    cfg["train"]["max_steps"] = 2
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1")
    proc = subprocess.run(
        launch_two_processes("personalize", "train", str(cfg_path), multi_gpu=True),
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es)" in proc.stderr
    assert proc.stdout.count("artifact saved in") == 1
    assert len(list((out / "class_images").glob("*.png"))) == 2
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    tuned = StableDiffusionXLPipeline.from_pretrained(out)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert _changed(getattr(tuned, name), getattr(base, name)), name
