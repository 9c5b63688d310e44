"""Aspect-ratio buckets: bucket sizes, assignment, the batch sampler under several processes
and resume, and a bucketed training run that resumes bit-identically."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler
from conftest import base_config
from PIL import Image
from safetensors.torch import load_file

from personalize.config import ConfigError, from_dict
from personalize.data.buckets import (
    BucketBatchSampler,
    assign_bucket,
    make_buckets,
    prepare_image_to_size,
    upright_size,
)
from personalize.data.transforms import prepare_image
from personalize.methods.lora import LORA_WEIGHTS
from personalize.training.loop import Trainer


def test_buckets_keep_the_pixel_budget_and_the_grid():
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= 512 * 512
        assert (h, w) in buckets  # portrait and landscape alike
    assert (768, 320) in buckets and (1024, 256) in buckets
    with pytest.raises(ValueError, match="multiple of 8"):
        make_buckets(512, 256, 1024, 12)
    with pytest.raises(ValueError, match="bucket_min_size"):
        make_buckets(128, 256, 1024, 64)


def test_assignment_follows_the_aspect_ratio():
    buckets = make_buckets(512, 256, 1024, 64)
    assert assign_bucket((1000, 1000), buckets) == (512, 512)
    w, h = assign_bucket((1920, 1080), buckets)
    assert w > h and abs(math.log(w / h) - math.log(1920 / 1080)) < 0.15
    assert assign_bucket((1080, 1920), buckets) == (h, w)
    assert assign_bucket((10_000, 100), buckets) == (1024, 256)  # clamps to the widest


def test_exif_rotation_swaps_the_size(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.new("RGB", (40, 20), "red").save(path, exif=exif)
    assert upright_size(path) == (20, 40)


def test_rectangular_transform_matches_the_square_one():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    for center in (True, False):
        a = prepare_image(image, 24, center_crop=center, crop_rng=np.random.default_rng(5))
        b = prepare_image_to_size(
            image, (24, 24), center_crop=center, crop_rng=np.random.default_rng(5)
        )
        assert torch.equal(a, b)
    wide = prepare_image_to_size(image, (40, 16), flip=True)
    assert wide.shape == (3, 16, 40)
    assert torch.equal(wide, prepare_image_to_size(image, (40, 16)).flip(-1))


SIZES = [(40, 24)] * 5 + [(24, 40)] * 3 + [(32, 32)] * 4


def _check_batches(batches, batch_size):
    for batch in batches:
        assert len(batch) == batch_size
        assert len({SIZES[i] for i in batch}) == 1, batch  # one bucket per batch


def test_sampler_is_deterministic_full_and_covers_every_example():
    sampler = BucketBatchSampler(SIZES, batch_size=2, seed=3)
    first = sampler.batches()
    assert first == BucketBatchSampler(SIZES, batch_size=2, seed=3).batches()
    _check_batches(first, 2)
    assert len(first) == len(sampler) == 3 + 2 + 2
    assert {i for b in first for i in b} == set(range(len(SIZES)))
    sampler.set_epoch(1)
    second = sampler.batches()
    assert second != first and len(second) == len(first)
    assert {i for b in second for i in b} == set(range(len(SIZES)))
    assert BucketBatchSampler(SIZES, batch_size=2, seed=4).batches() != first


@pytest.mark.parametrize("processes", [2, 3])
def test_sampler_under_accelerate_shards(processes):
    sampler = BucketBatchSampler(SIZES, batch_size=2, seed=0, num_processes=processes)
    assert len(sampler) % processes == 0
    shards = [list(BatchSamplerShard(sampler, processes, rank)) for rank in range(processes)]
    # Every process gets the same number of batches (no rank waits at a collective for a
    # batch that never comes) and accelerate never fills a batch across buckets.
    assert len({len(s) for s in shards}) == 1
    for shard in shards:
        _check_batches(shard, 2)
    dealt = [b for step in zip(*shards) for b in step]
    assert dealt == sampler.batches()
    assert {i for b in dealt for i in b} == set(range(len(SIZES)))


def test_resume_skips_exactly_the_batches_already_seen():
    sampler = BucketBatchSampler(SIZES, batch_size=2, seed=0)
    sampler.set_epoch(2)
    full = sampler.batches()
    assert list(SkipBatchSampler(sampler, skip_batches=3)) == full[3:]


def _mixed_images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(48, 32), (48, 30), (32, 48), (40, 40), (64, 32), (32, 32)]):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"im{i}.png")
    return folder


BUCKETED = dict(
    data={
        "bucketing": True,
        "bucket_step": 8,
        "bucket_min_size": 16,
        "bucket_max_size": 64,
        "random_flip": True,
    }
)


def test_bucketed_training_resumes_bit_identically(tiny_model_dir, tmp_path):
    data = _mixed_images(tmp_path / "data")
    train = {"max_steps": 4, "checkpoint_every": 2}
    # One cache folder for all three runs: the later ones reuse the first one's latents.
    sections = dict(BUCKETED, data=dict(BUCKETED["data"], cache_dir=str(tmp_path / "cache")))
    straight = Trainer(
        from_dict(base_config(tiny_model_dir, data, tmp_path / "a", train=train, **sections))
    )
    assert sorted(set(straight.train_dataset.sizes)) == [(24, 40), (32, 32), (40, 24)]
    straight.run()
    # Each cached latent has its bucket's shape (latents are 1/2 the pixel size here).
    assert straight.train_dataset.latents.entries
    for (index, _), dist in straight.train_dataset.latents.entries.items():
        w, h = straight.train_dataset.sizes[index]
        assert dist.shape[-2:] == (h // 2, w // 2)
    first = base_config(
        tiny_model_dir, data, tmp_path / "b", train=dict(train, max_steps=2), **sections
    )
    Trainer(from_dict(first)).run()
    resumed = base_config(
        tiny_model_dir, data, tmp_path / "b", train=train, resume="latest", **sections
    )
    Trainer(from_dict(resumed)).run()
    a, b = load_file(tmp_path / "a" / LORA_WEIGHTS), load_file(tmp_path / "b" / LORA_WEIGHTS)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bucket_config_is_checked(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="bucket_min_size"):
        from_dict(
            base_config(tiny_model_dir, tmp_path, tmp_path / "o", data={"bucketing": True})
        )  # resolution 32 < min 256
    with pytest.raises(ConfigError, match="bucket_step"):
        from_dict(
            base_config(
                tiny_model_dir,
                tmp_path,
                tmp_path / "o",
                data={"bucketing": True, "bucket_step": 12, "bucket_min_size": 16},
            )
        )
