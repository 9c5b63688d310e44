"""LoRA tools: merge into the base, resize by SVD, extract from a fine-tuned model.

The LoRA is made the way training makes it (methods/lora.py setup + save) with random
non-zero lora_B, on attention, a resnet conv and the text encoder, alpha != rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from personalize import load
from personalize.cli import main
from personalize.config import from_dict
from personalize.inference import ArtifactError
from personalize.methods.lora import KOHYA_WEIGHTS, LORA_WEIGHTS, LoRA
from personalize.models import load_parts, load_pipeline
from personalize.tools.lora_extract import extract
from personalize.tools.lora_layers import LoraLayer, kohya_name, read_lora, write_kohya
from personalize.tools.lora_merge import merge, parse_load
from personalize.tools.lora_resize import resize_file


def _images(pipe) -> np.ndarray:
    return pipe(
        ["a photo of sks disc"],
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=3,
        height=32,
        width=32,
        output_type="np",
    ).images


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_tools")
    cfg = from_dict(
        {
            "method": "lora",
            "output_dir": str(root / "run"),
            "model": {"path": str(tiny_model_dir)},
            "data": {"path": str(root), "prompt": "a photo of sks disc"},
            "lora": {
                "rank": 4,
                "alpha": 8,  # scale 2: the tools must read alpha, not assume 1
                "train_text_encoder": True,
                "unet_target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1"],
            },
        }
    )
    parts = load_parts(str(tiny_model_dir))
    method = LoRA(cfg)
    method.setup(parts)
    g = torch.Generator().manual_seed(0)
    for module in (parts.unet, parts.text_encoder):
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.1
    method.save(root / "lora", parts, 1)
    return root / "lora"


@pytest.fixture(scope="module")
def base_images(tiny_model_dir):
    return _images(load_pipeline(str(tiny_model_dir)))


def _loaded_images(model, path, strength=1.0):
    pipe = load_pipeline(str(model))
    load(pipe, path, strength=strength)
    return _images(pipe)


def _lora_modules(pipe) -> int:
    return sum(
        1
        for module in (pipe.unet, pipe.text_encoder)
        for name, _ in module.named_parameters()
        if name.endswith("lora_A.default_0.weight") or ".lora_A." in name
    )


# ------------------------------------------------------------------------------ merge


def test_merge_equals_the_pipeline_with_the_lora_loaded(
    lora_dir, tiny_model_dir, base_images, tmp_path
):
    out = merge(str(tiny_model_dir), [(str(lora_dir), 1.0)], tmp_path / "merged")
    merged = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    merged.set_progress_bar_config(disable=True)
    assert not any("lora" in k for k in merged.unet.state_dict())
    expected = _loaded_images(tiny_model_dir, lora_dir)
    assert np.abs(expected - base_images).max() > 0.05  # the LoRA does change the images
    np.testing.assert_allclose(_images(merged), expected, atol=1e-4)


def test_merge_at_half_strength_and_stacked_loras(lora_dir, tiny_model_dir, tmp_path):
    half = merge(str(tiny_model_dir), [(str(lora_dir), 0.5)], tmp_path / "h")
    np.testing.assert_allclose(
        _images(load_pipeline(str(half))),
        _loaded_images(tiny_model_dir, lora_dir, 0.5),
        atol=1e-4,
    )
    # Two LoRAs, one in kohya layout, each at its strength == loading both.
    kohya, _ = resize_file(lora_dir / KOHYA_WEIGHTS, tmp_path / "k.safetensors", rank=2)
    stacked = merge(
        str(tiny_model_dir),
        [(str(lora_dir), 0.5), (str(kohya[0]), 0.7)],
        tmp_path / "s",
        single_file=True,
    )
    pipe = load_pipeline(str(tiny_model_dir))
    load(pipe, lora_dir, strength=0.5)
    load(pipe, kohya[0], strength=0.7)
    merged = load_pipeline(str(stacked))
    np.testing.assert_allclose(_images(merged), _images(pipe), atol=1e-4)
    # The single file holds the same weights, readable by diffusers' single-file loader.
    single = StableDiffusionPipeline.from_single_file(
        str(stacked / "s.safetensors"),
        config=str(tiny_model_dir),
        safety_checker=None,
        local_files_only=True,
    )
    for k, v in merged.unet.state_dict().items():
        assert torch.allclose(single.unet.state_dict()[k], v, atol=1e-6), k


def test_merge_cli_and_bad_inputs(lora_dir, tiny_model_dir, tmp_path, capsys):
    assert parse_load("runs/a:b/lora:0.5") == ("runs/a:b/lora", 0.5)
    assert parse_load("runs/lora") == ("runs/lora", 1.0)
    out = tmp_path / "m"
    args = ["merge", "--model", str(tiny_model_dir), "--load", f"{lora_dir}:0.5", "--out", str(out)]
    assert main([*args, "--dtype", "fp16", "--single-file"]) == 0
    assert (out / "model_index.json").is_file()
    with safe_open(str(out / "m.safetensors"), framework="pt") as f:
        assert f.get_tensor(next(k for k in f.keys() if "diffusion_model" in k)).dtype == (
            torch.float16
        )
    assert main(args) == 2  # --out is not empty: refused, not overwritten
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(ArtifactError, match="merge bakes LoRAs only"):
        merge(str(tiny_model_dir), [(str(tiny_model_dir), 1.0)], tmp_path / "x")


# ------------------------------------------------------------------------------ resize


def _deltas(path) -> dict[str, torch.Tensor]:
    lora = read_lora(path)
    return {kohya_name(k) if "." in k else k: v.delta() for k, v in lora.layers.items()}


def test_resize_to_full_rank_keeps_every_delta(lora_dir, tmp_path):
    original = _deltas(lora_dir / LORA_WEIGHTS)
    written, summary = resize_file(lora_dir, tmp_path / "full", rank=4)
    assert [p.name for p in written] == [LORA_WEIGHTS, KOHYA_WEIGHTS]
    assert summary.as_dict()["min_energy"] == pytest.approx(1.0)
    for path in written:  # ours and its kohya copy
        got = _deltas(path)
        assert got.keys() == original.keys()
        for k in original:
            torch.testing.assert_close(got[k], original[k], atol=1e-6, rtol=1e-5)


def test_resize_lower_rank_keeps_the_energy_it_reports(lora_dir, tmp_path):
    original = read_lora(lora_dir / LORA_WEIGHTS)
    written, summary = resize_file(lora_dir, tmp_path / "r2", rank=2)
    assert set(summary.ranks) == {2}
    assert summary.bytes_after < 0.7 * summary.bytes_before
    resized = read_lora(written[0])
    for (key, layer), kept in zip(original.layers.items(), summary.energies):
        s = torch.linalg.svdvals(layer.delta())
        assert kept == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-6)
        # The best rank-2 approximation: the error is exactly what the dropped values hold.
        err = torch.linalg.matrix_norm(resized.layers[key].delta() - layer.delta()) ** 2
        assert float(err) == pytest.approx(float((s[2:] ** 2).sum()), rel=1e-4, abs=1e-10)
    _, by_energy = resize_file(lora_dir, tmp_path / "e", energy=0.9)
    for layer, rank, kept in zip(original.layers.values(), by_energy.ranks, by_energy.energies):
        s2 = torch.linalg.svdvals(layer.delta()) ** 2
        assert kept >= 0.9
        assert rank == 1 or float(s2[: rank - 1].sum() / s2.sum()) < 0.9  # the smallest


def test_resized_files_load_with_stock_diffusers(lora_dir, tiny_model_dir, base_images, tmp_path):
    n_layers = len(read_lora(lora_dir / LORA_WEIGHTS).layers)
    ours, _ = resize_file(lora_dir, tmp_path / "ours", rank=2)
    kohya, _ = resize_file(lora_dir / KOHYA_WEIGHTS, tmp_path, rank=2)  # into a folder
    assert kohya[0] == tmp_path / KOHYA_WEIGHTS
    with (
        safe_open(str(kohya[0]), framework="pt") as f,
        safe_open(str(lora_dir / KOHYA_WEIGHTS), framework="pt") as g,
    ):
        assert set(f.keys()) == set(g.keys())  # kohya in, the same kohya names out
    for file in (*ours, kohya[0]):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        assert _lora_modules(pipe) == n_layers, file
        assert np.abs(_images(pipe) - base_images).max() > 0.05


def test_resize_cli_prints_the_summary_and_refuses_bad_targets(lora_dir, tmp_path, capsys):
    assert main(["lora", "resize", str(lora_dir), "--energy", "0.95", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layers, rank mean" in out and "energy kept mean" in out
    assert main(["lora", "resize", str(lora_dir), "--rank", "0", "--out", str(tmp_path)]) == 2
    assert "--rank must be >= 1" in capsys.readouterr().err


def test_kohya_names_follow_the_clients_layout():
    assert kohya_name("text_encoder.encoder.layers.3.mlp.fc1") == (
        "lora_te_text_model_encoder_layers_3_mlp_fc1"
    )
    assert kohya_name("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0") == (
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"
    )


def test_kohya_alpha_is_read_and_written_as_scale(tmp_path):
    layer = LoraLayer(torch.randn(4, 6), torch.randn(5, 4), alpha=1.0)  # scale 1/4
    path = write_kohya({"lora_unet_x": layer}, tmp_path / "k.safetensors")
    back = read_lora(path).layers["lora_unet_x"]
    assert back.alpha == back.rank == 4  # written with scale 1, the scale in the weights
    torch.testing.assert_close(back.delta(), layer.delta())


# ------------------------------------------------------------------------------ extract


@pytest.fixture(scope="module")
def tuned_dir(tiny_model_dir, tmp_path_factory):
    """A DreamBooth-like fine-tune: attention, resnet convs, the time embedding and one
    text-encoder layer changed; plus a bias, which a LoRA cannot carry."""
    pipe = load_pipeline(str(tiny_model_dir))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and (
                "attn" in name or "resnets.0.conv" in name or "time_embedding" in name
            ):
                module.weight += torch.randn(module.weight.shape, generator=g) * 0.02
        for name, module in pipe.text_encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and "layers.0." in name:
                module.weight += torch.randn(module.weight.shape, generator=g) * 0.02
        pipe.unet.conv_in.bias += 0.01
    out = tmp_path_factory.mktemp("tuned") / "tuned"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _linear_and_conv_weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{c}.{name}": m.weight.detach()
        for c in ("unet", "text_encoder")
        for name, m in getattr(pipe, c).named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    }


def test_extract_at_full_rank_reproduces_the_tuned_weights(
    tiny_model_dir, tuned_dir, tmp_path, caplog
):
    written, summary = extract(
        str(tiny_model_dir), str(tuned_dir), tmp_path / "x", rank=10_000, all_layers=True
    )
    assert "unet.conv_in.bias" in caplog.text  # what the LoRA cannot carry is said
    assert summary.as_dict()["min_energy"] == pytest.approx(1.0)
    tuned = _linear_and_conv_weights(load_pipeline(str(tuned_dir)))
    base = _linear_and_conv_weights(load_pipeline(str(tiny_model_dir)))
    changed = [k for k in tuned if not torch.equal(tuned[k], base[k])]
    assert len(read_lora(written[0]).layers) == len(changed)  # unchanged layers skipped
    for file in written:  # ours and the kohya copy, each merged into the base
        merged = _linear_and_conv_weights(
            load_pipeline(str(merge(str(tiny_model_dir), [(str(file), 1.0)], tmp_path / file.stem)))
        )
        for k in tuned:
            torch.testing.assert_close(merged[k], tuned[k], atol=1e-5, rtol=0, msg=k)


def test_extract_by_energy_and_stock_loading(
    tiny_model_dir, tuned_dir, base_images, tmp_path, caplog
):
    written, summary = extract(str(tiny_model_dir), str(tuned_dir), tmp_path / "e", energy=0.6)
    assert min(summary.energies) >= 0.6
    assert "unet.time_embedding.linear_1.weight" in caplog.text  # outside the blocks: said
    assert not any("time_embedding" in k for k in read_lora(written[0]).layers)
    assert summary.as_dict()["mean_rank"] < 16
    n_layers = len(read_lora(written[0]).layers)
    for file in written:
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        assert _lora_modules(pipe) == n_layers, file
        assert np.abs(_images(pipe) - base_images).max() > 0.01


def test_extract_from_the_base_itself_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    args = ["lora", "extract", "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir)]
    assert main([*args, "--rank", "4", "--out", str(tmp_path / "x")]) == 2
    assert "nothing to extract" in capsys.readouterr().err


def test_randomized_svd_of_big_layers_matches_the_full_one():
    from personalize.tools.lora_layers import factor

    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(300, 60, generator=g))[0]
    v = torch.linalg.qr(torch.randn(900, 60, generator=g))[0]
    delta = (u * torch.exp(-torch.arange(60.0) / 6)) @ v.T  # a decaying spectrum, like training
    s2 = torch.linalg.svdvals(delta.double()) ** 2
    for rank, energy in ((8, None), (None, 0.95)):  # both take the randomized path (8 < 300/4)
        layer, kept = factor(delta, (900,), (), rank, energy)
        k = layer.rank
        assert kept == pytest.approx(float(s2[:k].sum() / s2.sum()), rel=1e-4)
        err = torch.linalg.matrix_norm(layer.delta() - delta.double()) ** 2
        assert float(err) == pytest.approx(float(s2[k:].sum()), rel=1e-2)
        if energy:
            assert k == int((torch.cumsum(s2, 0) / s2.sum() < energy).sum()) + 1
    again, _ = factor(delta, (900,), (), 8, None)
    assert torch.equal(again.down, factor(delta, (900,), (), 8, None)[0].down)  # seeded
