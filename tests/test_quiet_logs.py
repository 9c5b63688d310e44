"""A run prints our lines, once, and not the other libraries' chatter: no torchvision
notices, no "kept in float32: []", no accelerate lines per checkpoint, no "No LoRA keys
associated to CLIPTextModel" on a UNet-only LoRA; a 2-process run does not print twice;
the library never configures logging (only the CLI does)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import base_config
from helpers import ROOT, launch_two_processes

FOREIGN = (
    "requires torchvision",  # transformers, when diffusers imports the pipelines
    "should be kept in float32",  # diffusers, on every .to(dtype)
    "accelerate.checkpointing",  # five INFO lines per save_state
    "accelerate.accelerator",
    "No LoRA keys associated",  # diffusers, on a UNet-only LoRA
)


def _config(tmp_path, model_dir, data_dir, name: str) -> Path:
    cfg = base_config(
        model_dir,
        data_dir,
        tmp_path / name,
        train={"max_steps": 4, "checkpoint_every": 2},
        db={
            "with_prior_preservation": True,
            "class_prompt": "a photo of a disc",
            "num_class_images": 2,
            "sample_batch_size": 2,
            "class_num_inference_steps": 1,
        },
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=400, cwd=ROOT
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, instance_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quiet1")
    cfg = _config(tmp, tiny_model_dir, instance_dir, "run")
    return tmp / "run", _run(["-m", "personalize", "train", str(cfg)])


@pytest.fixture(scope="module")
def two_processes(tiny_model_dir, instance_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quiet2")
    cfg = _config(tmp, tiny_model_dir, instance_dir, "run")
    # What launch/cpu_2proc.sh runs: the CLI then starts the two gloo ranks itself.
    return _run(launch_two_processes("personalize", "train", str(cfg))[1:])


def test_a_run_prints_no_foreign_lines(one_process):
    _, output = one_process
    for fragment in FOREIGN:
        assert fragment not in output, fragment
    # Ours are all there: the class-image count (not a list of every index), both
    # checkpoints, the end.
    assert "process 0 generates 2 class images: [0, 1]" in output
    assert "saved checkpoint" in output and "step-000002" in output and "step-000004" in output
    assert "done: 4 steps" in output and "artifact saved in" in output


def test_two_processes_print_our_lines_once(two_processes):
    output = two_processes
    for fragment in FOREIGN:
        assert fragment not in output, fragment
    assert "2 process(es)" in output
    for line in ("training on 4 images", "done: 4 steps", "artifact saved in"):
        assert output.count(line) == 1, (line, output[-3000:])
    assert output.count("saved checkpoint") == 2  # steps 2 and 4
    assert "process 1 generates" not in output  # rank 1 says only what is wrong


def test_unet_only_lora_loads_without_the_text_encoder_warning(one_process, tiny_model_dir):
    from personalize import load
    from personalize.models import load_pipeline

    out, _ = one_process
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    target = logging.getLogger("diffusers.loaders.lora_base")
    target.addHandler(handler)
    try:
        load(load_pipeline(str(tiny_model_dir)), out)
    finally:
        target.removeHandler(handler)
    assert not [r for r in records if "No LoRA keys" in r.getMessage()]


def test_filters_drop_only_the_exact_messages():
    import personalize  # noqa: F401  (installs the filters)

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    target = logging.getLogger("diffusers.models.modeling_utils")
    target.addHandler(handler)
    try:
        target.warning(
            "There are modules in UNet2DConditionModel that should be kept in float32: []. "
            "Casting directly with `to()` can lead to inconsistent results"
        )
        target.warning(
            "There are modules in UNet2DConditionModel that should be kept in float32: "
            "['norm']. Casting directly with `to()` can lead to inconsistent results"
        )
    finally:
        target.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "There are modules in UNet2DConditionModel that should be kept in float32: "
        "['norm']. Casting directly with `to()` can lead to inconsistent results"
    ]


def test_the_library_does_not_configure_logging(
    tiny_model_dir, instance_dir, tmp_path, monkeypatch
):
    from personalize import train
    from personalize.config import from_dict

    calls = []
    monkeypatch.setattr(logging, "basicConfig", lambda *a, **k: calls.append(k))
    cfg = base_config(tiny_model_dir, instance_dir, tmp_path / "run", train={"max_steps": 1})
    train(from_dict(cfg))
    assert calls == []


def test_process_rank_reads_the_launchers_variables():
    from personalize.logs import process_rank

    assert process_rank({}) == 0
    assert process_rank({"RANK": "1"}) == 1
    assert process_rank({"OMPI_COMM_WORLD_RANK": "3"}) == 3


def test_class_image_indices_are_summarized():
    from personalize.methods.class_images import _short_list

    assert _short_list([0, 2, 4]) == "[0, 2, 4]"
    assert _short_list(list(range(0, 200, 2))) == "[0, 2, 4, 6, 8, 10, 12, ..., 198]"
