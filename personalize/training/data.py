"""Batches for the loop: a seeded epoch sampler, the collate function and tokenization."""

from __future__ import annotations

from typing import Any

import torch


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
    """Stack instance examples; append paired prior (class) examples after them."""
    examples = [it for it in items] + [it["prior"] for it in items if "prior" in it]
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "captions": [e["caption"] for e in examples],
        "is_prior": torch.tensor([i >= len(items) for i in range(len(examples))]),
    }


def build_dataloader(dataset, *, batch_size: int, seed: int, num_workers: int = 0):
    # Workers are not persistent: they must see the dataset's set_epoch() of each epoch.
    sampler = EpochSampler(len(dataset), seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        # Its own generator: creating an iterator then draws no number from the global RNG,
        # which a resumed run (a fresh iterator mid-epoch) would otherwise draw once more.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids
