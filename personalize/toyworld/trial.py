"""One trial of the quality benchmark: one variant x subject x training seed, trained (in a
fresh Python process, so its peak memory is its own), loaded into a fresh base pipeline,
sampled on fixed prompts x seeds and scored with the shipped classifier (`scoring.py`).

    python -m personalize.toyworld.trial [--threads N] CONFIG RESULT

trains one config in this process and writes its time and memory to RESULT: the fresh
process `train_variant` starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from personalize.errors import TrainingError
from personalize.toyworld.recipes import subject_phrase
from personalize.toyworld.variants import GENERATION, variant_config

# ------------------------------------------------------------------------------ training


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _train_here(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    import torch

    from personalize import train
    from personalize.config import from_dict

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run_dir = train(from_dict(cfg_dict))
    seconds = time.perf_counter() - start
    return {
        "run_dir": str(run_dir),
        "train_seconds": round(seconds, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if torch.cuda.is_available()
        else None,
    }


def _adapter_file_kb(run_dir: Path) -> float | None:
    """The size of the adapter file personalize.load reads (LoRA/LoHa/LoKr); None for
    other methods."""
    from personalize.adapters.lora import detect_lora

    file = detect_lora(run_dir)
    return round(file.stat().st_size / 1024, 1) if file else None


def train_variant(cfg_dict: dict[str, Any], work: Path, isolated: bool) -> dict[str, Any]:
    """Train one config; `isolated` runs it in a fresh Python process so its peak memory is
    its own (the parent's sampling and earlier runs do not count)."""
    if not isolated:
        return _train_here(cfg_dict)
    work.mkdir(parents=True, exist_ok=True)
    cfg_file, result_file = work / "config.json", work / "train_result.json"
    cfg_file.write_text(json.dumps(cfg_dict, indent=2))
    result_file.unlink(missing_ok=True)
    import torch

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "personalize.toyworld.trial",
            "--threads",
            str(torch.get_num_threads()),
            str(cfg_file),
            str(result_file),
        ],
        capture_output=True,
        text=True,
    )
    (work / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result_file.is_file():
        raise TrainingError(
            f"training {cfg_dict['method']} failed (exit {proc.returncode}); "
            f"log: {work / 'train.log'}\n{proc.stderr[-2000:]}"
        )
    return json.loads(result_file.read_text())


# ------------------------------------------------------------------------------ scoring


def eval_backgrounds(subject, count: int) -> list[str]:
    """Backgrounds asked for in the prompts: contrasting ones, in a fixed order."""
    order = ("green", "blue", "black", "yellow", "purple", "white", "red")
    return [c for c in order if c not in subject.colors][:count]


def prompt_sets(subject, phrase: str, backgrounds: list[str]) -> tuple[list[str], list[str]]:
    subject_prompts = [f"a {phrase}"] + [f"a {phrase} on a {bg} background" for bg in backgrounds]
    class_prompts = [f"a {subject.class_word}"] + [
        f"a {subject.class_word} on a {bg} background" for bg in backgrounds
    ]
    return subject_prompts, class_prompts


def score_pipeline(
    pipe,
    classifier,
    subject,
    phrase: str,
    instances: np.ndarray,
    seeds: list[int],
    backgrounds: list[str],
) -> tuple[dict[str, float], dict]:
    """Metrics for one pipeline, and its images by prompt (for grids)."""
    from personalize.toyworld.evaluate import sample
    from personalize.toyworld.scoring import (
        background_rate,
        diversity,
        feature_similarity,
        subject_match_rate,
    )

    subject_prompts, class_prompts = prompt_sets(subject, phrase, backgrounds)
    prompts = subject_prompts + class_prompts
    flat_prompts = [p for p in prompts for _ in seeds]
    flat_seeds = [s for _ in prompts for s in seeds]
    images = sample(
        pipe,
        flat_prompts,
        flat_seeds,
        steps=GENERATION["steps"],
        guidance_scale=GENERATION["guidance_scale"],
    )
    n = len(seeds)
    by_prompt = {p: images[i * n : (i + 1) * n] for i, p in enumerate(prompts)}
    subj = np.concatenate([by_prompt[p] for p in subject_prompts])
    cls = np.concatenate([by_prompt[p] for p in class_prompts])
    recontext = np.concatenate([by_prompt[p] for p in subject_prompts[1:]])
    recontext_bgs = [bg for bg in backgrounds for _ in seeds]
    metrics = {
        "subject_fidelity": feature_similarity(classifier, subj, instances),
        "subject_match": subject_match_rate(classifier, subj, subject),
        "prompt_fidelity": background_rate(classifier, recontext, recontext_bgs),
        "pres": feature_similarity(classifier, cls, instances),
        "class_subject_match": subject_match_rate(classifier, cls, subject),
        "div": diversity(classifier, [by_prompt[p] for p in subject_prompts]),
    }
    return {k: round(v, 4) for k, v in metrics.items()}, by_prompt


def reference_scores(classifier, subject, instances: np.ndarray) -> dict[str, float]:
    """The instance images scored as if generated: the ceiling for fidelity."""
    from personalize.toyworld.scoring import subject_match_rate

    f = classifier.embed(instances)
    n = len(f)
    off_diag = (f @ f.T)[~np.eye(n, dtype=bool)]
    return {
        "subject_fidelity": round(float(off_diag.mean()), 4),
        "subject_match": round(subject_match_rate(classifier, instances, subject), 4),
        "div": round(float((1 - off_diag).mean()), 4),
    }


def run_trial(
    variant: str,
    subject,
    *,
    model: Path,
    data_dir: Path,
    run_dir: Path,
    log_dir: Path,
    steps: int | None,
    train_seed: int,
    isolated: bool,
    classifier,
    instances: np.ndarray,
    seeds: list[int],
    backgrounds: list[str],
) -> tuple[dict[str, Any], dict, str]:
    """Train `variant` on `subject` with `train_seed`, load the artifact into a fresh base
    pipeline and score it. Returns the results row, the images by prompt (for grids) and the
    phrase the prompts name the subject with."""
    from personalize import load
    from personalize.models import load_pipeline

    cfg = variant_config(variant, subject, model, data_dir, run_dir, steps, train_seed)
    trained = train_variant(cfg, log_dir, isolated)
    t = time.perf_counter()
    pipe = load(load_pipeline(str(model)), trained["run_dir"])
    phrase = subject_phrase(cfg["data"]["prompt"])
    metrics, images = score_pipeline(
        pipe, classifier, subject, phrase, instances, seeds, backgrounds
    )
    row = {
        "variant": variant,
        "subject": subject.name,
        "train_seed": train_seed,
        **metrics,
        "train_seconds": trained["train_seconds"],
        "peak_rss_mb": trained["peak_rss_mb"],
        "peak_cuda_mb": trained["peak_cuda_mb"],
        "file_kb": _adapter_file_kb(Path(trained["run_dir"])),
        "steps": cfg["train"]["max_steps"],
        "sample_seconds": round(time.perf_counter() - t, 1),
    }
    return row, images, phrase


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train one benchmark config (a fresh process).")
    p.add_argument("config", help="the config as JSON")
    p.add_argument("result", help="where the train time and peak memory go (JSON)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from personalize.io import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    result = _train_here(json.loads(Path(args.config).read_text()))
    atomic_write_json(Path(args.result), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
