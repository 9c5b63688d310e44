"""Load a Textual Inversion embedding (any layout adapters/embeddings.py reads) into a
diffusers pipeline: new tokens in the tokenizer(s), their rows in the text encoder(s) (both
for SDXL), and a warning when a prompt does not name the token."""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import torch

from personalize.adapters.embeddings import (
    DIFFUSERS_FILE,
    DIFFUSERS_FILE_2,
    KNOWN_WIDTHS,
    Embedding,
    detect_embedding,
    expand_tokens,
    read_embedding,
)
from personalize.errors import EmbeddingError

logger = logging.getLogger(__name__)


def _describe_width(dim: int) -> str:
    return f"{dim} ({KNOWN_WIDTHS[dim]})" if dim in KNOWN_WIDTHS else str(dim)


def _is_sdxl_pipeline(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None and (
        getattr(pipe, "tokenizer_2", None) is not None
    )


def _width(text_encoder) -> int:
    return int(text_encoder.get_input_embeddings().weight.shape[-1])


def _targets(pipe, emb: Embedding, path: Path) -> list[tuple[torch.Tensor, Any, Any]]:
    """(vectors, tokenizer, text_encoder) for every encoder the embedding goes into; a file
    of the other model family is refused in one line (the webui skips it silently)."""
    if _is_sdxl_pipeline(pipe) != emb.is_sdxl:
        if emb.is_sdxl:
            raise EmbeddingError(
                f"{path} is an SDXL embedding (clip_l {emb.dim} + clip_g "
                f"{emb.vectors_2.shape[1]} wide) and this pipeline has one text encoder "
                f"({_describe_width(_width(pipe.text_encoder))}): load it into a "
                "StableDiffusionXLPipeline, or use an embedding trained on this model"
            )
        raise EmbeddingError(
            f"{path} is a one-encoder embedding ({_describe_width(emb.dim)}) and this SDXL "
            "pipeline needs vectors for both text encoders (a clip_l + clip_g file, or "
            f"diffusers' {DIFFUSERS_FILE} + {DIFFUSERS_FILE_2}): train it on an SDXL model"
        )
    targets = [(emb.vectors, pipe.tokenizer, pipe.text_encoder)]
    if emb.is_sdxl:
        targets.append((emb.vectors_2, pipe.tokenizer_2, pipe.text_encoder_2))
    for (vectors, _, text_encoder), name in zip(targets, ("text_encoder", "text_encoder_2")):
        width = _width(text_encoder)
        if vectors.shape[1] != width:
            which, encoder = (f" for {name}", name) if emb.is_sdxl else ("", "text encoder")
            raise EmbeddingError(
                f"{path}: embedding width{which} {_describe_width(int(vectors.shape[1]))} does "
                f"not fit this pipeline's {encoder} width {_describe_width(width)}; it was made "
                "for another base model. Use an embedding trained on this model family."
            )
    return targets


def _add_tokens(pipe, path: Path, token: str, vectors: torch.Tensor, tokenizer, text_encoder):
    tokens = expand_tokens(token, int(vectors.shape[0]))
    # Make room first: diffusers' loader would fit a Gaussian to the whole table to draw rows
    # it then overwrites (and log about it); at the size it asks for, its resize is a no-op.
    needed = len(tokenizer) + len(tokens)
    if text_encoder.get_input_embeddings().weight.shape[0] < needed:
        text_encoder.resize_token_embeddings(needed, mean_resizing=False)
    # diffusers' loader reads a bare tensor with an explicit token, whatever the layout.
    pipe.load_textual_inversion(
        vectors.to(text_encoder.dtype), token=token, tokenizer=tokenizer, text_encoder=text_encoder
    )
    ids = tokenizer.convert_tokens_to_ids(tokens)
    got = tokenizer.encode(" ".join(tokens), add_special_tokens=False)
    if got != ids:
        raise EmbeddingError(
            f"{path}: the tokenizer does not read {token!r} back as the added token "
            f"({got} != {ids}), so prompts could never use it; pass another adapter_name "
            "(lower case, no spaces)."
        )
    return tokens


def load_embedding(pipe, path: str | Path, token: str | None = None) -> list[str]:
    """Add the embedding at `path` to `pipe` under `token` (default: the file's token);
    return the tokens added. An SDXL embedding goes into both text encoders of an SDXL
    pipeline. Checks what diffusers' loader would get wrong silently or with a vague
    message: the model family and width, a token that is already taken, a token the
    tokenizer would never produce as one piece."""
    emb = read_embedding(path)
    token = token or emb.token
    targets = _targets(pipe, emb, Path(path))
    if not token or any(ch.isspace() for ch in token):
        raise EmbeddingError(
            f"{path}: token {token!r} must be one word without spaces; "
            "pass another with adapter_name="
        )
    tokens = expand_tokens(token, emb.num_vectors)
    # Every tokenizer is checked before any is changed, so a refusal leaves the pipe as it was.
    for _, tokenizer, _ in targets:
        taken = [t for t in tokens if t in tokenizer.get_vocab()]
        if taken:
            raise EmbeddingError(
                f"{path}: token(s) {taken} are already in the tokenizer (a word of the model, "
                "or an embedding loaded before). Load it under another token: "
                "personalize.load(pipe, path, adapter_name='<my-token>')."
            )
    for vectors, tokenizer, text_encoder in targets:
        _add_tokens(pipe, path, token, vectors, tokenizer, text_encoder)
    _warn_when_unused(pipe, token)
    logger.info(
        "embedding %s: %d vector(s) of width %s; write %s in the prompt",
        path,
        emb.num_vectors,
        " + ".join(str(int(v.shape[1])) for v, _, _ in targets),
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
