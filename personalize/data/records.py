"""Image + caption records: finding them in every supported layout, and checking them.

`load_records` finds images and captions (a folder with caption sidecars, metadata.jsonl /
metadata.csv, a saved `datasets` dataset) and decodes every image once, up front, so a bad
file is reported by name before a model is even loaded, not as a crash an hour into
training. The folder layout's scanning is in folders.py; the metadata files and saved
datasets are read here. `ImageCaptionDataset` (dataset.py) turns the records into
training examples.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from personalize.data.folders import (
    METADATA_NAMES,
    find_images,
    folder_images,
    normalize_caption_extension,
    real_paths,
)
from personalize.data.transforms import describe_load_error, image_problem, load_image
from personalize.errors import DataError

logger = logging.getLogger(__name__)

# Files that `save_to_disk` writes: a Dataset has the first two, a DatasetDict the third.
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_VERIFY_CHUNK = 64  # bounds how many datasets rows' bytes sit in memory during the check


@dataclass(frozen=True)
class Record:
    key: str  # stable unique id: relative path for files, "row-<i>" for datasets rows
    image_path: Path | None  # None when the image bytes live in a datasets row
    caption: str | None  # None: no caption, the dataset falls back to the instance prompt
    # Not compared or hashed: a datasets.Dataset is neither cheap to compare nor hashable.
    source: Any = field(default=None, compare=False)


class DatasetRow(NamedTuple):
    """Where a datasets row keeps its image. Records hold this reference, not pixels, so
    they stay small and pickle cheaply into DataLoader workers (Arrow data is mmapped)."""

    dataset: Any  # datasets.Dataset with only the image column, cast to Image(decode=False)
    index: int
    column: str


class _Candidate(NamedTuple):
    record: Record
    image: Path | bytes | None  # what to decode to check the record
    label: str  # how messages name it


def load_records(
    path: str | Path,
    *,
    caption_extension: str = ".txt",
    image_column: str = "image",
    caption_column: str = "text",
    strict: bool = False,
    skip: Iterable[str | Path] = (),
) -> list[Record]:
    """Find the images and captions under `path` and check that every image decodes.

    `path` is a folder of images (recursive, sorted, `x.png` + optional `x.txt`), a
    folder with `metadata.jsonl`/`metadata.csv` (`file_name` + `caption_column`), such a
    metadata file itself, or a folder written by `datasets`' `save_to_disk`. Unreadable
    images are skipped with a warning, or raise DataError when `strict`. In a folder,
    sub-folders listed in `skip` (the run's own output_dir) and those holding a run's
    `run.json` are left out: a run's samples and class images are not training data.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(
            f"Data path {root} does not exist. Point it at a folder of images, a "
            "metadata.jsonl/.csv file, or a dataset saved with datasets' save_to_disk."
        )
    if root.is_file():
        if root.suffix.lower() not in (".jsonl", ".csv"):
            raise DataError(
                f"Data path {root} is a file; it must be a folder of images, a .jsonl/.csv "
                "metadata file, or a dataset folder saved with datasets' save_to_disk."
            )
        candidates: Iterable[_Candidate] = _metadata_candidates(root, caption_column)
    elif any((root / name).is_file() for name in _SAVED_DATASET_MARKERS):
        candidates = _saved_dataset_candidates(root, image_column, caption_column)
    else:
        metadata = [root / name for name in METADATA_NAMES if (root / name).is_file()]
        if len(metadata) > 1:
            raise DataError(f"{root} has both metadata.jsonl and metadata.csv; keep only one.")
        if metadata:
            candidates = _metadata_candidates(metadata[0], caption_column)
            _warn_unlisted(root, candidates, metadata[0])
        else:
            found = folder_images(
                root, normalize_caption_extension(caption_extension), real_paths(skip)
            )
            candidates = [
                _Candidate(Record(f.key, f.path, f.caption), f.path, str(f.path)) for f in found
            ]

    records, skipped = _verify(candidates, strict)
    if skipped:
        logger.warning(
            "Skipped %d of %d images in %s that could not be read (see the warnings above); "
            "data.strict=true turns this into an error.",
            skipped,
            skipped + len(records),
            root,
        )
    if not records:
        raise DataError(f"None of the images in {root} could be read; see the warnings above.")
    logger.info(
        "Loaded %d images from %s (%d with captions).",
        len(records),
        root,
        sum(r.caption is not None for r in records),
    )
    return records


def split_records(
    records: list[Record], validation_split: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Hold out round(len * validation_split) records, chosen by `seed`: at least one when
    the split is > 0 and there are two or more records, never all. Both halves keep the
    input order."""
    if not 0.0 <= validation_split < 1.0:
        raise DataError(f"data.validation_split must be in [0, 1), got {validation_split}.")
    count = len(records)
    if validation_split == 0.0 or count < 2:
        if validation_split > 0.0:
            logger.warning("Only %d image(s): nothing held out for validation.", count)
        return list(records), []
    held_out = min(max(1, round(count * validation_split)), count - 1)
    # Permute in key order, so the split depends on which records exist, not on the
    # order a caller happened to list them in.
    by_key = sorted(range(count), key=lambda i: records[i].key)
    chosen = {by_key[j] for j in np.random.default_rng(seed).permutation(count)[:held_out]}
    train = [r for i, r in enumerate(records) if i not in chosen]
    validation = [r for i, r in enumerate(records) if i in chosen]
    return train, validation


def read_image(record: Record) -> Image.Image:
    """The record's image as upright RGB; DataError names the file if it cannot be read."""
    try:
        if record.image_path is not None:
            return load_image(record.image_path)
        row: DatasetRow = record.source
        return load_image(row.dataset[row.index][row.column]["bytes"])
    except Exception as exc:
        raise DataError(
            f"Cannot read image {_record_label(record)}: {describe_load_error(exc)}. It passed the "
            "check in load_records, so it changed or vanished since; restore or remove it."
        ) from exc


# --- metadata files and saved datasets -------------------------------------------------


def _metadata_candidates(metadata: Path, caption_column: str) -> list[_Candidate]:
    """Rows of a datasets-imagefolder style metadata file: `file_name` (relative to the
    file's folder) plus the caption column."""
    rows = list(_metadata_rows(metadata))
    if not rows:
        raise DataError(f"{metadata} has no rows; add one per image: file_name + caption.")
    columns = sorted(set().union(*(row.keys() for _, row in rows)))
    if "file_name" not in columns:
        raise DataError(
            f"{metadata} has no 'file_name' column (columns: {', '.join(columns)}). Each "
            f"row needs file_name: the image path relative to {metadata.parent}."
        )
    _check_caption_column(caption_column, columns, "file_name", str(metadata))
    seen: dict[str, int] = {}
    candidates = []
    for line, row in rows:
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{metadata} line {line}: file_name is empty or not a string.")
        relative = Path(name.strip())
        image = relative if relative.is_absolute() else metadata.parent / relative
        key = PurePosixPath(os.path.normpath(relative)).as_posix()
        if key in seen:
            raise DataError(
                f"{metadata} lists {name!r} twice (lines {seen[key]} and {line}); "
                "keep one row per image."
            )
        seen[key] = line
        caption = _clean_caption(
            (row.get(caption_column) if caption_column else None), f"{metadata} line {line}"
        )
        label = f"{image} (listed in {metadata.name} line {line})"
        candidates.append(_Candidate(Record(key, image, caption), image, label))
    return candidates


def _metadata_rows(metadata: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs from a .jsonl or .csv file."""
    try:
        with metadata.open(encoding="utf-8-sig", newline="") as file:
            if metadata.suffix.lower() == ".csv":
                reader = csv.DictReader(file)
                for row in reader:
                    yield reader.line_num, row
                return
            for line_number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{metadata} line {line_number} is not valid JSON ({exc.msg}). Each "
                        'line must be one object, e.g. {"file_name": "a.png", "text": "..."}.'
                    ) from exc
                if not isinstance(row, dict):
                    raise DataError(f"{metadata} line {line_number} is not a JSON object.")
                yield line_number, row
    except UnicodeDecodeError as exc:
        raise DataError(f"{metadata} is not UTF-8 text; re-save it as UTF-8.") from exc


def _warn_unlisted(root: Path, candidates: list[_Candidate], metadata: Path) -> None:
    listed = {os.path.realpath(c.image) for c in candidates if isinstance(c.image, Path)}
    unlisted = [p for p in find_images(root)[0] if os.path.realpath(p) not in listed]
    if unlisted:
        logger.warning(
            "%d image(s) in %s are not listed in %s and will not be used (first: %s).",
            len(unlisted),
            root,
            metadata.name,
            unlisted[0],
        )


def _saved_dataset_candidates(
    root: Path, image_column: str, caption_column: str
) -> Iterator[_Candidate]:
    """Rows of a `datasets` Dataset (or the train split of a DatasetDict) on disk."""
    try:
        import datasets  # deferred: a heavy import only this layout needs
    except ImportError as exc:
        raise DataError(
            f"{root} is a saved dataset; reading it needs `pip install datasets`."
        ) from exc
    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as exc:
        raise DataError(f"Could not load the saved dataset {root}: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise DataError(
                f"{root} holds splits {', '.join(loaded)} but no 'train' split; name the "
                "split to train on 'train', or save it on its own."
            )
    columns = list(loaded.column_names)
    if image_column not in columns:
        raise DataError(
            f"Saved dataset {root} has no image column {image_column!r} (columns: "
            f"{', '.join(columns)}). Set data.image_column to the one holding the images."
        )
    has_captions = _check_caption_column(caption_column, columns, image_column, str(root))
    feature = loaded.features[image_column]
    if isinstance(feature, datasets.Image):
        # Raw bytes, decoded by our own loader: EXIF, modes and bomb checks apply alike.
        loaded = loaded.cast_column(image_column, datasets.Image(decode=False))
    elif getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(
            f"Column {image_column!r} of {root} is {feature}; it must be a datasets.Image "
            "feature or a string column of image paths."
        )
    if len(loaded) == 0:
        raise DataError(f"Saved dataset {root} has no rows.")
    images_only = loaded.select_columns([image_column])
    wanted = [image_column] + ([caption_column] if has_captions else [])
    for index, row in enumerate(loaded.select_columns(wanted)):
        key, label = f"row-{index}", f"row {index} of {root}"
        caption = _clean_caption((row.get(caption_column) if caption_column else None), label)
        value = row[image_column]
        if isinstance(value, dict) and value.get("bytes") is not None:
            source = DatasetRow(images_only, index, image_column)
            yield _Candidate(Record(key, None, caption, source), value["bytes"], label)
            continue
        if isinstance(value, dict):
            value = value.get("path")
        image = None if value is None else _resolve(Path(value), root)
        yield _Candidate(Record(key, image, caption), image, f"{label} ({image})")


def _check_caption_column(caption_column: str, columns: list[str], image: str, where: str) -> bool:
    """True when captions exist. A missing caption column is only fine when there is no
    other column it could have meant: silently training every image on the instance
    prompt because of a typo would waste the run."""
    if not caption_column:  # explicitly off: every image uses the instance prompt
        return False
    if caption_column in columns:
        return True
    others = [c for c in columns if c != image]
    if others:
        raise DataError(
            f"{where} has no caption column {caption_column!r} (columns: "
            f"{', '.join(columns)}). Set data.caption_column to the one holding captions, or "
            "to an empty string to caption every image with the instance prompt."
        )
    return False


def _clean_caption(value: Any, where: str) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # NaN: pandas' empty
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: the caption is a {type(value).__name__}, expected text.")
    return value.strip() or None


def _resolve(path: Path, root: Path) -> Path:
    return path if path.is_absolute() else root / path


# --- checking images ------------------------------------------------------------------


def _verify(candidates: Iterable[_Candidate], strict: bool) -> tuple[list[Record], int]:
    """Decode every candidate's image; keep the good ones. Returns (records, skipped)."""
    kept: list[Record] = []
    skipped = 0
    # PIL releases the GIL while decoding, so threads give a real speed-up here.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        iterator = iter(candidates)
        while chunk := list(islice(iterator, _VERIFY_CHUNK)):
            problems = pool.map(image_problem, [c.image for c in chunk])
            for candidate, problem in zip(chunk, problems, strict=True):
                if problem is None:
                    kept.append(candidate.record)
                    continue
                message = f"Cannot use image {candidate.label}: {problem}."
                if strict:
                    raise DataError(
                        f"{message} Fix or remove it, or set data.strict=false to skip "
                        "unreadable images."
                    )
                logger.warning("Skipping: %s", message)
                skipped += 1
    return kept, skipped


def _record_label(record: Record) -> str:
    if record.image_path is not None:
        return str(record.image_path)
    row = record.source
    return f"{record.key} (row {row.index} of a saved dataset)" if row else record.key


def no_caption_message(record: Record, count: int) -> str:
    others = f" (nor do {count - 1} other images)" if count > 1 else ""
    sidecar = f"a {record.image_path.stem}.txt file next to it, " if record.image_path else ""
    return (
        f"Image {_record_label(record)} has no caption{others}. Add a .txt caption "
        f"({sidecar}or the caption column of the metadata/dataset) or set data.prompt, the "
        "instance prompt used for images without captions."
    )
