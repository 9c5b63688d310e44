"""`personalize sample`: help with every default, PATH[:STRENGTH] per artifact, a progress bar."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from personalize.cli import build_parser, main, parse_load_spec


def _sample_help() -> tuple[str, argparse.ArgumentParser]:
    sub = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["sample"]
    return sub.format_help(), sub


def test_help_describes_every_option_with_its_default():
    text, parser = _sample_help()
    flat = " ".join(text.split())
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, action.dest
        if not action.required:
            assert "default" in action.help or action.default is not None, action.dest
    for shown in ("(default: 30)", "(default: 4)", "(default: 7.5)", "(default: 0)"):
        assert shown in flat, shown
    assert "(default: outputs/samples)" in flat and "PATH[:STRENGTH]" in flat
    assert "(default: None)" not in flat  # None defaults are said in words


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("run/lora", ("run/lora", None)),
        ("run/lora:0.7", ("run/lora", 0.7)),
        ("run/lora:-1", ("run/lora", -1.0)),
        ("run/lora:1e-1", ("run/lora", 0.1)),
        (r"C:\loras\style.safetensors", (r"C:\loras\style.safetensors", None)),
        (r"C:\loras\style.safetensors:0.5", (r"C:\loras\style.safetensors", 0.5)),
        ("hf:some/thing", ("hf:some/thing", None)),
        (":0.5", (":0.5", None)),
    ],
)
def test_load_spec_takes_only_a_trailing_number_as_strength(spec, expected):
    assert parse_load_spec(spec) == expected


def test_an_existing_path_with_a_colon_is_taken_whole(tmp_path):
    odd = tmp_path / "run:2"
    odd.mkdir()
    assert parse_load_spec(str(odd)) == (str(odd), None)


def test_non_finite_strength_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", "m", "--prompt", "p", "--load", "run:nan"])
    assert e.value.code == 2
    assert "strength must be a finite number" in capsys.readouterr().err


def _save_lora(model_dir, folder):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        safe_serialization=True,
    )
    return folder


def _sample(model_dir, out, *extra) -> np.ndarray:
    args = ["sample", "--model", str(model_dir), "--prompt", "a photo of sks disc"]
    args += ["--num-images", "1", "--steps", "2", "--resolution", "32", "--out", str(out)]
    assert main([*args, *extra]) == 0
    return np.asarray(Image.open(out / "prompt00_seed0.png"), dtype=np.float32)


def test_per_artifact_strength_is_used(tiny_model_dir, tmp_path, capsys):
    torch.set_num_threads(1)
    lora = _save_lora(tiny_model_dir, tmp_path / "lora")
    base = _sample(tiny_model_dir, tmp_path / "base")
    zero = _sample(tiny_model_dir, tmp_path / "zero", "--load", f"{lora}:0")
    full = _sample(tiny_model_dir, tmp_path / "full", "--load", str(lora))
    half = _sample(tiny_model_dir, tmp_path / "half", "--load", f"{lora}:0.5")
    global_half = _sample(
        tiny_model_dir, tmp_path / "global", "--load", str(lora), "--strength", "0.5"
    )
    assert np.array_equal(zero, base)
    assert np.abs(full - base).mean() > 0.5
    assert np.abs(half - full).mean() > 0.1 and np.abs(half - base).mean() > 0.1
    assert np.array_equal(half, global_half)  # --strength is the default of each --load
    err = capsys.readouterr().err
    assert "sample: 100%" in err and "1/1" in err  # our bar over the images


def test_progress_bar_counts_images_over_prompts(tiny_model_dir, tmp_path, capsys):
    torch.set_num_threads(1)
    args = ["sample", "--model", str(tiny_model_dir), "--prompt", "a", "--prompt", "b"]
    args += ["--num-images", "2", "--steps", "1", "--resolution", "32"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    # tqdm redraws at most every 0.1 s, so intermediate counts may be skipped on a fast
    # machine; the final "4/4" shows the bar counts images over both prompts.
    assert "sample: 100%" in err and "4/4" in err
