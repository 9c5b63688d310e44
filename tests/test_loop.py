"""The shared loop: resume, multi-process, validation/early stopping, guards, config errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import base_config
from helpers import ROOT, launch_two_processes
from safetensors.torch import load_file

from personalize import train
from personalize.config import ConfigError, from_dict, load_config
from personalize.methods.lora import LORA_WEIGHTS
from personalize.training import checkpoint as ckpt
from personalize.training.loop import Trainer, TrainingError


def _lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / LORA_WEIGHTS)


def test_resume_gives_the_same_weights_as_a_straight_run(tiny_model_dir, instance_dir, tmp_path):
    common = dict(
        train={"max_steps": 10, "checkpoint_every": 5, "batch_size": 3},
        lora={"dropout": 0.1},
        data={"random_flip": True},
    )
    straight = train(from_dict(base_config(tiny_model_dir, instance_dir, tmp_path / "a", **common)))
    # The interrupted run: stop after 5 steps (a checkpoint is written there), then resume.
    first = base_config(tiny_model_dir, instance_dir, tmp_path / "b", **common)
    first["train"] = dict(first["train"], max_steps=5, checkpoint_every=5)
    train(from_dict(first))
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "b")] == ["step-000005"]
    resumed_cfg = base_config(
        tiny_model_dir, instance_dir, tmp_path / "b", resume="latest", **common
    )
    trainer = Trainer(from_dict(resumed_cfg))
    trainer.run()
    assert trainer.global_step == 10
    a, b = _lora(straight), _lora(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoints_are_pruned_and_half_written_ones_ignored(
    tiny_model_dir, instance_dir, tmp_path
):
    out = tmp_path / "run"
    train(
        from_dict(
            base_config(
                tiny_model_dir,
                instance_dir,
                out,
                train={"max_steps": 6, "checkpoint_every": 2, "checkpoints_total_limit": 2},
            )
        )
    )
    names = [p.name for p in ckpt.complete_checkpoints(out)]
    assert names == ["step-000004", "step-000006"]
    # A checkpoint folder without state.json (killed mid-save) is never "latest".
    (ckpt.checkpoint_root(out) / "step-000099").mkdir()
    assert ckpt.resolve_resume(out, "latest").name == "step-000006"
    state = ckpt.read_state(ckpt.resolve_resume(out, "latest"))
    assert state["step"] == 6


def test_refuses_to_overwrite_another_run(tiny_model_dir, instance_dir, tmp_path):
    cfg = base_config(tiny_model_dir, instance_dir, tmp_path / "run", train={"max_steps": 1})
    train(from_dict(cfg))
    with pytest.raises(FileExistsError, match="resume=latest"):
        train(from_dict(cfg))
    train(from_dict(dict(cfg, overwrite=True)))


def test_validation_loss_early_stopping_keeps_best(tiny_model_dir, tmp_path):
    from personalize.testing import write_synthetic_images

    data = tmp_path / "data"
    write_synthetic_images(data, count=6)
    out = tmp_path / "run"
    cfg = base_config(
        tiny_model_dir,
        data,
        out,
        train={"max_steps": 40, "lr": 0.5, "early_stopping_patience": 2},
        data={"validation_split": 0.34},
        validation={"loss_every_steps": 1, "loss_timesteps": [200, 600]},
    )
    trainer = Trainer(from_dict(cfg))
    trainer.run()
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    # Stopped early, at patience 2 after the best evaluation.
    assert trainer.global_step < 40
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["loss"] == min(vals)
    assert best["step"] == trainer.global_step - 2
    assert (out / "best" / LORA_WEIGHTS).is_file()


def test_validation_loss_is_deterministic(tiny_model_dir, tmp_path):
    from personalize.testing import write_synthetic_images
    from personalize.training.validation import ValidationLoss

    data = tmp_path / "data"
    write_synthetic_images(data, count=4)
    cfg = from_dict(
        base_config(
            tiny_model_dir,
            data,
            tmp_path / "run",
            data={"validation_split": 0.5},
            validation={"loss_every_steps": 100},
        )
    )
    trainer = Trainer(cfg)
    vl = ValidationLoss(trainer.val_dataset, [100, 500], seed=0)
    inputs = (trainer.unet, trainer.conditioning, trainer.parts.noise_scheduler)
    assert vl.compute(*inputs) == vl.compute(*inputs)


def test_validation_samples_are_written(tiny_model_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    train(
        from_dict(
            base_config(
                tiny_model_dir,
                instance_dir,
                out,
                train={"max_steps": 2},
                validation={
                    "prompts": ["a photo of sks disc"],
                    "every_steps": 2,
                    "num_inference_steps": 2,
                },
            )
        )
    )
    assert (out / "samples" / "step-000002.png").is_file()


def test_nan_loss_stops_cleanly(tiny_model_dir, instance_dir, tmp_path, monkeypatch):
    cfg = from_dict(
        base_config(
            tiny_model_dir,
            instance_dir,
            tmp_path / "run",
            train={"max_steps": 20, "max_nonfinite_steps": 3},
        )
    )
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.method.trainable_state_dict(trainer.parts).items()}
    monkeypatch.setattr(
        trainer,
        "compute_loss",
        lambda batch: (
            torch.tensor(float("nan"), requires_grad=True) * sum(p.sum() for p in trainer.trainable)
        ),
    )
    with pytest.raises(TrainingError, match="non-finite for 3 steps"):
        trainer.run()
    after = trainer.method.trainable_state_dict(trainer.parts)
    for k in before:  # skipped steps never touched the weights
        assert torch.equal(before[k], after[k])


def test_min_snr_v_prediction_and_noise_offset_run(tiny_model_dir, instance_dir, tmp_path):
    out = train(
        from_dict(
            base_config(
                tiny_model_dir,
                instance_dir,
                tmp_path / "run",
                model={"prediction_type": "v_prediction"},
                train={
                    "max_steps": 2,
                    "snr_gamma": 5.0,
                    "noise_offset": 0.05,
                    "gradient_accumulation_steps": 2,
                    "lr_scheduler": "cosine",
                    "lr_warmup_steps": 1,
                    "gradient_checkpointing": True,
                },
            )
        )
    )
    assert (out / LORA_WEIGHTS).is_file()


def test_two_process_cpu_run_saves_once(tiny_model_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            base_config(
                tiny_model_dir, instance_dir, out, train={"max_steps": 4, "checkpoint_every": 2}
            )
        )
    )
    # The literal user command. accelerate's simple launcher starts one process on CPU;
    # our CLI recognizes that and starts the 2 gloo ranks asked for (cli._cpu_ranks_to_start).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        launch_two_processes("personalize", "train", str(cfg_path)),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / LORA_WEIGHTS).is_file()
    # Both ranks finish (exit code 0 from the launcher), and the line is printed once.
    assert proc.stdout.count("artifact saved in") == 1
    assert "2 process(es)" in proc.stderr
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-000002", "step-000004"]
    cp = ckpt.complete_checkpoints(out)[-1]
    assert (cp / "random_states_0.pkl").is_file() and (cp / "random_states_1.pkl").is_file()
    assert ckpt.read_state(cp)["step"] == 4


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.max_stepz"):
        from_dict({"train": {"max_stepz": 3}})
    with pytest.raises(ConfigError, match=r"train\.lr: expected float"):
        from_dict({"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"train\.max_steps: must be > 0"):
        from_dict({"train": {"max_steps": 0}})
    with pytest.raises(ConfigError, match="method"):
        from_dict({"method": "magic"})
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n")
    cfg = load_config(path, ["train.lr=3e-4", "data.path=imgs", "validation.prompts=[a, b]"])
    assert cfg.train.lr == 3e-4 and cfg.data.path == "imgs"
    assert cfg.validation.prompts == ["a", "b"]
    with pytest.raises(ConfigError, match="key.subkey=value"):
        load_config(path, ["oops"])


def test_example_training_configs_parse():
    from personalize.config import METHODS

    paths = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if p.stem in METHODS]
    assert {p.stem for p in paths} >= {"lora"}
    for path in paths:
        assert load_config(path).method == path.stem, path


def test_bad_model_path_is_a_clear_error(instance_dir, tmp_path):
    from personalize.models import ModelLoadError

    (tmp_path / "notamodel").mkdir()
    for bad, msg in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "notamodel", "model_index.json"),
    ]:
        cfg = from_dict(base_config(bad, instance_dir, tmp_path / "run", overwrite=True))
        with pytest.raises(ModelLoadError, match=msg):
            train(cfg)


def test_trainer_refuses_when_nothing_trains(tiny_model_dir, instance_dir, tmp_path):
    from personalize.methods.base import Method

    class Nothing(Method):
        name = "nothing"

        def setup(self, parts):
            return [{"params": []}]

    cfg = from_dict(base_config(tiny_model_dir, instance_dir, tmp_path / "run"))
    with pytest.raises(TrainingError, match="nothing trainable"):
        Trainer(cfg, method=Nothing(cfg))


def test_long_captions_warn_that_they_are_truncated(tiny_model_dir, tmp_path, caplog):
    from personalize.testing import write_synthetic_images

    data = tmp_path / "data"
    paths = write_synthetic_images(data, count=2, caption="short caption")
    paths[0].with_suffix(".txt").write_text("a very long caption, " * 10)
    cfg = from_dict(base_config(tiny_model_dir, data, tmp_path / "run"))
    with caplog.at_level("WARNING"):
        Trainer(cfg)
    warned = [r.getMessage() for r in caplog.records if "truncated to 77" in r.getMessage()]
    assert len(warned) == 1 and paths[0].name in warned[0]


def test_mixed_precision_keeps_trainable_weights_exact(tiny_model_dir, instance_dir, tmp_path):
    from personalize.models import load_parts
    from personalize.training.accelerator import cast_for_training

    parts = load_parts(str(tiny_model_dir))
    for module in parts.modules().values():
        module.requires_grad_(False)
    block = parts.unet.down_blocks[0]
    block.requires_grad_(True)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    cast_for_training(parts, torch.bfloat16, torch.device("cpu"))
    for k, v in block.named_parameters():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k
    assert parts.unet.up_blocks[0].resnets[0].conv1.weight.dtype == torch.bfloat16
    assert parts.vae.encoder.conv_in.weight.dtype == torch.bfloat16
