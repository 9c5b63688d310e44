"""Which model family a LoRA file was made for, so that loading it into another family is
one clear line instead of peft's size-mismatch dump of every layer.

An SDXL LoRA has marks in its module names (the second text encoder, kohya's original-UNet
names, SDXL's added embedding, attention blocks with several transformer layers). An SD 1.x
and an SD 2.x LoRA differ only in widths: the text context their cross-attention layers
read (768 / 1024 in the real models), which is compared with the pipeline's.
"""

from __future__ import annotations

import re
from pathlib import Path

from personalize.errors import ArtifactError
from personalize.models import SD1, SD2, SDXL, model_family

FAMILY_NAMES = {SD1: "SD 1.x", SD2: "SD 2.x", SDXL: "SDXL"}

# SD 1.x/2.x have one transformer layer per attention block; SDXL 2 or 10.
_SDXL_KEY = re.compile(
    r"^(text_encoder_2\.|lora_te[12]_|lora_unet_(input_blocks|middle_block|output_blocks|"
    r"label_emb)_)|add_embedding|transformer_blocks[._][1-9]"
)
_KOHYA_VERSIONS = {"sd_v1": SD1, "sd_v2": SD2}
# The down (A) matrix of a cross-attention key projection: [rank, text context width].
_CROSS_ATTENTION_DOWN = re.compile(r"attn2[._]to_k.*(lora_A|lora_down|lora\.down)")


def lora_family(keys, metadata: dict[str, str] | None = None) -> str | None:
    """ "sdxl", "sd2" or "sd1" from a LoRA's module names (peft or kohya) and kohya's
    `ss_base_model_version` / `ss_v2`; None when they do not tell (SD 1.x vs 2.x)."""
    metadata = metadata or {}
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl") or any(_SDXL_KEY.search(k) for k in keys):
        return SDXL
    if metadata.get("ss_v2") == "True":
        return SD2
    return _KOHYA_VERSIONS.get(version)


def text_context_width(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The text width the LoRA's cross-attention layers read, or None without such a layer."""
    for key, shape in shapes.items():
        if _CROSS_ATTENTION_DOWN.search(key) and len(shape) == 2:
            return int(shape[1])
    return None


def check_lora_family(file: Path, pipe) -> None:
    """Raise one ArtifactError line naming both families when `file` was made for another
    model family than `pipe`'s; say nothing when the file does not tell."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    mine = model_family(pipe.unet, getattr(pipe, "text_encoder", None))
    theirs = _other_family(lora_family(shapes, metadata), mine, text_context_width(shapes), pipe)
    if theirs is None:
        return
    raise ArtifactError(
        f"{file} is {theirs} LoRA and this pipeline is {FAMILY_NAMES[mine]}: a LoRA "
        f"loads only into the model family it was trained for; use an {FAMILY_NAMES[mine]} "
        "LoRA, or load this one into its own family's model"
    )


# The text context of the real models' cross-attention: CLIP-L, OpenCLIP-H, CLIP-L + bigG.
_FAMILY_OF_WIDTH = {768: SD1, 1024: SD2, 2048: SDXL}


def _other_family(said: str | None, mine: str, width: int | None, pipe) -> str | None:
    """The family the file is for, as "an SD 1.x" etc., when it is not `mine`; else None.
    A real model's text width decides over a kohya label; an SDXL mark over both."""
    if said == SDXL and mine != SDXL:
        return "an SDXL"
    fits = width is None or width == pipe.unet.config.cross_attention_dim
    by_width = _FAMILY_OF_WIDTH.get(width)
    if by_width is not None:
        return None if by_width == mine or fits else f"an {FAMILY_NAMES[by_width]}"
    if fits or said == mine:
        return None  # the same family (other widths: peft's own error names the layer)
    if said is not None:
        return f"an {FAMILY_NAMES[said]}"
    # Widths of no real model (small test models): no SDXL mark, so SD 1.x or 2.x.
    if mine == SDXL:
        return "an SD 1.x/2.x"
    return f"an {FAMILY_NAMES[SD2 if mine == SD1 else SD1]}"
