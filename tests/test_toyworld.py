"""The toy world: generator, tokenizer, shipped base model and classifier, benchmark."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from personalize.toyworld.subjects import SUBJECTS, instance_scenes, write_instance_images
from personalize.toyworld.world import (
    COLORS,
    SHAPES,
    Scene,
    caption,
    make_dataset,
    parse_caption,
    render,
    sample_scene,
)

# ------------------------------------------------------------------------------ generator


def test_generator_is_deterministic_in_its_seed():
    a_images, a_scenes, a_caps = make_dataset(24, seed=5, patterned=0.5)
    b_images, b_scenes, b_caps = make_dataset(24, seed=5, patterned=0.5)
    c_images, _, _ = make_dataset(24, seed=6, patterned=0.5)
    assert np.array_equal(a_images, b_images)
    assert a_scenes == b_scenes and a_caps == b_caps
    assert not np.array_equal(a_images, c_images)
    assert a_images.shape == (24, 32, 32, 3) and a_images.dtype == np.uint8


def test_captions_name_only_what_the_scene_shows():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng, patterned=0.3)
        full = parse_caption(caption(scene))
        assert full == {
            "shape": scene.shape,
            "color": scene.color,
            "background": scene.background,
            "size": scene.size,
            **({"pattern": scene.pattern} if scene.pattern != "solid" else {}),
        }
        partial = parse_caption(caption(scene, rng))
        assert partial["shape"] == scene.shape
        for key, value in partial.items():
            assert full[key] == value, (caption(scene), key)


def test_caption_wording():
    scene = Scene("heart", "red", "blue", size="small")
    assert caption(scene) == "a small red heart on a blue background"
    assert (
        caption(replace(scene, color="yellow", size="large", shape="star"))
        == "a large yellow star on a blue background"
    )


def test_base_world_scenes_are_solid_with_distinct_colors():
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng) for _ in range(500)]
    assert all(s.pattern == "solid" and s.dot_color is None for s in scenes)
    assert all(s.color != s.background for s in scenes)
    assert {s.shape for s in scenes} == set(SHAPES)


@pytest.mark.parametrize("shape", SHAPES)
def test_render_puts_the_shape_color_at_the_center_and_background_at_the_corner(shape):
    scene = Scene(shape, "red", "blue", size="large", x=0.5, y=0.5, radius=0.34)
    img = render(scene, 32).astype(int)
    # The star's and triangle's centroid sits a little below the center of the box.
    center = img[17, 16]
    assert np.abs(center - np.array(COLORS["red"])).max() <= 2
    corner = img[1, 1]
    assert np.abs(corner - np.array(COLORS["blue"])).max() <= 12  # the light falloff
    # The shape covers a plausible area, smaller when small.
    red = (np.abs(img - np.array(COLORS["red"])).sum(-1) < 30).mean()
    small = render(replace(scene, radius=0.21), 32).astype(int)
    red_small = (np.abs(small - np.array(COLORS["red"])).sum(-1) < 30).mean()
    assert 0.1 < red < 0.5 and red_small < red


def test_patterns_show_their_second_color():
    base = Scene("square", "red", "black", x=0.5, y=0.5, radius=0.34, color2="white")
    solid = render(base)
    for pattern in ("striped", "split", "spotted"):
        img = render(replace(base, pattern=pattern)).astype(int)
        white = (np.abs(img - np.array(COLORS["white"])).sum(-1) < 30).mean()
        assert white > 0.03, pattern
        assert not np.array_equal(img, solid)


def test_subjects_are_unseen_and_their_instances_vary(tmp_path):
    for subject in SUBJECTS.values():
        assert subject.look.pattern != "solid"  # the base world has only solid shapes
        assert subject.class_word == subject.look.shape
        scenes = instance_scenes(subject, 5, seed=0)
        assert len({s.background for s in scenes}) >= 4
        assert all(s.background not in subject.colors for s in scenes)
        assert all(
            (s.shape, s.color, s.pattern)
            == (subject.look.shape, subject.look.color, subject.look.pattern)
            for s in scenes
        )
    paths = write_instance_images("striped_heart", tmp_path, count=4, caption="a sks heart")
    assert [p.name for p in paths] == [f"striped_heart_{i:02d}.png" for i in range(4)]
    assert (tmp_path / "striped_heart_00.txt").read_text() == "a sks heart"


def test_unknown_names_are_reported():
    with pytest.raises(ValueError, match="unknown shape"):
        render(Scene("hexagon", "red", "blue"))
    from personalize.toyworld.subjects import get_subject

    with pytest.raises(ValueError, match="known: striped_heart"):
        get_subject("dog")


# ------------------------------------------------------------------------------ tokenizer


def test_world_words_are_single_tokens_and_the_tokenizer_round_trips(tmp_path):
    from transformers import CLIPTokenizer

    from personalize.toyworld.models import MAX_TOKENS, WORDS, make_tokenizer

    tok = make_tokenizer()
    for word in WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, ids)
    text = "a photo of a small red heart on a blue background"
    assert len(tok(text, add_special_tokens=False).input_ids) == len(text.split())
    # A word outside the world stays byte-level: a rare identifier, like "sks" in SD.
    assert len(tok("sks", add_special_tokens=False).input_ids) == 3
    # "a" must not be cut out of other words.
    assert tok.convert_ids_to_tokens(tok("background", add_special_tokens=False).input_ids) == [
        "background"
    ]
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded.model_max_length == MAX_TOKENS
    assert loaded(text).input_ids == tok(text).input_ids
    assert len(loaded) == len(tok)


# ------------------------------------------------------------------------------ shipped model


def test_shipped_weights_are_small_and_documented():
    from personalize.toyworld import REPORT_FILE, WEIGHTS_DIR

    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    report = json.loads(REPORT_FILE.read_text())
    # The base model follows shape, color and background (0.99 / 1.00 / 1.00 on 140
    # prompts, benchmarks/toyworld/README.md). These bounds catch a broken re-export.
    follow = report["prompt_following"]["5.0"]
    assert min(follow["shape"], follow["color"], follow["background"]) > 0.95, follow
    assert "/" not in json.dumps(report["args"])  # no path of the training machine


def test_classifier_reads_ground_truth_scenes():
    from personalize.toyworld import load_classifier
    from personalize.toyworld.classifier import HEADS, scene_labels

    clf = load_classifier()

    def accuracy(patterned: float) -> dict[str, float]:
        # A seed the classifier was not trained on.
        images, scenes, _ = make_dataset(300, seed=2024, patterned=patterned, captions=False)
        preds = clf.predict(images)
        return {
            head: float(
                np.mean(
                    [
                        HEADS[head].index(p[head]) == scene_labels(s)[head]
                        for p, s in zip(preds, scenes)
                    ]
                )
            )
            for head in HEADS
        }

    solid = accuracy(0.0)  # what the base model draws: every head must be read right
    assert all(acc >= 0.97 for acc in solid.values()), solid
    patterned = accuracy(1.0)  # subjects: shape and pattern feed the subject metrics
    assert patterned["shape"] >= 0.95 and patterned["background"] >= 0.95, patterned
    assert patterned["pattern"] >= 0.85, patterned
    # A striped/split shape's "color" (which of its two colors) is the hardest head.
    assert patterned["color"] >= 0.75, patterned


def test_shipped_model_loads_unchanged_and_follows_prompts():
    import torch

    from personalize.models import load_parts
    from personalize.toyworld import base_model_path, load_base_pipeline, load_classifier
    from personalize.toyworld.evaluate import prompt_following

    pipe = load_base_pipeline()
    assert all(
        p.dtype == torch.float32
        for m in (pipe.unet, pipe.text_encoder, pipe.vae)
        for p in m.parameters()
    )
    parts = load_parts(str(base_model_path()))  # what every trainer loads
    assert parts.unet.config.cross_attention_dim == parts.text_encoder.config.hidden_size
    res = prompt_following(pipe, load_classifier(), n=10, seed=7, steps=20)
    assert res["images"].shape == (10, 32, 32, 3)
    # Measured on 140 prompts in pretrain_report.json; 10 prompts are a coarse check.
    assert min(res["accuracy"].values()) >= 0.8, res["accuracy"]


# ------------------------------------------------------------------------------ benchmark


def test_quality_benchmark_short_run_on_one_subject(tmp_path):
    from personalize.toyworld.benchmark import run
    from personalize.toyworld.results import merge_results, write_docs

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text("# Benchmarks\n\n## Speed\n\nkept as it is\n")
    results = run(
        tmp_path / "bench",
        subjects=["striped_heart"],
        variants=["lora"],
        steps=2,
        seeds=2,
        backgrounds=1,
        isolated=False,
        train_seeds=[0, 1],
    )
    seeded = [r for r in results["runs"] if r["variant"] == "lora"]
    assert [r["train_seed"] for r in seeded] == [0, 1]
    assert seeded[0]["subject_fidelity"] != seeded[1]["subject_fidelity"]  # other trainings
    lora = results["summary"]["lora"]
    assert lora["train_seeds"] == 2 and lora["subject_fidelity_sd"] > 0
    assert lora["subject_fidelity"] == pytest.approx(
        np.mean([r["subject_fidelity"] for r in seeded]), abs=1e-4
    )
    # Two processes' results (one training seed each) merge into the same table.
    part0 = {
        "settings": dict(results["settings"], train_seeds=[0]),
        "runs": [r for r in results["runs"] if r.get("train_seed") != 1],
    }
    part1 = {
        "settings": dict(results["settings"], train_seeds=[1]),
        "runs": [r for r in results["runs"] if r.get("train_seed", 1) == 1],
    }
    assert merge_results([part0, part1])["summary"] == results["summary"]
    with pytest.raises(ValueError, match="share a variant and training seed"):
        merge_results([part0, part0])
    rows = {r["variant"]: r for r in results["runs"] if r.get("train_seed", 0) == 0}
    assert set(rows) == {"real_images", "base", "lora"}
    for key in (
        "subject_fidelity",
        "subject_match",
        "prompt_fidelity",
        "pres",
        "class_subject_match",
        "div",
    ):
        assert 0.0 <= rows["lora"][key] <= 1.0, key
        assert 0.0 <= rows["base"][key] <= 1.0, key
    assert rows["lora"]["steps"] == 2 and rows["lora"]["train_seconds"] > 0
    assert rows["lora"]["peak_rss_mb"] > 0
    # The real instance images are the subject: the classifier says so for 4 of 5 (one
    # striped heart reads as "spotted": its blue dot looks like a spot).
    assert rows["real_images"]["subject_match"] >= 0.8
    assert set(results["summary"]) == {"real_images", "base", "lora"}
    assert (tmp_path / "bench" / "grid_striped_heart.png").is_file()

    write_docs(results, tmp_path / "bench", docs, tmp_path / "results" / "quality.json")
    text = (docs / "benchmarks.md").read_text()
    assert "## Speed\n\nkept as it is" in text and "## Quality" in text
    assert "| lora | " in text and " ± " in text
    assert (docs / "images" / "quality_grid.png").is_file()
    write_docs(results, tmp_path / "bench", docs, tmp_path / "results" / "quality.json")
    assert (docs / "benchmarks.md").read_text().count("## Quality") == 1  # rewritten in place


def test_follow_up_variants_are_kept_apart_from_the_comparison():
    from personalize.toyworld.results import markdown_table, summarize
    from personalize.toyworld.variants import DIAGNOSTICS, RECIPES

    assert not set(DIAGNOSTICS) & set(RECIPES)
    for name, recipe in DIAGNOSTICS.items():  # one change to a benchmark recipe each
        base = next(r for r in RECIPES if name.startswith(r + "_"))
        assert recipe["method"] == RECIPES[base]["method"], name
    runs = [
        {"variant": v, "subject": "s", "train_seed": 0, "subject_fidelity": 0.5}
        for v in ("lora", "textual_inversion_lr5e-4")
    ]
    results = {"summary": summarize(runs)}
    main, follow_ups = markdown_table(results), markdown_table(results, diagnostics=True)
    assert "| lora |" in main and "lr5e-4" not in main
    assert "| textual_inversion_lr5e-4 |" in follow_ups and "| lora |" not in follow_ups


@pytest.mark.parametrize("variant", ["dreambooth_recommended", "lora_recommended"])
def test_recommended_recipes_train_the_text_encoder_with_prior_preservation(tmp_path, variant):
    """Issue 18: the recipe that kept "a heart" a plain heart on the toy world; the class
    prompt (here "a heart") must reach LoRA's prior preservation too, or its config fails."""
    from personalize.config import from_dict
    from personalize.toyworld import base_model_path
    from personalize.toyworld.subjects import get_subject
    from personalize.toyworld.variants import RECIPES, variant_config

    cfg_dict = variant_config(
        variant, get_subject("striped_heart"), base_model_path(), tmp_path / "d", tmp_path / "o"
    )
    cfg = from_dict(cfg_dict)
    assert cfg.method == RECIPES[variant]["method"]
    assert cfg.prior.enabled and cfg.prior.class_prompt == "a heart"
    text_encoder = cfg.dreambooth if cfg.method == "dreambooth" else cfg.lora
    assert text_encoder.train_text_encoder


def test_textual_inversion_learns_what_the_model_can_draw(tmp_path):
    """TI cannot draw the patterned subjects (docs/benchmarks.md), but it does learn: a
    vector started from "star" and trained on solid red hearts comes to draw hearts."""
    from personalize import load
    from personalize.models import load_pipeline
    from personalize.toyworld import base_model_path, load_classifier
    from personalize.toyworld.evaluate import sample
    from personalize.toyworld.subjects import Subject
    from personalize.toyworld.trial import train_variant
    from personalize.toyworld.variants import variant_config

    red_heart = Subject("red_heart", "heart", "a solid red heart", Scene("heart", "red", "black"))
    data = tmp_path / "instances"
    write_instance_images(red_heart, data, count=5)
    cfg = variant_config(
        "textual_inversion", red_heart, base_model_path(), data, tmp_path / "run", steps=150
    )
    cfg["textual_inversion"]["initializer_token"] = "star"
    run_dir = train_variant(cfg, tmp_path / "log", isolated=False)["run_dir"]
    classifier, seeds = load_classifier(), list(range(8))

    def heart_rate(pipe, prompt: str) -> float:
        images = sample(pipe, [prompt] * len(seeds), seeds, steps=20, guidance_scale=5.0)
        return float(np.mean([p["shape"] == "heart" for p in classifier.predict(images)]))

    assert heart_rate(load_pipeline(str(base_model_path())), "a star") <= 0.25
    learned = load(load_pipeline(str(base_model_path())), run_dir)
    assert heart_rate(learned, "a <sks-heart>") >= 0.75


# ------------------------------------------------------------------------------ demo


def test_demo_on_the_toy_world_uses_the_method_token(tmp_path):
    from personalize.demo import run_demo

    summary = run_demo("textual_inversion", out=tmp_path, steps=2, seeds=(0,))
    assert summary["world"] == "toy" and summary["subject"] == "striped_heart"
    assert summary["prompt"] == "a <sks-heart>"
    assert summary["steps"] == 2
    for key in ("subject_match_before", "subject_match_after", "subject_similarity_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert (tmp_path / "textual_inversion_before_after.png").is_file()
    assert len(list((tmp_path / "instance_images_striped_heart").glob("*.png"))) == 5


def test_demo_tiny_world_is_the_fast_path(tmp_path):
    from personalize.demo import run_demo

    summary = run_demo("lora", out=tmp_path, steps=2, seeds=(0,), world="tiny")
    assert summary["world"] == "tiny" and summary["steps"] == 2
    with pytest.raises(ValueError, match="world must be one of"):
        run_demo("lora", out=tmp_path, world="mars")
