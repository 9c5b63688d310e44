"""The command line: train, sample, and clear errors with exit code 2."""

from __future__ import annotations

import yaml
from conftest import base_config
from PIL import Image

from personalize.cli import main


def test_train_then_sample_with_the_artifact(tiny_model_dir, instance_dir, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tiny_model_dir, instance_dir, tmp_path / "run")))
    assert main(["train", str(cfg), "train.max_steps=2"]) == 0
    assert "artifact saved in" in capsys.readouterr().out
    out = tmp_path / "samples"
    code = main(
        [
            "sample",
            "--model",
            str(tiny_model_dir),
            "--load",
            str(tmp_path / "run"),
            "--prompt",
            "a photo of sks disc",
            "--prompt",
            "a dog",
            "--num-images",
            "2",
            "--steps",
            "2",
            "--resolution",
            "32",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    pngs = sorted(p.name for p in out.glob("prompt*.png"))
    assert pngs == [
        "prompt00_seed0.png",
        "prompt00_seed1.png",
        "prompt01_seed0.png",
        "prompt01_seed1.png",
    ]
    grid = Image.open(out / "grid.png")
    assert grid.width > 2 * 32 and grid.height >= 2 * 32


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  max_stepz: 3\n")
    assert main(["train", str(cfg)]) == 2
    assert "train.max_stepz" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    code = main(["sample", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path):
    from personalize.demo import run_demo

    summary = run_demo(method="lora", out=tmp_path / "demo", steps=3, seeds=(0,))
    assert summary["steps"] == 3
    assert summary["it_per_s"] > 0
    assert summary["mean_pixel_change_instance_prompt"] > 0
    assert (tmp_path / "demo" / "lora_before_after.png").is_file()
