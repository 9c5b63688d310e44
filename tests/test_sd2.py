"""SD 2.x on the same footing as SD 1.x: a tiny SD2-shaped model (v-prediction, an
OpenCLIP-style text encoder of its own width, linear proj_in, per-block head dims) trains
with every method, and each artifact loads into a freshly loaded stock pipeline and changes
its images; the UI files follow the clients' SD 2.x rules (tests/client_rules.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from client_rules import (
    comfyui_delta,
    comfyui_hypernetwork,
    comfyui_key_map,
    comfyui_load_lora,
    webui_layer_mapping,
    webui_load_network,
    webui_safe_check,
    webui_sd2_attention_applied,
)
from conftest import base_config
from diffusers import StableDiffusionPipeline
from helpers import ROOT
from safetensors import safe_open
from safetensors.torch import load_file

from personalize import load, train
from personalize.adapters.sd_single_file import convert_open_clip_text_encoder
from personalize.cli import main
from personalize.config import from_dict
from personalize.inference import generate
from personalize.methods.lora import KOHYA_WEIGHTS, LORA_WEIGHTS
from personalize.models import load_parts, model_family
from personalize.testing import TINY_SD2_TEXT_WIDTH, TINY_TEXT_WIDTH
from personalize.training import loop as loop_module

PROMPT = "a photo of sks disc"
TI_TOKEN = "<sks-disc>"
# The tiny SD2 UNet's attention context widths: text 48, self-attention 32 (its only
# attention level). 64 has no attention layer (DownBlock2D).
SD2_HN_SIZES = [TINY_SD2_TEXT_WIDTH, 32]
TE_ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

# method -> (config sections, prompt that shows the artifact)
METHODS = {
    "lora": (
        {"lora": {"rank": 4, "alpha": 8.0, "train_text_encoder": True,
                  "text_encoder_target_modules": TE_ALL}},
        PROMPT,
    ),
    "dreambooth": ({"dreambooth": {"save_single_file": True}}, PROMPT),
    "textual_inversion": (
        {"textual_inversion": {"placeholder_token": TI_TOKEN, "initializer_token": "o"}},
        f"a photo of {TI_TOKEN}",
    ),
    "hypernetwork": ({"hypernetwork": {"enable_sizes": SD2_HN_SIZES, "name": "hn2"}}, PROMPT),
}  # fmt: skip


def _fresh(model_dir) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, prompt) -> np.ndarray:
    return np.stack(
        [
            np.asarray(im, dtype=np.float32)
            for im in generate(pipe, [prompt], [0], num_inference_steps=3)[0]
        ]
    )


@pytest.fixture(scope="module")
def sd2_runs(tiny_sd2_model_dir, instance_dir, tmp_path_factory):
    """Each method trained 3 steps on the tiny SD2; -> {method: (output_dir, parts)}."""
    runs = {}
    for method, (sections, _) in METHODS.items():
        out = tmp_path_factory.mktemp("sd2") / method
        cfg = from_dict(
            base_config(
                tiny_sd2_model_dir,
                instance_dir,
                out,
                method=method,
                train={"max_steps": 3, "lr": 1e-2 if method == "hypernetwork" else 1e-3},
                **sections,
            )
        )
        parts = load_parts(str(tiny_sd2_model_dir))
        train(cfg, parts=parts)
        runs[method] = (out, parts)
    return runs


# ------------------------------------------------------------------ what is detected


def test_tiny_sd2_is_detected_as_sd2_and_keeps_its_sd2_traits(tiny_sd2_model_dir, tiny_model_dir):
    parts = load_parts(str(tiny_sd2_model_dir))
    assert parts.family == "sd2" and load_parts(str(tiny_model_dir)).family == "sd1"
    assert parts.noise_scheduler.config.prediction_type == "v_prediction"
    assert parts.unet.config.use_linear_projection and parts.unet.config.upcast_attention
    assert parts.tokenizer.pad_token == "!" and parts.tokenizer.pad_token_id == 0
    assert parts.text_encoder.config.hidden_size == TINY_SD2_TEXT_WIDTH != TINY_TEXT_WIDTH
    # The rule, on configs alone: a 1024-wide context is SD2 whatever the encoder says,
    # SDXL is the text_time UNet.
    unet = type("U", (), {"config": type("C", (), {"cross_attention_dim": 1024})()})()
    assert model_family(unet) == "sd2"
    unet.config.cross_attention_dim, unet.config.addition_embed_type = 2048, "text_time"
    assert model_family(unet) == "sdxl"


# ------------------------------------------------------------------ v-prediction


def test_v_prediction_is_the_training_target(
    tiny_sd2_model_dir, instance_dir, tmp_path, monkeypatch
):
    """The loop's loss target is the velocity from the model's own scheduler config."""
    seen = []

    def spy(sched, latents, noise, timesteps):
        target = real(sched, latents, noise, timesteps)
        seen.append(
            (
                sched.config.prediction_type,
                target,
                sched.get_velocity(latents, noise, timesteps),
                noise,
            )
        )
        return target

    real = loop_module.training_target
    monkeypatch.setattr(loop_module, "training_target", spy)
    cfg = from_dict(
        base_config(tiny_sd2_model_dir, instance_dir, tmp_path / "run", train={"max_steps": 1})
    )
    train(cfg)
    kind, target, velocity, noise = seen[0]
    assert kind == "v_prediction"
    torch.testing.assert_close(target, velocity)
    assert not torch.allclose(target, noise)
    # model.prediction_type overrides (an SD 2.x-base fine-tune trained as epsilon)
    assert (
        load_parts(
            str(tiny_sd2_model_dir), prediction_type="epsilon"
        ).noise_scheduler.config.prediction_type
        == "epsilon"
    )


# ------------------------------------------------------------------ each method, stock loading


@pytest.mark.parametrize("method", sorted(METHODS))
def test_artifact_loads_into_a_fresh_stock_sd2_pipeline_and_changes_it(
    sd2_runs, tiny_sd2_model_dir, method
):
    out, _ = sd2_runs[method]
    prompt = METHODS[method][1]
    base = _images(_fresh(tiny_sd2_model_dir), prompt)
    if method == "lora":
        pipe = _fresh(tiny_sd2_model_dir)
        pipe.load_lora_weights(out, weight_name=LORA_WEIGHTS)
    elif method == "dreambooth":
        pipe = _fresh(out)
    elif method == "textual_inversion":
        pipe = load(_fresh(tiny_sd2_model_dir), out)
    else:
        pipe = load(_fresh(tiny_sd2_model_dir), out / "hn2.pt")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    after = _images(pipe, prompt)
    assert after.shape == base.shape == (1, 32, 32, 3)  # the model's own size, unasked
    assert np.abs(after - base).mean() > 1.0, method  # of 255; measured 6-24


def test_sd2_embedding_has_the_sd2_width_and_is_refused_by_sd1(sd2_runs, tiny_model_dir):
    out, _ = sd2_runs["textual_inversion"]
    data = load_file(out / "learned_embeds.safetensors")
    assert {t.shape[-1] for t in data.values()} == {TINY_SD2_TEXT_WIDTH}
    with pytest.raises(Exception, match="width"):
        load(_fresh(tiny_model_dir), out)


def test_sd2_hypernetwork_file_is_keyed_by_sd2_widths(sd2_runs, tiny_model_dir):
    """The webui keys hypernetwork layers by context width: SD2's text width (here 48, on
    SD 2.x 1024) must be a key, and ComfyUI builds a pair for each."""
    out, _ = sd2_runs["hypernetwork"]
    webui_safe_check(out / "hn2.pt")
    raw = torch.load(out / "hn2.pt", weights_only=True)
    assert sorted(k for k in raw if isinstance(k, int)) == sorted(SD2_HN_SIZES)
    assert sorted(comfyui_hypernetwork(raw)) == sorted(SD2_HN_SIZES)


def test_sd2_default_hypernetwork_sizes_take_the_models_text_width(
    tiny_sd2_model_dir, tiny_model_dir, instance_dir, tmp_path
):
    """enable_sizes left at SD1's default [768, 320, 640, 1280]: on SD 2.x the text width
    768 becomes the model's (1024); the other sizes still must exist."""
    from personalize.methods.hypernetwork import sizes_for_model

    parts = load_parts(str(tiny_sd2_model_dir))
    assert sizes_for_model([768, 320, 640, 1280], parts) == [TINY_SD2_TEXT_WIDTH, 320, 640, 1280]
    assert sizes_for_model([48, 32], parts) == [48, 32]
    sd1 = load_parts(str(tiny_model_dir))
    assert sizes_for_model([768, 32], sd1) == [
        768,
        32,
    ]  # SD1 keeps it (and setup says 768 is missing)
    cfg = from_dict(
        base_config(
            tiny_sd2_model_dir,
            instance_dir,
            tmp_path / "run",
            method="hypernetwork",
            train={"max_steps": 1},
            hypernetwork={"enable_sizes": [768, 32], "name": "d"},
        )
    )
    train(cfg)
    raw = torch.load(tmp_path / "run" / "d.pt", weights_only=True)
    assert sorted(k for k in raw if isinstance(k, int)) == [32, TINY_SD2_TEXT_WIDTH]


# ------------------------------------------------------------------ LoRA client rules on SD2


def test_sd2_kohya_file_loads_fully_in_comfyui_and_diffusers(sd2_runs, tiny_sd2_model_dir):
    """ComfyUI maps SD 2.x's clip_h with the same `lora_te_text_model_encoder_layers_*` names
    as SD1's clip_l and applies every module at the trained strength; diffusers converts the
    file itself to the trained text encoder; the metadata says SD 2.x and v-prediction."""
    out, parts = sd2_runs["lora"]
    kohya = load_file(out / KOHYA_WEIGHTS)
    assert any(k.startswith("lora_te_text_model_encoder_layers_1_self_attn_q_proj") for k in kohya)
    with safe_open(str(out / KOHYA_WEIGHTS), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_v2"] == "True"
    assert meta["ss_v_parameterization"] == "True"

    patches, not_loaded = comfyui_load_lora(kohya, comfyui_key_map(parts.unet, parts.text_encoder))
    assert not_loaded == []
    deltas = {}
    for component, module in (("unet", parts.unet), ("text_encoder", parts.text_encoder)):
        for name, m in module.named_modules():
            if hasattr(m, "lora_A") and "default" in m.lora_A:
                deltas[(component, name)] = m.get_delta_weight("default")
    assert set(patches) == set(deltas)
    for target, (up, down, alpha) in patches.items():
        want = deltas[target]
        torch.testing.assert_close(comfyui_delta(up, down, alpha, want.shape), want)

    pipe = _fresh(tiny_sd2_model_dir)
    pipe.load_lora_weights(out, weight_name=KOHYA_WEIGHTS)
    ids = parts.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        want = parts.text_encoder(ids.input_ids)[0]
        torch.testing.assert_close(pipe.text_encoder(ids.input_ids)[0], want)


def sd21_unet(cross_attention_dim: int = 16):
    """SD 2.1's UNet block structure (4 down blocks, attention in the first 3, 2 layers per
    block, linear proj_in/out) at tiny widths: the webui's names assume this structure."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(1, 2, 4, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=4,
    )


def open_clip_h_text_encoder():
    """OpenCLIP-H as diffusers ships it (gelu; 23 layers there, 4 here) at a tiny width."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        max_position_embeddings=16,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def _peft_lora(model, targets):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=2, lora_alpha=4.0, target_modules=targets, init_lora_weights=False)
    inject_adapter_in_model(config, model)
    return get_peft_model_state_dict(model)


@pytest.mark.parametrize(
    ("te_targets", "applied"),
    [(TE_ALL, True), (["q_proj", "v_proj", "fc1"], False)],
    ids=["qkvo", "qv"],
)
def test_sd2_kohya_names_under_the_webuis_sd2_rules(te_targets, applied):
    """The webui renames SD 2.x's `lora_te_*` to OpenCLIP's resblocks (mlp_c_fc, attn_*) and
    applies a layer's attention LoRA to the fused MultiheadAttention only when q, k, v and out
    are all in the file; every key of ours is matched either way, and our check agrees."""
    from personalize.adapters.kohya import peft_to_kohya, sd2_webui_skipped_layers
    from personalize.adapters.sd_single_file import convert_text_encoder, convert_unet

    unet, te = sd21_unet(), open_clip_h_text_encoder()
    original = convert_unet(dict(unet.state_dict()), unet.config)
    original.update(convert_text_encoder(dict(te.state_dict()), te.config))
    unet_layers = _peft_lora(unet, ["to_q", "to_k", "proj_in"])
    kohya = peft_to_kohya(unet_layers, _peft_lora(te, te_targets), 4.0)
    matched, failed = webui_load_network(kohya, webui_layer_mapping(original), is_sd2=True)
    assert failed == []
    assert "model_transformer_resblocks_3_mlp_c_fc" in matched
    assert "diffusion_model_input_blocks_1_1_proj_in" in matched  # a Linear on SD 2.x
    attention = webui_sd2_attention_applied(matched)
    assert len(attention) == 4 and all(v == applied for v in attention.values())
    assert (sd2_webui_skipped_layers(kohya) == []) == applied


def test_sd2_text_encoder_lora_without_all_attention_parts_is_flagged_for_the_webui(
    tiny_sd2_model_dir, instance_dir, tmp_path, caplog
):
    lora = {"train_text_encoder": True, "text_encoder_target_modules": ["q_proj", "v_proj"]}
    out = tmp_path / "run"
    cfg = base_config(tiny_sd2_model_dir, instance_dir, out, train={"max_steps": 1}, lora=lora)
    train(from_dict(cfg))
    assert (out / KOHYA_WEIGHTS).is_file()
    assert any(
        "webui applies text-encoder attention LoRA only where" in r.getMessage()
        for r in caplog.records
    )


# ------------------------------------------------------------------ DreamBooth single file


def test_sd2_single_file_is_openclip_layout_and_round_trips_through_diffusers(
    sd2_runs, tiny_sd2_model_dir
):
    out, _ = sd2_runs["dreambooth"]
    single = out / f"{out.name}.safetensors"
    with safe_open(str(single), framework="pt") as f:
        keys = set(f.keys())
    assert "cond_stage_model.model.token_embedding.weight" in keys
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "cond_stage_model.model.ln_final.weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    # The tiny width is not SD 2.x's 1024, so diffusers cannot guess the model from the
    # keys; config= gives it the folder (offline, as a real SD 2.x needs its hub config).
    pipe = StableDiffusionPipeline.from_single_file(
        str(single), config=str(tiny_sd2_model_dir), safety_checker=None, local_files_only=True
    )
    saved = _fresh(out)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(saved, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_sd2_single_file_is_recognised_as_sd2_by_diffusers_at_the_real_width():
    """With SD 2.x's 1024-wide context (tiny channels otherwise), diffusers' own detection
    reads our single-file layout as "v2" with an OpenCLIP text encoder: the keys it looks for
    are where SD 2.x checkpoints have them."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, is_open_clip_model

    from personalize.adapters.sd_single_file import convert_text_encoder, convert_unet

    unet, te = sd21_unet(cross_attention_dim=1024), open_clip_h_text_encoder()
    checkpoint = convert_unet(dict(unet.state_dict()), unet.config)
    checkpoint.update(convert_text_encoder(dict(te.state_dict()), te.config))
    assert infer_diffusers_model_type(checkpoint) == "v2"
    assert is_open_clip_model(checkpoint)


def test_openclip_layout_fuses_qkv_in_order():
    from personalize.testing import tiny_sd2_text_encoder

    te = tiny_sd2_text_encoder(vocab_size=64)
    sd = te.state_dict()
    out = convert_open_clip_text_encoder(sd)
    layer = "cond_stage_model.model.transformer.resblocks.0."
    prefix = next(k for k in sd if k.endswith("layers.0.self_attn.q_proj.weight"))[
        : -len("q_proj.weight")
    ]
    want = torch.cat([sd[prefix + f"{x}_proj.weight"] for x in "qkv"])
    torch.testing.assert_close(out[layer + "attn.in_proj_weight"], want)
    assert out[layer + "attn.in_proj_bias"].shape == (3 * TINY_SD2_TEXT_WIDTH,)
    assert out["cond_stage_model.model.positional_embedding"].shape == (77, TINY_SD2_TEXT_WIDTH)
    assert {k.split(".")[-2] for k in out if ".mlp." in k} == {"c_fc", "c_proj"}


# ------------------------------------------------------------------ sample, config


def test_sample_cli_on_sd2_uses_the_models_size_and_v_prediction(
    sd2_runs, tiny_sd2_model_dir, tmp_path
):
    out, _ = sd2_runs["lora"]
    args = [
        "sample",
        "--model",
        str(tiny_sd2_model_dir),
        "--prompt",
        PROMPT,
        "--num-images",
        "1",
        "--steps",
        "3",
    ]
    assert main([*args, "--out", str(tmp_path / "base")]) == 0
    assert main([*args, "--load", str(out), "--out", str(tmp_path / "lora")]) == 0
    from PIL import Image

    base = np.asarray(Image.open(tmp_path / "base" / "prompt00_seed0.png"), dtype=np.float32)
    tuned = np.asarray(Image.open(tmp_path / "lora" / "prompt00_seed0.png"), dtype=np.float32)
    assert base.shape == (32, 32, 3) and np.abs(base - tuned).mean() > 1.0


def test_shipped_sd2_config_trains_on_the_tiny_sd2(
    tiny_sd2_model_dir, instance_dir, tmp_path, capsys
):
    config = ROOT / "configs" / "sd2_lora.yaml"
    from personalize.config import load_config

    shipped = load_config(config)
    assert shipped.train.resolution == 768 and "stable-diffusion-2" in shipped.model.path
    code = main(
        [
            "train",
            str(config),
            f"model.path={tiny_sd2_model_dir}",
            f"data.path={instance_dir}",
            f"output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "train.resolution=32",
            f"prior.class_data_dir={tmp_path / 'class_images'}",
            "prior.num_class_images=2",
            "prior.generation_steps=2",
        ]
    )
    assert code == 0, capsys.readouterr().err[-2000:]
    with safe_open(str(tmp_path / "run" / KOHYA_WEIGHTS), framework="pt") as f:
        assert f.metadata()["ss_v2"] == "True"


def test_evaluate_on_sd2_at_the_models_size_keeps_v_prediction(
    sd2_runs, tiny_sd2_model_dir, tmp_path, monkeypatch
):
    """Every SD2 artifact is an evaluation column; images come at the model's own size
    (generation.resolution unset) and the named sampler keeps the model's v-prediction."""
    from PIL import Image

    from personalize.evaluation import evaluate, evaluation_from_dict, runner

    kinds = []
    real = runner.make_scheduler

    def spy(pipe, name):
        scheduler = real(pipe, name)
        kinds.append(scheduler.config.prediction_type)
        return scheduler

    monkeypatch.setattr(runner, "make_scheduler", spy)
    artifacts = [
        {"path": str(sd2_runs["lora"][0]), "label": "lora"},
        {"path": str(sd2_runs["dreambooth"][0]), "label": "dreambooth"},
        {"path": str(sd2_runs["hypernetwork"][0] / "hn2.pt"), "label": "hn"},
    ]
    cfg = {
        "model": str(tiny_sd2_model_dir),
        "output_dir": str(tmp_path / "eval"),
        "artifacts": artifacts,
        "prompts": {"count": 1, "class_name": "disc", "class_prompts": []},
        "generation": {"seeds": [0], "num_inference_steps": 2, "scheduler": "DDIM"},
    }
    evaluate(evaluation_from_dict(cfg))
    assert kinds and set(kinds) == {"v_prediction"}
    images = tmp_path / "eval" / "images"
    first = {c: sorted((images / c).rglob("*.png"))[0] for c in ("base", "lora", "hn")}
    sizes = {Image.open(p).size for p in first.values()}
    assert sizes == {(32, 32)}
    base = np.asarray(Image.open(first["base"]), dtype=np.float32)
    for column in ("lora", "hn"):
        assert np.abs(np.asarray(Image.open(first[column]), dtype=np.float32) - base).mean() > 1.0


def test_merged_sd2_lora_single_file_round_trips(sd2_runs, tiny_sd2_model_dir, tmp_path):
    """`personalize merge --single-file` on SD 2.x: the trained text encoder too comes back
    from the OpenCLIP layout exactly."""
    from personalize.tools.lora_merge import merge

    lora_out, _ = sd2_runs["lora"]
    merged = merge(str(tiny_sd2_model_dir), [(str(lora_out), 1.0)], tmp_path / "m", True)
    single = StableDiffusionPipeline.from_single_file(
        str(merged / "m.safetensors"),
        config=str(tiny_sd2_model_dir),
        safety_checker=None,
        local_files_only=True,
    )
    folder = _fresh(merged)
    base_te = _fresh(tiny_sd2_model_dir).text_encoder.state_dict()
    te = folder.text_encoder.state_dict()
    assert any(not torch.equal(te[k], base_te[k]) for k in te)  # the LoRA reached it
    for name in ("unet", "text_encoder"):
        a, b = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("artifact", ["lora", "lora_kohya", "textual_inversion", "hypernetwork"])
def test_sample_cli_loads_each_sd2_artifact_kind_and_changes_the_image(
    sd2_runs, tiny_sd2_model_dir, tmp_path, artifact
):
    """`personalize sample --load` (personalize.load into a freshly loaded stock pipeline)
    for each artifact kind of SD 2.x, with each kind's own file."""
    from PIL import Image

    method = "lora" if artifact.startswith("lora") else artifact
    out, _ = sd2_runs[method]
    path = {"lora": out, "lora_kohya": out / KOHYA_WEIGHTS, "hypernetwork": out / "hn2.pt"}
    prompt = METHODS[method][1]
    args = ["sample", "--model", str(tiny_sd2_model_dir), "--prompt", prompt]
    args += ["--num-images", "1", "--steps", "3"]

    def image(folder, *extra):
        assert main([*args, *extra, "--out", str(tmp_path / folder)]) == 0
        return np.asarray(Image.open(tmp_path / folder / "prompt00_seed0.png"), dtype=np.float32)

    base = image("base")
    tuned = image("tuned", "--load", str(path.get(artifact, out)))
    assert base.shape == tuned.shape == (32, 32, 3)
    assert np.abs(tuned - base).mean() > 1.0, artifact  # of 255
