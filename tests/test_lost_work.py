"""First contact: no lost work. A new run never resumes, prunes or overwrites into another
run's files, never writes into its base model, never trains on its own outputs, never reuses
class images made for another class, and Ctrl-C during class generation keeps what was made."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import base_config
from helpers import ROOT

from personalize import train
from personalize.config import ConfigError, from_dict
from personalize.data import DataError
from personalize.signals import TrainingInterrupted
from personalize.testing import save_tiny_pipeline, write_synthetic_images
from personalize.training import checkpoint as ckpt
from personalize.training import loop
from personalize.training.loop import Trainer

LORA_FILE = "pytorch_lora_weights.safetensors"


def _ctrl_c_during_step(monkeypatch, step: int) -> None:
    """A real SIGINT to this process while step `step` runs: the handler training installs
    sees it, so the loop saves a checkpoint at that step and stops."""
    original = Trainer.compute_loss

    def compute_loss(self, batch):
        if self.global_step + 1 == step:
            signal.raise_signal(signal.SIGINT)
        return original(self, batch)

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)


def _summary_step(out: Path) -> int:
    return json.loads((out / "summary.json").read_text())["step"]


# ------------------------------------------------------------------- 1. overwrite + Ctrl-C


def test_overwrite_moves_the_old_run_aside_and_resume_continues_the_new_one(
    tiny_model_dir, instance_dir, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "run"
    keep_one = {"checkpoint_every": 2, "checkpoints_total_limit": 1}
    train(
        from_dict(
            base_config(tiny_model_dir, instance_dir, out, train={"max_steps": 6, **keep_one})
        )
    )
    old_artifact = (out / LORA_FILE).read_bytes()

    _ctrl_c_during_step(monkeypatch, 2)
    new = base_config(
        tiny_model_dir,
        instance_dir,
        out,
        overwrite=True,
        train={"max_steps": 100, "checkpoint_every": 50, "checkpoints_total_limit": 1},
    )
    with caplog.at_level(logging.INFO), pytest.raises(TrainingInterrupted):
        train(from_dict(new))
    monkeypatch.undo()
    # The checkpoint the signal saved survives; the old run's step 6 is not in this run.
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-000002"]
    assert not (out / LORA_FILE).exists() and not (out / "summary.json").exists()
    # Nothing is lost: the old run sits, whole, in one dated folder beside it.
    (aside,) = tmp_path.glob("run.replaced-*")
    assert [p.name for p in ckpt.complete_checkpoints(aside)] == ["step-000006"]
    assert (aside / LORA_FILE).read_bytes() == old_artifact
    assert f"moved the previous run in {out} to {aside}" in caplog.text

    resumed = Trainer(
        from_dict(
            dict(new, overwrite=False, resume="latest", train={**new["train"], "max_steps": 3})
        )
    )
    assert ckpt.read_state(resumed.resume_path)["step"] == 2
    resumed.run()
    assert _summary_step(out) == 3
    assert (out / LORA_FILE).read_bytes() != old_artifact


def test_pruning_never_deletes_the_checkpoint_a_signal_just_saved(
    tiny_model_dir, instance_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    every_two = {"checkpoint_every": 2, "checkpoints_total_limit": 2}
    train(
        from_dict(
            base_config(tiny_model_dir, instance_dir, out, train={"max_steps": 6, **every_two})
        )
    )
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-000004", "step-000006"]
    # Go back to step 4 on purpose, then Ctrl-C at step 5 with a limit of one checkpoint.
    _ctrl_c_during_step(monkeypatch, 5)
    back = base_config(
        tiny_model_dir,
        instance_dir,
        out,
        resume=str(ckpt.checkpoint_root(out) / "step-000004"),
        train={"max_steps": 100, "checkpoint_every": 50, "checkpoints_total_limit": 1},
    )
    with pytest.raises(TrainingInterrupted, match="at step 5"):
        train(from_dict(back))
    # Step 6 belongs to the future this run replaced; `latest` is what the signal saved.
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-000005"]
    assert ckpt.read_state(ckpt.resolve_resume(out, "latest"))["step"] == 5


# ------------------------------------------------------------------- 2. output in model.path


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_dir_in_the_model_folder_is_refused_before_loading(
    where, tiny_model_dir, instance_dir, tmp_path, monkeypatch
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = sorted(p.relative_to(model).as_posix() for p in model.rglob("*"))
    out = model if where == "same" else model / "runs" / "db"

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output_dir was checked")

    monkeypatch.setattr(loop, "load_parts", no_loading)
    cfg = base_config(model, instance_dir, out, method="dreambooth", overwrite=True)
    with pytest.raises(ConfigError, match=r"output_dir .* is inside model\.path"):
        train(from_dict(cfg))
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*")) == before


# ------------------------------------------------------------------- 3. our outputs as data


def test_training_data_skips_our_own_outputs(tiny_model_dir, tmp_path, caplog):
    data = tmp_path / "data"
    write_synthetic_images(data, count=4)
    out = data / "run"
    write_synthetic_images(out / "samples", count=2)  # this run's folder, inside the data
    earlier = data / "earlier-run"  # another run's folder: it holds our run.json
    write_synthetic_images(earlier / "samples", count=3)
    (earlier / "run.json").write_text('{"config": {}}')
    cfg = base_config(tiny_model_dir, data, out, train={"max_steps": 1})
    with caplog.at_level(logging.INFO):
        trainer = Trainer(from_dict(cfg))
    assert sorted(r.key for r in trainer.train_dataset.records) == [
        f"subject_{i:02d}.png" for i in range(4)
    ]
    assert "Skipped 5 images under our own run folders" in caplog.text


# ------------------------------------------------------------------- 4. class images' prompt


def _prior(model: Path, data: Path, out: Path, class_dir: Path, prompt: str) -> dict:
    return base_config(
        model,
        data,
        out,
        method="dreambooth",
        train={"max_steps": 1},
        db={
            "with_prior_preservation": True,
            "class_prompt": prompt,
            "class_data_dir": str(class_dir),
            "num_class_images": 2,
            "sample_batch_size": 2,
            "class_num_inference_steps": 1,
        },
    )


def test_class_images_made_for_another_prompt_or_model_are_refused(
    tiny_model_dir, instance_dir, tmp_path
):
    dogs = tmp_path / "class_dog"
    Trainer(
        from_dict(_prior(tiny_model_dir, instance_dir, tmp_path / "a", dogs, "a photo of a dog"))
    )
    assert len(list(dogs.glob("*.png"))) == 2
    with pytest.raises(DataError, match=r"generated for 'a photo of a dog'.*'a photo of a cat'"):
        Trainer(
            from_dict(
                _prior(tiny_model_dir, instance_dir, tmp_path / "b", dogs, "a photo of a cat")
            )
        )
    other = save_tiny_pipeline(tmp_path / "other-model", seed=1)
    with pytest.raises(DataError, match=r"generated with another model"):
        Trainer(from_dict(_prior(other, instance_dir, tmp_path / "c", dogs, "a photo of a dog")))
    # The same prompt and model (the folder moved or not) reuse them as they are.
    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_model_dir, moved)
    Trainer(from_dict(_prior(moved, instance_dir, tmp_path / "d", dogs, "a photo of a dog")))
    assert len(list(dogs.glob("*.png"))) == 2


def test_users_own_class_images_are_used_as_they_are(
    tiny_model_dir, instance_dir, tmp_path, caplog
):
    mine = tmp_path / "my_cats"
    write_synthetic_images(mine, count=2)
    with caplog.at_level(logging.INFO):
        trainer = Trainer(
            from_dict(
                _prior(tiny_model_dir, instance_dir, tmp_path / "a", mine, "a photo of a cat")
            )
        )
    assert len(trainer.train_dataset.records) == 4
    assert sorted(p.name for p in mine.iterdir()) == ["subject_00.png", "subject_01.png"]
    assert "no manifest: using them as your own class images" in caplog.text


# ------------------------------------------------------------------- 5. Ctrl-C in generation


def test_ctrl_c_during_class_generation_keeps_the_images_and_exits_130(
    tiny_model_dir, instance_dir, tmp_path
):
    out, classes = tmp_path / "run", tmp_path / "class"
    cfg = _prior(tiny_model_dir, instance_dir, out, classes, "a photo of a disc")
    cfg["db"].update(num_class_images=400, sample_batch_size=1, class_num_inference_steps=20)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "personalize", "train", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while len(list(classes.glob("*.png"))) < 2:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "class generation did not start in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    made = len(list(classes.glob("*.png")))
    assert 2 <= made < 400
    assert f"stopped by SIGINT during class-image generation; {made} of 400 class images" in err
    assert "Continue with resume=latest" in err
    assert not [p for p in classes.iterdir() if p.name.startswith(".") and "tmp" in p.name]
    # The rerun the message asks for keeps them and goes on (here: asking for what exists).
    cfg["db"]["num_class_images"] = made
    trainer = Trainer(from_dict(dict(cfg, resume="latest")))
    assert len(list(classes.glob("*.png"))) == made
    trainer.run()
    assert _summary_step(out) == 1


# ------------------------------------------------------------------- 6. a run that saved nothing


def test_folder_of_a_run_that_saved_nothing_is_not_protected(
    tiny_model_dir, instance_dir, tmp_path, caplog
):
    out = tmp_path / "run"
    (out / "cache").mkdir(parents=True)
    (out / "run.json").write_text('{"config": {}}')
    (out / "train_log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # crashed before step 2
    with caplog.at_level(logging.INFO):
        train(from_dict(base_config(tiny_model_dir, instance_dir, out, train={"max_steps": 2})))
    assert "holds no checkpoint and no artifact" in caplog.text
    steps = [
        json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2]  # the crashed run's row is gone, not mixed into this run's log
    # A folder with a checkpoint or an artifact is still protected.
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(from_dict(base_config(tiny_model_dir, instance_dir, out, train={"max_steps": 2})))
