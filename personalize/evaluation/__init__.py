"""Evaluation: the same prompts and seeds for the base model and each learned artifact,
side-by-side grids, CLIP-T / CLIP-I / DINO / PRES / DIV, metrics.json/.csv, report.html."""

from personalize.evaluation.config import (
    ArtifactSpec,
    EvaluationConfig,
    evaluation_from_dict,
    load_evaluation_config,
)
from personalize.evaluation.evaluate import evaluate

__all__ = [
    "ArtifactSpec",
    "EvaluationConfig",
    "evaluate",
    "evaluation_from_dict",
    "load_evaluation_config",
]
