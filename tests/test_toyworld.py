"""The toy world: generator, tokenizer, shipped base model and classifier, benchmark."""

from __future__ import annotations

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
        assert full == {"shape": scene.shape, "color": scene.color,
                        "background": scene.background, "size": scene.size,
                        **({"pattern": scene.pattern} if scene.pattern != "solid" else {})}
        partial = parse_caption(caption(scene, rng))
        assert partial["shape"] == scene.shape
        for key, value in partial.items():
            assert full[key] == value, (caption(scene), key)


def test_caption_wording():
    scene = Scene("heart", "red", "blue", size="small")
    assert caption(scene) == "a small red heart on a blue background"
    assert caption(replace(scene, color="yellow", size="large", shape="star")) == \
        "a large yellow star on a blue background"


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
        assert all((s.shape, s.color, s.pattern) == (subject.look.shape, subject.look.color,
                                                     subject.look.pattern) for s in scenes)
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
    assert tok.convert_ids_to_tokens(tok("background", add_special_tokens=False).input_ids) \
        == ["background"]
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded.model_max_length == MAX_TOKENS
    assert loaded(text).input_ids == tok(text).input_ids
    assert len(loaded) == len(tok)
