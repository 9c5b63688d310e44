"""The torch Dataset every method trains on: records -> tensors and captions.

Its augmentation is a pure function of (seed, epoch, index), so a resumed run sees exactly
the data the interrupted one would have. Records come from `records.load_records`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from personalize.data.concepts import Concept
from personalize.data.masks import MaskRef, mask_tensor, read_mask
from personalize.data.records import Record, no_caption_message, read_image
from personalize.data.transforms import (
    CropGeometry,
    Geometry,
    apply_geometry,
    crop_geometry,
    fit_geometry,
    to_tensor,
)
from personalize.errors import DataError

logger = logging.getLogger(__name__)


class ImageCaptionDataset(Dataset):
    """Records -> {"pixel_values": [3, res, res] in [-1, 1], "caption": str, "key": str}.

    Index i shows record i % len(records) (or order[i], see below); every random choice
    (crop, flip, tag order, caption dropout) comes from numpy.random.default_rng((seed,
    epoch, i)), so repeats differ from each other and from epoch to epoch, yet never depend
    on global RNG state.

    Several concepts (data/concepts.py): record j belongs to concepts[concept_of[j]], whose
    instance prompt and caption settings apply to it instead of the scalar arguments, and
    `order` lists the record of every index of an epoch (concept repeats and balance).
    """

    def __init__(
        self,
        records: list[Record],
        *,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        instance_prompt: str | None = None,
        caption_dropout: float = 0.0,
        shuffle_tags: bool = False,
        keep_tokens: int = 0,
        repeats: int = 1,
        seed: int = 0,
        caption_fn: Callable[[str], str] | None = None,
        sizes: list[tuple[int, int]] | None = None,
        latents: Mapping[tuple[int, bool], torch.Tensor] | None = None,
        concepts: Sequence[Concept] | None = None,
        concept_of: Sequence[int] | None = None,
        order: Sequence[int] | None = None,
        masks: list[MaskRef | None] | None = None,
        mask_scale: int = 8,
    ) -> None:
        if not records:
            raise DataError("No training images: the record list is empty.")
        if resolution < 1:
            raise DataError(f"resolution must be a positive number of pixels, got {resolution}.")
        if not 0.0 <= caption_dropout <= 1.0:
            raise DataError(f"caption_dropout must be in [0, 1], got {caption_dropout}.")
        if repeats < 1:
            raise DataError(f"repeats must be at least 1, got {repeats}.")
        if keep_tokens < 0 or seed < 0:
            raise DataError(f"keep_tokens and seed must be >= 0, got {keep_tokens} and {seed}.")
        self.records = list(records)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.repeats = repeats
        if concepts is None:
            concepts = [
                Concept(
                    "",
                    prompt=instance_prompt,
                    caption_dropout=caption_dropout,
                    shuffle_tags=shuffle_tags,
                    keep_tokens=keep_tokens,
                )
            ]
        self.concepts = list(concepts)
        self.concept_of = list(concept_of) if concept_of is not None else [0] * len(records)
        if len(self.concept_of) != len(self.records) or not all(
            0 <= c < len(self.concepts) for c in self.concept_of
        ):
            raise DataError("concept_of must name one of the concepts for every record.")
        for concept in self.concepts:
            if not 0.0 <= concept.caption_dropout <= 1.0 or concept.keep_tokens < 0:
                raise DataError(
                    f"concept {concept.name!r}: caption_dropout must be in [0, 1] and "
                    "keep_tokens >= 0."
                )
        self.order = list(order) if order is not None else None
        if self.order is not None and not all(0 <= j < len(self.records) for j in self.order):
            raise DataError("order holds an index that is not a record.")
        # The single-concept view, for callers that read one prompt/setting.
        first = self.concepts[0]
        self.instance_prompt = first.prompt or None
        self.caption_dropout = first.caption_dropout
        self.shuffle_tags = first.shuffle_tags
        self.keep_tokens = first.keep_tokens
        self.seed = seed
        self.caption_fn = caption_fn
        # Aspect-ratio buckets (data/buckets.py): record j is cropped to sizes[j] (w, h)
        # instead of a resolution x resolution square.
        if sizes is not None and len(sizes) != len(self.records):
            raise DataError(f"sizes has {len(sizes)} entries for {len(self.records)} records.")
        self.sizes = sizes
        # Cached VAE latent distributions (data/cache.py), keyed by (record index, flipped):
        # items then carry "latent_dist" instead of "pixel_values", with the same flip draw.
        # A LatentStore fills as training goes: a view it lacks comes as pixels + its key.
        self.latents = latents
        # Loss masks (data/masks.py), one per record (None: all ones), or None when the loss
        # is not masked. Items then carry "loss_mask" [1, h / mask_scale, w / mask_scale]:
        # the mask at latent resolution, cut by the same crop and flip as the pixels.
        if masks is not None and len(masks) != len(self.records):
            raise DataError(f"masks has {len(masks)} entries for {len(self.records)} records.")
        self.masks = masks
        self.mask_scale = mask_scale
        # Fail now, not at the first batch, when an image has nothing to be trained on.
        uncaptioned = [
            r for j, r in enumerate(self.records) if r.caption is None and not self.prompt_of(j)
        ]
        if uncaptioned:
            message = no_caption_message(uncaptioned[0], len(uncaptioned))
            if len(self.concepts) > 1:
                concept = self.concepts[self.concept_of[self.records.index(uncaptioned[0])]]
                message = f"Concept {concept.name!r}: {message} (data.concepts[].prompt)"
            raise DataError(message)
        # The epoch lives in shared memory so DataLoader workers, including persistent
        # ones started before set_epoch(), read the value the main process set.
        self._epoch = torch.zeros((), dtype=torch.int64)
        try:
            self._epoch.share_memory_()
        except (RuntimeError, OSError):  # no shared memory here: workers see epoch 0
            logger.debug("Could not put the epoch counter in shared memory.")

    def __len__(self) -> int:
        if self.order is not None:
            return len(self.order)
        return len(self.records) * self.repeats

    def record_index(self, i: int) -> int:
        """The record dataset index i shows."""
        return self.order[i] if self.order is not None else i % len(self.records)

    def concept_at(self, i: int) -> int:
        """The concept (index into `concepts`) of dataset index i."""
        return self.concept_of[self.record_index(i)]

    def prompt_of(self, record_index: int) -> str | None:
        """The instance prompt of record `record_index`'s concept."""
        return self.concepts[self.concept_of[record_index]].prompt or None

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise DataError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(int(epoch))

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        index = self.record_index(i)
        record = self.records[index]
        concept = self.concepts[self.concept_of[index]]
        # One independent stream per decision: turning flips on must not move the crops.
        crop_rng, flip_rng, tag_rng, dropout_rng = np.random.default_rng(
            (self.seed, self.epoch, i)
        ).spawn(4)
        flip = self.random_flip and flip_rng.random() < 0.5
        view = (index, flip)
        params = self.latents.get(view) if self.latents is not None else None
        if self.masks is not None:
            image = self._masked_item(view, params, crop_rng)
        elif params is not None:
            image = {"latent_dist": params}
        else:
            pixels, geometry = self.view_with_geometry(*view, crop_rng)
            image = {"pixel_values": pixels, "time_ids": geometry.time_ids()}
        if "time_ids" not in image:
            # Cached views are center crops: their geometry needs only the image's size.
            image["time_ids"] = self.center_geometry(*view).time_ids()
        if "pixel_values" in image and self.latents is not None:
            # A LatentStore view not encoded yet: the loop encodes and stores it.
            image["latent_key"] = self.latents.key_of(view)
        caption = record.caption or concept.prompt
        if caption is None:  # records mutated after __init__; keep the message anyway
            raise DataError(no_caption_message(record, 1))
        if concept.shuffle_tags:
            caption = shuffle_caption_tags(caption, concept.keep_tokens, tag_rng)
        if concept.caption_dropout > 0.0 and dropout_rng.random() < concept.caption_dropout:
            caption = ""
        if self.caption_fn is not None:
            caption = self.caption_fn(caption)
        return {**image, "caption": caption, "key": record.key}

    def view(
        self, index: int, flip: bool, crop_rng: np.random.Generator | None = None
    ) -> torch.Tensor:
        """Record `index` as a training tensor: cropped (centered unless `crop_rng` and
        random crops), to its bucket's size when bucketing, flipped when asked."""
        return self.view_with_geometry(index, flip, crop_rng)[0]

    def target_size(self, index: int) -> tuple[int, int]:
        """(w, h) of record `index`'s training view: its bucket, or the square."""
        return self.sizes[index] if self.sizes is not None else (self.resolution,) * 2

    def view_with_geometry(
        self, index: int, flip: bool, crop_rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, CropGeometry]:
        """`view` and where it came from (original size, crop corner, target size: SDXL's
        size/crop conditioning)."""
        image = read_image(self.records[index])
        geometry = self._geometry(index, image.size, flip, crop_rng)
        return to_tensor(apply_geometry(image, geometry)), crop_geometry(image.size, geometry)

    def _geometry(self, index: int, source: tuple[int, int], flip: bool, crop_rng) -> Geometry:
        return fit_geometry(
            source,
            self.target_size(index),
            center_crop=self.center_crop,
            flip=flip,
            crop_rng=crop_rng,
        )

    def center_geometry(self, index: int, flip: bool) -> CropGeometry:
        """The geometry of record `index`'s center-cropped view, from its header alone."""
        if not hasattr(self, "_natural_sizes"):
            self._natural_sizes: dict[int, tuple[int, int]] = {}
        if index not in self._natural_sizes:
            from personalize.data.buckets import upright_size

            record = self.records[index]
            if record.image_path is not None:
                self._natural_sizes[index] = upright_size(record.image_path)
            else:
                row = record.source
                image_bytes = row.dataset[row.index][row.column]["bytes"]
                self._natural_sizes[index] = upright_size(image_bytes)
        size, target = self._natural_sizes[index], self.target_size(index)
        return crop_geometry(size, fit_geometry(size, target, center_crop=True, flip=flip))

    def _masked_item(self, view, params, crop_rng) -> dict[str, torch.Tensor]:
        """The item of a masked-loss view: cached latents and mask where the store has
        them; otherwise pixels and mask cut by one shared geometry (so they line up)."""
        index, flip = view
        store = self.latents
        mask = store.get_mask(view) if store is not None else None
        item: dict[str, torch.Tensor] = {} if params is None else {"latent_dist": params}
        if params is not None and mask is not None:
            return {**item, "loss_mask": mask}
        record, ref = self.records[index], self.masks[index]
        image = read_image(record) if params is None else None
        if image is not None:
            source = image.size
        elif ref is not None:
            source = read_mask(record, ref).size
        else:
            source = self.target_size(index)  # an all-ones mask: the crop does not matter
        geometry = self._geometry(index, source, flip, crop_rng)
        if image is not None:
            item["pixel_values"] = to_tensor(apply_geometry(image, geometry))
            item["time_ids"] = crop_geometry(source, geometry).time_ids()
        if mask is None:
            mask = mask_tensor(record, ref, geometry, self.target_size(index), self.mask_scale)
            if store is not None and ref is not None:
                store.put_mask(view, mask)
        return {**item, "loss_mask": mask}


def shuffle_caption_tags(caption: str, keep_tokens: int, rng: np.random.Generator) -> str:
    """Shuffle comma-separated tags, keeping the first `keep_tokens` in place (kohya's
    --shuffle_caption/--keep_tokens), so the trigger word stays at the front."""
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    return ", ".join(head + [tail[j] for j in rng.permutation(len(tail))])
