"""`personalize evaluate` for an artifact that learned several concepts (tokens).

Each concept is an evaluation of its own (evaluate.py) in output_dir/concepts/<name>: its
prompts filled with its token and class, its CLIP-I/DINO/PRES measured against its own
real images. The top-level metrics.json/.csv and report.html then list every concept's
metrics per column, and their mean over the concepts.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from personalize.evaluation.config import EvaluationConfig
from personalize.io import atomic_write_text

logger = logging.getLogger(__name__)

METRIC_KEYS = ("clip_t", "clip_i", "dino", "pres", "div")


def concept_name(spec) -> str:
    return spec.name or spec.token


def _folder(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "concept"


def concept_config(cfg: EvaluationConfig, spec) -> EvaluationConfig:
    """The one-concept evaluation of `spec`, in its own folder under output_dir/concepts."""
    return replace(
        cfg,
        concepts=[],
        output_dir=str(
            Path(cfg.output_dir).expanduser() / "concepts" / _folder(concept_name(spec))
        ),
        prompts=replace(
            cfg.prompts,
            token=spec.token,
            class_name=cfg.prompts.class_name if spec.class_name is None else spec.class_name,
        ),
        metrics=replace(cfg.metrics, instance_data=spec.instance_data or cfg.metrics.instance_data),
    )


def mean_rows(per_concept: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per column label, each metric's mean over the concepts; a metric that some concept
    could not compute keeps that concept's reason instead of a mean of the others."""
    labels = list(next(iter(per_concept.values())))
    mean: dict[str, dict[str, Any]] = {}
    for label in labels:
        row = {}
        for key in METRIC_KEYS:
            values = [rows[label][key] for rows in per_concept.values()]
            numbers = [v for v in values if isinstance(v, (int, float))]
            row[key] = (
                round(sum(numbers) / len(numbers), 4)
                if len(numbers) == len(values)
                else next(v for v in values if not isinstance(v, (int, float)))
            )
        mean[label] = row
    return mean


def evaluate_concepts(cfg: EvaluationConfig, evaluate_one) -> dict[str, Any]:
    """Evaluate every concept with `evaluate_one` (evaluate.evaluate), then write the
    per-concept and mean metrics and an index report."""
    out = Path(cfg.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict[str, Any]] = {}
    per_concept: dict[str, dict[str, dict[str, Any]]] = {}
    for spec in cfg.concepts:
        name = concept_name(spec)
        logger.info("evaluating concept %s (token %r)", name, spec.token)
        summary = evaluate_one(concept_config(cfg, spec))
        summaries[name] = summary
        data = json.loads(Path(summary["metrics"]).read_text(encoding="utf-8"))
        per_concept[name] = {
            row["label"]: {key: row[key] for key in METRIC_KEYS} for row in data["columns"]
        }
    mean = mean_rows(per_concept)
    body = {"concepts": per_concept, "mean": mean}
    atomic_write_text(out / "metrics.json", json.dumps(body, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["concept", "label", *METRIC_KEYS])
    for concept, rows in [*per_concept.items(), ("mean", mean)]:
        for label, row in rows.items():
            writer.writerow([concept, label, *(row[k] for k in METRIC_KEYS)])
    atomic_write_text(out / "metrics.csv", buf.getvalue())
    atomic_write_text(out / "report.html", _index_page(out, cfg, per_concept, mean, summaries))
    return {
        "output_dir": str(out),
        "report": str(out / "report.html"),
        "metrics": str(out / "metrics.json"),
        "generated": sum(s.get("generated", 0) for s in summaries.values()),
        "concepts": {name: s["columns"] for name, s in summaries.items()},
        "mean": mean,
    }


def _index_page(out: Path, cfg, per_concept, mean, summaries) -> str:
    from personalize.evaluation.report import _CSS, METRIC_NAMES, _cell

    head = "".join(f"<th>{html.escape(METRIC_NAMES[k])}</th>" for k in METRIC_KEYS)
    rows = []
    for concept, by_label in [*per_concept.items(), ("mean", mean)]:
        if concept == "mean":
            link = "<b>mean</b>"
        else:
            report = Path(summaries[concept]["report"]).relative_to(out).as_posix()
            link = f'<a href="{html.escape(report)}">{html.escape(concept)}</a>'
        for label, row in by_label.items():
            cells = "".join(_cell(row[k]) for k in METRIC_KEYS)
            rows.append(f"<tr><td>{link}</td><td>{html.escape(label)}</td>{cells}</tr>")
    tokens = ", ".join(
        f"{html.escape(concept_name(s))}: {html.escape(s.token)}" for s in cfg.concepts
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>evaluation: "
        f"{len(per_concept)} concepts</title><style>{_CSS}</style></head><body>"
        f"<h1>Evaluation of {len(per_concept)} concepts</h1><p>Tokens: {tokens}. Each "
        "concept's own report (grids, per-prompt metrics) is linked from its name.</p>"
        f"<table><tr><th>concept</th><th>column</th>{head}</tr>{''.join(rows)}</table>"
        "</body></html>\n"
    )
