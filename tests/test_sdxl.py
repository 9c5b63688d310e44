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
from safetensors.torch import load_file

import personalize
from personalize import train
from personalize.config import from_dict
from personalize.errors import NonFiniteLatentsError
from personalize.methods.lora import KOHYA_WEIGHTS, LORA_WEIGHTS
from personalize.models import SDXL, detect_family, load_parts
from personalize.training.loop import Trainer


def _sdxl_config(model_dir, data_dir, out, **sections):
    cfg = base_config(model_dir, data_dir, out, **sections)
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
        keys = list(f.keys())
    assert {k.split(".", 1)[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    # SDXL reads text_encoder's penultimate layer: its last layer (1 of 0..1) gets no
    # adapters, which could never learn; text_encoder_2's pooled output uses all its layers.
    te1_layers = {
        k.split("layers.")[1].split(".")[0] for k in keys if k.startswith("text_encoder.")
    }
    te2_layers = {
        k.split("layers.")[1].split(".")[0] for k in keys if k.startswith("text_encoder_2.")
    }
    assert te1_layers == {"0"} and te2_layers == {"0", "1"}


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


def test_each_text_encoder_trains_with_its_own_lr(tiny_sdxl_model_dir, instance_dir, tmp_path):
    cfg = _sdxl_config(
        tiny_sdxl_model_dir,
        instance_dir,
        tmp_path / "run",
        lora={"train_text_encoder": True, "text_encoder_lr": 5e-4, "text_encoder_2_lr": 2e-4},
    )
    trainer = Trainer(from_dict(cfg))
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    assert lrs == [1e-3, 5e-4, 2e-4]  # unet (train.lr), text_encoder, text_encoder_2
    assert trainer.trains == {
        "unet": True,
        "text_encoder": True,
        "text_encoder_2": True,
        "vae": False,
    }
    assert trainer.conditioning.text_cache is None  # the encoders train: nothing to cache


# ------------------------------------------------------------------ size/crop conditioning


def _record_dataset(folder, size, **kwargs):
    from PIL import Image

    from personalize.data import ImageCaptionDataset, load_records

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "wide.png")
    records = load_records(str(folder))
    return ImageCaptionDataset(records, resolution=32, instance_prompt="a disc", **kwargs), pixels


def _crop_of(pixels, resized, left, top, target, flip=False):
    """The view cut by hand: resize (as PIL, shrinking with LANCZOS), crop, flip."""
    from PIL import Image

    from personalize.data.transforms import to_tensor

    image = Image.fromarray(pixels).resize(resized, resample=Image.Resampling.LANCZOS)
    image = image.crop((left, top, left + target[0], top + target[1]))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)


def test_time_ids_are_each_images_own_size_and_crop(tmp_path):
    """original_size (h, w) before resizing, the crop's (top, left) in the resized image
    (in the flipped image when flipped, as diffusers' SDXL scripts flip before cropping),
    target_size (h, w): what the pixels really are."""
    # 60 x 40 -> covers 32 x 32 at 48 x 32: the crop's left is anywhere in 0..16.
    random_crops, pixels = _record_dataset(tmp_path / "a", (60, 40), center_crop=False)
    lefts = set()
    for epoch in range(6):
        random_crops.set_epoch(epoch)
        item = random_crops[0]
        h, w, top, left, th, tw = item["time_ids"].tolist()
        assert (h, w, top, th, tw) == (40, 60, 0, 32, 32) and 0 <= left <= 16
        want = _crop_of(pixels, (48, 32), int(left), 0, (32, 32))
        torch.testing.assert_close(item["pixel_values"], want)
        lefts.add(left)
    assert len(lefts) > 1  # random crops: the ids follow them

    flipped, _ = _record_dataset(tmp_path / "b", (60, 40), center_crop=False, random_flip=True)
    seen_flip = False
    for epoch in range(8):
        flipped.set_epoch(epoch)
        item = flipped[0]
        _, _, _, left, _, _ = item["time_ids"].tolist()
        # As a crop of the flipped image, `left` cuts exactly these pixels.
        want = _crop_of(pixels[:, ::-1].copy(), (48, 32), int(left), 0, (32, 32))
        if torch.allclose(item["pixel_values"], want, atol=1e-2):
            seen_flip |= not torch.allclose(
                item["pixel_values"], _crop_of(pixels, (48, 32), int(left), 0, (32, 32))
            )
        else:
            torch.testing.assert_close(
                item["pixel_values"], _crop_of(pixels, (48, 32), int(left), 0, (32, 32))
            )
    assert seen_flip

    # A bucket (w 40, h 24): the target size is the bucket's; centered crops of a cached
    # view (no pixels loaded) have the same ids as the loaded view.
    bucketed, _ = _record_dataset(tmp_path / "c", (60, 40), sizes=[(40, 24)])
    item = bucketed[0]
    # 60 x 40 covers 40 x 24 at 40 x 27 (scale 2/3): 3 rows to spare, top = 1.
    assert item["time_ids"].tolist() == [40, 60, 1, 0, 24, 40]
    assert torch.equal(bucketed.center_geometry(0, False).time_ids(), item["time_ids"])


def test_time_ids_reach_the_unet_per_example(tiny_sdxl_model_dir, instance_dir, tmp_path):
    trainer = Trainer(from_dict(_sdxl_config(tiny_sdxl_model_dir, instance_dir, tmp_path / "r")))
    batch = next(iter(trainer.dataloader))
    assert batch["time_ids"].shape == (2, 6)
    text = trainer.conditioning.text(
        batch["captions"], time_ids=trainer.conditioning.time_ids(batch)
    )
    added = text.unet_kwargs["added_cond_kwargs"]
    torch.testing.assert_close(added["time_ids"], batch["time_ids"])
    assert added["text_embeds"].shape == (2, 48)  # text_encoder_2's projection
    assert text.hidden_states.shape[-1] == 32 + 48  # both encoders, concatenated
    # A method's extra loss (a regularizer calling the UNet again) gets them too.
    seen = []
    trainer.method.extra_loss = lambda batch, outputs, parts: seen.append(outputs) or None
    trainer.cfg.train.max_steps = 1
    trainer.run()
    assert seen and seen[0].unet_kwargs["added_cond_kwargs"]["time_ids"].shape == (2, 6)


# ------------------------------------------------------------------ VAE and caches


def test_nan_latents_are_refused_and_never_cached(tiny_sdxl_model_dir, instance_dir, tmp_path):
    parts = load_parts(str(tiny_sdxl_model_dir))
    with torch.no_grad():
        parts.vae.quant_conv.weight.fill_(float("nan"))  # what an fp16 SDXL VAE overflows to
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLatentsError, match="fp16-fixed VAE") as caught:
        train(from_dict(_sdxl_config(tiny_sdxl_model_dir, instance_dir, out)), parts=parts)
    assert "nothing was cached" in str(caught.value)
    assert not list((out / "cache" / "latents").rglob("*.safetensors"))


def test_sdxl_vae_stays_fp32_under_mixed_precision(tiny_sdxl_model_dir):
    from personalize.training.accelerator import cast_for_training, vae_needs_fp32

    parts = load_parts(str(tiny_sdxl_model_dir))
    assert vae_needs_fp32(parts)
    for module in parts.modules().values():
        module.requires_grad_(False)  # as the loop freezes them
    cast_for_training(parts, torch.bfloat16, torch.device("cpu"))
    assert parts.vae.dtype == torch.float32 and parts.unet.dtype == torch.bfloat16
    parts.vae.register_to_config(force_upcast=False)  # an fp16-fixed VAE says so
    cast_for_training(parts, torch.bfloat16, torch.device("cpu"))
    assert parts.vae.dtype == torch.bfloat16


def test_text_embedding_cache_trains_the_same_as_the_encoders(
    tiny_sdxl_model_dir, instance_dir, tmp_path
):
    """Both encoders' hidden states and the pooled embedding come from the cache (caption
    dropout's empty prompt too), both encoders leave the device, and training matches."""
    common = dict(train={"max_steps": 3}, data={"caption_dropout": 0.5})
    cfg = _sdxl_config(tiny_sdxl_model_dir, instance_dir, tmp_path / "c", **common)
    cached = Trainer(from_dict(cfg))
    assert set(cached.conditioning.text_cache) == {"", "a photo of sks disc"}
    assert {"text_encoder", "text_encoder_2"} <= cached.conditioning.offloaded
    ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    from_cache = cached.conditioning.text(["", "a photo of sks disc"], time_ids=ids)
    cached.run()
    plain_cfg = _sdxl_config(tiny_sdxl_model_dir, instance_dir, tmp_path / "p", **common)
    plain_cfg["data"].update(cache_text_embeddings=False)
    plain = Trainer(from_dict(plain_cfg))
    assert plain.conditioning.text_cache is None
    encoded = plain.conditioning.text(["", "a photo of sks disc"], time_ids=ids)
    torch.testing.assert_close(from_cache.hidden_states, encoded.hidden_states)
    torch.testing.assert_close(
        from_cache.unet_kwargs["added_cond_kwargs"]["text_embeds"],
        encoded.unet_kwargs["added_cond_kwargs"]["text_embeds"],
    )
    plain.run()
    a, b = load_file(tmp_path / "c" / LORA_WEIGHTS), load_file(tmp_path / "p" / LORA_WEIGHTS)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_resume_gives_the_same_weights_as_a_straight_run(
    tiny_sdxl_model_dir, instance_dir, tmp_path
):
    common = dict(
        train={"max_steps": 4, "checkpoint_every": 2},
        lora={"train_text_encoder": True},
        data={"random_flip": True, "center_crop": False},
    )
    train(from_dict(_sdxl_config(tiny_sdxl_model_dir, instance_dir, tmp_path / "a", **common)))
    first = _sdxl_config(tiny_sdxl_model_dir, instance_dir, tmp_path / "b", **common)
    first["train"] = dict(first["train"], max_steps=2)
    train(from_dict(first))
    resumed = _sdxl_config(
        tiny_sdxl_model_dir, instance_dir, tmp_path / "b", resume="latest", **common
    )
    trainer = Trainer(from_dict(resumed))
    trainer.run()
    assert trainer.global_step == 4
    a, b = load_file(tmp_path / "a" / LORA_WEIGHTS), load_file(tmp_path / "b" / LORA_WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ client rules


def sdxl_unet():
    """SDXL's UNet block structure (3 levels: no attention, then 2 and 3 transformer blocks
    here for SDXL's 2 and 10; 2 layers per down block) at tiny widths: the module names
    depend only on these."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3),
        attention_head_dim=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 12,
        cross_attention_dim=8 + 12,
        norm_num_groups=4,
    )


def sdxl_text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(width, layers):
        return CLIPTextConfig(
            vocab_size=64,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=width,
        )

    torch.manual_seed(0)
    return CLIPTextModel(config(8, 12)), CLIPTextModelWithProjection(config(12, 4))


def _with_lora(model, targets, rank=2, alpha=6.0):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False),
        model,
    )
    return get_peft_model_state_dict(model)


def _peft_deltas(model) -> dict[str, torch.Tensor]:
    return {
        name: module.get_delta_weight("default")
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }


UNET_ALL = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj"]
UNET_ALL += ["ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
UNET_ALL += ["downsamplers.0.conv", "upsamplers.0.conv"]
TE_ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def test_sdxl_kohya_names_load_exactly_under_the_clients_rules():
    """ComfyUI's SDXL key map takes every key and applies alpha / rank as peft does; every
    UNet name is the original module name (what the webui and sd-scripts look up), the
    text encoders are lora_te1_ / lora_te2_."""
    from client_rules import comfyui_delta, comfyui_load_lora, comfyui_sdxl_key_map

    from personalize.adapters.kohya import peft_to_kohya

    unet, (te1, te2) = sdxl_unet(), sdxl_text_encoders()
    kohya = peft_to_kohya(
        _with_lora(unet, UNET_ALL),
        _with_lora(te1, TE_ALL),
        6.0,
        text_encoder_2_layers=_with_lora(te2, TE_ALL),
        sdxl_unet=unet.config,
    )
    deltas = {}
    for component, model in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2)):
        deltas.update({(component, n): d for n, d in _peft_deltas(model).items()})
    key_map, original = comfyui_sdxl_key_map(unet, te1, te2)
    patches, not_loaded = comfyui_load_lora(kohya, key_map)
    assert not_loaded == [] and set(patches) == set(deltas)
    for target, (up, down, alpha) in patches.items():
        want = deltas[target]
        torch.testing.assert_close(comfyui_delta(up, down, alpha, want.shape), want)
    names = {k.split(".", 1)[0] for k in kohya}
    unet_names = {n for n in names if n.startswith("lora_unet_")}
    assert unet_names <= original
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet_names
    assert "lora_unet_output_blocks_2_2_conv" in unet_names  # an upsampler after attention
    assert "lora_unet_label_emb_0_0" not in unet_names  # not targeted
    te_names = names - unet_names
    assert {n[:9] for n in te_names} == {"lora_te1_", "lora_te2_"}
    assert len([n for n in te_names if n.startswith("lora_te1_")]) == 12 * 6
    assert len([n for n in te_names if n.startswith("lora_te2_")]) == 4 * 6


def test_trained_sdxl_kohya_file_is_taken_whole_by_comfyui(sdxl_lora_run, tiny_sdxl_model_dir):
    from client_rules import comfyui_load_lora, comfyui_sdxl_key_map

    kohya = load_file(sdxl_lora_run / KOHYA_WEIGHTS)
    parts = load_parts(str(tiny_sdxl_model_dir))
    key_map, original = comfyui_sdxl_key_map(parts.unet, parts.text_encoder, parts.text_encoder_2)
    patches, not_loaded = comfyui_load_lora(kohya, key_map)
    assert not_loaded == []
    assert {t[0] for t in patches} == {"unet", "text_encoder", "text_encoder_2"}
    assert {k.split(".")[0] for k in kohya if k.startswith("lora_unet_")} <= original
    assert all(float(kohya[k]) == 8.0 for k in kohya if k.endswith(".alpha"))
    with safe_open(str(sdxl_lora_run / KOHYA_WEIGHTS), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


# ------------------------------------------------------------------ sample, shipped config


def test_sample_cli_draws_with_an_sdxl_model_and_its_lora(
    sdxl_lora_run, tiny_sdxl_model_dir, tmp_path
):
    from PIL import Image

    from personalize.cli import main

    def sample(out, *extra):
        args = ["sample", "--model", str(tiny_sdxl_model_dir), "--prompt", "a photo of sks disc"]
        args += ["--num-images", "1", "--steps", "2", "--resolution", "32", "--out", str(out)]
        assert main([*args, *extra]) == 0
        return np.asarray(Image.open(out / "prompt00_seed0.png"), dtype=np.float32)

    base = sample(tmp_path / "base")
    tuned = sample(tmp_path / "tuned", "--load", str(sdxl_lora_run))
    assert base.shape == (32, 32, 3)
    assert np.abs(tuned - base).mean() > 0.1


def test_prior_preservation_generates_class_images_with_sdxl(
    tiny_sdxl_model_dir, instance_dir, tmp_path
):
    """DreamBooth-LoRA on SDXL: class images come from the SDXL pipeline (adapters of the
    UNet and both text encoders off); a class row's time ids are its own uncropped size."""
    cfg = _sdxl_config(
        tiny_sdxl_model_dir,
        instance_dir,
        tmp_path / "run",
        train={"max_steps": 1},
        lora={"train_text_encoder": True},
        prior={
            "enabled": True,
            "class_prompt": "a disc",
            "num_class_images": 2,
            "generation_steps": 2,
            "class_data_dir": str(tmp_path / "class"),
        },
    )
    trainer = Trainer(from_dict(cfg))
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    batch = next(iter(trainer.dataloader))
    prior_rows = batch["time_ids"][batch["is_prior"]]
    assert prior_rows.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * len(prior_rows)
    trainer.run()
    assert (tmp_path / "run" / LORA_WEIGHTS).is_file()


def test_single_file_family_comes_from_diffusers_detection(tmp_path):
    """A single .safetensors is classified by diffusers' own single-file detection, from
    its header (the keys here are the ones diffusers looks for)."""
    from safetensors.torch import save_file

    from personalize.errors import ModelLoadError
    from personalize.models import SD1, SD2

    def checkpoint(name, tensors):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        return str(path)

    unet_key = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    xl = checkpoint(
        "xl",
        {
            "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2),
            unet_key: torch.zeros(2, 2048),
        },
    )
    assert detect_family(xl) == SDXL
    assert detect_family(checkpoint("sd2", {unet_key: torch.zeros(2, 1024)})) == SD2
    assert detect_family(checkpoint("sd1", {unet_key: torch.zeros(2, 768)})) == SD1
    refiner = checkpoint(
        "refiner",
        {"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2)},
    )
    with pytest.raises(ModelLoadError, match="refiner"):
        detect_family(refiner)


def test_time_ids_stay_exact_with_half_precision_encoders(
    tiny_sdxl_model_dir, instance_dir, tmp_path
):
    """bf16 holds integers exactly only up to 256: sizes go to the UNet in fp32."""
    trainer = Trainer(from_dict(_sdxl_config(tiny_sdxl_model_dir, instance_dir, tmp_path / "r")))
    for encoder in trainer.parts.text_encoders().values():
        encoder.to(torch.bfloat16)
    trainer.conditioning.text_cache = None
    ids = torch.tensor([[1365.0, 2047, 3, 5, 1024, 1024]])
    text = trainer.conditioning.text(["a photo of sks disc"], time_ids=ids)
    assert text.hidden_states.dtype == torch.bfloat16
    sent = text.unet_kwargs["added_cond_kwargs"]["time_ids"]
    assert sent.dtype == torch.float32 and torch.equal(sent, ids)


def test_model_vae_path_replaces_the_vae(tiny_sdxl_model_dir, instance_dir, tmp_path):
    """model.vae_path: e.g. an fp16-fixed SDXL VAE (force_upcast false), as a diffusers VAE
    folder; a path that does not exist is a one-line error."""
    from personalize.errors import ModelLoadError
    from personalize.testing import tiny_sdxl_vae

    fixed = tiny_sdxl_vae(seed=3)
    fixed.register_to_config(force_upcast=False)
    fixed.save_pretrained(tmp_path / "vae-fp16-fix")
    cfg = _sdxl_config(tiny_sdxl_model_dir, instance_dir, tmp_path / "r")
    cfg["model"]["vae_path"] = str(tmp_path / "vae-fp16-fix")
    trainer = Trainer(from_dict(cfg))
    assert trainer.parts.vae.config.force_upcast is False
    torch.testing.assert_close(
        trainer.parts.vae.encoder.conv_in.weight, fixed.encoder.conv_in.weight
    )
    with pytest.raises(ModelLoadError, match="vae_path"):
        load_parts(str(tiny_sdxl_model_dir), vae_path=str(tmp_path / "missing"))
