"""The evaluation config: what to compare, which prompts and seeds, how to sample, which
metric models. Parsed as strictly as the training config (unknown keys name themselves)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalize.config import build, merge, parse_overrides, read_yaml_mapping
from personalize.errors import need


@dataclass
class ArtifactSpec:
    # A LoRA folder/file, Textual Inversion embedding, hypernetwork file, DreamBooth
    # pipeline folder, or a run's `best/` folder: anything `personalize.load` accepts.
    path: str = ""
    # Column title and image folder name; default: the folder/file name.
    label: str | None = None
    strength: float = 1.0
    # The identifier this artifact was trained with, when it differs from prompts.token
    # (e.g. "<concept>" for Textual Inversion).
    token: str | None = None


@dataclass
class PromptsConfig:
    template_set: str = "object"  # object | live (DreamBench); ignored when `file` is set
    # A .txt (one prompt per line), .json or .yaml list; may use {token} and {class_name}.
    file: str | None = None
    count: int | None = None  # only the first N prompts (quick looks); None = all
    token: str = "sks"
    class_name: str = ""
    # Prompts without the identifier, for PRES; [] turns PRES off.
    class_prompts: list[str] = field(default_factory=lambda: ["a photo of a {class_name}"])
    negative_prompt: str | None = None


@dataclass
class GenerationConfig:
    seeds: list[int] | None = None  # explicit seeds; None = seed, seed+1, ... (num_images)
    seed: int = 0
    num_images: int = 4
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    # A diffusers scheduler class, with or without the "Scheduler" suffix: DDIM,
    # EulerDiscrete, EulerAncestralDiscrete, DPMSolverMultistep, PNDM, ... None = the model's.
    scheduler: str | None = None
    resolution: int | None = None  # None = the model's native size
    batch_size: int = 4
    device: str | None = None  # None = cuda when available, else cpu
    dtype: str = "fp32"  # fp32 | fp16 | bf16

    def seed_list(self) -> list[int]:
        if self.seeds is not None:
            return list(self.seeds)
        return list(range(self.seed, self.seed + self.num_images))


@dataclass
class MetricsConfig:
    # Local model folders (nothing is downloaded). Without one, its metrics read
    # "not computed (no model given)".
    clip_model: str | None = None  # e.g. openai/clip-vit-large-patch14, saved locally
    dino_model: str | None = None  # e.g. facebook/dino-vits16, saved locally
    # The real subject images (any layout data.path accepts) for CLIP-I, DINO and PRES.
    instance_data: str | None = None
    batch_size: int = 16


@dataclass
class ReportConfig:
    # Inline every image into report.html (one file to send around); default: relative links.
    embed_images: bool = False
    # train_log.jsonl files or run folders for loss curves; [] = look next to each artifact.
    train_logs: list[str] = field(default_factory=list)
    cell_size: int | None = None  # grid cell in pixels; None = image size, 128..256


@dataclass
class ConceptSpec:
    # One concept of a multi-concept artifact (docs/evaluation.md, "Several concepts"): its
    # prompts use its own token and class, its CLIP-I/DINO/PRES its own real images.
    name: str = ""  # row label and folder name; default: the token
    token: str = ""
    class_name: str | None = None  # None = prompts.class_name
    instance_data: str | None = None  # None = metrics.instance_data


@dataclass
class EvaluationConfig:
    model: str = ""  # the base model: diffusers folder or single-file checkpoint
    artifacts: list[ArtifactSpec] = field(default_factory=list)
    output_dir: str = "outputs/eval"
    # Regenerate images that exist instead of reusing them (and accept changed settings).
    overwrite: bool = False
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # Several concepts (tokens) learned in one artifact: each is evaluated on its own and
    # the report lists every concept and their mean. [] = the one concept of prompts.token.
    concepts: list[ConceptSpec] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _normalize_artifacts(data: dict[str, Any]) -> dict[str, Any]:
    """`artifacts` may list plain paths or "LABEL=PATH" strings besides mappings."""
    items = data.get("artifacts")
    if not isinstance(items, list):
        return data
    out = []
    for item in items:
        if isinstance(item, str):
            label, sep, path = item.partition("=")
            item = {"path": path, "label": label} if sep else {"path": item}
        out.append(item)
    return {**data, "artifacts": out}


def evaluation_from_dict(data: dict[str, Any]) -> EvaluationConfig:
    cfg = build(EvaluationConfig, _normalize_artifacts(data))
    validate(cfg)
    return cfg


def load_evaluation_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> EvaluationConfig:
    """YAML file (optional), then dotted overrides, then `extra` (the CLI flags) on top."""
    data: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides or []))
    data = merge(data, extra or {})
    return evaluation_from_dict(data)


def validate(cfg: EvaluationConfig) -> None:
    need(bool(cfg.model), "model", "set the base model (a diffusers folder or .safetensors)")
    for i, a in enumerate(cfg.artifacts):
        need(bool(a.path), f"artifacts[{i}].path", "is empty")
        need(a.label != "base", f"artifacts[{i}].label", "'base' is the original model's column")
    g = cfg.generation
    seeds = g.seed_list()
    need(len(seeds) > 0, "generation.seeds", "needs at least one seed")
    need(all(s >= 0 for s in seeds), "generation.seeds", "seeds must be >= 0")
    need(len(set(seeds)) == len(seeds), "generation.seeds", f"has duplicates: {seeds}")
    need(g.num_images > 0, "generation.num_images", "must be > 0")
    need(g.num_inference_steps > 0, "generation.num_inference_steps", "must be > 0")
    need(g.batch_size > 0, "generation.batch_size", "must be > 0")
    need(
        g.resolution is None or (g.resolution >= 8 and g.resolution % 8 == 0),
        "generation.resolution",
        "must be a positive multiple of 8 or null",
    )
    need(
        g.dtype in ("fp32", "fp16", "bf16"),
        "generation.dtype",
        f"must be fp32, fp16 or bf16, got {g.dtype!r}",
    )
    p = cfg.prompts
    need(p.count is None or p.count > 0, "prompts.count", "must be > 0 or null")
    need(cfg.metrics.batch_size > 0, "metrics.batch_size", "must be > 0")
    names = []
    for i, concept in enumerate(cfg.concepts):
        need(bool(concept.token), f"concepts[{i}].token", "is empty; give the concept's token")
        name = concept.name or concept.token
        need(name not in names, f"concepts[{i}].name", f"{name!r} is used by two concepts")
        names.append(name)
    c = cfg.report.cell_size
    need(c is None or 16 <= c <= 1024, "report.cell_size", "must be in [16, 1024] or null")
