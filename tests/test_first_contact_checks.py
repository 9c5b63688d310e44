"""First contact: nothing is ignored silently, and bad values are one-line errors that come
before the model loads (config checks) or from argparse (`personalize sample`)."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from conftest import base_config

from personalize.cli import main
from personalize.config import ConfigError, from_dict
from personalize.data import DataError, load_records
from personalize.testing import write_synthetic_images
from personalize.training.loop import Trainer

# ------------------------------------------------------------------ held-out images, loss, patience


def _cfg(**sections):
    return base_config("model", "data", "out", **sections)


@pytest.mark.parametrize(
    "sections, pattern",
    [
        (
            {"data": {"validation_path": "held_out"}},
            r"data\.validation_path=held_out holds out images .* validation\.loss_every_steps "
            r"is 0 .*data\.validation_path=null",
        ),
        (
            {"data": {"validation_split": 0.25}},
            r"data\.validation_split=0\.25 .* validation\.loss_every_steps .* "
            r"data\.validation_split=0$",
        ),
        (
            {"validation": {"loss_every_steps": 10}},
            r"validation\.loss_every_steps=10 needs held-out images: set data\.validation_split",
        ),
        (
            {"train": {"early_stopping_patience": 2}, "data": {"validation_split": 0.25}},
            r"train\.early_stopping_patience=2 needs the validation loss",
        ),
        (
            {"train": {"early_stopping_patience": 2}, "validation": {"loss_every_steps": 5}},
            r"train\.early_stopping_patience=2 needs the validation loss",
        ),
    ],
)
def test_held_out_loss_and_patience_only_work_together(sections, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(_cfg(**sections))


def test_held_out_with_loss_and_patience_is_fine():
    cfg = from_dict(
        _cfg(
            train={"early_stopping_patience": 2},
            data={"validation_split": 0.25},
            validation={"loss_every_steps": 5},
        )
    )
    assert cfg.train.early_stopping_patience == 2


def test_early_stopping_says_when_and_the_best_loss(tiny_model_dir, tmp_path, caplog):
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
    with caplog.at_level(logging.INFO, logger="personalize"):
        trainer.run()
    assert trainer.global_step < 40  # it did stop early
    best = json.loads((out / "best" / "best.json").read_text())
    lines = [r.getMessage() for r in caplog.records if "early stopping" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"early stopping at step {trainer.global_step}:" in lines[0]
    assert f"best validation loss {best['loss']:.6g} at step {best['step']}" in lines[0]


def test_batch_larger_than_the_dataset_warns(tiny_model_dir, instance_dir, tmp_path, caplog):
    cfg = from_dict(
        base_config(tiny_model_dir, instance_dir, tmp_path / "run", train={"batch_size": 6})
    )
    with caplog.at_level(logging.WARNING):
        Trainer(cfg)
    warned = [r.getMessage() for r in caplog.records if "train.batch_size=6" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert "4 training example(s) per epoch" in warned[0] and "data.repeats" in warned[0]


def test_batch_that_fits_does_not_warn(tiny_model_dir, instance_dir, tmp_path, caplog):
    cfg = from_dict(base_config(tiny_model_dir, instance_dir, tmp_path / "run"))
    with caplog.at_level(logging.WARNING):
        Trainer(cfg)
    assert not [r for r in caplog.records if "train.batch_size" in r.getMessage()]


# ----------------------------------------------------------------------------- the data folder


def test_folder_leftovers_one_line_each_kind(tmp_path, caplog):
    write_synthetic_images(tmp_path, count=2)  # img_000.png, img_001.png (no captions)
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    (tmp_path / names[0].replace(".png", ".TXT")).write_text("upper-case caption")
    for i in range(5):
        (tmp_path / f"IMG_{i}.heic").write_bytes(b"heic")
        (tmp_path / f"orphan{i}.txt").write_text("no image")
    with caplog.at_level(logging.WARNING):
        records = load_records(tmp_path)
    assert [r.caption for r in records] == ["upper-case caption", None]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    heic, orphans, case = lines
    assert heic.startswith("Ignored 5 file(s)") and "IMG_0.heic, IMG_1.heic, IMG_2.heic" in heic
    assert "and 2 more" in heic and ".png" in heic  # names the accepted extensions
    assert orphans.startswith("5 caption file(s)") and "orphan0.txt" in orphans
    assert case.startswith("1 caption file(s)") and names[0].replace(".png", ".TXT") in case


def test_a_class_image_folder_with_its_manifest_logs_no_warning(tmp_path, caplog):
    """Generated class images sit beside class_images.json (their prompt and model): reading
    the folder must not report our own manifest as an unsupported file."""
    write_synthetic_images(tmp_path, count=2)
    (tmp_path / "class_images.json").write_text('{"prompt": "a heart"}')
    with caplog.at_level(logging.WARNING):
        records = load_records(tmp_path)
    assert len(records) == 2
    assert not [r.getMessage() for r in caplog.records], caplog.records


def test_a_clean_folder_logs_no_warning(tmp_path, caplog):
    write_synthetic_images(tmp_path, count=2, caption="a caption")
    with caplog.at_level(logging.WARNING):
        records = load_records(tmp_path)
    assert [r.caption for r in records] == ["a caption", "a caption"]
    assert not caplog.records


def test_hints_name_the_dotted_keys_a_cli_user_types(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"data\.strict=false"):
        load_records(tmp_path, strict=True)
    folder = tmp_path / "meta"
    write_synthetic_images(folder, count=1)
    name = next(folder.glob("*.png")).name
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": name, "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r"Set data\.caption_column to the one"):
        load_records(folder)


# ------------------------------------------------------------- one-line errors, before the model


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr_scheduler=cosin", "did you mean 'cosine'? Valid: linear, cosine"),
        ("seed=-1", "seed: must be an integer in [0, 2**32), got -1"),
    ],
)
def test_cli_config_errors_are_one_line_before_the_model_loads(tmp_path, capsys, override, message):
    cfg = tmp_path / "cfg.yaml"
    # The model path does not exist: the config error must come first.
    cfg.write_text(yaml.safe_dump(base_config(tmp_path / "no-model", tmp_path, tmp_path / "run")))
    assert main(["train", str(cfg), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert "\n" not in err and "does not exist" not in err


def test_adamw8bit_without_bitsandbytes_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        from_dict(_cfg(train={"optimizer": "adamw8bit"}))


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--num-images", "0", "argument --num-images: must be a positive integer, got 0"),
        ("--steps", "0", "argument --steps: must be a positive integer, got 0"),
        ("--steps", "ten", "argument --steps: must be a positive integer, got 'ten'"),
        ("--resolution", "30", "argument --resolution: must be a positive multiple of 8, got 30"),
        ("--resolution", "0", "argument --resolution: must be a positive multiple of 8, got 0"),
        ("--resolution", "-64", "argument --resolution: must be a positive multiple of 8, got -64"),
    ],
)
def test_sample_rejects_bad_numbers_with_one_line(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--model", str(tmp_path), "--prompt", "x", f"{flag}={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(message), err  # usage line, then the one-line error
