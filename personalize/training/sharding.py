"""FSDP (version 2, `fully_shard`) for the loop: which modules accelerate shards, how the
loop reads full weights back for saving, and what a sharded run refuses up front.

accelerate's FSDP2 takes ONE model per `prepare`, together with its optimizer. The loop trains
up to two modules (UNet, text encoder; SDXL adds a second text encoder), so under FSDP they go
into one `TrainedModules` container that is prepared with the optimizer; each trained module
must become its own FSDP unit (the loop calls them directly, not through the container), which
`prepare_trained` makes sure of. Parameters become DTensors that each rank holds a shard of;
`full_weights` gathers them (all ranks) for the main process to save with the usual code.

DeepSpeed's path in accelerate also takes one model with its optimizer: the same container
becomes the one engine (ZeRO-3 partitions its parameters in place; `full_weights` gathers
them with `deepspeed.zero.GatheredParameters`).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from personalize.errors import ConfigError, TrainingError

logger = logging.getLogger(__name__)

# Methods whose training touches weights outside a forward pass (TI restores every embedding
# row but its own after each step; the hypernetwork replaces attention processors and trains
# modules the UNet does not own): FSDP's shards would break that, and neither needs FSDP (both
# train a few MB). They run under DDP.
_REFUSED_METHODS = {"textual_inversion", "hypernetwork"}


def is_fsdp(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _engine(accelerator) -> str | None:
    """The engine's name when the trained weights are sharded (or, under ZeRO-2, their fp32
    masters live in the optimizer's shards), else None."""
    return "FSDP" if is_fsdp(accelerator) else "DeepSpeed" if is_deepspeed(accelerator) else None


def check_fsdp_config(cfg, accelerator) -> None:
    """Refuse, in one line and before any model loads, what a sharded run cannot do."""
    engine = _engine(accelerator)
    if engine is None:
        return
    if engine == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError(
            "FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
            "(launch/fsdp.yaml)"
        )
    if cfg.method in _REFUSED_METHODS:
        raise ConfigError(
            f"method {cfg.method} does not run under {engine} (it trains a few MB and edits "
            "weights between steps); launch it with DDP (launch/multi_gpu.yaml) instead"
        )
    if cfg.regularization.weight_constraint == "l2sp":
        raise ConfigError(
            "regularization.weight_constraint=l2sp reads every trained weight outside the "
            f"forward pass and does not run under {engine}; use DDP or drop the constraint"
        )
    if cfg.train.ema_decay:
        raise ConfigError(
            f"train.ema_decay: the EMA is not supported under {engine} yet (its copies of the "
            "sharded weights are untested); use DDP or set train.ema_decay=null"
        )
    if cfg.validation.prompts and cfg.validation.every_steps:
        raise ConfigError(
            "validation sample images are drawn by the main process alone, which a sharded "
            f"model cannot do: under {engine} set validation.every_steps=0 (held-out loss works)"
        )


class TrainedModules(torch.nn.Module):
    """The modules a run trains, as one model for accelerate's FSDP2 `prepare`; never called."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, *args, **kwargs):  # the loop calls the modules themselves
        raise TrainingError("TrainedModules is a container; call its modules")


def _shard_units(modules: dict[str, torch.nn.Module]) -> list[str]:
    """The class names that become FSDP units: each trained module itself (the loop calls it
    directly, so none of its weights may sit in the container's group) and the blocks its
    library marks as not to be split (`_no_split_modules`: diffusers' UNet blocks, CLIP's
    encoder layers). accelerate's size-based policy is not used: under FSDP2 it also picks
    the UNet's ModuleLists, which `fully_shard` rejects."""
    names = set()
    for module in modules.values():
        names.add(type(module).__name__)
        present = {type(m).__name__ for m in module.modules()}
        names |= {n for n in getattr(module, "_no_split_modules", None) or [] if n in present}
    return sorted(names)


def prepare_trained(accelerator, modules: dict[str, torch.nn.Module], *others) -> tuple:
    """`accelerator.prepare(container, *others)` under FSDP2; the modules are sharded in place
    and returned (same objects) with the prepared `others` (optimizer, dataloader, ...)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    container = TrainedModules(modules)
    plugin = accelerator.state.fsdp_plugin
    units = _shard_units(modules)
    logger.info("FSDP units: %s", ", ".join(units))
    plugin.auto_wrap_policy = transformer_auto_wrap_policy
    plugin.transformer_cls_names_to_wrap = units
    plugin.set_auto_wrap_policy(container)
    container, *prepared = accelerator.prepare(container, *others)
    not_units = [name for name, m in modules.items() if not isinstance(m, FSDPModule)]
    if not_units:  # the loop would call weights sharded in the container's group
        raise TrainingError(f"FSDP did not make {not_units} their own shard units")
    _keep_output_capturing(modules)
    return (container, *prepared)


def _keep_output_capturing(modules: dict[str, torch.nn.Module]) -> None:
    """transformers 5 looks up what a model may record (`output_hidden_states`...) by the
    name of its class; `fully_shard` swaps each unit's class for an `FSDP<name>` subclass, so
    a sharded CLIP would answer `hidden_states=None` (SDXL conditions on the penultimate
    one). Register the swapped classes with the recordings of the classes they extend."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers without the registry records without it
        return
    for module in modules.values():
        for m in module.modules():
            if isinstance(m, PreTrainedModel) and not _CAN_RECORD_REGISTRY.get(m):
                _CAN_RECORD_REGISTRY[m] = getattr(m, "_can_record_outputs", None)


def prepare_modules(
    accelerator,
    trained: dict[str, torch.nn.Module],
    *others,
    report_dir: Path,
    micro_batch_size: int,
):
    """The loop's `prepare`: under DDP each trained module is wrapped (its gradients synced;
    frozen modules are used as they are); under FSDP2 they are sharded in place and each rank
    writes its shard sizes to `report_dir` (`write_shard_report`); under DeepSpeed the
    `TrainedModules` container becomes the one engine, with the optimizer (accelerate's
    DeepSpeed path takes a single model). Returns (the trained modules to call, by name,
    *the prepared others)."""
    if is_deepspeed(accelerator):
        _set_micro_batch_size(accelerator, micro_batch_size)
        container = TrainedModules(trained)
        if _zero_stage(accelerator) == 3:
            _gather_children_too(container)
        _, *prepared = accelerator.prepare(container, *others)
        write_shard_report(report_dir, accelerator.process_index, trained, engine="deepspeed")
        return (trained, *prepared)
    if not is_fsdp(accelerator):
        trained = {name: accelerator.prepare(m) for name, m in trained.items()}
        return (trained, *accelerator.prepare(*others))
    _, *prepared = prepare_trained(accelerator, trained, *others)
    write_shard_report(report_dir, accelerator.process_index, trained)
    return (trained, *prepared)


# Modules that read a child's weight outside the child's own forward (CLIP's embeddings take
# the position table's size first), which ZeRO-3 would hand them partitioned (empty).
_ZERO3_READS_CHILDREN = {"CLIPTextEmbeddings"}


def _gather_children_too(container: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters just before its forward; the modules of
    `_ZERO3_READS_CHILDREN` also gather their children's (deepspeed's "external parameters"),
    so they see full weights. (deepspeed's "leaf modules" would do it too, but break the
    backward of a trained embedding: its gradient comes out sized by the partition.)"""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for module in container.modules():
        if type(module).__name__ in _ZERO3_READS_CHILDREN:
            for p in module.parameters():
                register_external_parameter(module, p)


def _set_micro_batch_size(accelerator, batch_size: int) -> None:
    """accelerate fills DeepSpeed's `train_micro_batch_size_per_gpu: auto` from the loader's
    `batch_size`, which a loader over a batch sampler (aspect buckets) does not have."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size


def _zero_stage(accelerator) -> int:
    return int(accelerator.state.deepspeed_plugin.zero_stage or 0)


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_zero3_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor")  # deepspeed's ZeRO-3 parameter


def _numel(p: torch.Tensor) -> int:
    return p.ds_numel if _is_zero3_partitioned(p) else p.numel()


def _local_numel(p: torch.Tensor, DTensor) -> int:
    if isinstance(p, DTensor):
        return p.to_local().numel()
    if _is_zero3_partitioned(p):
        return p.ds_tensor.numel()  # this rank's partition (padded to an even split)
    return p.numel()


def local_numel(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, int]]:
    """Per module: all its parameters' numel, the numel this rank holds, and how many of its
    parameters are DTensors / ZeRO-3 partitions (sharded) - the proof that a module was
    sharded (the key stays "dtensors" for both engines)."""
    DTensor = _dtensor_type()
    out = {}
    for name, module in modules.items():
        params = list(module.parameters())
        out[name] = {
            "numel": sum(_numel(p) for p in params),
            "local_numel": sum(_local_numel(p, DTensor) for p in params),
            "dtensors": sum(isinstance(p, DTensor) or _is_zero3_partitioned(p) for p in params),
            "params": len(params),
        }
    return out


def write_shard_report(
    folder: Path, rank: int, modules: dict[str, torch.nn.Module], engine: str = "fsdp"
) -> Path:
    """`folder/{engine}_rank{rank}.json`: this rank's `local_numel` (each rank writes its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{engine}_rank{rank}.json"
    path.write_text(json.dumps(local_numel(modules), indent=1), encoding="utf-8")
    return path


@contextmanager
def full_weights(accelerator, modules: list[torch.nn.Module], *, modify: bool = False):
    """Inside: on the main process, `modules` hold full parameters, so the methods' save
    code runs unchanged. FSDP: gathered fp32 masters, on the CPU. DeepSpeed ZeRO-3: the
    gathered (16-bit under mixed precision) weights, on every rank; `modify=True` then
    partitions the main process's values again on the way out (loading a checkpoint).
    ZeRO-2 keeps whole weights on every rank: nothing to do. Every rank must enter (the
    gather is a collective); outside FSDP/DeepSpeed this does nothing. No forward inside."""
    if is_deepspeed(accelerator) and _zero_stage(accelerator) == 3:
        import deepspeed

        params = [p for m in modules for p in m.parameters() if _is_zero3_partitioned(p)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield
        return
    if not is_fsdp(accelerator):
        yield
        return
    DTensor = _dtensor_type()
    main = accelerator.is_main_process
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for module in modules:
            for sub in module.modules():
                for pname, p in list(sub._parameters.items()):
                    if not isinstance(p, DTensor):
                        continue
                    # One parameter at a time: the gathered copy goes to the CPU at once.
                    full = p.full_tensor().detach().to("cpu", copy=True)
                    if main:
                        sub._parameters[pname] = torch.nn.Parameter(full, p.requires_grad)
                        swapped.append((sub, pname, p))
        yield
    finally:
        for sub, pname, p in swapped:
            sub._parameters[pname] = p


def full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every DTensor gathered to a full CPU tensor (a collective: all ranks)."""
    DTensor = _dtensor_type()
    return {
        k: v.full_tensor().to("cpu", copy=True) if isinstance(v, DTensor) else v
        for k, v in state.items()
    }


def shard_like(state: dict[str, torch.Tensor], like: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`state` with each tensor whose counterpart in `like` is a DTensor cut into that
    DTensor's shard, so `param.copy_(value)` loads a full checkpoint into a sharded run."""
    DTensor = _dtensor_type()
    from torch.distributed.tensor import distribute_tensor

    out = dict(state)
    for k, target in like.items():
        if isinstance(target, DTensor) and k in out:
            value = out[k].to(device=target.device, dtype=target.dtype)
            out[k] = distribute_tensor(value, target.device_mesh, target.placements)
    return out
