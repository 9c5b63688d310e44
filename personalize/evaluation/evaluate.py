"""`personalize evaluate`: generate, draw grids, score, and write metrics + report.html."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from personalize.config import ConfigError
from personalize.evaluation import metrics as M
from personalize.evaluation import report as R
from personalize.evaluation.config import EvaluationConfig
from personalize.evaluation.prompts import (
    DEFAULT_CLASS_PROMPTS,
    Prompt,
    clip_text,
    templates_for,
)
from personalize.evaluation.runner import (
    Column,
    build_columns,
    check_and_record_state,
    check_generation_settings,
    default_device,
    generate_all,
)
from personalize.io import atomic_write_text

logger = logging.getLogger(__name__)

METRIC_KEYS = ("clip_t", "clip_i", "dino", "pres", "div")
CSV_FIELDS = ("label", "artifact", "kind", "strength", "token", "num_images", *METRIC_KEYS)


def build_prompts(cfg: EvaluationConfig) -> list[Prompt]:
    p = cfg.prompts
    prompts = [Prompt(t) for t in templates_for(p.template_set, p.file, p.count)]
    class_prompts = list(p.class_prompts)
    if not p.class_name and any("{class_name}" in t for t in class_prompts):
        if class_prompts != DEFAULT_CLASS_PROMPTS:
            raise ConfigError(
                "prompts.class_prompts use {class_name} but prompts.class_name "
                "is empty; set it (e.g. dog) or remove the class prompts"
            )
        logger.warning("prompts.class_name is not set: no class prompts, so PRES is skipped")
        class_prompts = []
    return prompts + [Prompt(t, is_class_prompt=True) for t in class_prompts]


def _load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _cell_size(cfg: EvaluationConfig, sample: Image.Image) -> int:
    return cfg.report.cell_size or min(256, max(128, sample.width))


def draw_grids(
    cfg, columns: list[Column], prompts: list[Prompt], seeds: list[int], out: Path
) -> list[tuple[str, Path]]:
    """One grid per seed (rows: prompts; columns: base, then each artifact) and one per
    seed for the class prompts."""
    class_name = cfg.prompts.class_name
    grid_dir = out / "grids"
    grid_dir.mkdir(parents=True, exist_ok=True)
    col_labels = []
    for c in columns:
        extra = [] if c.is_base or c.kind == c.label else [c.kind or ""]
        if c.strength != 1.0:
            extra.append(f"x{c.strength:g}")
        if c.token != cfg.prompts.token:
            extra.append(f"token {c.token}")
        col_labels.append(" · ".join([c.label, *filter(None, extra)]))
    cell = None
    written = []
    for is_class in (False, True):
        rows_prompts = [p for p in prompts if p.is_class_prompt == is_class]
        if not rows_prompts:
            continue
        for seed in seeds:
            rows = [
                [_load(c.image_path(out, p, seed, class_name)) for c in columns]
                for p in rows_prompts
            ]
            cell = cell or _cell_size(cfg, rows[0][0])
            labels = [p.text(cfg.prompts.token, class_name) for p in rows_prompts]
            grid = R.comparison_grid(rows, labels, col_labels, cell)
            name = f"{'class_' if is_class else ''}seed{seed}.png"
            grid.save(grid_dir / name)
            what = "class prompts (PRES)" if is_class else "prompts"
            written.append((f"{what}, seed {seed}", grid_dir / name))
    return written


def _round(x: float | None, why: str) -> float | str:
    return round(x, 4) if x is not None else why


def score(
    cfg: EvaluationConfig,
    columns: list[Column],
    prompts: list[Prompt],
    seeds: list[int],
    out: Path,
    instance_images: list[Image.Image],
) -> list[dict]:
    """metric rows, one per column; a metric that cannot be computed says why."""
    m, class_name = cfg.metrics, cfg.prompts.class_name
    device = cfg.generation.device or default_device()
    clip = M.ClipEncoder(m.clip_model, device, m.batch_size) if m.clip_model else None
    dino = M.DinoEncoder(m.dino_model, device, m.batch_size) if m.dino_model else None
    feature = dino or clip  # for PRES and DIV: DINO as in the paper, else CLIP's images
    real_clip = clip.image_features(instance_images) if clip and instance_images else None
    real_dino = dino.image_features(instance_images) if dino and instance_images else None
    real_feat = real_dino if dino else real_clip
    subject = [p for p in prompts if not p.is_class_prompt]
    klass = [p for p in prompts if p.is_class_prompt]
    no_real = M.NO_INSTANCE_IMAGES

    rows = []
    for column in columns:

        def images_of(prompt: Prompt, column: Column = column) -> list[Image.Image]:
            return [_load(column.image_path(out, prompt, s, class_name)) for s in seeds]

        row: dict[str, Any] = {
            "label": column.label,
            "artifact": str(column.artifact) if column.artifact else None,
            "kind": column.kind,
            "strength": column.strength,
            "token": column.token,
            "num_images": len(prompts) * len(seeds),
        }
        per_prompt: list[dict[str, Any]] = []
        clip_feats, dino_feats, texts = [], [], []
        for prompt in subject:
            imgs = images_of(prompt)
            entry: dict[str, Any] = {"prompt": prompt.text(column.token, class_name)}
            if clip:
                f = clip.image_features(imgs)
                clip_feats.append(f)
                text = clip_text(prompt.template, column.token, class_name)
                entry["clip_text"] = text
                t = clip.text_features([text]).expand(len(imgs), -1)
                texts.append(t)
                entry["clip_t"] = round(M.paired_similarity(t, f), 4)
                if real_clip is not None:
                    entry["clip_i"] = round(M.mean_similarity(f, real_clip), 4)
            if dino:
                f = dino.image_features(imgs)
                dino_feats.append(f)
                if real_dino is not None:
                    entry["dino"] = round(M.mean_similarity(f, real_dino), 4)
            feats = dino_feats if dino else clip_feats
            if feats:
                entry["div"] = _round(M.diversity([feats[-1]]), M.ONE_SEED)
            per_prompt.append(entry)
        all_clip = torch.cat(clip_feats) if clip_feats else None
        all_dino = torch.cat(dino_feats) if dino_feats else None
        row["clip_t"] = (
            round(M.paired_similarity(torch.cat(texts), all_clip), 4) if clip else M.NO_MODEL
        )
        row["clip_i"] = (
            (round(M.mean_similarity(all_clip, real_clip), 4) if real_clip is not None else no_real)
            if clip
            else M.NO_MODEL
        )
        row["dino"] = (
            (round(M.mean_similarity(all_dino, real_dino), 4) if real_dino is not None else no_real)
            if dino
            else M.NO_MODEL
        )
        if feature is None:
            row["pres"] = row["div"] = M.NO_MODEL
        else:
            row["div"] = _round(M.diversity(dino_feats if dino else clip_feats), M.ONE_SEED)
            if not klass:
                row["pres"] = M.NO_CLASS_PROMPTS
            elif real_feat is None:
                row["pres"] = no_real
            else:
                class_feats = torch.cat([feature.image_features(images_of(p)) for p in klass])
                row["pres"] = round(M.mean_similarity(class_feats, real_feat), 4)
        row["per_prompt"] = per_prompt
        rows.append(row)
    return rows


def _train_logs(cfg: EvaluationConfig, columns: list[Column]) -> list[Path]:
    from personalize.training.loop import LOG_FILE

    if cfg.report.train_logs:
        logs = []
        for i, item in enumerate(cfg.report.train_logs):
            p = Path(item).expanduser()
            p = p / LOG_FILE if p.is_dir() else p
            if not p.is_file():
                raise ConfigError(
                    f"report.train_logs[{i}]: {p} does not exist (give a "
                    f"{LOG_FILE} file or the run folder that holds one)"
                )
            logs.append(p)
        return logs
    found: list[Path] = []
    for c in columns:
        if c.artifact is None:
            continue
        base = c.artifact if c.artifact.is_dir() else c.artifact.parent
        for folder in (base, base.parent):  # a run's best/ has its log one level up
            p = (folder / LOG_FILE).resolve()
            if p.is_file() and p not in found:
                found.append(p)
                break
    return found


def draw_loss_curves(logs: list[Path], out: Path) -> tuple[list, list]:
    curves, run_configs = [], []
    for i, log in enumerate(logs):
        run = log.parent
        try:
            rows = R.read_train_log(log)
        except ValueError as e:
            raise ConfigError(f"training log {e}") from e
        img = R.loss_curve(rows, f"{run.name}: {log.name}")
        if img is not None:
            path = out / (f"loss_curve_{i}.png" if len(logs) > 1 else "loss_curve.png")
            img.save(path)
            curves.append((str(log), path))
        run_json = run / "run.json"
        if run_json.is_file():
            run_configs.append((str(run), json.loads(run_json.read_text(encoding="utf-8"))))
    return curves, run_configs


def _instance_images(cfg: EvaluationConfig) -> list[Image.Image]:
    if not cfg.metrics.instance_data:
        return []
    from personalize.data import load_records, read_image

    return [read_image(r) for r in load_records(cfg.metrics.instance_data)]


def write_metrics(out: Path, rows: list[dict], extra: dict[str, Any]) -> None:
    atomic_write_text(out / "metrics.json", json.dumps({**extra, "columns": rows}, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def evaluate(cfg: EvaluationConfig) -> dict[str, Any]:
    """Run the whole evaluation; returns a summary (paths, counts, seconds). With
    `concepts`, one evaluation per concept plus their per-concept and mean metrics."""
    if cfg.concepts:
        from personalize.evaluation.concepts import evaluate_concepts

        return evaluate_concepts(cfg, evaluate)
    started = time.perf_counter()
    out = Path(cfg.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    check_generation_settings(cfg)
    columns = build_columns(cfg)
    prompts = build_prompts(cfg)
    seeds = cfg.generation.seed_list()
    check_and_record_state(cfg, columns, out)

    counts = generate_all(cfg, columns, prompts, seeds, out)
    generated_at = time.perf_counter()
    grids = draw_grids(cfg, columns, prompts, seeds, out)

    instance = _instance_images(cfg)
    instance_strip = None
    if instance:
        instance_strip = out / "grids" / "instance_images.png"
        R.image_strip(
            instance[:8], _cell_size(cfg, instance[0]), f"real images ({len(instance)})"
        ).save(instance_strip)
    rows = score(cfg, columns, prompts, seeds, out, instance)
    scored_at = time.perf_counter()

    curves, run_configs = draw_loss_curves(_train_logs(cfg, columns), out)
    seconds = {
        "generation": round(generated_at - started, 2),
        "metrics": round(scored_at - generated_at, 2),
        "total": round(time.perf_counter() - started, 2),
    }
    run_info = {
        "seeds": seeds,
        "prompts": [p.template for p in prompts],
        "images": len(columns) * len(prompts) * len(seeds),
        **counts,
        "seconds": seconds["total"],
        "seconds_detail": seconds,
    }
    write_metrics(
        out,
        rows,
        {
            "definitions": R.DEFINITIONS,
            "models": {"clip": cfg.metrics.clip_model, "dino": cfg.metrics.dino_model},
            "pres_div_features": "dino"
            if cfg.metrics.dino_model
            else "clip"
            if cfg.metrics.clip_model
            else None,
            "instance_images": len(instance),
            "run": run_info,
        },
    )
    page, _ = R.render_report(
        out,
        config=cfg.to_dict(),
        columns=[
            {
                "label": c.label,
                "artifact": c.artifact,
                "kind": c.kind,
                "strength": c.strength,
                "token": c.token,
            }
            for c in columns
        ],
        grids=grids,
        metric_rows=rows,
        loss_curves=curves,
        run_configs=run_configs,
        instance_strip=instance_strip,
        run_info=run_info,
        embed_images=cfg.report.embed_images,
    )
    atomic_write_text(out / "report.html", page)
    logger.info("evaluation written to %s (%s)", out, seconds)
    return {
        "output_dir": str(out),
        "report": str(out / "report.html"),
        "metrics": str(out / "metrics.json"),
        "grids": [str(p) for _, p in grids],
        **counts,
        "seconds": seconds,
        "columns": {r["label"]: {k: r[k] for k in METRIC_KEYS} for r in rows},
    }
