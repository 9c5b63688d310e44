"""Data for the loop: records -> datasets -> batches (seeded samplers, plain or by aspect
bucket; collate; tokenization)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from personalize.data import DataError, ImageCaptionDataset, load_records, split_records
from personalize.data.concepts import Concept, epoch_order, resolve_concepts
from personalize.models import tokenize  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)


class EpochSampler(torch.utils.data.Sampler[int]):
    """A permutation that depends only on (seed, epoch), so a resumed run replays the same
    order; under accelerate each process then takes its own share of the batches."""

    def __init__(self, length: int, seed: int):
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack instance examples; append paired prior (class) examples after them.

    An example carries either "pixel_values" or, when its latents are cached, "latent_dist"
    (data/cache.py). A batch of one kind stacks it; a mixed batch (cached instance images,
    uncached class images) also gets "cached": which examples the latent_dist rows are."""
    examples = [it for it in items] + [it["prior"] for it in items if "prior" in it]
    batch: dict[str, Any] = {
        "captions": [e["caption"] for e in examples],
        "is_prior": torch.tensor([i >= len(items) for i in range(len(examples))]),
    }
    cached = ["latent_dist" in e for e in examples]
    if any(cached):
        batch["latent_dist"] = torch.stack(
            [e["latent_dist"] for e in examples if "latent_dist" in e]
        )
    if not all(cached):
        batch["pixel_values"] = torch.stack(
            [e["pixel_values"] for e in examples if "latent_dist" not in e]
        )
        # Where the encoded latents of those rows belong in a latent cache (None: nowhere).
        keys = [e.get("latent_key") for e in examples if "latent_dist" not in e]
        if any(keys):
            batch["latent_keys"] = keys
    if any(cached) and not all(cached):
        batch["cached"] = cached
    # SDXL's size/crop conditioning per example (only SDXL reads it); an example that does
    # not record where it came from (a class image) counts as uncropped at its own size.
    batch["time_ids"] = torch.stack([_time_ids(e) for e in examples])
    masks = [e.get("loss_mask") for e in examples]
    if any(m is not None for m in masks):
        # data.masked_loss: examples without a mask (class images) weigh every pixel 1.
        ones = torch.ones_like(next(m for m in masks if m is not None))
        batch["loss_mask"] = torch.stack([ones if m is None else m for m in masks])
    return batch


def _time_ids(example: dict[str, Any]) -> torch.Tensor:
    if "time_ids" in example:
        return example["time_ids"]
    if "pixel_values" in example:
        h, w = example["pixel_values"].shape[-2:]
    else:  # a latent distribution: 8 pixels per latent
        h, w = (8 * n for n in example["latent_dist"].shape[-2:])
    return torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)


class Collate:
    """`collate` plus token ids, so tokenizing runs in the loader's workers and the ids
    reach the device with the rest of the batch (pinned, non-blocking) instead of being
    copied synchronously inside the step."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(items)
        if self.tokenizer is not None:
            batch["input_ids"] = tokenize(self.tokenizer, batch["captions"])
        return batch


def build_dataloader(
    dataset,
    *,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    tokenizer=None,
    bucket_of=None,
    num_processes: int = 1,
    pin_memory: bool = True,
):
    """The training loader. `bucket_of` (the bucket of every dataset index) switches to
    `BucketBatchSampler`; otherwise a seeded permutation in batches of `batch_size`."""
    kwargs: dict[str, Any] = dict(
        collate_fn=Collate(tokenizer),
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        # The dataset keeps its epoch in shared memory, so persistent workers see each
        # set_epoch(); not restarting them every epoch saves their start-up each epoch.
        persistent_workers=num_workers > 0,
        # Its own generator: creating an iterator then draws no number from the global RNG,
        # which a resumed run (a fresh iterator mid-epoch) would otherwise draw once more.
        generator=torch.Generator().manual_seed(seed),
    )
    if bucket_of is not None:
        from personalize.data.buckets import BucketBatchSampler

        sampler = BucketBatchSampler(bucket_of, batch_size, seed, num_processes)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **kwargs)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed), **kwargs
    )


def warn_long_captions(tokenizer, captions: dict[str, str]) -> int:
    """Warn once per caption that the text encoder will cut off; return how many.

    CLIP reads 77 tokens (75 + start/end); the rest of a longer caption is silently ignored,
    which users otherwise discover only when a tag at the end never takes effect."""
    limit = tokenizer.model_max_length
    long = 0
    for source, caption in captions.items():
        n = len(tokenizer(caption, truncation=False).input_ids)
        if n > limit:
            long += 1
            logger.warning(
                "caption of %s is %d tokens; truncated to %d: %r",
                source,
                n,
                limit,
                caption[:80] + ("..." if len(caption) > 80 else ""),
            )
    return long


@dataclass
class TrainingData:
    """What the loop trains and validates on. `dataset` is what the method made of
    `train_dataset` (e.g. instance examples paired with class examples); `batch_sampler`
    is the bucket sampler, whose epoch the loop sets itself (accelerate cannot reach it)."""

    train_dataset: ImageCaptionDataset
    val_dataset: ImageCaptionDataset | None
    dataset: torch.utils.data.Dataset
    dataloader: torch.utils.data.DataLoader
    batch_sampler: Any
    fixed_captions: list[str] | None


def build_training_data(cfg, method, parts, accelerator, prompt: str | None) -> TrainingData:
    """Records -> datasets (the method's captions and pairing) -> the training loader.
    `prompt`: the instance prompt for images without a caption (Method.training_prompt of
    data.prompt); with several concepts each concept's own prompt goes through
    Method.training_prompt instead."""
    d, t = cfg.data, cfg.train
    # Never our own outputs as data: a second run would train on the first's samples.
    skip = [Path(cfg.output_dir), *method.output_folders()]
    if d.masked_loss and d.mask_dir:
        skip.append(Path(d.mask_dir))
    read = dict(
        caption_extension=d.caption_extension,
        image_column=d.image_column,
        caption_column=d.caption_column,
        strict=d.strict,
        skip=skip,
    )
    concepts = [
        _replace_prompt(c, method.training_prompt(c.prompt)) for c in resolve_concepts(cfg, skip)
    ]
    # Several concepts (or kohya folders): errors and logs name each concept.
    several = bool(d.concepts) or len(concepts) > 1 or concepts[0].path != Path(d.path).expanduser()
    records: list = []
    concept_of: list[int] = []
    val_records: list = []
    val_concept_of: list[int] = []
    counts = []
    for index, concept in enumerate(concepts):
        read_concept = dict(read, caption_extension=concept.caption_extension)
        found = _concept_records(concept, read_concept, several)
        if not d.validation_path:
            found, held_out = split_records(found, d.validation_split, cfg.seed)
            val_records += held_out
            val_concept_of += [index] * len(held_out)
        records += found
        concept_of += [index] * len(found)
        counts.append(len(found))
    val_concepts = concepts
    if d.validation_path:
        val_records = load_records(d.validation_path, **read)
        val_concepts = [Concept("validation", prompt=prompt)]
        val_concept_of = [0] * len(val_records)
    captions = {str(r.image_path or r.key): r.caption for r in records if r.caption}
    for concept in concepts:
        if concept.prompt:
            captions[f"the prompt of concept {concept.name}" if several else "data.prompt"] = (
                concept.prompt
            )
    warn_long_captions(parts.tokenizer, captions)
    common = dict(resolution=t.resolution, caption_fn=method.caption_fn(), seed=cfg.seed)
    sizes = None
    if d.bucketing:
        from personalize.data.buckets import record_sizes

        sizes = record_sizes(
            records, t.resolution, d.bucket_min_size, d.bucket_max_size, d.bucket_step
        )
        logger.info(
            "aspect buckets (w x h: images): %s",
            ", ".join(f"{w}x{h}: {sizes.count((w, h))}" for w, h in sorted(set(sizes))),
        )
    # One concept: image j at indices j, j + n, ... (repeats), as with any single folder.
    order = epoch_order(counts, [c.repeats for c in concepts], d.concept_balance)
    if several:
        for index, concept in enumerate(concepts):
            logger.info(
                "concept %s: %d images, %d examples per epoch (repeats %d, balance %s)",
                concept.name,
                counts[index],
                sum(concept_of[j] == index for j in order),
                concept.repeats,
                d.concept_balance,
            )
    masking = _loss_masks(cfg, parts, records, val_records)
    train_dataset = ImageCaptionDataset(
        records,
        center_crop=d.center_crop,
        random_flip=d.random_flip,
        sizes=sizes,
        concepts=concepts,
        concept_of=concept_of,
        order=order,
        **masking.get("train", {}),
        **common,
    )
    val_dataset = (
        ImageCaptionDataset(
            val_records,
            center_crop=True,
            concepts=[_replace_prompt(c, c.prompt, plain=True) for c in val_concepts],
            concept_of=val_concept_of,
            **masking.get("val", {}),
            **common,
        )
        if val_records
        else None
    )
    dataset = method.wrap_train_dataset(train_dataset, parts, accelerator)
    bucket_of = None
    if sizes is not None:
        if len(dataset) != len(train_dataset):
            raise DataError(
                f"data.bucketing=true: method {cfg.method} changed the number of "
                f"training examples ({len(train_dataset)} -> {len(dataset)}), so "
                "examples cannot be matched to buckets; set data.bucketing=false."
            )
        bucket_of = [sizes[train_dataset.record_index(i)] for i in range(len(dataset))]
    dataloader = build_dataloader(
        dataset,
        batch_size=t.batch_size,
        seed=cfg.seed,
        num_workers=d.num_workers,
        tokenizer=parts.tokenizer,
        bucket_of=bucket_of,
        num_processes=accelerator.num_processes,
        pin_memory=d.pin_memory,
    )
    logger.info(
        "training on %d images (%d examples per epoch), %d held out, %d process(es)",
        len(records),
        len(dataset),
        len(val_records),
        accelerator.num_processes,
    )
    _warn_small_dataset(cfg, accelerator, len(dataset))
    return TrainingData(
        train_dataset,
        val_dataset,
        dataset,
        dataloader,
        dataloader.batch_sampler if bucket_of is not None else None,
        _fixed_captions(cfg, method, train_dataset, val_dataset),
    )


def _replace_prompt(concept: Concept, prompt: str | None, plain: bool = False) -> Concept:
    """`concept` with another instance prompt; `plain`: without caption randomness too (the
    held-out images are read the same way every time)."""
    from dataclasses import replace

    if plain:
        return replace(concept, prompt=prompt, caption_dropout=0.0, shuffle_tags=False)
    return replace(concept, prompt=prompt)


def _concept_records(concept: Concept, read: dict[str, Any], several: bool) -> list:
    """The concept's records; with several concepts, errors name the concept."""
    try:
        return load_records(concept.path, **read)
    except DataError as exc:
        if not several:
            raise
        raise DataError(f"Concept {concept.name!r}: {exc}") from exc


def _loss_masks(cfg, parts, records, val_records) -> dict[str, dict[str, Any]]:
    """data.masked_loss: the masks of the training and held-out images, checked now (one
    clear error before any training; data/masks.py), as ImageCaptionDataset arguments."""
    d = cfg.data
    if not d.masked_loss:
        return {}
    from personalize.data.masks import find_masks

    scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    found = {"train": find_masks(records, source=d.mask_source, mask_dir=d.mask_dir)}
    if val_records:
        # Held-out images without masks are fine: their validation loss is unmasked.
        found["val"] = find_masks(
            val_records, source=d.mask_source, mask_dir=d.mask_dir, require_any=False
        )
    return {name: {"masks": refs, "mask_scale": scale} for name, refs in found.items()}


def _fixed_captions(cfg, method, train_dataset, val_dataset) -> list[str] | None:
    """Every caption training and validation can show, or None when they vary per step."""
    datasets = [train_dataset] + ([val_dataset] if val_dataset is not None else [])
    concepts = [c for ds in datasets for c in ds.concepts]
    if any(c.shuffle_tags for c in concepts) or method.caption_fn() is not None:
        return None
    captions = {
        r.caption or ds.prompt_of(j) or "" for ds in datasets for j, r in enumerate(ds.records)
    }
    if any(c.caption_dropout > 0 for c in concepts):
        captions.add("")
    captions.update(method.extra_captions())
    return sorted(captions)


def _warn_small_dataset(cfg, accelerator, examples: int) -> None:
    """A batch cannot hold more examples than an epoch has: the run would silently train
    with smaller batches than train.batch_size says."""
    acc, t, d = accelerator, cfg.train, cfg.data
    per_process = math.ceil(examples / acc.num_processes)
    if t.batch_size > per_process and acc.is_main_process:
        logger.warning(
            "train.batch_size=%d is larger than the %d training example(s) per epoch%s, so "
            "every batch holds only %d; lower train.batch_size or raise data.repeats "
            "(now %d)",
            t.batch_size,
            examples,
            f" split over {acc.num_processes} processes" if acc.num_processes > 1 else "",
            per_process,
            d.repeats,
        )
