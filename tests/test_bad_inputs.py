"""The bad-input corpus: inputs users get wrong, and the exact message each one gets.

Every case builds one bad (or merely unusual) input and calls the entry point a user would:
`load_records` / `ImageCaptionDataset` for data, `from_dict` / `load_config` for configs,
`Trainer` / `train` for runs, `personalize.load` for artifacts. A case either expects an
error whose message matches a pattern (naming the file or key at fault and what to do), or
checks that the input simply works and gives the right result (a CMYK photo becomes the
right RGB). docs/reliability.md lists every case; `python tests/test_bad_inputs.py` prints
its table from the messages the code gives today.
"""

from __future__ import annotations

import logging
import pathlib
import re
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import base_config
from helpers import ROOT
from PIL import Image
from safetensors.torch import save_file

from personalize import load
from personalize.config import ConfigError, from_dict, load_config
from personalize.data import DataError, ImageCaptionDataset, load_records, read_image
from personalize.inference import ArtifactError
from personalize.models import ModelLoadError, load_pipeline
from personalize.training.loop import TrainingError

TINY_VOCAB = 514  # personalize.testing's byte-level tokenizer: 512 byte tokens + 2 specials


# ------------------------------------------------------------------------------ the harness


@dataclass
class Env:
    """What a case may use: a fresh folder, the tiny model, 4 good images, a shared folder
    for things worth building once (a LoRA checkpoint), and fresh pipelines."""

    tmp: Path
    model: Path
    images: Path
    shared: Path
    pipes: list[Any] = field(default_factory=list)

    def folder(self, name: str = "data", good: int = 1) -> Path:
        """A folder holding `good` small valid images (good0.png ...)."""
        folder = self.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(good):
            Image.new("RGB", (8, 8), (10 * i, 100, 200)).save(folder / f"good{i}.png")
        return folder

    def config(self, **sections: Any) -> dict[str, Any]:
        return base_config(self.model, self.images, self.tmp / "run", **sections)

    def pipe(self):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(self.model, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        self.pipes.append(pipe)
        return pipe

    def lora_checkpoint(self) -> Path:
        """A real resumable checkpoint of a 1-step LoRA run (rank 4), built once."""
        from personalize import train

        out = self.shared / "lora-run"
        checkpoint = out / "checkpoints" / "step-000001"
        if not checkpoint.is_dir():
            train(
                from_dict(
                    base_config(
                        self.model, self.images, out, train={"max_steps": 1, "checkpoint_every": 1}
                    )
                )
            )
        return checkpoint


@dataclass
class Case:
    name: str
    what: str  # the input, as the docs table names it
    run: Callable[[Env], Any]
    raises: type[BaseException] | None = None
    message: str | None = None  # regex; "{tmp}" stands for the case's folder
    warns: str | None = None  # regex a WARNING log line must match
    outcome: str = ""  # for inputs that must work: what the right result is


CASES: list[Case] = []


def case(
    name: str,
    what: str,
    *,
    raises: type[BaseException] | None = None,
    message: str | None = None,
    warns: str | None = None,
    outcome: str = "",
):
    def register(fn: Callable[[Env], Any]) -> Callable[[Env], Any]:
        CASES.append(Case(name, what, fn, raises, message, warns, outcome))
        return fn

    return register


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_case(c: Case, env: Env) -> tuple[BaseException | None, list[str]]:
    """Run one case; return the exception it raised (or None) and the warnings logged."""
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(min(previous, logging.WARNING) if previous else logging.WARNING)
    try:
        c.run(env)
    except Exception as e:  # the caller decides whether it was the expected one
        return e, handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
    return None, handler.lines


def _pattern(c_pattern: str, env: Env) -> str:
    return c_pattern.replace("{tmp}", re.escape(str(env.tmp)))


# ------------------------------------------------------------------------------ helpers


def _noise_image(path: Path, size: int = 64) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _png_bomb(path: Path, width: int, height: int) -> Path:
    """A real decompression bomb: a 1-bit PNG whose all-zero rows deflate to almost nothing
    (15000 x 15000 = 225 million pixels in ~30 KB), written row by row in little memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def _one_item(folder: Path, resolution: int = 32, **kwargs) -> dict[str, Any]:
    records = load_records(folder, strict=True)
    return ImageCaptionDataset(records, resolution=resolution, instance_prompt="x", **kwargs)[0]


def _rgb(tensor: torch.Tensor, x: int = 0, y: int = 0) -> np.ndarray:
    """A [3, H, W] tensor in [-1, 1] back to 0..255 at (x, y)."""
    return ((tensor[:, y, x] + 1) * 127.5).round().numpy()


class _RunsCode:
    """A pickle payload: unpickling it calls Path.touch(marker), so a marker on disk proves
    that loading ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _refused_without_running(env: Env, path: Path, marker: Path) -> None:
    try:
        load(env.pipe(), path)
    finally:
        assert not marker.exists(), "the pickle's code ran"


# ------------------------------------------------------------------------------ images


@case(
    "truncated-png",
    "a PNG cut off halfway (strict)",
    raises=DataError,
    message=r"Cannot use image {tmp}/data/half\.png: corrupt or truncated \(.*\)\. "
    r"Fix or remove it, or set data\.strict=false",
)
def _(env):
    _cut_in_half(_noise_image(env.folder() / "half.png"))
    load_records(env.tmp / "data", strict=True)


@case(
    "truncated-jpeg",
    "a JPEG cut off halfway (default: skipped)",
    warns=r"Skipping: Cannot use image {tmp}/data/half\.jpg: corrupt or truncated",
    outcome="skipped with a warning naming it; the other images train",
)
def _(env):
    _cut_in_half(_noise_image(env.folder() / "half.jpg"))
    assert [r.key for r in load_records(env.tmp / "data")] == ["good0.png"]


@case(
    "zero-byte",
    "a 0-byte image file",
    raises=DataError,
    message=r"Cannot use image {tmp}/data/empty\.jpg: the file is empty \(0 bytes\)",
)
def _(env):
    (env.folder() / "empty.jpg").write_bytes(b"")
    load_records(env.tmp / "data", strict=True)


@case(
    "not-an-image",
    "a text file named .png",
    raises=DataError,
    message=r"Cannot use image {tmp}/data/notes\.png: not an image file PIL can read",
)
def _(env):
    (env.folder() / "notes.png").write_text("this is text")
    load_records(env.tmp / "data", strict=True)


@case(
    "decompression-bomb",
    "a 15000x15000 PNG of 30 KB (decompression bomb)",
    raises=DataError,
    message=r"Cannot use image {tmp}/data/bomb\.png: too large, possibly a decompression "
    r"bomb \(.*225000000 pixels.*limit of 178956970 pixels",
)
def _(env):
    _png_bomb(env.folder() / "bomb.png", 15000, 15000)
    load_records(env.tmp / "data", strict=True)


@case(
    "all-images-bad",
    "a folder where no image can be read",
    raises=DataError,
    message=r"None of the images in {tmp}/data could be read; see the warnings above",
    warns=r"Skipped 2 of 2 images in {tmp}/data",
)
def _(env):
    folder = env.folder(good=0)
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_text("no")
    load_records(folder)


@case("one-pixel", "a 1x1 image", outcome="trains as a uniform 32x32 image of its colour")
def _(env):
    folder = env.folder(good=0)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "dot.png")
    pixels = _one_item(folder)["pixel_values"]
    assert pixels.shape == (3, 32, 32)
    assert np.abs(_rgb(pixels, 16, 16) - (200, 10, 10)).max() <= 1


@case("extreme-aspect", "a 1x1000 image", outcome="resized and center-cropped to 32x32")
def _(env):
    folder = env.folder(good=0)
    Image.new("RGB", (1, 1000), (0, 0, 255)).save(folder / "line.png")
    assert _one_item(folder)["pixel_values"].shape == (3, 32, 32)


@case("cmyk", "a CMYK JPEG (print file)", outcome="converted to the right RGB (red stays red)")
def _(env):
    folder = env.folder(good=0)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(folder / "print.jpg", quality=100)
    rgb = np.asarray(read_image(load_records(folder, strict=True)[0]))
    assert np.abs(rgb[4, 4].astype(int) - (255, 0, 0)).max() <= 3


@case("16-bit", "a 16-bit greyscale PNG", outcome="scaled to 8 bits, not clipped (32896 -> 128)")
def _(env):
    folder = env.folder(good=0)
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(folder / "scan.png")
    assert Image.open(folder / "scan.png").mode == "I;16"
    rgb = np.asarray(read_image(load_records(folder, strict=True)[0]))
    assert rgb.shape == (8, 8, 3) and (rgb == 128).all()


@case(
    "palette-transparent",
    "a palette PNG with a transparent index",
    outcome="transparent pixels become white, opaque ones keep their colour",
)
def _(env):
    folder = env.folder(good=0)
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    image.paste(0, (0, 0, 4, 8))
    image.save(folder / "logo.png", transparency=1)
    rgb = np.asarray(read_image(load_records(folder, strict=True)[0]))
    assert tuple(rgb[0, 0]) == (0, 0, 255) and tuple(rgb[0, 7]) == (255, 255, 255)


@case(
    "rgba",
    "an RGBA PNG, half transparent",
    outcome="composited on white: (255, 0, 0, 128) -> (255, 127, 127)",
)
def _(env):
    folder = env.folder(good=0)
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(folder / "cut.png")
    rgb = np.asarray(read_image(load_records(folder, strict=True)[0]))
    assert np.abs(rgb[0, 0].astype(int) - (255, 127, 127)).max() <= 1


@case("grey", "a greyscale (L) JPEG", outcome="three equal channels")
def _(env):
    folder = env.folder(good=0)
    Image.new("L", (8, 8), 77).save(folder / "bw.jpg", quality=100)
    rgb = np.asarray(read_image(load_records(folder, strict=True)[0])).astype(int)
    assert rgb.shape == (8, 8, 3) and np.abs(rgb - 77).max() <= 1


@case(
    "exif-rotated",
    "a phone JPEG stored sideways with EXIF orientation 6",
    outcome="comes out upright (10x20, red on top)",
)
def _(env):
    folder = env.folder(good=0)
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    image.paste((0, 0, 255), (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(folder / "phone.jpg", exif=exif.tobytes(), quality=95)
    upright = read_image(load_records(folder, strict=True)[0])
    assert upright.size == (10, 20)
    assert upright.getpixel((5, 2))[0] > 200 and upright.getpixel((5, 17))[2] > 200


@case("wrong-extension", "a JPEG named .png", outcome="read by its content")
def _(env):
    folder = env.folder(good=0)
    Image.new("RGB", (8, 8), (0, 255, 0)).save(folder / "photo.png", format="JPEG")
    rgb = np.asarray(read_image(load_records(folder, strict=True)[0])).astype(int)
    assert np.abs(rgb[4, 4] - (0, 255, 0)).max() <= 3


@case("animated-gif", "an animated GIF", outcome="its first frame is used")
def _(env):
    folder = env.folder(good=0)
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    rgb = np.asarray(read_image(load_records(folder, strict=True)[0])).astype(int)
    assert np.abs(rgb[4, 4] - (255, 0, 0)).max() <= 3


@case(
    "macos-resource-fork",
    "macOS `._photo.jpg` files and a `.ipynb_checkpoints` folder",
    outcome="ignored: not training data, no warning",
)
def _(env):
    folder = env.folder()
    (folder / "._good0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (folder / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(folder / ".ipynb_checkpoints" / "good0-checkpoint.png")
    assert [r.key for r in load_records(folder, strict=True)] == ["good0.png"]


# ------------------------------------------------------------------------------ folders


@case(
    "duplicate-names",
    "`a/img.png` and `b/img.png`, each with its own caption",
    outcome="both kept, keys a/img.png and b/img.png, each with its own caption",
)
def _(env):
    folder = env.folder(good=0)
    for sub, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (folder / sub).mkdir()
        Image.new("RGB", (8, 8), colour).save(folder / sub / "img.png")
        (folder / sub / "img.txt").write_text(f"caption {sub}")
    records = load_records(folder, strict=True)
    assert [(r.key, r.caption) for r in records] == [
        ("a/img.png", "caption a"),
        ("b/img.png", "caption b"),
    ]
    assert tuple(np.asarray(read_image(records[1]))[0, 0]) == (0, 0, 255)


@case(
    "missing-folder",
    "data.path that does not exist",
    raises=DataError,
    message=r"Data path {tmp}/nope does not exist\. Point it at a folder of images, a "
    r"metadata\.jsonl/\.csv file",
)
def _(env):
    load_records(env.tmp / "nope")


@case(
    "empty-folder",
    "an empty data folder",
    raises=DataError,
    message=r"No images in {tmp}/data\. Accepted extensions: \.bmp, \.gif, \.jpeg, \.jpg, "
    r"\.png, \.tif, \.tiff, \.webp\.",
)
def _(env):
    load_records(env.folder(good=0))


@case(
    "unsupported-format",
    "a folder of .heic photos only",
    raises=DataError,
    message=r"No images in {tmp}/data\. Accepted extensions: .*; found only \.heic \(2\)\. "
    r"Convert the images to one of those formats\.",
)
def _(env):
    folder = env.folder(good=0)
    for name in ("a.heic", "b.heic"):
        (folder / name).write_bytes(b"\0")
    load_records(folder)


@case(
    "data-path-is-image",
    "data.path pointing at one image file",
    raises=DataError,
    message=r"Data path {tmp}/data/good0\.png is a file; it must be a folder of images",
)
def _(env):
    load_records(env.folder() / "good0.png")


@case(
    "metadata-missing-image",
    "metadata.jsonl naming an image that is not there",
    raises=DataError,
    message=r"Cannot use image {tmp}/data/gone\.png \(listed in metadata\.jsonl line 2\): "
    r"the file does not exist\. Fix or remove it",
)
def _(env):
    folder = env.folder()
    (folder / "metadata.jsonl").write_text(
        '{"file_name": "good0.png", "text": "a"}\n{"file_name": "gone.png", "text": "b"}\n'
    )
    load_records(folder, strict=True)


@case(
    "metadata-bad-json",
    "metadata.jsonl with a broken line",
    raises=DataError,
    message=r"{tmp}/data/metadata\.jsonl line 2 is not valid JSON \(.*\)\. Each line must be "
    r"one object",
)
def _(env):
    folder = env.folder()
    (folder / "metadata.jsonl").write_text(
        '{"file_name": "good0.png", "text": "a"}\n{"file_name": "good0.png", text: b}\n'
    )
    load_records(folder)


@case(
    "metadata-caption-column",
    "metadata.csv whose caption column is not `text`",
    raises=DataError,
    message=r"{tmp}/data/metadata\.csv has no caption column 'text' \(columns: caption, "
    r"file_name\)\. Set data\.caption_column",
)
def _(env):
    folder = env.folder()
    (folder / "metadata.csv").write_text("file_name,caption\ngood0.png,a red thing\n")
    load_records(folder)


# ------------------------------------------------------------------------------ captions


@case(
    "latin-1-caption",
    "a caption file in latin-1 (not UTF-8)",
    warns=r"Caption {tmp}/data/good0\.txt is not valid UTF-8; read it as latin-1",
    outcome="read as latin-1 ('café'), with a warning to re-save it as UTF-8",
)
def _(env):
    folder = env.folder()
    (folder / "good0.txt").write_bytes("un café noir".encode("latin-1"))
    assert load_records(folder, strict=True)[0].caption == "un café noir"


@case(
    "utf-16-caption",
    "a caption saved as UTF-16 by Windows Notepad",
    outcome="read as UTF-16 (its byte-order mark says so)",
)
def _(env):
    folder = env.folder()
    (folder / "good0.txt").write_bytes("a photo of sks, café".encode("utf-16"))
    assert load_records(folder, strict=True)[0].caption == "a photo of sks, café"


@case(
    "empty-caption",
    "an empty caption file and no data.prompt",
    raises=DataError,
    message=r"Image {tmp}/data/good0\.png has no caption\. Add a \.txt caption \(a good0\.txt "
    r"file next to it, .*\) or set data\.prompt",
)
def _(env):
    folder = env.folder()
    (folder / "good0.txt").write_text("  \n")
    ImageCaptionDataset(load_records(folder), resolution=8)


@case(
    "empty-caption-with-prompt",
    "an empty caption file with data.prompt set",
    outcome="the image is captioned with data.prompt",
)
def _(env):
    folder = env.folder()
    (folder / "good0.txt").write_text("")
    item = ImageCaptionDataset(load_records(folder), resolution=8, instance_prompt="sks dog")[0]
    assert item["caption"] == "sks dog"


@case(
    "long-caption",
    "a caption of more than 77 tokens",
    warns=r"caption of {tmp}/data/good0\.png is 172 tokens; truncated to 77",
    outcome="trains on the first 77 tokens, with a warning naming the image",
)
def _(env):
    from personalize.training.loop import Trainer

    folder = env.folder(good=2)
    (folder / "good0.txt").write_text("a very long caption, " * 10)
    (folder / "good1.txt").write_text("short")
    Trainer(from_dict(base_config(env.model, folder, env.tmp / "run")))


# ------------------------------------------------------------------------------ configs


def _cfg(**data: Any) -> Callable[[Env], Any]:
    return lambda env: from_dict(data)


case(
    "unknown-key",
    "`train.max_step` (typo)",
    raises=ConfigError,
    message=r"unknown config key\(s\): train\.max_step\. Valid keys under train: .*max_steps",
)(_cfg(train={"max_step": 10}))
case(
    "unknown-section",
    "a `lora2:` section",
    raises=ConfigError,
    message=r"unknown config key\(s\): lora2\. Valid keys: data, dreambooth, hypernetwork, lora",
)(_cfg(lora2={"rank": 4}))
case(
    "section-not-mapping",
    "`train: 5`",
    raises=ConfigError,
    message=r"train: expected a mapping of options, got 5",
)(_cfg(train=5))
case(
    "wrong-type-str",
    "`train.max_steps: ten`",
    raises=ConfigError,
    message=r"train\.max_steps: expected int, got 'ten' \(str\)",
)(_cfg(train={"max_steps": "ten"}))
case(
    "wrong-type-float",
    "`train.max_steps: 10.5`",
    raises=ConfigError,
    message=r"train\.max_steps: expected int, got 10\.5 \(float\)",
)(_cfg(train={"max_steps": 10.5}))
case(
    "wrong-type-bool",
    "`data.random_flip: yes please`",
    raises=ConfigError,
    message=r"data\.random_flip: expected bool, got 'yes please' \(str\)",
)(_cfg(data={"random_flip": "yes please"}))
case(
    "wrong-type-list",
    "`validation.prompts: a photo` (not a list)",
    raises=ConfigError,
    message=r"validation\.prompts: expected a list, got 'a photo'",
)(_cfg(validation={"prompts": "a photo"}))
case(
    "zero-steps",
    "`train.max_steps: 0`",
    raises=ConfigError,
    message=r"train\.max_steps: must be > 0, got 0",
)(_cfg(train={"max_steps": 0}))
case(
    "negative-steps",
    "`train.max_steps: -5`",
    raises=ConfigError,
    message=r"train\.max_steps: must be > 0, got -5",
)(_cfg(train={"max_steps": -5}))
case(
    "zero-lr",
    "`train.lr: 0`",
    raises=ConfigError,
    message=r"train\.lr: must be > 0 and finite, got 0\.0",
)(_cfg(train={"lr": 0}))
case(
    "negative-lr",
    "`train.lr: -1e-4`",
    raises=ConfigError,
    message=r"train\.lr: must be > 0 and finite, got -0\.0001",
)(_cfg(train={"lr": -1e-4}))
case(
    "infinite-lr",
    "`train.lr: .inf`",
    raises=ConfigError,
    message=r"train\.lr: must be > 0 and finite, got inf",
)(_cfg(train={"lr": float("inf")}))
case(
    "negative-text-encoder-lr",
    "`lora.text_encoder_lr: -1e-5`",
    raises=ConfigError,
    message=r"lora\.text_encoder_lr: must be > 0 and finite, or null for train\.lr",
)(_cfg(lora={"text_encoder_lr": -1e-5}))
case(
    "negative-warmup",
    "`train.lr_warmup_steps: -10`",
    raises=ConfigError,
    message=r"train\.lr_warmup_steps: must be >= 0 \(0 = no warm-up\), got -10",
)(_cfg(train={"lr_warmup_steps": -10}))
case(
    "unknown-method",
    "`method: lorra`",
    raises=ConfigError,
    message=r"method: must be one of dreambooth, hypernetwork, lora, textual_inversion, "
    r"got 'lorra'",
)(_cfg(method="lorra"))


@case(
    "invalid-yaml",
    "a YAML file with a bad indent",
    raises=ConfigError,
    message=r"{tmp}/cfg\.yaml is not valid YAML: .*line 3, column 2",
)
def _(env):
    (env.tmp / "cfg.yaml").write_text("train:\n  lr: 1e-4\n max_steps: 3\n")
    load_config(env.tmp / "cfg.yaml")


@case(
    "yaml-not-utf8",
    "a YAML file that is not UTF-8",
    raises=ConfigError,
    message=r"{tmp}/cfg\.yaml is not UTF-8 text \(byte 22 cannot be decoded\); re-save it as "
    r"UTF-8",
)
def _(env):
    (env.tmp / "cfg.yaml").write_bytes("data:\n  prompt: un café\n".encode("latin-1"))
    load_config(env.tmp / "cfg.yaml")


@case(
    "yaml-not-mapping",
    "a YAML file holding a list",
    raises=ConfigError,
    message=r"{tmp}/cfg\.yaml must hold a mapping of options at the top level",
)
def _(env):
    (env.tmp / "cfg.yaml").write_text("- lora\n- 500\n")
    load_config(env.tmp / "cfg.yaml")


@case(
    "missing-config",
    "a config file that does not exist",
    raises=ConfigError,
    message=r"config file {tmp}/nope\.yaml does not exist",
)
def _(env):
    load_config(env.tmp / "nope.yaml")


@case(
    "bad-override",
    "a command-line override without `=`",
    raises=ConfigError,
    message=r"override 'train\.lr' must look like key\.subkey=value",
)
def _(env):
    load_config(None, ["train.lr"])


# ------------------------------------------------------------------------------ models


@case(
    "model-not-diffusers",
    "model.path: a folder without model_index.json",
    raises=ModelLoadError,
    message=r"{tmp}/photos is not a diffusers Stable Diffusion folder \(no model_index\.json\)"
    r"\. Point model\.path at the folder that holds model_index\.json",
)
def _(env):
    env.folder("photos")
    load_pipeline(str(env.tmp / "photos"))


@case(
    "model-missing",
    "model.path that does not exist",
    raises=ModelLoadError,
    message=r"model path {tmp}/sd15 does not exist; set model\.path to a diffusers folder",
)
def _(env):
    load_pipeline(str(env.tmp / "sd15"))


@case(
    "model-incomplete",
    "a diffusers folder without its unet/",
    raises=ModelLoadError,
    message=r"{tmp}/model is incomplete: model_index\.json lists unet but the folder has no "
    r"unet/; copy or download the whole model folder again",
)
def _(env):
    import shutil

    shutil.copytree(env.model, env.tmp / "model", ignore=shutil.ignore_patterns("unet"))
    load_pipeline(str(env.tmp / "model"))


@case(
    "model-not-checkpoint",
    "model.path: a .bin file",
    raises=ModelLoadError,
    message=r"{tmp}/weights\.bin is a file but not a \.safetensors/\.ckpt checkpoint",
)
def _(env):
    (env.tmp / "weights.bin").write_bytes(b"\0" * 16)
    load_pipeline(str(env.tmp / "weights.bin"))


@case(
    "model-ckpt-runs-code",
    "a .ckpt model whose pickle would run code",
    raises=ModelLoadError,
    message=r"{tmp}/model\.ckpt is a pickle that torch\.load\(weights_only=True\) refuses "
    r"\(.*Unsupported global.*\); personalize never unpickles code",
    outcome="refused; the code did not run",
)
def _(env):
    marker = env.tmp / "code_ran"
    torch.save({"state_dict": {"w": _RunsCode(marker)}}, env.tmp / "model.ckpt")
    try:
        load_pipeline(str(env.tmp / "model.ckpt"))
    finally:
        assert not marker.exists()


# ------------------------------------------------------------------------------ runs


@case(
    "output-dir-holds-run",
    "output_dir of a finished run, no resume/overwrite",
    raises=FileExistsError,
    message=r"output_dir {tmp}/run already holds a run\. Set resume=latest to continue it, "
    r"overwrite=true to write over it, or choose another output_dir\.",
)
def _(env):
    from personalize import train

    (env.tmp / "run").mkdir()
    (env.tmp / "run" / "run.json").write_text('{"config": {}}')  # what every run writes
    (env.tmp / "run" / "pytorch_lora_weights.safetensors").write_bytes(b"its artifact")
    # No model at that path: the refusal must come first, before any loading.
    train(from_dict(base_config(env.tmp / "no-model", env.images, env.tmp / "run")))


@case(
    "output-dir-overwrite",
    "the same output_dir with `overwrite: true`",
    outcome="trains (1 step) and writes the new artifact",
)
def _(env):
    from personalize import train

    (env.tmp / "run").mkdir()
    (env.tmp / "run" / "run.json").write_text('{"config": {}}')
    out = train(from_dict(env.config(overwrite=True, train={"max_steps": 1})))
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@case(
    "output-dir-under-file",
    "output_dir inside a regular file",
    raises=PermissionError,
    message=r"output_dir {tmp}/notes\.txt/run cannot be created or written \(\[Errno 20\] Not "
    r"a directory.*\); choose another output_dir",
)
def _(env):
    from personalize import train

    (env.tmp / "notes.txt").write_text("a file, not a folder")
    # No model at that path: the output_dir error must come first, before any loading.
    train(from_dict(base_config(env.tmp / "no-model", env.images, env.tmp / "notes.txt" / "run")))


@case(
    "resume-not-checkpoint",
    "`resume:` a folder that is not a checkpoint",
    raises=FileNotFoundError,
    message=r"resume={tmp}/photos: not a complete checkpoint folder \(no state\.json\); use "
    r"'latest' or one of",
)
def _(env):
    from personalize import train

    train(from_dict(env.config(resume=str(env.folder("photos")), train={"max_steps": 1})))


@case(
    "resume-other-rank",
    "`resume:` a rank-4 LoRA checkpoint with `lora.rank: 8`",
    raises=TrainingError,
    message=r"checkpoint .*step-000001 does not fit this run \(lora\): checkpoint weights "
    r"have other shapes than this run's \(.*lora_A\.default\.weight "
    r"\[4, 32\] != \[8, 32\].*\); was it written with another config \(e\.g\. "
    r"lora\.rank\) or base model\?",
)
def _(env):
    from personalize import train

    train(
        from_dict(
            env.config(resume=str(env.lora_checkpoint()), lora={"rank": 8}, train={"max_steps": 2})
        )
    )


@case(
    "resume-other-method",
    "`resume:` a LoRA checkpoint in a hypernetwork run",
    raises=TrainingError,
    message=r"checkpoint .*step-000001 does not fit this run \(hypernetwork\): checkpoint "
    r"does not match this run's trainable weights \(missing: "
    r"\['unet\.personalize_hypernetworks.*unexpected: \['unet\..*lora_A.*\); was it "
    r"written by another method or config\?",
)
def _(env):
    from personalize import train

    train(
        from_dict(
            env.config(
                method="hypernetwork",
                resume=str(env.lora_checkpoint()),
                hn={"enable_sizes": [32, 64]},
                train={"max_steps": 2},
            )
        )
    )


# ------------------------------------------------------------------------------ artifacts


@case(
    "embedding-sd2",
    "an SD2 embedding (width 1024) into the SD1-style pipeline",
    raises=ArtifactError,
    message=r"{tmp}/sd2\.safetensors: embedding width 1024 \(SD 2\.x \(OpenCLIP ViT-H\)\) does "
    r"not fit this pipeline's text encoder width 32; it was made for another base model",
)
def _(env):
    save_file({"<sd2>": torch.randn(2, 1024)}, str(env.tmp / "sd2.safetensors"))
    load(env.pipe(), env.tmp / "sd2.safetensors")


@case(
    "embedding-sd2-webui",
    "an SD2 webui .pt embedding",
    raises=ArtifactError,
    message=r"{tmp}/style\.pt: embedding width 1024 .* does not fit this pipeline's text "
    r"encoder width 32",
)
def _(env):
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.randn(3, 1024)},
            "name": "style",
            "step": 100,
        },
        env.tmp / "style.pt",
    )
    load(env.pipe(), env.tmp / "style.pt")


@case(
    "embedding-sdxl",
    "an SDXL embedding (clip_l + clip_g) into the SD1-style pipeline",
    raises=ArtifactError,
    message=r"{tmp}/xl\.safetensors is an SDXL embedding \(clip_l 768 \+ clip_g 1280 wide\) "
    r"and this pipeline has one text encoder \(32\): load it into a StableDiffusionXLPipeline",
)
def _(env):
    save_file(
        {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)},
        str(env.tmp / "xl.safetensors"),
    )
    load(env.pipe(), env.tmp / "xl.safetensors")


@case(
    "lora-other-modules",
    "a kohya LoRA for modules this UNet lacks (SD1.5 down_blocks.2)",
    raises=ArtifactError,
    message=r"{tmp}/sd15\.safetensors does not fit this pipeline's UNet/text encoder: Target "
    r"modules .*down_blocks\.2\.attentions\.1.* not found in the base model.*It was "
    r"made for another base model; use a LoRA trained on this one\.",
)
def _(env):
    prefix = "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k"
    save_file(
        {
            f"{prefix}.lora_down.weight": torch.zeros(4, 768),
            f"{prefix}.lora_up.weight": torch.zeros(1280, 4),
            f"{prefix}.alpha": torch.tensor(4.0),
        },
        str(env.tmp / "sd15.safetensors"),
    )
    load(env.pipe(), env.tmp / "sd15.safetensors")


@case(
    "lora-wrong-shapes",
    "a LoRA for the right module names with SD1.5 widths",
    raises=ArtifactError,
    message=r"{tmp}/pytorch_lora_weights\.safetensors does not fit this pipeline's UNet/text "
    r"encoder: .*size mismatch .*attn2\.to_k\.lora_A.*torch\.Size\(\[4, 768\]\).*"
    r"torch\.Size\(\[4, 32\]\).*It was made for another base model",
)
def _(env):
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.zeros(4, 768),
            f"{prefix}.lora_B.weight": torch.zeros(320, 4),
        },
        str(env.tmp / "pytorch_lora_weights.safetensors"),
    )
    load(env.pipe(), env.tmp)


@case(
    "lora-sdxl-text-encoder",
    "an SDXL LoRA for the second text encoder only",
    raises=ArtifactError,
    message=r"{tmp}/xl_te2\.safetensors is an SDXL LoRA and this pipeline is SD 1\.x: a LoRA "
    r"loads only into the model family it was trained for",
)
def _(env):
    prefix = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    save_file(
        {
            f"{prefix}.lora_down.weight": torch.zeros(4, 1280),
            f"{prefix}.lora_up.weight": torch.zeros(1280, 4),
        },
        str(env.tmp / "xl_te2.safetensors"),
    )
    load(env.pipe(), env.tmp / "xl_te2.safetensors")


@case(
    "hypernetwork-widths",
    "an SD1 webui hypernetwork (widths 768, 320, 640, 1280)",
    raises=ArtifactError,
    message=r"{tmp}/anime\.pt: widths \[320, 640, 768, 1280\] have no attention layer of that "
    r"width in this UNet\. Its attention context widths are \[32, 64\] .*Use a "
    r"hypernetwork made for this base model\.",
)
def _(env):
    from personalize.adapters.hypernetwork import Hypernetwork, save_hypernetwork

    save_hypernetwork(Hypernetwork([768, 320, 640, 1280], name="anime"), env.tmp / "anime.pt")
    load(env.pipe(), env.tmp / "anime.pt")


@case(
    "embedding-pickle-runs-code",
    "a webui embedding .pt whose pickle would run code",
    raises=ArtifactError,
    message=r"{tmp}/evil\.pt cannot be loaded safely \(only tensors, numbers and strings are "
    r"unpickled\): .*Unsupported global",
    outcome="refused; the code did not run",
)
def _(env):
    marker = env.tmp / "code_ran"
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": _RunsCode(marker)},
            "name": "evil",
        },
        env.tmp / "evil.pt",
    )
    _refused_without_running(env, env.tmp / "evil.pt", marker)


@case(
    "hypernetwork-pickle-runs-code",
    "a webui hypernetwork .pt whose pickle would run code",
    raises=ArtifactError,
    message=r"{tmp}/evil\.pt: refused to load\. This pickle file asks to run code or build "
    r"objects that a hypernetwork never contains \(Unsupported global.*weights_only=True",
    outcome="refused; the code did not run",
)
def _(env):
    marker = env.tmp / "code_ran"
    torch.save({32: (_RunsCode(marker), {}), "layer_structure": [1, 2, 1]}, env.tmp / "evil.pt")
    _refused_without_running(env, env.tmp / "evil.pt", marker)


@case(
    "bin-pickle-runs-code",
    "a `learned_embeds.bin` whose pickle would run code",
    raises=ArtifactError,
    message=r"{tmp}/learned_embeds\.bin: refused to load: this pickle asks to run code "
    r"\(.*Unsupported global.*\)\. personalize reads pickles with "
    r"torch\.load\(weights_only=True\) only",
    outcome="refused; the code did not run",
)
def _(env):
    marker = env.tmp / "code_ran"
    torch.save({"<cat>": _RunsCode(marker)}, env.tmp / "learned_embeds.bin")
    _refused_without_running(env, env.tmp / "learned_embeds.bin", marker)


@case(
    "artifact-corrupt-safetensors",
    "a .safetensors file with a damaged header",
    raises=ArtifactError,
    message=r"{tmp}/lora\.safetensors is not a readable \.safetensors file \(damaged, or an "
    r"incomplete download\): .*\. Get the file again\.",
)
def _(env):
    (env.tmp / "lora.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    load(env.pipe(), env.tmp / "lora.safetensors")


@case(
    "artifact-truncated-safetensors",
    "a LoRA .safetensors cut off halfway",
    raises=ArtifactError,
    message=r"{tmp}/lora\.safetensors is not a readable \.safetensors file \(damaged, or an "
    r"incomplete download\)",
)
def _(env):
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.zeros(4, 32),
            f"{prefix}.lora_B.weight": torch.zeros(32, 4),
        },
        str(env.tmp / "lora.safetensors"),
    )
    _cut_in_half(env.tmp / "lora.safetensors")
    load(env.pipe(), env.tmp / "lora.safetensors")


@case(
    "artifact-empty",
    "a 0-byte artifact file",
    raises=ArtifactError,
    message=r"{tmp}/style\.pt is empty \(0 bytes\): an interrupted download or copy\? Get the "
    r"file again\.",
)
def _(env):
    (env.tmp / "style.pt").write_bytes(b"")
    load(env.pipe(), env.tmp / "style.pt")


@case(
    "artifact-garbage-pt",
    "a .pt file that is not a PyTorch file",
    raises=ArtifactError,
    message=r"{tmp}/model\.pt: not a readable PyTorch file \(damaged, or not written by "
    r"torch\.save\): Unsupported operand",
)
def _(env):
    (env.tmp / "model.pt").write_bytes(b"not a pickle at all")
    load(env.pipe(), env.tmp / "model.pt")


@case(
    "artifact-unknown",
    "a .safetensors of unrelated tensors",
    raises=ArtifactError,
    message=r"{tmp}/vae\.safetensors is not a learned artifact personalize knows: expected a "
    r"LoRA \(pytorch_lora_weights\.safetensors\), a Textual Inversion embedding, a "
    r"hypernetwork or a fine-tuned diffusers pipeline folder",
)
def _(env):
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(env.tmp / "vae.safetensors"))
    load(env.pipe(), env.tmp / "vae.safetensors")


@case(
    "artifact-missing",
    "`personalize.load` of a path that does not exist",
    raises=FileNotFoundError,
    message=r"artifact {tmp}/lora\.safetensors does not exist",
)
def _(env):
    load(env.pipe(), env.tmp / "lora.safetensors")


@case(
    "lr-scheduler-typo",
    "`train.lr_scheduler=cosin`",
    raises=ConfigError,
    message=r"train\.lr_scheduler: unknown scheduler 'cosin'; did you mean 'cosine'\? Valid: "
    r"linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup",
)
def _(env):
    from_dict(env.config(train={"lr_scheduler": "cosin"}))


@case(
    "negative-seed",
    "`seed=-1`",
    raises=ConfigError,
    message=r"seed: must be an integer in \[0, 2\*\*32\), got -1",
)
def _(env):
    from_dict(env.config(seed=-1))


@case(
    "adamw8bit-without-bitsandbytes",
    "`train.optimizer=adamw8bit` without bitsandbytes installed",
    raises=ConfigError,
    message=r"train\.optimizer: adamw8bit needs bitsandbytes, which is not installed: "
    r"pip install bitsandbytes",
)
def _(env):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    from_dict(env.config(train={"optimizer": "adamw8bit"}))


@case(
    "validation-split-without-loss",
    "`data.validation_split=0.2` without `validation.loss_every_steps`",
    raises=ConfigError,
    message=r"data\.validation_split=0\.2 holds out images for the validation loss, but "
    r"validation\.loss_every_steps is 0 \(off\)",
)
def _(env):
    from_dict(env.config(data={"validation_split": 0.2}))


@case(
    "early-stopping-without-validation",
    "`train.early_stopping_patience=3` without a validation split and loss",
    raises=ConfigError,
    message=r"train\.early_stopping_patience=3 needs the validation loss: set "
    r"validation\.loss_every_steps \(e\.g\. 50\) and data\.validation_split",
)
def _(env):
    from_dict(env.config(train={"early_stopping_patience": 3}))


@case(
    "heic-files",
    "iPhone `.heic` photos beside the images",
    warns=r"Ignored 2 file\(s\) in {tmp}/data that are not images this loader reads "
    r"\(\.heic\): IMG_1\.HEIC, IMG_2\.heic",
    outcome="the readable images train; one warning names the ignored files",
)
def _(env):
    folder = env.folder()
    (folder / "IMG_1.HEIC").write_bytes(b"not decodable here")
    (folder / "IMG_2.heic").write_bytes(b"not decodable here")
    assert [r.key for r in load_records(folder)] == ["good0.png"]


@case(
    "caption-without-image",
    "a caption file whose image is missing",
    warns=r"1 caption file\(s\) in {tmp}/data have no image of the same name and are not "
    r"used: gone\.txt",
    outcome="trains on the images; one warning names the orphan caption files",
)
def _(env):
    folder = env.folder()
    (folder / "gone.txt").write_text("a caption for a deleted photo")
    assert len(load_records(folder)) == 1


@case(
    "caption-other-case",
    "`good0.TXT` next to `good0.png`",
    warns=r"1 caption file\(s\) in {tmp}/data differ in upper/lower case from their image's "
    r"name \(good0\.TXT\)",
    outcome="read as the image's caption, with one warning",
)
def _(env):
    folder = env.folder()
    (folder / "good0.TXT").write_text("a photo of sks disc")
    assert load_records(folder)[0].caption == "a photo of sks disc"


# ------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-inputs-shared")


def _untouched(pipe) -> bool:
    """A failed load left nothing behind: no LoRA layers, token or hypernetwork."""
    from personalize.adapters.hypernetwork import STACK_ATTR

    return (
        not any("lora" in k for k in pipe.unet.state_dict())
        and len(pipe.tokenizer) == TINY_VOCAB
        and not hasattr(pipe.unet, STACK_ATTR)
    )


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(c: Case, tiny_model_dir, instance_dir, shared, tmp_path):
    env = Env(tmp_path, tiny_model_dir, instance_dir, shared)
    error, warnings = run_case(c, env)
    if c.raises is None:
        assert error is None, f"{c.name} must work, raised {error!r}"
    else:
        assert isinstance(error, c.raises), f"{c.name}: expected {c.raises.__name__}, got {error!r}"
        assert re.search(_pattern(c.message, env), str(error), re.DOTALL), str(error)
        assert "Traceback" not in str(error)
    if c.warns:
        assert any(re.search(_pattern(c.warns, env), w) for w in warnings), warnings
    for pipe in env.pipes:
        assert _untouched(pipe), f"{c.name}: a failed load changed the pipeline"


def test_the_pickle_payload_really_runs_code(tmp_path):
    """The "did not run" checks mean something: an unsafe load of the same payload runs it."""
    marker = tmp_path / "code_ran"
    torch.save({"<cat>": _RunsCode(marker)}, tmp_path / "evil.bin")
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert marker.exists()


def test_corpus_is_large_and_every_case_is_documented():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 30
    page = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    missing = [n for n in names if f"`{n}`" not in page]
    assert not missing, (
        f"docs/reliability.md lacks {missing}; regenerate its table with "
        "`python tests/test_bad_inputs.py`"
    )


def test_the_cli_prints_the_message_not_a_traceback(tiny_model_dir, instance_dir, tmp_path, capsys):
    """The same messages reach a command-line user as one `error:` line and exit code 2."""
    from personalize.cli import main

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_bytes("data:\n  prompt: un café\n".encode("latin-1"))
    no_data = tmp_path / "no_data.yaml"
    no_data.write_text(
        yaml.safe_dump(base_config(tiny_model_dir, tmp_path / "nope", tmp_path / "run"))
    )
    evil = tmp_path / "evil.bin"
    marker = tmp_path / "code_ran"
    torch.save({"<cat>": _RunsCode(marker)}, evil)
    runs = [
        (["train", str(bad_yaml)], "is not UTF-8 text"),
        (["train", str(no_data)], "does not exist. Point it at a folder of images"),
        (
            [
                "sample",
                "--model",
                str(tiny_model_dir),
                "--load",
                str(evil),
                "--prompt",
                "a cat",
                "--out",
                str(tmp_path / "samples"),
            ],
            "refused to load",
        ),
    ]
    for argv, expected in runs:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "error: " in err and expected in err and "Traceback" not in err, err
    assert not marker.exists()


# ------------------------------------------------------------------------------ the docs table


def _markdown_table() -> str:
    """Run every case on a fresh tiny model; one table row per case with the real message."""
    from personalize.testing import save_tiny_pipeline, write_synthetic_images

    logging.disable(logging.NOTSET)
    with tempfile.TemporaryDirectory() as top:
        top_path = Path(top)
        model = save_tiny_pipeline(top_path / "model")
        images = top_path / "images"
        write_synthetic_images(images, count=4)
        rows = ["| case | input | what the user gets |", "|---|---|---|"]
        for i, c in enumerate(CASES):
            tmp = top_path / f"case-{i}"
            tmp.mkdir()
            env = Env(tmp, model, images, top_path / "shared")
            env.shared.mkdir(exist_ok=True)
            error, warnings = run_case(c, env)
            if error is not None:
                text = f"{type(error).__name__}: {error}"
            else:
                text = f"works: {c.outcome}"
                if c.warns:
                    text += " — warning: " + next(
                        w for w in warnings if re.search(_pattern(c.warns, env), w)
                    )
            text = text.replace(str(tmp), "<dir>").replace(str(model), "<model>")
            text = " ".join(text.split())
            text = text if len(text) <= 400 else text[:397] + "..."
            rows.append(f"| `{c.name}` | {c.what} | {text.replace('|', '&#124;')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(_markdown_table())
