"""The toy world: seeded synthetic scenes of one shape on a background, with captions.

A scene is a plain record (shape, color, size, position, background, and optionally a
surface pattern). `render` turns it into pixels and `caption` into words, both from the
record alone, so an image and its caption always agree and the same seed always gives the
same scene. Shapes are drawn at 4x and box-filtered down, so edges are anti-aliased the same
way at every resolution.

The pretrained base model only ever sees *solid* shapes. Patterns (stripes, two-color
halves, spots, a center dot) exist so the VAE and the classifier know what they look like,
and so that personalization subjects (`subjects.py`) are things the base model cannot draw.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from personalize.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "heart", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (240, 215, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "purple": (145, 55, 185),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
PATTERNS = ("solid", "striped", "split", "spotted")
# Words in captions that carry no scene content, as "a photo of" does for Stable Diffusion:
# they make prompts like Textual Inversion's templates familiar to the base model.
PREFIXES = ("a photo of", "a picture of", "an image of", "a rendering of", "a drawing of")
# Radius as a fraction of the image side, per size word (jittered by +-8%).
SIZE_RADIUS = {"small": 0.21, "large": 0.34}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    size: str = "large"
    # Center in [0, 1] image coordinates and the radius as a fraction of the side.
    x: float = 0.5
    y: float = 0.5
    radius: float = 0.34
    # Surface pattern: the second color is used by striped / split / spotted.
    pattern: str = "solid"
    color2: str | None = None
    stripe_angle: float = 0.0  # degrees
    stripe_period: float = 0.25  # stripe/spot spacing as a fraction of the diameter
    dot_color: str | None = None  # a small disc at the shape's center

    def to_dict(self) -> dict:
        return asdict(self)


def sample_scene(rng: np.random.Generator, patterned: float = 0.0) -> Scene:
    """A random scene; with probability `patterned` its surface gets a random pattern."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    background = _other_color(rng, color)
    size = SIZES[rng.integers(len(SIZES))]
    radius = SIZE_RADIUS[size] * float(rng.uniform(0.92, 1.08))
    x, y = (float(v) for v in rng.uniform(radius + 0.02, 1 - radius - 0.02, size=2))
    scene = Scene(shape, color, background, size, x, y, radius)
    if rng.random() < patterned:
        pattern = PATTERNS[1 + rng.integers(len(PATTERNS) - 1)]
        color2 = _other_color(rng, color, background)
        dot = _other_color(rng, color, color2) if rng.random() < 0.3 else None
        scene = replace(
            scene,
            pattern=pattern,
            color2=color2,
            dot_color=dot,
            stripe_angle=float(rng.choice([0.0, 45.0, 90.0, 135.0])),
            stripe_period=float(rng.uniform(0.2, 0.35)),
        )
    return scene


def _other_color(rng: np.random.Generator, *exclude: str | None) -> str:
    choices = [c for c in COLOR_NAMES if c not in exclude]
    return choices[rng.integers(len(choices))]


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """The scene in words. With `rng`, parts are left out at random (size half the time,
    color and background a fifth of the time each, a content-free prefix sometimes) so the
    model learns to fill in what a prompt does not say; without it, the full caption."""

    def keep(p_drop: float) -> bool:
        return rng is None or rng.random() >= p_drop

    words = []
    if keep(0.5):
        words.append(scene.size)
    if keep(0.2):
        words.append(scene.color)
    if scene.pattern != "solid":
        words.append(scene.pattern)
    words.append(scene.shape)
    text = " ".join(words)
    if rng is not None and rng.random() < 0.3:
        prefix = PREFIXES[rng.integers(len(PREFIXES))]
    else:
        prefix = ""
    article = "an" if text[0] in "aeiou" else "a"
    text = f"{prefix} {article} {text}".strip()
    if keep(0.2):
        text += f" on a {scene.background} background"
    return text


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption names (shape, color, background, size, pattern), for checks.

    The color word before the shape is the shape's color; the one before "background" is the
    background's."""
    words = text.lower().replace(",", " ").split()
    out: dict[str, str] = {}
    for i, w in enumerate(words):
        if w in SHAPES:
            out["shape"] = w
        elif w in SIZES:
            out["size"] = w
        elif w in PATTERNS:
            out["pattern"] = w
        elif w in COLORS:
            is_bg = i + 1 < len(words) and words[i + 1] == "background"
            out["background" if is_bg else "color"] = w
    return out


# ------------------------------------------------------------------------------ rendering

_SUPERSAMPLE = 4


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.86  # same visual area as the circle, roughly
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a)) + 0.15 * r)
            for a in (-90, 30, 150)
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "heart":
        # The classic parametric heart, scaled so it spans ~2r.
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            hx = 16 * math.sin(t) ** 3
            hy = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + hx * r / 16, cy - hy * r / 16 - 0.1 * r))
        return pts
    raise ConfigError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def shape_mask(scene: Scene, size: int) -> np.ndarray:
    """Coverage in [0, 1] of the shape at each pixel of a `size` x `size` image."""
    big = size * _SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    cx, cy, r = scene.x * big, scene.y * big, scene.radius * big
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_shape_polygon(scene.shape, cx, cy, r), fill=255)
    return _downsample(np.asarray(img, dtype=np.float32) / 255.0)


def _downsample(a: np.ndarray) -> np.ndarray:
    n = a.shape[0] // _SUPERSAMPLE
    return a.reshape(n, _SUPERSAMPLE, n, _SUPERSAMPLE).mean(axis=(1, 3))


def _pattern_mask(scene: Scene, size: int) -> np.ndarray:
    """Where (in [0, 1]) the pattern's second color shows, at 4x then filtered."""
    big = size * _SUPERSAMPLE
    yy, xx = (np.mgrid[0:big, 0:big].astype(np.float32) + 0.5) / big
    dx, dy = xx - scene.x, yy - scene.y
    if scene.pattern == "solid":
        return np.zeros((size, size), np.float32)
    if scene.pattern == "striped":
        a = math.radians(scene.stripe_angle)
        u = dx * math.cos(a) + dy * math.sin(a)
        period = scene.stripe_period * 2 * scene.radius
        m = (np.floor(u / period * 2) % 2).astype(np.float32)
    elif scene.pattern == "split":
        a = math.radians(scene.stripe_angle)
        m = (dx * math.cos(a) + dy * math.sin(a) > 0).astype(np.float32)
    elif scene.pattern == "spotted":
        step = scene.stripe_period * 2 * scene.radius
        gx = (dx / step) - np.round(dx / step)
        gy = (dy / step) - np.round(dy / step)
        m = (gx**2 + gy**2 < 0.28**2).astype(np.float32)
    else:
        raise ConfigError(f"unknown pattern {scene.pattern!r}; known: {', '.join(PATTERNS)}")
    return _downsample(m)


def _background(scene: Scene, size: int) -> np.ndarray:
    base = np.array(COLORS[scene.background], np.float32)
    # A gentle vertical light falloff, so a background is not a single flat value.
    shade = np.linspace(1.04, 0.94, size, dtype=np.float32)[:, None, None]
    return np.broadcast_to(base, (size, size, 3)) * shade


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene as a `size` x `size` x 3 uint8 RGB array."""
    img = _background(scene, size)
    fill = np.broadcast_to(np.array(COLORS[scene.color], np.float32), (size, size, 3))
    if scene.pattern != "solid":
        if scene.color2 is None:
            raise ConfigError(f"a {scene.pattern} scene needs color2")
        p = _pattern_mask(scene, size)[..., None]
        fill = fill * (1 - p) + np.array(COLORS[scene.color2], np.float32) * p
    mask = shape_mask(scene, size)[..., None]
    img = img * (1 - mask) + fill * mask
    if scene.dot_color is not None:
        dot = replace(scene, shape="circle", radius=scene.radius * 0.28)
        dmask = shape_mask(dot, size)[..., None]
        img = img * (1 - dmask) + np.array(COLORS[scene.dot_color], np.float32) * dmask
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_image(scene: Scene, size: int = 32) -> Image.Image:
    return Image.fromarray(render(scene, size))


def make_dataset(
    n: int, seed: int, size: int = 32, patterned: float = 0.0, captions: bool = True
) -> tuple[np.ndarray, list[Scene], list[str]]:
    """`n` scenes from `seed`: images (n, size, size, 3) uint8, the scenes, and captions
    (with random omissions, drawn from the same seed)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, patterned) for _ in range(n)]
    images = np.stack([render(s, size) for s in scenes]) if n else np.zeros((0, size, size, 3))
    texts = [caption(s, rng) for s in scenes] if captions else []
    return images.astype(np.uint8), scenes, texts
