"""Evaluation: metric math on hand-made features, encoders on tiny random models, and the
`evaluate` command end to end on the tiny pipeline with a tiny LoRA."""

from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import base_config
from helpers import ROOT
from PIL import Image

from personalize import train
from personalize.cli import main
from personalize.config import ConfigError, from_dict
from personalize.evaluation import evaluate, evaluation_from_dict, load_evaluation_config
from personalize.evaluation import metrics as M
from personalize.evaluation import report as R
from personalize.evaluation.prompts import (
    LIVE_TEMPLATES,
    OBJECT_TEMPLATES,
    Prompt,
    clip_text,
    fill,
    read_prompt_file,
)
from personalize.inference import generate
from personalize.models import load_pipeline
from personalize.testing import save_tiny_pipeline, tiny_tokenizer, write_synthetic_images

SEEDS = [3, 7]


# ------------------------------------------------------------------------------ tiny encoders


def save_tiny_clip(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    tok = tiny_tokenizer()
    n = len(tok)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=n - 2,
            eos_token_id=n - 1,
            pad_token_id=n - 1,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_vit(path: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return save_tiny_clip(root / "clip"), save_tiny_vit(root / "dino")


def _images(folder: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


# ------------------------------------------------------------------------------ metric math


def test_metric_math_matches_hand_computation():
    s = 1 / math.sqrt(2)
    # PRES / CLIP-I / DINO: the mean over every (generated, real) pair.
    generated = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    real = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # lengths must not matter
    assert M.mean_similarity(generated, real) == pytest.approx((1 + 0 + s + s) / 4)
    # DIV: per prompt the mean 1 - cos over distinct pairs, then the mean over prompts;
    # a prompt with a single image has no pair and is left out.
    group_a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    group_b = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    div_a = ((1 - 0) + (1 - s) + (1 - s)) / 3
    assert M.diversity([group_a]) == pytest.approx(div_a)
    assert M.diversity([group_a, group_b, group_b[:1]]) == pytest.approx((div_a + 2.0) / 2)
    assert M.diversity([group_b[:1]]) is None
    # CLIP-T pairs text i with image i; shuffling the pairing lowers it.
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    images = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert M.paired_similarity(text, images) == pytest.approx((1 + s) / 2)
    assert M.paired_similarity(text[[1, 0]], images) == pytest.approx((0 + s) / 2)
    with pytest.raises(ValueError):
        M.paired_similarity(text, images[:1])


def test_identical_images_score_one_and_shuffled_pixels_score_lower(encoders, instance_dir):
    clip_dir, dino_dir = encoders
    images = _images(instance_dir)
    rng = np.random.default_rng(0)
    shuffled = [
        Image.fromarray(
            rng.permutation(np.asarray(im).reshape(-1, 3)).reshape(np.asarray(im).shape)
        )
        for im in images
    ]
    for encoder in (M.ClipEncoder(str(clip_dir)), M.DinoEncoder(str(dino_dir))):
        a = encoder.image_features(images)
        b = encoder.image_features([im.copy() for im in images])
        assert torch.allclose(a.norm(dim=-1), torch.ones(len(images)), atol=1e-5)
        for i in range(len(images)):
            assert M.mean_similarity(a[i : i + 1], b[i : i + 1]) == pytest.approx(1.0, abs=1e-5)
        c = encoder.image_features(shuffled)
        for i in range(len(images)):
            assert M.mean_similarity(c[i : i + 1], a[i : i + 1]) < 1 - 1e-3
    clip = M.ClipEncoder(str(clip_dir))
    texts = clip.text_features(["a photo of a disc", "a photo of a disc", "snow"])
    assert M.paired_similarity(texts[:1], texts[1:2]) == pytest.approx(1.0, abs=1e-5)
    assert M.paired_similarity(texts[:1], texts[2:]) < 0.999


def test_preprocessing_matches_transformers_image_processors(tmp_path):
    transformers = pytest.importorskip("transformers")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 70, 3), np.uint8))
    cases = [
        (
            transformers.CLIPImageProcessor(
                size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
            ),
            "clip",
        ),
        (transformers.ViTImageProcessor(size={"height": 32, "width": 32}), "vit"),
    ]
    for processor, name in cases:
        folder = tmp_path / name
        processor.save_pretrained(folder)
        ours = M.load_preprocess(
            folder, 32, M.IMAGENET_MEAN, M.IMAGENET_STD, {"shortest_edge": 32}
        )([img])
        theirs = torch.as_tensor(
            np.asarray(processor(images=[img], return_tensors="np")["pixel_values"])
        )
        assert ours.shape == theirs.shape == (1, 3, 32, 32)
        assert torch.allclose(ours, theirs.float(), atol=1e-4), name


def test_missing_metric_model_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="metrics.clip_model"):
        M.ClipEncoder(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------ prompts


def test_dreambench_templates_and_prompt_files(tmp_path):
    assert len(OBJECT_TEMPLATES) == len(set(OBJECT_TEMPLATES)) == 25
    assert len(LIVE_TEMPLATES) == len(set(LIVE_TEMPLATES)) == 25
    assert "a {token} {class_name} wearing a santa hat" in LIVE_TEMPLATES
    assert fill(OBJECT_TEMPLATES[0], "sks", "dog") == "a sks dog in the jungle"
    assert fill(OBJECT_TEMPLATES[0], "<c>", "") == "a <c> in the jungle"
    assert clip_text(OBJECT_TEMPLATES[0], "sks", "dog") == "a dog in the jungle"
    assert clip_text("a sks dog, sks style", "sks", "") == "a dog, style"
    f = tmp_path / "p.txt"
    f.write_text("# mine\na {token} {class_name} at night\n\nsks photo\n", encoding="utf-8")
    assert read_prompt_file(f) == ["a {token} {class_name} at night", "sks photo"]
    (tmp_path / "p.yaml").write_text("- one\n- two\n", encoding="utf-8")
    assert read_prompt_file(tmp_path / "p.yaml") == ["one", "two"]
    (tmp_path / "bad.json").write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(ConfigError, match="list of prompt strings"):
        read_prompt_file(tmp_path / "bad.json")
    names = {Prompt(t).folder_name("sks", "dog") for t in OBJECT_TEMPLATES}
    assert len(names) == 25
    assert Prompt("a photo of a {class_name}", True).folder_name("sks", "dog").startswith("class-")


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, instance_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-lora") / "run"
    cfg = from_dict(
        base_config(tiny_model_dir, instance_dir, out, train={"max_steps": 3, "lr": 5e-3})
    )
    return train(cfg)


def _eval_dict(model, out, artifacts, **extra) -> dict:
    cfg = {
        "model": str(model),
        "output_dir": str(out),
        "artifacts": artifacts,
        "prompts": {"count": 2, "class_name": "disc"},
        "generation": {
            "seeds": SEEDS,
            "num_inference_steps": 2,
            "resolution": 32,
            "batch_size": 3,
            "scheduler": "DDIM",
        },
    }
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@pytest.fixture(scope="module")
def full_eval(tiny_model_dir, instance_dir, lora_run, encoders, tmp_path_factory):
    clip_dir, dino_dir = encoders
    out = tmp_path_factory.mktemp("eval") / "full"
    cfg = evaluation_from_dict(
        _eval_dict(
            tiny_model_dir,
            out,
            [
                {"path": str(lora_run), "label": "lora"},
                {"path": str(lora_run), "label": "lora-off", "strength": 0.0},
            ],
            metrics={
                "clip_model": str(clip_dir),
                "dino_model": str(dino_dir),
                "instance_data": str(instance_dir),
            },
        )
    )
    return out, evaluate(cfg)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_evaluate_writes_images_grids_metrics_and_report(full_eval):
    out, summary = full_eval
    # 3 columns x (2 prompts + 1 class prompt) x 2 seeds
    pngs = sorted((out / "images").rglob("*.png"))
    assert len(pngs) == summary["generated"] == 3 * 3 * 2
    assert {p.relative_to(out / "images").parts[0] for p in pngs} == {"base", "lora", "lora-off"}
    assert (
        out
        / "images"
        / "base"
        / Prompt(OBJECT_TEMPLATES[0]).folder_name("sks", "disc")
        / "seed3.png"
    ).is_file()
    for name in (
        "metrics.json",
        "metrics.csv",
        "report.html",
        "generation.json",
        "loss_curve.png",
        "grids/seed3.png",
        "grids/class_seed7.png",
    ):
        assert (out / name).is_file(), name
    # rows: prompts; columns: base + 2 artifacts; the 32 px images are shown at 128 px.
    assert Image.open(out / "grids" / "seed3.png").size == R.grid_size(2, 3, 128)
    assert Image.open(out / "grids" / "class_seed3.png").size == R.grid_size(1, 3, 128)

    data = json.loads((out / "metrics.json").read_text())
    assert data["pres_div_features"] == "dino" and data["instance_images"] == 4
    rows = {r["label"]: r for r in data["columns"]}
    for row in rows.values():
        for key in ("clip_t", "clip_i", "dino", "pres", "div"):
            assert isinstance(row[key], float) and -1.0 <= row[key] <= 2.0, (key, row[key])
        assert len(row["per_prompt"]) == 2
        assert row["per_prompt"][0]["clip_text"] == "a disc in the jungle"
    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == ["base", "lora", "lora-off"]
    assert float(table[1]["dino"]) == rows["lora"]["dino"]


def test_each_column_starts_from_a_fresh_base_pipeline(full_eval):
    """The strength-0 LoRA column comes after the full-strength one: if the first LoRA
    leaked into its pipeline it would not match the base images."""
    out, _ = full_eval
    base = sorted((out / "images" / "base").rglob("*.png"))
    diff_off = max(
        np.abs(_pixels(p) - _pixels(Path(str(p).replace("/base/", "/lora-off/")))).max()
        for p in base
    )
    diff_lora = np.mean(
        [
            np.abs(_pixels(p) - _pixels(Path(str(p).replace("/base/", "/lora/")))).mean()
            for p in base
        ]
    )
    assert diff_off <= 1  # uint8 rounding only
    assert diff_lora > 0.05


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_report_parses_and_references_only_existing_files(full_eval):
    out, _ = full_eval
    parser = _Refs()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    parser.close()
    assert "table" in parser.tags and parser.refs
    assert "loss_curve.png" in parser.refs and "grids/seed3.png" in parser.refs
    for ref in parser.refs:
        assert not ref.startswith(("http:", "https:", "/")), ref
        assert (out / ref).is_file(), ref


def test_same_seeds_give_identical_base_images_and_runs_resume(
    full_eval, tiny_model_dir, lora_run, tmp_path, capsys
):
    first, _ = full_eval
    out = tmp_path / "again"
    argv = [
        "evaluate",
        "--model",
        str(tiny_model_dir),
        "--artifact",
        f"lora={lora_run}",
        "--class-name",
        "disc",
        "--num-prompts",
        "2",
        "--seeds",
        "3,7",
        "--steps",
        "2",
        "--resolution",
        "32",
        "--scheduler",
        "DDIM",
        "--batch-size",
        "3",
        "--embed-images",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["generated"] == 2 * 3 * 2
    for p in sorted((first / "images" / "base").rglob("*.png")):
        assert np.array_equal(_pixels(p), _pixels(out / p.relative_to(first))), p
    # No metric models: the numbers say so, images and report are still made.
    data = json.loads((out / "metrics.json").read_text())
    assert data["columns"][0]["clip_t"] == M.NO_MODEL
    assert M.NO_MODEL in (out / "metrics.csv").read_text()
    html = (out / "report.html").read_text(encoding="utf-8")
    parser = _Refs()
    parser.feed(html)
    assert parser.refs and all(r.startswith("data:image/png;base64,") for r in parser.refs)

    # Resume: existing PNGs are reused; a missing one is drawn again, identically.
    victim = sorted((out / "images" / "lora").rglob("*.png"))[0]
    before = _pixels(victim)
    victim.unlink()
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["generated"], summary["reused"]) == (1, 11)
    assert np.array_equal(_pixels(victim), before)

    # Other settings into the same folder would mix images: refused, unless overwrite.
    assert main(argv[:-2] + ["--steps", "3", "--out", str(out)]) == 2
    assert "num_inference_steps" in capsys.readouterr().err


def test_evaluation_draws_what_sampling_draws(full_eval, tiny_model_dir):
    """`evaluate` batches across prompts, `inference.generate` (sample, validation) across
    seeds; one generator per image makes them draw the same pictures."""
    out, _ = full_eval
    pipe = load_pipeline(str(tiny_model_dir))
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompt = Prompt(OBJECT_TEMPLATES[1])
    images = generate(
        pipe, [prompt.text("sks", "disc")], SEEDS, num_inference_steps=2, resolution=32
    )[0]
    for seed, image in zip(SEEDS, images):
        ours = _pixels(
            out / "images" / "base" / prompt.folder_name("sks", "disc") / f"seed{seed}.png"
        )
        assert np.abs(ours - np.asarray(image, dtype=np.int16)).max() <= 1


def test_pipeline_folder_artifact_and_loss_curve_from_given_log(tiny_model_dir, lora_run, tmp_path):
    """A fine-tuned pipeline folder (DreamBooth output) is a column like a LoRA; an explicit
    train log gives the loss curve."""
    tuned = save_tiny_pipeline(tmp_path / "dreambooth", seed=1)
    cfg = evaluation_from_dict(
        _eval_dict(
            tiny_model_dir,
            tmp_path / "out",
            [str(tuned)],
            prompts={"count": 1, "class_prompts": []},
            generation={"seeds": [0]},
            report={"train_logs": [str(lora_run)]},
        )
    )
    summary = evaluate(cfg)
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert data["columns"][1]["kind"] == "pipeline"
    assert data["columns"][1]["label"] == "dreambooth"
    assert summary["generated"] == 2
    a, b = (
        sorted((tmp_path / "out" / "images" / c).rglob("*.png"))[0] for c in ("base", "dreambooth")
    )
    assert np.abs(_pixels(a) - _pixels(b)).mean() > 1
    assert (tmp_path / "out" / "loss_curve.png").is_file()


def test_embedding_and_hypernetwork_artifacts_are_columns_too(tiny_model_dir, tmp_path, caplog):
    """Every kind `personalize.load` accepts works as a column; an embedding whose token the
    prompts never use is reported."""
    from safetensors.torch import save_file

    from personalize.adapters import hypernetwork as H

    torch.manual_seed(0)
    save_file({"<disc>": torch.randn(1, 32)}, str(tmp_path / "learned_embeds.safetensors"))
    hn_file = H.save_hypernetwork(
        H.Hypernetwork([32, 64], H.HypernetworkOptions(weight_initialization="XavierNormal")),
        tmp_path / "disc_hn.pt",
    )
    emb = str(tmp_path / "learned_embeds.safetensors")
    cfg = evaluation_from_dict(
        _eval_dict(
            tiny_model_dir,
            tmp_path / "out",
            [{"path": emb, "token": "<disc>"}, emb, {"path": str(hn_file), "strength": 0.5}],
            prompts={"count": 1, "class_prompts": []},
            generation={"seeds": [0]},
        )
    )
    with caplog.at_level("WARNING"):
        evaluate(cfg)
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    cols = {c["label"]: c for c in data["columns"]}
    assert [(c["kind"], c["token"]) for c in data["columns"]] == [
        (None, "sks"),
        ("textual_inversion", "<disc>"),
        ("textual_inversion", "sks"),
        ("hypernetwork", "sks"),
    ]
    assert list(cols) == ["base", "learned_embeds", "learned_embeds-2", "disc_hn"]
    assert any("<disc>" in r.message and "learned_embeds-2" in r.message for r in caplog.records)
    prompt = Prompt(OBJECT_TEMPLATES[0])
    images = {
        label: _pixels(
            tmp_path
            / "out"
            / "images"
            / label
            / prompt.folder_name(cols[label]["token"], "disc")
            / "seed0.png"
        )
        for label in cols
    }
    assert np.abs(images["learned_embeds"] - images["base"]).mean() > 0.5  # token used
    assert np.abs(images["learned_embeds-2"] - images["base"]).max() <= 1  # token unused
    assert np.abs(images["disc_hn"] - images["base"]).mean() > 0.5


def test_loss_curve_is_drawn_from_log_rows(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 11)] + [
        {"step": 5, "val_loss": 0.4},
        {"step": 10, "val_loss": 0.3},
    ]
    img = R.loss_curve(rows, "run")
    assert img is not None and img.size == (720, 360)
    colors = {tuple(c) for c in np.asarray(img).reshape(-1, 3)}
    assert (60, 110, 200) in colors and (220, 90, 40) in colors  # train and validation lines
    assert R.loss_curve([{"step": 1, "lr": 1e-4}], "run") is None
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="train_log.jsonl:2"):
        R.read_train_log(log)


def test_config_errors_name_the_key(tiny_model_dir, lora_run, tmp_path):
    base = _eval_dict(tiny_model_dir, tmp_path / "o", [str(lora_run)])
    with pytest.raises(ConfigError, match="artifacts\\[0\\].path"):
        evaluate(evaluation_from_dict({**base, "artifacts": [str(tmp_path / "missing")]}))
    with pytest.raises(ConfigError, match="generation.scheduler"):
        evaluate(evaluation_from_dict({**base, "generation": {"scheduler": "Nope"}}))
    assert not (tmp_path / "o" / "images").exists()  # failed before drawing anything
    with pytest.raises(ConfigError, match="label"):
        evaluate(
            evaluation_from_dict(
                {
                    **base,
                    "artifacts": [
                        {"path": str(lora_run), "label": "x"},
                        {"path": str(lora_run), "label": "x"},
                    ],
                }
            )
        )
    with pytest.raises(ConfigError, match="prompts.colour"):
        evaluation_from_dict({**base, "prompts": {"colour": "red"}})
    with pytest.raises(ConfigError, match="generation.seeds"):
        evaluation_from_dict({**base, "generation": {"seeds": [1, 1]}})


def test_shipped_config_parses(tiny_model_dir, lora_run, tmp_path):
    cfg = load_evaluation_config(
        ROOT / "configs" / "evaluate.yaml",
        [f"model={tiny_model_dir}", "generation.num_images=2"],
        {"artifacts": [f"final={lora_run}"]},
    )
    assert cfg.artifacts[0].label == "final" and cfg.generation.seed_list() == [0, 1]
    raw = yaml.safe_load((ROOT / "configs" / "evaluate.yaml").read_text())
    assert set(raw) <= set(cfg.to_dict())


def test_instance_images_for_metrics_come_from_any_data_layout(tmp_path):
    write_synthetic_images(tmp_path / "imgs", count=2, caption="x")
    from personalize.evaluation.evaluate import _instance_images

    cfg = evaluation_from_dict({"model": "m", "metrics": {"instance_data": str(tmp_path / "imgs")}})
    assert len(_instance_images(cfg)) == 2
