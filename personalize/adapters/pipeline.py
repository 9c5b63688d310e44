"""A complete diffusers pipeline folder (what DreamBooth trains): save, detect, load.

Saved so that `StableDiffusionPipeline.from_pretrained(folder)` loads it
(`StableDiffusionXLPipeline` for SDXL: text_encoder_2/ and tokenizer_2/ too), optionally with
one original-layout .safetensors file for webui/ComfyUI (adapters/sd_single_file.py: the
CompVis layout for SD 1.x/2.x, the SGM one for SDXL). Loaded into an existing pipeline by
swapping in its UNet and text encoder(s).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from personalize.errors import ArtifactError
from personalize.io import atomic_dir, atomic_save_safetensors, atomic_write
from personalize.models import SDParts, pipeline_from_parts

logger = logging.getLogger(__name__)

PIPELINE_INDEX = "model_index.json"


# ------------------------------------------------------------------------------ save


def _local_pipeline_dir(source: str) -> Path | None:
    path = Path(source) if source else None
    return path if path is not None and (path / PIPELINE_INDEX).is_file() else None


def _module_state(
    module: torch.nn.Module, subfolder: str, source: Path | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The module's weights in `dtype`. Frozen weights that training held in a lower
    precision (train_unet_blocks with mixed precision) are taken from the original files
    instead, so the saved model does not carry the rounding of its untouched blocks."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    rounded = [k for k in frozen if state[k].dtype not in (torch.float32, torch.float64)]
    if rounded and source is not None:
        original = type(module).from_pretrained(source, subfolder=subfolder).state_dict()
        for k in rounded:
            state[k] = original[k]
    elif rounded:
        logger.warning(
            "%s: %d frozen tensors were held in %s during training and are saved "
            "from there (the base model is not a local folder to copy them from)",
            subfolder,
            len(rounded),
            state[rounded[0]].dtype,
        )
    return {
        k: (v.to(dtype) if v.is_floating_point() else v).cpu().contiguous()
        for k, v in state.items()
    }


def _save_model(module: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Config + one safetensors file, the names `from_pretrained` looks for."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    if hasattr(module, "save_config"):  # diffusers
        module.save_config(folder)
        weights = "diffusion_pytorch_model.safetensors"
    else:  # transformers
        module.config.save_pretrained(folder)
        weights = "model.safetensors"
    save_file(state, str(folder / weights), metadata={"format": "pt"})


def _inference_scheduler(parts: SDParts, source: Path | None):
    """The base model's own sampling scheduler when it is a local folder, else DDIM."""
    import diffusers

    config_file = source / "scheduler" / "scheduler_config.json" if source else None
    if config_file is not None and config_file.is_file():
        name = json.loads(config_file.read_text()).get("_class_name", "")
        cls = getattr(diffusers, name, None)
        if cls is not None:
            return cls.from_pretrained(source, subfolder="scheduler")
    return diffusers.DDIMScheduler.from_config(parts.noise_scheduler.config)


def save_pipeline(
    out_dir: Path,
    parts: SDParts,
    *,
    trained: set[str],
    dtype: torch.dtype,
    copy_untouched: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Write a complete diffusers pipeline into `out_dir`; return the saved weights.

    Each component is written under a temporary name and renamed into place, and
    model_index.json (what marks a folder as a pipeline) is removed first and written last:
    a run killed mid-save never leaves a folder that looks complete. Components that did not
    train are copied byte for byte from a local base model (their original precision)."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PIPELINE_INDEX).unlink(missing_ok=True)
    source = _local_pipeline_dir(parts.source)
    scheduler = _inference_scheduler(parts, source)
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in parts.modules().items():  # SDXL: text_encoder_2 too
        with atomic_dir(out_dir / name) as tmp:
            if (
                name not in trained
                and copy_untouched
                and source is not None
                and (source / name).is_dir()
            ):
                shutil.copytree(source / name, tmp)
            else:
                states[name] = _module_state(module, name, source, dtype)
                _save_model(module, states[name], tmp)
    others = {"tokenizer": parts.tokenizer, "tokenizer_2": parts.tokenizer_2}
    others = {name: c for name, c in others.items() if c is not None}
    for name, component in {**others, "scheduler": scheduler}.items():
        with atomic_dir(out_dir / name) as tmp:
            component.save_pretrained(tmp)
    pipe = pipeline_from_parts(parts, scheduler)
    with atomic_write(out_dir / PIPELINE_INDEX) as tmp:
        tmp.write_text(pipe.to_json_string(), encoding="utf-8")
    logger.info(
        "saved the fine-tuned pipeline in %s (trained: %s)", out_dir, ", ".join(sorted(trained))
    )
    return states


def save_single_file(
    path: Path,
    pipeline_dir: Path,
    parts: SDParts,
    states: dict[str, dict[str, torch.Tensor]],
    dtype: torch.dtype,
    step: int,
) -> Path:
    """The saved pipeline as one original-layout .safetensors checkpoint (SD 1.x/2.x:
    CompVis layout; SDXL: SGM layout, both text encoders under `conditioner.embedders`)."""
    from personalize.adapters.sd_single_file import to_original_sd

    states = dict(states)
    modules = parts.modules()
    for name, module in modules.items():
        if name not in states:
            # Copied from the base model: read back what the pipeline folder holds.
            copy = type(module).from_pretrained(pipeline_dir / name)
            states[name] = copy.state_dict()
            del copy
    tensors = to_original_sd(
        parts.unet.config, parts.vae.config, parts.text_encoder.config, states, dtype
    )
    metadata = {
        "format": "pt",
        "personalize_method": "dreambooth",
        "personalize_step": str(step),
        "personalize_base_model": parts.source,
    }
    atomic_save_safetensors(tensors, path, metadata)
    logger.info("saved the single-file checkpoint %s", path)
    return path


# ------------------------------------------------------------------------------ detect, load


def is_pipeline_dir(path: Path) -> bool:
    return path.is_dir() and (path / PIPELINE_INDEX).is_file()


def load_pipeline_dir(pipe, path: Path, strength: float, adapter_name: str | None) -> None:
    """A fine-tuned (DreamBooth) pipeline: swap in its UNet and text encoder(s)."""
    from diffusers import UNet2DConditionModel

    if strength != 1.0:
        raise ArtifactError("a full fine-tuned pipeline has no strength; use strength=1.0")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    if unet.config.cross_attention_dim != pipe.unet.config.cross_attention_dim:
        raise ArtifactError(
            f"{path}: UNet cross-attention width "
            f"{unet.config.cross_attention_dim} != pipeline's "
            f"{pipe.unet.config.cross_attention_dim}"
        )
    pipe.unet = unet.to(pipe.device, pipe.unet.dtype)
    swapped = {"unet": pipe.unet}
    for name in ("text_encoder", "text_encoder_2"):  # text_encoder_2: SDXL
        current = getattr(pipe, name, None)
        if current is not None and (path / name).is_dir():
            te = type(current).from_pretrained(path, subfolder=name)
            swapped[name] = te.to(pipe.device, current.dtype)
    pipe.register_modules(**swapped)
