"""Optional optimizers: Prodigy, schedule-free AdamW, Adafactor (and 8-bit AdamW's check).

Each one present trains, and resumes from a checkpoint to bit-identical weights; a missing
package is one line naming it, before the model loads."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import base_config
from safetensors.torch import load_file

from personalize import train
from personalize.config import ConfigError, from_dict
from personalize.methods.lora import LORA_WEIGHTS
from personalize.training import checkpoint as ckpt
from personalize.training.loop import Trainer

# (train.optimizer, module it needs, class name, lr that trains the tiny LoRA)
OPTIMIZERS = [
    ("prodigy", "prodigyopt", "Prodigy", 1.0),
    ("adamw_schedulefree", "schedulefree", "AdamWScheduleFree", 1e-3),
    ("adafactor", "transformers", "Adafactor", 1e-3),
]


@pytest.mark.parametrize("name,module,cls,lr", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_resume_is_bit_identical(name, module, cls, lr, tiny_model_dir, instance_dir, tmp_path):
    pytest.importorskip(module)
    common = dict(
        train={"max_steps": 6, "checkpoint_every": 3, "batch_size": 2, "optimizer": name, "lr": lr}
    )
    straight = train(from_dict(base_config(tiny_model_dir, instance_dir, tmp_path / "a", **common)))
    first = base_config(tiny_model_dir, instance_dir, tmp_path / "b", **common)
    first["train"] = dict(first["train"], max_steps=3)
    train(from_dict(first))
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "b")] == ["step-000003"]
    trainer = Trainer(
        from_dict(
            base_config(tiny_model_dir, instance_dir, tmp_path / "b", resume="latest", **common)
        )
    )
    assert type(trainer.optimizer.optimizer).__name__ == cls
    trainer.run()
    a, b = load_file(straight / LORA_WEIGHTS), load_file(tmp_path / "b" / LORA_WEIGHTS)
    assert a.keys() == b.keys()
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_schedule_free_saves_its_evaluation_weights(tiny_model_dir, instance_dir, tmp_path):
    pytest.importorskip("schedulefree")
    from peft.utils import get_peft_model_state_dict

    cfg = base_config(
        tiny_model_dir,
        instance_dir,
        tmp_path / "run",
        train={"max_steps": 4, "optimizer": "adamw_schedulefree"},
        validation={"loss_every_steps": 2},
        data={"validation_split": 0.25},
    )
    trainer = Trainer(from_dict(cfg))
    trainer.run()
    raw = trainer.optimizer.optimizer
    assert raw.param_groups[0]["train_mode"]  # back in training mode after every save
    saved = load_file(tmp_path / "run" / LORA_WEIGHTS)
    training = get_peft_model_state_dict(trainer.parts.unet)
    gap = max((saved[f"unet.{k}"] - v).abs().max() for k, v in training.items())
    assert gap > 1e-5  # the training weights (y) are not what was saved
    raw.eval()  # the averaged weights (x); eval/train round trips differ in the last bits
    for k, v in get_peft_model_state_dict(trainer.parts.unet).items():
        torch.testing.assert_close(saved[f"unet.{k}"], v, rtol=1e-5, atol=1e-7, msg=k)
    best = load_file(tmp_path / "run" / "best" / LORA_WEIGHTS)  # saved during validation
    assert best.keys() == saved.keys()


@pytest.mark.parametrize(
    "name,package",
    [
        ("prodigy", "prodigyopt"),
        ("adamw_schedulefree", "schedulefree"),
        ("adamw8bit", "bitsandbytes"),
        ("adafactor", "transformers"),
    ],
)
def test_missing_package_is_one_line_before_the_model_loads(
    name, package, tiny_model_dir, instance_dir, tmp_path, monkeypatch
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda mod, *a: None if mod == package else real(mod, *a),
    )

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the optimizer check")

    monkeypatch.setattr("personalize.training.loop.load_parts", no_model)
    with pytest.raises(ConfigError) as e:
        cfg = from_dict(
            base_config(tiny_model_dir, instance_dir, tmp_path / "run", train={"optimizer": name})
        )
        Trainer(cfg)
    assert str(e.value) == (
        f"train.optimizer: {name} needs {package}, which is not installed: pip install {package}"
    )


def test_unknown_optimizer_is_a_config_error(tiny_model_dir, instance_dir, tmp_path):
    cfg = base_config(tiny_model_dir, instance_dir, tmp_path, train={"optimizer": "lion"})
    with pytest.raises(ConfigError, match="prodigy .*adamw_schedulefree.*got 'lion'"):
        from_dict(cfg)
