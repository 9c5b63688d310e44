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


# Model families (`SDParts.family`): what the rest of the package branches on.
SD1 = "sd1"
SD2 = "sd2"
SDXL = "sdxl"


@dataclass
class SDParts:
    """The pieces of a Stable Diffusion pipeline that training touches.

    `family`: "sd1", "sd2" or "sdxl". SDXL has a second tokenizer/text encoder
    (`tokenizer_2`, `text_encoder_2`: a CLIPTextModelWithProjection whose pooled
    projection conditions the UNet too); they are None for SD 1.x/2.x."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any  # a DDPMScheduler configured like the model's own scheduler
    source: str = ""
    family: str = SD1  # see model_family
    tokenizer_2: Any = None
    text_encoder_2: torch.nn.Module | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.family == SDXL

    def modules(self) -> dict[str, torch.nn.Module]:
        """Every model the loop may train, cast or move, by name (SDXL adds text_encoder_2)."""
        modules = {"unet": self.unet, "text_encoder": self.text_encoder, "vae": self.vae}
        if self.text_encoder_2 is not None:
            modules["text_encoder_2"] = self.text_encoder_2
        return modules

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders by name: text_encoder, and text_encoder_2 for SDXL."""
        return {k: v for k, v in self.modules().items() if k.startswith("text_encoder")}


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
        return SDXL
    te_act = getattr(getattr(text_encoder, "config", None), "hidden_act", "quick_gelu")
    if unet.config.cross_attention_dim == SD2_TEXT_WIDTH or te_act != "quick_gelu":
        return SD2
    return SD1


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


class _ShapeOnly:
    """A tensor's shape without its data: what diffusers' single-file detection reads."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)


def _single_file_model_type(path: Path) -> str | None:
    """diffusers' own model type of a single-file checkpoint ("v1", "v2", "xl_base", ...),
    from a .safetensors header only (no weights read); None when it cannot tell."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if path.suffix != ".safetensors":
        return None  # a .ckpt would have to be unpickled whole just to look
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = {k: _ShapeOnly(f.get_slice(k).get_shape()) for k in f.keys()}
        return infer_diffusers_model_type(header)
    except Exception as e:  # a damaged file: loading it says why, with the file's name
        logger.debug("could not read the model type of %s: %s", path, e)
        return None


_FAMILY_OF_TYPE = {
    "xl_base": SDXL,
    "xl_inpaint": SDXL,
    "playground-v2-5": SDXL,
    "v2": SD2,
    "inpainting_v2": SD2,
}


def detect_family(path: str, revision: str | None = None) -> str:
    """The model family of a diffusers folder (model_index.json's `_class_name`), a single
    file (diffusers' single-file detection) or a hub id (its model_index.json from the hub
    cache, or fetched when online; else sd1 unless its name says XL)."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "model_index.json").is_file():
        return _family_of_index(p / "model_index.json", p / "unet" / "config.json")
    if p.is_file():
        model_type = _single_file_model_type(p)
        if model_type == "xl_refiner":
            raise ModelLoadError(
                f"{p} is an SDXL refiner: it has no CLIP-L text encoder and is not trained on "
                "its own; point model.path at the SDXL base model"
            )
        return _FAMILY_OF_TYPE.get(model_type or "", SD1)
    family = _hub_family(path, revision) if _looks_like_hub_id(path) else None
    if family is None:
        family = SDXL if "xl" in path.lower() else SD1
        logger.info("model family of %s guessed from its name: %s", path, family)
    return family


def _family_of_index(index_file: Path, unet_config: Path | None) -> str:
    """SDXL from model_index.json's pipeline class; else SD 2.x when the UNet attends to
    1024-wide text (OpenCLIP-H), SD 1.x's 768."""
    import json

    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return SD1  # resolve_model_path reports an unreadable index
    if "XL" in str(index.get("_class_name", "")):
        return SDXL
    try:
        config = json.loads(unet_config.read_text(encoding="utf-8")) if unet_config else {}
    except (OSError, ValueError):
        return SD1
    return SD2 if config.get("cross_attention_dim") == 1024 else SD1


def _hub_file(repo_id: str, filename: str, revision: str | None) -> Path | None:
    """A hub repo's file from the local hub cache (HF_HUB_CACHE), else downloaded unless
    offline (HF_HUB_OFFLINE); None when neither works."""
    import os

    from huggingface_hub import constants, hf_hub_download

    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read now, not at import
    for local_only in (True, False):
        if not local_only and constants.HF_HUB_OFFLINE:
            break
        try:
            found = hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_only,
            )
            return Path(found)
        except Exception as e:  # not cached, offline, no such repo/file, no network
            logger.debug("no %s of %s (local_files_only=%s): %s", filename, repo_id, local_only, e)
    return None


def _hub_family(repo_id: str, revision: str | None) -> str | None:
    """The family of a hub id from its model_index.json (and unet/config.json), as for a
    folder; None when the file cannot be had."""
    index = _hub_file(repo_id, "model_index.json", revision)
    if index is None:
        return None
    family = _family_of_index(index, None)
    if family == SDXL:
        return SDXL
    unet_config = _hub_file(repo_id, "unet/config.json", revision)
    return _family_of_index(index, unet_config)


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == SDXL else StableDiffusionPipeline


def load_vae(vae_path: str, torch_dtype: torch.dtype | None = None):
    """A separate VAE (model.vae_path): a diffusers VAE folder (config.json) or a single
    .safetensors file, e.g. an fp16-fixed SDXL VAE."""
    from diffusers import AutoencoderKL

    p = Path(vae_path).expanduser()
    kwargs: dict[str, Any] = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    try:
        if p.is_file():
            return AutoencoderKL.from_single_file(str(p), **kwargs)
        if p.is_dir() and (p / "vae" / "config.json").is_file():
            p = p / "vae"  # a whole model folder: take its VAE
        if p.is_dir() or _looks_like_hub_id(vae_path):
            return AutoencoderKL.from_pretrained(str(p) if p.is_dir() else vae_path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not load a VAE from model.vae_path {vae_path}: {e}") from e
    raise ModelLoadError(
        f"model.vae_path {vae_path} does not exist; point it at a VAE folder (config.json + "
        "weights) or a single .safetensors VAE file"
    )


def load_pipeline(
    path: str,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
    vae_path: str | None = None,
):
    """A StableDiffusionPipeline, or StableDiffusionXLPipeline for an SDXL model, from a
    diffusers folder, single file, or hub id; `vae_path` replaces its VAE."""
    path = resolve_model_path(path)
    family = detect_family(path, revision)
    cls = pipeline_class(family)
    kwargs: dict[str, Any] = (
        {} if family == SDXL else {"safety_checker": None, "requires_safety_checker": False}
    )
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if vae_path:
        kwargs["vae"] = load_vae(vae_path, torch_dtype)
    try:
        if Path(path).is_file():
            pipe = cls.from_single_file(path, **kwargs)
        else:
            pipe = cls.from_pretrained(path, revision=revision, variant=variant, **kwargs)
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
    vae_path: str | None = None,
) -> SDParts:
    """The components for training, with a DDPM noise scheduler for the forward process."""
    from diffusers import DDPMScheduler

    pipe = load_pipeline(path, revision=revision, variant=variant, vae_path=vae_path)
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
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
    )


def pipeline_from_parts(parts: SDParts, scheduler: Any = None):
    """A sampling pipeline sharing the (possibly training) modules of `parts`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if scheduler is None:
        scheduler = DDIMScheduler.from_config(parts.noise_scheduler.config)
    if parts.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            text_encoder_2=parts.text_encoder_2,
            tokenizer=parts.tokenizer,
            tokenizer_2=parts.tokenizer_2,
            unet=parts.unet,
            scheduler=scheduler,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
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
