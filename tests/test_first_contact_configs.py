"""First contact on a CPU: every shipped config trains as shipped, in one process and through
launch/cpu_2proc.sh; precision names mean what a user means by them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, free_port

from personalize.cli import main
from personalize.config import METHODS, ConfigError, load_config

SHIPPED = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.stem in METHODS)
ON_CPU = not torch.cuda.is_available()


def _overrides(config: Path, model: Path, data: Path, out: Path) -> list[str]:
    """Only what points a shipped config at this machine's files and makes it tiny: the
    precision, optimizer, scheduler and every other setting stay as shipped."""
    args = [
        f"model.path={model}",
        f"data.path={data}",
        f"output_dir={out}",
        "train.max_steps=2",
        "train.resolution=32",
    ]
    if config.stem == "dreambooth":
        args += [
            f"prior.class_data_dir={out.parent / 'class_images'}",
            "prior.num_class_images=2",
            "prior.generation_steps=2",
        ]
    if config.stem == "textual_inversion":
        args.append(
            "textual_inversion.initializer_token=null"
        )  # "cat" is 3 tokens in the tiny vocabulary
    if config.stem == "hypernetwork":
        args.append("hypernetwork.enable_sizes=[32, 64]")  # the tiny UNet's attention widths
    return args


def test_every_training_config_is_checked():
    assert {p.stem for p in SHIPPED} == set(METHODS)


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU fallback")
@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_trains_on_cpu_as_shipped(
    config, tiny_model_dir, instance_dir, tmp_path, capsys, caplog
):
    assert load_config(config).train.mixed_precision != "no"  # the case under test
    out = tmp_path / "run"
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        code = main(["train", str(config), *_overrides(config, tiny_model_dir, instance_dir, out)])
    seconds = time.perf_counter() - started
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "artifact saved in" in captured.out
    fallback = [r.getMessage() for r in caplog.records if "full precision (fp32)" in r.getMessage()]
    assert len(fallback) == 1, fallback  # exactly one warning line says what happened
    assert "no GPU" in fallback[0]
    print(f"{config.stem}: {seconds:.1f} s")


# Configs for one model family (configs/sdxl_*.yaml): trained on that family's tiny model.
SDXL_SHIPPED = sorted((ROOT / "configs").glob("sdxl_*.yaml"))


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU fallback")
@pytest.mark.parametrize("config", SDXL_SHIPPED, ids=lambda p: p.stem)
def test_shipped_sdxl_config_trains_on_cpu_as_shipped(
    config, tiny_sdxl_model_dir, instance_dir, tmp_path, capsys
):
    shipped = load_config(config)
    assert shipped.train.mixed_precision == "bf16" and shipped.train.resolution == 1024
    assert shipped.train.gradient_checkpointing and shipped.data.cache_text_embeddings
    out = tmp_path / "run"
    overrides = _overrides(config, tiny_sdxl_model_dir, instance_dir, out)
    code = main(["train", str(config), *overrides])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "artifact saved in" in captured.out


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU fallback")
@pytest.mark.parametrize("method", ["lora", "dreambooth", "sdxl_lora"])
def test_shipped_config_trains_through_cpu_2proc(method, request, instance_dir, tmp_path):
    config = ROOT / "configs" / f"{method}.yaml"
    sdxl = method.startswith("sdxl_")
    model = request.getfixturevalue("tiny_sdxl_model_dir" if sdxl else "tiny_model_dir")
    # SDXL: both text encoders train too, so each is wrapped for DDP beside the UNet.
    extra = ["lora.train_text_encoder=true"] if sdxl else []
    out = tmp_path / "run"
    # launch/cpu_2proc.sh runs `accelerate launch`: put this interpreter's bin first on PATH.
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
    )
    cmd = [
        "bash",
        str(ROOT / "launch" / "cpu_2proc.sh"),
        str(config),
        *_overrides(config, model, instance_dir, out),
        *extra,
    ]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("artifact saved in") == 1  # the main rank speaks for both
    assert "2 process(es)" in proc.stderr
    assert proc.stderr.count("full precision (fp32)") == 1  # one line, not one per rank
    assert "must have the same dtype" not in proc.stderr
    print(f"2-proc {method}: {seconds:.1f} s")


@pytest.mark.parametrize(
    "yaml_text, overrides",
    [
        ("train:\n  mixed_precision: no\n", []),  # YAML 1.1 reads `no` as false
        ("train:\n  mixed_precision: false\n", []),
        ("train:\n  mixed_precision: off\n", []),
        ("train:\n  mixed_precision: fp32\n", []),
        ("train:\n  mixed_precision: 'no'\n", []),
        ("", ["train.mixed_precision=no"]),
        ("", ["train.mixed_precision=false"]),
        ("", ["train.mixed_precision=off"]),
        ("", ["train.mixed_precision=fp32"]),
        ("", ["train.mixed_precision=FP32"]),
    ],
)
def test_every_spelling_of_full_precision_means_no(tmp_path, yaml_text, overrides):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    assert load_config(path, overrides).train.mixed_precision == "no"


def test_precision_spellings_in_the_db_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: dreambooth\ndb:\n  class_precision: no\n  save_precision: no\n")
    cfg = load_config(path)
    assert cfg.prior.generation_precision == "no" and cfg.dreambooth.save_precision == "fp32"
    assert load_config(None, ["train.mixed_precision=BF16"]).train.mixed_precision == "bf16"


def test_unknown_precision_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"train\.mixed_precision: .*fp16.*bf16.*got 'fp8'"):
        load_config(None, ["train.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match=r"train\.mixed_precision"):
        load_config(None, ["train.mixed_precision=yes"])  # true: which half precision?


def test_one_precision_helper():
    from personalize.precision import precision_dtype

    assert precision_dtype("no") is torch.float32
    assert precision_dtype("fp32") is torch.float32
    assert precision_dtype(False) is torch.float32
    assert precision_dtype("fp16") is torch.float16
    assert precision_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="fp8"):
        precision_dtype("fp8")


def test_cpu_fallback_is_one_warning_and_fp32(caplog):
    from personalize.precision import runtime_precision

    with caplog.at_level(logging.WARNING):
        assert runtime_precision("fp16", torch.device("cpu"), "train.mixed_precision") == "no"
        assert runtime_precision("no", torch.device("cpu"), "train.mixed_precision") == "no"
    assert len(caplog.records) == 1
    assert "train.mixed_precision: fp16" in caplog.records[0].getMessage()
    assert runtime_precision("bf16", torch.device("cuda"), "train.mixed_precision") == "bf16"
