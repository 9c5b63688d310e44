"""Loss masks (data.masked_loss): which pixels of an image the denoising loss looks at.

A mask is white (1) where the subject is and black (0) where the loss should ignore the
picture (a busy background); grey is a partial weight. It comes from the image's own alpha
channel (a cut-out PNG) or from a mask file of the same name; with `mask_source: auto` a
file wins over alpha. Mask files are found where the common trainers put them:

* `data.mask_dir/<same relative path>.<image ext>`: kohya's `conditioning_data_dir`, and
  SimpleTuner's mask data set (a separate folder, same file names);
* `<name>-masklabel.png` beside `<name>.jpg`: OneTrainer;
* `<name>.mask.png` beside the image, or `masks/<name>.png` in the image's folder.

A file's luminance is the mask (kohya reads the red channel: equal for grey masks). The
mask goes through the same resize/crop/flip `Geometry` as its image (transforms.py), then
is averaged down to latent resolution (the VAE's 8x: the share of each latent pixel the
subject covers). Images without a mask weigh every pixel 1.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from personalize.data.folders import IMAGE_EXTENSIONS, MASK_FOLDER, MASK_SUFFIXES
from personalize.data.transforms import Geometry, apply_geometry, check_pixel_count
from personalize.errors import DataError

logger = logging.getLogger(__name__)

MASK_SOURCES = ("alpha", "file", "auto")
# A mask file may be smaller or larger than its image (masks are often drawn at a lower
# resolution) and is then scaled to it; a different shape means it cannot line up.
_ASPECT_TOLERANCE = 0.01


@dataclass(frozen=True)
class MaskRef:
    """Where one image's mask comes from: its alpha channel, or the file `path`.
    `digest`: the mask's identity in cache keys (the file's sha256; "" for alpha, whose
    identity is the image's own content digest)."""

    kind: str  # "alpha" | "file"
    path: Path | None = None
    digest: str = ""


# ------------------------------------------------------------------------- finding masks


def mask_file_candidates(image: Path, key: str, mask_dir: Path | None) -> list[Path]:
    """Every path a mask of `image` (record key `key`) may have, in order of precedence."""
    stem = image.stem
    found: list[Path] = []
    if mask_dir is not None:
        relative = Path(key).with_suffix("")
        found += [mask_dir / f"{relative}{ext}" for ext in IMAGE_EXTENSIONS]
    for suffix in MASK_SUFFIXES:
        found += [image.parent / f"{stem}{suffix}{ext}" for ext in IMAGE_EXTENSIONS]
    found += [image.parent / MASK_FOLDER / f"{stem}{ext}" for ext in IMAGE_EXTENSIONS]
    return found


def find_masks(
    records: Sequence,
    *,
    source: str,
    mask_dir: str | Path | None = None,
    require_any: bool = True,
) -> list[MaskRef | None]:
    """The mask of every record (None: no mask, every pixel weighs 1), each checked now:
    DataError names a mask file that is unreadable, of another shape than its image, or
    all black, two mask files for one image, and (`require_any`) a data set where no image
    has a mask."""
    if source not in MASK_SOURCES:
        raise DataError(
            f"data.mask_source must be one of {', '.join(MASK_SOURCES)}, got {source!r}"
        )
    folder = Path(mask_dir).expanduser() if mask_dir else None
    if folder is not None and not folder.is_dir():
        raise DataError(f"data.mask_dir {folder} is not a folder.")
    refs = [_find_mask(record, source, folder) for record in records]
    missing = [r for r, ref in zip(records, refs) if ref is None]
    if not require_any and len(missing) == len(records):
        return refs
    if len(missing) == len(records):
        raise DataError(
            f"data.masked_loss=true but none of the {len(records)} images has a mask "
            f"(mask_source={source}): {_where_masks_go(source)}"
        )
    if missing:
        names = ", ".join(r.key for r in missing[:3]) + (" ..." if len(missing) > 3 else "")
        logger.warning(
            "masked loss: %d of %d images have no mask and train on every pixel (%s)",
            len(missing),
            len(records),
            names,
        )
    logger.info(
        "masked loss: %d images with a mask (%d from files, %d from alpha)",
        len(records) - len(missing),
        sum(ref is not None and ref.kind == "file" for ref in refs),
        sum(ref is not None and ref.kind == "alpha" for ref in refs),
    )
    return refs


def _where_masks_go(source: str) -> str:
    files = (
        "a mask file of the same name (data.mask_dir/<name>.png, <name>-masklabel.png, "
        "<name>.mask.png or masks/<name>.png beside the image)"
    )
    alpha = "a transparent background (an alpha channel that is not fully opaque)"
    if source == "file":
        return f"add {files}."
    if source == "alpha":
        return f"give the images {alpha}."
    return f"add {files}, or give the images {alpha}."


def _find_mask(record, source: str, mask_dir: Path | None) -> MaskRef | None:
    if source in ("file", "auto") and record.image_path is not None:
        image = Path(record.image_path)
        files = [p for p in mask_file_candidates(image, record.key, mask_dir) if p.is_file()]
        if len(files) > 1:
            raise DataError(
                f"Image {image} has {len(files)} mask files ({', '.join(map(str, files))}); "
                "keep one."
            )
        if files:
            ref = MaskRef("file", files[0], _file_digest(files[0]))
            _check_file_mask(record, ref)
            return ref
    if source in ("alpha", "auto"):
        alpha = _alpha_channel(_image_bytes_or_path(record))
        if alpha is not None and alpha.getextrema()[0] < 255:  # fully opaque: no mask
            if alpha.getextrema()[1] == 0:
                raise DataError(
                    f"The alpha channel of image {_label(record)} is fully transparent: as a "
                    "loss mask it would leave nothing to learn. Fix the image, or set "
                    "data.mask_source=file."
                )
            return MaskRef("alpha")
    return None


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_file_mask(record, ref: MaskRef) -> None:
    mask = read_mask(record, ref)
    if mask.getextrema()[1] == 0:
        raise DataError(
            f"Mask {ref.path} is all black: it would leave nothing of image "
            f"{_label(record)} to learn. White marks what to train on."
        )


# ------------------------------------------------------------------------- reading masks


def read_mask(record, ref: MaskRef) -> Image.Image:
    """The mask of `record` as an upright 8-bit greyscale image of the image's upright
    size. A mask file of the same aspect ratio but another size is scaled to it; one of
    another aspect ratio cannot line up with its image: DataError."""
    if ref.kind == "alpha":
        alpha = _alpha_channel(_image_bytes_or_path(record))
        if alpha is None:
            raise DataError(f"Image {_label(record)} lost its alpha channel since it was checked.")
        return alpha
    from personalize.data.buckets import upright_size

    try:
        with Image.open(ref.path) as opened:
            check_pixel_count(opened)
            mask = ImageOps.exif_transpose(opened).convert("L")
        size = upright_size(_image_bytes_or_path(record))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"Cannot read mask {ref.path}: {exc}") from exc
    if mask.size != size:
        if abs(mask.size[0] / mask.size[1] - size[0] / size[1]) > _ASPECT_TOLERANCE * (
            size[0] / size[1]
        ):
            raise DataError(
                f"Mask {ref.path} is {mask.size[0]}x{mask.size[1]} but its image "
                f"{_label(record)} is {size[0]}x{size[1]}: another shape cannot line up. "
                "Save the mask at the image's size."
            )
        mask = mask.resize(size, resample=Image.Resampling.BILINEAR)
    return mask


def _alpha_channel(source: Path | bytes) -> Image.Image | None:
    """The upright alpha channel ("L") of an image, or None when it has none."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
        check_pixel_count(opened)
        if opened.mode == "P" and "transparency" in opened.info:
            image = opened.convert("RGBA")
        elif opened.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            opened.load()
            image = opened
        else:
            return None
        upright = ImageOps.exif_transpose(image)
        return upright.getchannel("A").copy()


def _image_bytes_or_path(record) -> Path | bytes:
    if record.image_path is not None:
        return Path(record.image_path)
    row = record.source
    return row.dataset[row.index][row.column]["bytes"]


def _label(record) -> str:
    return str(record.image_path) if record.image_path is not None else record.key


# ------------------------------------------------------------------------- to the loss


def mask_tensor(
    record, ref: MaskRef | None, geometry: Geometry, target: tuple[int, int], scale: int
) -> torch.Tensor:
    """The loss mask of one training view: [1, h // scale, w // scale] in [0, 1] for a
    `target` (w, h) view, each value the mean of the scale x scale pixels it covers."""
    latent = (target[1] // scale, target[0] // scale)
    if ref is None:
        return torch.ones((1, *latent))
    pixels = apply_geometry(read_mask(record, ref), geometry, mask=True)
    values = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0)[None, None]
    return F.adaptive_avg_pool2d(values, latent)[0]


def weigh_loss(
    loss: torch.Tensor, mask: torch.Tensor, unmasked_weight: float, normalize: bool
) -> torch.Tensor:
    """Per-example mean of element losses `loss` [B, C, h, w] weighted by `mask`
    [B, 1, h', w'] (scaled to h x w by area if it differs). Weights are
    clamp(mask, unmasked_weight, 1), OneTrainer's rule; `normalize` divides by the mean
    weight, so a small subject's loss is not tiny (the mean over the masked area). A mask of
    ones gives exactly the unmasked mean."""
    mask = mask.to(loss.device, loss.dtype)
    if mask.shape[-2:] != loss.shape[-2:]:
        mask = F.interpolate(mask, size=loss.shape[-2:], mode="area")
    weights = mask.clamp(min=unmasked_weight, max=1.0)
    dims = list(range(1, loss.ndim))
    weighted = (loss * weights).mean(dim=dims)
    if not normalize:
        return weighted
    # Mean weight per example; an example whose crop holds no subject (and unmasked_weight
    # 0) has weight 0 everywhere: its loss is 0, not 0/0.
    return weighted / weights.mean(dim=dims).clamp(min=1e-6)
