"""The quality benchmark's results: per-variant means (± the spread over training seeds),
merging runs made apart (`--merge`), the markdown tables, and the Quality section of
docs/benchmarks.md (`--write-docs`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from personalize.errors import EvaluationError
from personalize.toyworld.variants import DIAGNOSTICS, GENERATION


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from personalize.io import atomic_write_json

    atomic_write_json(path, data)


QUALITY_KEYS = (
    "subject_fidelity",
    "subject_match",
    "prompt_fidelity",
    "pres",
    "class_subject_match",
    "div",
)
METRIC_KEYS = (*QUALITY_KEYS, "train_seconds", "peak_rss_mb", "file_kb")


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per variant, the mean of each metric over subjects and training seeds, and with two
    or more training seeds `<metric>_sd`: the standard deviation over training seeds of the
    subject-mean (how much a rerun with another seed moves the table's number)."""
    out: dict[str, dict[str, float]] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rows = [r for r in runs if r["variant"] == variant]
        out[variant] = {
            k: round(float(np.mean([r[k] for r in rows])), 4)
            for k in METRIC_KEYS
            if all(r.get(k) is not None for r in rows)
        }
        out[variant]["subjects"] = len({r["subject"] for r in rows})
        by_seed: dict[int, list] = {}
        for r in rows:
            if "train_seed" in r:
                by_seed.setdefault(r["train_seed"], []).append(r)
        if len(by_seed) < 2:
            continue
        out[variant]["train_seeds"] = len(by_seed)
        for k in QUALITY_KEYS:
            seed_means = [np.mean([r[k] for r in group]) for group in by_seed.values()]
            out[variant][f"{k}_sd"] = round(float(np.std(seed_means, ddof=1)), 4)
    return out


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of the same benchmark with other training seeds or variants (e.g. one process
    per seed, side by side; diagnostics later) as one result. The base and real-image rows
    depend on neither and are kept once."""
    first = parts[0]
    keys = ("subjects", "seeds", "backgrounds_per_subject", "generation")
    for other in parts[1:]:
        differ = [k for k in keys if other["settings"].get(k) != first["settings"].get(k)]
        if differ:
            raise EvaluationError(f"cannot merge benchmark results with other settings: {differ}")
    settings = dict(first["settings"])
    settings["train_seeds"] = sorted({s for p in parts for s in p["settings"]["train_seeds"]})
    settings["variants"] = list(dict.fromkeys(v for p in parts for v in p["settings"]["variants"]))
    settings["recipes"] = {k: v for p in parts for k, v in p["settings"]["recipes"].items()}
    runs = [r for r in first["runs"]] + [
        r for p in parts[1:] for r in p["runs"] if "train_seed" in r
    ]
    seen = [(r["variant"], r["subject"], r.get("train_seed")) for r in runs]
    if len(set(seen)) != len(seen):
        raise EvaluationError("the results to merge share a variant and training seed")
    return {"settings": settings, "runs": runs, "summary": summarize(runs)}


def markdown_table(results: dict[str, Any], diagnostics: bool = False) -> str:
    """The summary table: the benchmark's variants, or (`diagnostics`) the follow-ups."""

    def cell(row: dict[str, Any], key: str, fmt: str = "{:.3f}") -> str:
        if row.get(key) is None:
            return "-"
        sd = row.get(f"{key}_sd")
        return fmt.format(row[key]) + (f" ± {fmt.format(sd)}" if sd is not None else "")

    lines = [
        "| variant | subject fidelity (toy-I) ↑ | subject match ↑ | prompt fidelity (toy-T) ↑ "
        "| PRES ↓ | class → subject ↓ | DIV ↑ | train s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, row in results["summary"].items():
        if (variant in DIAGNOSTICS) != diagnostics:
            continue
        lines.append(
            f"| {variant} | {cell(row, 'subject_fidelity')}"
            f" | {cell(row, 'subject_match', '{:.2f}')}"
            f" | {cell(row, 'prompt_fidelity', '{:.2f}')} | {cell(row, 'pres')}"
            f" | {cell(row, 'class_subject_match', '{:.2f}')} | {cell(row, 'div')}"
            f" | {cell(row, 'train_seconds', '{:.0f}')} | {cell(row, 'peak_rss_mb', '{:.0f}')} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ docs

DOC_BEGIN = "<!-- quality-results:begin (written by benchmarks/quality.py --write-docs) -->"
DOC_END = "<!-- quality-results:end -->"


def write_docs(results: dict[str, Any], out: Path, docs: Path, json_path: Path) -> None:
    """Put the table and a sample grid into the Quality section of docs/benchmarks.md,
    between markers, leaving every other part of the file as it is."""
    from PIL import Image

    images = docs / "images"
    images.mkdir(parents=True, exist_ok=True)
    first = results["settings"]["subjects"][0]
    # A palette PNG: the grid is flat colors and text, so 256 colors lose nothing visible
    # and the file stays small enough to keep in git.
    Image.open(out / f"grid_{first}.png").convert("RGB").quantize(256).save(
        images / "quality_grid.png", optimize=True
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(json_path, results)
    per_subject = [
        "| variant | subject | train seed | toy-I | match | toy-T | PRES | class→subj | DIV |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results["runs"], key=lambda r: (r["subject"], r.get("train_seed", -1))):
        vals = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else "-" for k in QUALITY_KEYS]
        per_subject.append(
            f"| {r['variant']} | {r['subject']} | {r.get('train_seed', '-')} | "
            + " | ".join(vals)
            + " |"
        )
    s = results["settings"]
    block = "\n".join(
        [
            DOC_BEGIN,
            f"Means over subjects {', '.join(s['subjects'])} and training seeds "
            f"{s.get('train_seeds', [0])} (± the standard deviation over training seeds of the "
            f"subject mean); sampling seeds {s['seeds']}, "
            f"{s['backgrounds_per_subject']} backgrounds, DDIM {GENERATION['steps']} steps, "
            f"guidance {GENERATION['guidance_scale']}. Raw numbers: "
            f"[`{json_path.as_posix()}`]({os.path.relpath(json_path, docs)}).",
            "",
            markdown_table(results),
            *(
                [
                    "Follow-ups chosen after seeing the table above, each one change to a recipe "
                    "(`DIAGNOSTICS` in personalize/toyworld/variants.py); not part of the "
                    "comparison:",
                    "",
                    markdown_table(results, diagnostics=True),
                ]
                if any(v in DIAGNOSTICS for v in results["summary"])
                else []
            ),
            f"![sample grid: {first}](images/quality_grid.png)",
            "",
            "<details><summary>per subject</summary>",
            "",
            "\n".join(per_subject),
            "",
            "</details>",
            DOC_END,
        ]
    )
    md = docs / "benchmarks.md"
    text = md.read_text() if md.is_file() else "# Benchmarks\n"
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        tail = rest.split(DOC_END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Quality\n\n" + block + "\n"
    md.write_text(text)
