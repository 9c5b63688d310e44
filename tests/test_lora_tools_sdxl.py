"""LoRA tools on SDXL (issue 17): merge, resize and extract with both text encoders and
SDXL's kohya names; a LoRA of another model family is refused in one line; a hub id's
family is read from the hub cache.

LoRAs are made the way training makes them (methods/lora.py setup + save) with random
non-zero lora_B, alpha != rank."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open

from personalize import load
from personalize.config import from_dict
from personalize.errors import ArtifactError
from personalize.methods.lora import KOHYA_WEIGHTS, LORA_WEIGHTS, LoRA
from personalize.models import SD1, SD2, SDXL, detect_family, load_parts, load_pipeline
from personalize.tools.lora_extract import extract
from personalize.tools.lora_layers import read_lora
from personalize.tools.lora_merge import merge
from personalize.tools.lora_resize import resize_file

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        ["a photo of sks disc"],
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=3,
        height=32,
        width=32,
        output_type="np",
    ).images


def make_lora(model_dir, out):
    """A trained-like LoRA (UNet attention + a resnet conv, every text encoder) of the
    model in `model_dir`, saved as training saves it; -> the output folder."""
    cfg = from_dict(
        {
            "method": "lora",
            "output_dir": str(out.parent / "run"),
            "model": {"path": str(model_dir)},
            "data": {"path": str(out.parent), "prompt": "a photo of sks disc"},
            "lora": {
                "rank": 4,
                "alpha": 8,
                "train_text_encoder": True,
                "unet_target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1"],
            },
        }
    )
    parts = load_parts(str(model_dir))
    method = LoRA(cfg)
    method.setup(parts)
    g = torch.Generator().manual_seed(0)
    for module in parts.modules().values():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.1
    method.save(out, parts, 1)
    return out


@pytest.fixture(scope="module")
def xl_lora(tiny_sdxl_model_dir, tmp_path_factory):
    return make_lora(tiny_sdxl_model_dir, tmp_path_factory.mktemp("xl") / "lora")


@pytest.fixture(scope="module")
def xl_base_images(tiny_sdxl_model_dir):
    return _images(load_pipeline(str(tiny_sdxl_model_dir)))


def _keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{c}.{name}": m.weight.detach().clone()
        for c in COMPONENTS
        for name, m in getattr(pipe, c).named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    }


# ------------------------------------------------------------------------------ merge


def test_sdxl_merge_equals_the_pipeline_with_the_lora_loaded(
    xl_lora, tiny_sdxl_model_dir, xl_base_images, tmp_path
):
    out = merge(str(tiny_sdxl_model_dir), [(str(xl_lora), 1.0)], tmp_path / "merged")
    merged = StableDiffusionXLPipeline.from_pretrained(out)
    assert not any("lora" in k for k in merged.unet.state_dict())
    base, baked = _weights(load_pipeline(str(tiny_sdxl_model_dir))), _weights(merged)
    for component in COMPONENTS:  # the LoRA reached the UNet and both text encoders
        assert any(
            not torch.equal(baked[k], base[k]) for k in base if k.startswith(component + ".")
        ), component
    loaded = load_pipeline(str(tiny_sdxl_model_dir))
    load(loaded, xl_lora)
    expected = _images(loaded)
    assert np.abs(expected - xl_base_images).max() > 0.05  # the LoRA changes the images
    np.testing.assert_allclose(_images(merged), expected, atol=1e-4)
    # The kohya file (SDXL names, lora_te1_/lora_te2_) bakes in the same weights.
    kohya = _weights(
        load_pipeline(
            str(
                merge(
                    str(tiny_sdxl_model_dir), [(str(xl_lora / KOHYA_WEIGHTS), 1.0)], tmp_path / "k"
                )
            )
        )
    )
    for k in baked:
        torch.testing.assert_close(kohya[k], baked[k], atol=1e-5, rtol=0, msg=k)


# ------------------------------------------------------------------------------ resize


def _deltas(path) -> dict[str, torch.Tensor]:
    return {k: layer.delta() for k, layer in read_lora(path).layers.items()}


def test_sdxl_resize_keeps_sdxl_names_and_deltas(xl_lora, tmp_path):
    ours, summary = resize_file(xl_lora, tmp_path / "ours", rank=4)  # full rank: lossless
    assert summary.as_dict()["min_energy"] == pytest.approx(1.0)
    assert _keys(ours[0]) == _keys(xl_lora / LORA_WEIGHTS)  # text_encoder_2. kept
    assert {k.split(".")[0] for k in _keys(ours[0])} == set(COMPONENTS)
    # Its kohya copy has the names training wrote: original UNet names, lora_te1_/lora_te2_.
    assert _keys(ours[1]) == _keys(xl_lora / KOHYA_WEIGHTS)
    for resized, original in (
        (ours[0], xl_lora / LORA_WEIGHTS),
        (ours[1], xl_lora / KOHYA_WEIGHTS),
    ):
        want, got = _deltas(original), _deltas(resized)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
    with safe_open(str(ours[1]), framework="pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    kohya, _ = resize_file(xl_lora / KOHYA_WEIGHTS, tmp_path / "k.safetensors", rank=2)
    assert _keys(kohya[0]) == _keys(xl_lora / KOHYA_WEIGHTS)


def test_resized_sdxl_files_load_and_change_the_image(
    xl_lora, tiny_sdxl_model_dir, xl_base_images, tmp_path
):
    ours, _ = resize_file(xl_lora, tmp_path / "ours", rank=2)
    kohya, _ = resize_file(xl_lora / KOHYA_WEIGHTS, tmp_path / "k.safetensors", rank=2)
    for file in (*ours, kohya[0]):
        pipe = load(load_pipeline(str(tiny_sdxl_model_dir)), file)
        assert set(pipe.get_list_adapters()) == set(COMPONENTS), file
        assert np.abs(_images(pipe) - xl_base_images).max() > 0.05, file


# ------------------------------------------------------------------------------ extract


@pytest.fixture(scope="module")
def xl_tuned(tiny_sdxl_model_dir, tmp_path_factory):
    """An SDXL fine-tune: UNet attention and resnet convs, one layer of each text encoder."""
    pipe = load_pipeline(str(tiny_sdxl_model_dir))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for component, keep in (
            ("unet", ("attn", "resnets.0.conv")),
            ("text_encoder", ("layers.0.",)),
            ("text_encoder_2", ("layers.1.",)),
        ):
            for name, module in getattr(pipe, component).named_modules():
                if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and any(
                    s in name for s in keep
                ):
                    module.weight += torch.randn(module.weight.shape, generator=g) * 0.02
    out = tmp_path_factory.mktemp("xl_tuned") / "tuned"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def test_sdxl_extract_at_full_rank_reproduces_the_tuned_weights(
    tiny_sdxl_model_dir, xl_tuned, tmp_path
):
    written, summary = extract(str(tiny_sdxl_model_dir), str(xl_tuned), tmp_path / "x", rank=10_000)
    assert summary.as_dict()["min_energy"] == pytest.approx(1.0)
    assert {k.split(".")[0] for k in _keys(written[0])} == set(COMPONENTS)
    names = {k.split(".")[0] for k in _keys(written[1])}
    assert {n[:9] for n in names if n.startswith("lora_te")} == {"lora_te1_", "lora_te2_"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    with safe_open(str(written[1]), framework="pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    tuned = _weights(load_pipeline(str(xl_tuned)))
    for file in written:  # ours and the kohya copy, each merged into the base
        merged = _weights(
            load_pipeline(
                str(merge(str(tiny_sdxl_model_dir), [(str(file), 1.0)], tmp_path / file.stem))
            )
        )
        for k in tuned:
            torch.testing.assert_close(merged[k], tuned[k], atol=1e-5, rtol=0, msg=k)


def test_extract_refuses_a_base_of_another_family(tiny_model_dir, xl_tuned, tmp_path):
    from personalize.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="sdxl and .* is sd1"):
        extract(str(tiny_model_dir), str(xl_tuned), tmp_path / "x", rank=4)


# ------------------------------------------------------------------------------ wrong family


@pytest.fixture(scope="module")
def family_loras(tiny_model_dir, tiny_sd2_model_dir, xl_lora, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {
        SD1: make_lora(tiny_model_dir, root / "sd1" / "lora"),
        SD2: make_lora(tiny_sd2_model_dir, root / "sd2" / "lora"),
        SDXL: xl_lora,
    }


NAMES = {SD1: "SD 1.x", SD2: "SD 2.x", SDXL: "SDXL"}


@pytest.mark.parametrize("file", [LORA_WEIGHTS, KOHYA_WEIGHTS])
@pytest.mark.parametrize(
    "lora_family,model_family", [(SD1, SDXL), (SDXL, SD1), (SD2, SD1), (SD1, SD2), (SDXL, SD2)]
)
def test_a_lora_of_another_family_is_one_line_naming_both(
    family_loras,
    tiny_model_dir,
    tiny_sd2_model_dir,
    tiny_sdxl_model_dir,
    lora_family,
    model_family,
    file,
):
    model = {SD1: tiny_model_dir, SD2: tiny_sd2_model_dir, SDXL: tiny_sdxl_model_dir}[model_family]
    pipe = load_pipeline(str(model))
    with pytest.raises(ArtifactError) as info:
        load(pipe, family_loras[lora_family] / file)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message  # not peft's dump
    theirs = NAMES[lora_family]
    if model_family == SDXL and file == LORA_WEIGHTS:
        # Told from SDXL by its names, SD 1.x from 2.x only by a real model's width.
        theirs = "SD 1.x/2.x"
    assert f"is an {theirs} LoRA and this pipeline is {NAMES[model_family]}" in message
    assert not pipe.get_list_adapters()  # nothing half-loaded


def test_a_lora_of_the_same_family_still_loads(family_loras, tiny_sd2_model_dir):
    for file in (LORA_WEIGHTS, KOHYA_WEIGHTS):
        pipe = load(load_pipeline(str(tiny_sd2_model_dir)), family_loras[SD2] / file)
        assert pipe.get_list_adapters()


def test_lora_family_reads_names_metadata_and_real_widths():
    from personalize.adapters.lora_family import _other_family, lora_family

    assert lora_family(["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"]) == SDXL
    assert (
        lora_family(
            ["unet.down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_q.lora_A.weight"]
        )
        == SDXL
    )
    assert (
        lora_family(
            ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
        )
        is None
    )
    assert lora_family([], {"ss_base_model_version": "sd_v2"}) == SD2

    class Pipe:  # an SDXL pipeline of the real width
        class unet:  # noqa: N801
            class config:  # noqa: N801
                cross_attention_dim = 2048

    assert _other_family(None, SDXL, 768, Pipe) == "an SD 1.x"
    assert _other_family(None, SDXL, 1024, Pipe) == "an SD 2.x"
    assert _other_family(None, SDXL, 2048, Pipe) is None
    Pipe.unet.config.cross_attention_dim = 32  # a small test SD 1.x model: 768 is SD 1.x too
    assert _other_family(None, SD1, 768, Pipe) is None  # peft's own error says which layer
    assert _other_family(SD2, SD1, 768, Pipe) is None  # the width decides over a label


# ------------------------------------------------------------------------------ hub ids


def _hub_cache(root, repo, index, unet=None):
    """`root` laid out like the hub cache: models--org--name/{refs/main,snapshots/<hash>/}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    (snapshot / "model_index.json").write_text(json.dumps(index))
    if unet is not None:
        (snapshot / "unet").mkdir()
        (snapshot / "unet" / "config.json").write_text(json.dumps(unet))


def test_hub_id_family_comes_from_the_cached_model_index(tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network, whatever happens
    _hub_cache(tmp_path, "org/plain-name", {"_class_name": "StableDiffusionXLPipeline"})
    _hub_cache(
        tmp_path,
        "org/fancy-xl-lookalike",
        {"_class_name": "StableDiffusionPipeline"},
        {"cross_attention_dim": 1024},
    )
    _hub_cache(
        tmp_path,
        "org/v1-model",
        {"_class_name": "StableDiffusionPipeline"},
        {"cross_attention_dim": 768},
    )
    assert detect_family("org/plain-name") == SDXL  # no "xl" in the name
    assert detect_family("org/fancy-xl-lookalike") == SD2  # "xl" in the name, SD 2.x inside
    assert detect_family("org/v1-model") == SD1
    with caplog.at_level(logging.INFO, logger="personalize.models"):
        assert detect_family("org/uncached-xl") == SDXL
        assert detect_family("org/uncached") == SD1
    assert "org/uncached-xl guessed from its name: sdxl" in caplog.text
    assert "org/uncached guessed from its name: sd1" in caplog.text
