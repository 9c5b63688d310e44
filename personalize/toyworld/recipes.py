"""How each method learns a toy-world subject: the one place `personalize demo` and the
quality benchmark (`variants.py`) get it from. Each method says it in its own
`Method.toy_world_recipe` (steps, and how its config names the subject)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The rare word that names a subject in prompts ("a sks heart"), as in the DreamBooth paper.
IDENTIFIER = "sks"


def toy_recipe(method: str, subject, model_path: str | Path) -> dict[str, Any]:
    """`{"steps": N, "config": {...}}` for `method` on `subject` (a toyworld Subject) with the
    toy base model at `model_path`."""
    from personalize.methods import get_method

    unet_config = json.loads((Path(model_path) / "unet" / "config.json").read_text())
    return get_method(method).toy_world_recipe(IDENTIFIER, subject.class_word, unet_config)


def subject_phrase(prompt: str) -> str:
    """How prompts name the learned subject, from the instance prompt: "a sks heart" ->
    "sks heart", "a <sks-heart>" -> "<sks-heart>"."""
    return prompt[2:] if prompt.startswith("a ") else prompt
