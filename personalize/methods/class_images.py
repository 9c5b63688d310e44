"""Class images for prior preservation: generated once, tied to their prompt and model.

- `ensure_class_images` tops a folder up to `num_class_images` with the base pipeline:
  batched, with a progress bar, each process of a multi-process run generating its own
  share. Image i is named by a hash of (prompt, seed, i) and drawn from a seed derived the
  same way, so a rerun finds what exists and only adds what is missing, and an interrupted
  generation continues where it stopped with the images it would have made. SIGINT/SIGTERM
  stop it after the current batch, keeping every image made (exit 130/143).
- `class_images.json` in the folder records the prompt and the model the generated images
  were made with (`model_identity`); a run with another class prompt or model refuses the
  folder instead of silently training on the wrong class. Images in a folder without it are
  the user's own.

prior.py pairs these images with the instances and weighs their loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from personalize.data.folders import IMAGE_EXTENSIONS
from personalize.errors import DataError, TrainingInterrupted
from personalize.io import atomic_save_png, atomic_write_json
from personalize.models import SDParts
from personalize.signals import StopRequest

logger = logging.getLogger(__name__)

MANIFEST = "class_images.json"
_TMP_MARK = ".tmp-"
_FINGERPRINT_CHUNK = 1 << 16


# ------------------------------------------------------------------------------ naming


def _digest(prompt: str, seed: int, index: int) -> str:
    return hashlib.sha256(f"{prompt}\x00{seed}\x00{index}".encode()).hexdigest()


def class_image_name(prompt: str, seed: int, index: int) -> str:
    """The file name of generated class image `index`: the same on every rerun/process."""
    return f"class-{_digest(prompt, seed, index)[:24]}.png"


def class_image_seed(prompt: str, seed: int, index: int) -> int:
    """Image `index`'s own generator seed: it does not depend on batching or sharding."""
    return int(_digest(prompt, seed, index)[24:40], 16) & (2**63 - 1)


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def missing_indices(existing_names: set[str], prompt: str, seed: int, count: int) -> list[int]:
    """The first `count` image indices whose hash-named file does not exist yet."""
    out, index = [], 0
    while len(out) < count:
        if class_image_name(prompt, seed, index) not in existing_names:
            out.append(index)
        index += 1
    return out


# ------------------------------------------------------------------------------ manifest


def model_identity(path: str, revision: str | None = None, variant: str | None = None) -> dict:
    """What tells one base model from another, wherever its folder lies: for a local model,
    a hash of the size and three slices from inside its largest UNet weights file (the
    header of a safetensors file is the same for every fine-tune of an architecture); for
    a hub id, the id and revision."""
    local = Path(path).expanduser()
    weights = (
        [local]
        if local.is_file()
        else [p for p in (local / "unet").glob("*") if p.is_file()]
        if local.is_dir()
        else []
    )
    if not weights:
        return {"path": path, "fingerprint": f"hub:{path}@{revision or 'main'}:{variant or ''}"}
    largest = max(weights, key=lambda p: p.stat().st_size)
    size = largest.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(largest, "rb") as f:
        for quarter in (1, 2, 3):
            f.seek(size * quarter // 4)
            digest.update(f.read(_FINGERPRINT_CHUNK))
    return {"path": path, "fingerprint": digest.hexdigest()[:32]}


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "prompt" in manifest else None


def check_class_folder(folder: Path, prompt: str, model: dict | None, have: int) -> None:
    """Refuse a folder of images generated for another class prompt or another model."""
    manifest = _read_manifest(folder) if have else None  # an emptied folder starts over
    if manifest is None:
        if have and not (folder / MANIFEST).exists():
            logger.info(
                "class images: %d images in %s with no manifest: using them as your own "
                "class images for %r",
                have,
                folder,
                prompt,
            )
        return
    hint = (
        f"Give each class prompt and model its own prior.class_data_dir, or empty {folder} "
        "to generate new ones."
    )
    if manifest["prompt"] != prompt:
        raise DataError(
            f"prior.class_data_dir {folder} holds class images generated for "
            f"{manifest['prompt']!r}, not for this run's class_prompt {prompt!r}. {hint}"
        )
    made_with = manifest.get("model") or {}
    if model and made_with and made_with.get("fingerprint") != model["fingerprint"]:
        raise DataError(
            f"prior.class_data_dir {folder} holds class images generated with another model "
            f"({made_with.get('path')}), not this run's model.path {model['path']}; prior "
            f"preservation keeps the prior of the model being trained. {hint}"
        )


def _write_manifest(folder: Path, prompt: str, model: dict | None) -> None:
    data = {"prompt": prompt, "model": model}
    atomic_write_json(folder / MANIFEST, data)  # its temporary name holds _TMP_MARK


# ------------------------------------------------------------------------------ generation


def _short_list(items: list[int], keep: int = 8) -> str:
    """[0, 2, 4] in full; a long list as its first few and last items (a run with 200 class
    images would otherwise print 200 numbers)."""
    if len(items) <= keep:
        return str(items)
    return "[" + ", ".join(map(str, items[: keep - 1])) + f", ..., {items[-1]}]"


def _process_state(state):
    if state is not None:
        return state
    from accelerate import PartialState

    return PartialState()


def ensure_class_images(
    folder: str | Path,
    prompt: str,
    num_images: int,
    make_pipeline: Callable[[], Any],
    *,
    seed: int,
    batch_size: int = 4,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    state=None,
    model: dict | None = None,
) -> list[int]:
    """Generate the class images `folder` lacks to hold `num_images` images; every process
    of the run must call this. Returns the indices this process generated.

    Every image file in the folder counts, the user's own included. The processes list the
    folder before any of them writes, so they agree on what is missing; process k takes
    every num_processes-th missing index. `make_pipeline` is only called when this process
    has something to generate. `model` (model_identity) is checked against, and recorded
    in, the folder's manifest with the prompt; a mismatch raises DataError."""
    state = _process_state(state)
    folder = Path(folder)
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f".*{_TMP_MARK}*"):  # half-written by an interrupted run
            stale.unlink(missing_ok=True)
    state.wait_for_everyone()
    files = _image_files(folder)
    check_class_folder(folder, prompt, model, len(files))
    todo = missing_indices({p.name for p in files}, prompt, seed, max(0, num_images - len(files)))
    if todo and state.is_main_process:
        _write_manifest(folder, prompt, model)  # before any image: an interruption keeps it
    state.wait_for_everyone()  # everyone has listed the folder; now writing may begin
    mine = todo[state.process_index :: state.num_processes]
    if todo and state.is_main_process:
        logger.info(
            "class images: %d of %d in %s; generating %d with %r on %d process(es)",
            len(files),
            num_images,
            folder,
            len(todo),
            prompt,
            state.num_processes,
        )
    if mine:
        logger.info(
            "process %d generates %d class images: %s",
            state.process_index,
            len(mine),
            _short_list(mine),
        )
        pipe = make_pipeline()
        device = getattr(pipe, "device", torch.device("cpu"))
        use_autocast = autocast_dtype is not None and device.type != "cpu"
        batches = range(0, len(mine), batch_size)
        # Ctrl-C / SIGTERM: finish the batch in flight (its images are saved), then stop.
        with StopRequest("keeping the images made, stopping after this batch") as stop:
            for start in tqdm(
                batches, desc="class images", unit="batch", disable=not state.is_local_main_process
            ):
                if stop.signum:
                    break
                chunk = mine[start : start + batch_size]
                generators = [
                    torch.Generator("cpu").manual_seed(class_image_seed(prompt, seed, i))
                    for i in chunk
                ]
                autocast = (
                    torch.autocast(device.type, dtype=autocast_dtype)
                    if use_autocast
                    else contextlib.nullcontext()
                )
                with autocast, torch.no_grad():
                    images = pipe(
                        [prompt] * len(chunk),
                        generator=generators,
                        num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale,
                        height=resolution,
                        width=resolution,
                    ).images
                for index, image in zip(chunk, images):
                    atomic_save_png(image, folder / class_image_name(prompt, seed, index))
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if stop.signum:
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(stop.signum).name} during class-image generation; "
                f"{len(_image_files(folder))} of {num_images} class images saved in {folder}. "
                "Continue with resume=latest (generation picks up where it stopped).",
                stop.signum,
            )
    state.wait_for_everyone()
    if state.is_main_process:
        have = len(_image_files(folder))
        if have < num_images:
            raise DataError(
                f"class images: {folder} holds {have} images after generation, "
                f"expected {num_images}; is the folder writable and the disk "
                "not full?"
            )
    state.wait_for_everyone()
    return mine


def generation_pipeline(parts: SDParts, device: torch.device):
    """The base model's pipeline for `make_pipeline` (the parts as loaded, on `device`)."""
    from personalize.models import pipeline_from_parts

    pipe = pipeline_from_parts(parts)
    pipe.to(device)
    return pipe
