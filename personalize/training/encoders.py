"""What the VAE and the text encoder give a training step, computed once where that
cannot change training: the latent and text-embedding caches (data/cache.py), and where
those encoders live. An encoder whose every output is cached leaves the accelerator; it
comes back if something calls it after all (an uncached class image, a distillation prior
encoding its class prompt) and visits for validation and sampling.

`EncoderInputs` is a part of `Trainer` (training/loop.py), kept apart because it is one
idea: it uses the trainer's cfg, parts, accelerator, datasets and `trains`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from personalize.data import ImageCaptionDataset
from personalize.training.data import tokenize

logger = logging.getLogger(__name__)


class EncoderInputs:
    """Latents and text embeddings for a batch, from the caches or the encoders."""

    def _setup_caches(self) -> None:
        """Latents and text embeddings computed once, when that cannot change training."""
        from personalize.data.cache import cache_text_embeddings, latent_store

        acc, d = self.accelerator, self.cfg.data
        folder = Path(d.cache_dir) if d.cache_dir else self.out / "cache"
        self.text_cache: dict[str, torch.Tensor] | None = None
        self.offloaded: set[str] = set()
        self._return_hooks: dict[str, list] = {}
        self.latent_stores: list = []
        ds = self.train_dataset
        if d.cache_latents and not self.trains["vae"]:
            if not ds.center_crop:
                logger.warning(
                    "latents are not cached: data.center_crop=false asks for random "
                    "crops, which differ every epoch. Set data.center_crop=true to "
                    "cache (each image is then encoded once, both flips if "
                    "random_flip) or data.cache_latents=false to silence this."
                )
            else:
                # Filled as batches first use each view (data/cache.py LatentStore): step 1
                # waits for one batch, not for every image of the data set.
                for dataset in self._latent_cacheable(ds):
                    dataset.latents = latent_store(dataset, self.parts.vae, folder / "latents")
                    self.latent_stores.append(dataset.latents)
                self._offload_vae_when_cached()
        # The text encoder's output is fixed only when nothing in it trains and nothing
        # outside the UNet trains either (a method might feed it new embeddings).
        unet_params = {id(p) for p in self.parts.unet.parameters()}
        only_unet = all(id(p) in unet_params for p in self.trainable)
        captions = self._fixed_captions()
        if d.cache_text_embeddings and only_unet and captions is not None:
            cache = cache_text_embeddings(
                captions,
                self.parts.tokenizer,
                self.parts.text_encoder,
                folder / "text",
                tokenize=tokenize,
                accelerator=acc,
                device=acc.device,
                autocast=acc.autocast,
            )
            self.text_cache = {c: h.to(acc.device) for c, h in cache.items()}
            self._offload("text_encoder")
        elif d.cache_text_embeddings:
            why = (
                "the method trains more than the UNet"
                if not only_unet
                else "captions change from step to step (shuffle_tags or a caption function)"
            )
            logger.info("text embeddings are not cached: %s", why)

    def _latent_cacheable(self, ds: ImageCaptionDataset) -> list[ImageCaptionDataset]:
        """The training images, and the class images a method pairs with them (prior
        preservation: `.prior`) when those are squares of the same size as every instance
        image; with aspect-ratio buckets each class image is resized to its partner's bucket
        per step, so it stays uncached and the VAE comes back for it."""
        paired = getattr(self.dataloader.dataset, "prior", None)
        if not isinstance(paired, ImageCaptionDataset):
            return [ds]
        if ds.sizes is not None:
            logger.info(
                "class images are not in the latent cache: data.bucketing=true fits "
                "each one to its instance partner's size"
            )
            return [ds]
        return [ds, paired]

    def _offload_vae_when_cached(self) -> None:
        if (
            self.latent_stores
            and all(store.complete for store in self.latent_stores)
            and "vae" not in self.offloaded
        ):
            self._offload("vae")

    def _fixed_captions(self) -> list[str] | None:
        """Every caption training and validation can show, or None when they vary per step."""
        d = self.cfg.data
        if d.shuffle_tags or self.method.caption_fn() is not None:
            return None
        captions = {r.caption or d.prompt or "" for r in self.train_dataset.records}
        if self.val_dataset is not None:
            captions |= {r.caption or d.prompt or "" for r in self.val_dataset.records}
        if d.caption_dropout > 0:
            captions.add("")
        if self.cfg.prior.class_prompt:  # class images' captions, if the method uses them
            captions.add(self.cfg.prior.class_prompt)
        return sorted(captions)

    def _offload(self, name: str) -> None:
        """A module whose outputs are all cached leaves the accelerator (frees its memory).

        A method may still call it (e.g. a distillation prior encodes its class prompt with
        `parts.text_encoder`): a forward pre-hook then brings it back before it runs."""
        module = self.parts.modules()[name]
        if self.accelerator.device.type != "cpu":
            module.to("cpu")
        self.offloaded.add(name)
        if name not in self._return_hooks:

            def come_back(*_):
                self._bring_back(name)  # returns nothing: the call's inputs stay as they are

            entry = [module.encoder, module.decoder] if name == "vae" else [module]
            self._return_hooks[name] = [m.register_forward_pre_hook(come_back) for m in entry]

    def _bring_back(self, name: str) -> torch.nn.Module:
        """An offloaded module that is needed after all (an uncached class image or caption)
        comes back for good; said once."""
        module = self.parts.modules()[name]
        if name in self.offloaded:
            logger.info(
                "%s back on %s: a training example was not in the cache",
                name,
                self.accelerator.device,
            )
            module.to(self.accelerator.device)
            self.offloaded.discard(name)
        return module

    @contextlib.contextmanager
    def _all_on_device(self):
        """Validation and sampling use every module; offloaded ones visit the device."""
        away = sorted(self.offloaded)
        for name in away:
            self.parts.modules()[name].to(self.accelerator.device)
        self.offloaded.clear()
        try:
            yield
        finally:
            for name in away:
                self._offload(name)

    def _scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.parts.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return ((latents - shift) * config.scaling_factor).float()

    def _encode_params(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The VAE's latent distribution parameters (mean, logvar) for pixel rows."""
        vae = self._bring_back("vae")
        with torch.no_grad():
            return vae.encode(
                pixel_values.to(self.accelerator.device, vae.dtype)
            ).latent_dist.parameters

    def _batch_latents(self, batch: dict[str, Any], generator) -> torch.Tensor:
        """Latents for the batch: each example's distribution comes from the cache or from
        the VAE (newly encoded views then join the cache), and one draw samples them all in
        example order, so the result does not depend on which rows were cached (a resumed
        run finds on disk what the interrupted one encoded, and draws the same)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        device = self.accelerator.device
        encoded = cached = None
        if "pixel_values" in batch:
            encoded = self._encode_pixel_rows(batch["pixel_values"], batch.get("latent_keys"))
        if "latent_dist" in batch:
            cached = batch["latent_dist"].to(device, non_blocking=True)
        if encoded is None or cached is None:
            params = encoded if cached is None else cached
        else:
            # Index lists made on the host: a boolean mask on the device would sync.
            flags = batch["cached"]
            rows_cached = [i for i, c in enumerate(flags) if c]
            rows_encoded = [i for i, c in enumerate(flags) if not c]
            params = torch.empty(
                (len(flags), *encoded.shape[1:]), dtype=encoded.dtype, device=device
            )
            params.index_copy_(
                0, torch.tensor(rows_cached, device=device), cached.to(encoded.dtype)
            )
            params.index_copy_(0, torch.tensor(rows_encoded, device=device), encoded)
        return self._scale_latents(DiagonalGaussianDistribution(params).sample(generator))

    def _encode_pixel_rows(
        self, pixels: torch.Tensor, keys: list[str | None] | None
    ) -> torch.Tensor:
        """Distribution parameters of pixel rows. A row with a latent-cache key is encoded
        alone and stored, and reused if it was stored since its batch was built (the loader
        runs a batch ahead): a view's cached value then never depends on which batch it
        first came in, so a resumed run reads from disk exactly what it would encode."""
        if not keys:
            return self._encode_params(pixels)
        rows = []
        for row, key in zip(pixels, keys):
            store = next((s for s in self.latent_stores if key in s.views_of), None)
            params = store.get(store.views_of[key][0]) if store is not None else None
            if params is None:
                params = self._encode_params(row[None])[0]
                if store is not None:
                    store.put(key, params)
            rows.append(params.to(self.accelerator.device))
        self._offload_vae_when_cached()
        return torch.stack(rows)

    def _encode_text(
        self, captions: list[str], input_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.text_cache is not None and all(c in self.text_cache for c in captions):
            return torch.stack([self.text_cache[c] for c in captions])
        text_encoder = (
            self.text_encoder if self.trains["text_encoder"] else self._bring_back("text_encoder")
        )
        ids = input_ids if input_ids is not None else tokenize(self.parts.tokenizer, captions)
        ids = ids.to(self.accelerator.device, non_blocking=True)
        if self.trains["text_encoder"]:
            return text_encoder(ids)[0]
        with torch.no_grad():
            return text_encoder(ids)[0]
