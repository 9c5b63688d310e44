"""Use what was learned: load any artifact into a pipeline with one call, and generate.

`load(pipe, path)` recognizes the artifact by its files and hands it to the loader of its
kind. Each loader is a pair (detect, apply) registered in `LOADERS`, so a new artifact
type is one entry, not a new branch here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from personalize.adapters.lora import detect_lora, load_lora
from personalize.adapters.pipeline import is_pipeline_dir, load_pipeline_dir
from personalize.errors import ArtifactError, ArtifactNotFoundError
from personalize.io import refused_global

logger = logging.getLogger(__name__)


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
    from personalize.adapters.embedding_load import apply_embedding

    apply_embedding(pipe, path, strength, adapter_name)


Detect = Callable[[Path], object]
Apply = Callable[..., None]

# (name, detect(path) -> truthy when it is this kind, apply(pipe, path, strength, adapter_name))
LOADERS: list[tuple[str, Detect, Apply]] = [
    ("lora", detect_lora, load_lora),
    ("pipeline", is_pipeline_dir, load_pipeline_dir),
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
        return refused_global(e)
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
    if kind in ("lora", "pipeline"):
        _load_pivotal_embedding(pipe, path)
    return pipe


def _load_pivotal_embedding(pipe, path: Path) -> None:
    """A pivotal tuning run folder holds its token's embedding beside the LoRA (or
    pipeline): the one without the other draws neither the subject nor its token."""
    from personalize.adapters.embedding_load import load_embedding
    from personalize.adapters.embeddings import DIFFUSERS_FILE, expand_tokens, read_embedding

    file = path / DIFFUSERS_FILE
    if not (path.is_dir() and file.is_file()):
        return
    emb = read_embedding(file)
    token = emb.token
    if token in pipe.__dict__.get("_personalize_embedding_tokens", []):
        # Loaded before (the same folder again, e.g. a re-run cell): its rows are replaced
        # in place, as the LoRA adapter is, instead of failing on a taken token.
        ids = pipe.tokenizer.convert_tokens_to_ids(expand_tokens(token, emb.num_vectors))
        table = pipe.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[ids] = emb.vectors.to(table.device, table.dtype)
        logger.info("pivotal tuning: embedding %s was loaded already; its rows replaced", token)
        return
    load_embedding(pipe, file)  # logs the token to write, warns on prompts without it
    logger.info("pivotal tuning: loaded the LoRA and the embedding; write %s in prompts", token)


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
