"""Subject metrics on the toy world, after the DreamBooth paper (Ruiz et al. 2023, 4.1), with
the shipped classifier standing in for DINO / CLIP:

- subject fidelity ("toy-I"): mean cosine between the classifier's features of generated
  images and of the real instance images (DINO / CLIP-I in the paper);
- subject match: the fraction of generated images the classifier reads as the subject's
  shape AND pattern (a striped heart, not any heart) - the same question, as a rate;
- prompt fidelity ("toy-T"): for prompts that ask for a background, the fraction whose
  background the classifier reads as the one asked for (CLIP-T in the paper);
- PRES: subject fidelity of *class-prompt* images ("a heart"): how far the whole class
  drifted toward the subject (lower is better); reported with the class images' subject
  match rate, which says the same in counts;
- DIV: mean pairwise feature distance (1 - cosine) among one prompt's images over seeds,
  averaged over prompts (LPIPS in the paper).
"""

from __future__ import annotations

import numpy as np
import torch

from personalize.errors import EvaluationError
from personalize.toyworld.subjects import Subject


def _embed(classifier, images) -> torch.Tensor:
    return classifier.embed(np.asarray(images) if isinstance(images, np.ndarray) else images)


def feature_similarity(classifier, images, reference) -> float:
    """Mean cosine over every (generated, reference) pair."""
    a, b = _embed(classifier, images), _embed(classifier, reference)
    return float((a @ b.T).mean())


def subject_match_rate(classifier, images, subject: Subject) -> float:
    preds = classifier.predict(images)
    hits = [
        p["shape"] == subject.look.shape and p["pattern"] == subject.look.pattern for p in preds
    ]
    return float(np.mean(hits))


def background_rate(classifier, images, backgrounds: list[str]) -> float:
    preds = classifier.predict(images)
    return float(np.mean([p["background"] == bg for p, bg in zip(preds, backgrounds)]))


def diversity(classifier, groups: list) -> float:
    """Mean over groups of the mean pairwise 1 - cosine within the group."""
    per_group = []
    for images in groups:
        f = _embed(classifier, images)
        n = len(f)
        if n < 2:
            continue
        sim = f @ f.T
        per_group.append(float((1 - sim[~torch.eye(n, dtype=torch.bool)]).mean()))
    if not per_group:
        raise EvaluationError("diversity needs at least one prompt with two or more images")
    return float(np.mean(per_group))
