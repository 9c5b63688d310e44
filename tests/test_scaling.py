"""Scaling out on accelerate's engines (docs/scaling.md): FSDP2 on 2 CPU ranks (gloo) shards
the trained modules, matches DDP, resumes bit-identically from full and sharded checkpoints and
saves the whole artifact; TI and hypernetworks are refused under FSDP at start; the DeepSpeed
configs hold only fields accelerate knows; launch/slurm.sbatch builds the right launch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from conftest import base_config
from helpers import ROOT, free_port, launch_two_processes
from safetensors.torch import load_file

from personalize.config import from_dict
from personalize.errors import ConfigError
from personalize.methods import prior
from personalize.training import checkpoint as ckpt
from personalize.training.sharding import check_fsdp_config

CLASS_PROMPT = "a photo of a disc"


def _launch_fsdp(cfg_path: Path, state_dict_type: str) -> list[str]:
    """The user's command, `accelerate launch --config_file launch/fsdp.yaml`, on 2 CPU ranks."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "launch" / "fsdp.yaml"),
        "--fsdp_state_dict_type",
        state_dict_type,
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "personalize",
        "train",
        str(cfg_path),
    ]


def _run(cmd: list[str], *, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _write(tmp: Path, name: str, cfg: dict) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _shard_reports(out: Path) -> list[dict]:
    return [json.loads((out / "logs" / f"fsdp_rank{r}.json").read_text()) for r in (0, 1)]


def _assert_sharded(out: Path, modules: list[str]) -> None:
    """Every parameter of each trained module is a DTensor, and each rank holds about half."""
    reports = _shard_reports(out)
    for name in modules:
        numel = reports[0][name]["numel"]
        for report in reports:
            r = report[name]
            assert r["dtensors"] == r["params"] > 0
            assert r["local_numel"] < 0.6 * numel
        assert sum(r[name]["local_numel"] for r in reports) == numel  # no overlap, no gap


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------ DreamBooth


@pytest.fixture(scope="module")
def db_runs(tiny_model_dir, instance_dir, tmp_path_factory):
    """DreamBooth (UNet + text encoder, class-image prior) under FSDP (full state dicts) and
    under DDP, same seed and data; then the FSDP run resumed from its step-2 checkpoint."""
    tmp = tmp_path_factory.mktemp("db_scale")
    classes = tmp / "class"

    def config(out: Path, **extra) -> dict:
        return base_config(
            tiny_model_dir,
            instance_dir,
            out,
            method="dreambooth",
            dreambooth={"train_text_encoder": True},
            prior={
                "enabled": True,
                "class_prompt": CLASS_PROMPT,
                "class_data_dir": str(classes),
                "num_class_images": 4,
                "generation_steps": 2,
                "generation_batch_size": 2,
            },
            train={"max_steps": 4, "checkpoint_every": 2},
            **extra,
        )

    fsdp, ddp, resumed = tmp / "fsdp", tmp / "ddp", tmp / "resumed"
    fsdp_proc = _run(_launch_fsdp(_write(tmp, "fsdp", config(fsdp)), "FULL_STATE_DICT"))
    _run(launch_two_processes("personalize", "train", str(_write(tmp, "ddp", config(ddp)))))
    step2 = ckpt.checkpoint_root(fsdp) / "step-000002"
    _run(
        _launch_fsdp(_write(tmp, "resumed", config(resumed, resume=str(step2))), "FULL_STATE_DICT")
    )
    return SimpleNamespace(fsdp=fsdp, ddp=ddp, resumed=resumed, classes=classes, log=fsdp_proc)


def test_fsdp_dreambooth_shards_unet_and_text_encoder(db_runs):
    _assert_sharded(db_runs.fsdp, ["unet", "text_encoder"])
    assert "FSDP on 2 CPU processes" in db_runs.log.stderr
    # accelerate's own full state dict is in the checkpoint beside our trainable weights.
    assert (ckpt.checkpoint_root(db_runs.fsdp) / "step-000002" / "pytorch_model_fsdp.bin").is_file()


def test_fsdp_dreambooth_losses_and_artifact_match_ddp(db_runs):
    fsdp, ddp = _losses(db_runs.fsdp), _losses(db_runs.ddp)
    assert fsdp.keys() == ddp.keys() == {1, 2, 3, 4}
    for step in fsdp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-5, abs=1e-6), step
    # DDP's main process saves its own unsharded copy: what one process saves. FSDP's
    # gathered artifact must hold the same weights.
    for sub, name in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        _assert_close(
            load_file(db_runs.fsdp / sub / name), load_file(db_runs.ddp / sub / name), 1e-5
        )


def test_fsdp_dreambooth_resume_from_full_state_dict_is_bit_identical(db_runs):
    assert _losses(db_runs.resumed) == {k: v for k, v in _losses(db_runs.fsdp).items() if k > 2}
    for sub, name in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        _assert_equal(load_file(db_runs.resumed / sub / name), load_file(db_runs.fsdp / sub / name))


def test_fsdp_class_images_made_once_across_ranks(db_runs):
    # Generated before the model is sharded, split across the ranks: rank 0 logs its share.
    assert re.search(r"process 0 generates 2 class images: \[0, 2\]", db_runs.log.stderr)
    assert sorted(p.name for p in db_runs.classes.glob("*.png")) == sorted(
        prior.class_image_name(CLASS_PROMPT, 0, i) for i in range(4)
    )


# ------------------------------------------------------------------------------ LoRA


@pytest.fixture(scope="module")
def lora_runs(tiny_model_dir, instance_dir, tmp_path_factory):
    """LoRA on UNet and text encoder under FSDP with SHARDED state dicts, DDP, and resumed."""
    tmp = tmp_path_factory.mktemp("lora_scale")

    def config(out: Path, **extra) -> dict:
        return base_config(
            tiny_model_dir,
            instance_dir,
            out,
            lora={"rank": 4, "train_text_encoder": True},
            train={"max_steps": 4, "checkpoint_every": 2},
            **extra,
        )

    fsdp, ddp, resumed = tmp / "fsdp", tmp / "ddp", tmp / "resumed"
    _run(_launch_fsdp(_write(tmp, "fsdp", config(fsdp)), "SHARDED_STATE_DICT"))
    _run(launch_two_processes("personalize", "train", str(_write(tmp, "ddp", config(ddp)))))
    step2 = ckpt.checkpoint_root(fsdp) / "step-000002"
    _run(_launch_fsdp(_write(tmp, "r", config(resumed, resume=str(step2))), "SHARDED_STATE_DICT"))
    return SimpleNamespace(fsdp=fsdp, ddp=ddp, resumed=resumed)


def test_fsdp_lora_shards_and_matches_ddp(lora_runs):
    from personalize.methods.lora import LORA_WEIGHTS

    _assert_sharded(lora_runs.fsdp, ["unet", "text_encoder"])
    # Each rank wrote its shard of the model (torch.distributed.checkpoint), not one full file.
    step2 = ckpt.checkpoint_root(lora_runs.fsdp) / "step-000002"
    assert (step2 / "pytorch_model_fsdp_0").is_dir()
    assert not (step2 / "pytorch_model_fsdp.bin").exists()
    fsdp, ddp = _losses(lora_runs.fsdp), _losses(lora_runs.ddp)
    assert fsdp.keys() == {1, 2, 3, 4}
    for step in fsdp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-5, abs=1e-6), step
    saved = load_file(lora_runs.fsdp / LORA_WEIGHTS)
    assert any(k.startswith("text_encoder") for k in saved)
    _assert_close(saved, load_file(lora_runs.ddp / LORA_WEIGHTS), 1e-5)


def test_fsdp_lora_resume_from_sharded_state_dict_is_bit_identical(lora_runs):
    from personalize.methods.lora import LORA_WEIGHTS

    assert _losses(lora_runs.resumed) == {k: v for k, v in _losses(lora_runs.fsdp).items() if k > 2}
    _assert_equal(
        load_file(lora_runs.resumed / LORA_WEIGHTS), load_file(lora_runs.fsdp / LORA_WEIGHTS)
    )


# ------------------------------------------------------------------------------ refused


def _fsdp_accelerator(version: int = 2):
    return SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)),
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "textual_inversion"}, "method textual_inversion does not run under FSDP"),
        ({"method": "hypernetwork"}, "method hypernetwork does not run under FSDP"),
        (
            {"regularization": {"weight_constraint": "l2sp", "weight_constraint_lambda": 1.0}},
            "l2sp .* does not run under FSDP",
        ),
        ({"validation": {"prompts": ["a"], "every_steps": 2}}, "validation.every_steps=0"),
        ({"train": {"ema_decay": 0.99}}, "train.ema_decay: the EMA is not supported under FSDP"),
    ],
)
def test_fsdp_refuses_what_it_cannot_shard(
    tiny_model_dir, instance_dir, tmp_path, overrides, message
):
    cfg = from_dict(base_config(tiny_model_dir, instance_dir, tmp_path / "o", **overrides))
    with pytest.raises(ConfigError, match=message):
        check_fsdp_config(cfg, _fsdp_accelerator())
    check_fsdp_config(cfg, SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))  # DDP: ok


def test_fsdp_version_1_is_refused(tiny_model_dir, instance_dir, tmp_path):
    cfg = from_dict(base_config(tiny_model_dir, instance_dir, tmp_path / "o"))
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        check_fsdp_config(cfg, _fsdp_accelerator(version=1))


def test_textual_inversion_under_fsdp_stops_at_start_with_one_line(
    tiny_model_dir, instance_dir, tmp_path
):
    out = tmp_path / "ti"
    cfg = base_config(tiny_model_dir, instance_dir, out, method="textual_inversion")
    proc = _run(_launch_fsdp(_write(tmp_path, "ti", cfg), "FULL_STATE_DICT"), ok=False)
    assert proc.returncode != 0
    assert "method textual_inversion does not run under FSDP" in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr  # our one line, not a crash
    assert not (out / "train_log.jsonl").exists()  # refused before any step


# ------------------------------------------------------------------------------ DeepSpeed

# deepspeed is not installed (nor a dependency): the configs are checked against accelerate's
# own classes - the config file loader, the launcher's arguments and DeepSpeedPlugin, which
# builds the DeepSpeed JSON without the package - not run (docs/scaling.md).
_DS_PLUGIN_FIELDS = {
    "zero_stage",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "offload_optimizer_device",
    "offload_param_device",
    "zero3_init_flag",
    "zero3_save_16bit_model",
}


@pytest.mark.parametrize(
    ("name", "stage"), [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)]
)
def test_deepspeed_configs_are_what_accelerate_accepts(name, stage):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DeepSpeedPlugin

    config = load_config_from_file(str(ROOT / "launch" / name))  # unknown top-level keys raise
    assert config.distributed_type == DistributedType.DEEPSPEED
    ds = config.deepspeed_config
    # The launcher copies each deepspeed_config key onto its argument of that name and
    # silently keeps a misspelled one: every key must be one of its arguments.
    launch_args = {a.dest for a in launch_command_parser()._actions}
    assert set(ds) <= launch_args, set(ds) - launch_args
    plugin = DeepSpeedPlugin(**{k: v for k, v in ds.items() if k in _DS_PLUGIN_FIELDS})
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0
    if stage == 3:
        # Without it accelerate cannot hand back whole weights of a ZeRO-3 model on save.
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "textual_inversion"}, "method textual_inversion does not run under DeepSpeed"),
        ({"train": {"ema_decay": 0.99}}, "EMA is not supported under DeepSpeed"),
        ({"validation": {"prompts": ["a"], "every_steps": 2}}, "under DeepSpeed set validation"),
    ],
)
def test_deepspeed_refuses_what_fsdp_refuses(
    tiny_model_dir, instance_dir, tmp_path, overrides, message
):
    cfg = from_dict(base_config(tiny_model_dir, instance_dir, tmp_path / "o", **overrides))
    with pytest.raises(ConfigError, match=message):
        check_fsdp_config(cfg, SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))


def test_deepspeed_launch_on_cpu_asks_for_gloo(monkeypatch):
    """Without a backend accelerate runs each DeepSpeed rank alone as process 0."""
    from personalize.training.accelerator import _deepspeed_on_cpu

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert _deepspeed_on_cpu() == {"backend": "gloo"}
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    assert _deepspeed_on_cpu() == {}  # a GPU machine: accelerate picks nccl itself
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert _deepspeed_on_cpu() == {}


def test_deepspeed_models_load_whole_and_zero3_init_is_refused(monkeypatch):
    """transformers would load text encoders partitioned (zero.Init) that no engine gathers."""
    import weakref

    from transformers.integrations import deepspeed as hf_deepspeed

    from personalize.training.accelerator import _no_zero3_init

    class Zero3Config:  # stands in for HfDeepSpeedConfig, which needs deepspeed installed
        def is_zero3(self):
            return True

    def accelerator(init_flag: bool):
        plugin = SimpleNamespace(zero3_init_flag=init_flag)
        return SimpleNamespace(
            distributed_type=DistributedType.DEEPSPEED,
            state=SimpleNamespace(deepspeed_plugin=plugin),
        )

    with pytest.raises(ConfigError, match="zero3_init_flag: false"):
        _no_zero3_init(accelerator(True))
    keep = Zero3Config()  # what accelerate sets up under DeepSpeed, zero3_init_flag or not
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", weakref.ref(keep))
    assert hf_deepspeed.is_deepspeed_zero3_enabled()
    _no_zero3_init(accelerator(False))
    assert not hf_deepspeed.is_deepspeed_zero3_enabled()


@pytest.mark.parametrize("name", ["fsdp.yaml", "multi_gpu.yaml", "single_gpu.yaml"])
def test_other_launch_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "launch" / name))
    if name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_version"] == 2


# ------------------------------------------------------------------------------ SLURM


def _shim(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_slurm_script_launches_one_accelerate_per_node_with_its_rank(tmp_path):
    """launch/slurm.sbatch under fake `srun`/`scontrol`/`accelerate` and a fake 3-node job:
    each node's command line has its own machine rank and the shared rendezvous."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    # srun: run the task once per node, with the variables SLURM sets in each task.
    _shim(
        bin_dir,
        "srun",
        'while [[ "$1" == --* ]]; do shift; done\n'
        "for ((n = 0; n < SLURM_NNODES; n++)); do\n"
        '  SLURM_NODEID=$n SLURM_PROCID=$n SLURMD_NODENAME="gpu0$((n + 1))" "$@" || exit 1\n'
        "done\n",
    )
    _shim(
        bin_dir,
        "scontrol",
        '[[ "$1 $2 $3" == "show hostnames gpu[01-03]" ]] || exit 3\n'
        'printf "gpu01\\ngpu02\\ngpu03\\n"\n',
    )
    _shim(
        bin_dir,
        "accelerate",
        'python3 -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@" '
        '> "$CALLS/$SLURMD_NODENAME.json"\n',
    )
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(calls),
        "SLURM_JOB_NODELIST": "gpu[01-03]",
        "SLURM_NNODES": "3",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_NODEID": "0",  # the batch script's own value: must not reach the other nodes
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), "configs/lora.yaml", "data.path=/d x"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for rank, host in enumerate(["gpu01", "gpu02", "gpu03"]):
        argv = json.loads((calls / f"{host}.json").read_text())
        assert argv[0] == "launch"
        flags = dict(zip(argv[1:-6:2], argv[2:-6:2]))
        assert flags == {
            "--config_file": "launch/multi_gpu.yaml",
            "--num_machines": "3",
            "--num_processes": "24",  # 3 nodes x 8 GPUs
            "--machine_rank": str(rank),
            "--main_process_ip": "gpu01",
            "--main_process_port": "29500",
        }
        # The user's arguments arrive whole (a space inside one), then resume=latest.
        tail = [
            "-m",
            "personalize",
            "train",
            "configs/lora.yaml",
            "data.path=/d x",
            "resume=latest",
        ]
        assert argv[-6:] == tail
