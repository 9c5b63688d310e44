"""Textual Inversion embedding files: read, write, and load into a pipeline.

Three layouts are in use (docs/textual_inversion.md, REFERENCE.md):

- diffusers: `learned_embeds.safetensors` (or `.bin`) = `{token: tensor[n, dim]}`; a
  multi-vector token loads as `token, token_1, ..., token_{n-1}`.
- webui `.pt`: a pickled dict `{"string_to_token": {"*": 265}, "string_to_param":
  {"*": tensor[n, dim]}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}`.
- single tensor files: safetensors cannot nest dicts, so the webui reads a `.safetensors`
  embedding as a dict holding exactly one tensor (kohya writes `{"emb_params": tensor}`).

In the webui the trigger word is the file name; in diffusers it is the dict key (or the
webui `name`). We follow both: a diffusers key names the token, a generic key
(`emb_params`, `*`) or a webui dict falls back to the file name.
"""

from __future__ import annotations

import logging
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from personalize.errors import ArtifactNotFoundError, EmbeddingError
from personalize.io import atomic_save_safetensors, atomic_save_webui_pt, torch_load_reason

logger = logging.getLogger(__name__)

DIFFUSERS_FILE = "learned_embeds.safetensors"
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

    vectors: torch.Tensor  # [num_vectors, dim], float32
    token: str  # the trigger word a prompt must contain
    step: int | None = None
    layout: str = "diffusers"  # diffusers | webui | single_tensor
    metadata: dict[str, str] = field(default_factory=dict)

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


def _sdxl_error(path: Path) -> EmbeddingError:
    return EmbeddingError(
        f"{path} is an SDXL embedding (clip_l + clip_g tensors); personalize loads SD 1.x/2.x "
        "embeddings. Load it into an SDXL pipeline with diffusers' load_textual_inversion, "
        "once per text encoder (state_dict['clip_l'] and ['clip_g'])."
    )


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
    if {"clip_l", "clip_g"} <= set(data):
        raise _sdxl_error(path)
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
        step = metadata.get("step")
        return Embedding(
            vectors,
            token,
            int(step) if step and step.isdigit() else None,
            "single_tensor",
            metadata,
        )
    step = metadata.get("personalize_step")
    return Embedding(
        vectors, key, int(step) if step and step.isdigit() else None, "diffusers", metadata
    )


def read_embedding(path: str | Path) -> Embedding:
    """Read any embedding layout above from a file (or a training output folder)."""
    path = Path(path)
    if path.is_dir():
        if not (path / DIFFUSERS_FILE).is_file():
            raise EmbeddingError(f"{path} holds no {DIFFUSERS_FILE}")
        path = path / DIFFUSERS_FILE
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


def save_embedding(emb: Embedding, path: str | Path) -> Path:
    """Write `emb` in the layout the suffix implies: `.pt` = webui, `.safetensors` = diffusers
    when `emb.token` is a usable key, else single tensor."""
    path = Path(path)
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
                if set(keys) == {"clip_l", "clip_g"}:
                    return path  # SDXL: claimed so that loading says why it cannot
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


def _describe_width(dim: int) -> str:
    return f"{dim} ({KNOWN_WIDTHS[dim]})" if dim in KNOWN_WIDTHS else str(dim)


def load_embedding(pipe, path: str | Path, token: str | None = None) -> list[str]:
    """Add the embedding at `path` to `pipe` under `token` (default: the file's token);
    return the tokens added. Checks what diffusers' loader would get wrong silently or with
    a vague message: the width, a token that is already taken, a token the tokenizer would
    never produce as one piece."""
    emb = read_embedding(path)
    token = token or emb.token
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    width = text_encoder.get_input_embeddings().weight.shape[-1]
    if emb.dim != width:
        raise EmbeddingError(
            f"{path}: embedding width {_describe_width(emb.dim)} does not fit this pipeline's "
            f"text encoder width {_describe_width(width)}; it was made for another base model. "
            "Use an embedding trained on this model family."
        )
    if not token or any(ch.isspace() for ch in token):
        raise EmbeddingError(
            f"{path}: token {token!r} must be one word without spaces; "
            "pass another with adapter_name="
        )
    tokens = expand_tokens(token, emb.num_vectors)
    taken = [t for t in tokens if t in tokenizer.get_vocab()]
    if taken:
        raise EmbeddingError(
            f"{path}: token(s) {taken} are already in the tokenizer (a word of the model, or an "
            "embedding loaded before). Load it under another token: "
            "personalize.load(pipe, path, adapter_name='<my-token>')."
        )
    # Make room first: diffusers' loader would fit a Gaussian to the whole table to draw rows
    # it then overwrites (and log about it); at the size it asks for, its resize is a no-op.
    needed = len(tokenizer) + len(tokens)
    if text_encoder.get_input_embeddings().weight.shape[0] < needed:
        text_encoder.resize_token_embeddings(needed, mean_resizing=False)
    # diffusers' loader reads a bare tensor with an explicit token, whatever the layout.
    pipe.load_textual_inversion(
        emb.vectors.to(text_encoder.dtype),
        token=token,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
    )
    ids = tokenizer.convert_tokens_to_ids(tokens)
    got = tokenizer.encode(" ".join(tokens), add_special_tokens=False)
    if got != ids:
        raise EmbeddingError(
            f"{path}: the tokenizer does not read {token!r} back as the added token "
            f"({got} != {ids}), so prompts could never use it; pass another adapter_name "
            "(lower case, no spaces)."
        )
    _warn_when_unused(pipe, token)
    logger.info(
        "embedding %s: %d vector(s) of width %d; write %s in the prompt",
        path,
        emb.num_vectors,
        emb.dim,
        token,
    )
    return tokens


def _warn_when_unused(pipe, token: str) -> None:
    """ "My embedding does nothing" is most often a prompt without its token (diffusers
    #3097, webui #1355). Every SD pipeline passes prompts through `maybe_convert_prompt`;
    we wrap it on this pipeline to warn, once per token, when a prompt lacks the token."""
    loaded: list[str] = pipe.__dict__.setdefault("_personalize_embedding_tokens", [])
    loaded.append(token)
    if pipe.__dict__.get("_personalize_unused_check"):
        return
    pipe.__dict__["_personalize_unused_check"] = True
    warned: set[str] = set()
    original = pipe.maybe_convert_prompt

    def maybe_convert_prompt(self, prompt, tokenizer):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        for tok in loaded:
            text = [p for p in prompts if p]
            if tok not in warned and text and not any(tok in p for p in text):
                warned.add(tok)
                logger.warning(
                    "prompt %r does not contain the embedding token %s, so the embedding "
                    "does not act on it (fine for a negative prompt or a comparison; "
                    "otherwise write %s in the prompt)",
                    text[0],
                    tok,
                    tok,
                )
        return original(prompt, tokenizer)

    pipe.__dict__["maybe_convert_prompt"] = types.MethodType(maybe_convert_prompt, pipe)


def apply_embedding(pipe, path: Path, strength: float, adapter_name: str | None) -> None:
    """`personalize.load` for embeddings: `adapter_name` overrides the trigger token."""
    if strength != 1.0:
        raise EmbeddingError(
            f"{path}: an embedding has no strength; weight it in the prompt instead "
            "(e.g. repeat the token, or use a prompt-weighting library)"
        )
    file = detect_embedding(path) or path
    load_embedding(pipe, file, token=adapter_name)
