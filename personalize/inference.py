"""Use what was learned: load any artifact into a pipeline with one call, and generate.

`load(pipe, path)` recognizes the artifact by its files and hands it to the loader of its
kind. Each loader is a pair (detect, apply) registered in `LOADERS`, so a new artifact
type is one entry, not a new branch here.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from personalize.errors import ArtifactError, ArtifactNotFoundError
from personalize.logs import dropping

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ LoRA


def _lora_file(path: Path) -> Path | None:
    from personalize.methods.lora import LORA_WEIGHTS

    if path.is_dir() and (path / LORA_WEIGHTS).is_file():
        return path / LORA_WEIGHTS
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


def _load_lora(pipe, path: Path, strength: float, adapter_name: str | None) -> None:
    file = _lora_file(path)
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
    n_before = sum(1 for k in pipe.unet.state_dict() if "lora" in k)
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
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as e:
        why = str(e).strip().rstrip(".")
        raise ArtifactError(
            f"{file} does not fit this pipeline's UNet/text encoder: {why}. It "
            "was made for another base model; use a LoRA trained on this one."
        ) from e
    if sum(1 for k in pipe.unet.state_dict() if "lora" in k) == n_before:
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


# ------------------------------------------------------------------------------ full pipelines


def _is_pipeline_dir(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def _load_pipeline_dir(pipe, path: Path, strength: float, adapter_name: str | None) -> None:
    """A fine-tuned (DreamBooth) pipeline: swap in its UNet and text encoder."""
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
    if (path / "text_encoder").is_dir():
        te = type(pipe.text_encoder).from_pretrained(path, subfolder="text_encoder")
        pipe.text_encoder = te.to(pipe.device, pipe.text_encoder.dtype)
    pipe.register_modules(unet=pipe.unet, text_encoder=pipe.text_encoder)


# ------------------------------------------------------------------------------ hypernetworks


def _hypernetwork_file(path: Path) -> Path | None:
    """A webui hypernetwork .pt, our .safetensors layout, or a folder holding one."""
    from personalize.adapters.hypernetwork import find_hypernetwork_file

    return find_hypernetwork_file(path)


def _load_hypernetwork(pipe, path: Path, strength: float, adapter_name: str | None) -> None:
    from personalize.adapters.hypernetwork import load_into_pipeline

    load_into_pipeline(pipe, path, strength, name=adapter_name)


# ------------------------------------------------------------------------------ embeddings


def _embedding_file(path: Path) -> Path | None:
    """A Textual Inversion embedding (diffusers, webui .pt, single tensor) or a TI run folder."""
    from personalize.adapters.embeddings import detect_embedding

    return detect_embedding(path)


def _load_embedding(pipe, path: Path, strength: float, adapter_name: str | None) -> None:
    from personalize.adapters.embeddings import apply_embedding

    apply_embedding(pipe, path, strength, adapter_name)


Detect = Callable[[Path], object]
Apply = Callable[..., None]

# (name, detect(path) -> truthy when it is this kind, apply(pipe, path, strength, adapter_name))
LOADERS: list[tuple[str, Detect, Apply]] = [
    ("lora", _lora_file, _load_lora),
    ("pipeline", _is_pipeline_dir, _load_pipeline_dir),
    ("textual_inversion", _embedding_file, _load_embedding),
    ("hypernetwork", _hypernetwork_file, _load_hypernetwork),
]


def detect_artifact(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise ArtifactNotFoundError(f"artifact {path} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise ArtifactError(
            f"{path} is empty (0 bytes): an interrupted download or copy? Get the file again."
        )
    for name, detect, _ in LOADERS:
        if detect(path):
            return name
    refused = _refused_pickle(path)
    if refused:
        raise ArtifactError(
            f"{path}: refused to load: this pickle asks to run code ({refused[:200]}). "
            "personalize reads pickles with torch.load(weights_only=True) only, because "
            "unpickling can run anything. Get the file from a source you trust, or as "
            ".safetensors."
        )
    raise ArtifactError(
        f"{path} is not a learned artifact personalize knows: expected a LoRA "
        "(pytorch_lora_weights.safetensors), a Textual Inversion embedding, a hypernetwork "
        "or a fine-tuned diffusers pipeline folder"
    )


def _refused_pickle(path: Path) -> str | None:
    """torch's reason when a weights_only load refuses `path` for a global (code to run)."""
    import pickle
    import zipfile

    if not path.is_file() or path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        return None
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        return next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), None)
    except Exception:  # unreadable for another reason: not a refusal
        return None
    return None


def load(pipe, path: str | Path, strength: float = 1.0, adapter_name: str | None = None):
    """Load a learned artifact (file or training output folder) into `pipe`; return `pipe`."""
    path = Path(path)
    kind = detect_artifact(path)
    for name, _, apply in LOADERS:
        if name == kind:
            apply(pipe, path, strength, adapter_name)
            logger.info("loaded %s from %s (strength %s)", kind, path, strength)
    return pipe


# ------------------------------------------------------------------------------ generation


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    negative_prompt: str | None = None,
    progress: bool = False,
) -> list[list[Image.Image]]:
    """images[p][s]: prompt p with seed s. Each image has its own generator, so an image
    depends only on (prompt, seed), not on batch size or order. `progress`: a bar counting
    the images over all prompts."""
    out = []
    bar = tqdm(total=len(prompts) * len(seeds), desc="sample", unit="image", disable=not progress)
    for prompt in prompts:
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        images = pipe(
            [prompt] * len(seeds),
            negative_prompt=[negative_prompt] * len(seeds) if negative_prompt else None,
            generator=generators,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
        ).images
        out.append(images)
        bar.update(len(seeds))
    bar.close()
    return out


def make_grid(
    rows: list[list[Image.Image]],
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    cell: int | None = None,
) -> Image.Image:
    """Images in a labelled grid (rows x columns), upscaled so small images stay readable."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    size = cell or max(128, rows[0][0].width)
    label_w = 200 if row_labels else 0
    label_h = 24 if col_labels else 0
    grid = Image.new("RGB", (label_w + n_cols * size, label_h + n_rows * size), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(col_labels or []):
        draw.text((label_w + c * size + 4, 6), text[:40], fill="black")
    for r, row in enumerate(rows):
        if row_labels:
            _draw_wrapped(draw, row_labels[r], (4, label_h + r * size + 4), width_chars=30)
        for c, img in enumerate(row):
            grid.paste(
                img.convert("RGB").resize((size, size), Image.NEAREST),
                (label_w + c * size, label_h + r * size),
            )
    return grid


def _draw_wrapped(
    draw: ImageDraw.ImageDraw, text: str, xy: tuple[int, int], width_chars: int
) -> None:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width_chars and line:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    draw.multiline_text(xy, "\n".join(lines[:6]), fill="black")
