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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from personalize.data import ImageCaptionDataset, load_records
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


def class_data_dir(cfg) -> Path:
    """prior.class_data_dir, or output_dir/class_images when unset."""
    return Path(cfg.prior.class_data_dir or Path(cfg.output_dir) / CLASS_IMAGES_DIR)


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
    with adapters_disabled(parts.unet, *parts.text_encoders().values()):
        ensure_class_images(
            folder,
            cfg.prior.class_prompt,
            cfg.prior.num_class_images,
            lambda: generation_pipeline(parts, device),
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
        return [class_data_dir(self.cfg)] if uses_class_images(self.cfg) else []

    def extra_captions(self) -> list[str]:
        return [self.cfg.prior.class_prompt] if self.cfg.prior.class_prompt else []
