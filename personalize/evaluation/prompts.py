"""Evaluation prompts: the DreamBench templates (DreamBooth paper, Ruiz et al. 2023) or a file.

A template holds `{token}` (the learned identifier, e.g. `sks` or a Textual Inversion
placeholder like `<concept>`) and `{class_name}` (the subject's class, e.g. `dog`). The
same template is filled per column, so a Textual Inversion column can use its own token
while the base model and a LoRA use `sks`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from personalize.errors import PromptError

# The 25 DreamBench prompts for objects (backpack, can, sneaker, ...).
OBJECT_TEMPLATES = [
    "a {token} {class_name} in the jungle",
    "a {token} {class_name} in the snow",
    "a {token} {class_name} on the beach",
    "a {token} {class_name} on a cobblestone street",
    "a {token} {class_name} on top of pink fabric",
    "a {token} {class_name} on top of a wooden floor",
    "a {token} {class_name} with a city in the background",
    "a {token} {class_name} with a mountain in the background",
    "a {token} {class_name} with a blue house in the background",
    "a {token} {class_name} on top of a purple rug in a forest",
    "a {token} {class_name} with a wheat field in the background",
    "a {token} {class_name} with a tree and autumn leaves in the background",
    "a {token} {class_name} with the Eiffel Tower in the background",
    "a {token} {class_name} floating on top of water",
    "a {token} {class_name} floating in an ocean of milk",
    "a {token} {class_name} on top of green grass with sunflowers around it",
    "a {token} {class_name} on top of a mirror",
    "a {token} {class_name} on top of the sidewalk in a crowded street",
    "a {token} {class_name} on top of a dirt road",
    "a {token} {class_name} on top of a white rug",
    "a red {token} {class_name}",
    "a purple {token} {class_name}",
    "a shiny {token} {class_name}",
    "a wet {token} {class_name}",
    "a cube shaped {token} {class_name}",
]

# The 25 DreamBench prompts for live subjects (dogs, cats): accessories and outfits
# replace the object set's scene prompts 11-20.
LIVE_TEMPLATES = [
    *OBJECT_TEMPLATES[:10],
    "a {token} {class_name} wearing a red hat",
    "a {token} {class_name} wearing a santa hat",
    "a {token} {class_name} wearing a rainbow scarf",
    "a {token} {class_name} wearing a black top hat and a monocle",
    "a {token} {class_name} in a chef outfit",
    "a {token} {class_name} in a firefighter outfit",
    "a {token} {class_name} in a police outfit",
    "a {token} {class_name} wearing pink glasses",
    "a {token} {class_name} wearing a yellow shirt",
    "a {token} {class_name} in a purple wizard outfit",
    *OBJECT_TEMPLATES[20:],
]

TEMPLATE_SETS = {"object": OBJECT_TEMPLATES, "live": LIVE_TEMPLATES}

DEFAULT_CLASS_PROMPTS = ["a photo of a {class_name}"]


def fill(template: str, token: str, class_name: str) -> str:
    """`{token}`/`{class_name}` replaced and spaces tidied, so an empty token or class
    leaves no double space ("a  dog")."""
    text = template.replace("{token}", token).replace("{class_name}", class_name)
    return re.sub(r"\s+", " ", text).strip()


def clip_text(template: str, token: str, class_name: str) -> str:
    """The prompt CLIP-T compares an image with: the identifier removed, because a CLIP
    text encoder has never seen `sks` or `<concept>` and would score the rare token, not
    the scene ("a sks dog on the beach" -> "a dog on the beach")."""
    text = fill(template, "", class_name)
    if token:
        text = re.sub(rf"(?<!\S){re.escape(token)}(?!\S)", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a .txt (one per line, `#` comments), .json or .yaml list."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompts.file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise PromptError(f"prompts.file {path} cannot be parsed: {e}") from e
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise PromptError(f"prompts.file {path} must hold a list of prompt strings")
        prompts = [p.strip() for p in data if p.strip()]
    else:
        prompts = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    if not prompts:
        raise PromptError(f"prompts.file {path} holds no prompts")
    return prompts


def templates_for(template_set: str, file: str | None, count: int | None) -> list[str]:
    if file:
        templates = read_prompt_file(file)
    else:
        if template_set not in TEMPLATE_SETS:
            raise PromptError(
                f"prompts.template_set must be one of "
                f"{', '.join(TEMPLATE_SETS)} (or set prompts.file), "
                f"got {template_set!r}"
            )
        templates = TEMPLATE_SETS[template_set]
    if len(set(templates)) != len(templates):
        raise PromptError(
            "the prompt list holds duplicates; each prompt must be unique "
            "because images are stored by prompt"
        )
    return templates[:count] if count else list(templates)


@dataclass(frozen=True)
class Prompt:
    """One row of the evaluation: a template and whether it is a class prompt (for PRES)."""

    template: str
    is_class_prompt: bool = False

    def text(self, token: str, class_name: str) -> str:
        return fill(self.template, token, class_name)

    def folder_name(self, token: str, class_name: str) -> str:
        """A readable, collision-free folder name for this prompt's images: a slug of the
        text plus a hash of the exact text (two prompts can share a slug)."""
        text = self.text(token, class_name)
        slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "prompt"
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
        return f"{'class-' if self.is_class_prompt else ''}{slug}-{digest}"
