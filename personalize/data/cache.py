"""Latent and text-embedding caches: encode each image view and each caption once.

The SD VAE encoder costs more than the UNet's forward pass at 512 px, and a frozen text
encoder returns the same embedding for the same caption every step, so both are computed
once, stored on disk and kept in memory; the VAE / text encoder then leave the accelerator.

Correctness first (kohya#1750, diffusers#14430: cached latents paired with the wrong
caption or the wrong augmentation):

* A latent entry is keyed by the image file's content hash (not its name), the exact
  transform (output size, crop mode, flip), the VAE's weights and dtype, and
  `CACHE_VERSION`; editing an image, changing the resolution/bucket or the model gives a
  new key, so a stale entry can never be read. Random flips are handled by caching both
  views and letting the dataset's usual flip draw pick one. Random crops cannot be cached
  (every epoch crops differently), so the loop does not cache latents then (and says so).
* What is stored is the VAE's latent *distribution* (mean and log-variance), and the loop
  samples from it every step with the step's generator, as the uncached path does; the
  scale/shift factors are applied at use, so they are not part of the key.
* A text entry is keyed by the token ids and the text encoder's weights; the loop only
  uses this cache when the method leaves the text encoder frozen and captions are a fixed
  set (no tag shuffling, no per-step caption function).

When: latents go into a `LatentStore`, filled as batches first use each view (step 1 then
waits for one batch, not for every image); text embeddings are computed up front (they are
few and cheap).

Several processes: for text embeddings entry j of the sorted key list is computed by
process j % world (only if its file is missing), every process then waits at a barrier and
reads all entries; a `LatentStore` looks on disk for what it lacks, so each process (and
loader worker) picks up what others wrote. Each file is written under a temporary name and
renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from personalize.errors import ConfigError, NonFiniteLatentsError
from personalize.io import atomic_save_safetensors

logger = logging.getLogger(__name__)


# Bump when the transforms or what an entry holds change: old entries then stop matching.
CACHE_VERSION = 1
_CHUNK = 1 << 20


def _sha256(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def content_digest(record) -> str:
    """sha256 of the record's image bytes (a file's contents, or a datasets row's bytes)."""
    h = hashlib.sha256()
    if record.image_path is not None:
        with open(record.image_path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    else:
        row = record.source
        h.update(row.dataset[row.index][row.column]["bytes"])
    return h.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity of a module's weights: its config, every parameter's name, shape,
    dtype and sum, and the bytes of its first elements. Different checkpoints differ here;
    hashing every byte of an 80M-parameter VAE would cost seconds at each start."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        h.update(
            repr(
                sorted(dict(config).items()) if hasattr(config, "items") else config.to_dict()
            ).encode()
        )
    with torch.no_grad():
        for name, p in module.state_dict().items():
            flat = p.detach().reshape(-1)
            h.update(
                f"{name}:{tuple(p.shape)}:{p.dtype}:{flat.double().sum().item():.10e}".encode()
            )
            h.update(flat[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


class TensorCache:
    """One safetensors file per key under `folder` (two-level fan-out keeps folders small)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            logger.warning("cache entry %s is unreadable (%s); computing it again", path, e)
            return None

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        atomic_save_safetensors(tensors, self.path(key))


def build_entries(
    cache: TensorCache,
    keys: Sequence[str],
    compute: Callable[[list[int]], list],
    accelerator=None,
    batch_size: int = 8,
) -> tuple[list[dict], int]:
    """Every entry of `keys`, computing the missing ones with `compute(indices) -> tensors`.

    Process r computes the missing entries among keys[r::world] in batches, so no two
    processes ever do the same work; all then meet at one barrier and read everything.
    Returns (entries, computed here).
    """
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    mine = [j for j in range(rank, len(keys), world) if not cache.exists(keys[j])]
    computed = 0
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        for j, tensors in zip(chunk, compute(chunk), strict=True):
            cache.save(keys[j], tensors)
        computed += len(chunk)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    entries = []
    for j, key in enumerate(keys):
        tensors = cache.load(key)
        if tensors is None:  # vanished or unreadable: compute it here, no collective needed
            tensors = compute([j])[0]
            cache.save(key, tensors)
            computed += 1
        entries.append(tensors)
    return entries, computed


# --------------------------------------------------------------------------- latents


def latent_views(dataset) -> list[tuple[int, bool]]:
    """The (record index, flipped) views an ImageCaptionDataset can show with center crops."""
    flips = (False, True) if dataset.random_flip else (False,)
    return [(i, flip) for i in range(len(dataset.records)) for flip in flips]


def _latent_keys(dataset, vae: torch.nn.Module) -> tuple[list, list[str]]:
    """Every view of `dataset` and its cache key."""
    if not dataset.center_crop:
        raise ConfigError("latents can only be cached with center crops (data.center_crop=true)")
    views = latent_views(dataset)
    vae_id = module_fingerprint(vae)
    digests = [content_digest(r) for r in dataset.records]
    sizes = [
        dataset.sizes[i] if dataset.sizes is not None else (dataset.resolution, dataset.resolution)
        for i, _ in views
    ]
    keys = [
        _sha256(
            "latent", CACHE_VERSION, digests[i], list(size), "center", flip, vae_id, str(vae.dtype)
        )
        for (i, flip), size in zip(views, sizes)
    ]
    return views, keys


def _mask_keys(dataset, views: list[tuple[int, bool]]) -> dict[tuple[int, bool], str]:
    """Cache keys of the loss masks of `views` (data.masked_loss), for images that have a
    mask. Keyed by the image's content and the mask's (its file's sha256, or "alpha": the
    image's own alpha channel), the view's size, crop and flip and the latent scale; so
    another mask for the same pixels, or the other source, never reads a stale entry. The
    loss-time settings (unmasked_weight, normalization) act on the stored mask: not keys."""
    masks = getattr(dataset, "masks", None)
    if masks is None:
        return {}
    digests = {i: content_digest(dataset.records[i]) for i, _ in views if masks[i] is not None}
    keys = {}
    for i, flip in views:
        ref = masks[i]
        if ref is None:
            continue
        size = list(dataset.target_size(i))
        identity = [ref.kind, ref.digest]
        keys[(i, flip)] = _sha256(
            "mask", CACHE_VERSION, digests[i], identity, size, "center", flip, dataset.mask_scale
        )
    return keys


class LatentStore:
    """The latent cache filled as training first uses each view (what the loop uses).

    It starts with the entries already on disk and the loop `put`s the rest as its batches
    encode them, so step 1 waits for one batch, not for the whole data set, and a view that
    is never drawn (the other flip of an image) is never encoded. A view missing here is
    looked up on disk again, so loader workers and other processes see what the main
    process wrote."""

    def __init__(
        self,
        folder: str | Path,
        keys: dict[tuple[int, bool], str],
        mask_keys: dict[tuple[int, bool], str] | None = None,
    ):
        self.cache = TensorCache(folder)
        self.keys = keys
        # Loss masks at latent resolution (data.masked_loss), one entry per masked view;
        # the dataset computes and puts them, in whichever process draws the view first.
        self.mask_keys = mask_keys or {}
        self.masks: dict[tuple[int, bool], torch.Tensor] = {}
        self.views_of: dict[str, list[tuple[int, bool]]] = {}  # identical images share a key
        for view, key in keys.items():
            self.views_of.setdefault(key, []).append(view)
        self.entries: dict[tuple[int, bool], torch.Tensor] = {}
        for view in keys:
            self.get(view)

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, view: tuple[int, bool], default=None) -> torch.Tensor | None:
        if view in self.entries:
            return self.entries[view]
        key = self.keys[view]
        if self.cache.exists(key):
            tensors = self.cache.load(key)
            if tensors is not None:
                self.entries[view] = tensors["latent_dist"]
                return self.entries[view]
        return default

    def key_of(self, view: tuple[int, bool]) -> str:
        return self.keys[view]

    def put(self, key: str, params: torch.Tensor) -> None:
        """Keep the encoding of the view(s) cached under `key`, in memory and on disk;
        never a non-finite one (it would poison every later run that reads the cache)."""
        params = params.detach().cpu()
        if not torch.isfinite(params).all():
            raise NonFiniteLatentsError(
                f"the VAE encoded image view(s) {self.views_of[key]} (record index, flipped) "
                "to NaN/inf latents; nothing was cached. SDXL's VAE overflows in fp16: keep "
                "it in fp32 (its config's force_upcast: true, the default of SDXL models), or "
                "set model.vae_path to an fp16-fixed VAE (e.g. madebyollin/sdxl-vae-fp16-fix); "
                "else check the image"
            )
        for view in self.views_of[key]:
            self.entries[view] = params
        self.cache.save(key, {"latent_dist": params})

    @property
    def complete(self) -> bool:
        return len(self.entries) == len(self.keys)

    def get_mask(self, view: tuple[int, bool]) -> torch.Tensor | None:
        """The cached loss mask of `view`, or None (not computed yet, or no mask)."""
        if view in self.masks:
            return self.masks[view]
        key = self.mask_keys.get(view)
        if key is None or not self.cache.exists(key):
            return None
        tensors = self.cache.load(key)
        if tensors is None:
            return None
        self.masks[view] = tensors["loss_mask"]
        return self.masks[view]

    def put_mask(self, view: tuple[int, bool], mask: torch.Tensor) -> None:
        key = self.mask_keys.get(view)
        if key is None:
            return
        self.masks[view] = mask
        self.cache.save(key, {"loss_mask": mask.contiguous()})


class LatentCache:
    """The latent stores of a run's datasets and their filling, in one place.

    Each dataset gets its `LatentStore` as `dataset.latents`, so its items carry cached
    distributions (or, for a view not encoded yet, pixels plus the view's key); `encode`
    turns such keyed pixel rows into distributions and stores the new ones."""

    def __init__(self, datasets, vae: torch.nn.Module, folder: str | Path):
        self.stores: list[LatentStore] = []
        for dataset in datasets:
            dataset.latents = latent_store(dataset, vae, folder)
            self.stores.append(dataset.latents)

    @property
    def complete(self) -> bool:
        """Every view of every dataset is cached: the VAE is no longer needed."""
        return all(store.complete for store in self.stores)

    def encode(
        self,
        pixels: torch.Tensor,
        keys: list[str | None],
        encode: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
    ) -> torch.Tensor:
        """Distribution parameters of pixel rows. A row with a cache key is encoded alone
        and stored, and reused if it was stored since its batch was built (the loader runs a
        batch ahead): a view's cached value then never depends on which batch it first came
        in, so a resumed run reads from disk exactly what it would encode."""
        rows = []
        for row, key in zip(pixels, keys):
            store = next((s for s in self.stores if key in s.views_of), None)
            params = store.get(store.views_of[key][0]) if store is not None else None
            if params is None:
                params = encode(row[None])[0]
                if store is not None:
                    store.put(key, params)
            rows.append(params.to(device))
        return torch.stack(rows)


def latent_store(dataset, vae: torch.nn.Module, folder: str | Path) -> LatentStore:
    """A `LatentStore` for `dataset`'s views (center crops; both flips when it flips)."""
    views, keys = _latent_keys(dataset, vae)
    store = LatentStore(folder, dict(zip(views, keys)), _mask_keys(dataset, views))
    logger.info(
        "latent cache %s: %d views, %d on disk; the rest are encoded on first use",
        folder,
        len(store),
        len(store.entries),
    )
    return store


# --------------------------------------------------------------------------- text


def cache_text_embeddings(
    captions: Sequence[str],
    tokenizer,
    text_encoder: torch.nn.Module,
    folder: str | Path,
    *,
    tokenize: Callable,
    accelerator=None,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    autocast=None,
) -> dict[str, torch.Tensor]:
    """{caption: encoder hidden states [tokens, width]} for each distinct caption, on CPU."""
    unique = sorted(set(captions))
    ids = tokenize(tokenizer, unique) if unique else torch.zeros(0, 1, dtype=torch.long)
    row_of = {c: i for i, c in enumerate(unique)}

    def encode(rows: list[str]) -> dict[str, torch.Tensor]:
        batch = ids[[row_of[c] for c in rows]].to(device)
        return {"hidden": text_encoder(batch)[0]}

    entries = cache_text_conditioning(
        unique,
        encode,
        identity=[[row.tolist() for row in ids]],
        encoder_id=[module_fingerprint(text_encoder), str(text_encoder.dtype)],
        folder=folder,
        accelerator=accelerator,
        batch_size=batch_size,
        autocast=autocast,
    )
    return {c: e["hidden"] for c, e in entries.items()}


def cache_text_conditioning(
    captions: Sequence[str],
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    *,
    identity: list[list],
    encoder_id: list[str],
    folder: str | Path,
    accelerator=None,
    batch_size: int = 32,
    autocast=None,
) -> dict[str, dict[str, torch.Tensor]]:
    """{caption: {name: tensor}} for each distinct caption (sorted), on CPU: whatever
    `encode(captions) -> {name: [batch, ...] tensor}` returns (SDXL: both encoders' hidden
    states and the pooled embedding). `identity[t][i]`: what tokenizer t makes of caption
    i (token ids), `encoder_id`: the encoders' fingerprints; both are in each entry's key."""
    unique = sorted(set(captions))
    keys = [
        _sha256("text", CACHE_VERSION, [ids[i] for ids in identity], *encoder_id)
        for i in range(len(unique))
    ]

    @torch.no_grad()
    def compute(indices: list[int]) -> list[dict[str, torch.Tensor]]:
        rows = [unique[i] for i in indices]
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = encode(rows)
        return [{name: t[j].cpu() for name, t in out.items()} for j in range(len(rows))]

    entries, computed = build_entries(TensorCache(folder), keys, compute, accelerator, batch_size)
    logger.info(
        "text-embedding cache %s: %d captions, %d encoded now", folder, len(unique), computed
    )
    return dict(zip(unique, entries))
