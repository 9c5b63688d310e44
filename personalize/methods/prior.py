"""Prior preservation with class images, shared by `method: dreambooth` and `method: lora`.

DreamBooth (Ruiz et al., 2023) trains on the subject ("a photo of sks dog") and, in the
same batch, on images of its class ("a photo of a dog") that the model itself generated
before training; the loss is `instance + prior_loss_weight * class`, which keeps the class
from drifting toward the subject (language drift) and keeps its diversity.

- The class images themselves (generated with the base model, resumable, sharded across
  processes, tied to their prompt and model) are class_images.py's; `class_data_dir` says
  where they are, `wrap_with_prior` makes sure they exist before pairing them.
- `PriorPairedDataset` gives every instance example a class example under "prior"; the
  loop's collate appends those after the instance examples and marks them in is_prior.
- `prior_preservation_loss` is the reduction `instance mean + weight * class mean`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from personalize.data import ImageCaptionDataset, load_records
from personalize.data.concepts import Concept, reg_folders, resolve_concepts
from personalize.errors import DataError
from personalize.methods.class_images import (
    class_image_name,
    ensure_class_images,
    generation_pipeline,
    model_identity,
)
from personalize.models import SDParts
from personalize.precision import precision_dtype

logger = logging.getLogger(__name__)

CLASS_IMAGES_DIR = "class_images"
# class_image_name and ensure_class_images are class_images.py's, importable from here too.
__all__ = [
    "CLASS_IMAGES_DIR",
    "PriorPairedDataset",
    "class_data_dir",
    "class_image_name",
    "ensure_class_images",
    "prior_preservation_loss",
    "uses_class_images",
    "wrap_with_prior",
]


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
        pools: list[list[int] | None] | None = None,
    ):
        if len(prior) == 0:
            raise DataError("prior preservation: no class images")
        self.instance = instance
        self.prior = prior
        self.vae_scale_factor = vae_scale_factor
        # Several concepts: pools[c] lists the class examples concept c's instances pair
        # with (None: that concept has no class prompt and trains unpaired).
        self.pools = pools
        if pools is not None and any(pool is not None and not pool for pool in pools):
            raise DataError("prior preservation: a concept's class-image pool is empty")
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
        if name in ("instance", "prior", "pools"):
            raise AttributeError(name)
        return getattr(self.instance, name)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.instance[i])
        epoch = self.epoch
        # The loop sets the epoch on the instance dataset; the class data follows it.
        if self.prior.epoch != epoch:
            self.prior.set_epoch(epoch)
        pool: Any = range(len(self.prior))
        if self.pools is not None:
            pool = self.pools[self.instance.concept_at(i)]
            if pool is None:
                return item
        turn = epoch * len(self.instance) + (i % len(self.instance))
        example = self.prior[pool[turn % len(pool)]]
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


def class_data_dir(cfg) -> Path:
    """prior.class_data_dir, or output_dir/class_images when unset."""
    return Path(cfg.prior.class_data_dir or Path(cfg.output_dir) / CLASS_IMAGES_DIR)


def uses_class_images(cfg) -> bool:
    return cfg.prior.enabled and cfg.prior.kind == "class_images"


class ClassImages(NamedTuple):
    """One folder of class images and the concepts (indices) whose instances pair with it."""

    folder: Path
    prompt: str | None  # None: data.reg_path's folders, captioned by their names
    count: int  # how many images to use (and to generate when missing)
    concepts: list[int]
    generate: bool = True
    repeats: int = 1


def concept_class_folders(cfg, concepts: list[Concept]) -> list[ClassImages]:
    """Where each concept's class images are: data.reg_path's folders (your own images,
    shared by every concept, as in kohya); else a concept's class_data_dir; with its own
    class_prompt, <prior.class_data_dir or output_dir/class_images>/<concept name>; with
    prior.class_prompt, prior.class_data_dir (shared). One entry per folder; DataError when
    two concepts want different class prompts in one folder."""
    p = cfg.prior
    if cfg.data.reg_path:
        every = list(range(len(concepts)))
        return [
            ClassImages(reg.path, reg.prompt, 0, every, generate=False, repeats=reg.repeats)
            for reg in reg_folders(cfg.data.reg_path)
        ]
    single = not cfg.data.concepts and len(concepts) == 1
    by_folder: dict[str, ClassImages] = {}
    for index, concept in enumerate(concepts):
        prompt = concept.class_prompt or p.class_prompt
        if not prompt:
            logger.info("prior preservation: concept %s has no class prompt", concept.name)
            continue
        if concept.class_data_dir:
            folder = Path(concept.class_data_dir).expanduser()
        elif concept.class_prompt and not single:
            folder = class_data_dir(cfg) / _folder_name(concept.name)
        else:
            folder = class_data_dir(cfg)
        count = concept.num_class_images or p.num_class_images
        key = os.path.realpath(folder)
        known = by_folder.get(key)
        if known is None:
            by_folder[key] = ClassImages(folder, prompt, count, [index])
            continue
        if known.prompt != prompt:
            other = concepts[known.concepts[0]].name
            raise DataError(
                f"Concepts {other!r} and {concept.name!r} share the class-image folder "
                f"{folder} with different class prompts ({known.prompt!r}, {prompt!r}); give "
                "each its own class_data_dir."
            )
        known.concepts.append(index)
        by_folder[key] = known._replace(count=max(known.count, count))
    return list(by_folder.values())


def _folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "concept"


def _concepts_of(cfg, dataset) -> list[Concept]:
    concepts = getattr(dataset, "concepts", None)
    return list(concepts) if concepts else resolve_concepts(cfg, [cfg.output_dir])


def wrap_with_prior(
    cfg, dataset: torch.utils.data.Dataset, parts: SDParts, accelerator
) -> torch.utils.data.Dataset:
    """`Method.wrap_train_dataset` for prior preservation with class images: generate the
    missing ones with the base model (adapters off), then pair them with the instances,
    each concept with its own class images."""
    if not uses_class_images(cfg):
        return dataset
    from personalize.methods.regularizers import adapters_disabled

    concepts = _concepts_of(cfg, dataset)
    folders = concept_class_folders(cfg, concepts)
    if not folders:
        raise DataError(
            "prior preservation: no concept has a class prompt; set prior.class_prompt or "
            "data.concepts[].class_prompt."
        )
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    model = model_identity(cfg.model.path, cfg.model.revision, cfg.model.variant)
    with adapters_disabled(parts.unet, *parts.text_encoders().values()):
        for entry in folders:
            if not entry.generate:
                continue
            ensure_class_images(
                entry.folder,
                entry.prompt,
                entry.count,
                lambda: generation_pipeline(parts, device),
                seed=cfg.seed,
                batch_size=cfg.prior.generation_batch_size,
                num_inference_steps=cfg.prior.generation_steps,
                guidance_scale=cfg.prior.generation_guidance_scale,
                resolution=cfg.train.resolution,
                autocast_dtype=_autocast_dtype(cfg),
                state=accelerator,
                model=model,
            )
    d = cfg.data
    records: list = []
    class_concepts: list[Concept] = []
    concept_of: list[int] = []
    order: list[int] = []
    pools: list[list[int] | None] = [None] * len(concepts)
    for entry in folders:
        try:
            found = load_records(
                entry.folder, caption_extension=d.caption_extension, strict=d.strict
            )
        except DataError as exc:
            raise DataError(f"class images of {entry.folder.name!r}: {exc}") from exc
        if entry.generate:
            found = found[: entry.count]
        start, first = len(records), len(order)
        records += found
        concept_of += [len(class_concepts)] * len(found)
        class_concepts.append(Concept(entry.folder.name, entry.folder, entry.prompt))
        # kohya's reg repeats weigh a folder within the pool.
        order += [start + j for _ in range(entry.repeats) for j in range(len(found))]
        for index in entry.concepts:
            pools[index] = (pools[index] or []) + list(range(first, len(order)))
    prior = ImageCaptionDataset(
        records,
        resolution=cfg.train.resolution,
        center_crop=True,
        random_flip=d.random_flip,
        seed=cfg.seed + 1,
        concepts=class_concepts,
        concept_of=concept_of,
        order=order,
    )
    vae_scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    for entry in folders:
        logger.info(
            "prior preservation: class images %s (%r) for %s, prior_loss_weight %g",
            entry.folder,
            entry.prompt or "folder prompt",
            ", ".join(concepts[i].name or "the data" for i in entry.concepts),
            cfg.prior.loss_weight,
        )
    single = len(folders) == 1 and folders[0].concepts == list(range(len(concepts)))
    return PriorPairedDataset(dataset, prior, vae_scale, None if single else pools)


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


class PriorPreservationHooks:
    """The Method hooks of prior preservation, one copy for the methods that offer it
    (dreambooth, lora): mix in before `Method`."""

    cfg: Any

    def wrap_train_dataset(self, dataset, parts: SDParts, accelerator):
        return wrap_with_prior(self.cfg, dataset, parts, accelerator)

    def latent_datasets(self, dataset) -> list:
        # The class images paired with the instances: their latents may be cached too.
        class_images = getattr(dataset, "prior", None)
        return [class_images] if class_images is not None else []

    def output_folders(self) -> list[Path]:
        if not uses_class_images(self.cfg):
            return []
        folders = [class_data_dir(self.cfg)]
        folders += [Path(c.class_data_dir) for c in self.cfg.data.concepts if c.class_data_dir]
        if self.cfg.data.reg_path:
            folders.append(Path(self.cfg.data.reg_path))
        return folders

    def extra_captions(self) -> list[str]:
        prompts = [self.cfg.prior.class_prompt]
        prompts += [c.class_prompt for c in self.cfg.data.concepts]
        if self.cfg.data.reg_path and uses_class_images(self.cfg):
            prompts += [reg.prompt for reg in reg_folders(self.cfg.data.reg_path)]
        return sorted({p for p in prompts if p})
