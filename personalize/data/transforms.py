"""Image loading and training transforms with PIL + numpy only (no torchvision).

Two halves:

* `load_image` turns whatever a user's folder holds (phone JPEGs with EXIF rotation,
  transparent PNGs, palette GIFs, print CMYK, 16-bit scans) into an upright 8-bit RGB
  image, so the rest of the pipeline only ever sees one kind of picture;
  `image_problem` says, in words, why a file cannot be (load_records' up-front check).
* `prepare_image` does the training view: shorter side to `resolution`, square crop,
  optional flip, then a [3, H, W] float tensor in [-1, 1] (what the SD VAE expects).

Randomness is always passed in as a `numpy.random.Generator`; nothing here touches
global RNG state, so the dataset can make augmentation a pure function of
(seed, epoch, index).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from personalize.errors import DataError

ImageSource = str | Path | bytes | BinaryIO
_VERIFY_DRAFT_SIZE = 64  # JPEGs are checked at reduced scale: whole stream, fraction of the cost

# Greyscale modes wider than 8 bits. PIL cannot convert them to RGB faithfully on its
# own ("I;16" -> "RGB" clips instead of scaling), so they go through numpy.
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def load_image(source: ImageSource, *, draft_size: int | None = None) -> Image.Image:
    """Open `source` (path, bytes or binary file) as an upright RGB image, fully decoded.

    `draft_size` lets JPEG decode at a reduced scale (at least that many pixels a side):
    a cheap way to check that the whole file decodes without paying for full size.
    Raises whatever PIL raises for unreadable files (OSError, UnidentifiedImageError,
    DecompressionBombError, ...); the caller adds the file name.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        check_pixel_count(image)
        if draft_size is not None and image.format == "JPEG":
            image.draft(None, (draft_size, draft_size))
        image.load()
        upright = ImageOps.exif_transpose(image)
        rgb = to_rgb(upright)
        # Never hand back the object the `with` block is about to close.
        return rgb.copy() if rgb is image else rgb


def check_pixel_count(image: Image.Image) -> None:
    """Refuse images above PIL's decompression-bomb limit.

    PIL only *raises* at twice `MAX_IMAGE_PIXELS` and merely warns above it; a training
    set has no business holding either, and checking here is thread-safe where turning
    the warning into an error with `warnings.catch_warnings` would not be.
    """
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise Image.DecompressionBombError(
            f"{width}x{height} = {width * height} pixels is over the decompression-bomb "
            f"limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS); downscale the image"
        )


def image_problem(image: Path | bytes | None) -> str | None:
    """Why `image` cannot be trained on, or None when it decodes cleanly."""
    if image is None:
        return "the row has no image"
    try:
        size = image.stat().st_size if isinstance(image, Path) else len(image)
        if size == 0:
            return "the file is empty (0 bytes)"
        # verify() checks structure (e.g. PNG checksums) but decodes nothing; the load
        # afterwards catches truncated pixel data. PIL needs a fresh open for each.
        with Image.open(image if isinstance(image, Path) else io.BytesIO(image)) as opened:
            check_pixel_count(opened)
            opened.verify()
        load_image(image, draft_size=_VERIFY_DRAFT_SIZE)
    except Exception as exc:  # whatever the decoder raises, the file is unusable
        return describe_load_error(exc)
    return None


def describe_load_error(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "the file does not exist"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file PIL can read (wrong extension, unsupported format or corrupt)"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too large, possibly a decompression bomb ({exc})"
    return f"corrupt or truncated ({type(exc).__name__}: {exc})"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _WIDE_GREY_MODES:
        return _wide_grey_to_rgb(image)
    if mode == "P":
        # A palette image may carry transparency in `info`; RGBA keeps it for compositing.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in _ALPHA_MODES:
        # White, not black: transparent product shots and logos are drawn for white pages,
        # and black fills would teach the model dark halos.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    # L, 1, YCbCr, HSV, LAB ...: PIL knows these conversions.
    return image.convert("RGB")


def _wide_grey_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = values.astype(np.float32) / 257.0  # 65535 -> 255 exactly
    else:
        scaled = _guess_range(values.astype(np.float64), image.mode)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _guess_range(values: np.ndarray, mode: str) -> np.ndarray:
    """Map an "I" (int32) or "F" (float32) image to 0..255.

    These modes carry no bit depth, so the value range decides: 0..1 floats, 8-bit or
    16-bit integers (older Pillow opens 16-bit PNGs as "I"), else min-max stretch.
    """
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F" and low >= 0.0 and high <= 1.0:
        return values * 255.0
    if low >= 0.0 and high <= 255.0:
        return values
    if low >= 0.0 and high <= 65535.0:
        return values / 257.0
    if high == low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    # PIL's built-in CMYK->RGB ignores ink profiles and looks washed out; when the file
    # embeds its profile (print files usually do), let littleCMS convert to sRGB.
    profile = image.info.get("icc_profile")
    if profile:
        try:
            converted = ImageCms.profileToProfile(
                image,
                ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                ImageCms.createProfile("sRGB"),
                outputMode="RGB",
            )
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile is not worth losing the image over
    return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is exactly `size`, keeping the aspect ratio."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size == image.size:
        return image
    # LANCZOS is sharpest when shrinking; when enlarging it rings, BICUBIC does not.
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return image.resize(new_size, resample=resample)


def crop_offsets(
    width: int, height: int, size: int, rng: np.random.Generator | None = None
) -> tuple[int, int]:
    """(left, top) of a `size` square inside a width x height image: centered, or
    uniformly random when `rng` is given."""
    if width < size or height < size:
        raise DataError(f"cannot crop {size}x{size} from a {width}x{height} image")
    if rng is None:
        return (width - size) // 2, (height - size) // 2
    return int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor [3, H, W] in [-1, 1]."""
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(pixels)) / 127.5 - 1.0


@dataclass(frozen=True)
class CropGeometry:
    """Where a training view came from, as SDXL is conditioned on it (its "micro-
    conditioning"): the image's size before resizing, the top-left corner of the crop in
    the resized image (in the flipped image when the view is flipped, as diffusers'
    SDXL scripts flip before cropping) and the view's size. Sizes are (height, width)."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    def time_ids(self) -> torch.Tensor:
        """SDXL's add_time_ids row: original_size + crops_coords_top_left + target_size."""
        return torch.tensor(
            [*self.original_size, *self.crop_top_left, *self.target_size], dtype=torch.float32
        )


class Geometry(NamedTuple):
    """Where a training view's pixels come from: scale the source to `resized` (w, h),
    take `box` (left, top, right, bottom) of it, then mirror when `flip`. One Geometry is
    applied to an image and to its loss mask alike, so the two stay aligned."""

    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool
    shrinks: bool  # the scale is < 1 (chooses the resampling filter)


def fit_geometry(
    source: tuple[int, int],
    target: tuple[int, int],
    *,
    center_crop: bool = True,
    flip: bool = False,
    crop_rng: np.random.Generator | None = None,
) -> Geometry:
    """Scale a `source` (w, h) image to cover `target` (w, h) keeping its aspect ratio, then
    crop `target` from it (centered, or uniformly random from `crop_rng` when not
    `center_crop`)."""
    width, height = source
    target_w, target_h = target
    scale = max(target_w / width, target_h / height)
    resized = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    extra_w, extra_h = resized[0] - target_w, resized[1] - target_h
    if center_crop or crop_rng is None:
        left, top = extra_w // 2, extra_h // 2
    else:
        left, top = int(crop_rng.integers(0, extra_w + 1)), int(crop_rng.integers(0, extra_h + 1))
    return Geometry(resized, (left, top, left + target_w, top + target_h), flip, scale < 1)


def apply_geometry(image: Image.Image, geometry: Geometry, *, mask: bool = False) -> Image.Image:
    """`image` resized, cropped and flipped as `geometry` says. Pictures: LANCZOS when
    shrinking (sharpest), BICUBIC when enlarging (LANCZOS rings). Masks (`mask`): BOX when
    shrinking, the area average of a coverage map, and BILINEAR when enlarging; neither
    overshoots, so a mask stays within its 0..255 range without clipping artefacts."""
    if geometry.resized != image.size:
        if mask:
            resample = Image.Resampling.BOX if geometry.shrinks else Image.Resampling.BILINEAR
        else:
            resample = Image.Resampling.LANCZOS if geometry.shrinks else Image.Resampling.BICUBIC
        image = image.resize(geometry.resized, resample=resample)
    if image.size != (geometry.box[2] - geometry.box[0], geometry.box[3] - geometry.box[1]):
        image = image.crop(geometry.box)
    if geometry.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def crop_geometry(source: tuple[int, int], geometry: Geometry) -> CropGeometry:
    """Where the view `geometry` cuts from a `source` (w, h) image came from, as SDXL is
    conditioned on it; a flipped view is told the corner of its crop in the flipped image."""
    left, top, right, bottom = geometry.box
    if geometry.flip:  # the same pixels, seen as a crop of the flipped image
        left = geometry.resized[0] - right
    return CropGeometry((source[1], source[0]), (top, left), (bottom - top, right - left))


def prepare_image(
    image: Image.Image,
    resolution: int,
    *,
    center_crop: bool = True,
    flip: bool = False,
    crop_rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Resize shorter side -> square crop (center, or random from `crop_rng`) -> flip -> tensor."""
    geometry = fit_geometry(
        image.size,
        (resolution, resolution),
        center_crop=center_crop,
        flip=flip,
        crop_rng=crop_rng,
    )
    return to_tensor(apply_geometry(image, geometry))
