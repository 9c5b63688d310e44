"""Personalization subjects: specific patterned objects the base model has never seen.

The base model was pretrained on solid shapes only, so "a heart" never gives a red heart
with white diagonal stripes and a blue dot. Each subject keeps its look fixed (shape,
colors, pattern geometry relative to its center) while its instance images vary position,
size and background, like photos of one dog in different places.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from personalize.errors import ConfigError
from personalize.toyworld.world import COLOR_NAMES, SIZE_RADIUS, Scene, render


@dataclass(frozen=True)
class Subject:
    name: str
    class_word: str  # the class noun of DreamBooth's "a sks heart"
    description: str
    look: Scene  # shape, colors and pattern; position/size/background are varied

    def scene(self, background: str, x: float = 0.5, y: float = 0.5, size: str = "large") -> Scene:
        return replace(
            self.look, background=background, x=x, y=y, size=size, radius=SIZE_RADIUS[size]
        )

    @property
    def colors(self) -> set[str]:
        return {c for c in (self.look.color, self.look.color2, self.look.dot_color) if c}

    def backgrounds(self) -> list[str]:
        """Backgrounds the subject stands out on (none of its own colors)."""
        return [c for c in COLOR_NAMES if c not in self.colors]


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in [
        Subject(
            "striped_heart",
            "heart",
            "a red heart with white diagonal stripes and a blue dot",
            Scene(
                "heart",
                "red",
                "black",
                pattern="striped",
                color2="white",
                stripe_angle=45.0,
                stripe_period=0.3,
                dot_color="blue",
            ),
        ),
        Subject(
            "two_color_star",
            "star",
            "a star, yellow on the left and purple on the right",
            Scene("star", "yellow", "black", pattern="split", color2="purple", stripe_angle=0.0),
        ),
        Subject(
            "spotted_circle",
            "circle",
            "a green circle with white spots",
            Scene("circle", "green", "black", pattern="spotted", color2="white", stripe_period=0.3),
        ),
    ]
}


def get_subject(name: str) -> Subject:
    if name not in SUBJECTS:
        raise ConfigError(f"unknown toy-world subject {name!r}; known: {', '.join(SUBJECTS)}")
    return SUBJECTS[name]


def instance_scenes(subject: Subject, count: int = 5, seed: int = 0) -> list[Scene]:
    """`count` views of the subject: backgrounds cycle through its contrasting colors,
    position and size are drawn from `seed` (one in four views is small)."""
    rng = np.random.default_rng(seed)
    backgrounds = subject.backgrounds()
    order = rng.permutation(len(backgrounds))
    scenes = []
    for i in range(count):
        size = "small" if i % 4 == 3 else "large"
        r = SIZE_RADIUS[size]
        x, y = (float(v) for v in rng.uniform(r + 0.03, 1 - r - 0.03, size=2))
        scenes.append(subject.scene(backgrounds[order[i % len(order)]], x, y, size))
    return scenes


def write_instance_images(
    subject: Subject | str,
    folder: str | Path,
    count: int = 5,
    seed: int = 0,
    size: int = 32,
    caption: str | None = None,
) -> list[Path]:
    """PNG instance images of a subject (and .txt captions when `caption` is given)."""
    subject = get_subject(subject) if isinstance(subject, str) else subject
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(instance_scenes(subject, count, seed)):
        path = folder / f"{subject.name}_{i:02d}.png"
        Image.fromarray(render(scene, size)).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption, encoding="utf-8")
        paths.append(path)
    return paths
