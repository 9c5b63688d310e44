"""Conditioning: the one place that turns a batch into what the UNet sees besides noise,
its latents and its text conditioning.

It owns the latent cache (data/cache.py `LatentCache`) and the text-embedding cache, both
filled only where that cannot change training, and where the encoders live: one whose every
output is cached leaves the accelerator, comes back if something calls it after all (an
uncached class image, a distillation prior encoding its class prompt) and visits for
validation and sampling (`all_on_device`).

SDXL (`parts.is_sdxl`) is conditioned as diffusers' `train_dreambooth_lora_sdxl.py` does:
the penultimate hidden states of both text encoders, concatenated; the pooled projection of
text_encoder_2 (`text_embeds`); and per example `time_ids` = original_size +
crops_coords_top_left + target_size, which the dataset records for every view (bucket,
random crop, flip: data/transforms.py `CropGeometry`) and collate stacks in
`batch["time_ids"]`. `text` returns them in `TextConditioning.unet_kwargs`
(`added_cond_kwargs`); SD 1.x/2.x get none.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from personalize.data.cache import (
    LatentCache,
    cache_text_conditioning,
    cache_text_embeddings,
    module_fingerprint,
)
from personalize.errors import TrainingError
from personalize.models import SDParts
from personalize.training.data import tokenize

logger = logging.getLogger(__name__)


@dataclass
class CacheSettings:
    """What may be cached (data.cache_latents / data.cache_text_embeddings) and where."""

    latents: bool
    text: bool
    folder: Path


@dataclass
class TextConditioning:
    """What the UNet is conditioned on for a batch of captions: the text encoder's hidden
    states (`encoder_hidden_states`) and further UNet keyword arguments a model family adds
    (SDXL: `added_cond_kwargs` with the pooled embedding and size/crop ids; none for SD1/2)."""

    hidden_states: torch.Tensor
    unet_kwargs: dict[str, Any] = field(default_factory=dict)


class Conditioning:
    """Latents and text conditioning for a batch, from the caches or the encoders.

    `trains`: which of `parts`' modules train. `datasets`: the training data first, then the
    datasets a method pairs with it (e.g. class images), whose latents may be cached.
    `fixed_captions`: every caption training and validation can show, or None when they
    change from step to step (then the text encoder's output is never cached)."""

    def __init__(
        self,
        parts: SDParts,
        accelerator,
        *,
        trains: Mapping[str, bool],
        cache: CacheSettings,
        datasets: Sequence,
        fixed_captions: Sequence[str] | None,
    ):
        started = time.perf_counter()
        self.parts = parts
        self.accelerator = accelerator
        self.trains = dict(trains)
        self.text_encoder = parts.text_encoder  # the one called when it trains (maybe wrapped)
        self.wrapped: dict[str, torch.nn.Module] = dict(parts.text_encoders())
        self.offloaded: set[str] = set()
        self._return_hooks: dict[str, list] = {}
        self.latent_cache: LatentCache | None = None
        self.text_cache: dict[str, Any] | None = None
        if cache.latents and not self.trains["vae"]:
            cacheable = self._latent_cacheable(list(datasets))
            if cacheable:
                # Filled as batches first use each view: step 1 waits for one batch, not for
                # every image of the data set.
                self.latent_cache = LatentCache(cacheable, parts.vae, cache.folder / "latents")
                self._offload_vae_when_cached()
        # The text encoder's output is fixed only when nothing but the UNet trains (the
        # rule of docs/architecture.md: a method's new trainable modules live inside the
        # model they act on, so anything feeding the text encoder shows up in `trains`).
        only_unet = not any(t for name, t in self.trains.items() if name != "unet")
        if cache.text and only_unet and fixed_captions is not None and parts.is_sdxl:
            self.text_cache = self._cache_sdxl_text(fixed_captions, cache.folder / "text")
            for name in parts.text_encoders():
                self.offload(name)
        elif cache.text and only_unet and fixed_captions is not None:
            embeddings = cache_text_embeddings(
                fixed_captions,
                parts.tokenizer,
                parts.text_encoder,
                cache.folder / "text",
                tokenize=tokenize,
                accelerator=accelerator,
                device=accelerator.device,
                autocast=accelerator.autocast,
            )
            self.text_cache = {c: h.to(accelerator.device) for c, h in embeddings.items()}
            self.offload("text_encoder")
        elif cache.text:
            why = (
                "the method trains more than the UNet"
                if not only_unet
                else "captions change from step to step (shuffle_tags or a caption function)"
            )
            logger.info("text embeddings are not cached: %s", why)
        self.setup_seconds = time.perf_counter() - started

    def use_wrapped_text_encoder(
        self, text_encoder: torch.nn.Module, name: str = "text_encoder"
    ) -> None:
        """The accelerator-prepared (e.g. DDP) text encoder `name`, called when it trains."""
        self.wrapped[name] = text_encoder
        if name == "text_encoder":
            self.text_encoder = text_encoder

    # ------------------------------------------------------------------------ latents

    def _latent_cacheable(self, datasets: list) -> list:
        """The training images, and the datasets paired with them when those are squares of
        the same size as every training image; with aspect-ratio buckets each paired image
        is resized to its partner's bucket per step, so it stays uncached and the VAE comes
        back for it."""
        train = datasets[0]
        if not train.center_crop:
            logger.warning(
                "latents are not cached: data.center_crop=false asks for random crops, which "
                "differ every epoch. Set data.center_crop=true to cache (each image is then "
                "encoded once, both flips if random_flip) or data.cache_latents=false to "
                "silence this."
            )
            return []
        if train.sizes is not None and len(datasets) > 1:
            logger.info(
                "class images are not in the latent cache: data.bucketing=true fits each one "
                "to its instance partner's size"
            )
            return [train]
        return datasets

    def _offload_vae_when_cached(self) -> None:
        if self.latent_cache is not None and self.latent_cache.complete:
            if "vae" not in self.offloaded:
                self.offload("vae")

    def _scale(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.parts.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return ((latents - shift) * config.scaling_factor).float()

    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The VAE's latent distribution parameters (mean, logvar) for pixel rows. A VAE
        kept in fp32 (SDXL's, training/accelerator.py `vae_needs_fp32`) runs outside
        mixed-precision autocast, which would otherwise compute it in half precision."""
        vae = self._bring_back("vae")
        full = vae.dtype == torch.float32
        off = torch.autocast(self.accelerator.device.type, enabled=False)
        with torch.no_grad(), off if full else contextlib.nullcontext():
            return vae.encode(
                pixel_values.to(self.accelerator.device, vae.dtype)
            ).latent_dist.parameters

    def latents(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """Latents for the batch: each example's distribution comes from the cache or from
        the VAE (newly encoded views then join the cache), and one draw samples them all in
        example order, so the result does not depend on which rows were cached (a resumed
        run finds on disk what the interrupted one encoded, and draws the same)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        device = self.accelerator.device
        encoded = cached = None
        if "pixel_values" in batch:
            encoded = self._encode_rows(batch["pixel_values"], batch.get("latent_keys"))
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
        return self._scale(DiagonalGaussianDistribution(params).sample(generator))

    def _encode_rows(self, pixels: torch.Tensor, keys: list[str | None] | None) -> torch.Tensor:
        if not keys or self.latent_cache is None:
            return self.encode_pixels(pixels)
        params = self.latent_cache.encode(pixels, keys, self.encode_pixels, self.accelerator.device)
        self._offload_vae_when_cached()
        return params

    # ------------------------------------------------------------------------ text

    def time_ids(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """SDXL's per-example size/crop ids of a batch (collate's `time_ids`); None for
        SD 1.x/2.x, which have no such input."""
        if not self.parts.is_sdxl:
            return None
        return batch["time_ids"]

    def text(
        self,
        captions: list[str],
        input_ids: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> TextConditioning:
        """The text conditioning of `captions` (`input_ids`: their token ids, if at hand;
        `time_ids`: SDXL's size/crop ids, one row per caption)."""
        if self.parts.is_sdxl:
            return self._sdxl_text(captions, input_ids, time_ids)
        if self.text_cache is not None and all(c in self.text_cache for c in captions):
            return TextConditioning(torch.stack([self.text_cache[c] for c in captions]))
        trains = self.trains["text_encoder"]
        text_encoder = self.text_encoder if trains else self._bring_back("text_encoder")
        ids = input_ids if input_ids is not None else tokenize(self.parts.tokenizer, captions)
        ids = ids.to(self.accelerator.device, non_blocking=True)
        with contextlib.nullcontext() if trains else torch.no_grad():
            return TextConditioning(text_encoder(ids)[0])

    # ------------------------------------------------------------------------ SDXL text

    def _sdxl_encode(
        self, captions: list[str], input_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """{"hidden": both encoders' penultimate hidden states concatenated, "pooled":
        text_encoder_2's projected pooled output}, as diffusers' SDXL scripts encode."""
        device = self.accelerator.device
        tokenizers = {
            "text_encoder": self.parts.tokenizer,
            "text_encoder_2": self.parts.tokenizer_2,
        }
        hidden, pooled = [], None
        for name, tokenizer in tokenizers.items():
            trains = self.trains[name]
            encoder = self.wrapped[name] if trains else self._bring_back(name)
            if name == "text_encoder" and input_ids is not None:
                ids = input_ids  # collate tokenized them in the loader with tokenizer 1
            else:
                ids = tokenize(tokenizer, captions)
            ids = ids.to(device, non_blocking=True)
            with contextlib.nullcontext() if trains else torch.no_grad():
                out = encoder(ids, output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled}

    def _cache_sdxl_text(self, captions: Sequence[str], folder: Path) -> dict[str, Any]:
        unique = sorted(set(captions))
        encoders = self.parts.text_encoders()
        entries = cache_text_conditioning(
            unique,
            self._sdxl_encode,
            identity=[
                [row.tolist() for row in tokenize(tok, unique)]
                for tok in (self.parts.tokenizer, self.parts.tokenizer_2)
            ]
            if unique
            else [[], []],
            encoder_id=["sdxl"] + [f"{module_fingerprint(m)}:{m.dtype}" for m in encoders.values()],
            folder=folder,
            accelerator=self.accelerator,
            autocast=self.accelerator.autocast,
        )
        device = self.accelerator.device
        return {c: {k: t.to(device) for k, t in e.items()} for c, e in entries.items()}

    def _sdxl_text(
        self, captions: list[str], input_ids: torch.Tensor | None, time_ids: torch.Tensor | None
    ) -> TextConditioning:
        if self.text_cache is not None and all(c in self.text_cache for c in captions):
            rows = [self.text_cache[c] for c in captions]
            encoded = {k: torch.stack([r[k] for r in rows]) for k in ("hidden", "pooled")}
        else:
            encoded = self._sdxl_encode(captions, input_ids)
        hidden, pooled = encoded["hidden"], encoded["pooled"]
        if time_ids is None:
            raise TrainingError("SDXL needs time_ids (size, crop, target size) per caption")
        # fp32, not the compute dtype: bf16 would round sizes above 256 (1365 -> 1368).
        time_ids = time_ids.to(hidden.device, torch.float32, non_blocking=True)
        return TextConditioning(
            hidden, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        )

    # ------------------------------------------------------------------------ devices

    def offload(self, name: str) -> None:
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
    def all_on_device(self):
        """Validation and sampling use every module; offloaded ones visit the device."""
        away = sorted(self.offloaded)
        for name in away:
            self.parts.modules()[name].to(self.accelerator.device)
        self.offloaded.clear()
        try:
            yield
        finally:
            for name in away:
                self.offload(name)
