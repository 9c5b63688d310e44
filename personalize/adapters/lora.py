"""LoRA files: save (diffusers/peft layout and kohya layout), detect and load.

What `method: lora` writes in its output folder: `pytorch_lora_weights.safetensors`, peft's
own key names (`...lora_A.weight`), which diffusers' `load_lora_weights` reads, and
`lora_kohya.safetensors` (`lora_unet_*`/`lora_te_*` with `.alpha`, adapters/kohya.py) that
ComfyUI, the webui and kohya's sd-scripts load. `load_lora` reads ours and kohya/webui ones
into a diffusers pipeline; several stack under their own adapter names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalize.adapters.lora_family import check_lora_family
from personalize.errors import ArtifactError, KohyaExportError
from personalize.io import atomic_save_safetensors, atomic_write
from personalize.logs import dropping
from personalize.models import SDParts

logger = logging.getLogger(__name__)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "lora_kohya.safetensors"
# LoHa / LoKr (lora.type): one file, kohya/LyCORIS layout, read by every client and by
# personalize.load (diffusers' load_lora_weights reads no LoHa/LoKr; docs/lycoris.md).
LYCORIS_WEIGHTS = "lycoris_kohya.safetensors"


@dataclass(frozen=True)
class LoraShape:
    """What the saved file records about the adapters (peft's LoraConfig fields)."""

    rank: int
    alpha: float
    unet_targets: list[str]
    text_encoder_targets: list[str] | None  # None: the text encoder has no adapters
    use_dora: bool = False
    type: str = "lora"  # lora | loha | lokr
    lokr_options: dict | None = None  # loha/lokr: use_effective_conv2d, decompose_*


# ------------------------------------------------------------------------------ save


def peft_layers(parts: SDParts, text_encoder: bool) -> tuple[dict, dict | None]:
    """The adapters' weights under peft's own names (lora_A/lora_B), which diffusers loads
    as they are. Not through convert_state_dict_to_diffusers as the diffusers scripts do: it
    renames attention layers only (to the old lora.down/up names), and a file mixing both
    namings loses every other adapted layer (ff, proj_in, resnet convs) on load."""
    from peft.utils import get_peft_model_state_dict

    unet = get_peft_model_state_dict(parts.unet)
    te = get_peft_model_state_dict(parts.text_encoder) if text_encoder else None
    return unet, te


def peft_layers_2(parts: SDParts, text_encoder: bool) -> dict | None:
    """SDXL's text_encoder_2 adapters (None without them or for SD 1.x/2.x)."""
    from peft.utils import get_peft_model_state_dict

    if not text_encoder or parts.text_encoder_2 is None:
        return None
    return get_peft_model_state_dict(parts.text_encoder_2)


def save_lora(
    out_dir: str | Path, parts: SDParts, shape: LoraShape, step: int
) -> tuple[Path, Path | None]:
    """Write both files into `out_dir`; return (the diffusers file, the kohya file or None).
    SDXL parts: `StableDiffusionXLPipeline.save_lora_weights`' layout (keys `unet.`,
    `text_encoder.`, `text_encoder_2.`) and kohya's `lora_te1_`/`lora_te2_` names.
    LoHa/LoKr write their one kohya-layout file, returned twice."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if shape.type != "lora":
        file = save_lycoris(out_dir, parts, shape, step)
        return file, file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with_te = shape.text_encoder_targets is not None
    unet_layers, te_layers = peft_layers(parts, with_te)
    te2_layers = peft_layers_2(parts, with_te)

    def exact(layers: dict | None) -> dict | None:
        return {k: v.float().contiguous() for k, v in (layers or {}).items()} or None

    unet_layers, te_layers, te2_layers = exact(unet_layers), exact(te_layers), exact(te2_layers)
    meta = {
        "r": shape.rank,
        "lora_alpha": shape.alpha,
        "target_modules": shape.unet_targets,
        "use_dora": shape.use_dora,
    }
    te_meta = dict(meta, target_modules=shape.text_encoder_targets) if te_layers else None
    kwargs: dict[str, Any] = dict(
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=te_layers,
        safe_serialization=True,
        unet_lora_adapter_metadata=meta,
        text_encoder_lora_adapter_metadata=te_meta,
    )
    saver = StableDiffusionPipeline
    if parts.is_sdxl:
        saver = StableDiffusionXLPipeline
        kwargs.update(
            text_encoder_2_lora_layers=te2_layers,
            text_encoder_2_lora_adapter_metadata=te_meta if te2_layers else None,
        )
    # diffusers writes in place with safetensors (mode 0600): write it in a scratch
    # folder, then rename it into place with the umask's mode.
    with atomic_write(out_dir / LORA_WEIGHTS) as tmp:
        scratch = tmp.with_name(tmp.name + ".d")
        try:
            saver.save_lora_weights(scratch, **kwargs)
            os.replace(scratch / LORA_WEIGHTS, tmp)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    kohya = save_kohya(out_dir, unet_layers, te_layers, shape, step, parts, te2_layers)
    return out_dir / LORA_WEIGHTS, kohya


def save_kohya(
    out_dir: Path,
    unet_layers: dict,
    te_layers: dict | None,
    shape: LoraShape,
    step: int,
    parts: SDParts,
    te2_layers: dict | None = None,
) -> Path | None:
    """The kohya layout (lora_unet_*, lora_te_*, .alpha; SDXL: lora_te1_/lora_te2_ and the
    original UNet's module names) that ComfyUI, the webui and sd-scripts load
    (adapters/kohya.py); None, with a warning, when the adapters have no such form (DoRA)."""
    from personalize.adapters.kohya import kohya_metadata, peft_to_kohya

    try:
        kohya = peft_to_kohya(
            unet_layers,
            te_layers,
            shape.alpha,
            text_encoder_2_layers=te2_layers,
            sdxl_unet=parts.unet.config if parts.is_sdxl else None,
        )
    except KohyaExportError as e:
        logger.warning("no %s written: %s", KOHYA_WEIGHTS, e)
        stale = out_dir / KOHYA_WEIGHTS
        if stale.exists():  # a file from an earlier run would pass for this one
            stale.unlink()
        return None
    width = parts.unet.config.cross_attention_dim
    metadata = kohya_metadata(shape.rank, shape.alpha, width, step, *_family_of(parts))
    _warn_sd2_webui_attention(kohya, parts, KOHYA_WEIGHTS)
    metadata.update(
        personalize_base_model=parts.source,
        personalize_cross_attention_dim=str(width),
    )
    return atomic_save_safetensors(kohya, out_dir / KOHYA_WEIGHTS, metadata)


def _family_of(parts: SDParts) -> tuple[str, bool]:
    """(family, v-prediction): what the `ss_*` metadata records of the base model."""
    return parts.family, parts.noise_scheduler.config.prediction_type == "v_prediction"


def _warn_sd2_webui_attention(tensors: dict, parts: SDParts, file_name: str) -> None:
    """The webui's SD 2.x rule, the same for LoRA and LoHa/LoKr modules (its
    network_apply_weights looks the q/k/v/out modules of a fused attention up by name)."""
    from personalize.adapters.kohya import sd2_webui_skipped_layers

    skipped = sd2_webui_skipped_layers(tensors) if parts.family == "sd2" else []
    if skipped:
        logger.warning(
            "%s on SD 2.x: the webui applies text-encoder attention LoRA only where q_proj, "
            "k_proj, v_proj and out_proj are all trained, LoHa/LoKr alike (%d layers are "
            "not, e.g. %s); ComfyUI and personalize.load apply them. Add the missing ones to "
            "lora.text_encoder_target_modules for the webui",
            file_name,
            len(skipped),
            skipped[0],
        )


def save_lycoris(out_dir: str | Path, parts: SDParts, shape: LoraShape, step: int) -> Path:
    """LoHa/LoKr: the kohya/LyCORIS layout (`lora_unet_<module>.hada_w1_a`, `.lokr_w1`,
    ..., `.alpha`; adapters/kohya.py), named as the LoRA kohya file is (SDXL: original UNet
    names, lora_te1_/lora_te2_), which ComfyUI, the webui, LyCORIS and personalize.load read."""
    from personalize.adapters.kohya import lycoris_metadata, peft_lycoris_to_kohya

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with_te = shape.text_encoder_targets is not None
    unet_layers, te_layers = peft_layers(parts, with_te)
    tensors = peft_lycoris_to_kohya(
        unet_layers,
        te_layers,
        shape.rank,
        shape.alpha,
        text_encoder_2_layers=peft_layers_2(parts, with_te),
        sdxl_unet=parts.unet.config if parts.is_sdxl else None,
    )
    width = parts.unet.config.cross_attention_dim
    metadata = lycoris_metadata(
        shape.type,
        shape.rank,
        shape.alpha,
        shape.lokr_options or {},
        width,
        step,
        *_family_of(parts),
    )
    _warn_sd2_webui_attention(tensors, parts, LYCORIS_WEIGHTS)
    metadata.update(personalize_base_model=parts.source, personalize_cross_attention_dim=str(width))
    return atomic_save_safetensors(tensors, out_dir / LYCORIS_WEIGHTS, metadata)


# ------------------------------------------------------------------------------ detect, load


def detect_lora(path: Path) -> Path | None:
    """Our output folder's file, or a .safetensors whose keys are a LoRA's."""
    if path.is_dir():
        for name in (LORA_WEIGHTS, LYCORIS_WEIGHTS):
            if (path / name).is_file():
                return path / name
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise ArtifactError(
                f"{path} is not a readable .safetensors file (damaged, or an "
                f"incomplete download): {e}. Get the file again."
            ) from e
        if any(".lora" in k or "lora_" in k for k in keys):
            return path
    return None


def _loaded_adapters(pipe) -> set[str]:
    return {n for names in pipe.get_list_adapters().values() for n in names}


def _lora_adapter_name(pipe, file: Path, adapter_name: str | None) -> str:
    """The adapter name for `file`: the one asked for; else the name this very file was
    loaded under before (loading it again, e.g. a re-run notebook cell, replaces it);
    else the first free `personalize_<n>`, so that different files stack."""
    if adapter_name is not None:
        return adapter_name
    sources: dict[str, str] = getattr(pipe, "_personalize_lora_sources", {})
    again = [name for name, source in sources.items() if source == str(file.resolve())]
    if again:
        return again[0]
    taken = _loaded_adapters(pipe)
    return next(
        f"personalize_{n}" for n in range(len(taken) + 1) if f"personalize_{n}" not in taken
    )


def _has_text_encoder_keys(file: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return any(k.startswith(("text_encoder", "lora_te")) for k in f.keys())


def _adapter_keys(pipe) -> int:
    """The UNet's adapter weights (peft's lora_A/B, hada_*, lokr_*)."""
    return sum(1 for k in pipe.unet.state_dict() if any(p in k for p in ("lora", "hada_", "lokr_")))


def load_lora(pipe, path: Path, strength: float, adapter_name: str | None) -> None:
    file = detect_lora(path)
    from personalize.adapters.lycoris import is_lycoris_file, load_lycoris

    lycoris = is_lycoris_file(file)
    # Several LoRAs can be stacked; remember each one's strength and file on the pipeline.
    weights: dict[str, float] = getattr(pipe, "_personalize_lora_strengths", {})
    sources: dict[str, str] = getattr(pipe, "_personalize_lora_sources", {})
    name = _lora_adapter_name(pipe, file, adapter_name)
    if name in _loaded_adapters(pipe):
        # Loading on top would stack a second copy (double strength) or fail in peft.
        logger.info("LoRA adapter_name=%r is loaded already: replacing it with %s", name, file)
        pipe.delete_adapters(name)
        weights.pop(name, None)
        sources.pop(name, None)
    check_lora_family(file, pipe)  # one line, not peft's size mismatch of every layer
    n_before = _adapter_keys(pipe)
    # A UNet-only LoRA makes diffusers warn that the text encoder got no keys; that is
    # expected then, and only then worth a line.
    quiet_te = (
        dropping("diffusers.loaders.lora_base", "No LoRA keys associated to")
        if not _has_text_encoder_keys(file)
        else nullcontext()
    )
    try:
        with quiet_te, warnings.catch_warnings():
            # peft warns on every adapter after the first; stacking is what we do here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            if lycoris:
                load_lycoris(pipe, file, name)
            else:
                pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as e:
        why = str(e).strip().rstrip(".")
        raise ArtifactError(
            f"{file} does not fit this pipeline's UNet/text encoder: {why}. It "
            "was made for another base model; use a LoRA trained on this one."
        ) from e
    if _adapter_keys(pipe) == n_before:
        raise ArtifactError(
            f"{file}: no LoRA key matched this pipeline's UNet modules; it was "
            "made for another base model (e.g. SDXL) or only for modules this "
            "model lacks. Use a LoRA trained on this base model."
        )
    weights[name] = strength
    sources[name] = str(file.resolve())
    pipe._personalize_lora_strengths = weights
    pipe._personalize_lora_sources = sources
    pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))


def effective_scale(path: str | Path) -> dict[str, Any]:
    """alpha / rank as saved, so "my LoRA has no effect" can be answered from the file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    info = json.loads(meta.get("lora_adapter_metadata", "{}") or "{}")
    if "unet.r" in info:
        rank, alpha = info["unet.r"], info["unet.lora_alpha"]
        return {"rank": rank, "alpha": alpha, "scale": alpha / rank}
    return {}
