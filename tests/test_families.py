"""Issue 20's features on every model family: LoHa/LoKr on SDXL and SD 2.x (trained on the
UNet and the text encoders, named as that family's LoRA kohya file is, loaded by ComfyUI's
rules, personalize.load and `personalize merge`), and masked loss, several concepts and
Prodigy through the shared loop on the tiny SDXL and SD2."""

from __future__ import annotations

import pytest
import torch
from client_rules import (
    comfyui_key_map,
    comfyui_load_lycoris,
    comfyui_lycoris_delta,
    comfyui_sdxl_key_map,
    webui_layer_mapping,
    webui_load_network,
    webui_sd2_attention_applied,
)
from conftest import base_config
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from personalize import load, train
from personalize.adapters.kohya import kohya_name
from personalize.adapters.lora import LYCORIS_WEIGHTS
from personalize.config import from_dict
from personalize.models import load_parts, load_pipeline
from personalize.testing import write_synthetic_images
from personalize.tools.lora_merge import merge
from personalize.training.loop import Trainer

UNET_TARGETS = ["to_q", "to_v", "proj_in", "conv1"]  # attention, 1x1 / linear, 3x3 conv
TE_ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
KINDS = {"loha": {"type": "loha", "rank": 2, "alpha": 3.0}, "lokr": {"type": "lokr", "rank": 2}}
FAMILIES = {"sdxl": "tiny_sdxl_model_dir", "sd2": "tiny_sd2_model_dir"}
COMPONENTS = {"sdxl": ("unet", "text_encoder", "text_encoder_2"), "sd2": ("unet", "text_encoder")}


def _adapted(model):
    from peft.tuners.lycoris_utils import LycorisLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LycorisLayer)}


def _deltas(parts_or_pipe, family, strength=1.0) -> dict[tuple, torch.Tensor]:
    out = {}
    for component in COMPONENTS[family]:
        for name, layer in _adapted(getattr(parts_or_pipe, component)).items():
            layer.set_scale("default", strength)
            out[(component, name)] = layer.get_delta_weight("default").detach().clone()
            layer.set_scale("default", 1.0)
    return out


@pytest.fixture(scope="module", params=[(f, k) for f in FAMILIES for k in KINDS], ids="-".join)
def lycoris_run(request, instance_dir, tmp_path_factory):
    family, kind = request.param
    model_dir = request.getfixturevalue(FAMILIES[family])
    out = tmp_path_factory.mktemp(f"{family}-{kind}") / "run"
    lora = dict(
        KINDS[kind],
        unet_target_modules=UNET_TARGETS,
        train_text_encoder=True,
        text_encoder_target_modules=TE_ALL,
    )
    cfg = from_dict(base_config(model_dir, instance_dir, out, train={"max_steps": 3}, lora=lora))
    parts = load_parts(str(model_dir))
    train(cfg, parts=parts)
    return family, kind, model_dir, out, parts


def test_lycoris_names_and_metadata_are_the_familys_lora_ones(lycoris_run):
    """One name per adapted module, the very name the family's LoRA kohya file gives it
    (kohya_name; SDXL: original UNet names, lora_te1_/lora_te2_), and sd-scripts' version
    metadata."""
    family, kind, _, out, parts = lycoris_run
    file = out / LYCORIS_WEIGHTS
    names = {k.split(".", 1)[0] for k in load_file(file)}
    sdxl_unet = parts.unet.config if family == "sdxl" else None
    want = {kohya_name(f"{c}.{n}", sdxl_unet) for c, n in _deltas(parts, family)}
    assert names == want
    prefixes = {n[: n.index("_", 5) + 1] for n in names}
    if family == "sdxl":
        assert prefixes == {"lora_unet_", "lora_te1_", "lora_te2_"}
        assert not any("down_blocks" in n or "up_blocks" in n for n in names)
        # CLIP-L's last layer shapes nothing SDXL reads: no adapters there
        assert not any(n.startswith("lora_te1_text_model_encoder_layers_1_") for n in names)
    else:
        assert prefixes == {"lora_unet_", "lora_te_"}
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert f'"algo": "{kind}"' in meta["ss_network_args"]
    if family == "sdxl":
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and "ss_v2" not in meta
    else:
        assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_v2"] == "True"
        assert meta["ss_v_parameterization"] == "True"


def test_comfyui_takes_every_key_at_the_trained_delta(lycoris_run):
    family, _, _, out, parts = lycoris_run
    sd = load_file(out / LYCORIS_WEIGHTS)
    if family == "sdxl":
        key_map, original = comfyui_sdxl_key_map(
            parts.unet, parts.text_encoder, parts.text_encoder_2
        )
        assert {k.split(".")[0] for k in sd if k.startswith("lora_unet_")} <= original
    else:
        key_map = comfyui_key_map(parts.unet, parts.text_encoder)
    patches, not_loaded = comfyui_load_lycoris(sd, key_map)
    assert not_loaded == []
    for strength in (1.0, 0.5):
        deltas = _deltas(parts, family, strength)
        assert set(patches) == set(deltas)
        assert {c for c, _ in deltas} == set(COMPONENTS[family])
        for target, p in patches.items():
            got = comfyui_lycoris_delta(p, deltas[target].shape, strength)
            torch.testing.assert_close(got, deltas[target], rtol=1e-4, atol=1e-7)


def test_load_applies_the_trained_delta_at_strength_and_merge_bakes_it(lycoris_run, tmp_path):
    family, _, model_dir, out, parts = lycoris_run
    want = _deltas(parts, family, 0.5)
    pipe = load_pipeline(str(model_dir))
    base = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()}
            for c in COMPONENTS[family]}  # fmt: skip
    load(pipe, out, strength=0.5)
    assert {(c, n) for c in COMPONENTS[family] for n in _adapted(getattr(pipe, c))} == set(want)
    pipe.fuse_lora(adapter_names=list(pipe._personalize_lora_strengths))
    for (component, name), delta in want.items():
        layer = getattr(pipe, component).get_submodule(name).get_base_layer()
        got = layer.weight.detach() - base[component][name + ".weight"]
        torch.testing.assert_close(got, delta, rtol=1e-4, atol=1e-6)

    merged = load_pipeline(str(merge(str(model_dir), [(str(out), 0.5)], tmp_path / "merged")))
    for (component, name), delta in want.items():
        got = getattr(merged, component).get_submodule(name).weight
        ref = base[component][name + ".weight"]
        torch.testing.assert_close(got - ref, delta, rtol=1e-4, atol=1e-6)


def test_sdxl_file_with_comfyuis_other_names_loads_the_same(lycoris_run, tmp_path):
    """ComfyUI also takes SDXL LoHa/LoKr named by diffusers' UNet blocks and `lora_te_` for
    CLIP-L (files from other trainers); personalize.load reads those as ours."""
    family, _, model_dir, out, parts = lycoris_run
    if family != "sdxl":
        pytest.skip("SD 2.x has one naming")
    from safetensors.torch import save_file

    renamed = {}
    for component, name in _deltas(parts, family):
        ours = kohya_name(f"{component}.{name}", parts.unet.config)
        other = kohya_name(f"{component}.{name}")  # diffusers UNet names, lora_te_ for CLIP-L
        renamed[ours] = other.replace("lora_te1_", "lora_te_")
    sd = load_file(out / LYCORIS_WEIGHTS)
    other = {renamed[k.split(".")[0]] + "." + k.split(".", 1)[1]: v for k, v in sd.items()}
    assert any(k.startswith("lora_unet_down_blocks_") for k in other)
    assert any(k.startswith("lora_te_") for k in other)
    save_file(other, tmp_path / "other.safetensors")
    ids = parts.tokenizer(["a photo of sks disc"], return_tensors="pt").input_ids
    outputs = []
    for file in (out / LYCORIS_WEIGHTS, tmp_path / "other.safetensors"):
        pipe = load(load_pipeline(str(model_dir)), file, strength=0.7)
        with torch.no_grad():
            outputs.append(pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2])
        assert {(c, n) for c in COMPONENTS[family] for n in _adapted(getattr(pipe, c))} == set(
            _deltas(parts, family)
        )
    torch.testing.assert_close(outputs[0], outputs[1])


# ------------------------------------------------------------------ every module kind


def _lycoris_layers(model, kind, targets):
    """peft LoHa/LoKr with random (non-zero) factors on `targets` of `model`."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    cls = LoHaConfig if kind == "loha" else LoKrConfig
    config = cls(r=2, alpha=3.0, target_modules=targets, init_weights=False)
    torch.manual_seed(1)
    inject_adapter_in_model(config, model)
    return get_peft_model_state_dict(model)


@pytest.mark.parametrize("kind", list(KINDS))
def test_sdxl_lycoris_names_cover_every_module_kind_under_comfyuis_sdxl_map(kind):
    """SDXL's block structure (test_sdxl.sdxl_unet) with every module a LoRA can target:
    ComfyUI's SDXL key map takes every key and applies the delta peft computes."""
    from test_sdxl import UNET_ALL, sdxl_text_encoders, sdxl_unet

    from personalize.adapters.kohya import peft_lycoris_to_kohya

    unet, (te1, te2) = sdxl_unet(), sdxl_text_encoders()
    sd = peft_lycoris_to_kohya(
        _lycoris_layers(unet, kind, UNET_ALL),
        _lycoris_layers(te1, kind, TE_ALL),
        2,
        3.0,
        text_encoder_2_layers=_lycoris_layers(te2, kind, TE_ALL),
        sdxl_unet=unet.config,
    )
    key_map, original = comfyui_sdxl_key_map(unet, te1, te2)
    patches, not_loaded = comfyui_load_lycoris(sd, key_map)
    assert not_loaded == []
    assert {k.split(".")[0] for k in sd if k.startswith("lora_unet_")} <= original
    assert "lora_unet_output_blocks_2_2_conv" in {k.split(".")[0] for k in sd}
    for component, model in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2)):
        for name, layer in _adapted(model).items():
            want = layer.get_delta_weight("default")
            got = comfyui_lycoris_delta(patches[(component, name)], want.shape)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_sd2_lycoris_names_follow_the_webuis_sd2_rules(kind):
    """SD 2.1's structure (test_sd2.sd21_unet, OpenCLIP-H's layout): the webui matches every
    key, and applies the text encoder's attention modules (q, k, v, out all present)."""
    from test_sd2 import open_clip_h_text_encoder, sd21_unet

    from personalize.adapters.kohya import peft_lycoris_to_kohya, sd2_webui_skipped_layers
    from personalize.adapters.sd_single_file import convert_text_encoder, convert_unet

    unet, te = sd21_unet(), open_clip_h_text_encoder()
    original = convert_unet(dict(unet.state_dict()), unet.config)
    original.update(convert_text_encoder(dict(te.state_dict()), te.config))
    sd = peft_lycoris_to_kohya(
        _lycoris_layers(unet, kind, ["to_q", "to_k", "proj_in", "conv1"]),
        _lycoris_layers(te, kind, TE_ALL),
        2,
        3.0,
    )
    matched, failed = webui_load_network(sd, webui_layer_mapping(original), is_sd2=True)
    assert failed == []
    assert "diffusion_model_input_blocks_1_1_proj_in" in matched
    attention = webui_sd2_attention_applied(matched)
    assert len(attention) == 4 and all(attention.values())
    assert sd2_webui_skipped_layers(sd) == []


# ------------------------------------------------------------------ the shared loop


def _trained_weights(trainer) -> dict[str, torch.Tensor]:
    return {
        f"{c}.{k}": v.detach().clone()
        for c, model in {"unet": trainer.parts.unet, **trainer.parts.text_encoders()}.items()
        for k, v in model.state_dict().items()
        if "lora_" in k
    }


def _changed(before: dict, after: dict) -> bool:
    assert before.keys() == after.keys() and before
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_masked_loss_trains_on_every_family(family, request, tmp_path):
    """Half masks: the first batch's loss is finite and differs from the unmasked one (same
    seed, same batch), and the masked run trains its adapters."""
    model_dir = request.getfixturevalue(FAMILIES[family])
    data = tmp_path / "data"
    for path in write_synthetic_images(data, count=2, size=32):
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (0, 0, 16, 32))
        mask.save(path.with_name(f"{path.stem}.mask.png"))

    def trainer(name, **data_settings) -> Trainer:
        lora = {"train_text_encoder": True}
        cfg = base_config(model_dir, data, tmp_path / name, train={"max_steps": 2}, lora=lora)
        cfg["data"].update(data_settings)
        return Trainer(from_dict(cfg))

    plain, masked = trainer("plain"), trainer("masked", masked_loss=True)
    batch, masked_batch = next(iter(plain.dataloader)), next(iter(masked.dataloader))
    assert "loss_mask" in masked_batch and "loss_mask" not in batch
    with torch.no_grad():
        plain_loss, masked_loss = plain.compute_loss(batch), masked.compute_loss(masked_batch)
    assert torch.isfinite(masked_loss) and not torch.equal(masked_loss, plain_loss)
    before = _trained_weights(masked)
    masked.run()
    assert _changed(before, _trained_weights(masked))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_concepts_train_on_every_family(family, request, tmp_path):
    """Each concept's own prompt / caption reaches the text encoders in one run (SDXL: both
    tokenizers), and the adapters train."""
    model_dir = request.getfixturevalue(FAMILIES[family])
    disc, cat = tmp_path / "disc", tmp_path / "cat"
    write_synthetic_images(disc, count=2, size=32)
    write_synthetic_images(cat, count=1, size=32, seed=3, caption="ohwx cat, sitting, indoors")
    cfg = base_config(model_dir, disc, tmp_path / "out", train={"max_steps": 3})
    cfg["data"] = {
        "concept_balance": "equal",
        "concepts": [
            {"path": str(disc), "prompt": "a photo of sks disc"},
            {"path": str(cat), "prompt": "a photo of ohwx cat", "shuffle_tags": True},
        ],
    }
    cfg["lora"] = {"train_text_encoder": True}
    trainer = Trainer(from_dict(cfg))
    seen = []
    text = trainer.conditioning.text

    def spy(captions, *args, **kwargs):
        seen.extend(captions)
        out = text(captions, *args, **kwargs)
        assert torch.isfinite(out.hidden_states).all()
        return out

    trainer.conditioning.text = spy
    before = _trained_weights(trainer)
    trainer.run()
    assert "a photo of sks disc" in seen
    assert any("ohwx cat" in c and "sitting" in c for c in seen)
    assert _changed(before, _trained_weights(trainer))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prodigy_trains_on_every_family(family, request, tmp_path, instance_dir):
    pytest.importorskip("prodigyopt")
    model_dir = request.getfixturevalue(FAMILIES[family])
    train_cfg = {"max_steps": 2, "optimizer": "prodigy", "lr": 1.0}
    cfg = base_config(model_dir, instance_dir, tmp_path / "out", train=train_cfg)
    cfg["lora"] = {"train_text_encoder": True}
    trainer = Trainer(from_dict(cfg))
    assert type(trainer.optimizer.optimizer).__name__ == "Prodigy"
    before = _trained_weights(trainer)
    trainer.run()
    after = _trained_weights(trainer)
    assert _changed(before, after) and all(torch.isfinite(v).all() for v in after.values())
