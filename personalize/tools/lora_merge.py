"""`personalize merge`: bake one or more LoRAs into a base model.

diffusers does the work: each LoRA is loaded as its own adapter with its strength
(personalize.inference.load, which reads our files and kohya/webui ones), then fuse_lora adds
every adapter's scaled delta into the base weights and unload_lora_weights drops the peft
layers, leaving a plain pipeline to save; an SDXL pipeline fuses into its UNet and both
text encoders. Optionally also one original-layout (SD 1.x/2.x, or SDXL's SGM layout)
`.safetensors` checkpoint for webui/ComfyUI (personalize/adapters/sd_single_file.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from personalize.errors import ConfigError, OutputExistsError
from personalize.io import atomic_dir

logger = logging.getLogger(__name__)


def parse_load(spec: str) -> tuple[str, float]:
    """`PATH[:STRENGTH]`; a colon that is not followed by a number belongs to the path."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


DTYPES = ("fp32", "fp16", "bf16")


def merge(
    model: str,
    loads: list[tuple[str, float]],
    out: str | Path,
    single_file: bool = False,
    dtype: str | None = None,
) -> Path:
    """Bake `loads` [(LoRA path, strength)] into `model`; save the pipeline in `out`, cast
    to `dtype` (fp32/fp16/bf16) when given; the fusing is done as loaded (float32)."""

    from personalize.errors import ArtifactError
    from personalize.inference import detect_artifact, load
    from personalize.models import load_pipeline
    from personalize.precision import precision_dtype

    if not loads:
        raise ConfigError("give at least one --load PATH[:STRENGTH]")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"{out} exists and is not empty; choose another --out")
    for path, _ in loads:  # all inputs checked before the model loads
        kind = detect_artifact(path)
        if kind != "lora":
            raise ArtifactError(f"{path} is a {kind}; merge bakes LoRAs only")
    pipe = load_pipeline(model)
    for i, (path, strength) in enumerate(loads):
        load(pipe, path, strength=strength, adapter_name=f"merge_{i}")
    names = list(pipe._personalize_lora_strengths)
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    if dtype is not None:
        pipe.to(precision_dtype(dtype))
    # Written next to `out`, renamed into place: a killed merge leaves no half pipeline.
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    logger.info("merged %d LoRA(s) into %s: %s", len(loads), model, out)
    if single_file:
        write_single_file(pipe, out / f"{out.name}.safetensors", model, loads)
    return out


def write_single_file(pipe, path: Path, model: str, loads: list[tuple[str, float]]) -> Path:
    from personalize.adapters.sd_single_file import to_original_sd
    from personalize.io import atomic_save_safetensors

    names = ("unet", "vae", "text_encoder", "text_encoder_2")  # text_encoder_2: SDXL
    states = {n: getattr(pipe, n).state_dict() for n in names if getattr(pipe, n, None)}
    tensors = to_original_sd(
        pipe.unet.config, pipe.vae.config, pipe.text_encoder.config, states, dtype=None
    )
    metadata = {
        "format": "pt",
        "personalize_method": "merge",
        "personalize_base_model": str(model),
        "personalize_merged": ", ".join(f"{Path(p).name}:{s}" for p, s in loads),
    }
    atomic_save_safetensors(tensors, path, metadata)
    logger.info("saved the single-file checkpoint %s", path)
    return path
