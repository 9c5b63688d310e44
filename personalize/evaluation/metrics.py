"""Evaluation metrics (DreamBooth paper, Ruiz et al. 2023, section 4.1) and their encoders.

Every metric is a mean of cosine similarities (or distances) between L2-normalised
feature vectors; the feature extractors are models the user has on disk:

- CLIP-T: cos(text(prompt without identifier), image) per generated image, averaged.
- CLIP-I: cos(image(generated), image(real)) over all generated x real pairs (CLIP).
- DINO:   the same with a self-supervised ViT's CLS token (DINO ViT-S/16 in the paper).
- PRES:   the DINO (or CLIP-I) similarity of *class-prompt* generations ("a photo of a
          dog") to the real images; high means the model draws the subject for the whole
          class (prior collapse), so lower is better.
- DIV:    mean pairwise distance 1 - cos between generations of the same prompt (different
          seeds), averaged over prompts; higher is more diverse. The paper uses LPIPS; no
          LPIPS weights are available offline, so this is the feature-distance stand-in,
          with DINO features (CLIP image features when no DINO model is given).

The math is in small functions on feature tensors (tested on hand-made features); the
encoders only turn images/text into those features.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from personalize.config import ConfigError
from personalize.errors import EvaluationError

logger = logging.getLogger(__name__)

NO_MODEL = "not computed (no model given)"
NO_INSTANCE_IMAGES = "not computed (no instance images given)"
NO_CLASS_PROMPTS = "not computed (no class prompts)"
ONE_SEED = "not computed (needs 2+ seeds)"

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------ the math


def normalize(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] cosine similarities."""
    return normalize(a) @ normalize(b).T


def mean_similarity(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """CLIP-I / DINO / PRES: the mean cosine over every (generated, reference) pair."""
    if len(generated) == 0 or len(reference) == 0:
        raise EvaluationError(
            "mean_similarity needs at least one generated and one reference image"
        )
    return float(cosine_matrix(generated, reference).mean())


def paired_similarity(text: torch.Tensor, images: torch.Tensor) -> float:
    """CLIP-T: mean of cos(text[i], images[i]); row i of `text` is image i's prompt."""
    if text.shape[0] != images.shape[0] or len(images) == 0:
        raise EvaluationError(
            f"paired_similarity needs equally many texts and images, "
            f"got {text.shape[0]} and {images.shape[0]}"
        )
    return float((normalize(text) * normalize(images)).sum(-1).mean())


def diversity(groups: list[torch.Tensor]) -> float | None:
    """DIV: for each group (one prompt's images over seeds) the mean of 1 - cos over its
    n(n-1)/2 distinct pairs, then the mean over groups. None when no group has 2 images."""
    per_group = []
    for feats in groups:
        n = len(feats)
        if n < 2:
            continue
        sim = cosine_matrix(feats, feats)
        i, j = torch.triu_indices(n, n, offset=1)
        per_group.append(float((1.0 - sim[i, j]).mean()))
    return float(np.mean(per_group)) if per_group else None


# ------------------------------------------------------------------------------ preprocessing


@dataclass
class Preprocess:
    """The image -> tensor steps of a transformers image processor, in PIL + numpy
    (the library's own processors want torchvision in recent versions)."""

    resize: dict[str, int] | None  # {"shortest_edge": n} or {"height": h, "width": w}
    crop: tuple[int, int] | None  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: int = Image.BICUBIC
    rescale_factor: float = 1 / 255
    normalize: bool = True

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._one(im) for im in images]))

    def _one(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        if self.resize is not None:
            w, h = image.size
            if "shortest_edge" in self.resize:
                short = self.resize["shortest_edge"]
                if w <= h:
                    size = (short, int(short * h / w))
                else:
                    size = (int(short * w / h), short)
            else:
                size = (self.resize["width"], self.resize["height"])
            image = image.resize(size, resample=self.resample)
        if self.crop is not None:
            ch, cw = self.crop
            w, h = image.size
            if w < cw or h < ch:  # never smaller than the model's input
                image = image.resize((max(w, cw), max(h, ch)), resample=self.resample)
                w, h = image.size
            top, left = (h - ch) // 2, (w - cw) // 2
            image = image.crop((left, top, left + cw, top + ch))
        x = np.asarray(image, dtype=np.float32) * self.rescale_factor
        if self.normalize:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return x.transpose(2, 0, 1).copy()


def _size_dict(value: Any, square: bool) -> dict[str, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if "shortest_edge" in value:
        return {"shortest_edge": int(value["shortest_edge"])}
    return {"height": int(value["height"]), "width": int(value["width"])}


def load_preprocess(
    model_dir: Path,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    default_resize: dict[str, int],
) -> Preprocess:
    """The model folder's preprocessor_config.json when it has one, else the defaults."""
    file = model_dir / "preprocessor_config.json"
    if not file.is_file():
        return Preprocess(resize=default_resize, crop=(image_size, image_size), mean=mean, std=std)
    cfg = json.loads(file.read_text(encoding="utf-8"))
    crop = None
    if cfg.get("do_center_crop", False):
        c = _size_dict(cfg.get("crop_size", image_size), square=True)
        crop = (c["height"], c["width"])
    resize = _size_dict(cfg.get("size", image_size), square=not cfg.get("do_center_crop"))
    return Preprocess(
        resize=resize if cfg.get("do_resize", True) else None,
        crop=crop,
        mean=tuple(cfg.get("image_mean", mean)),
        std=tuple(cfg.get("image_std", std)),
        resample=int(cfg.get("resample", Image.BICUBIC)),
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255))
        if cfg.get("do_rescale", True)
        else 1.0,
        normalize=bool(cfg.get("do_normalize", True)),
    )


# ------------------------------------------------------------------------------ encoders


def _model_dir(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ConfigError(
            f"{key}: {p} is not a local transformers model folder (config.json "
            "missing). Save one with `Model.from_pretrained(id).save_pretrained"
            "(folder)` on a machine that can download, then point here."
        )
    return p


def _batched_features(
    items: list, batch_size: int, features: Callable[[list], torch.Tensor]
) -> torch.Tensor:
    """`features` over `items` in batches, L2-normalized on the CPU ([0] when empty)."""
    out = [
        features(items[i : i + batch_size]).float().cpu() for i in range(0, len(items), batch_size)
    ]
    return normalize(torch.cat(out)) if out else torch.zeros(0)


def _pooled(output: Any) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features, 5 an output with pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEncoder:
    """CLIP text and image features from a local CLIPModel folder (with its tokenizer)."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoTokenizer, CLIPModel

        folder = _model_dir(path, "metrics.clip_model")
        try:
            self.model = CLIPModel.from_pretrained(folder).eval().to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"metrics.clip_model: cannot load a CLIP model and tokenizer from {folder}: {e}"
            ) from e
        size = self.model.config.vision_config.image_size
        self.preprocess = load_preprocess(
            folder, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, {"shortest_edge": size}
        )
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.device, self.batch_size, self.path = device, batch_size, str(folder)

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        def features(chunk: list[Image.Image]) -> torch.Tensor:
            pixels = self.preprocess(chunk).to(self.device)
            return _pooled(self.model.get_image_features(pixel_values=pixels))

        return _batched_features(images, self.batch_size, features)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        def features(chunk: list[str]) -> torch.Tensor:
            tok = self.tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            return _pooled(
                self.model.get_text_features(
                    input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
                )
            )

        return _batched_features(texts, self.batch_size, features)


class DinoEncoder:
    """CLS-token features of a self-supervised ViT (DINO, DINOv2) via `AutoModel`."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoModel

        folder = _model_dir(path, "metrics.dino_model")
        try:
            try:  # ViTModel's pooler is a classifier head DINO never trained; leave it out
                model = AutoModel.from_pretrained(folder, add_pooling_layer=False)
            except TypeError:
                model = AutoModel.from_pretrained(folder)
            self.model = model.eval().to(device)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"metrics.dino_model: cannot load a ViT from {folder}: {e}") from e
        size = getattr(self.model.config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        # DINO's own evaluation resizes the short side to 256/224 of the input, then crops.
        self.preprocess = load_preprocess(
            folder, size, IMAGENET_MEAN, IMAGENET_STD, {"shortest_edge": size * 256 // 224}
        )
        self.device, self.batch_size, self.path = device, batch_size, str(folder)

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        def features(chunk: list[Image.Image]) -> torch.Tensor:
            pixels = self.preprocess(chunk).to(self.device)
            return self.model(pixel_values=pixels).last_hidden_state[:, 0]  # the CLS token

        return _batched_features(images, self.batch_size, features)
