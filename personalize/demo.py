"""`personalize demo`: the whole journey offline, on a CPU, in a minute or two.

By default it runs on the toy world (`personalize.toyworld`): the pretrained mini Stable
Diffusion that ships with the package, and a subject it has never seen (a red heart with
white diagonal stripes and a blue dot). It writes the subject's instance images, trains the
chosen method on them through the real loop, loads the artifact into a fresh pipeline and
draws before/after samples with fixed seeds; the toy world's classifier says how often the
subject appears.

`world="tiny"` is the fast path for tests: a randomly initialized tiny model built in code
(`personalize.testing`) and a red disc on stripes; it shows that the pieces connect, not
that anything is learned.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from personalize.errors import ConfigError

logger = logging.getLogger(__name__)

WORLDS = ("toy", "tiny")
DEMO_PROMPT = "a photo of sks disc"  # the tiny world's subject
DEFAULT_SUBJECT = "striped_heart"
# On the toy world each method's `toy_world_recipe` gives the steps after which the subject
# shows in the samples (DreamBooth: clearly; LoRA and the hypernetwork: its colors and dot,
# blurred; TI: its colors only, since the base model cannot draw stripes): 20-60 s of
# training on an idle 2-core CPU, a few minutes on a busy one.
TINY_STEPS = 60


def _method_overrides(method: str) -> dict[str, Any]:
    from personalize.methods.base import get_method

    return get_method(method).demo_overrides()


def _clear_previous_demo(output_dir: str) -> None:
    """The demo owns its method folder: a rerun replaces it. (`overwrite: true` alone would
    keep the previous run in a dated folder beside it, as it does for users' runs.)"""
    import shutil

    shutil.rmtree(output_dir, ignore_errors=True)


def demo_config(
    method: str, out: Path, steps: int, world: str = "toy", subject: str = DEFAULT_SUBJECT
) -> dict[str, Any]:
    """The demo's config: common settings, then the method's `demo_overrides()`, then (on
    the toy world) what depends on the world: its model, subject, class and widths."""
    from personalize.config import merge_layers

    base = {
        "method": method,
        "output_dir": str(out / method),
        "overwrite": True,
        "seed": 0,
        "model": {"path": str(out / "base_model")},
        "data": {"path": str(out / "instance_images"), "prompt": DEMO_PROMPT, "random_flip": True},
        "train": {
            "max_steps": steps,
            "resolution": 32,
            "batch_size": 2,
            "lr": 1e-3,
            "report_to": "none",
            "log_every": 10,
            "lr_warmup_steps": 5,
        },
    }
    toy = [toy_overrides(method, subject, out)] if world == "toy" else []
    return merge_layers(base, _method_overrides(method), *toy)


def toy_overrides(method: str, subject_name: str, out: Path) -> dict[str, Any]:
    """Settings tied to the toy world, applied over the method's own demo overrides: its
    model and data, then how the method names the subject (`Method.toy_world_recipe`)."""
    from personalize.config import merge_layers
    from personalize.toyworld import base_model_path
    from personalize.toyworld.recipes import IDENTIFIER, toy_recipe
    from personalize.toyworld.subjects import get_subject

    subject = get_subject(subject_name)
    model = base_model_path()
    cfg: dict[str, Any] = {
        "model": {"path": str(model)},
        "data": {
            "path": str(out / f"instance_images_{subject.name}"),
            "prompt": f"a {IDENTIFIER} {subject.class_word}",
            # The subject's stripes and split halves are not mirror-symmetric.
            "random_flip": False,
        },
        "train": {"batch_size": 4},
    }
    # LoRA and DreamBooth learn with the recipes that keep the class (prior preservation with
    # the text encoder trained; docs/benchmarks.md, "Keeping the class"), as the shipped
    # configs do, so "a heart" stays a plain heart in the before/after grid.
    from personalize.toyworld.variants import RECIPES

    recommended = RECIPES.get(f"{method}_recommended", {}).get("config", {})
    return merge_layers(cfg, toy_recipe(method, subject, model)["config"], recommended)


def toy_steps(method: str) -> int:
    """The optimizer steps after which the toy world's subject shows, for `method`."""
    from personalize.toyworld import base_model_path
    from personalize.toyworld.recipes import toy_recipe
    from personalize.toyworld.subjects import get_subject

    return toy_recipe(method, get_subject(DEFAULT_SUBJECT), base_model_path())["steps"]


def run_demo(
    method: str = "lora",
    out: str | Path = "outputs/demo",
    steps: int | None = None,
    seeds: tuple[int, ...] = (0, 1, 2, 3),
    world: str = "toy",
    subject: str = DEFAULT_SUBJECT,
) -> dict[str, Any]:
    if world not in WORLDS:
        raise ConfigError(f"world must be one of {', '.join(WORLDS)}, got {world!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if world == "tiny":
        return _run_tiny(method, out, TINY_STEPS if steps is None else steps, seeds)
    return _run_toy(method, out, toy_steps(method) if steps is None else steps, seeds, subject)


def _change(a, b) -> float:
    return float(
        np.mean([np.abs(np.asarray(x, float) - np.asarray(y, float)).mean() for x, y in zip(a, b)])
    )


def _train_summary(run_dir: Path) -> dict[str, Any]:
    s = json.loads((run_dir / "summary.json").read_text())
    return {
        "steps": s["step"],
        "train_seconds": round(s["seconds"], 2),
        "it_per_s": round(s["it_per_s"], 2),
        "first_step_seconds": round(s["first_step_seconds"], 2),
    }


def _run_toy(
    method: str, out: Path, steps: int, seeds: tuple[int, ...], subject_name: str
) -> dict[str, Any]:
    from PIL import Image

    from personalize import load, train
    from personalize.config import from_dict
    from personalize.inference import generate, make_grid
    from personalize.models import load_pipeline
    from personalize.toyworld import load_classifier
    from personalize.toyworld.recipes import subject_phrase
    from personalize.toyworld.scoring import (
        background_rate,
        feature_similarity,
        subject_match_rate,
    )
    from personalize.toyworld.subjects import get_subject, write_instance_images

    subject = get_subject(subject_name)
    cfg = from_dict(demo_config(method, out, steps, "toy", subject_name))
    instance_paths = write_instance_images(subject, cfg.data.path, count=5)
    _clear_previous_demo(cfg.output_dir)
    run_dir = train(cfg)

    phrase = subject_phrase(cfg.data.prompt)
    background = next(c for c in ("green", "blue", "black") if c not in subject.colors)
    subject_prompt = f"a {phrase}"
    recontext_prompt = f"a {phrase} on a {background} background"
    class_prompt = f"a {subject.class_word}"
    # The base model cannot read TI's new token; its "before" is the class prompt.
    before = [
        p.replace(phrase, subject.class_word) if method == "textual_inversion" else p
        for p in (subject_prompt, recontext_prompt)
    ]
    gen = {"num_inference_steps": 20, "guidance_scale": 5.0, "resolution": 32}
    base = load_pipeline(cfg.model.path)
    b_subject, b_recontext, b_class = generate(base, before + [class_prompt], list(seeds), **gen)
    tuned = load(load_pipeline(cfg.model.path), run_dir)
    a_subject, a_recontext, a_class = generate(
        tuned, [subject_prompt, recontext_prompt, class_prompt], list(seeds), **gen
    )

    instances = [Image.open(p).convert("RGB") for p in instance_paths]
    rows = [
        instances[: len(seeds)],
        b_subject,
        a_subject,
        b_recontext,
        a_recontext,
        b_class,
        a_class,
    ]
    labels = [
        "instance images (the subject)",
        f"base: {before[0]}",
        f"{method}: {subject_prompt}",
        f"base: {before[1]}",
        f"{method}: {recontext_prompt}",
        f"base: {class_prompt}",
        f"{method}: {class_prompt}",
    ]
    grid_path = out / f"{method}_before_after.png"
    make_grid(rows, row_labels=labels, col_labels=[f"seed {s}" for s in seeds], cell=96).save(
        grid_path
    )

    clf = load_classifier()
    summary = {
        "method": method,
        "world": "toy",
        "subject": subject.name,
        "subject_description": subject.description,
        **_train_summary(run_dir),
        "prompt": subject_prompt,
        # How often the classifier sees the subject (its shape AND pattern) in the samples.
        "subject_match_before": subject_match_rate(clf, b_subject + b_recontext, subject),
        "subject_match_after": subject_match_rate(clf, a_subject + a_recontext, subject),
        # Feature similarity to the instance images (the DINO score's stand-in).
        "subject_similarity_before": round(
            feature_similarity(clf, b_subject + b_recontext, instances), 4
        ),
        "subject_similarity_after": round(
            feature_similarity(clf, a_subject + a_recontext, instances), 4
        ),
        f"{background}_background_rate_after": background_rate(
            clf, a_recontext, [background] * len(seeds)
        ),
        # The class prompt drawn as the subject: prior drift (lower is better).
        "class_prompt_subject_match_after": subject_match_rate(clf, a_class, subject),
        "mean_pixel_change_instance_prompt": round(_change(b_subject, a_subject), 2),
        "mean_pixel_change_other_prompt": round(_change(b_class, a_class), 2),
        "artifact": str(run_dir),
        "grid": str(grid_path),
    }
    (out / f"{method}_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _run_tiny(method: str, out: Path, steps: int, seeds: tuple[int, ...]) -> dict[str, Any]:
    from personalize import load, train
    from personalize.config import from_dict
    from personalize.inference import generate, make_grid
    from personalize.models import load_pipeline
    from personalize.testing import save_tiny_pipeline, write_synthetic_images

    if not (out / "base_model" / "model_index.json").is_file():
        logger.info("building a tiny Stable Diffusion model in %s", out / "base_model")
        save_tiny_pipeline(out / "base_model")
    write_synthetic_images(out / "instance_images", count=6)
    cfg = from_dict(demo_config(method, out, steps, world="tiny"))
    _clear_previous_demo(cfg.output_dir)
    run_dir = train(cfg)

    # The method may change the instance prompt (e.g. TI's placeholder token); sample with it.
    prompts = [(cfg.validation.prompts or [cfg.data.prompt or DEMO_PROMPT])[0], "a photo of a dog"]
    base = load_pipeline(str(out / "base_model"))
    before = generate(base, prompts, list(seeds), num_inference_steps=20, resolution=32)
    tuned = load(load_pipeline(str(out / "base_model")), run_dir)
    after = generate(tuned, prompts, list(seeds), num_inference_steps=20, resolution=32)
    rows = [before[0], after[0], before[1], after[1]]
    labels = [
        f"base: {prompts[0]}",
        f"{method}: {prompts[0]}",
        f"base: {prompts[1]}",
        f"{method}: {prompts[1]}",
    ]
    grid_path = out / f"{method}_before_after.png"
    make_grid(rows, row_labels=labels, col_labels=[f"seed {s}" for s in seeds]).save(grid_path)

    summary = {
        "method": method,
        "world": "tiny",
        **_train_summary(run_dir),
        "mean_pixel_change_instance_prompt": round(_change(before[0], after[0]), 2),
        "mean_pixel_change_other_prompt": round(_change(before[1], after[1]), 2),
        "artifact": str(run_dir),
        "grid": str(grid_path),
    }
    (out / f"{method}_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
