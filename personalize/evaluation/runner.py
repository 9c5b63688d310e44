"""Resumable, batched generation: the same prompts and seeds for the base model and for
each learned artifact, one PNG per (column, prompt, seed).

An image depends only on (model, prompt, seed, settings): every image gets its own
torch.Generator, so a batch's composition does not change what is drawn. That makes a
crashed or extended run resumable: PNGs already on disk are reused, and `generation.json`
records the settings and artifacts they were made with so stale images are never mixed in.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from personalize.config import ConfigError
from personalize.evaluation.config import EvaluationConfig
from personalize.evaluation.prompts import Prompt
from personalize.io import atomic_save_png
from personalize.precision import precision_dtype

logger = logging.getLogger(__name__)

BASE_LABEL = "base"
STATE_FILE = "generation.json"
IMAGES_DIR = "images"
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".ckpt", ".pth"}


@dataclass
class Column:
    """One column of the comparison: the base model, or the base model + one artifact."""

    label: str
    artifact: Path | None = None
    kind: str | None = None  # the `personalize.inference.LOADERS` entry that loads it
    strength: float = 1.0
    token: str = "sks"

    @property
    def is_base(self) -> bool:
        return self.artifact is None

    def image_path(self, out: Path, prompt: Prompt, seed: int, class_name: str) -> Path:
        return (
            out
            / IMAGES_DIR
            / self.label
            / prompt.folder_name(self.token, class_name)
            / f"seed{seed}.png"
        )


def _default_label(path: Path) -> str:
    """`run/best` and `run/checkpoints/step-100` name their run too: `run-best`."""
    name = path.stem if path.is_file() else path.name
    if name == "best" or name.startswith(("step-", "checkpoint")):
        return (
            f"{path.parent.name}-{name}"
            if path.parent.name != "checkpoints"
            else f"{path.parent.parent.name}-{name}"
        )
    return name


def _safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "artifact"


def build_columns(cfg: EvaluationConfig) -> list[Column]:
    """The base column, then one per artifact; every artifact is recognized up front so a
    wrong path fails before minutes of sampling, not after."""
    from personalize.inference import detect_artifact

    columns = [Column(BASE_LABEL, token=cfg.prompts.token)]
    seen = {BASE_LABEL}
    for i, spec in enumerate(cfg.artifacts):
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise ConfigError(f"artifacts[{i}].path: {path} does not exist")
        label = _safe_label(spec.label or _default_label(path))
        if label in seen:
            if spec.label:
                raise ConfigError(
                    f"artifacts[{i}].label: {label!r} is used twice; labels "
                    "name the image folders and must be unique"
                )
            n = 2
            while f"{label}-{n}" in seen:
                n += 1
            label = f"{label}-{n}"
        seen.add(label)
        columns.append(
            Column(
                label,
                path,
                detect_artifact(path),
                spec.strength,
                spec.token if spec.token is not None else cfg.prompts.token,
            )
        )
    return columns


def fingerprint(path: Path) -> str:
    """Names, sizes and modification times of the artifact's weight files: changes when
    the artifact is retrained in place, so its old images are not silently reused. Only the
    folder itself and a pipeline's component folders count, not a run's best/, checkpoints/
    or caches, which change without changing this artifact."""
    if path.is_file():
        files = [path]
    else:
        folders = [path]
        index = path / "model_index.json"
        if index.is_file():
            components = json.loads(index.read_text(encoding="utf-8"))
            folders += [path / k for k in components if not k.startswith("_")]
        files = [
            p
            for folder in folders
            if folder.is_dir()
            for p in folder.iterdir()
            if p.is_file() and p.suffix in _WEIGHT_SUFFIXES
        ]
    h = hashlib.sha1()
    for p in sorted(files):
        st = p.stat()
        h.update(f"{p.relative_to(path.parent)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def generation_settings(cfg: EvaluationConfig) -> dict[str, Any]:
    """What an image depends on besides its column, prompt and seed."""
    g = cfg.generation
    return {
        "model": str(Path(cfg.model).expanduser().resolve())
        if Path(cfg.model).exists()
        else cfg.model,
        "num_inference_steps": g.num_inference_steps,
        "guidance_scale": g.guidance_scale,
        "scheduler": g.scheduler,
        "resolution": g.resolution,
        "dtype": g.dtype,
        "negative_prompt": cfg.prompts.negative_prompt,
    }


def column_record(column: Column) -> dict[str, Any]:
    if column.is_base:
        return {"artifact": None}
    return {
        "artifact": str(column.artifact.resolve()),
        "kind": column.kind,
        "strength": column.strength,
        "fingerprint": fingerprint(column.artifact),
    }


def check_and_record_state(cfg: EvaluationConfig, columns: list[Column], out: Path) -> None:
    """Refuse to mix images made with other settings or another version of an artifact
    (unless overwrite, which regenerates them), then record the current state."""
    from personalize.io import atomic_write_json

    file = out / STATE_FILE
    settings = generation_settings(cfg)
    old = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
    if old and not any((out / IMAGES_DIR).rglob("*.png")):
        old = None  # nothing was drawn under the old settings: nothing to protect
    recorded: dict[str, Any] = {}
    if old and not cfg.overwrite:
        changed = {
            k: (old["settings"].get(k), v)
            for k, v in settings.items()
            if old["settings"].get(k) != v
        }
        if changed:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(
                f"{out} holds images made with other settings ({what}). Use "
                "another output_dir, or overwrite=true to regenerate them."
            )
        recorded = old.get("columns", {})
        for column in columns:
            before, now = recorded.get(column.label), column_record(column)
            if before is not None and before != now:
                raise ConfigError(
                    f"{out}: the images of column {column.label!r} were made from "
                    f"{before.get('artifact')} (as recorded in {file}), which differs from or "
                    f"changed since then ({now.get('artifact')}). Give the artifact another "
                    "label, use another output_dir, or set overwrite=true to regenerate."
                )
    for column in columns:
        recorded[column.label] = column_record(column)
    atomic_write_json(file, {"settings": settings, "columns": recorded})


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


COMMON_SCHEDULERS = (
    "DDIM",
    "DDPM",
    "PNDM",
    "LMSDiscrete",
    "EulerDiscrete",
    "EulerAncestralDiscrete",
    "HeunDiscrete",
    "KDPM2Discrete",
    "DPMSolverMultistep",
    "DPMSolverSinglestep",
    "DEISMultistep",
    "UniPCMultistep",
)


def scheduler_class(name: str):
    """The diffusers scheduler class for "DDIM" or "DDIMScheduler"; checked before any
    model is loaded so a typo costs nothing."""
    import diffusers

    cls_name = name if name.endswith("Scheduler") else f"{name}Scheduler"
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ConfigError(
            f"generation.scheduler: diffusers has no {cls_name}; common ones "
            f"for Stable Diffusion: {', '.join(COMMON_SCHEDULERS)}"
        )
    return cls


def make_scheduler(pipe, name: str | None):
    """The named scheduler, configured from the model's own so betas, timestep spacing and
    prediction type stay right; None keeps the model's."""
    if not name:
        return pipe.scheduler
    return scheduler_class(name).from_config(pipe.scheduler.config)


def load_column_pipeline(cfg: EvaluationConfig, column: Column, device: str):
    """A freshly loaded base pipeline (nothing leaks from one column into the next), the
    chosen scheduler, and the column's artifact on top."""
    from personalize.inference import load
    from personalize.models import load_pipeline

    dtype = precision_dtype(cfg.generation.dtype)
    pipe = load_pipeline(cfg.model, torch_dtype=dtype)
    pipe.scheduler = make_scheduler(pipe, cfg.generation.scheduler)
    pipe.to(device)
    if not column.is_base:
        before = set(pipe.tokenizer.get_added_vocab())
        load(pipe, column.artifact, strength=column.strength)
        added = sorted(set(pipe.tokenizer.get_added_vocab()) - before)
        if added and column.token not in added:
            # An embedding that is never in the prompt changes nothing: the classic
            # "my Textual Inversion does nothing" report.
            logger.warning(
                "column %s: the artifact adds the token(s) %s but the prompts use "
                "%r; set its `token` (artifacts[].token) to use the embedding",
                column.label,
                ", ".join(added),
                column.token,
            )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_batch(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int | None,
    negative_prompt: str | None,
) -> list:
    """images[i] for (prompts[i], seeds[i]); each image has its own CPU generator, so it is
    the same whatever else shares its batch and on whichever device the model runs."""
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    return pipe(
        prompts,
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        generator=generators,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=resolution,
        width=resolution,
    ).images


def check_generation_settings(cfg: EvaluationConfig) -> str:
    """Settings errors before anything is recorded or loaded; returns the device."""
    g = cfg.generation
    if g.scheduler:
        scheduler_class(g.scheduler)
    device = g.device or default_device()
    if device == "cpu" and g.dtype == "fp16":
        raise ConfigError("generation.dtype: fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return device


def generate_all(
    cfg: EvaluationConfig, columns: list[Column], prompts: list[Prompt], seeds: list[int], out: Path
) -> dict[str, int]:
    """Draw every missing (column, prompt, seed) image; returns generated/reused counts.

    Batches are fixed slices of the column's full (prompt, seed) list, and a slice with any
    image missing is drawn whole: a resumed run then computes each image in the same batch
    as an uninterrupted run, so even float rounding (batched matmuls) matches bit for bit.
    """
    g, class_name = cfg.generation, cfg.prompts.class_name
    device = check_generation_settings(cfg)
    todo: dict[str, list[list[tuple[str, int, Path]]]] = {}
    reused = missing = 0
    for column in columns:
        jobs = [
            (
                prompt.text(column.token, class_name),
                seed,
                column.image_path(out, prompt, seed, class_name),
            )
            for prompt in prompts
            for seed in seeds
        ]
        chunks = [jobs[i : i + g.batch_size] for i in range(0, len(jobs), g.batch_size)]
        todo[column.label] = [
            c for c in chunks if cfg.overwrite or any(not p.is_file() for *_, p in c)
        ]
        n_missing = len(jobs) if cfg.overwrite else sum(not p.is_file() for *_, p in jobs)
        missing += n_missing
        reused += len(jobs) - n_missing
    if reused:
        logger.info("reusing %d images already in %s", reused, out / IMAGES_DIR)
    bar = tqdm(total=missing, desc="generate", unit="img", disable=missing == 0)
    for column in columns:
        if not todo[column.label]:
            continue  # everything on disk: do not even load the pipeline
        bar.set_description(f"generate {column.label}")
        pipe = load_column_pipeline(cfg, column, device)
        for chunk in todo[column.label]:
            images = generate_batch(
                pipe,
                [p for p, _, _ in chunk],
                [s for _, s, _ in chunk],
                num_inference_steps=g.num_inference_steps,
                guidance_scale=g.guidance_scale,
                resolution=g.resolution,
                negative_prompt=cfg.prompts.negative_prompt,
            )
            for image, (_, _, path) in zip(images, chunk):
                if cfg.overwrite or not path.is_file():
                    atomic_save_png(image, path)
                    bar.update(1)
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    bar.close()
    return {"generated": missing, "reused": reused}
