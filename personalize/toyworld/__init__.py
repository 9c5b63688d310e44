"""The toy world: a pretrained mini Stable Diffusion that ships with the project.

No real Stable Diffusion weights can be downloaded on every machine, so the demo, the
quality benchmark and the end-to-end tests run on a world of synthetic scenes ("a small
red heart on a blue background"): a generator (`world`), a small SD-architecture pipeline
pretrained on it and a classifier that reads its images, both trained by
`benchmarks/toyworld/pretrain.py` and shipped under `personalize/toyworld/weights/`, and
subjects the base model has never seen (`subjects`).

    from personalize.toyworld import base_model_path, load_classifier
    pipe = personalize.models.load_pipeline(str(base_model_path()))
"""

from __future__ import annotations

import os
from pathlib import Path

from personalize.errors import ModelLoadError

# PERSONALIZE_TOYWORLD_WEIGHTS points at another weights folder (e.g. a fresh
# `pretrain.py --out DIR`) without touching the shipped one.
WEIGHTS_DIR = Path(
    os.environ.get("PERSONALIZE_TOYWORLD_WEIGHTS") or Path(__file__).resolve().parent / "weights"
)
PIPELINE_DIR = WEIGHTS_DIR / "pipeline"
CLASSIFIER_DIR = WEIGHTS_DIR / "classifier"
REPORT_FILE = WEIGHTS_DIR / "pretrain_report.json"

_MISSING = (
    "the pretrained toy-world {what} is missing from {path}; it ships with the "
    "package (reinstall personalize) or can be rebuilt with "
    "`python benchmarks/toyworld/pretrain.py --out {weights}`"
)


def base_model_path() -> Path:
    """The shipped diffusers folder of the toy world's base model (for `model.path`)."""
    if not (PIPELINE_DIR / "model_index.json").is_file():
        raise ModelLoadError(
            _MISSING.format(what="pipeline", path=PIPELINE_DIR, weights=WEIGHTS_DIR)
        )
    return PIPELINE_DIR


def load_base_pipeline():
    """The base model as a StableDiffusionPipeline (fp32, CPU)."""
    from personalize.models import load_pipeline

    return load_pipeline(str(base_model_path()))


def load_classifier():
    """The shipped shape/color/background/size/pattern/dot classifier, in eval mode."""
    from personalize.toyworld.classifier import CLASSIFIER_CONFIG, ToyClassifier

    if not (CLASSIFIER_DIR / CLASSIFIER_CONFIG).is_file():
        raise ModelLoadError(
            _MISSING.format(what="classifier", path=CLASSIFIER_DIR, weights=WEIGHTS_DIR)
        )
    return ToyClassifier.load(CLASSIFIER_DIR)
