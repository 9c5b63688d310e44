"""The run's output folder: checked and made ready before the model loads, so no run loses
another's work (docs/reliability.md, "First contact: no lost work").

- It must not be the base model's folder or inside it: DreamBooth saves its UNet, VAE and
  text encoder there and would write over the model being trained.
- A folder holding a run with work in it (a complete checkpoint or any saved file: an
  artifact, samples, best/) is refused unless `resume` or `overwrite` is set. A folder
  holding only what a run writes before its first checkpoint (run.json, the log, cache/,
  class_images/) is no work to protect: the new run goes on in it.
- `overwrite=true` moves the previous run's files into a dated folder beside it, so its
  checkpoints can neither be resumed nor win the pruning by their higher step numbers,
  and its artifact cannot be mistaken for the new one. Nothing is deleted; the caches and
  class images stay for reuse.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from personalize.config import ConfigError, PersonalizeConfig
from personalize.errors import OutputExistsError, OutputPermissionError
from personalize.training import checkpoint as ckpt

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOG_FILE = "train_log.jsonl"
# What a run writes before its first checkpoint (logs/: tensorboard); a folder holding only
# these holds no work.
_STARTUP_ENTRIES = frozenset({RUN_FILE, LOG_FILE, "cache", "class_images", "logs"})
# Reusable, checked on use (latents by key, class images by manifest): they stay on overwrite.
_KEPT_ON_OVERWRITE = frozenset({"cache", "class_images"})


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_not_in_model(cfg: PersonalizeConfig) -> None:
    """Refuse an output_dir that is model.path or inside it (a local folder)."""
    model = Path(cfg.model.path).expanduser()
    if not cfg.model.path or not model.is_dir():
        return
    out = Path(cfg.output_dir).expanduser().resolve()
    if _is_within(out, model.resolve()):
        raise ConfigError(
            f"output_dir {cfg.output_dir} is inside model.path {cfg.model.path}: training "
            "would write over the base model it loads. Choose an output_dir outside it."
        )


def work_in(out: Path) -> list[str]:
    """Names of the entries of `out` that hold work: a complete checkpoint or any file a
    run saves after its start (artifact, samples, best/, summary.json), or the user's."""
    found = []
    for entry in sorted(out.iterdir()) if out.is_dir() else []:
        if entry.name.startswith("."):  # half-written temporaries, our write probe
            continue
        if entry.name == ckpt.CHECKPOINTS:
            if ckpt.complete_checkpoints(out):
                found.append(entry.name)
        elif entry.name not in _STARTUP_ENTRIES:
            found.append(entry.name)
    return found


def _aside_name(out: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out.with_name(f"{out.name}.replaced-{stamp}")
    n = 2
    while aside.exists():
        aside = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
        n += 1
    return aside


def _move_aside(out: Path, in_use: list[Path]) -> None:
    """Move the previous run's entries into `<out>.replaced-<date>-<time>` beside `out`."""
    aside = _aside_name(out)
    kept = []
    try:
        aside.mkdir()
        for entry in sorted(out.iterdir()):
            real = entry.resolve()
            if entry.name in _KEPT_ON_OVERWRITE or any(_is_within(p, real) for p in in_use):
                kept.append(entry.name)
                continue
            os.replace(entry, aside / entry.name)
    except OSError as e:
        raise OutputPermissionError(
            f"overwrite=true: could not move the previous run in {out} aside to {aside} "
            f"({e}); move or delete it yourself, or choose another output_dir"
        ) from e
    logger.warning(
        "overwrite=true: moved the previous run in %s to %s (kept %s for reuse); delete "
        "that folder when you no longer need it",
        out,
        aside,
        ", ".join(kept) or "nothing",
    )


def prepare_output_dir(cfg: PersonalizeConfig) -> None:
    """Main process only, before the model loads: refuse, clear or create `output_dir`."""
    check_not_in_model(cfg)
    out = Path(cfg.output_dir).expanduser()
    holds_run = (out / RUN_FILE).exists() or ckpt.checkpoint_root(out).exists()
    work = work_in(out) if holds_run else []
    if work and not cfg.resume and not cfg.overwrite:
        raise OutputExistsError(
            f"output_dir {out} already holds a run. Set resume=latest to continue it, "
            "overwrite=true to write over it, or choose another output_dir."
        )
    if work and cfg.overwrite and not cfg.resume:
        # Folders the new run reads (its model, data, class images) stay where they are.
        d = cfg.data
        reads = [cfg.model.path, d.path, d.validation_path, d.cache_dir, cfg.prior.class_data_dir]
        reads += [d.reg_path, *(p for c in d.concepts for p in (c.path, c.class_data_dir))]
        _move_aside(out, [Path(p).expanduser().resolve() for p in reads if p])
    elif holds_run and not work:
        # Rows of a run that saved nothing would mix with this run's steps.
        (out / LOG_FILE).unlink(missing_ok=True)
        logger.info(
            "output_dir %s holds no checkpoint and no artifact of an earlier run (only what a "
            "run writes at its start): training into it",
            out,
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OutputPermissionError(
            f"output_dir {out} cannot be created or written ({e}); choose another output_dir"
        ) from e
