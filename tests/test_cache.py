"""Latent and text-embedding caches: same training as without them, invalidation when images,
transforms or weights change, flips, what gets cached for which method, several processes."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from conftest import base_config
from PIL import Image
from safetensors.torch import load_file

from personalize.config import from_dict
from personalize.data import ImageCaptionDataset, load_records
from personalize.data.cache import LatentStore, TensorCache, build_entries, latent_store
from personalize.methods.lora import LORA_WEIGHTS
from personalize.testing import write_synthetic_images
from personalize.training.loop import Trainer


def test_cached_training_matches_uncached(tiny_model_dir, instance_dir, tmp_path):
    common = dict(train={"max_steps": 3, "batch_size": 2}, data={"random_flip": True})
    cached = Trainer(from_dict(base_config(tiny_model_dir, instance_dir, tmp_path / "c", **common)))
    # LoRA leaves the text encoder frozen: its outputs are cached and it leaves the device;
    # the VAE stays until every view (both flips of 4 images) has been encoded once.
    assert cached.conditioning.offloaded == {"text_encoder"}
    assert set(cached.conditioning.text_cache) == {"a photo of sks disc"}
    assert len(cached.train_dataset.latents) == 2 * 4 and not cached.train_dataset.latents.entries
    cached.run()
    store = cached.train_dataset.latents
    assert 0 < len(store.entries) <= 8  # the views the 3 steps drew, encoded once each
    assert ("vae" in cached.conditioning.offloaded) == store.complete
    plain_cfg = base_config(tiny_model_dir, instance_dir, tmp_path / "p", **common)
    plain_cfg["data"].update(cache_latents=False, cache_text_embeddings=False)
    plain = Trainer(from_dict(plain_cfg))
    assert plain.conditioning.text_cache is None and plain.train_dataset.latents is None
    plain.run()
    a, b = load_file(tmp_path / "c" / LORA_WEIGHTS), load_file(tmp_path / "p" / LORA_WEIGHTS)
    # Same flips, same latent samples, same noise: only batched-vs-single float rounding.
    for k in a:
        assert not torch.equal(a[k], torch.zeros_like(a[k])) or "lora_B" not in k
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_class_images_are_cached_too_and_train_the_same(tiny_model_dir, instance_dir, tmp_path):
    """Prior preservation: the class images' latents join the cache as batches first use
    them, the VAE leaves the device once every view is cached, a later run with the same
    cache folder starts without it, and training is the one the uncached path gives."""
    class_dir = tmp_path / "class"
    write_synthetic_images(class_dir, count=3, size=40, seed=7)
    common = dict(
        train={"max_steps": 3, "batch_size": 2},
        data={"random_flip": False, "cache_dir": str(tmp_path / "cache")},
        db={
            "with_prior_preservation": True,
            "class_prompt": "a photo of a disc",
            "class_data_dir": str(class_dir),
            "num_class_images": 3,
        },
    )
    first = Trainer(from_dict(base_config(tiny_model_dir, instance_dir, tmp_path / "c", **common)))
    assert (
        len(first.dataloader.dataset.prior.latents) == 3
        and "vae" not in first.conditioning.offloaded
    )
    first.run()  # 4 instance + 3 class images, all drawn in the first epoch (2 steps)
    assert first.dataloader.dataset.prior.latents.complete and "vae" in first.conditioning.offloaded
    again = Trainer(from_dict(base_config(tiny_model_dir, instance_dir, tmp_path / "c2", **common)))
    assert "vae" in again.conditioning.offloaded  # everything was on disk already
    batch = next(iter(again.dataloader))
    assert "pixel_values" not in batch and len(batch["latent_dist"]) == 4
    plain_cfg = base_config(tiny_model_dir, instance_dir, tmp_path / "p", **common)
    plain_cfg["data"].update(cache_latents=False)
    plain = Trainer(from_dict(plain_cfg))
    assert plain.dataloader.dataset.prior.latents is None
    plain.run()
    a, b = load_file(tmp_path / "c" / LORA_WEIGHTS), load_file(tmp_path / "p" / LORA_WEIGHTS)
    # Same latent samples and noise; batched-vs-single VAE rounding moves a few entries by
    # ~1e-6 (training moves them by ~1e-3).
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_class_images_stay_uncached_with_buckets(tiny_model_dir, instance_dir, tmp_path):
    class_dir = tmp_path / "class"
    write_synthetic_images(class_dir, count=2, seed=7)
    trainer = Trainer(
        from_dict(
            base_config(
                tiny_model_dir,
                instance_dir,
                tmp_path / "b",
                data={
                    "bucketing": True,
                    "bucket_step": 8,
                    "bucket_min_size": 16,
                    "bucket_max_size": 64,
                },
                db={
                    "with_prior_preservation": True,
                    "class_prompt": "a photo of a disc",
                    "class_data_dir": str(class_dir),
                    "num_class_images": 2,
                },
            )
        )
    )
    assert trainer.train_dataset.latents is not None
    assert trainer.dataloader.dataset.prior.latents is None
    batch = next(iter(trainer.dataloader))
    # Instance views go to the cache once encoded; class rows have no place there.
    assert [k is not None for k in batch["latent_keys"]] == [True, True, False, False]
    trainer.run()
    assert trainer.train_dataset.latents.entries and "vae" not in trainer.conditioning.offloaded


def test_an_offloaded_encoder_comes_back_when_a_method_calls_it(
    tiny_model_dir, instance_dir, tmp_path
):
    cfg = base_config(
        tiny_model_dir,
        instance_dir,
        tmp_path / "o",
        train={"max_steps": 2},
        data={"cache_dir": str(tmp_path / "cache")},
    )
    Trainer(from_dict(cfg)).run()  # one epoch: every view encoded once, on disk
    cfg["overwrite"] = True
    trainer = Trainer(from_dict(cfg))
    assert trainer.conditioning.offloaded == {"vae", "text_encoder"}
    ids = torch.zeros(1, 77, dtype=torch.long)
    trainer.parts.text_encoder(ids)  # e.g. a distillation prior's class prompt
    assert trainer.conditioning.offloaded == {"vae"}
    trainer.parts.vae.encode(torch.zeros(1, 3, 32, 32))
    assert trainer.conditioning.offloaded == set()
    trainer.conditioning.offload("vae")
    with trainer.conditioning.all_on_device():  # validation: a visit, not a return for good
        assert trainer.conditioning.offloaded == set()
        trainer.parts.vae.encode(torch.zeros(1, 3, 32, 32))
    assert trainer.conditioning.offloaded == {"vae"}


def _vae(model_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model_dir / "vae").eval()


def _dataset(folder, resolution=32, random_flip=True):
    return ImageCaptionDataset(
        load_records(folder), resolution=resolution, random_flip=random_flip, instance_prompt="x"
    )


def _count_encodes(vae, monkeypatch):
    calls = []
    original = vae.encode

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", counting)
    return calls


def _filled(dataset, vae, folder) -> LatentStore:
    """A latent store for `dataset`, its missing views encoded one at a time as the loop
    does (training/conditioning.py) and put into it."""
    store = latent_store(dataset, vae, folder)
    for view, key in store.keys.items():
        if store.get(view) is None:
            with torch.no_grad():
                store.put(key, vae.encode(dataset.view(*view)[None]).latent_dist.parameters[0])
    return store


def test_latent_cache_is_invalidated_by_images_transforms_and_weights(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    from personalize.testing import write_synthetic_images

    data, folder = tmp_path / "data", tmp_path / "cache"
    write_synthetic_images(data, count=3)
    vae = _vae(tiny_model_dir)
    calls = _count_encodes(vae, monkeypatch)
    first = _filled(_dataset(data), vae, folder)
    assert sum(calls) == 6 and len(first) == 6 and first.complete
    # The flipped view is the VAE's encoding of the flipped image, not a flipped latent.
    ds = _dataset(data)
    with torch.no_grad():
        flipped = vae.encode(ds.view(1, True)[None]).latent_dist.parameters[0]
    torch.testing.assert_close(first.get((1, True)), flipped, rtol=1e-4, atol=1e-5)
    calls.clear()

    again = _filled(_dataset(data), vae, folder)  # nothing changed: all reused
    assert sum(calls) == 0
    assert all(torch.equal(first.get(k), again.get(k)) for k in first.keys)

    # Same file name, new pixels: only that image's two views are encoded again.
    path = sorted(data.glob("*.png"))[0]
    Image.fromarray(np.full((48, 48, 3), 7, dtype=np.uint8)).save(path)
    changed = _filled(_dataset(data), vae, folder)
    assert sum(calls) == 2
    assert not torch.equal(changed.get((0, False)), first.get((0, False)))
    assert torch.equal(changed.get((2, False)), first.get((2, False)))
    calls.clear()

    _filled(_dataset(data, resolution=24), vae, folder)  # another transform
    assert sum(calls) == 6
    calls.clear()
    assert latent_store(_dataset(data, random_flip=False), vae, folder).complete  # a subset

    with torch.no_grad():  # other weights (a fine-tuned VAE): nothing may be reused
        next(vae.parameters()).add_(0.01)
    _filled(_dataset(data), vae, folder)
    assert sum(calls) == 6
    calls.clear()

    # A damaged entry is noticed and computed again, not trusted.
    victim = max(folder.rglob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    victim.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        _filled(_dataset(data), vae, folder)
    assert sum(calls) == 1 and "unreadable" in caplog.text


def test_random_crops_are_not_cached(tiny_model_dir, instance_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(
            from_dict(
                base_config(
                    tiny_model_dir, instance_dir, tmp_path / "r", data={"center_crop": False}
                )
            )
        )
    assert trainer.train_dataset.latents is None and "vae" not in trainer.conditioning.offloaded
    assert "random crops" in caplog.text
    with pytest.raises(ValueError, match="center crops"):
        latent_store(trainer.train_dataset, trainer.parts.vae, tmp_path / "c")


@pytest.mark.parametrize(
    "sections, cached",
    [
        ({"data": {"caption_dropout": 0.5}}, {"", "a photo of sks disc"}),
        ({"lora": {"train_text_encoder": True}}, None),  # the text encoder trains
        ({"data": {"shuffle_tags": True}}, None),  # captions change every step
    ],
)
def test_text_embeddings_are_cached_only_when_fixed(
    tiny_model_dir, instance_dir, tmp_path, sections, cached
):
    trainer = Trainer(
        from_dict(base_config(tiny_model_dir, instance_dir, tmp_path / "t", **sections))
    )
    if cached is None:
        assert (
            trainer.conditioning.text_cache is None
            and "text_encoder" not in trainer.conditioning.offloaded
        )
    else:
        assert set(trainer.conditioning.text_cache) == cached
        # The cached embedding is the text encoder's output for that caption.
        hidden = trainer.conditioning.text([""]).hidden_states
        trainer.conditioning.text_cache = None
        torch.testing.assert_close(hidden, trainer.conditioning.text([""]).hidden_states)


def test_mixed_batches_keep_example_order(tiny_model_dir, instance_dir, tmp_path, monkeypatch):
    trainer = Trainer(from_dict(base_config(tiny_model_dir, instance_dir, tmp_path / "m")))
    mean = torch.full((1, 4, 16, 16), 5.0)
    params = torch.cat([mean, torch.full_like(mean, -30.0)], dim=1)  # ~zero variance
    encoded = torch.cat([torch.full_like(mean, -1.0), torch.full_like(mean, -30.0)], dim=1)
    monkeypatch.setattr(
        trainer.conditioning,
        "encode_pixels",
        lambda pixels: encoded.expand(len(pixels), -1, -1, -1),
    )
    batch = {
        "latent_dist": params,
        "pixel_values": torch.zeros(2, 3, 32, 32),
        "cached": [False, True, False],
    }
    latents = trainer.conditioning.latents(batch, torch.Generator().manual_seed(0))
    scale = trainer.parts.vae.config.scaling_factor
    torch.testing.assert_close(latents[0], torch.full((4, 16, 16), -scale), atol=1e-5, rtol=0)
    torch.testing.assert_close(latents[2], torch.full((4, 16, 16), -scale), atol=1e-5, rtol=0)
    torch.testing.assert_close(latents[1], torch.full((4, 16, 16), 5.0 * scale), atol=1e-5, rtol=0)


class _FakeRank:
    """What build_entries needs from an Accelerator, for threads standing in for ranks."""

    def __init__(self, index, world, barrier):
        self.process_index, self.num_processes, self.barrier = index, world, barrier
        self.waits = 0

    def wait_for_everyone(self):
        self.waits += 1
        self.barrier.wait(timeout=30)


def test_processes_share_the_work_and_meet_once(tmp_path):
    keys = [f"{i:064x}" for i in range(7)]
    world, computed, results = 3, {}, {}
    barrier = threading.Barrier(world)
    ranks = [_FakeRank(r, world, barrier) for r in range(world)]

    def run(rank):
        def compute(indices):
            computed.setdefault(rank.process_index, []).extend(indices)
            return [{"x": torch.tensor([float(j)])} for j in indices]

        results[rank.process_index] = build_entries(
            TensorCache(tmp_path), keys, compute, rank, batch_size=2
        )

    threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r.waits == 1 for r in ranks)  # one barrier each: no rank can be left waiting
    done = sorted(j for js in computed.values() for j in js)
    assert done == list(range(7))  # every entry computed exactly once, by its owner
    assert computed[1] == [1, 4]
    for entries, _ in results.values():  # and every rank reads all of them
        assert [float(e["x"]) for e in entries] == [float(j) for j in range(7)]
