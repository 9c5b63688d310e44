"""Prior preservation with class images, shared by `method: dreambooth` and `method: lora`.

DreamBooth (Ruiz et al., 2023) trains on the subject ("a photo of sks dog") and, in the
same batch, on images of its class ("a photo of a dog") that the model itself generated
before training; the loss is `instance + prior_loss_weight * class`, which keeps the class
from drifting toward the subject (language drift) and keeps its diversity.

- `ensure_class_images` tops `class_data_dir` up to `num_class_images` with the base
  pipeline: batched, with a progress bar, each process of a multi-process run generating
  its own share. Image i is named by a hash of (prompt, seed, i) and drawn from a seed
  derived the same way, so a rerun finds what exists and only adds what is missing, and
  an interrupted generation continues where it stopped with the images it would have made.
  SIGINT/SIGTERM stop it after the current batch, keeping every image made (exit 130/143).
- `class_images.json` in the folder records the prompt and the model the generated images
  were made with; a run with another class prompt or model refuses the folder instead of
  silently training on the wrong class. Images in a folder without it are the user's own.
- `PriorPairedDataset` gives every instance example a class example under "prior"; the
  loop's collate appends those after the instance examples and marks them in is_prior.
- `prior_preservation_loss` is the reduction `instance mean + weight * class mean`.
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
import torch.nn.functional as F
from tqdm.auto import tqdm

from personalize.data import ImageCaptionDataset, load_records
from personalize.data.records import IMAGE_EXTENSIONS
from personalize.errors import DataError, TrainingInterrupted
from personalize.io import atomic_save_png, atomic_write_json
from personalize.models import SDParts
from personalize.precision import precision_dtype
from personalize.signals import StopRequest

logger = logging.getLogger(__name__)

CLASS_IMAGES_DIR = "class_images"
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


def class_data_dir(cfg) -> Path:
    """prior.class_data_dir, or output_dir/class_images when unset."""
    return Path(cfg.prior.class_data_dir or Path(cfg.output_dir) / CLASS_IMAGES_DIR)


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


def _generation_pipeline(parts: SDParts, device: torch.device):
    from personalize.models import pipeline_from_parts

    pipe = pipeline_from_parts(parts)
    pipe.to(device)
    return pipe


# ------------------------------------------------------------------------------ the dataset


class PriorPairedDataset(torch.utils.data.Dataset):
    """Instance item i plus a class example under "prior".

    One epoch is one pass over the instance data (its length, its sampler); class examples
    rotate with the epoch, (epoch * len + i) mod num_class, so every class image is used
    over the epochs. A class image is fitted to its instance partner's size when the two
    differ (aspect-ratio buckets), because a batch must stack."""

    def __init__(
        self,
        instance: torch.utils.data.Dataset,
        prior: ImageCaptionDataset,
        vae_scale_factor: int = 8,
    ):
        if len(prior) == 0:
            raise DataError("prior preservation: no class images")
        self.instance = instance
        self.prior = prior
        self.vae_scale_factor = vae_scale_factor
        self._epoch = 0

    def __len__(self) -> int:
        return len(self.instance)

    @property
    def epoch(self) -> int:
        return int(getattr(self.instance, "epoch", self._epoch))

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        if hasattr(self.instance, "set_epoch"):
            self.instance.set_epoch(epoch)
        self.prior.set_epoch(epoch)

    def __getattr__(self, name: str):
        # Everything else (records, sizes, latents...) is the instance dataset's.
        if name in ("instance", "prior"):
            raise AttributeError(name)
        return getattr(self.instance, name)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.instance[i])
        epoch = self.epoch
        # The loop sets the epoch on the instance dataset; the class data follows it.
        if self.prior.epoch != epoch:
            self.prior.set_epoch(epoch)
        j = (epoch * len(self.instance) + (i % len(self.instance))) % len(self.prior)
        example = self.prior[j]
        if "latent_dist" not in example:  # cached latents are already the instances' size
            example["pixel_values"] = _fit(example["pixel_values"], self._pixel_size(item))
        item["prior"] = example
        return item

    def _pixel_size(self, item: dict[str, Any]) -> tuple[int, int]:
        if "pixel_values" in item:
            return tuple(item["pixel_values"].shape[-2:])
        h, w = item["latent_dist"].shape[-2:]
        return h * self.vae_scale_factor, w * self.vae_scale_factor


def _fit(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover `size` (h, w), then center-crop to it."""
    h, w = size
    ph, pw = pixels.shape[-2:]
    if (ph, pw) == (h, w):
        return pixels
    scale = max(h / ph, w / pw)
    nh, nw = max(h, round(ph * scale)), max(w, round(pw * scale))
    resized = F.interpolate(
        pixels[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
    )[0]
    top, left = (nh - h) // 2, (nw - w) // 2
    return resized[:, top : top + h, left : left + w].clamp(-1, 1).to(pixels.dtype)


# ------------------------------------------------------------------------------ for methods


def _autocast_dtype(cfg) -> torch.dtype | None:
    precision = cfg.prior.generation_precision or cfg.train.mixed_precision
    dtype = precision_dtype(precision)
    return None if dtype == torch.float32 else dtype


def uses_class_images(cfg) -> bool:
    return cfg.prior.enabled and cfg.prior.kind == "class_images"


def wrap_with_prior(
    cfg, dataset: torch.utils.data.Dataset, parts: SDParts, accelerator
) -> torch.utils.data.Dataset:
    """`Method.wrap_train_dataset` for prior preservation with class images: generate the
    missing ones with the base model (adapters off), then pair them with the instances."""
    if not uses_class_images(cfg):
        return dataset
    from personalize.methods.regularizers import adapters_disabled

    folder = class_data_dir(cfg)
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    with adapters_disabled(parts.unet, parts.text_encoder):
        ensure_class_images(
            folder,
            cfg.prior.class_prompt,
            cfg.prior.num_class_images,
            lambda: _generation_pipeline(parts, device),
            seed=cfg.seed,
            batch_size=cfg.prior.generation_batch_size,
            num_inference_steps=cfg.prior.generation_steps,
            guidance_scale=cfg.prior.generation_guidance_scale,
            resolution=cfg.train.resolution,
            autocast_dtype=_autocast_dtype(cfg),
            state=accelerator,
            model=model_identity(cfg.model.path, cfg.model.revision, cfg.model.variant),
        )
    d = cfg.data
    records = load_records(folder, caption_extension=d.caption_extension, strict=d.strict)
    records = records[: cfg.prior.num_class_images]
    prior = ImageCaptionDataset(
        records,
        resolution=cfg.train.resolution,
        center_crop=True,
        random_flip=d.random_flip,
        instance_prompt=cfg.prior.class_prompt,
        seed=cfg.seed + 1,
    )
    vae_scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    logger.info(
        "prior preservation: %d class images from %s, prior_loss_weight %g",
        len(records),
        folder,
        cfg.prior.loss_weight,
    )
    return PriorPairedDataset(dataset, prior, vae_scale)


def prior_preservation_loss(
    per_example: torch.Tensor, batch: dict[str, Any], prior_loss_weight: float
) -> torch.Tensor:
    """instance mean + prior_loss_weight * class mean; the plain mean without class rows.
    Masked sums, not boolean indexing, so the GPU never waits for the host."""
    is_prior = batch.get("is_prior")
    if is_prior is None:
        return per_example.mean()
    prior = is_prior.to(per_example.device, per_example.dtype)
    instance = 1.0 - prior
    instance_loss = (per_example * instance).sum() / instance.sum().clamp(min=1.0)
    prior_loss = (per_example * prior).sum() / prior.sum().clamp(min=1.0)
    return instance_loss + prior_loss_weight * prior_loss
