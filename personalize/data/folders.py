"""Finding images and their caption files in a folder tree.

The folder layout of `load_records` (records.py): every image under the folder, sorted by
relative path, with `x.txt` next to `x.png` as its caption (matched whatever the case of
the name). Hidden files and our own run folders (the run's output_dir, a folder holding a
run's run.json) are left out, and every file a user would expect to be used and is not is
named in one warning line per kind: nothing in the data folder is dropped silently.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from personalize.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
# Our own files that sit beside images and are not data: not reported as ignored files.
# class_images.json ties a class-image folder to its prompt and model (methods/class_images.py).
OWN_FILES = ("class_images.json",)
# Loss masks beside their images (data/masks.py): OneTrainer's `x-masklabel.png`,
# `x.mask.png`, and `masks/x.png` in the image's folder.
MASK_SUFFIXES = ("-masklabel", ".mask")
MASK_FOLDER = "masks"


class FolderImage(NamedTuple):
    key: str  # the path relative to the data folder, with forward slashes
    path: Path
    caption: str | None  # None: no caption file (or an empty one)


def real_paths(paths: Iterable[str | Path]) -> set[str]:
    return {os.path.realpath(Path(p).expanduser()) for p in paths}


def folder_images(
    root: Path, caption_extension: str | None, skip: set[str] = frozenset()
) -> list[FolderImage]:
    """Every image under `root` with its sidecar caption; `skip` holds real paths of
    folders to leave out (see find_images). DataError when there is no image at all."""
    images, others, skipped = find_images(root, skip)
    # Loss masks (x-masklabel.png, x.mask.png, masks/x.png beside x.jpg) are not pictures to
    # train on, whether or not data.masked_loss uses them.
    images, mask_files = split_mask_files(images)
    if mask_files:
        logger.info("%d mask file(s) in %s are not training images", len(mask_files), root)
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
    listed = []
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
        listed.append(FolderImage(image.relative_to(root).as_posix(), image, caption))
    _report_folder_leftovers(root, others, sidecars, used, other_case, caption_suffix)
    return listed


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


def is_mask_file(path: Path, image_names: set[tuple[Path, str]]) -> bool:
    """Whether image file `path` is the mask of another image; `image_names` holds
    (folder, stem) of every image found. Such files are never training images."""
    stem = path.stem
    for suffix in MASK_SUFFIXES:
        if stem.endswith(suffix) and (path.parent, stem[: -len(suffix)]) in image_names:
            return True
    return path.parent.name == MASK_FOLDER and (path.parent.parent, stem) in image_names


def split_mask_files(images: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training images, mask files) of a folder scan: `x-masklabel.png`, `x.mask.png` and
    `masks/x.png` are masks when an image `x.*` sits where they point."""
    names = {(p.parent, p.stem) for p in images}
    masks = [p for p in images if is_mask_file(p, names)]
    if not masks:
        return list(images), []
    taken = set(masks)
    return [p for p in images if p not in taken], masks


def find_images(
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
            elif suffix and name not in METADATA_NAMES and name not in OWN_FILES:
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


def normalize_caption_extension(extension: str | None) -> str | None:
    if not extension:
        return None  # sidecar captions off
    return extension if extension.startswith(".") else "." + extension
