"""Dataset loader: layouts, captions, image modes, bad files, augmentation determinism."""

from __future__ import annotations

import json
import logging
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.data import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageCaptionDataset,
    Record,
    load_records,
    read_image,
    split_records,
)
from personalize.data.transforms import load_image, prepare_image, resize_shorter_side

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def save(path: Path, size=(8, 8), color=RED, mode="RGB", **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **kwargs)
    return path


def gradient(path: Path, size=(24, 16)) -> Path:
    """An image whose every column differs, so crops and flips show in the pixels."""
    width, height = size
    row = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.stack([np.tile(row, (height, 1))] * 3, axis=-1)
    pixels[..., 1] = np.arange(height, dtype=np.uint8)[:, None] * 10
    Image.fromarray(pixels).save(path)
    return path


def warnings_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# --- layouts and captions -------------------------------------------------------------


def test_folder_with_sidecar_captions(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a red square \n", encoding="utf-8")
    save(tmp_path / "c.PNG")
    (tmp_path / "c.txt").write_text("   \n", encoding="utf-8")  # empty caption -> None
    save(tmp_path / "sub" / "b.jpg", color=BLUE)
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "._a.png").write_bytes(b"macOS resource fork, not a PNG")
    save(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")

    records = load_records(tmp_path, strict=True)

    assert [r.key for r in records] == ["a.png", "c.PNG", "sub/b.jpg"]
    assert [r.caption for r in records] == ["a red square", None, None]
    assert records[2].image_path == tmp_path / "sub" / "b.jpg"
    dataset = ImageCaptionDataset(records, resolution=16, instance_prompt="a photo of sks")
    items = [dataset[i] for i in range(len(dataset))]
    assert [item["caption"] for item in items] == [
        "a red square",
        "a photo of sks",
        "a photo of sks",
    ]
    assert [item["key"] for item in items] == ["a.png", "c.PNG", "sub/b.jpg"]
    for item in items:
        pixels = item["pixel_values"]
        assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert torch.allclose(items[0]["pixel_values"][0], torch.ones(16, 16))  # red stays red
    assert torch.allclose(items[0]["pixel_values"][2], -torch.ones(16, 16))


def test_missing_caption_without_prompt_names_the_image(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("captioned")
    save(tmp_path / "b.png")
    records = load_records(tmp_path)
    with pytest.raises(DataError, match=r"b\.png.*no caption.*b\.txt.*data\.prompt"):
        ImageCaptionDataset(records, resolution=8)


def test_custom_caption_extension_and_latin1_fallback(tmp_path, caplog):
    save(tmp_path / "a.png")
    (tmp_path / "a.caption").write_bytes("café au lait".encode("latin-1"))
    (tmp_path / "a.txt").write_text("ignored")
    records = load_records(tmp_path, caption_extension="caption")
    assert records[0].caption == "café au lait"
    assert "a.caption" in warnings_text(caplog) and "UTF-8" in warnings_text(caplog)


def test_metadata_jsonl_in_folder_and_as_file(tmp_path, caplog):
    save(tmp_path / "imgs" / "a.png")
    save(tmp_path / "imgs" / "b.png", color=BLUE)
    save(tmp_path / "imgs" / "unlisted.png")
    (tmp_path / "imgs" / "a.txt").write_text("sidecars are ignored when metadata exists")
    rows = [{"file_name": "imgs/b.png", "text": "a blue one"}, {"file_name": "imgs/a.png"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")

    from_folder = load_records(tmp_path, strict=True)
    from_file = load_records(tmp_path / "metadata.jsonl", strict=True)

    assert from_folder == from_file  # same keys, paths and captions
    assert [(r.key, r.caption) for r in from_folder] == [
        ("imgs/b.png", "a blue one"),
        ("imgs/a.png", None),
    ]
    assert from_folder[0].image_path == tmp_path / "imgs" / "b.png"
    assert "unlisted.png" in warnings_text(caplog)


def test_metadata_csv_with_caption_column(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text(
        'file_name,caption\na.png,"sks dog, sitting"\nb.png,\n', encoding="utf-8"
    )
    records = load_records(tmp_path, caption_column="caption")
    assert [(r.key, r.caption) for r in records] == [("a.png", "sks dog, sitting"), ("b.png", None)]
    # The default column `text` is absent: a typo must not silently drop every caption.
    with pytest.raises(DataError, match=r"metadata\.csv.*'text'.*caption_column"):
        load_records(tmp_path)
    assert [r.caption for r in load_records(tmp_path, caption_column="")] == [None, None]


def test_metadata_bad_json_and_duplicates(tmp_path):
    save(tmp_path / "a.png")
    meta = tmp_path / "metadata.jsonl"
    meta.write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png"\n')
    with pytest.raises(DataError, match=r"metadata\.jsonl line 2 is not valid JSON"):
        load_records(tmp_path)
    meta.write_text('{"file_name": "a.png"}\n{"file_name": "./a.png"}\n')
    with pytest.raises(DataError, match=r"twice \(lines 1 and 2\)"):
        load_records(tmp_path)


def test_metadata_row_with_missing_file(tmp_path, caplog):
    save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "here"}\n{"file_name": "gone.png", "text": "not"}\n'
    )
    with pytest.raises(
        DataError, match=r"gone\.png \(listed in metadata\.jsonl line 2\).*not exist"
    ):
        load_records(tmp_path, strict=True)
    records = load_records(tmp_path)
    assert [r.key for r in records] == ["a.png"]
    assert "gone.png" in warnings_text(caplog)


def test_saved_datasets_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (12, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    table = datasets.Dataset.from_dict({"image": images, "text": ["a red one", None]})
    table = table.cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "dd"))

    records = load_records(tmp_path / "ds", strict=True)
    assert [(r.key, r.image_path, r.caption) for r in records] == [
        ("row-0", None, "a red one"),
        ("row-1", None, None),
    ]
    assert load_records(tmp_path / "dd") == records
    # Records travel to DataLoader workers by pickle; the dataset must come along lazily.
    restored = pickle.loads(pickle.dumps(records))
    assert read_image(restored[1]).getpixel((0, 0)) == BLUE

    dataset = ImageCaptionDataset(restored, resolution=8, instance_prompt="sks")
    first, second = dataset[0], dataset[1]
    assert (first["caption"], second["caption"]) == ("a red one", "sks")
    assert first["pixel_values"].shape == (3, 8, 8)
    assert torch.allclose(second["pixel_values"][2], torch.ones(8, 8))


def test_saved_dataset_with_wrong_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"picture": [Image.new("RGB", (4, 4))], "text": ["x"]})
    table.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"no image column 'image'.*picture"):
        load_records(tmp_path / "ds")
    assert load_records(tmp_path / "ds", image_column="picture")[0].caption == "x"


# --- the Dataset ----------------------------------------------------------------------


def two_records(tmp_path: Path) -> list[Record]:
    for name, caption in (("a", "sks, dog, red, grass, sunny, park, tree"), ("b", "sks, cat")):
        gradient(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(caption)
    return load_records(tmp_path)


def test_repeats(tmp_path):
    dataset = ImageCaptionDataset(two_records(tmp_path), resolution=8, repeats=3)
    assert len(dataset) == 6
    assert [dataset[i]["key"] for i in range(6)] == ["a.png", "b.png"] * 3
    assert dataset[-1]["key"] == "b.png"
    with pytest.raises(IndexError):
        dataset[6]


def test_caption_dropout_then_caption_fn(tmp_path):
    records = two_records(tmp_path)
    dropped = ImageCaptionDataset(records, resolution=8, caption_dropout=1.0, repeats=4)
    assert {dropped[i]["caption"] for i in range(len(dropped))} == {""}
    wrapped = ImageCaptionDataset(
        records, resolution=8, caption_dropout=1.0, caption_fn=lambda c: f"<{c}>"
    )
    assert wrapped[0]["caption"] == "<>"
    kept = ImageCaptionDataset(records, resolution=8, caption_fn=str.upper)
    assert kept[1]["caption"] == "SKS, CAT"


def test_tag_shuffle_keeps_first_tokens(tmp_path):
    records = two_records(tmp_path)[:1]
    original = records[0].caption.split(", ")
    dataset = ImageCaptionDataset(
        records, resolution=8, shuffle_tags=True, keep_tokens=2, repeats=12
    )
    captions = [dataset[i]["caption"] for i in range(len(dataset))]
    for caption in captions:
        tags = caption.split(", ")
        assert tags[:2] == ["sks", "dog"]
        assert sorted(tags) == sorted(original)
    assert len(set(captions)) > 3  # actually shuffled
    again = ImageCaptionDataset(records, resolution=8, shuffle_tags=True, keep_tokens=2, repeats=12)
    assert [again[i]["caption"] for i in range(len(again))] == captions


def snapshot(dataset: ImageCaptionDataset) -> list[torch.Tensor]:
    return [dataset[i]["pixel_values"] for i in range(len(dataset))]


def test_augmentation_depends_only_on_seed_epoch_index(tmp_path):
    records = two_records(tmp_path)
    options = dict(resolution=8, center_crop=False, random_flip=True, repeats=6)
    first = ImageCaptionDataset(records, seed=3, **options)
    second = ImageCaptionDataset(records, seed=3, **options)

    epoch0 = snapshot(first)
    random.seed(99)  # global RNG state must not matter
    np.random.seed(99)
    torch.manual_seed(99)
    assert all(torch.equal(a, b) for a, b in zip(epoch0, snapshot(second), strict=True))
    # Repeats of one image get different crops/flips within the epoch.
    assert len({tuple(t.flatten().tolist()) for t in epoch0[::2]}) > 1

    first.set_epoch(1)
    epoch1 = snapshot(first)
    assert any(not torch.equal(a, b) for a, b in zip(epoch0, epoch1, strict=True))
    first.set_epoch(0)  # e.g. a resumed run replaying epoch 0
    assert all(torch.equal(a, b) for a, b in zip(epoch0, snapshot(first), strict=True))
    other_seed = ImageCaptionDataset(records, seed=4, **options)
    assert any(not torch.equal(a, b) for a, b in zip(epoch0, snapshot(other_seed), strict=True))


def test_center_crop_is_centered_and_deterministic(tmp_path):
    records = two_records(tmp_path)
    dataset = ImageCaptionDataset(records, resolution=8, center_crop=True, repeats=3)
    dataset.set_epoch(5)
    assert all(torch.equal(t, snapshot(dataset)[0]) for t in snapshot(dataset)[::2])
    # A 12x8 image at resolution 8 needs no resize; the crop starts at column 2.
    columns = np.tile(np.arange(12, dtype=np.uint8) * 20, (8, 1))
    image = Image.fromarray(np.stack([columns] * 3, axis=-1))
    pixels = prepare_image(image, 8)
    assert torch.allclose(pixels[0, 0], torch.tensor(columns[0, 2:10] / 127.5 - 1.0).float())
    flipped = prepare_image(image, 8, flip=True)
    assert torch.equal(flipped, pixels.flip(-1))


def test_resize_shorter_side_keeps_aspect():
    assert resize_shorter_side(Image.new("RGB", (300, 200)), 64).size == (96, 64)
    assert resize_shorter_side(Image.new("RGB", (10, 30)), 64).size == (64, 192)


def test_set_epoch_reaches_persistent_workers(tmp_path):
    records = two_records(tmp_path)
    dataset = ImageCaptionDataset(
        records, resolution=8, center_crop=False, random_flip=True, repeats=4
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=1, persistent_workers=True
    )
    seen = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        seen.append([item["pixel_values"] for item in loader])
    dataset.set_epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(seen[1], snapshot(dataset), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(seen[0], seen[1], strict=True))


# --- image modes and orientation ------------------------------------------------------


def test_exif_rotated_image_comes_out_upright(tmp_path):
    image = Image.new("RGB", (20, 10), RED)
    image.paste(BLUE, (10, 0, 20, 10))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)

    upright = load_image(tmp_path / "phone.jpg")
    assert upright.size == (10, 20)
    top, bottom = upright.getpixel((5, 2)), upright.getpixel((5, 17))
    assert top[0] > 200 and top[2] < 50  # red ends up on top
    assert bottom[2] > 200 and bottom[0] < 50
    record = load_records(tmp_path, strict=True)[0]
    assert read_image(record).size == (10, 20)


@pytest.mark.parametrize(
    ("mode", "value", "suffix", "expected"),
    [
        ("RGBA", (255, 0, 0, 0), ".png", (255, 255, 255)),  # transparent -> white
        ("RGBA", (255, 0, 0, 255), ".png", (255, 0, 0)),
        ("LA", (0, 128), ".png", (127, 127, 127)),  # half-transparent black over white
        ("P", None, ".png", (255, 255, 255)),  # palette with a transparent index
        ("L", 77, ".png", (77, 77, 77)),
        ("1", 1, ".png", (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), ".jpg", (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), ".tif", (255, 0, 0)),
        ("I;16", 65535, ".png", (255, 255, 255)),  # 16-bit scaled, not clipped
        ("I;16", 32896, ".png", (128, 128, 128)),
        ("I", 40000, ".tif", (156, 156, 156)),
        ("F", 0.5, ".tif", (128, 128, 128)),
    ],
)
def test_image_modes_become_rgb(tmp_path, mode, value, suffix, expected):
    path = tmp_path / f"image{suffix}"
    if mode == "P":
        image = Image.new("P", (8, 8), 1)
        image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        image.save(path, transparency=1)
    else:
        save(path, mode=mode, color=value)
    with Image.open(path) as stored:
        assert stored.mode == mode  # the file really holds that mode

    rgb = load_image(path)
    assert rgb.mode == "RGB"
    assert np.abs(np.asarray(rgb)[0, 0].astype(int) - expected).max() <= 2
    record = load_records(tmp_path, strict=True)[0]
    pixels = ImageCaptionDataset([record], resolution=8, instance_prompt="x")[0]["pixel_values"]
    assert pixels.shape == (3, 8, 8) and -1.0 <= pixels.min() <= pixels.max() <= 1.0


# --- bad inputs -----------------------------------------------------------------------


def write_bad_file(tmp_path: Path, kind: str) -> tuple[str, str]:
    """Create one bad file next to a good one; return (its name, expected reason)."""
    save(tmp_path / "good.png")
    if kind == "truncated_png":
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "full.png")
        data = (tmp_path / "full.png").read_bytes()
        (tmp_path / "full.png").unlink()
        (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
        return "truncated.png", "corrupt or truncated"
    if kind == "truncated_jpg":
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "full.jpg")
        data = (tmp_path / "full.jpg").read_bytes()
        (tmp_path / "full.jpg").unlink()
        (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
        return "truncated.jpg", "corrupt or truncated"
    if kind == "zero_bytes":
        (tmp_path / "empty.png").write_bytes(b"")
        return "empty.png", "empty (0 bytes)"
    (tmp_path / "notes.png").write_text("this is text, not a PNG")
    return "notes.png", "not an image file"


@pytest.mark.parametrize("kind", ["truncated_png", "truncated_jpg", "zero_bytes", "text_as_png"])
def test_bad_image_strict_raises_naming_the_file(tmp_path, kind):
    name, reason = write_bad_file(tmp_path, kind)
    with pytest.raises(DataError) as caught:
        load_records(tmp_path, strict=True)
    message = str(caught.value)
    assert str(tmp_path / name) in message and reason in message
    assert "data.strict=false" in message  # the key a CLI user types


@pytest.mark.parametrize("kind", ["truncated_png", "truncated_jpg", "zero_bytes", "text_as_png"])
def test_bad_image_lenient_skips_with_warning(tmp_path, caplog, kind):
    name, reason = write_bad_file(tmp_path, kind)
    records = load_records(tmp_path)
    assert [r.key for r in records] == ["good.png"]
    text = warnings_text(caplog)
    assert str(tmp_path / name) in text and reason in text
    assert "Skipped 1 of 2" in text


def test_decompression_bomb_is_reported_not_raised(tmp_path, monkeypatch, caplog):
    save(tmp_path / "small.png", size=(4, 4))
    save(tmp_path / "huge.png", size=(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 pixels: warning territory
    assert [r.key for r in load_records(tmp_path)] == ["small.png"]
    assert "huge.png" in warnings_text(caplog) and "decompression bomb" in warnings_text(caplog)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 400 pixels: PIL's own error
    with pytest.raises(DataError, match=r"huge\.png.*decompression bomb"):
        load_records(tmp_path, strict=True)


def test_all_images_bad(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="None of the images"):
        load_records(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"nope.*does not exist"):
        load_records(tmp_path / "nope")


def test_folder_without_images_lists_extensions(tmp_path):
    (tmp_path / "photo.heic").write_bytes(b"\0")
    (tmp_path / "photo.txt").write_text("a caption without an image")
    with pytest.raises(DataError) as caught:
        load_records(tmp_path)
    message = str(caught.value)
    assert f"No images in {tmp_path}" in message
    assert all(ext in message for ext in IMAGE_EXTENSIONS)
    assert ".heic (1)" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"Accepted extensions: \.bmp"):
        load_records(empty)


# --- train / validation split ---------------------------------------------------------


def fake_records(count: int) -> list[Record]:
    return [Record(f"img{i:02d}.png", Path(f"img{i:02d}.png"), None) for i in range(count)]


def test_split_records_sizes_and_determinism():
    records = fake_records(10)
    train, validation = split_records(records, 0.2, seed=0)
    assert (len(train), len(validation)) == (8, 2)
    assert sorted(train + validation, key=lambda r: r.key) == records
    assert [r.key for r in train] == sorted(r.key for r in train)  # input order kept
    assert split_records(records, 0.2, seed=0) == (train, validation)
    assert split_records(records[::-1], 0.2, seed=0)[1] == validation[::-1]  # order-free
    assert any(split_records(records, 0.2, seed=s)[1] != validation for s in range(1, 6))


def test_split_records_edges():
    records = fake_records(3)
    assert split_records(records, 0.0, seed=0) == (records, [])
    assert len(split_records(records[:2], 0.01, seed=0)[1]) == 1  # at least one
    assert len(split_records(records, 0.9, seed=0)[0]) == 1  # never all
    assert split_records(records[:1], 0.5, seed=0) == (records[:1], [])
    with pytest.raises(DataError, match="validation_split"):
        split_records(records, 1.0, seed=0)
