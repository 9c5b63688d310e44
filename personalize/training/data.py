"""Batches for the loop: seeded samplers (plain or by aspect bucket), collate, tokenization."""

from __future__ import annotations

import logging
from typing import Any

import torch

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
    return batch


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
