"""A small CNN that reads a toy-world image: shape, color, background, size, pattern, dot.

It stands in for CLIP/DINO in the quality benchmark: its heads say whether a sample shows
what the prompt asked for (prompt fidelity), and its pooled features compare a sample with
the instance images of a subject (subject fidelity, PRES, diversity). It is trained on
patterned shapes too (which the base diffusion model never sees), so its features tell a
striped heart from a plain one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from personalize.errors import ModelLoadError
from personalize.toyworld.world import COLOR_NAMES, PATTERNS, SHAPES, SIZES, Scene

HEADS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLOR_NAMES,
    "background": COLOR_NAMES,
    "size": SIZES,
    "pattern": PATTERNS,
    "dot": ("no", "yes"),
}
CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"


def scene_labels(scene: Scene) -> dict[str, int]:
    """The index of the true class of each head for a scene."""
    values = {
        "shape": scene.shape,
        "color": scene.color,
        "background": scene.background,
        "size": scene.size,
        "pattern": scene.pattern,
        "dot": "yes" if scene.dot_color else "no",
    }
    return {k: HEADS[k].index(v) for k, v in values.items()}


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class ToyClassifier(nn.Module):
    def __init__(self, width: int = 32, resolution: int = 32):
        super().__init__()
        self.config = {"width": width, "resolution": resolution}
        w = width
        # Strided from the first layer: full-resolution convolutions cost most of the CPU
        # time and a 3x3 stride-2 filter still sees every pixel of a stripe or a spot.
        self.trunk = nn.Sequential(
            _block(3, w, 2),
            _block(w, w, 1),  # 16 x 16
            _block(w, 2 * w, 2),
            _block(2 * w, 2 * w, 1),  # 8 x 8
            _block(2 * w, 4 * w, 2),
            _block(4 * w, 4 * w, 1),  # 4 x 4
        )
        self.feature_dim = 8 * w  # average- and max-pooled
        self.heads = nn.ModuleDict(
            {k: nn.Linear(self.feature_dim, len(v)) for k, v in HEADS.items()}
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of images `x` (B, 3, H, W) in [0, 1]."""
        h = self.trunk(x * 2 - 1)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}

    # ------------------------------------------------------------------ images in, words out

    def to_tensor(self, images: Sequence[Image.Image] | np.ndarray) -> torch.Tensor:
        """PIL images or a uint8 (B, H, W, 3) array -> (B, 3, R, R) floats in [0, 1]."""
        r = self.config["resolution"]
        if isinstance(images, np.ndarray):
            arr = images
            if arr.shape[1:3] != (r, r):
                images = [Image.fromarray(a) for a in arr]
        if not isinstance(images, np.ndarray):
            arr = np.stack(
                [np.asarray(im.convert("RGB").resize((r, r), Image.BILINEAR)) for im in images]
            )
        t = torch.from_numpy(np.ascontiguousarray(arr)).float().div(255.0)
        return t.permute(0, 3, 1, 2).to(next(self.parameters()).device)

    @torch.no_grad()
    def predict(self, images) -> list[dict[str, str]]:
        """What each image shows, as words: [{"shape": "heart", "color": "red", ...}]."""
        logits = self(self.to_tensor(images))
        idx = {k: v.argmax(dim=1).tolist() for k, v in logits.items()}
        return [{k: HEADS[k][idx[k][i]] for k in HEADS} for i in range(len(idx["shape"]))]

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """L2-normalized features (B, D): cosine similarity is a dot product."""
        f = self.features(self.to_tensor(images))
        return torch.nn.functional.normalize(f, dim=1)

    # ------------------------------------------------------------------ files

    def save(self, folder: str | Path) -> None:
        from personalize.io import atomic_save_safetensors

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        atomic_save_safetensors(state, folder / CLASSIFIER_WEIGHTS)
        (folder / CLASSIFIER_CONFIG).write_text(
            json.dumps(dict(self.config, heads={k: list(v) for k, v in HEADS.items()}), indent=2)
        )

    @classmethod
    def load(cls, folder: str | Path) -> ToyClassifier:
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_file, weights = folder / CLASSIFIER_CONFIG, folder / CLASSIFIER_WEIGHTS
        if not cfg_file.is_file() or not weights.is_file():
            raise ModelLoadError(
                f"{folder} holds no toy-world classifier ({CLASSIFIER_CONFIG} + "
                f"{CLASSIFIER_WEIGHTS}); run benchmarks/toyworld/pretrain.py to train one"
            )
        cfg = json.loads(cfg_file.read_text())
        saved_heads = {k: tuple(v) for k, v in cfg.pop("heads").items()}
        if saved_heads != HEADS:
            raise ModelLoadError(
                f"{cfg_file}: the classifier was trained for other classes "
                f"({saved_heads}); retrain it with benchmarks/toyworld/pretrain.py"
            )
        model = cls(**cfg)
        model.load_state_dict(load_file(str(weights)))
        return model.eval()
