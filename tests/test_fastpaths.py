"""Fast paths of the loop: the device-side NaN guard (fused AdamW) and the host-side one,
switches that must work or fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_config

from personalize.config import ConfigError, from_dict
from personalize.training.fastpaths import FastPathError
from personalize.training.loop import Trainer, TrainingError


def _nan_at(trainer, bad_steps):
    original = trainer.compute_loss

    def compute_loss(batch):
        loss = original(batch)
        if trainer.global_step in bad_steps:
            return loss * float("nan")
        return loss

    return compute_loss


@pytest.mark.parametrize("fused", [True, False])
def test_a_streak_of_nan_steps_stops_the_run(
    tiny_model_dir, instance_dir, tmp_path, fused, monkeypatch
):
    # log_every 10: with the fused optimizer the host reads the guard every 3 steps only.
    cfg = from_dict(
        base_config(
            tiny_model_dir,
            instance_dir,
            tmp_path / "run",
            train={
                "max_steps": 20,
                "max_nonfinite_steps": 3,
                "log_every": 10,
                "fused_optimizer": fused,
            },
        )
    )
    trainer = Trainer(cfg)
    assert bool(trainer.optimizer.optimizer.defaults.get("fused")) == fused
    before = {k: v.clone() for k, v in trainer.method.trainable_state_dict(trainer.parts).items()}
    monkeypatch.setattr(trainer, "compute_loss", _nan_at(trainer, set(range(100))))
    with pytest.raises(TrainingError, match="non-finite for 3 steps in a row at step 3"):
        trainer.run()
    after = trainer.method.trainable_state_dict(trainer.parts)
    for k in before:  # skipped steps never touched the weights
        assert torch.equal(before[k], after[k]), k
    state = trainer.optimizer.optimizer.state
    assert all(int(s["step"]) == 0 for s in state.values())  # nor the optimizer's state


@pytest.mark.parametrize("fused", [True, False])
def test_a_single_nan_step_is_skipped_and_training_goes_on(
    tiny_model_dir, instance_dir, tmp_path, fused, monkeypatch
):
    out = tmp_path / "run"
    cfg = from_dict(
        base_config(
            tiny_model_dir,
            instance_dir,
            out,
            train={"max_steps": 4, "log_every": 3, "fused_optimizer": fused},
        )
    )
    trainer = Trainer(cfg)
    monkeypatch.setattr(trainer, "compute_loss", _nan_at(trainer, {1}))  # the second step
    trainer.run()
    assert trainer.global_step == 4
    for value in trainer.method.trainable_state_dict(trainer.parts).values():
        assert torch.isfinite(value).all()
    state = trainer.optimizer.optimizer.state
    assert all(int(s["step"]) == 3 for s in state.values())  # 4 steps, 1 skipped
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == [1, 3, 4] and by_step[3]["skipped_steps"] == 1
    # The logged loss averages the finite steps of the interval, so it stays a number.
    assert all(r["loss"] == r["loss"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steady_it_per_s"] > 0 and summary["peak_memory_bytes"] > 0


def test_switches_run_together(tiny_model_dir, instance_dir, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    compiled = []
    monkeypatch.setattr(UNet2DConditionModel, "compile", lambda self: compiled.append(self))
    out = tmp_path / "run"
    trainer = Trainer(
        from_dict(
            base_config(
                tiny_model_dir,
                instance_dir,
                out,
                train={
                    "max_steps": 2,
                    "channels_last": True,
                    "compile_unet": True,
                    "gradient_checkpointing": True,
                    "allow_tf32": False,
                },
                data={"num_workers": 1, "pin_memory": True},
            )
        )
    )
    assert compiled == [trainer.parts.unet]
    conv = trainer.parts.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    trainer.run()
    assert (out / "summary.json").is_file()


def test_unavailable_or_unknown_fast_paths_fail_clearly(tiny_model_dir, instance_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.attention"):
        from_dict(
            base_config(tiny_model_dir, instance_dir, tmp_path / "a", train={"attention": "flash"})
        )
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(FastPathError, match="attention=sdpa"):
            Trainer(
                from_dict(
                    base_config(
                        tiny_model_dir,
                        instance_dir,
                        tmp_path / "b",
                        train={"attention": "xformers"},
                    )
                )
            )
