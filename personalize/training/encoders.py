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
        from personalize.data.cache import cache_latents, cache_text_embeddings

        acc, d = self.accelerator, self.cfg.data
        folder = Path(d.cache_dir) if d.cache_dir else self.out / "cache"
        self.text_cache: dict[str, torch.Tensor] | None = None
        self.offloaded: set[str] = set()
        self._return_hooks: dict[str, list] = {}
        ds = self.train_dataset
        if d.cache_latents and not self.trains["vae"]:
            if not ds.center_crop:
                logger.warning("latents are not cached: data.center_crop=false asks for random "
                               "crops, which differ every epoch. Set data.center_crop=true to "
                               "cache (each image is then encoded once, both flips if "
                               "random_flip) or data.cache_latents=false to silence this.")
            else:
                for dataset in self._latent_cacheable(ds):
                    dataset.latents = cache_latents(
                        dataset, self.parts.vae, folder / "latents", accelerator=acc,
                        device=acc.device, batch_size=max(4, self.cfg.train.batch_size))
                self._offload("vae")
        # The text encoder's output is fixed only when nothing in it trains and nothing
        # outside the UNet trains either (a method might feed it new embeddings).
        unet_params = {id(p) for p in self.parts.unet.parameters()}
        only_unet = all(id(p) in unet_params for p in self.trainable)
        captions = self._fixed_captions()
        if d.cache_text_embeddings and only_unet and captions is not None:
            cache = cache_text_embeddings(
                captions, self.parts.tokenizer, self.parts.text_encoder, folder / "text",
                tokenize=tokenize, accelerator=acc, device=acc.device, autocast=acc.autocast)
            self.text_cache = {c: h.to(acc.device) for c, h in cache.items()}
            self._offload("text_encoder")
        elif d.cache_text_embeddings:
            why = ("the method trains more than the UNet" if not only_unet else
                   "captions change from step to step (shuffle_tags or a caption function)")
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
            logger.info("class images are not in the latent cache: data.bucketing=true fits "
                        "each one to its instance partner's size")
            return [ds]
        return [ds, paired]

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
        if self.cfg.db.class_prompt:  # class images' captions, if the method uses them
            captions.add(self.cfg.db.class_prompt)
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
            logger.info("%s back on %s: a training example was not in the cache", name,
                        self.accelerator.device)
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

    def _encode_latents(self, pixel_values: torch.Tensor, generator) -> torch.Tensor:
        vae = self._bring_back("vae")
        with torch.no_grad():
            dist = vae.encode(pixel_values.to(self.accelerator.device, vae.dtype)).latent_dist
            latents = dist.sample(generator=generator)
        return self._scale_latents(latents)

    def _batch_latents(self, batch: dict[str, Any], generator) -> torch.Tensor:
        """Latents for the batch: sampled from cached distributions (as the VAE path samples
        with the same generator), encoded from pixels, or both for a mixed batch."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        parts = []
        if "latent_dist" in batch:
            params = batch["latent_dist"].to(self.accelerator.device, non_blocking=True)
            parts.append(self._scale_latents(
                DiagonalGaussianDistribution(params).sample(generator=generator)))
        if "pixel_values" in batch:
            parts.append(self._encode_latents(batch["pixel_values"], generator))
        if len(parts) == 1:
            return parts[0]
        cached = batch["cached"]
        # Examples were split into cached rows then encoded rows; put them back in order.
        order = sorted(range(len(cached)), key=lambda i: (not cached[i], i))
        latents = torch.cat(parts)
        if order != list(range(len(cached))):
            inverse = [order.index(i) for i in range(len(cached))]
            latents = latents[torch.tensor(inverse, device=latents.device)]
        return latents

    def _encode_text(self, captions: list[str], input_ids: torch.Tensor | None = None
                     ) -> torch.Tensor:
        if self.text_cache is not None and all(c in self.text_cache for c in captions):
            return torch.stack([self.text_cache[c] for c in captions])
        text_encoder = self.text_encoder if self.trains["text_encoder"] \
            else self._bring_back("text_encoder")
        ids = input_ids if input_ids is not None else tokenize(self.parts.tokenizer, captions)
        ids = ids.to(self.accelerator.device, non_blocking=True)
        if self.trains["text_encoder"]:
            return text_encoder(ids)[0]
        with torch.no_grad():
            return text_encoder(ids)[0]
