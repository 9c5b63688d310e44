"""Every artifact a user takes to ComfyUI, the AUTOMATIC1111 webui or kohya's sd-scripts,
checked with those tools' own loading rules (tests/client_rules.py, restated from their
code): names, key suffixes, alpha (the strength), the webui's safe-unpickle check, the
embedding layouts and the hypernetwork layout. docs/formats.md has the resulting table."""

from __future__ import annotations

import logging
import os
import stat

import pytest
import torch
from client_rules import (
    WebuiRefused,
    comfyui_delta,
    comfyui_embedding,
    comfyui_hypernetwork,
    comfyui_key_map,
    comfyui_load_lora,
    comfyui_load_lycoris,
    comfyui_lycoris_delta,
    comfyui_sdxl_embedding,
    kohya_embedding,
    kohya_module_shapes,
    kohya_sdxl_embedding,
    lycoris_delta,
    webui_embedding,
    webui_layer_mapping,
    webui_load_network,
    webui_lycoris_delta,
    webui_safe_check,
    webui_sdxl_embedding,
)
from conftest import base_config
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from personalize import train
from personalize.adapters import embeddings as E
from personalize.adapters import hypernetwork as H
from personalize.adapters.clients import comfyui_hypernetwork_problems
from personalize.adapters.kohya import KohyaExportError, peft_lycoris_to_kohya, peft_to_kohya
from personalize.adapters.sd_single_file import convert_text_encoder, convert_unet
from personalize.config import from_dict
from personalize.errors import ConfigError
from personalize.io import atomic_write, default_file_mode
from personalize.methods.lora import KOHYA_WEIGHTS, LORA_WEIGHTS
from personalize.models import load_parts

# Every Linear/Conv2d kind kohya's LoCon covers in an SD UNet: attention, ff, resnets, samplers.
UNET_ALL_TARGETS = [
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
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
]
TE_ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def sd15_unet():
    """SD 1.5's UNet block structure (4 down blocks, attention in the first 3, 2 layers per
    block, channel pattern 1:2:4:4) at tiny widths: module names depend only on these."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )


def clip_l_text_encoder():
    """CLIP ViT-L's layer count (12) at a tiny width."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=12,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def _with_lora(model, targets, rank=2, alpha=6.0):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False),
        model,
    )
    return get_peft_model_state_dict(model)


def _peft_deltas(model) -> dict[str, torch.Tensor]:
    """What peft adds to each adapted weight: scaling * B @ A."""
    return {
        name: module.get_delta_weight("default")
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }


def _modules_of(kohya: dict) -> set[str]:
    return {k.split(".", 1)[0] for k in kohya}


# ------------------------------------------------------------------ kohya names


def test_sd15_unet_names_are_kohyas_278_locon_modules():
    unet = sd15_unet()
    expected = kohya_module_shapes(unet, "lora_unet")
    assert len(expected) == 278  # 16 transformers x 12 + 22 resnets' 80 + 3 down + 3 up
    kohya = peft_to_kohya(_with_lora(unet, UNET_ALL_TARGETS), None, alpha=6.0)
    assert _modules_of(kohya) == set(expected)
    for name, shape in expected.items():  # kohya's LoRAModule shapes (conv: kxk down, 1x1 up)
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        assert down.shape[1:] == (shape[1], *shape[2:]) and down.shape[0] == 2
        assert up.shape == (shape[0], 2, *([1, 1] if len(shape) == 4 else []))
        assert float(kohya[f"{name}.alpha"]) == 6.0


def test_clip_l_text_encoder_names_are_fixed_whatever_transformers_calls_them():
    te = clip_l_text_encoder()
    expected = kohya_module_shapes(te, "lora_te", te=True)
    assert len(expected) == 12 * 6
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in expected
    kohya = peft_to_kohya({}, _with_lora(te, TE_ALL_TARGETS), alpha=6.0)
    assert _modules_of(kohya) == set(expected)
    # transformers 4 paths (with text_model.) give the same names
    sd = {
        "text_model.encoder.layers.3.self_attn.q_proj.lora_A.weight": torch.zeros(2, 16),
        "text_model.encoder.layers.3.self_attn.q_proj.lora_B.weight": torch.zeros(16, 2),
    }
    assert _modules_of(peft_to_kohya({}, sd, 2.0)) == {
        "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
    }


ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.mark.parametrize(
    ("unet_targets", "te_targets", "modules"),
    [
        (ATTENTION, None, 128),
        (ATTENTION, TE_ALL_TARGETS, 128 + 72),
        (UNET_ALL_TARGETS, TE_ALL_TARGETS, 278 + 72),
    ],
    ids=["attention", "attention+te", "all+te"],
)
def test_sd15_lora_loads_exactly_under_each_clients_rules(unet_targets, te_targets, modules):
    """SD 1.5 UNet + CLIP-L, alpha 6 != rank 2: every key is taken by ComfyUI, the webui
    and sd-scripts, and each applies alpha / rank as peft does."""
    unet, te = sd15_unet(), clip_l_text_encoder()
    base_unet = {k: v.clone() for k, v in unet.state_dict().items()}
    base_te = {k: v.clone() for k, v in te.state_dict().items()}
    te_layers = _with_lora(te, te_targets) if te_targets else None
    kohya = peft_to_kohya(_with_lora(unet, unet_targets), te_layers, 6.0)
    assert len(kohya) == modules * 3
    deltas = {("unet", n): d for n, d in _peft_deltas(unet).items()}
    deltas.update({("text_encoder", n): d for n, d in _peft_deltas(te).items()})

    # ComfyUI: every key loaded, every module patched with (alpha / rank) * up @ down.
    patches, not_loaded = comfyui_load_lora(kohya, comfyui_key_map(unet, te))
    assert not_loaded == [] and len(patches) == modules
    for target, (up, down, alpha) in patches.items():
        want = deltas[target]
        torch.testing.assert_close(comfyui_delta(up, down, alpha, want.shape), want)

    # webui: every key matched to a module of the original-layout model, shapes fit.
    original = convert_unet(base_unet, unet.config)
    original.update(convert_text_encoder(base_te, te.config))
    mapping = webui_layer_mapping(original)
    matched, failed = webui_load_network(kohya, mapping)
    assert failed == [] and len(matched) == modules
    for name, parts in matched.items():
        assert set(parts) == {"lora_up.weight", "lora_down.weight", "alpha"}
        shape = mapping[name]
        assert parts["lora_up.weight"].shape[0] == shape[0]
        assert parts["lora_down.weight"].shape[1:] == shape[1:]
        # calc_scale: alpha / dim, dim = lora_down.shape[0]
        assert parts["alpha"].item() / parts["lora_down.weight"].shape[0] == 3.0

    # sd-scripts: create_network_from_weights makes exactly these modules; load_weights
    # (strict=False) leaves no unexpected key.
    modules = kohya_module_shapes(sd15_unet(), "lora_unet")
    modules.update(kohya_module_shapes(clip_l_text_encoder(), "lora_te", te=True))
    assert _modules_of(kohya) <= set(modules)
    unexpected = [
        k
        for k in kohya
        if k.split(".", 1)[1] not in ("lora_down.weight", "lora_up.weight", "alpha")
    ]
    assert unexpected == []


# ------------------------------------------------------------------ LoHa / LoKr

# (peft config, what the file must hold): each branch of the clients' scale rules.
LYCORIS_CASES = {
    "loha": ("loha", {}, "hada_w1_a"),
    "loha_tucker": ("loha", {"use_effective_conv2d": True}, "hada_t1"),
    # r 2 vs SD's widths: w2 low-rank (lokr_w2_a/b), scale alpha / r in every client
    "lokr_lowrank_w2": ("lokr", {"decompose_factor": 4}, "lokr_w2_a"),
    "lokr_both": ("lokr", {"r": 1, "decompose_factor": 4, "decompose_both": True}, "lokr_w1_a"),
    # r 64 >= the factors: two full matrices, scale 1 in the clients, peft's alpha/r baked
    "lokr_full": ("lokr", {"r": 64}, "lokr_w2"),
}


def _with_lycoris(model, targets, kind, options, alpha=6.0):
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    options = dict(options)
    r = options.pop("r", 2)
    cls = LoHaConfig if kind == "loha" else LoKrConfig
    # init_weights=False: random factors, so every delta is non-zero
    config = cls(r=r, alpha=alpha, target_modules=targets, init_weights=False, **options)
    inject_adapter_in_model(config, model)
    return get_peft_model_state_dict(model), r


def _lycoris_deltas(model, strength=1.0) -> dict[str, torch.Tensor]:
    from peft.tuners.lycoris_utils import LycorisLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LycorisLayer) and "default" in module._available_adapters:
            module.set_scale("default", strength)
            out[name] = module.get_delta_weight("default")
    return out


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_sd15_loha_lokr_load_exactly_under_each_clients_rules(case):
    """SD 1.5 UNet (every LoCon layer) + CLIP-L, alpha 6: every key is taken by ComfyUI,
    the webui and LyCORIS, and each one's delta (its own math, tests/client_rules.py) is
    peft's, at strength 1 and 0.5."""
    kind, options, must_hold = LYCORIS_CASES[case]
    unet, te = sd15_unet(), clip_l_text_encoder()
    base_unet = {k: v.clone() for k, v in unet.state_dict().items()}
    base_te = {k: v.clone() for k, v in te.state_dict().items()}
    unet_layers, r = _with_lycoris(unet, UNET_ALL_TARGETS, kind, options)
    te_layers, _ = _with_lycoris(te, TE_ALL_TARGETS, kind, options)
    kohya = peft_lycoris_to_kohya(unet_layers, te_layers, r, 6.0)
    assert any(k.endswith("." + must_hold) for k in kohya)
    assert _modules_of(kohya) == set(kohya_module_shapes(sd15_unet(), "lora_unet")) | set(
        kohya_module_shapes(clip_l_text_encoder(), "lora_te", te=True)
    )
    original = convert_unet(base_unet, unet.config)
    original.update(convert_text_encoder(base_te, te.config))
    mapping = webui_layer_mapping(original)
    for strength in (1.0, 0.5):
        deltas = {("unet", n): d for n, d in _lycoris_deltas(unet, strength).items()}
        deltas.update({("text_encoder", n): d for n, d in _lycoris_deltas(te, strength).items()})
        assert len(deltas) == 278 + 72

        # ComfyUI: every key loaded, the delta of each module is peft's.
        patches, not_loaded = comfyui_load_lycoris(kohya, comfyui_key_map(unet, te))
        assert not_loaded == [] and set(patches) == set(deltas)
        for target, parts in patches.items():
            want = deltas[target]
            got = comfyui_lycoris_delta(parts, want.shape, strength)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            # LyCORIS' own loader (kohya's sd-scripts with network_module=lycoris.kohya)
            torch.testing.assert_close(
                lycoris_delta(parts, want.shape, strength), want, rtol=1e-4, atol=1e-6
            )

        # webui: every key matched to a module of the original-layout model, same delta.
        matched, failed = webui_load_network(kohya, mapping)
        assert failed == [] and len(matched) == len(deltas)
        by_webui_name = {}
        for (component, path), want in deltas.items():
            prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
            name = prefix + path.replace("text_model.", "").replace(".", "_")
            by_webui_name[name] = want
        for name, parts in matched.items():
            assert parts["hada_w1_a" if kind == "loha" else "alpha"] is not None
            parts = {k: (v.item() if k == "alpha" else v) for k, v in parts.items()}
            got = webui_lycoris_delta(parts, mapping[name], strength)
            assert got.shape == mapping[name]
        # and the values, module by module, through the kohya names
        for key_name, want in by_webui_name.items():
            parts = {
                k.split(".", 1)[1]: (v.item() if k.endswith(".alpha") else v)
                for k, v in kohya.items()
                if k.split(".", 1)[0] == key_name
            }
            got = webui_lycoris_delta(parts, want.shape, strength)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_lokr_tucker_fails_in_comfyuis_rule_so_the_config_refuses_it():
    """ComfyUI's LoKr rebuilds lokr_t2's w2 by einsum and hands it to torch.kron without
    .contiguous() (the webui and peft add it): with this torch that raises, and ComfyUI
    logs the error and leaves the layer unpatched. So lora.use_effective_conv2d is for
    loha only."""
    unet = sd15_unet()
    layers, r = _with_lycoris(
        unet, ["conv1"], "lokr", {"decompose_factor": 4, "use_effective_conv2d": True}
    )
    kohya = peft_lycoris_to_kohya(layers, None, r, 6.0)
    patches, _ = comfyui_load_lycoris(kohya, comfyui_key_map(unet, clip_l_text_encoder()))
    (target, parts), *_ = [(t, p) for t, p in patches.items() if "lokr_t2" in p]
    shape = unet.get_submodule(target[1]).weight.shape
    with pytest.raises(RuntimeError):
        comfyui_lycoris_delta(parts, shape)
    cfg = base_config("m", "d", "o", lora={"type": "lokr", "use_effective_conv2d": True})
    with pytest.raises(ConfigError, match="use_effective_conv2d"):
        from_dict(cfg)


def test_unaddressable_text_encoder_module_and_dora_are_refused_clearly():
    bad = {"embeddings.token_embedding.lora_A.weight": torch.zeros(2, 8)}
    bad["embeddings.token_embedding.lora_B.weight"] = torch.zeros(8, 2)
    with pytest.raises(KohyaExportError, match="text_encoder_target_modules"):
        peft_to_kohya({}, bad, 2.0)
    dora = {
        "a.to_q.lora_A.weight": torch.zeros(2, 8),
        "a.to_q.lora_B.weight": torch.zeros(8, 2),
        "a.to_q.lora_magnitude_vector": torch.ones(8),
    }
    with pytest.raises(KohyaExportError, match="DoRA"):
        peft_to_kohya(dora, None, 2.0)


# ------------------------------------------------------------------ trained LoRA files


@pytest.fixture(scope="module")
def lora_te_run(tiny_model_dir, instance_dir, tmp_path_factory):
    """UNet (attention, ff, resnet convs) + text encoder, rank 4, alpha 8."""
    out = tmp_path_factory.mktemp("clients") / "run"
    targets = UNET_ALL_TARGETS[:-2]  # the tiny UNet has one down/up sampler each; keep them out
    cfg = from_dict(
        base_config(
            tiny_model_dir,
            instance_dir,
            out,
            train={"max_steps": 2},
            lora={
                "rank": 4,
                "alpha": 8.0,
                "unet_target_modules": targets,
                "train_text_encoder": True,
                "text_encoder_target_modules": TE_ALL_TARGETS,
            },
        )
    )
    parts = load_parts(str(tiny_model_dir))
    train(cfg, parts=parts)
    return out, parts


def test_trained_kohya_file_loads_fully_at_the_trained_strength(lora_te_run, tiny_model_dir):
    out, parts = lora_te_run
    kohya = load_file(out / KOHYA_WEIGHTS)
    deltas = {("unet", n): d for n, d in _peft_deltas(parts.unet).items()}
    deltas.update({("text_encoder", n): d for n, d in _peft_deltas(parts.text_encoder).items()})
    assert any(t[0] == "text_encoder" for t in deltas)
    patches, not_loaded = comfyui_load_lora(kohya, comfyui_key_map(parts.unet, parts.text_encoder))
    assert not_loaded == [] and set(patches) == set(deltas)
    for target, (up, down, alpha) in patches.items():
        want = deltas[target]
        torch.testing.assert_close(comfyui_delta(up, down, alpha, want.shape), want)
    assert all(float(kohya[k]) == 8.0 for k in kohya if k.endswith(".alpha"))


def test_trained_kohya_file_loads_in_stock_diffusers_like_the_trained_model(lora_te_run):
    """diffusers converts kohya keys itself: UNet and text encoder match the trained ones."""
    out, parts = lora_te_run
    pipe = StableDiffusionPipeline.from_pretrained(parts.source, safety_checker=None)
    pipe.load_lora_weights(out, weight_name=KOHYA_WEIGHTS)
    ids = parts.tokenizer(
        ["a photo of sks disc"],
        padding="max_length",
        max_length=parts.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = parts.text_encoder(ids)[0]
        torch.testing.assert_close(pipe.text_encoder(ids)[0], hidden)
        want = parts.unet(latents, torch.tensor([500]), hidden).sample
        torch.testing.assert_close(pipe.unet(latents, torch.tensor([500]), hidden).sample, want)


def test_diffusers_file_in_comfyui_loads_only_partly(lora_te_run):
    """Why the README sends UIs to the kohya file: ComfyUI maps diffusers attention keys only
    in the old `.processor.to_q` form and reads no alpha from metadata."""
    out, parts = lora_te_run
    sd = load_file(out / LORA_WEIGHTS)
    patches, not_loaded = comfyui_load_lora(sd, comfyui_key_map(parts.unet, parts.text_encoder))
    assert not_loaded and any(".attn1.to_q." in k for k in not_loaded)
    assert all(alpha is None for _, _, alpha in patches.values())


def test_end_of_training_line_names_the_ui_file(tiny_model_dir, instance_dir, tmp_path, caplog):
    cfg = from_dict(
        base_config(tiny_model_dir, instance_dir, tmp_path / "run", train={"max_steps": 1})
    )
    with caplog.at_level(logging.INFO):
        train(cfg)
    line = next(r.getMessage() for r in caplog.records if "LoRA saved in" in r.getMessage())
    assert "lora_kohya.safetensors -> ComfyUI models/loras, webui models/Lora" in line


def test_dora_writes_no_ui_file_and_says_why(tiny_model_dir, instance_dir, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / KOHYA_WEIGHTS).write_bytes(b"stale")  # from an earlier, non-DoRA run
    cfg = from_dict(
        base_config(
            tiny_model_dir,
            instance_dir,
            out,
            train={"max_steps": 1},
            lora={"use_dora": True},
        )
    )
    with caplog.at_level(logging.INFO):
        train(cfg)
    assert (out / LORA_WEIGHTS).is_file() and not (out / KOHYA_WEIGHTS).exists()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "no lora_kohya.safetensors written: DoRA" in messages
    assert "no UI file (DoRA" in messages


# ------------------------------------------------------------------ webui safe unpickler


def test_current_torch_save_fails_the_webui_check(tmp_path):
    """The rule bites: what torch.save writes today is refused ("bad file inside")."""
    path = tmp_path / "x.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}}, path)
    with pytest.raises(WebuiRefused, match="bad file inside"):
        webui_safe_check(path)


def test_embedding_pt_passes_the_webui_check_and_every_client_reads_it(tmp_path):
    vectors = torch.randn(3, 768)
    pt = E.save_webui_pt(tmp_path / "sks.pt", "sks", vectors, step=5)
    webui_safe_check(pt)
    data = torch.load(pt, weights_only=True)  # ComfyUI / kohya / diffusers read it like this
    for read in (webui_embedding, comfyui_embedding, kohya_embedding):
        torch.testing.assert_close(read(data), vectors)
    assert E.read_embedding(pt).num_vectors == 3


def test_embedding_safetensors_layouts_every_client_reads(tmp_path):
    vectors = torch.randn(3, 768)
    single = E.save_single_tensor(tmp_path / "sks.safetensors", "sks", vectors, step=5)
    diffusers = E.save_diffusers(tmp_path / "learned_embeds.safetensors", "<sks>", vectors)
    for path in (single, diffusers):
        data = load_file(path)
        for read in (webui_embedding, comfyui_embedding, kohya_embedding):
            torch.testing.assert_close(read(data), vectors)
    assert set(load_file(single)) == {"emb_params"}
    # ComfyUI prefers the model's own key (clip_l for SD1) when a file carries several.
    assert comfyui_embedding({"clip_g": torch.zeros(1, 1280), "clip_l": vectors}) is not None
    torch.testing.assert_close(
        comfyui_embedding({"clip_g": torch.zeros(1, 1280), "clip_l": vectors}), vectors
    )


def test_sdxl_embedding_file_every_client_reads_into_both_encoders(tmp_path):
    """One clip_l/clip_g file at SDXL's real widths (768 + 1280): the webui registers it for
    a 2048-wide model, ComfyUI's two tokenizers each take their key, kohya reads both."""
    clip_l, clip_g = torch.randn(3, 768), torch.randn(3, 1280)
    path = E.save_sdxl(tmp_path / "sks.safetensors", "sks", clip_l, clip_g, step=5)
    data = load_file(path)
    assert set(data) == {"clip_l", "clip_g"}
    for read in (
        lambda d: webui_sdxl_embedding(d, expected_width=768 + 1280),
        lambda d: comfyui_sdxl_embedding(d, clip_l_width=768, clip_g_width=1280),
        kohya_sdxl_embedding,
    ):
        got = read(data)
        torch.testing.assert_close(got["clip_l"], clip_l)
        torch.testing.assert_close(got["clip_g"], clip_g)
    emb = E.read_embedding(path)
    assert emb.is_sdxl and emb.token == "sks" and emb.step == 5 and emb.num_vectors == 3
    # The rules bite: an SD1 embedding is skipped by the webui on SDXL and dropped by
    # ComfyUI's clip_g tokenizer; rows that differ between the encoders are refused here.
    with pytest.raises(AssertionError, match="not an SDXL embedding"):
        webui_sdxl_embedding({"emb_params": clip_l}, expected_width=2048)
    with pytest.raises(AssertionError, match="clip_g: width 768"):
        comfyui_sdxl_embedding({"emb_params": clip_l}, clip_l_width=768, clip_g_width=1280)
    with pytest.raises(E.EmbeddingError, match="3 and 2 vectors"):
        E.save_sdxl(tmp_path / "bad.safetensors", "bad", clip_l, clip_g[:2], step=None)


HN_OPTIONS = {
    "plain": dict(layer_structure=[1, 2, 1], activation_func="linear"),
    "relu": dict(layer_structure=[1, 2, 1], activation_func="relu"),
    "layer_norm": dict(layer_structure=[1, 2, 2, 1], activation_func="linear", is_layer_norm=True),
    "layer_norm_relu_out": dict(
        layer_structure=[1, 2, 1], activation_func="relu", is_layer_norm=True, activate_output=True
    ),
}


@pytest.mark.parametrize("kind", sorted(HN_OPTIONS))
def test_hypernetwork_pt_passes_webui_check_and_comfyui_applies_it_exactly(tmp_path, kind):
    hn = H.Hypernetwork([8, 16], H.HypernetworkOptions(**HN_OPTIONS[kind]), name="hn")
    for p in hn.parameters():  # away from the near-identity init, so differences show
        torch.nn.init.normal_(p, std=0.3)
    pt = H.save_hypernetwork(hn, tmp_path / "hn.pt")
    webui_safe_check(pt)
    raw = torch.load(pt, weights_only=True)  # ComfyUI's load_torch_file(safe_load=True)
    assert comfyui_hypernetwork_problems(raw) == []
    built = comfyui_hypernetwork(raw)
    assert sorted(built) == [8, 16]
    for width in (8, 16):
        x = torch.randn(2, 5, width)
        for kv, mlp in zip("kv", built[width]):
            ours = getattr(hn.pair(width), kv)
            with torch.no_grad():  # ComfyUI: k + hn(k) * strength; ours: x + mlp(x) * mult
                torch.testing.assert_close(x + mlp(x), ours(x))


def test_hypernetwork_none_activation_is_written_as_linear_for_comfyui(tmp_path):
    hn = H.Hypernetwork([8], H.HypernetworkOptions(activation_func=None), name="hn")
    raw = torch.load(H.save_hypernetwork(hn, tmp_path / "hn.pt"), weights_only=True)
    assert raw["activation_func"] == "linear" and comfyui_hypernetwork(raw) is not None


def test_hypernetwork_options_comfyui_misapplies_are_flagged(tmp_path):
    """relu + layer norm without activate_output: ComfyUI adds a ReLU after the last Linear
    (its loop counts the LayerNorm as a layer), so the warning at save is real."""
    options = dict(layer_structure=[1, 2, 1], activation_func="relu", is_layer_norm=True)
    hn = H.Hypernetwork([8], H.HypernetworkOptions(**options), name="hn")
    for p in hn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    raw = torch.load(H.save_hypernetwork(hn, tmp_path / "hn.pt"), weights_only=True)
    assert any("layer_norm" in p for p in comfyui_hypernetwork_problems(raw))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        comfy = x + comfyui_hypernetwork(raw)[8][0](x)
        assert not torch.allclose(comfy, hn.pair(8).k(x))
    assert any("dropout" in p for p in comfyui_hypernetwork_problems({"use_dropout": True}))
    assert comfyui_hypernetwork_problems({"activation_func": "gelu"})


def test_hypernetwork_safetensors_is_an_empty_patch_in_comfyui(tmp_path):
    """What docs/formats.md warns about: UIs take the .pt."""
    hn = H.Hypernetwork([8], name="hn")
    sd = load_file(H.save_hypernetwork(hn, tmp_path / "hn.safetensors"))
    assert comfyui_hypernetwork(sd) == {}


# ------------------------------------------------------------------ file modes


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_saved_files_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert default_file_mode() == 0o666 & ~umask
        vectors = torch.randn(2, 768)
        files = [
            E.save_diffusers(tmp_path / "learned_embeds.safetensors", "<t>", vectors),
            E.save_single_tensor(tmp_path / "t.safetensors", "t", vectors, 1),
            E.save_webui_pt(tmp_path / "t.pt", "t", vectors, 1),
            H.save_hypernetwork(H.Hypernetwork([8], name="h"), tmp_path / "h.pt"),
            H.save_hypernetwork(H.Hypernetwork([8], name="h"), tmp_path / "h.safetensors"),
        ]
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name
    finally:
        os.umask(old)


def test_lora_files_respect_the_umask(lora_te_run):
    out, _ = lora_te_run
    for name in (LORA_WEIGHTS, KOHYA_WEIGHTS):
        assert stat.S_IMODE((out / name).stat().st_mode) == default_file_mode(), name


def test_dreambooth_files_respect_the_umask(tiny_model_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    cfg = from_dict(
        base_config(tiny_model_dir, instance_dir, out, method="dreambooth", train={"max_steps": 1})
    )
    train(cfg)
    files = [p for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts]
    assert any(p.suffix == ".safetensors" for p in files)
    wrong = [p.name for p in files if stat.S_IMODE(p.stat().st_mode) != default_file_mode()]
    assert wrong == []


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "a.bin"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
