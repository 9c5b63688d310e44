"""Load the Stable Diffusion components a trainer needs, with errors a user can act on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from personalize.errors import ModelLoadError
from personalize.io import refused_global

logger = logging.getLogger(__name__)


@dataclass
class SDParts:
    """The pieces of a Stable Diffusion pipeline that training touches."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any  # a DDPMScheduler configured like the model's own scheduler
    source: str = ""
    family: str = "sd1"  # "sd1" | "sd2" | "sdxl": see model_family

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "vae": self.vae}


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# The 1024-wide text context of SD 2.x (OpenCLIP ViT-H); SD 1.x has CLIP ViT-L's 768.
SD2_TEXT_WIDTH = 1024


def model_family(unet: Any, text_encoder: Any = None) -> str:
    """The model family, "sdxl", "sd2" or "sd1", read from the modules (not from a name).

    SDXL: the UNet takes the text_time added conditioning (pooled text + sizes).
    SD 2.x: a 1024-wide text context (OpenCLIP-H), or an OpenCLIP-style text encoder
    (`gelu`, where CLIP-L has `quick_gelu`) at any width, as tiny test models have.
    Not used: v-prediction (SD 2.x-base and 2-inpainting are epsilon) and
    use_linear_projection (SDXL has it too).
    """
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    te_act = getattr(getattr(text_encoder, "config", None), "hidden_act", "quick_gelu")
    if unet.config.cross_attention_dim == SD2_TEXT_WIDTH or te_act != "quick_gelu":
        return "sd2"
    return "sd1"


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))


def resolve_model_path(path: str) -> str:
    """Check a local path early; let a hub id through (it only works when online)."""
    if not path:
        raise ModelLoadError("model.path is empty: set it to a diffusers folder or a hub id")
    p = Path(path).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "model_index.json").is_file():
            raise ModelLoadError(
                f"{p} is not a diffusers Stable Diffusion folder (no model_index.json). "
                "Point model.path at the folder that holds model_index.json, unet/, vae/, "
                "text_encoder/ and tokenizer/, or at a single .safetensors checkpoint."
            )
        if p.is_dir():
            _check_components(p)
        if p.is_file() and p.suffix not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"{p} is a file but not a .safetensors/.ckpt checkpoint; "
                "model.path must be a diffusers folder or a single-file checkpoint"
            )
        return str(p)
    if _looks_like_hub_id(path):
        return path
    raise ModelLoadError(
        f"model path {path} does not exist; set model.path to a diffusers folder (with "
        "model_index.json), a single .safetensors/.ckpt file, or a hub id"
    )


def _check_components(folder: Path) -> None:
    """Every component model_index.json names must have its folder: diffusers would report a
    missing unet/ as "no file named config.json found in directory <the model folder>"."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"{folder / 'model_index.json'} is not readable JSON ({e}); "
            "copy or download the model folder again"
        ) from e
    missing = [
        name
        for name, spec in index.items()
        if not name.startswith("_")
        and isinstance(spec, list)
        and spec[0] is not None
        and not (folder / name).is_dir()
    ]
    if missing:
        raise ModelLoadError(
            f"{folder} is incomplete: model_index.json lists {', '.join(missing)} but the "
            f"folder has no {', '.join(m + '/' for m in missing)}; copy or download the whole "
            "model folder again"
        )


def load_pipeline(
    path: str,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """A StableDiffusionPipeline from a diffusers folder, single file, or hub id."""
    from diffusers import StableDiffusionPipeline

    path = resolve_model_path(path)
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        if Path(path).is_file():
            pipe = StableDiffusionPipeline.from_single_file(path, **kwargs)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                path, revision=revision, variant=variant, **kwargs
            )
    except (OSError, ValueError, KeyError) as e:
        refused = refused_global(e)
        if refused:
            # Old .ckpt files often pickle training objects (e.g. pytorch_lightning callbacks).
            raise ModelLoadError(
                f"{path} is a pickle that torch.load(weights_only=True) refuses ({refused[:200]}); "
                "personalize never unpickles code, which could run anything. Use the model's "
                ".safetensors file, or convert this one with a tool you trust."
            ) from e
        raise ModelLoadError(
            f"could not load a Stable Diffusion model from {path}: "
            f"{str(e).strip()} If a file is damaged or cut short (an "
            "interrupted download), get it again."
        ) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_parts(
    path: str,
    revision: str | None = None,
    variant: str | None = None,
    prediction_type: str | None = None,
) -> SDParts:
    """The components for training, with a DDPM noise scheduler for the forward process."""
    from diffusers import DDPMScheduler

    pipe = load_pipeline(path, revision=revision, variant=variant)
    scheduler_config = dict(pipe.scheduler.config)
    if prediction_type is not None:
        scheduler_config["prediction_type"] = prediction_type
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    return SDParts(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        noise_scheduler=noise_scheduler,
        source=path,
        family=model_family(pipe.unet, pipe.text_encoder),
    )


def pipeline_from_parts(parts: SDParts, scheduler: Any = None):
    """A sampling pipeline sharing the (possibly training) modules of `parts`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if scheduler is None:
        scheduler = DDIMScheduler.from_config(parts.noise_scheduler.config)
    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded (and cut) to the text encoder's length, as training feeds it."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
