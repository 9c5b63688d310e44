"""`personalize demo`: the whole journey offline in about a minute on a CPU.

Builds a tiny Stable Diffusion model in code, writes a few images of one subject, trains
the chosen method on them through the real loop, loads the artifact into a fresh pipeline
and draws before/after samples with fixed seeds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEMO_PROMPT = "a photo of sks disc"


def demo_config(method: str, out: Path, steps: int) -> dict[str, Any]:
    from personalize.config import _merge
    from personalize.methods.base import get_method

    base = {
        "method": method,
        "output_dir": str(out / method),
        "overwrite": True,
        "seed": 0,
        "model": {"path": str(out / "base_model")},
        "data": {"path": str(out / "instance_images"), "prompt": DEMO_PROMPT,
                 "random_flip": True},
        "train": {"max_steps": steps, "resolution": 32, "batch_size": 2, "lr": 1e-3,
                  "report_to": "none", "log_every": 10, "lr_warmup_steps": 5},
    }
    return _merge(base, get_method(method).demo_overrides())


def run_demo(method: str = "lora", out: str | Path = "outputs/demo", steps: int = 60,
             seeds: tuple[int, ...] = (0, 1, 2, 3)) -> dict[str, Any]:
    from personalize import load, train
    from personalize.config import from_dict
    from personalize.inference import generate, make_grid
    from personalize.models import load_pipeline
    from personalize.testing import save_tiny_pipeline, write_synthetic_images

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "base_model" / "model_index.json").is_file():
        logger.info("building a tiny Stable Diffusion model in %s", out / "base_model")
        save_tiny_pipeline(out / "base_model")
    write_synthetic_images(out / "instance_images", count=6)
    cfg = from_dict(demo_config(method, out, steps))
    run_dir = train(cfg)
    summary_train = json.loads((run_dir / "summary.json").read_text())

    # The method may change the instance prompt (e.g. TI's placeholder token); sample with it.
    prompts = [(cfg.validation.prompts or [cfg.data.prompt or DEMO_PROMPT])[0], "a photo of a dog"]
    base = load_pipeline(str(out / "base_model"))
    before = generate(base, prompts, list(seeds), num_inference_steps=20, resolution=32)
    tuned = load(load_pipeline(str(out / "base_model")), run_dir)
    after = generate(tuned, prompts, list(seeds), num_inference_steps=20, resolution=32)
    rows = [before[0], after[0], before[1], after[1]]
    labels = [f"base: {prompts[0]}", f"{method}: {prompts[0]}",
              f"base: {prompts[1]}", f"{method}: {prompts[1]}"]
    grid_path = out / f"{method}_before_after.png"
    make_grid(rows, row_labels=labels, col_labels=[f"seed {s}" for s in seeds]).save(grid_path)

    def change(a, b):
        return float(np.mean([np.abs(np.asarray(x, float) - np.asarray(y, float)).mean()
                              for x, y in zip(a, b)]))

    summary = {
        "method": method,
        "steps": summary_train["step"],
        "train_seconds": round(summary_train["seconds"], 2),
        "it_per_s": round(summary_train["it_per_s"], 2),
        "first_step_seconds": round(summary_train["first_step_seconds"], 2),
        "mean_pixel_change_instance_prompt": round(change(before[0], after[0]), 2),
        "mean_pixel_change_other_prompt": round(change(before[1], after[1]), 2),
        "artifact": str(run_dir),
        "grid": str(grid_path),
    }
    (out / f"{method}_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
