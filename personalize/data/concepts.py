"""Concepts: the folders of one run, each with its own prompt, repeats, captions and classes.

A run trains on one or more concepts (`resolve_concepts`):
- `data.concepts`: a YAML list, each entry a folder with its own settings;
- `data.path` laid out the kohya way (sd-scripts' `train_data_dir`): a folder with no image
  of its own whose subfolders are named `<repeats>_<prompt>`, e.g. `10_sks dog`;
- any other `data.path`: the one-concept case (data.prompt, data.repeats, ...).

`epoch_order` lists which record every example of an epoch shows: each concept's images
times its repeats (`concept_balance: repeats`, as kohya does), or as many examples for
every concept as the largest one has (`equal`). The samplers (plain, or by aspect bucket)
shuffle and shard that list like any other dataset's indices.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from personalize.data.folders import IMAGE_EXTENSIONS, METADATA_NAMES, real_paths
from personalize.errors import DataError

# kohya names a concept folder `<repeats>_<prompt>`: the text before the first "_" is the
# repeat count, the rest (its own "_" kept) the prompt (config_util.extract_dreambooth_params).
_KOHYA_NAME = re.compile(r"^\d+_")
BALANCES = ("repeats", "equal")


@dataclass(frozen=True)
class Concept:
    """One concept with every setting resolved (the data/prior sections' values filled in)."""

    name: str
    path: Path | None = None
    prompt: str | None = None  # the instance prompt for its images without a caption
    repeats: int = 1
    caption_extension: str | None = ".txt"
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0
    class_prompt: str | None = None  # None: prior.class_prompt
    class_data_dir: str | None = None  # None: see methods/prior.py concept_class_folders
    num_class_images: int | None = None  # None: prior.num_class_images


def parse_kohya_name(name: str) -> tuple[int, str | None]:
    """(repeats, prompt) of a `<repeats>_<prompt>` folder name, e.g. "10_sks dog" -> (10,
    "sks dog"); an empty prompt ("10_") is None. DataError names the folder otherwise."""
    head, sep, prompt = name.partition("_")
    if not sep or not head.isdigit():
        raise DataError(
            f"Concept folder {name!r} is not named <repeats>_<prompt> (e.g. '10_sks dog'); "
            "rename it, or move it out of the folder of concepts."
        )
    repeats = int(head)
    if repeats < 1:
        raise DataError(
            f"Concept folder {name!r} has {repeats} repeats; it needs at least 1 "
            "(move the folder out to leave the concept out)."
        )
    return repeats, prompt.strip() or None


def kohya_folders(parent: Path, skip: set[str] = frozenset()) -> list[Path] | None:
    """The concept folders of `parent` when it is laid out the kohya way: no image or
    metadata file of its own, and a subfolder named like `10_sks dog`. Then every other
    subfolder must be named so too (DataError names the first that is not). None when
    `parent` is an ordinary data folder. Hidden folders, `skip` (real paths) and our run
    folders (holding run.json) are left out, as when images are scanned."""
    if not parent.is_dir():
        return None
    entries = [e for e in os.scandir(parent) if not e.name.startswith(".")]
    own_files = [e.name for e in entries if e.is_file()]
    if any(Path(n).suffix.lower() in IMAGE_EXTENSIONS or n in METADATA_NAMES for n in own_files):
        return None
    folders = sorted(
        Path(e.path)
        for e in entries
        if e.is_dir()
        and os.path.realpath(e.path) not in skip
        and not (Path(e.path) / "run.json").is_file()
    )
    if not any(_KOHYA_NAME.match(f.name) for f in folders):
        return None
    for folder in folders:
        parse_kohya_name(folder.name)
    return folders


def resolve_concepts(cfg, skip=()) -> list[Concept]:
    """The run's concepts, in a fixed order. DataError (naming the concept) for a missing
    folder, an empty kohya folder, two entries for one folder, or two with one name."""
    d = cfg.data
    skipped = real_paths(skip)
    if d.concepts:
        concepts = [_from_entry(d, c, i) for i, c in enumerate(d.concepts)]
    elif d.path and (folders := kohya_folders(Path(d.path).expanduser(), skipped)) is not None:
        concepts = [_from_kohya_folder(d, folder) for folder in folders]
    else:
        return [_single(d)]
    _check_unique(concepts)
    for concept in concepts:
        if not concept.path.exists():
            raise DataError(f"Concept {concept.name!r}: folder {concept.path} does not exist.")
    return concepts


def reg_folders(reg_path: str) -> list[Concept]:
    """data.reg_path's `<repeats>_<prompt>` subfolders (kohya's reg_data_dir) as concepts
    whose prompt is the class prompt of their images."""
    root = Path(reg_path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.reg_path {root} is not a folder.")
    folders = kohya_folders(root)
    if not folders:
        raise DataError(
            f"data.reg_path {root} holds no <repeats>_<prompt> subfolder (e.g. '1_dog'); "
            "put the regularization images in one."
        )
    concepts = []
    for folder in folders:
        repeats, prompt = parse_kohya_name(folder.name)
        concepts.append(Concept(folder.name, folder, prompt, repeats))
    return concepts


def epoch_order(counts: list[int], repeats: list[int], balance: str = "repeats") -> list[int]:
    """The record index of every example of one epoch, concept after concept (records of
    concept c follow those of concept c-1). `repeats`: concept c's images, each repeats[c]
    times (image j again after all of them, as with one folder). `equal`: every concept
    shows K = max(images x repeats) examples, cycling through its images, so image j of a
    concept with n images shows floor(K/n) or ceil(K/n) times."""
    if balance not in BALANCES:
        raise DataError(f"data.concept_balance must be repeats or equal, got {balance!r}")
    order: list[int] = []
    start = 0
    most = max(n * r for n, r in zip(counts, repeats, strict=True))
    for n, r in zip(counts, repeats, strict=True):
        shown = n * r if balance == "repeats" else most
        order += [start + s % n for s in range(shown)]
        start += n
    return order


# ----------------------------------------------------------------------------- helpers


def _single(d) -> Concept:
    return Concept(
        name=Path(d.path).name if d.path else "data",
        path=Path(d.path).expanduser(),
        prompt=d.prompt,
        repeats=d.repeats,
        caption_extension=d.caption_extension,
        caption_dropout=d.caption_dropout,
        shuffle_tags=d.shuffle_tags,
        keep_tokens=d.keep_tokens,
    )


def _from_entry(d, c, index: int) -> Concept:
    def own(value, default):
        return default if value is None else value

    path = Path(c.path).expanduser()
    return Concept(
        name=c.name or path.name or f"concept{index}",
        path=path,
        prompt=c.prompt,
        repeats=c.repeats,
        caption_extension=own(c.caption_extension, d.caption_extension),
        caption_dropout=own(c.caption_dropout, d.caption_dropout),
        shuffle_tags=own(c.shuffle_tags, d.shuffle_tags),
        keep_tokens=own(c.keep_tokens, d.keep_tokens),
        class_prompt=c.class_prompt,
        class_data_dir=c.class_data_dir,
        num_class_images=c.num_class_images,
    )


def _from_kohya_folder(d, folder: Path) -> Concept:
    repeats, prompt = parse_kohya_name(folder.name)
    # The folder's prompt captions its images without a caption file, as in kohya; data.*
    # caption settings apply to every folder alike.
    return Concept(
        name=folder.name,
        path=folder,
        prompt=prompt,
        repeats=repeats,
        caption_extension=d.caption_extension,
        caption_dropout=d.caption_dropout,
        shuffle_tags=d.shuffle_tags,
        keep_tokens=d.keep_tokens,
    )


def _check_unique(concepts: list[Concept]) -> None:
    names: dict[str, Concept] = {}
    folders: dict[str, Concept] = {}
    for concept in concepts:
        if concept.name in names:
            raise DataError(
                f"Two concepts are named {concept.name!r}; give each its own name (data."
                "concepts[].name)."
            )
        names[concept.name] = concept
        real = os.path.realpath(concept.path)
        if real in folders:
            raise DataError(
                f"Concept {concept.name!r} reads the same folder {concept.path} as concept "
                f"{folders[real].name!r}; list each folder once (raise its repeats instead)."
            )
        folders[real] = concept
