"""What a person looks at: labelled comparison grids, a loss curve, and report.html.

Everything is drawn with PIL (no plotting dependency) and the page is plain HTML with
inline CSS, so it opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from personalize.errors import EvaluationError

ROW_LABEL_WIDTH = 240
HEADER_HEIGHT = 56  # room for three lines of column title
_PAD = 6


def font(size: int = 13) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font when FreeType is there, else its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, f) -> float:
    return draw.textlength(text, font=f)


def wrap(draw: ImageDraw.ImageDraw, text: str, f, width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; the last line ends in an ellipsis if cut."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if _text_width(draw, candidate, f) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _text_width(draw, last + "…", f) > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def grid_size(n_rows: int, n_cols: int, cell: int) -> tuple[int, int]:
    return ROW_LABEL_WIDTH + n_cols * cell, HEADER_HEIGHT + n_rows * cell


def comparison_grid(
    rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str], cell: int
) -> Image.Image:
    """rows[r][c] in a grid with the prompt left of each row and the column title on top.
    Small images are scaled up with NEAREST so pixels stay visible, not blurred."""
    n_rows, n_cols = len(rows), len(col_labels)
    if any(len(r) != n_cols for r in rows) or len(row_labels) != n_rows:
        raise EvaluationError("comparison_grid: every row needs one image per column label")
    grid = Image.new("RGB", grid_size(n_rows, n_cols, cell), "white")
    draw = ImageDraw.Draw(grid)
    f, f_bold = font(13), font(14)
    line_h = 16
    for c, text in enumerate(col_labels):
        for k, line in enumerate(wrap(draw, text, f_bold, cell - 2 * _PAD, 3)):
            draw.text(
                (ROW_LABEL_WIDTH + c * cell + _PAD, _PAD + k * line_h),
                line,
                fill="black",
                font=f_bold,
            )
    max_lines = max(1, (cell - 2 * _PAD) // line_h)
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        y = HEADER_HEIGHT + r * cell
        for k, line in enumerate(wrap(draw, label, f, ROW_LABEL_WIDTH - 2 * _PAD, max_lines)):
            draw.text((_PAD, y + _PAD + k * line_h), line, fill="black", font=f)
        for c, img in enumerate(row):
            resample = Image.NEAREST if img.width < cell else Image.LANCZOS
            grid.paste(
                img.convert("RGB").resize((cell, cell), resample), (ROW_LABEL_WIDTH + c * cell, y)
            )
        draw.line([(0, y), (grid.width, y)], fill=(220, 220, 220))
    return grid


def image_strip(images: list[Image.Image], cell: int, label: str) -> Image.Image:
    """One labelled row (e.g. the real instance images)."""
    return comparison_grid([images], [label], [f"#{i + 1}" for i in range(len(images))], cell)


# ------------------------------------------------------------------------------ loss curve


def read_train_log(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise EvaluationError(f"{path}:{n} is not a JSON line: {e}") from e
    return rows


def loss_curve(rows: list[dict[str, Any]], title: str, size=(720, 360)) -> Image.Image | None:
    """Training loss (and validation loss when logged) against the optimizer step."""
    series = {}
    for key, color in (("loss", (60, 110, 200)), ("val_loss", (220, 90, 40))):
        pts = [
            (float(r["step"]), float(r[key]))
            for r in rows
            if key in r and "step" in r and r[key] is not None and math.isfinite(r[key])
        ]
        if pts:
            series[key] = (sorted(pts), color)
    if not series:
        return None
    w, h = size
    left, right, top, bottom = 70, 20, 34, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    f = font(12)
    xs = [x for pts, _ in series.values() for x, _ in pts]
    ys = [y for pts, _ in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.1 - 1e-3, y1 + abs(y1) * 0.1 + 1e-3
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (w - left - right),
            top + (y1 - y) / (y1 - y0) * (h - top - bottom),
        )

    draw.rectangle([left, top, w - right, h - bottom], outline=(120, 120, 120))
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        _, yp = px(x0, yv)
        draw.line([(left, yp), (w - right, yp)], fill=(235, 235, 235))
        draw.text((4, yp - 7), f"{yv:.4g}", fill="black", font=f)
        xv = x0 + (x1 - x0) * k / 4
        xp, _ = px(xv, y0)
        draw.text((xp - 10, h - bottom + 6), f"{xv:.0f}", fill="black", font=f)
    draw.text((w // 2 - 15, h - 18), "step", fill="black", font=f)
    draw.text((left, 8), title, fill="black", font=font(14))
    lx = w - right - 160
    for i, (key, (pts, color)) in enumerate(series.items()):
        points = [px(x, y) for x, y in pts]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for p in points if len(points) <= 50 else []:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        draw.line([(lx, 14 + i * 14), (lx + 20, 14 + i * 14)], fill=color, width=3)
        draw.text(
            (lx + 26, 7 + i * 14),
            "train loss" if key == "loss" else "validation loss",
            fill="black",
            font=f,
        )
    return img


# ------------------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.92em}td,th{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.na{color:#888;font-style:italic}img{max-width:100%;image-rendering:pixelated;display:block}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:.85em}figure{margin:12px 0}
figcaption{font-size:.9em;color:#555}dt{font-weight:600}dd{margin:0 0 8px 16px}
"""

METRIC_NAMES = {
    "clip_t": "CLIP-T ↑",
    "clip_i": "CLIP-I ↑",
    "dino": "DINO ↑",
    "pres": "PRES ↓",
    "div": "DIV ↑",
}

DEFINITIONS = {
    "clip_t": "mean cos(CLIP text(prompt without the identifier), CLIP image(generated)).",
    "clip_i": "mean cos(CLIP image(generated), CLIP image(real)) over all generated × real pairs.",
    "dino": "mean cos(DINO CLS(generated), DINO CLS(real)) over all generated × real pairs.",
    "pres": "mean cos of class-prompt generations to the real images (DINO features, CLIP "
    "when no DINO model is given); lower = less of the subject leaking into its "
    "class.",
    "div": "mean over prompts of the mean pairwise 1 − cos between that prompt's generations "
    "(different seeds); DINO features (CLIP without DINO). A feature-distance stand-in "
    "for the paper's LPIPS, so not comparable with its numbers.",
}


class Html:
    """Collects image references so the caller (and the tests) can check they exist."""

    def __init__(self, out_dir: Path, embed: bool):
        self.out_dir, self.embed, self.referenced = out_dir, embed, []

    def img(self, path: Path, alt: str) -> str:
        path = Path(path)
        if self.embed:
            src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        else:
            src = Path(os.path.relpath(path, self.out_dir)).as_posix()
            self.referenced.append(src)
        return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}" loading="lazy">'


def _cell(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num">{value:.4f}</td>'
    return f'<td class="na">{html.escape(str(value))}</td>'


def render_report(
    out_dir: Path,
    *,
    config: dict[str, Any],
    columns: list[dict[str, Any]],
    grids: list[tuple[str, Path]],
    metric_rows: list[dict[str, Any]],
    loss_curves: list[tuple[str, Path]],
    run_configs: list[tuple[str, dict]],
    instance_strip: Path | None,
    run_info: dict[str, Any],
    embed_images: bool,
) -> tuple[str, list[str]]:
    """The page's HTML and the relative image paths it references."""
    h = Html(out_dir, embed_images)
    e = html.escape
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        "<title>personalize evaluation</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>personalize evaluation</h1>",
        f"<p>Base model <code>{e(str(config.get('model')))}</code>; "
        f"{len(columns) - 1} artifact(s); seeds {e(str(run_info.get('seeds')))}; "
        f"{e(str(run_info.get('images')))} images "
        f"({e(str(run_info.get('generated')))} generated, "
        f"{e(str(run_info.get('reused')))} reused) in "
        f"{e(str(run_info.get('seconds')))} s.</p>",
    ]

    parts.append(
        "<h2>Columns</h2><table><tr><th>column</th><th>artifact</th><th>kind</th>"
        "<th>strength</th><th>token</th></tr>"
    )
    for c in columns:
        parts.append(
            f"<tr><td>{e(c['label'])}</td><td><code>{e(str(c['artifact'] or '—'))}"
            f"</code></td><td>{e(str(c['kind'] or 'base model'))}</td>"
            f'<td class="num">{c["strength"]}</td><td>{e(c["token"])}</td></tr>'
        )
    parts.append("</table>")

    parts.append(
        "<h2>Metrics</h2><table><tr><th>column</th>"
        + "".join(f"<th>{e(n)}</th>" for n in METRIC_NAMES.values())
        + "<th>images</th></tr>"
    )
    for row in metric_rows:
        parts.append(
            f"<tr><td>{e(row['label'])}</td>"
            + "".join(_cell(row[k]) for k in METRIC_NAMES)
            + f'<td class="num">{row["num_images"]}</td></tr>'
        )
    parts.append("</table><dl>")
    for k, text in DEFINITIONS.items():
        parts.append(f"<dt>{e(METRIC_NAMES[k])}</dt><dd>{e(text)}</dd>")
    parts.append("</dl>")
    per_prompt = [(row["label"], p) for row in metric_rows for p in row.get("per_prompt", [])]
    if per_prompt:
        parts.append(
            "<details><summary>Per prompt</summary><table><tr><th>column</th>"
            "<th>prompt</th>"
            + "".join(f"<th>{e(METRIC_NAMES[k])}</th>" for k in ("clip_t", "clip_i", "dino", "div"))
            + "</tr>"
        )
        for label, p in per_prompt:
            parts.append(
                f"<tr><td>{e(label)}</td><td>{e(p['prompt'])}</td>"
                + "".join(_cell(p.get(k, "—")) for k in ("clip_t", "clip_i", "dino", "div"))
                + "</tr>"
            )
        parts.append("</table></details>")

    if instance_strip is not None:
        parts.append("<h2>Real instance images</h2>")
        parts.append(f"<figure>{h.img(instance_strip, 'instance images')}</figure>")
    parts.append("<h2>Samples: base vs learned, same prompts and seeds</h2>")
    for caption, path in grids:
        parts.append(
            f"<figure>{h.img(path, caption)}<figcaption>{e(caption)}</figcaption></figure>"
        )
    if loss_curves:
        parts.append("<h2>Training loss</h2>")
        for caption, path in loss_curves:
            parts.append(
                f"<figure>{h.img(path, caption)}<figcaption>{e(caption)}</figcaption></figure>"
            )
    parts.append(
        "<h2>Configuration</h2><details open><summary>evaluation</summary>"
        f"<pre>{e(json.dumps(config, indent=2))}</pre></details>"
    )
    for where, cfg in run_configs:
        parts.append(
            f"<details><summary>training run {e(where)}</summary>"
            f"<pre>{e(json.dumps(cfg, indent=2))}</pre></details>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts), h.referenced
