"""Textual Inversion embedding files: read and write (adapters/embedding_load.py puts them
into a pipeline).

Three layouts are in use (docs/textual_inversion.md, REFERENCE.md):

- diffusers: `learned_embeds.safetensors` (or `.bin`) = `{token: tensor[n, dim]}`; a
  multi-vector token loads as `token, token_1, ..., token_{n-1}`.
- webui `.pt`: a pickled dict `{"string_to_token": {"*": 265}, "string_to_param":
  {"*": tensor[n, dim]}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}`.
- single tensor files: safetensors cannot nest dicts, so the webui reads a `.safetensors`
  embedding as a dict holding exactly one tensor (kohya writes `{"emb_params": tensor}`).
- SDXL (two text encoders): one file `{"clip_l": [n, 768], "clip_g": [n, 1280]}` (the webui,
  ComfyUI, kohya and diffusers' advanced SDXL script), or diffusers' pair
  `learned_embeds.safetensors` (text_encoder) + `learned_embeds_2.safetensors` (text_encoder_2)
  from `textual_inversion_sdxl.py`, each `{token: tensor}`.

In the webui the trigger word is the file name; in diffusers it is the dict key (or the
webui `name`). We follow both: a diffusers key names the token, a generic key
(`emb_params`, `*`) or a webui dict falls back to the file name.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from personalize.errors import ArtifactNotFoundError, EmbeddingError
from personalize.io import atomic_save_safetensors, atomic_save_webui_pt, torch_load_reason

logger = logging.getLogger(__name__)

DIFFUSERS_FILE = "learned_embeds.safetensors"
# diffusers' textual_inversion_sdxl.py writes text_encoder_2's vectors beside DIFFUSERS_FILE.
DIFFUSERS_STEM, DIFFUSERS_STEM_2 = "learned_embeds", "learned_embeds_2"
DIFFUSERS_FILE_2 = f"{DIFFUSERS_STEM_2}.safetensors"
# The keys of a one-file SDXL embedding: CLIP-L (text_encoder) and OpenCLIP-bigG (text_encoder_2).
SDXL_KEYS = ("clip_l", "clip_g")
# Keys that name a layout, not a token: the token then comes from the file name.
GENERIC_KEYS = ("emb_params", "*", "string_to_param.*")
PICKLE_SUFFIXES = (".pt", ".bin", ".pth")
# Embeddings are kilobytes (75 vectors x 1280 floats = 384 KB); a bigger pickle is some other
# artifact (a hypernetwork, a whole model) and is not unpickled just to find out.
MAX_EMBEDDING_BYTES = 16 * 1024 * 1024
# Text encoder widths of the base models users meet, to say where a file came from.
KNOWN_WIDTHS = {
    768: "SD 1.x (CLIP ViT-L)",
    1024: "SD 2.x (OpenCLIP ViT-H)",
    1280: "SDXL's second text encoder (OpenCLIP ViT-bigG)",
}


@dataclass
class Embedding:
    """One learned token: its vectors and where they came from."""

    vectors: torch.Tensor  # [num_vectors, dim], float32 (SDXL: text_encoder's, clip_l)
    token: str  # the trigger word a prompt must contain
    step: int | None = None
    layout: str = "diffusers"  # diffusers | webui | single_tensor | sdxl | diffusers_pair
    metadata: dict[str, str] = field(default_factory=dict)
    vectors_2: torch.Tensor | None = None  # SDXL: text_encoder_2's (clip_g); None otherwise

    @property
    def is_sdxl(self) -> bool:
        return self.vectors_2 is not None

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def expand_tokens(token: str, num_vectors: int) -> list[str]:
    """The tokens of a multi-vector embedding, named as diffusers' loader names them, so a
    prompt written for training reads the same at inference."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_prompt(prompt: str, token: str, num_vectors: int) -> str:
    """Write `token` as its `num_vectors` tokens, as diffusers' `maybe_convert_prompt` does.
    Already expanded names (`token_1`) are left alone."""
    if num_vectors == 1:
        return prompt
    pattern = re.escape(token) + r"(?!_\d)"
    return re.sub(pattern, lambda _: " ".join(expand_tokens(token, num_vectors)), prompt)


def webui_name(token: str) -> str:
    """The file stem the webui shows as the trigger word: it drops characters a file name
    cannot hold everywhere (same rule as the webui's create_embedding)."""
    name = "".join(ch for ch in token if ch.isalnum() or ch in "._- ").strip()
    return name or "embedding"


def _as_vectors(tensor: Any, where: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise EmbeddingError(f"{where}: expected a tensor, found {type(tensor).__name__}")
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.shape[0] == 0:
        raise EmbeddingError(
            f"{where}: expected a tensor [num_vectors, dim], found shape {list(tensor.shape)}"
        )
    return tensor.detach().float().contiguous()


def _step_of(metadata: dict[str, str], key: str = "step") -> int | None:
    step = metadata.get(key)
    return int(step) if step and step.isdigit() else None


def _sdxl_pair(vectors: torch.Tensor, vectors_2: torch.Tensor, path: Path, what: str) -> None:
    """Both encoders must see the same number of vectors: the webui counts the prompt's
    tokens from clip_g and reads that many rows of clip_l."""
    if vectors.shape[0] != vectors_2.shape[0]:
        raise EmbeddingError(
            f"{path}: {what} hold {vectors.shape[0]} and {vectors_2.shape[0]} vectors; an SDXL "
            "embedding has the same number for both text encoders"
        )


def _from_sdxl_dict(data: dict, path: Path, metadata: dict[str, str]) -> Embedding:
    """`{"clip_l": [n, 768], "clip_g": [n, 1280]}`: named by its file, as in the webui."""
    clip_l = _as_vectors(data["clip_l"], f"{path} ['clip_l']")
    clip_g = _as_vectors(data["clip_g"], f"{path} ['clip_g']")
    _sdxl_pair(clip_l, clip_g, path, "clip_l and clip_g")
    token = metadata.get("name") or path.stem
    return Embedding(clip_l, token, _step_of(metadata), "sdxl", metadata, vectors_2=clip_g)


def _from_dict(data: dict, path: Path, metadata: dict[str, str]) -> Embedding:
    stem = path.stem
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # torch 1.11 era ParameterDicts
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(
                f"{path}: string_to_param must hold exactly one tensor, "
                f"found {len(params) if isinstance(params, dict) else params}"
            )
        vectors = _as_vectors(next(iter(params.values())), f"{path} string_to_param")
        step = data.get("step")
        return Embedding(
            vectors,
            stem,
            step if isinstance(step, int) else None,
            "webui",
            {"name": str(data.get("name", stem))},
        )
    if set(SDXL_KEYS) <= set(data):
        return _from_sdxl_dict(data, path, metadata)
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != 1 or len(data) != 1:
        raise EmbeddingError(
            f"{path} is not a Textual Inversion embedding: expected one tensor (diffusers "
            f"{{token: tensor}}, kohya {{'emb_params': tensor}}) or a webui dict with "
            f"string_to_param, found keys {sorted(map(str, data))[:8]}"
        )
    key, tensor = next(iter(tensors.items()))
    vectors = _as_vectors(tensor, f"{path} [{key!r}]")
    if key in GENERIC_KEYS:
        token = metadata.get("name") or stem
        return Embedding(vectors, token, _step_of(metadata), "single_tensor", metadata)
    return Embedding(vectors, key, _step_of(metadata, "personalize_step"), "diffusers", metadata)


def diffusers_pair(path: Path) -> tuple[Path, Path] | None:
    """(text_encoder's, text_encoder_2's) files when `path` is one half of diffusers' SDXL
    pair (`learned_embeds[-steps-N]` + `learned_embeds_2[-steps-N]`, any suffix) and the
    other half lies beside it; else None."""
    name = path.name
    if name.startswith(DIFFUSERS_STEM_2):
        first = path.with_name(name.replace(DIFFUSERS_STEM_2, DIFFUSERS_STEM, 1))
        return (first, path) if first.is_file() else None
    if name.startswith(DIFFUSERS_STEM):
        second = path.with_name(name.replace(DIFFUSERS_STEM, DIFFUSERS_STEM_2, 1))
        return (path, second) if second.is_file() else None
    return None


def _read_pair(first: Path, second: Path) -> Embedding:
    one, two = _read_file(first), _read_file(second)
    for emb, file in ((one, first), (two, second)):
        if emb.is_sdxl or emb.layout == "webui":
            raise EmbeddingError(
                f"{file}: one half of a diffusers SDXL pair must be {{token: tensor}}, found "
                f"a {emb.layout} embedding"
            )
    _sdxl_pair(one.vectors, two.vectors, first, f"{first.name} and {second.name}")
    return Embedding(
        one.vectors, one.token, one.step, "diffusers_pair", one.metadata, vectors_2=two.vectors
    )


def read_embedding(path: str | Path) -> Embedding:
    """Read any embedding layout above from a file (or a training output folder). One half of
    diffusers' SDXL pair reads as the pair when the other half lies beside it."""
    path = Path(path)
    if path.is_dir():
        if not (path / DIFFUSERS_FILE).is_file():
            raise EmbeddingError(f"{path} holds no {DIFFUSERS_FILE}")
        path = path / DIFFUSERS_FILE
    pair = diffusers_pair(path) if path.is_file() else None
    if pair:
        return _read_pair(*pair)
    return _read_file(path)


def _read_file(path: Path) -> Embedding:
    if not path.is_file():
        raise ArtifactNotFoundError(f"embedding {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                data = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise EmbeddingError(f"{path} is not a readable safetensors file: {e}") from e
        return _from_dict(data, path, metadata)
    if path.suffix in PICKLE_SUFFIXES:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            why = torch_load_reason(e)  # torch's message is a page long
            raise EmbeddingError(
                f"{path} cannot be loaded safely (only tensors, numbers and strings are "
                f"unpickled): {why}. If you trust the file, re-save it as safetensors; see "
                "docs/textual_inversion.md, 'Loading embeddings made elsewhere'."
            ) from e
        if isinstance(data, torch.Tensor):
            return Embedding(_as_vectors(data, str(path)), path.stem, None, "single_tensor")
        if not isinstance(data, dict):
            raise EmbeddingError(
                f"{path}: expected a dict or a tensor, found {type(data).__name__}"
            )
        return _from_dict(data, path, {})
    raise EmbeddingError(f"{path}: embeddings are .safetensors, .pt, .bin or .pth files")


# ------------------------------------------------------------------------------ writing


def save_diffusers(
    path: str | Path, token: str, vectors: torch.Tensor, metadata: dict[str, str] | None = None
) -> Path:
    """`{token: [n, dim]}`, read by diffusers' `load_textual_inversion` and the webui."""
    return atomic_save_safetensors({token: _as_vectors(vectors, token)}, path, metadata)


def save_webui_pt(
    path: str | Path,
    name: str,
    vectors: torch.Tensor,
    step: int | None,
    checkpoint_name: str | None = None,
) -> Path:
    """The webui's own `.pt` layout (only plain types inside, so `weights_only` loads it),
    in the legacy serialization the webui's safe unpickler accepts (formats.py)."""
    data = {
        "string_to_token": {"*": 265},  # the webui's fixed placeholder id for "*"
        "string_to_param": {"*": _as_vectors(vectors, name).cpu()},
        "name": name,
        "step": step,
        "sd_checkpoint": None,  # the webui's short model hash; we do not compute it
        "sd_checkpoint_name": checkpoint_name,
    }
    return atomic_save_webui_pt(data, path)


def save_single_tensor(
    path: str | Path,
    name: str,
    vectors: torch.Tensor,
    step: int | None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """`{"emb_params": [n, dim]}` (kohya's layout): what the webui and ComfyUI read from a
    `.safetensors` embedding. Name and step travel in the metadata."""
    meta = dict(metadata or {}, name=name)
    if step is not None:
        meta["step"] = str(step)
    return atomic_save_safetensors({"emb_params": _as_vectors(vectors, name)}, path, meta)


def save_sdxl(
    path: str | Path,
    name: str,
    vectors: torch.Tensor,
    vectors_2: torch.Tensor,
    step: int | None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """`{"clip_l": text_encoder's [n, 768], "clip_g": text_encoder_2's [n, 1280]}`: the one
    SDXL embedding file the webui, ComfyUI and kohya read. Name and step in the metadata."""
    meta = dict(metadata or {}, name=name)
    if step is not None:
        meta["step"] = str(step)
    tensors = {"clip_l": _as_vectors(vectors, name), "clip_g": _as_vectors(vectors_2, name)}
    _sdxl_pair(tensors["clip_l"], tensors["clip_g"], Path(path), "clip_l and clip_g")
    return atomic_save_safetensors(tensors, path, meta)


def save_embedding(emb: Embedding, path: str | Path) -> Path:
    """Write `emb` in the layout the suffix implies: `.pt` = webui, `.safetensors` = diffusers
    when `emb.token` is a usable key, else single tensor; SDXL = clip_l/clip_g."""
    path = Path(path)
    if emb.is_sdxl:
        if path.suffix != ".safetensors":
            raise EmbeddingError(f"{path}: write SDXL embeddings as .safetensors")
        return save_sdxl(path, emb.token, emb.vectors, emb.vectors_2, emb.step)
    if path.suffix in PICKLE_SUFFIXES:
        return save_webui_pt(path, emb.token, emb.vectors, emb.step)
    if path.suffix != ".safetensors":
        raise EmbeddingError(f"{path}: write embeddings as .safetensors or .pt")
    if emb.layout == "diffusers":
        return save_diffusers(path, emb.token, emb.vectors, emb.metadata)
    return save_single_tensor(path, emb.token, emb.vectors, emb.step)


# ------------------------------------------------------------------------------ loading


def detect_embedding(path: str | Path) -> Path | None:
    """The embedding file at `path` (a file, or a training folder), or None if it is not one.
    Reads only shapes for safetensors; small pickles are loaded with weights_only."""
    path = Path(path)
    if path.is_dir():
        return path / DIFFUSERS_FILE if (path / DIFFUSERS_FILE).is_file() else None
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                if set(SDXL_KEYS) <= set(keys):
                    return path  # SDXL: both encoders' vectors
                if len(keys) == 1 and len(f.get_slice(keys[0]).get_shape()) in (1, 2):
                    return path
        except Exception as e:
            logger.debug("%s is not a safetensors embedding: %s", path, e)
        return None
    if path.suffix in PICKLE_SUFFIXES and path.stat().st_size <= MAX_EMBEDDING_BYTES:
        try:
            read_embedding(path)
            return path
        except (EmbeddingError, OSError) as e:
            logger.debug("%s is not an embedding: %s", path, e)
            # A webui embedding we refuse to unpickle is still claimed, so that loading says
            # why (torch's zip stores data.pkl uncompressed: its keys are plain bytes).
            if b"string_to_param" in path.read_bytes():
                return path
    return None
