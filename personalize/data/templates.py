"""Textual Inversion's training prompts: the templates a placeholder is trained in (as in
Gal et al. 2022), and a dataset wrapper that draws one per example from (seed, epoch, index)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

# Prompts the placeholder is trained in, one drawn per example, so the token learns the
# subject (or style) rather than one sentence (as in Gal et al. 2022).
OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]


class TemplateCaptions(torch.utils.data.Dataset):
    """The training dataset with each caption replaced by a template drawn from
    (seed, epoch, index) alone: deterministic across resumes, processes and workers."""

    def __init__(self, inner, caption: Callable[[int], str], num_templates: int, seed: int):
        self.inner = inner
        self.caption = caption
        self.num_templates = num_templates
        self.seed = seed

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.inner[i]
        if item["caption"]:  # an empty caption is caption dropout: keep it empty
            epoch = int(getattr(self.inner, "epoch", 0))
            # A salt keeps this stream apart from the dataset's own (seed, epoch, i) streams.
            rng = np.random.default_rng((self.seed, epoch, i, 0x7E47))
            item = dict(item, caption=self.caption(int(rng.integers(self.num_templates))))
        return item
