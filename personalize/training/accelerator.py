"""The Accelerator a run uses, and each module's dtype for training."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    FullyShardedDataParallelPlugin,
    ProjectConfiguration,
    parse_flag_from_env,
)

from personalize.config import PersonalizeConfig
from personalize.errors import ConfigError
from personalize.models import SDParts
from personalize.precision import precision_dtype, runtime_precision

logger = logging.getLogger(__name__)


def make_accelerator(cfg: PersonalizeConfig) -> Accelerator:
    t = cfg.train
    log_with = None
    if t.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            logger.warning("tensorboard is not installed; logging to train_log.jsonl only")
    elif t.report_to == "wandb":
        log_with = "wandb"
    # The shipped configs ask for fp16 (for GPUs); a CPU run falls back to fp32 with one
    # warning (from the main process) instead of failing on fp16 weights at step 1.
    # PartialState as AcceleratorState would make it (`accelerate launch --cpu` sets the flag);
    # a bare PartialState() would miss the gloo ranks of a CPU multi-process launch.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **_deepspeed_on_cpu())
    mixed_precision = runtime_precision(
        t.mixed_precision, state.device, "train.mixed_precision", warn=state.is_main_process
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=log_with,
        # Batches come from pinned memory: the copy to the GPU need not wait for it.
        dataloader_config=DataLoaderConfiguration(
            non_blocking=cfg.data.pin_memory and torch.cuda.is_available()
        ),
        project_config=ProjectConfiguration(
            project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")
        ),
    )
    _fsdp_on_cpu_ranks(accelerator)
    _no_zero3_init(accelerator)
    return accelerator


def _no_zero3_init(accelerator: Accelerator) -> None:
    """Under DeepSpeed, accelerate tells transformers that ZeRO-3 is on even with
    `zero3_init_flag: false`, and transformers then loads every text encoder partitioned
    (`zero.Init`), frozen ones included, which no engine gathers: they fail at their first
    forward. personalize loads all modules whole and lets the engine partition the trained
    ones when it is prepared."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if accelerator.state.deepspeed_plugin.zero3_init_flag:
        raise ConfigError(
            "zero3_init_flag: true is not supported: personalize loads the model whole and "
            "DeepSpeed partitions the trained modules when they are prepared; set "
            "zero3_init_flag: false in the accelerate config (launch/deepspeed_zero3.yaml)"
        )
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _deepspeed_on_cpu() -> dict:
    """accelerate finds no process-group backend for a DeepSpeed launch on a machine without
    an accelerator and then runs every rank as a lone process 0 (each training alone, with
    no error). deepspeed's CPU accelerator (`DS_ACCELERATOR=cpu`) runs on gloo: name it, which
    is how the CPU tests run DeepSpeed."""
    launched = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") and "LOCAL_RANK" in os.environ
    if not launched or torch.accelerator.is_available():
        return {}
    return {"backend": "gloo"}


def _fsdp_on_cpu_ranks(accelerator: Accelerator) -> None:
    """accelerate turns an FSDP launch into plain DDP on CPU ranks (its state enables FSDP
    only for accelerator devices), so `launch/fsdp.yaml` on CPUs would shard nothing while
    looking as if it did. torch's `fully_shard` does run on gloo: switch the state to FSDP
    with the launch's plugin, which is how the CPU tests prove sharding."""
    if not (
        parse_flag_from_env("ACCELERATE_USE_FSDP")
        and accelerator.distributed_type == DistributedType.MULTI_CPU
    ):
        return
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launch env
    accelerator.state.distributed_type = DistributedType.FSDP
    # As accelerate does when it picks FSDP itself: a later AcceleratorState() re-reads it here.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if accelerator.is_main_process:
        logger.info("FSDP on %d CPU processes (gloo)", accelerator.num_processes)


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    return precision_dtype(accelerator.mixed_precision)


def vae_needs_fp32(parts: SDParts) -> bool:
    """An SDXL VAE whose config says it overflows in half precision (`force_upcast`; an
    fp16-fixed VAE given as model.vae_path says false). SD 1.x/2.x VAEs carry the flag by
    diffusers' default but are fine in fp16, and their pipelines ignore it."""
    return parts.is_sdxl and bool(getattr(parts.vae.config, "force_upcast", False))


def cast_for_training(parts: SDParts, dtype: torch.dtype, device: torch.device) -> None:
    """Frozen weights go to the compute dtype to save memory; trainable ones stay in fp32,
    because fp16/bf16 master weights lose small updates. Trainable weights are moved
    without a round trip through the compute dtype, which would round them before step 0."""
    for name, module in parts.modules().items():
        if name == "vae" and vae_needs_fp32(parts):
            # SDXL's own VAE overflows in fp16 (NaN latents): it stays in fp32, as
            # diffusers' SDXL pipelines and scripts keep it (config force_upcast).
            module.to(device=device, dtype=torch.float32)
            continue
        trainable = {
            p: p.data.to(device=device, dtype=torch.float32)
            for p in module.parameters()
            if p.requires_grad
        }
        module.to(device=device, dtype=dtype)
        for p, exact in trainable.items():
            p.data = exact
