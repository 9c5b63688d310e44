"""Masked loss (data.masked_loss): masks found, aligned with their images, cached, weighed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.config import ConfigError, from_dict
from personalize.data import ImageCaptionDataset, load_records
from personalize.data.cache import LatentStore, _mask_keys
from personalize.data.masks import MaskRef, find_masks, weigh_loss
from personalize.errors import DataError
from personalize.training.data import collate
from personalize.training.noise import per_example_loss
from tests.conftest import base_config


class _Scheduler:  # what per_example_loss reads of a scheduler when snr_gamma is None
    class config:
        prediction_type = "epsilon"


def _grey_noise(width: int, height: int, seed: int) -> np.ndarray:
    """A grey (R = G = B) picture of 4x4 blocks: its luminance is its red channel exactly."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1), dtype=np.uint8)
    grey = np.kron(blocks, np.ones((4, 4), dtype=np.uint8))[:height, :width]
    return np.repeat(grey[..., None], 3, axis=2)


def _half_mask(width: int, height: int) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 2] = 255
    return Image.fromarray(mask)


# ----------------------------------------------------------------------------- the loss


def test_a_mask_of_ones_gives_exactly_the_unmasked_loss():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    plain = per_example_loss(pred, target, _Scheduler, torch.zeros(3), None)
    for weight in (0.0, 0.3):
        for normalize in (True, False):
            masked = per_example_loss(
                pred,
                target,
                _Scheduler,
                torch.zeros(3),
                None,
                torch.ones(3, 1, 8, 8),
                weight,
                normalize,
            )
            assert torch.equal(masked, plain)


def test_with_unmasked_weight_0_the_background_does_not_count():
    """Whatever prediction and target hold where the mask is 0 leaves the loss unchanged
    (fixed noise and timesteps: the same pred/target in the subject's half)."""
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1.0
    other_pred, other_target = pred.clone(), target.clone()
    other_pred[..., 4:] = torch.randn(2, 4, 8, 4, generator=gen) * 10
    other_target[..., 4:] = torch.randn(2, 4, 8, 4, generator=gen) * 10
    for normalize in (True, False):
        a = per_example_loss(pred, target, _Scheduler, torch.zeros(2), None, mask, 0.0, normalize)
        b = per_example_loss(
            other_pred, other_target, _Scheduler, torch.zeros(2), None, mask, 0.0, normalize
        )
        assert torch.equal(a, b)
    # Normalized, it is the mean over the subject's half alone; not, half of that.
    subject = ((pred - target) ** 2)[..., :4].mean(dim=(1, 2, 3))
    assert torch.allclose(weigh_loss((pred - target) ** 2, mask, 0.0, True), subject)
    assert torch.allclose(weigh_loss((pred - target) ** 2, mask, 0.0, False), subject / 2)
    # A background weight between 0 and 1 lets the background count, less.
    partial = weigh_loss((pred - target) ** 2, mask, 0.5, False)
    whole = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(
        partial, subject / 2 + ((pred - target) ** 2)[..., 4:].mean((1, 2, 3)) / 4
    )
    assert not torch.allclose(partial, whole)


def test_an_empty_crop_gives_zero_loss_not_nan():
    loss = weigh_loss(torch.ones(1, 4, 4, 4), torch.zeros(1, 1, 4, 4), 0.0, True)
    assert torch.equal(loss, torch.zeros(1))


def test_a_pixel_resolution_mask_is_pooled_to_the_loss_by_area():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :4] = 1.0  # a quarter of the width: half of each of the first 2 of 8 columns
    loss = weigh_loss(torch.ones(1, 1, 8, 8), mask, 0.0, False)
    assert torch.allclose(loss, torch.tensor([0.25]))


# ----------------------------------------------------------------------------- finding masks


def _folder_with_every_kind(root: Path) -> Path:
    data = root / "data"
    (data / "masks").mkdir(parents=True)
    rgba = np.concatenate([_grey_noise(32, 32, 0), np.zeros((32, 32, 1), np.uint8)], axis=2)
    rgba[:, :16, 3] = 255
    Image.fromarray(rgba, "RGBA").save(data / "a_alpha.png")
    for name, mask_name in (
        ("b_onetrainer", "b_onetrainer-masklabel.png"),
        ("c_folder", "masks/c_folder.png"),
        ("d_dotmask", "d_dotmask.mask.png"),
    ):
        Image.fromarray(_grey_noise(32, 32, 1)).save(data / f"{name}.png")
        _half_mask(32, 32).save(data / mask_name)
    Image.fromarray(_grey_noise(32, 32, 2)).save(data / "e_plain.jpg")
    return data


def test_masks_come_from_alpha_and_every_file_convention(tmp_path, caplog):
    data = _folder_with_every_kind(tmp_path)
    records = load_records(data)
    # Mask files are never training images.
    assert [r.key for r in records] == [
        "a_alpha.png",
        "b_onetrainer.png",
        "c_folder.png",
        "d_dotmask.png",
        "e_plain.jpg",
    ]
    with caplog.at_level(logging.WARNING):
        refs = find_masks(records, source="auto")
    assert [ref and ref.kind for ref in refs] == ["alpha", "file", "file", "file", None]
    assert refs[1].path == data / "b_onetrainer-masklabel.png"
    assert refs[2].path == data / "masks" / "c_folder.png"
    assert "1 of 5 images have no mask" in caplog.text and "e_plain.jpg" in caplog.text
    assert [ref and ref.kind for ref in find_masks(records, source="alpha")] == [
        "alpha",
        None,
        None,
        None,
        None,
    ]
    assert [ref and ref.kind for ref in find_masks(records, source="file")] == [
        None,
        "file",
        "file",
        "file",
        None,
    ]


def test_a_mask_folder_with_the_same_names(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks_elsewhere"
    (data / "sub").mkdir(parents=True)
    (masks / "sub").mkdir(parents=True)
    Image.fromarray(_grey_noise(32, 32, 0)).save(data / "sub" / "x.jpg")
    _half_mask(32, 32).save(masks / "sub" / "x.png")
    (ref,) = find_masks(load_records(data), source="file", mask_dir=masks)
    assert ref == MaskRef("file", masks / "sub" / "x.png", ref.digest)


def test_mask_errors_are_clear(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(_grey_noise(32, 32, 0)).save(data / "x.png")
    records = load_records(data)
    with pytest.raises(DataError, match="none of the 1 images has a mask"):
        find_masks(records, source="auto")
    # Another shape cannot line up with its image.
    _half_mask(32, 16).save(data / "x-masklabel.png")
    with pytest.raises(DataError, match=r"x-masklabel.png is 32x16 but its image .* is 32x32"):
        find_masks(records, source="file")
    # The same shape at another size is scaled to the image.
    _half_mask(16, 16).save(data / "x-masklabel.png")
    assert find_masks(records, source="file")[0].kind == "file"
    Image.new("L", (32, 32), 0).save(data / "x-masklabel.png")
    with pytest.raises(DataError, match=r"x-masklabel.png is all black"):
        find_masks(records, source="file")
    _half_mask(32, 32).save(data / "x.mask.png")
    with pytest.raises(DataError, match=r"x.png has 2 mask files"):
        find_masks(records, source="file")
    transparent = tmp_path / "t"
    transparent.mkdir()
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(transparent / "y.png")
    with pytest.raises(DataError, match=r"y.png is fully transparent"):
        find_masks(load_records(transparent), source="alpha")


def test_config_checks_mask_settings(tmp_path):
    for data, key in (
        ({"mask_source": "bogus"}, "data.mask_source"),
        ({"unmasked_weight": 1.5}, "data.unmasked_weight"),
    ):
        with pytest.raises(ConfigError, match=key):
            from_dict(base_config(tmp_path, tmp_path, tmp_path / "out", data=data))


# ----------------------------------------------------------------------------- alignment


def _aligned_dataset(tmp_path: Path, image_size, **kwargs) -> ImageCaptionDataset:
    """An image whose luminance is its own mask file, so an aligned mask equals the
    image's (pixels + 1) / 2 wherever the crop and flip took it."""
    data = tmp_path / "data"
    data.mkdir()
    grey = _grey_noise(*image_size, seed=3)
    Image.fromarray(grey).save(data / "x.png")
    Image.fromarray(grey[..., 0]).save(data / "x-masklabel.png")
    records = load_records(data)
    return ImageCaptionDataset(
        records,
        resolution=32,
        instance_prompt="sks",
        masks=find_masks(records, source="file"),
        **kwargs,
    )


def test_the_mask_follows_random_crops_and_flips(tmp_path):
    dataset = _aligned_dataset(
        tmp_path, (56, 32), center_crop=False, random_flip=True, repeats=8, mask_scale=1
    )
    seen_flips, seen_offsets = set(), set()
    for i in range(len(dataset)):
        item = dataset[i]
        mask, pixels = item["loss_mask"], item["pixel_values"]
        assert mask.shape == (1, 32, 32)
        assert torch.allclose(mask[0], (pixels[0] + 1) / 2, atol=1e-6)
        unflipped = np.asarray(Image.open(tmp_path / "data" / "x.png"))[..., 0] / 255.0
        found = [
            (left, flip)
            for left in range(25)
            for flip in (False, True)
            if np.allclose(
                (
                    unflipped[:, left : left + 32][:, ::-1]
                    if flip
                    else unflipped[:, left : left + 32]
                ),
                mask[0].numpy(),
                atol=1e-6,
            )
        ]
        assert found
        seen_offsets.add(found[0][0])
        seen_flips.add(found[0][1])
    assert seen_flips == {False, True} and len(seen_offsets) > 2  # the test saw both


def test_the_mask_follows_resizing_buckets_and_is_pooled_to_latents(tmp_path):
    dataset = _aligned_dataset(
        tmp_path, (48, 80), sizes=[(24, 40)], random_flip=True, repeats=4, mask_scale=8
    )
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["loss_mask"].shape == (1, 5, 3)
        # The same geometry on both; the mask's BOX filter and the image's LANCZOS differ
        # a little per pixel, not in where things are.
        expected = torch.nn.functional.avg_pool2d((item["pixel_values"][:1] + 1) / 2, 8)
        assert torch.allclose(item["loss_mask"], expected, atol=0.03)


def test_collate_gives_class_images_a_mask_of_ones():
    mask = torch.rand(1, 4, 4)
    batch = collate(
        [
            {
                "pixel_values": torch.zeros(3, 32, 32),
                "caption": "a",
                "key": "x",
                "loss_mask": mask,
                "prior": {"pixel_values": torch.zeros(3, 32, 32), "caption": "b"},
            }
        ]
    )
    assert torch.equal(batch["loss_mask"], torch.stack([mask, torch.ones(1, 4, 4)]))


# ----------------------------------------------------------------------------- the cache


def _store(dataset, folder) -> LatentStore:
    views = [(0, False)]
    return LatentStore(folder, {(0, False): "latent"}, _mask_keys(dataset, views))


def test_masks_are_cached_under_a_key_that_changes_with_the_mask(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(_grey_noise(32, 32, 0)).save(data / "x.png")
    _half_mask(32, 32).save(data / "x-masklabel.png")
    records = load_records(data)

    def dataset():
        return ImageCaptionDataset(
            records, resolution=32, instance_prompt="sks", masks=find_masks(records, source="file")
        )

    first = dataset()
    first.latents = _store(first, tmp_path / "cache")
    mask = first[0]["loss_mask"]
    assert mask[0, :, :2].eq(1).all() and mask[0, :, 2:].eq(0).all()
    again = dataset()
    again.latents = _store(again, tmp_path / "cache")
    assert torch.equal(again.latents.get_mask((0, False)), mask)  # read back from disk

    # Same pixels, another mask: another key, and the new mask, never the stale one.
    Image.fromarray(255 - np.asarray(_half_mask(32, 32))).save(data / "x-masklabel.png")
    other = dataset()
    other.latents = _store(other, tmp_path / "cache")
    assert other.latents.mask_keys != first.latents.mask_keys
    assert other.latents.get_mask((0, False)) is None
    assert torch.equal(other[0]["loss_mask"], 1 - mask)
    # The latents themselves do not depend on the mask: their key is unchanged.
    assert other.latents.keys == first.latents.keys


def test_alpha_and_file_masks_of_one_image_have_different_keys(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rgba = np.concatenate([_grey_noise(32, 32, 0), np.full((32, 32, 1), 255, np.uint8)], axis=2)
    rgba[:, 16:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(data / "x.png")
    _half_mask(32, 32).save(data / "x-masklabel.png")
    records = load_records(data)
    keys = []
    for source in ("alpha", "file"):
        ds = ImageCaptionDataset(
            records, resolution=32, instance_prompt="sks", masks=find_masks(records, source=source)
        )
        keys.append(_mask_keys(ds, [(0, False)]))
        assert torch.equal(ds[0]["loss_mask"][0, :, :2], torch.ones(4, 2))
    assert keys[0] != keys[1]


# ----------------------------------------------------------------------------- the loop


def test_training_with_white_masks_has_exactly_the_unmasked_loss(tiny_model_dir, tmp_path):
    """The whole path (find, transform, cache, collate, loss, validation loss): masks of all
    white give the very losses of masked_loss=false; half masks give others."""
    from personalize.testing import write_synthetic_images
    from personalize.training.loop import Trainer

    data = tmp_path / "data"
    paths = write_synthetic_images(data, count=4, size=32)
    for path in paths:
        Image.new("L", (32, 32), 255).save(path.with_name(f"{path.stem}-masklabel.png"))

    def losses(name: str, **data_settings) -> tuple[torch.Tensor, float]:
        cfg = base_config(
            tiny_model_dir,
            data,
            tmp_path / name,
            data={"random_flip": True, "validation_split": 0.5, **data_settings},
            validation={"loss_every_steps": 100},
        )
        trainer = Trainer(from_dict(cfg))
        batch = next(iter(trainer.dataloader))
        assert ("loss_mask" in batch) == data_settings.get("masked_loss", False)
        with torch.no_grad():
            train_loss = trainer.compute_loss(batch)
        inputs = (trainer.unet, trainer.conditioning, trainer.parts.noise_scheduler)
        return train_loss, trainer.validation_loss.compute(*inputs)

    plain, plain_val = losses("plain")
    white, white_val = losses("white", masked_loss=True)
    assert torch.equal(white, plain) and white_val == plain_val
    for path in paths:
        _half_mask(32, 32).save(path.with_name(f"{path.stem}-masklabel.png"))
    half, half_val = losses("half", masked_loss=True)
    assert torch.isfinite(half) and not torch.equal(half, plain)
    assert half_val != plain_val
    # The masks went into the latent cache beside the latents.
    from safetensors.torch import load_file

    cached = (tmp_path / "half" / "cache" / "latents").rglob("*.safetensors")
    assert sum("loss_mask" in load_file(path) for path in cached) == 2


def test_prior_preservation_class_rows_are_unmasked(tiny_model_dir, tmp_path):
    """LoRA + class images + half masks: the instance rows are weighed by their masks, the
    class rows (no mask) by ones, then instance mean + loss_weight * class mean; and a run
    trains to its end with masks cached."""
    from personalize.testing import write_synthetic_images
    from personalize.training.loop import Trainer

    data = tmp_path / "data"
    for path in write_synthetic_images(data, count=2, size=32):
        _half_mask(32, 32).save(path.with_name(f"{path.stem}-masklabel.png"))
    weight = 0.37
    cfg = base_config(
        tiny_model_dir,
        data,
        tmp_path / "run",
        data={"masked_loss": True, "unmasked_weight": 0.1},
        train={"max_steps": 2},
        prior={
            "enabled": True,
            "class_prompt": "a photo of a disc",
            "class_data_dir": str(tmp_path / "class"),
            "num_class_images": 2,
            "generation_steps": 1,
            "generation_batch_size": 2,
            "loss_weight": weight,
        },
    )
    trainer = Trainer(from_dict(cfg))
    batch = next(iter(trainer.dataloader))
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert batch["loss_mask"][2:].eq(1).all() and not batch["loss_mask"][:2].eq(1).all()
    seen = {}
    inner = trainer.method.extra_loss

    def spy(b, outputs, parts):
        seen["outputs"] = outputs
        return inner(b, outputs, parts)

    trainer.method.extra_loss = spy
    with torch.no_grad():
        loss = trainer.compute_loss(batch)
    out = seen["outputs"]
    elements = (out.model_pred.float() - out.target.float()) ** 2
    instance = weigh_loss(elements[:2], batch["loss_mask"][:2], 0.1, True)
    expected = instance.mean() + weight * elements[2:].mean()
    torch.testing.assert_close(loss, expected)
    unmasked = elements[:2].mean() + weight * elements[2:].mean()
    assert not torch.allclose(expected, unmasked)
    trainer.method.extra_loss = inner
    trainer.run()
    assert trainer.global_step == 2
