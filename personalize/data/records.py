"""Image + caption records: finding them in every supported layout, and checking them.

`load_records` finds images and captions (a folder with caption sidecars, metadata.jsonl /
metadata.csv, a saved `datasets` dataset) and decodes every image once, up front, so a bad
file is reported by name before a model is even loaded, not as a crash an hour into
training. `ImageCaptionDataset` (dataset.py) turns the records into training examples.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from personalize.data.transforms import check_pixel_count, load_image
from personalize.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
# Files that `save_to_disk` writes: a Dataset has the first two, a DatasetDict the third.
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_VERIFY_DRAFT_SIZE = 64  # JPEGs are checked at reduced scale: whole stream, fraction of the cost
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
            candidates = _folder_candidates(
                root, _normalize_extension(caption_extension), _real_paths(skip)
            )

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
            f"Cannot read image {_record_label(record)}: {_describe(exc)}. It passed the "
            "check in load_records, so it changed or vanished since; restore or remove it."
        ) from exc


# --- finding records ------------------------------------------------------------------


def _real_paths(paths: Iterable[str | Path]) -> set[str]:
    return {os.path.realpath(Path(p).expanduser()) for p in paths}


def _folder_candidates(
    root: Path, caption_extension: str | None, skip: set[str] = frozenset()
) -> list[_Candidate]:
    images, others, skipped = _find_images(root, skip)
    if skipped:
        count = sum(skipped.values())
        logger.warning(
            "Skipped %d images under our own run folders in %s (this run's output_dir, its "
            "class images, or a folder holding run.json): %s",
            count,
            root,
            ", ".join(f"{folder} ({n})" for folder, n in skipped.items()),
        )
    if not images:
        suffixes = Counter(p.suffix.lower() for p in others)
        found = ", ".join(f"{suffix} ({n})" for suffix, n in suffixes.most_common(5))
        hint = (
            f"; found only {found}. Convert the images to one of those formats." if found else "."
        )
        raise DataError(
            f"No images in {root}. Accepted extensions: {', '.join(IMAGE_EXTENSIONS)}{hint}"
        )
    caption_suffix = caption_extension.lower() if caption_extension else None
    # Caption files by folder and lower-cased name: `pic.TXT` next to `pic.png` is its caption
    # on every file system, not only on the case-insensitive ones.
    sidecars = {
        (p.parent, p.name.lower()): p
        for p in others
        if caption_suffix and p.suffix.lower() == caption_suffix
    }
    used: set[tuple[Path, str]] = set()
    other_case: list[Path] = []
    candidates = []
    for image in images:
        caption = None
        if caption_extension:
            wanted = (image.parent, (image.stem + caption_extension).lower())
            sidecar = sidecars.get(wanted)
            if sidecar is not None:
                used.add(wanted)
                if sidecar.name != image.stem + caption_extension:
                    other_case.append(sidecar)
                caption = _read_caption_file(sidecar)
        key = image.relative_to(root).as_posix()
        candidates.append(_Candidate(Record(key, image, caption), image, str(image)))
    _report_folder_leftovers(root, others, sidecars, used, other_case, caption_suffix)
    return candidates


def _report_folder_leftovers(
    root: Path,
    others: list[Path],
    sidecars: dict[tuple[Path, str], Path],
    used: set[tuple[Path, str]],
    other_case: list[Path],
    caption_suffix: str | None,
) -> None:
    """One summary line for each kind of file that a user would expect to be used and is
    not (or is, against its name's case): nothing in the data folder is dropped silently."""

    def some(paths: list[Path]) -> str:
        names = [p.relative_to(root).as_posix() for p in paths[:3]]
        return ", ".join(names) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")

    # .txt files are captions (sidecars off, or another caption_extension): not "unsupported".
    ignored = [p for p in others if p.suffix.lower() not in (caption_suffix, ".txt")]
    if ignored:
        suffixes = ", ".join(sorted({p.suffix.lower() for p in ignored}))
        logger.warning(
            "Ignored %d file(s) in %s that are not images this loader reads (%s): %s. "
            "Accepted image extensions: %s; convert the others (e.g. HEIC to JPEG) to use them.",
            len(ignored),
            root,
            suffixes,
            some(ignored),
            ", ".join(IMAGE_EXTENSIONS),
        )
    orphans = [p for key, p in sorted(sidecars.items()) if key not in used]
    if orphans:
        logger.warning(
            "%d caption file(s) in %s have no image of the same name and are not used: %s.",
            len(orphans),
            root,
            some(orphans),
        )
    if other_case:
        logger.warning(
            "%d caption file(s) in %s differ in upper/lower case from their image's name "
            "(%s); they are read as that image's caption.",
            len(other_case),
            root,
            some(other_case),
        )


def _find_images(
    root: Path, skip: set[str] = frozenset()
) -> tuple[list[Path], list[Path], dict[str, int]]:
    """Image files under root, sorted by relative path; the other files (with a suffix, not
    metadata files), sorted the same way; and the number of images in each left-out run folder
    (`skip`, or holding a run's run.json).

    Hidden files and folders are skipped: macOS `._x.jpg` resource forks and
    `.ipynb_checkpoints` copies look like images by name but are not training data.
    """
    images: list[Path] = []
    others: list[Path] = []
    visited: set[str] = set()
    left_out: dict[str, int] = {}
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a symlink loop; walk each real folder once
            subfolders.clear()
            continue
        visited.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in list(subfolders):
            sub = Path(folder, name)
            if os.path.realpath(sub) in skip or _holds_run_file(sub):
                subfolders.remove(name)
                left_out[str(sub)] = _count_images(sub)
        for name in files:
            suffix = Path(name).suffix.lower()
            if name.startswith("."):
                continue
            if suffix in IMAGE_EXTENSIONS:
                images.append(Path(folder, name))
            elif suffix and name not in METADATA_NAMES:
                others.append(Path(folder, name))
    images.sort(key=lambda p: p.relative_to(root).as_posix())
    others.sort(key=lambda p: p.relative_to(root).as_posix())
    return images, others, {k: n for k, n in left_out.items() if n}


def _holds_run_file(folder: Path) -> bool:
    """Whether `folder` is one of our run folders: it holds run.json, a JSON object."""
    try:
        return isinstance(json.loads((folder / "run.json").read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def _count_images(folder: Path) -> int:
    return sum(
        1
        for _, _, files in os.walk(folder)
        for name in files
        if Path(name).suffix.lower() in IMAGE_EXTENSIONS
    )


def _read_caption_file(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"Cannot read caption file {path}: {exc.strerror or exc}.") from exc
    # Windows Notepad's "Unicode" is UTF-16 with a byte-order mark; read as latin-1 it would
    # become a caption of NUL-separated letters.
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        encoding = "utf-32"
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        text = data.decode("latin-1")
        logger.warning(
            "Caption %s is not valid UTF-8; read it as latin-1. Re-save it as UTF-8 if "
            "accented letters look wrong.",
            path,
        )
    return text.strip() or None


def _normalize_extension(extension: str | None) -> str | None:
    if not extension:
        return None  # sidecar captions off
    return extension if extension.startswith(".") else "." + extension


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
    unlisted = [p for p in _find_images(root)[0] if os.path.realpath(p) not in listed]
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
            problems = pool.map(_image_problem, [c.image for c in chunk])
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


def _image_problem(image: Path | bytes | None) -> str | None:
    """Why `image` cannot be trained on, or None when it decodes cleanly."""
    if image is None:
        return "the row has no image"
    try:
        size = image.stat().st_size if isinstance(image, Path) else len(image)
        if size == 0:
            return "the file is empty (0 bytes)"
        # verify() checks structure (e.g. PNG checksums) but decodes nothing; the load
        # afterwards catches truncated pixel data. PIL needs a fresh open for each.
        with Image.open(image if isinstance(image, Path) else io.BytesIO(image)) as opened:
            check_pixel_count(opened)
            opened.verify()
        load_image(image, draft_size=_VERIFY_DRAFT_SIZE)
    except Exception as exc:  # whatever the decoder raises, the file is unusable
        return _describe(exc)
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "the file does not exist"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file PIL can read (wrong extension, unsupported format or corrupt)"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too large, possibly a decompression bomb ({exc})"
    return f"corrupt or truncated ({type(exc).__name__}: {exc})"


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
