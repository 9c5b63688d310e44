"""Several concepts in one run: data.concepts, kohya `<repeats>_<prompt>` folders, the
per-concept balance of an epoch (sharded over processes and bucketed), captions and class
images per concept, evaluation per concept, and the errors that name a concept."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.data_loader import BatchSamplerShard
from conftest import base_config
from helpers import ROOT, launch_two_processes

from personalize import train
from personalize.config import ConfigError, from_dict
from personalize.data import DataError, ImageCaptionDataset, load_records
from personalize.data.buckets import BucketBatchSampler
from personalize.data.concepts import (
    Concept,
    epoch_order,
    kohya_folders,
    parse_kohya_name,
    resolve_concepts,
)
from personalize.methods.class_images import MANIFEST
from personalize.methods.prior import PriorPairedDataset
from personalize.testing import write_synthetic_images
from personalize.training.data import EpochSampler


def _two_concepts(root: Path) -> tuple[Path, Path]:
    """5 images of one subject without captions, 1 of another with a caption file."""
    big, small = root / "disc", root / "cat"
    write_synthetic_images(big, count=5)
    write_synthetic_images(small, count=1, seed=3, caption="ohwx cat, sitting, indoors")
    return big, small


def _concepts_cfg(tmp_path: Path, model: Path, **data) -> dict:
    big, small = _two_concepts(tmp_path / "data")
    cfg = base_config(model, big, tmp_path / "out", train={"max_steps": 3, "batch_size": 2})
    cfg["data"] = {
        "concepts": [
            {"path": str(big), "prompt": "a photo of sks disc", "repeats": 1},
            {"path": str(small), "prompt": "a photo of ohwx cat", "shuffle_tags": True},
        ],
        **data,
    }
    return cfg


# ------------------------------------------------------------------------------ kohya names


def test_kohya_folder_names_give_repeats_and_prompt():
    assert parse_kohya_name("10_sks dog") == (10, "sks dog")
    # kohya splits at the first "_" only: the prompt keeps its own underscores.
    assert parse_kohya_name("3_my_dog") == (3, "my_dog")
    assert parse_kohya_name("1_") == (1, None)
    for bad in ("sks dog", "x_dog", "10dog", "-1_dog"):
        with pytest.raises(DataError, match=f"{bad!r} is not named <repeats>_<prompt>"):
            parse_kohya_name(bad)
    with pytest.raises(DataError, match="'0_dog' has 0 repeats"):
        parse_kohya_name("0_dog")


def test_kohya_layout_is_read_as_concepts(tmp_path):
    train_dir = tmp_path / "train"
    write_synthetic_images(train_dir / "10_sks dog", count=2)
    write_synthetic_images(train_dir / "2_ohwx cat", count=1, caption="ohwx cat on a mat")
    (train_dir / ".cache").mkdir()  # hidden: not a concept
    cfg = from_dict(base_config(Path("m"), train_dir, tmp_path / "out"))
    concepts = resolve_concepts(cfg)
    assert [(c.name, c.repeats, c.prompt) for c in concepts] == [
        ("10_sks dog", 10, "sks dog"),
        ("2_ohwx cat", 2, "ohwx cat"),
    ]
    # The folder's prompt captions the images without a caption file, as in kohya.
    records = load_records(concepts[1].path)
    assert records[0].caption == "ohwx cat on a mat"
    dataset = ImageCaptionDataset(
        load_records(concepts[0].path), resolution=32, concepts=[concepts[0]]
    )
    assert dataset[0]["caption"] == "sks dog"
    # An ordinary folder (images of its own) is one concept: the data section's.
    plain = from_dict(base_config(Path("m"), train_dir / "10_sks dog", tmp_path / "out"))
    assert kohya_folders(train_dir / "10_sks dog") is None
    (single,) = resolve_concepts(plain)
    assert (single.prompt, single.repeats) == ("a photo of sks disc", 1)
    # A sibling that is not named <repeats>_<prompt> is an error naming it.
    write_synthetic_images(train_dir / "extras", count=1)
    with pytest.raises(DataError, match="'extras' is not named <repeats>_<prompt>"):
        resolve_concepts(cfg)


# ------------------------------------------------------------------------------ the epoch


def test_epoch_counts_follow_repeats_or_equal_balance():
    counts = [5, 1]
    by_repeats = Counter(epoch_order(counts, [1, 1], "repeats"))
    assert sum(by_repeats[j] for j in range(5)) == 5 and by_repeats[5] == 1
    equal = Counter(epoch_order(counts, [1, 1], "equal"))
    assert sum(equal[j] for j in range(5)) == 5 and equal[5] == 5  # the 1 image 5 times
    # Repeats: images x repeats per concept; equal: every concept as many as the largest.
    order = epoch_order([5, 2], [2, 3], "repeats")
    assert len(order) == 16 and Counter(order)[5] == 3 and Counter(order)[0] == 2
    equal = Counter(epoch_order([200, 5], [1, 1], "equal"))
    assert sum(equal[j] for j in range(200)) == sum(equal[j] for j in range(200, 205)) == 200
    assert {equal[j] for j in range(200, 205)} == {40}
    # One concept: image j at j, j + n, ..., exactly the single-folder dataset's indices.
    assert epoch_order([3], [2]) == [0, 1, 2, 0, 1, 2]


def _concept_dataset(tmp_path: Path, balance: str) -> ImageCaptionDataset:
    big, small = _two_concepts(tmp_path)
    concepts = [
        Concept("disc", big, "a photo of sks disc"),
        Concept("cat", small, "a photo of ohwx cat", shuffle_tags=True, keep_tokens=1),
    ]
    records = load_records(big) + load_records(small)
    return ImageCaptionDataset(
        records,
        resolution=32,
        concepts=concepts,
        concept_of=[0] * 5 + [1],
        order=epoch_order([5, 1], [1, 1], balance),
    )


def test_each_concept_keeps_its_own_captions(tmp_path):
    dataset = _concept_dataset(tmp_path, "equal")
    captions = [dataset[i]["caption"] for i in range(len(dataset))]
    assert captions[:5] == ["a photo of sks disc"] * 5  # no caption files: its prompt
    cat = captions[5:]
    # Its caption file, tags shuffled after the first (keep_tokens 1), only for this concept.
    assert all(c.startswith("ohwx cat, ") for c in cat)
    assert {frozenset(c.split(", ")) for c in cat} == {
        frozenset({"ohwx cat", "sitting", "indoors"})
    }
    assert len(set(cat)) > 1


@pytest.mark.parametrize("balance", ["repeats", "equal"])
def test_two_processes_share_the_epoch_without_duplicates(tmp_path, balance):
    """accelerate's BatchSamplerShard over the plain and the bucket sampler: the ranks'
    shares are disjoint and together are the epoch, so each concept gets its count."""
    dataset = _concept_dataset(tmp_path, balance)
    expected = Counter(dataset.record_index(i) for i in range(len(dataset)))
    plain = torch.utils.data.BatchSampler(EpochSampler(len(dataset), seed=1), 1, False)
    buckets = BucketBatchSampler([(32, 32)] * len(dataset), 2, seed=1, num_processes=2)
    for sampler in (plain, buckets):
        shares = [
            [i for batch in BatchSamplerShard(sampler, 2, rank) for i in batch] for rank in (0, 1)
        ]
        assert len(shares[0]) == len(shares[1])
        if sampler is plain:  # the bucket sampler tops a bucket up with its own indices
            assert not set(shares[0]) & set(shares[1])
        seen = Counter(dataset.record_index(i) for share in shares for i in share)
        if sampler is plain:
            assert seen == expected
        else:  # every example, plus at most one whole batch so each rank gets as many
            assert not expected - seen
            assert sum(seen.values()) - len(dataset) < 2 * 2
    cat = sum(n for j, n in expected.items() if dataset.concept_of[j] == 1)
    assert cat == (5 if balance == "equal" else 1)


def test_class_examples_pair_within_their_concept(tmp_path):
    dataset = _concept_dataset(tmp_path, "equal")
    write_synthetic_images(tmp_path / "dogs", count=2, seed=5)
    write_synthetic_images(tmp_path / "cats", count=1, seed=6)
    prior = ImageCaptionDataset(
        load_records(tmp_path / "dogs") + load_records(tmp_path / "cats"),
        resolution=32,
        concepts=[Concept("dogs", prompt="a dog"), Concept("cats", prompt="a cat")],
        concept_of=[0, 0, 1],
    )
    paired = PriorPairedDataset(dataset, prior, pools=[[0, 1], [2]])
    for epoch in (0, 1):
        paired.set_epoch(epoch)
        partners = [paired[i]["prior"]["caption"] for i in range(len(paired))]
        assert partners == ["a dog"] * 5 + ["a cat"] * 5
    # A concept without a class prompt trains unpaired.
    unpaired = PriorPairedDataset(dataset, prior, pools=[[0, 1], None])
    assert "prior" in unpaired[0] and "prior" not in unpaired[7]


# ------------------------------------------------------------------------------ training


def test_two_concepts_train_lora_with_equal_balance(tiny_model_dir, tmp_path, caplog):
    cfg = from_dict(_concepts_cfg(tmp_path, tiny_model_dir, concept_balance="equal"))
    with caplog.at_level(logging.INFO, logger="personalize"):
        out = train(cfg)
    assert (Path(out) / "pytorch_lora_weights.safetensors").is_file()
    log = caplog.text
    assert "concept disc: 5 images, 5 examples per epoch" in log
    assert "concept cat: 1 images, 5 examples per epoch" in log
    assert "training on 6 images (10 examples per epoch)" in log


def test_class_images_are_generated_per_concept(tiny_model_dir, tmp_path):
    data = _concepts_cfg(tmp_path, tiny_model_dir)
    data["data"]["concepts"][0]["class_prompt"] = "a photo of a disc"
    data["data"]["concepts"][1]["class_prompt"] = "a photo of a cat"
    data["data"]["concepts"][1]["num_class_images"] = 1
    data["prior"] = {
        "enabled": True,
        "num_class_images": 2,
        "generation_steps": 1,
        "generation_batch_size": 2,
    }
    data["train"]["max_steps"] = 2
    train(from_dict(data))
    root = tmp_path / "out" / "class_images"
    for name, prompt, count in (("disc", "a photo of a disc", 2), ("cat", "a photo of a cat", 1)):
        manifest = json.loads((root / name / MANIFEST).read_text())
        assert manifest["prompt"] == prompt
        assert len(list((root / name).glob("*.png"))) == count


def test_kohya_reg_folder_is_the_class_image_pool(tiny_model_dir, tmp_path, caplog):
    train_dir, reg_dir = tmp_path / "img", tmp_path / "reg"
    write_synthetic_images(train_dir / "2_sks disc", count=2)
    write_synthetic_images(reg_dir / "1_disc", count=3, seed=9)
    cfg = base_config(tiny_model_dir, train_dir, tmp_path / "out", train={"max_steps": 2})
    cfg["data"] = {"path": str(train_dir), "reg_path": str(reg_dir)}
    cfg["prior"] = {"enabled": True}
    with caplog.at_level(logging.INFO, logger="personalize"):
        train(from_dict(cfg))
    assert "class images" in caplog.text and "1_disc" in caplog.text
    assert not (reg_dir / "1_disc" / MANIFEST).exists()  # your own images: nothing generated
    assert len(list((reg_dir / "1_disc").glob("*.png"))) == 3
    cfg["prior"] = {"enabled": False}
    with pytest.raises(ConfigError, match="data.reg_path"):
        from_dict(cfg)


def test_two_process_run_with_class_images_per_concept(tiny_model_dir, tmp_path):
    """The whole path under `accelerate launch` on two CPU ranks: each concept's class
    images generated (shared between the ranks), the balanced epoch sharded, one LoRA."""
    cfg = _concepts_cfg(tmp_path, tiny_model_dir, concept_balance="equal")
    cfg["data"]["concepts"][0]["class_prompt"] = "a photo of a disc"
    cfg["data"]["concepts"][1]["class_prompt"] = "a photo of a cat"
    cfg["prior"] = {"enabled": True, "num_class_images": 2, "generation_steps": 1}
    cfg["train"].update(max_steps=2, batch_size=1)
    cfg_path = tmp_path / "concepts.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1")
    proc = subprocess.run(
        launch_two_processes("personalize", "train", str(cfg_path), multi_gpu=True),
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "concept cat: 1 images, 5 examples per epoch" in proc.stderr
    assert "2 process(es)" in proc.stderr
    for name in ("disc", "cat"):
        assert len(list((tmp_path / "out" / "class_images" / name).glob("*.png"))) == 2
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


# ------------------------------------------------------------------------------ errors


def test_concept_errors_name_the_concept(tiny_model_dir, tmp_path):
    cfg = _concepts_cfg(tmp_path, tiny_model_dir)
    concepts = cfg["data"]["concepts"]

    def fails(match: str, error=DataError, **changes):
        entries = [dict(concepts[0]), dict(concepts[1])]
        entries[1].update(changes)
        config = dict(cfg, data={"concepts": entries})
        with pytest.raises(error, match=match):
            train(from_dict(config))

    fails(r"Concept 'gone': folder .* does not exist", path=str(tmp_path / "gone"))
    (tmp_path / "empty").mkdir()
    fails(r"Concept 'empty': No images in", path=str(tmp_path / "empty"))
    fails(r"Concept 'disc2' reads the same folder", path=concepts[0]["path"], name="disc2")
    fails("Two concepts are named 'disc'", name="disc")
    write_synthetic_images(tmp_path / "nocap", count=1)
    fails(r"Concept 'nocap': Image .* has no caption", path=str(tmp_path / "nocap"), prompt=None)
    with pytest.raises(ConfigError, match=r"data.concepts\[0\].repeats"):
        from_dict(dict(cfg, data={"concepts": [dict(concepts[0], repeats=0)]}))
    with pytest.raises(ConfigError, match="data.path"):
        from_dict(dict(cfg, data={"concepts": concepts, "path": concepts[0]["path"]}))
    with pytest.raises(ConfigError, match="data.concept_balance"):
        from_dict(dict(cfg, data={"concepts": concepts, "concept_balance": "fair"}))


# ------------------------------------------------------------------------------ evaluation


def test_evaluate_reports_each_concept_and_the_mean(tiny_model_dir, tmp_path):
    from test_evaluation import save_tiny_clip

    from personalize.evaluation import evaluate, evaluation_from_dict

    run = train(from_dict(_concepts_cfg(tmp_path, tiny_model_dir)))
    clip = save_tiny_clip(tmp_path / "clip")
    data = tmp_path / "data"
    out = tmp_path / "eval"
    cfg = evaluation_from_dict(
        {
            "model": str(tiny_model_dir),
            "output_dir": str(out),
            "artifacts": [{"path": str(run), "label": "lora"}],
            "prompts": {"count": 1, "class_name": "thing"},
            "generation": {"seeds": [0], "num_inference_steps": 1, "resolution": 32},
            "metrics": {"clip_model": str(clip)},
            "concepts": [
                {"token": "sks", "class_name": "disc", "instance_data": str(data / "disc")},
                {"name": "cat", "token": "ohwx", "instance_data": str(data / "cat")},
            ],
        }
    )
    summary = evaluate(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["concepts"]) == {"sks", "cat"}
    for concept in ("sks", "cat"):
        assert set(metrics["concepts"][concept]) == {"base", "lora"}
        assert isinstance(metrics["concepts"][concept]["lora"]["clip_i"], float)
    lora = [metrics["concepts"][c]["lora"]["clip_i"] for c in ("sks", "cat")]
    assert metrics["mean"]["lora"]["clip_i"] == pytest.approx(sum(lora) / 2, abs=1e-4)
    assert metrics["mean"]["lora"]["dino"] == "not computed (no model given)"
    assert summary["mean"] == metrics["mean"]
    # Each concept's prompts carry its own token and class.
    assert any("sks_disc" in p.name for p in (out / "concepts/sks/images/lora").iterdir())
    assert any("ohwx_thing" in p.name for p in (out / "concepts/cat/images/lora").iterdir())
    page = (out / "report.html").read_text()
    assert 'href="concepts/cat/report.html"' in page and "mean" in page
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("concept,label,clip_t") and len(rows) == 1 + 3 * 2
    with pytest.raises(ConfigError, match=r"concepts\[1\].name"):
        evaluation_from_dict(
            {"model": "m", "concepts": [{"token": "sks"}, {"token": "x", "name": "sks"}]}
        )
