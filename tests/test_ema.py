"""EMA of the trained weights (train.ema_decay): the math, what is validated and saved,
checkpoints and resume, every method's frozen weights, two processes, config errors."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import base_config
from helpers import ROOT, launch_two_processes
from safetensors.torch import load_file

from personalize.config import ConfigError, from_dict
from personalize.methods.lora import LORA_WEIGHTS
from personalize.models import load_parts
from personalize.training import checkpoint as ckpt
from personalize.training.ema import EMA_FILE, WeightEMA
from personalize.training.loop import Trainer, TrainingError

EMA = {"ema_decay": 0.6}
TI = {"placeholder_token": "<sks-disc>", "initializer_token": "o", "num_vectors": 2}


def _run(cfg: dict, parts=None) -> Trainer:
    trainer = Trainer(from_dict(cfg), parts=parts)
    trainer.run()
    return trainer


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file under `folder`, by relative path and key."""
    found = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            found[f"{f.relative_to(folder)}:{k}"] = v
    return found


def test_ema_follows_the_formula():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    # A weight that stopped training (DreamBooth's text encoder after its stop step) is
    # still averaged, not copied.
    stopped = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    ema = WeightEMA([p, stopped], decay=0.8)
    expected = None
    for step in range(1, 8):
        with torch.no_grad():
            p.add_(torch.randn(5))  # an "optimizer step"
            stopped.add_(torch.randn(3))
        ema.update()
        # diffusers' schedule: 0 at the first update, then min(decay, (1+s)/(10+s)).
        s = step - 1
        d = 0.0 if s == 0 else min(0.8, (1 + s) / (10 + s))
        now = [p.detach().clone(), stopped.detach().clone()]
        expected = now if expected is None else [d * e + (1 - d) * w for e, w in zip(expected, now)]
        for got, want in zip(ema.shadow, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert ema.step_count == 7
    assert not torch.equal(ema.shadow[0], p.detach())
    raw = p.detach().clone()
    with ema.applied():
        assert torch.equal(p.detach(), ema.shadow[0])
        with ema.applied():  # nesting is a no-op
            pass
        assert torch.equal(p.detach(), ema.shadow[0])
    assert torch.equal(p.detach(), raw)  # the raw weights back, bit for bit


def test_ema_warmup_follows_its_power():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = WeightEMA([p], decay=0.99, warmup=True, power=0.5)
    for _ in range(4):
        ema.update()
    assert ema.ema.cur_decay_value == pytest.approx(1 - (1 + 3) ** -0.5)


def test_lora_artifact_is_the_ema_and_base_weights_are_untouched(
    tiny_model_dir, instance_dir, tmp_path
):
    parts = load_parts(str(tiny_model_dir))
    base = {n: p.detach().clone() for n, p in parts.unet.named_parameters()}
    out = tmp_path / "run"
    trainer = _run(base_config(tiny_model_dir, instance_dir, out, train=EMA), parts=parts)
    saved = load_file(out / LORA_WEIGHTS)
    with trainer.ema.applied():
        trainer.method.save(tmp_path / "ema", trainer.parts, trainer.global_step)
    trainer.method.save(tmp_path / "raw", trainer.parts, trainer.global_step)
    ema, raw = (
        load_file(tmp_path / "ema" / LORA_WEIGHTS),
        load_file(tmp_path / "raw" / LORA_WEIGHTS),
    )
    assert saved.keys() == ema.keys()
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)  # the EMA is not the raw
    # The EMA holds the LoRA's weights only; the base UNet's are bit-identical.
    assert len(trainer.ema.shadow) == len(trainer.trainable)
    checked = 0
    for name, p in trainer.parts.unet.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p.detach(), base[name.replace(".base_layer", "")]), name
            checked += 1
    assert checked == len(base)


def test_validation_and_samples_use_the_ema(tiny_model_dir, instance_dir, tmp_path, monkeypatch):
    import personalize.training.loop as loop

    cfg = base_config(
        tiny_model_dir,
        instance_dir,
        tmp_path / "run",
        train=dict(EMA, max_steps=4),
        data={"validation_split": 0.25},
        validation={
            "loss_every_steps": 2,
            "loss_timesteps": [500],
            "every_steps": 4,
            "prompts": ["a photo of sks disc"],
            "num_images": 1,
            "num_inference_steps": 2,
        },
    )
    trainer = Trainer(from_dict(cfg))
    seen = []

    def weights_are_the_ema(what):
        params = [p.detach() for p in trainer.trainable]
        seen.append((what, all(torch.equal(p, s) for p, s in zip(params, trainer.ema.shadow))))

    compute = trainer.validation_loss.compute

    def spy_compute(*args, **kwargs):
        weights_are_the_ema("loss")
        return compute(*args, **kwargs)

    samples = loop.save_validation_samples

    def spy_samples(*args, **kwargs):
        weights_are_the_ema("samples")
        return samples(*args, **kwargs)

    trainer.validation_loss.compute = spy_compute
    monkeypatch.setattr(loop, "save_validation_samples", spy_samples)
    trainer.run()
    assert seen == [("loss", True), ("loss", True), ("samples", True)]
    # ... and training went on with the raw weights, which differ from the EMA.
    raw = [p.detach() for p in trainer.trainable]
    assert any(not torch.equal(p, s) for p, s in zip(raw, trainer.ema.shadow))


def test_resume_with_ema_is_bit_identical(tiny_model_dir, instance_dir, tmp_path):
    common = dict(
        train=dict(EMA, max_steps=6, checkpoint_every=3, batch_size=2),
        lora={"dropout": 0.1},
        data={"random_flip": True},
    )
    straight = _run(base_config(tiny_model_dir, instance_dir, tmp_path / "a", **common))
    first = base_config(tiny_model_dir, instance_dir, tmp_path / "b", **common)
    first["train"] = dict(first["train"], max_steps=3)
    _run(first)
    checkpoint = ckpt.complete_checkpoints(tmp_path / "b")[-1]
    assert (checkpoint / EMA_FILE).is_file()
    resumed = _run(
        base_config(tiny_model_dir, instance_dir, tmp_path / "b", resume="latest", **common)
    )
    assert resumed.ema.step_count == straight.ema.step_count == 6
    for a, b in zip(straight.ema.shadow, resumed.ema.shadow):
        assert torch.equal(a, b)
    for a, b in zip(straight.trainable, resumed.trainable):
        assert torch.equal(a.detach(), b.detach())
    a, b = load_file(tmp_path / "a" / LORA_WEIGHTS), load_file(tmp_path / "b" / LORA_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_checkpoint_without_ema_says_so(tiny_model_dir, instance_dir, tmp_path):
    cfg = base_config(
        tiny_model_dir,
        instance_dir,
        tmp_path / "run",
        train={"max_steps": 2, "checkpoint_every": 2},
    )
    _run(cfg)
    cfg = dict(cfg, resume="latest")
    cfg["train"] = dict(cfg["train"], max_steps=3, **EMA)
    with pytest.raises(TrainingError, match="ema_decay off"):
        _run(cfg)


def test_resuming_an_ema_checkpoint_without_ema_warns(
    tiny_model_dir, instance_dir, tmp_path, caplog
):
    cfg = base_config(
        tiny_model_dir,
        instance_dir,
        tmp_path / "run",
        train=dict(EMA, max_steps=2, checkpoint_every=2),
    )
    _run(cfg)
    cfg = dict(cfg, resume="latest")
    cfg["train"] = dict(cfg["train"], max_steps=3, ema_decay=None)
    with caplog.at_level("WARNING", logger="personalize"):
        _run(cfg)
    assert "holds an EMA of the weights, but train.ema_decay is off" in caplog.text


def test_textual_inversion_frozen_rows_stay_exact(tiny_model_dir, instance_dir, tmp_path):
    from personalize.adapters.embeddings import DIFFUSERS_FILE

    out = tmp_path / "run"
    cfg = base_config(
        tiny_model_dir,
        instance_dir,
        out,
        method="textual_inversion",
        ti=TI,
        train=dict(EMA, max_steps=3, lr=0.02, weight_decay=0.5),
    )
    trainer = _run(cfg)
    method = trainer.method
    (table,) = trainer.ema.shadow
    frozen = torch.ones(table.shape[0], dtype=torch.bool)
    frozen[method.ids] = False
    original = method.rows["text_encoder"]._original.to(table.device)
    assert torch.equal(table[frozen], original[frozen])  # bit for bit, after 3 EMA updates
    assert not torch.equal(table[method.ids], original[method.ids])  # the new rows learned
    saved = load_file(out / DIFFUSERS_FILE)["<sks-disc>"]
    assert torch.equal(saved, table[method.ids].float().cpu())


# The tiny model's attention widths (the hypernetwork's SD defaults do not fit it).
OTHER_METHODS = {"dreambooth": {}, "hypernetwork": {"hn": {"enable_sizes": [32, 64]}}}


@pytest.mark.parametrize("method", list(OTHER_METHODS))
def test_other_methods_save_their_ema(method, tiny_model_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(
        tiny_model_dir,
        instance_dir,
        out,
        method=method,
        train=dict(EMA, max_steps=2),
        **OTHER_METHODS[method],
    )
    trainer = _run(cfg)
    with trainer.ema.applied():
        trainer.method.save(tmp_path / "ema", trainer.parts, trainer.global_step)
    saved, ema = _tensors(out), _tensors(tmp_path / "ema")
    assert ema and all(torch.equal(saved[k], ema[k]) for k in ema)
    raw = trainer.method.trainable_state_dict(trainer.parts)
    with trainer.ema.applied():
        averaged = trainer.method.trainable_state_dict(trainer.parts)
        averaged = {k: v.clone() for k, v in averaged.items()}
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)


def test_two_process_run_with_ema(tiny_model_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            base_config(
                tiny_model_dir,
                instance_dir,
                out,
                train=dict(EMA, max_steps=2, checkpoint_every=2),
            )
        )
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        launch_two_processes("personalize", "train", str(cfg_path)),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = ckpt.complete_checkpoints(out)[-1]
    # One EMA file, the main process's, and it is what the artifact holds.
    assert (checkpoint / EMA_FILE).is_file()
    ema = load_file(checkpoint / EMA_FILE)
    raw = load_file(checkpoint / ckpt.TRAINABLE_FILE)
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    assert load_file(out / LORA_WEIGHTS)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_bad_decay_is_one_line(decay):
    with pytest.raises(ConfigError, match=r"train\.ema_decay: must be in \(0, 1\)"):
        from_dict({"train": {"ema_decay": decay}})
    for off in (None, 0, 0.0):
        assert not from_dict({"train": {"ema_decay": off}}).train.ema_decay
    with pytest.raises(ConfigError, match=r"train\.ema_power"):
        from_dict({"train": {"ema_power": 0}})


@pytest.mark.parametrize("method", ["dreambooth", "lora"])
def test_benchmark_ema_variants_are_the_recommended_recipes_with_ema(method, tmp_path):
    from personalize.toyworld import base_model_path
    from personalize.toyworld.subjects import get_subject
    from personalize.toyworld.variants import variant_config

    subject = get_subject("striped_heart")
    cfgs = [
        variant_config(v, subject, base_model_path(), tmp_path / "d", tmp_path / "o")
        for v in (f"{method}_recommended", f"{method}_recommended_ema")
    ]
    plain, ema = (from_dict(c) for c in cfgs)
    assert ema.train.ema_decay == 0.99 and not plain.train.ema_decay
    cfgs[1]["train"].pop("ema_decay")
    assert cfgs[0] == cfgs[1]
