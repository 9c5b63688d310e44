"""LoHa and LoKr (lora.type): trained through peft on the tiny model, saved in the
kohya/LyCORIS layout, applied by personalize.load at a strength, unloaded, and baked by
`personalize merge`. The clients' own rules are checked in test_client_formats.py."""

from __future__ import annotations

import pytest
import torch
from client_rules import comfyui_key_map, comfyui_load_lycoris, comfyui_lycoris_delta
from conftest import base_config
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from personalize import load, train
from personalize.adapters.lora import LYCORIS_WEIGHTS
from personalize.config import from_dict
from personalize.errors import ArtifactError, ConfigError
from personalize.models import load_parts
from personalize.testing import TINY_TEXT_WIDTH
from personalize.tools.lora_merge import merge

# attention, a 3x3 resnet conv and a 1x1 proj_in ("LoCon"), and the text encoder
UNET_TARGETS = ["to_q", "to_v", "proj_in", "conv1"]
TE_TARGETS = ["q_proj", "fc1"]
KINDS = {
    "loha": {"type": "loha", "rank": 4, "alpha": 2.0},
    "loha_tucker": {"type": "loha", "rank": 4, "alpha": 2.0, "use_effective_conv2d": True},
    "lokr": {"type": "lokr", "rank": 4, "alpha": 2.0},  # full w1, w2 on the tiny widths
    "lokr_lowrank": {"type": "lokr", "rank": 1, "alpha": 2.0, "decompose_factor": 4},
}


def _adapted(model):
    from peft.tuners.lycoris_utils import LycorisLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LycorisLayer)}


def _base_weights(model) -> dict[str, torch.Tensor]:
    """The model's own weights, under peft's wrappers' base_layer names too."""
    return {
        k.replace(".base_layer.", "."): v.detach().clone()
        for k, v in model.state_dict().items()
        if not any(p in k for p in ("hada_", "lokr_"))
    }


@pytest.fixture(scope="module", params=list(KINDS))
def run(request, tiny_model_dir, instance_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    lora = dict(
        KINDS[request.param],
        unet_target_modules=UNET_TARGETS,
        train_text_encoder=True,
        text_encoder_target_modules=TE_TARGETS,
    )
    cfg = from_dict(
        base_config(tiny_model_dir, instance_dir, out, train={"max_steps": 3}, lora=lora)
    )
    parts = load_parts(str(tiny_model_dir))
    train(cfg, parts=parts)
    return request.param, out, parts


def _trained_deltas(parts, strength=1.0):
    out = {}
    for component in ("unet", "text_encoder"):
        for name, layer in _adapted(getattr(parts, component)).items():
            layer.set_scale("default", strength)
            out[(component, name)] = layer.get_delta_weight("default").detach().clone()
            layer.set_scale("default", 1.0)
    return out


def test_training_changes_only_the_adapters(run, tiny_model_dir):
    kind, out, parts = run
    base = load_parts(str(tiny_model_dir))
    for component in ("unet", "text_encoder"):
        want = getattr(base, component).state_dict()
        got = _base_weights(getattr(parts, component))
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)  # bit-identical
    deltas = _trained_deltas(parts)
    assert len(deltas) > 0 and all(d.abs().max() > 0 for d in deltas.values())
    file = out / LYCORIS_WEIGHTS
    assert file.is_file() and not (out / "pytorch_lora_weights.safetensors").exists()
    tag = "hada_" if kind.startswith("loha") else "lokr_"
    assert all(tag in k or k.endswith(".alpha") for k in load_file(file))


def test_saved_file_is_what_comfyui_applies(run):
    """The file read with ComfyUI's rules gives each module the trained delta."""
    kind, out, parts = run
    sd = load_file(out / LYCORIS_WEIGHTS)
    patches, not_loaded = comfyui_load_lycoris(sd, comfyui_key_map(parts.unet, parts.text_encoder))
    for strength in (1.0, 0.5):
        deltas = _trained_deltas(parts, strength)
        assert not_loaded == [] and set(patches) == set(deltas)
        for target, p in patches.items():
            got = comfyui_lycoris_delta(p, deltas[target].shape, strength)
            torch.testing.assert_close(got, deltas[target], rtol=1e-4, atol=1e-7)


def _pipe(model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _fused_deltas(pipe, base) -> dict[tuple, torch.Tensor]:
    """merged weight - base weight of every module the adapters touch."""
    pipe.fuse_lora(adapter_names=list(pipe._personalize_lora_strengths))
    out = {}
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        for name, layer in _adapted(model).items():
            w = layer.get_base_layer().weight.detach()
            out[(component, name)] = w - base[component][name + ".weight"]
    pipe.unfuse_lora()
    return out


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_load_applies_the_trained_delta_at_strength_and_unloads(run, tiny_model_dir, strength):
    kind, out, parts = run
    pipe = _pipe(tiny_model_dir)
    base = {c: getattr(pipe, c).state_dict() for c in ("unet", "text_encoder")}
    base = {c: {k: v.clone() for k, v in sd.items()} for c, sd in base.items()}
    load(pipe, out, strength=strength)
    want = _trained_deltas(parts, strength)
    got = _fused_deltas(pipe, base)
    assert set(got) == set(want)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-4, atol=1e-6)
    # the strength stays adjustable, and the adapter comes off again
    pipe.set_adapters(list(pipe._personalize_lora_strengths), adapter_weights=[0.0])
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        base_pipe = _pipe(tiny_model_dir)
        plain = base_pipe.unet(latents, torch.tensor([500]), hidden).sample
        torch.testing.assert_close(pipe.unet(latents, torch.tensor([500]), hidden).sample, plain)
        pipe.delete_adapters(list(pipe._personalize_lora_strengths))
        assert not any(p in k for k in pipe.unet.state_dict() for p in ("hada_", "lokr_"))
        # (close, not equal: the fuse/unfuse above rounds the base weights in float32)
        torch.testing.assert_close(pipe.unet(latents, torch.tensor([500]), hidden).sample, plain)
        pipe.unload_lora_weights()  # and diffusers' unload drops peft's wrappers
        assert not _adapted(pipe.unet) and not _adapted(pipe.text_encoder)


def test_loaded_pipeline_predicts_like_the_trained_model(run, tiny_model_dir):
    kind, out, parts = run
    pipe = load(_pipe(tiny_model_dir), out / LYCORIS_WEIGHTS)
    ids = parts.tokenizer(
        ["a photo of sks disc"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = parts.text_encoder(ids)[0]
        torch.testing.assert_close(pipe.text_encoder(ids)[0], hidden, rtol=1e-4, atol=1e-5)
        want = parts.unet(latents, torch.tensor([500]), hidden).sample
        got = pipe.unet(latents, torch.tensor([500]), hidden).sample
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_merge_bakes_what_load_applies(run, tiny_model_dir, tmp_path):
    kind, out, parts = run
    merged_dir = merge(str(tiny_model_dir), [(str(out), 0.5)], tmp_path / "merged")
    merged = _pipe(merged_dir)
    assert not any(p in k for k in merged.unet.state_dict() for p in ("hada_", "lokr_"))
    base = _pipe(tiny_model_dir)
    want = _trained_deltas(parts, 0.5)
    for (component, name), delta in want.items():
        got = getattr(merged, component).get_submodule(name).weight
        ref = getattr(base, component).get_submodule(name).weight
        torch.testing.assert_close(got - ref, delta, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ files made elsewhere


def test_kohya_lycoris_layouts_load_as_the_clients_apply_them(tiny_model_dir, tmp_path):
    """Files as LyCORIS writes them in shapes peft would not choose for these layers (a full
    lokr_w1 beside a low-rank w2, LoHa without .alpha): applied by ComfyUI's math."""
    pipe = _pipe(tiny_model_dir)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    conv = "down_blocks.0.resnets.0.conv1"
    wq, wc = pipe.unet.get_submodule(q).weight, pipe.unet.get_submodule(conv).weight
    g = torch.Generator().manual_seed(0)
    out_q, in_q = wq.shape
    sd = {
        # LoKr: w1 [2, 2] full, w2 low-rank (r 3): scale alpha / 3
        f"lora_unet_{q.replace('.', '_')}.lokr_w1": torch.randn(2, 2, generator=g),
        f"lora_unet_{q.replace('.', '_')}.lokr_w2_a": torch.randn(out_q // 2, 3, generator=g),
        f"lora_unet_{q.replace('.', '_')}.lokr_w2_b": torch.randn(3, in_q // 2, generator=g),
        f"lora_unet_{q.replace('.', '_')}.alpha": torch.tensor(1.5),
    }
    file = tmp_path / "lokr.safetensors"
    save_file(sd, file)
    loha = {
        f"lora_unet_{conv.replace('.', '_')}.hada_w1_a": torch.randn(wc.shape[0], 2, generator=g),
        f"lora_unet_{conv.replace('.', '_')}.hada_w1_b": torch.randn(2, wc[0].numel(), generator=g),
        f"lora_unet_{conv.replace('.', '_')}.hada_w2_a": torch.randn(wc.shape[0], 2, generator=g),
        f"lora_unet_{conv.replace('.', '_')}.hada_w2_b": torch.randn(2, wc[0].numel(), generator=g),
    }
    file2 = tmp_path / "loha.safetensors"
    save_file(loha, file2)
    base = {"unet": {k: v.clone() for k, v in pipe.unet.state_dict().items()}, "text_encoder": {}}
    load(pipe, file, strength=0.5)
    load(pipe, file2, strength=2.0)
    got = _fused_deltas(pipe, base)
    parts_q = {k.split(".", 1)[1]: v for k, v in sd.items()}
    parts_q["alpha"] = 1.5
    want_q = comfyui_lycoris_delta(parts_q, wq.shape, 0.5)
    want_c = comfyui_lycoris_delta({k.split(".", 1)[1]: v for k, v in loha.items()}, wc.shape, 2.0)
    torch.testing.assert_close(got[("unet", q)], want_q, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[("unet", conv)], want_c, rtol=1e-4, atol=1e-6)


def test_foreign_or_broken_lycoris_files_are_refused_clearly(tiny_model_dir, tmp_path):
    pipe = _pipe(tiny_model_dir)
    sd = {
        "lora_unet_no_such_block_to_q.hada_w1_a": torch.zeros(4, 2),
        "lora_unet_no_such_block_to_q.hada_w1_b": torch.zeros(2, 4),
        "lora_unet_no_such_block_to_q.hada_w2_a": torch.zeros(4, 2),
        "lora_unet_no_such_block_to_q.hada_w2_b": torch.zeros(2, 4),
    }
    save_file(sd, tmp_path / "other.safetensors")
    with pytest.raises(ArtifactError, match="another base model"):
        load(pipe, tmp_path / "other.safetensors")
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{q}.hada_w1_a": torch.zeros(4, 2)}, tmp_path / "half.safetensors")
    with pytest.raises(ArtifactError, match="incomplete loha"):
        load(pipe, tmp_path / "half.safetensors")


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"type": "lycoris"}, "lora.type: must be one of lora, loha, lokr"),
        ({"type": "loha", "use_dora": True}, "lora.use_dora"),
        ({"type": "lokr", "dropout": 0.1}, "lora.dropout"),
        ({"type": "loha", "decompose_factor": 4}, "lora.decompose_factor: applies to"),
        ({"type": "lora", "use_effective_conv2d": True}, "lora.use_effective_conv2d"),
        ({"type": "lokr", "decompose_factor": 1}, "lora.decompose_factor: must be -1"),
    ],
)
def test_bad_lycoris_options_are_one_line_errors(
    tiny_model_dir, instance_dir, tmp_path, lora, message
):
    with pytest.raises(ConfigError, match=message) as e:
        from_dict(base_config(tiny_model_dir, instance_dir, tmp_path, lora=lora))
    assert "\n" not in str(e.value)


def test_l2sp_with_loha_is_refused(tiny_model_dir, instance_dir, tmp_path):
    cfg = base_config(
        tiny_model_dir,
        instance_dir,
        tmp_path,
        lora={"type": "loha"},
        regularization={"weight_constraint": "l2sp", "weight_constraint_lambda": 0.1},
    )
    with pytest.raises(ConfigError, match="regularization.weight_constraint"):
        from_dict(cfg)


def test_stock_diffusers_does_not_read_loha_lokr_files(run, tiny_model_dir):
    """What docs/lycoris.md says: diffusers' load_lora_weights refuses these files (its
    kohya converter knows lora_down/lora_up only); personalize.load reads them."""
    kind, out, parts = run
    pipe = _pipe(tiny_model_dir)
    with pytest.raises(ValueError, match="not been correctly renamed"):
        pipe.load_lora_weights(out, weight_name=LYCORIS_WEIGHTS)


def test_toy_world_variants_are_the_lora_recipe_with_another_kind(tmp_path):
    from personalize.toyworld import base_model_path
    from personalize.toyworld.subjects import get_subject
    from personalize.toyworld.variants import RECIPES, variant_config

    subject = get_subject("striped_heart")
    lora = variant_config("lora", subject, base_model_path(), tmp_path / "d", tmp_path / "o")
    for kind in ("loha", "lokr"):
        cfg = variant_config(kind, subject, base_model_path(), tmp_path / "d", tmp_path / "o")
        assert cfg["lora"].pop("type") == kind
        assert {k: v for k, v in cfg.items() if k != "lora"} == {
            k: v for k, v in lora.items() if k != "lora"
        }
        assert from_dict(dict(cfg, lora=dict(cfg["lora"], type=kind))).lora.type == kind
    assert RECIPES["loha"]["steps"] == RECIPES["lora"]["steps"]


def test_end_of_training_line_sends_loha_lokr_to_the_uis_not_to_stock_diffusers():
    from pathlib import Path

    from personalize.adapters.clients import client_guide

    line = client_guide(
        "lora", Path("out"), kohya_file=Path("out") / LYCORIS_WEIGHTS, lycoris_kind="LoHa"
    )
    assert LYCORIS_WEIGHTS in line and "ComfyUI" in line and "does not read" in line
    assert "\n" not in line


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_resume_gives_the_same_file_as_a_straight_run(kind, tiny_model_dir, instance_dir, tmp_path):
    from personalize.training.loop import Trainer

    common = dict(
        train={"max_steps": 4, "checkpoint_every": 2},
        lora={"type": kind, "unet_target_modules": UNET_TARGETS},
    )
    train(from_dict(base_config(tiny_model_dir, instance_dir, tmp_path / "a", **common)))
    first = base_config(tiny_model_dir, instance_dir, tmp_path / "b", **common)
    first["train"] = dict(first["train"], max_steps=2)
    train(from_dict(first))
    resumed = base_config(tiny_model_dir, instance_dir, tmp_path / "b", resume="latest", **common)
    Trainer(from_dict(resumed)).run()
    a = load_file(tmp_path / "a" / LYCORIS_WEIGHTS)
    b = load_file(tmp_path / "b" / LYCORIS_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_tools_say_they_do_not_rewrite_loha_lokr(tmp_path):
    from personalize.errors import LoraFileError
    from personalize.tools.lora_layers import read_lora

    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {f"{q}.lokr_w1": torch.zeros(2, 2), f"{q}.lokr_w2": torch.zeros(4, 4)},
        tmp_path / "k.safetensors",
    )
    with pytest.raises(LoraFileError, match="LoHa/LoKr"):
        read_lora(tmp_path / "k.safetensors")
    (tmp_path / "run").mkdir()
    save_file({f"{q}.lokr_w1": torch.zeros(2, 2)}, tmp_path / "run" / LYCORIS_WEIGHTS)
    with pytest.raises(LoraFileError, match="LoHa/LoKr"):
        read_lora(tmp_path / "run")


def test_loha_stacks_on_a_lora_in_either_order(run, tiny_model_dir, instance_dir, tmp_path):
    """A LoRA loaded first wraps the layers; the LoHa/LoKr still finds them by name, and
    the pipeline's output is the base plus both deltas whichever came first."""
    kind, out, parts = run
    lora = tmp_path / "lora"
    train(from_dict(base_config(tiny_model_dir, instance_dir, lora, train={"max_steps": 1})))
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, TINY_TEXT_WIDTH, generator=torch.Generator().manual_seed(1))
    results = []
    for order in ((lora, out), (out, lora)):
        pipe = _pipe(tiny_model_dir)
        for path in order:
            load(pipe, path, strength=0.7)
        assert len(pipe._personalize_lora_strengths) == 2
        with torch.no_grad():
            results.append(pipe.unet(latents, torch.tensor([500]), hidden).sample)
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)
