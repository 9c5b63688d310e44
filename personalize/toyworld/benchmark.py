"""The quality benchmark: does each trainer learn a subject, keep following prompts, and
leave its class alone? Measured on the toy world, like the DreamBooth paper's tables.

For every variant (Textual Inversion; DreamBooth without prior, with prior preservation,
with L2-SP, with the distillation prior; LoRA; hypernetwork) and every subject, it trains
with one fixed recipe and seed, loads the artifact into a fresh pipeline, draws fixed
prompts x seeds and scores them with the shipped classifier (see `scoring.py`):
subject fidelity and subject match for "a sks heart ...", prompt fidelity for "... on a
green background", PRES and the class images' subject match for "a heart ...", DIV, and
the train time and peak memory of the training process. The base model gets the same
prompts ("sks" is a word it never saw), and the instance images themselves give the upper
bound.

    python benchmarks/quality.py                  # every variant x subject
    python benchmarks/quality.py --write-docs     # + docs/benchmarks.md "Quality" section

The recipes (RECIPES in `variants.py`) are the same for every subject and were not tuned
on this benchmark's numbers to make a method win. One trial (train, load, sample, score) is
`trial.py`; the means, tables and the docs section are `results.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from personalize.errors import ConfigError
from personalize.toyworld.recipes import IDENTIFIER
from personalize.toyworld.results import markdown_table, merge_results, summarize, write_docs
from personalize.toyworld.trial import (
    eval_backgrounds,
    prompt_sets,
    reference_scores,
    run_trial,
    score_pipeline,
)
from personalize.toyworld.variants import (
    ALL_RECIPES,
    COMMON,
    DIAGNOSTICS,
    GENERATION,
    SUBJECT_NAMES,
    VARIANTS,
)

logger = logging.getLogger(__name__)


def run(
    out: str | Path,
    subjects: list[str] | None = None,
    variants: list[str] | None = None,
    steps: int | None = None,
    seeds: int = 4,
    backgrounds: int = 3,
    isolated: bool = True,
    num_instances: int = 5,
    train_seeds: list[int] | None = None,
) -> dict[str, Any]:
    """Every variant x subject x training seed, trained, sampled and scored. The sampling
    seeds are the same for every training seed, so the spread over training seeds is the
    trainers' own run-to-run variation."""
    from PIL import Image

    from personalize.io import atomic_write_json
    from personalize.models import load_pipeline
    from personalize.toyworld import base_model_path, load_classifier
    from personalize.toyworld.subjects import get_subject, write_instance_images

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    subjects = list(subjects or SUBJECT_NAMES)
    variants = list(variants or VARIANTS)
    unknown = sorted(set(variants) - set(ALL_RECIPES))
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; known: {', '.join(ALL_RECIPES)}")
    model = base_model_path()
    classifier = load_classifier()
    seed_list = list(range(seeds))
    train_seeds = list(train_seeds or [0])
    results: dict[str, Any] = {
        "settings": {
            "subjects": subjects,
            "variants": variants,
            "seeds": seed_list,
            "train_seeds": train_seeds,
            "backgrounds_per_subject": backgrounds,
            "instances": num_instances,
            "generation": GENERATION,
            "steps_override": steps,
            "recipes": {v: ALL_RECIPES[v] for v in variants},
            "common": COMMON,
            "isolated_processes": isolated,
            "base_model": _portable(model),
        },
        "runs": [],
    }
    base_pipe = load_pipeline(str(model))
    for subject_name in subjects:
        subject = get_subject(subject_name)
        data_dir = out / "instances" / subject.name
        paths = write_instance_images(subject, data_dir, count=num_instances)
        instances = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
        bgs = eval_backgrounds(subject, backgrounds)
        grid_rows = {"instance images": list(instances)}
        results["runs"].append(
            {
                "variant": "real_images",
                "subject": subject.name,
                **reference_scores(classifier, subject, instances),
            }
        )
        phrase = f"{IDENTIFIER} {subject.class_word}"
        t = time.perf_counter()
        metrics, images = score_pipeline(
            base_pipe, classifier, subject, phrase, instances, seed_list, bgs
        )
        results["runs"].append(
            {
                "variant": "base",
                "subject": subject.name,
                **metrics,
                "sample_seconds": round(time.perf_counter() - t, 1),
            }
        )
        grid_rows["base"] = _grid_row(images, subject, phrase, bgs)
        logger.info("%s base: %s", subject.name, metrics)
        for variant in variants:
            for train_seed in train_seeds:
                name = variant if train_seed == train_seeds[0] else f"{variant}-seed{train_seed}"
                row, images, learned_phrase = run_trial(
                    variant,
                    subject,
                    model=model,
                    data_dir=data_dir,
                    run_dir=out / "runs" / subject.name / name,
                    log_dir=out / "logs" / subject.name / name,
                    steps=steps,
                    train_seed=train_seed,
                    isolated=isolated,
                    classifier=classifier,
                    instances=instances,
                    seeds=seed_list,
                    backgrounds=bgs,
                )
                results["runs"].append(row)
                if train_seed == train_seeds[0]:
                    grid_rows[variant] = _grid_row(images, subject, learned_phrase, bgs)
                logger.info("%s %s: %s", subject.name, name, row)
                atomic_write_json(out / "results.json", results)  # progress survives a stop
        grid = _grid(grid_rows, subject, bgs)
        grid.save(out / f"grid_{subject.name}.png")
    results["summary"] = summarize(results["runs"])
    atomic_write_json(out / "results.json", results)
    (out / "table.md").write_text(markdown_table(results))
    return results


def _portable(path: Path) -> str:
    """A path as results keep it: inside the package relative to it, else its name only, so
    no path of the machine that ran the benchmark goes into results.json."""
    package = Path(__file__).resolve().parents[1]
    try:
        return "personalize/" + Path(path).resolve().relative_to(package).as_posix()
    except ValueError:
        return Path(path).name


def _grid_row(images: dict[str, np.ndarray], subject, phrase: str, bgs: list[str]) -> list:
    subject_prompts, class_prompts = prompt_sets(subject, phrase, bgs)
    row = list(images[subject_prompts[0]][:2])
    row += [images[p][0] for p in subject_prompts[1:3]]
    row += list(images[class_prompts[0]][:2])
    return row


def _grid(rows: dict[str, list], subject, bgs: list[str]):
    from PIL import Image

    from personalize.inference import make_grid

    cols = (
        ["sks, seed 0", "sks, seed 1"]
        + [f"sks on {bg}" for bg in bgs[:2]]
        + [f"'a {subject.class_word}' 0", f"'a {subject.class_word}' 1"]
    )
    pil_rows = [[Image.fromarray(np.asarray(im)) for im in r] for r in rows.values()]
    return make_grid(pil_rows, row_labels=list(rows), col_labels=cols, cell=64)


# ------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="outputs/benchmark_quality")
    p.add_argument("--subjects", default=",".join(SUBJECT_NAMES))
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated; also the follow-ups: " + ", ".join(DIAGNOSTICS),
    )
    p.add_argument(
        "--steps", type=int, default=None, help="override every recipe's steps (for a smoke run)"
    )
    p.add_argument("--seeds", type=int, default=4, help="sampling seeds per prompt")
    p.add_argument(
        "--train-seeds",
        default="0",
        help="comma-separated training seeds; each variant x subject trains once per seed",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="RESULTS_JSON",
        default=None,
        help="combine results.json files of runs with other training seeds (then "
        "--out is where the first run's grids are) instead of running",
    )
    p.add_argument("--backgrounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="train in this process (faster start; peak memory then includes earlier runs)",
    )
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="update docs/benchmarks.md (Quality section) and docs/images/",
    )
    p.add_argument("--docs", default="docs")
    p.add_argument("--json", default="benchmarks/results/quality.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        results = merge_results([json.loads(Path(f).read_text()) for f in args.merge])
    else:
        results = run(
            args.out,
            subjects=args.subjects.split(","),
            variants=args.variants.split(","),
            steps=args.steps,
            seeds=args.seeds,
            backgrounds=args.backgrounds,
            isolated=not args.in_process,
            train_seeds=[int(x) for x in args.train_seeds.split(",")],
        )
    print(markdown_table(results))
    if args.write_docs:
        write_docs(results, Path(args.out), Path(args.docs), Path(args.json))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
