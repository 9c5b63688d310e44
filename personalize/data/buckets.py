"""Aspect-ratio buckets: train on mixed-size images without cropping them all to squares.

Each image is assigned the bucket (width, height) whose aspect ratio is closest to its own;
every bucket holds about `resolution**2` pixels, so a batch costs the same whatever its
shape. `BucketBatchSampler` then builds batches from one bucket at a time (every latent in
a batch must have the same shape), in an order that is a pure function of (seed, epoch).

Multiple processes: accelerate wraps a batch sampler in `BatchSamplerShard`, which hands
batch k to process k % num_processes and, when the count is not a multiple of the
number of processes, tops the last round up with indices from the first batches, which
would mix buckets. So the sampler only ever emits full batches (a bucket's last batch is
topped up from the same bucket) and a multiple of `num_processes` of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from personalize.data.transforms import apply_geometry, fit_geometry, to_tensor
from personalize.errors import ConfigError

Size = tuple[int, int]  # (width, height) in pixels

# EXIF orientations 5-8 rotate by 90 degrees: the upright image has width and height swapped.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def make_buckets(resolution: int, min_size: int, max_size: int, step: int) -> list[Size]:
    """Bucket sizes: each side a multiple of `step` in [min_size, max_size], area at most
    resolution**2 and as large as the step allows. Always holds the square bucket."""
    if step <= 0 or step % 8:
        raise ConfigError(f"data.bucket_step must be a positive multiple of 8, got {step}")
    if not min_size <= resolution <= max_size:
        raise ConfigError(
            f"data.bucket_min_size ({min_size}) <= train.resolution ({resolution})"
            f" <= data.bucket_max_size ({max_size}) must hold"
        )
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    width = math.ceil(min_size / step) * step
    while width <= max_size:
        height = min(max_size, (area // width) // step * step)
        if height >= min_size:
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    return sorted(sizes)


def upright_size(path_or_bytes) -> Size:
    """(width, height) of an image after its EXIF rotation, read from the header only."""
    import io

    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block: load_image ignores it too
            orientation = 1
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def assign_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to `size`'s (in log space, so 2:1 and 1:2
    are equally far from 1:1); ties go to the larger area."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def prepare_image_to_size(
    image: Image.Image,
    size: Size,
    *,
    center_crop: bool = True,
    flip: bool = False,
    crop_rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Scale to cover `size` (keeping the aspect ratio), crop to it, flip, -> [3, H, W] tensor.

    The rectangular twin of `transforms.prepare_image`; with a square size it gives the
    same pixels."""
    geometry = fit_geometry(image.size, size, center_crop=center_crop, flip=flip, crop_rng=crop_rng)
    return to_tensor(apply_geometry(image, geometry))


def record_sizes(records, resolution: int, min_size: int, max_size: int, step: int) -> list[Size]:
    """The bucket of every record (headers only: nothing is decoded)."""
    from personalize.data.records import DataError

    buckets = make_buckets(resolution, min_size, max_size, step)
    sizes = []
    for record in records:
        try:
            if record.image_path is not None:
                natural = upright_size(Path(record.image_path))
            else:
                row = record.source
                natural = upright_size(row.dataset[row.index][row.column]["bytes"])
        except Exception as exc:
            raise DataError(f"Cannot read the size of image {record.key}: {exc}") from exc
        sizes.append(assign_bucket(natural, buckets))
    return sizes


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices that share a bucket, shuffled by (seed, epoch).

    `bucket_of[i]` is the bucket of dataset index i (with repeats, index i shows record
    i % len(records)). Every batch is full: a bucket's last batch is topped up with its own
    first indices of the epoch. The number of batches is the same every epoch and a
    multiple of `num_processes` (whole batches are repeated), so each process gets the same
    number of batches and accelerate never has to fill a batch across buckets.
    """

    def __init__(
        self, bucket_of: Sequence[Size], batch_size: int, seed: int, num_processes: int = 1
    ):
        if batch_size < 1 or num_processes < 1:
            raise ConfigError("batch_size and num_processes must be >= 1")
        self.batch_size = batch_size
        self.drop_last = False
        self.seed = seed
        self.num_processes = num_processes
        self.epoch = 0
        self.groups: dict[Size, list[int]] = {}
        for index, bucket in enumerate(bucket_of):
            self.groups.setdefault(tuple(bucket), []).append(index)
        per_bucket = sum(math.ceil(len(ix) / batch_size) for ix in self.groups.values())
        self._length = math.ceil(per_bucket / num_processes) * num_processes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch, 0xB0C))
        out: list[list[int]] = []
        for bucket in sorted(self.groups):  # sorted: the order must not depend on dict history
            indices = [self.groups[bucket][j] for j in rng.permutation(len(self.groups[bucket]))]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                while len(batch) < self.batch_size:  # top up from the same bucket
                    batch += indices[: self.batch_size - len(batch)]
                out.append(batch)
        out = [out[j] for j in rng.permutation(len(out))]
        return (out * math.ceil(self._length / max(1, len(out))))[: self._length]

    def __iter__(self):
        return iter(self.batches())
