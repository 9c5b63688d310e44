"""Pivotal tuning: a new token's embedding (Textual Inversion) trained beside a LoRA or
DreamBooth, as diffusers' advanced DreamBooth-LoRA script (`--train_text_encoder_ti`) and
OneTrainer do.

The token is textual_inversion's (`placeholder_token`, `initializer_token`, `num_vectors`)
and a `TextualInversion` object does all of its work: adding the token, masking the
gradient to the new rows, restoring every other row bit for bit after each step, the
checkpoint rows, and the saved files. This mixin only joins it to the host method:

- its own param group (`pivotal.learning_rate`, default train.lr);
- after `pivotal.stop_after` the table stops requiring grad: AdamW then skips it, so the
  new rows stay exactly as they were (and whether it still trains is checkpoint state);
- the checkpoint holds the new rows (not the table) beside the host's weights;
- the saved artifact is the host's plus the embedding in the diffusers layout
  (`learned_embeds.safetensors`) and the webui/ComfyUI one (`<token>.safetensors`, `.pt`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from personalize.adapters.clients import log_client_guide
from personalize.adapters.embeddings import webui_name
from personalize.adapters.lora import KOHYA_WEIGHTS, LORA_WEIGHTS
from personalize.errors import need
from personalize.methods.base import SAVED_APART
from personalize.methods.textual_inversion import STATE_KEY, TextualInversion
from personalize.models import SDParts

logger = logging.getLogger(__name__)

# The host's files the embedding's `<name>.safetensors` must not overwrite.
_HOST_FILES = (LORA_WEIGHTS, KOHYA_WEIGHTS)

# Whether the embedding still trains (1.0) or was stopped (0.0): a run resumed after
# pivotal.stop_after must not move it for one more step.
TRAINING_KEY = "_pivotal.embedding_training"


class PivotalTuningHooks:
    """The Method hooks of pivotal tuning for lora and dreambooth: the first base of the
    method's final class, whose other base is the whole method (so these wrap its own
    hooks, e.g. `class LoRA(PivotalTuningHooks, LoRAAdapters)`). Each hook is the host's
    own when pivotal.enabled is false."""

    cfg: Any

    @property
    def embedding(self) -> TextualInversion | None:
        """The token's Textual Inversion, or None without pivotal tuning."""
        if not self.cfg.pivotal.enabled:
            return None
        if getattr(self, "_embedding", None) is None:
            # Captions mode: the token is learned from data.prompt and the captions, the same
            # examples the LoRA/DreamBooth learns from (no TI templates).
            ti = dataclasses.replace(self.cfg.textual_inversion, learnable_property="caption")
            self._embedding = TextualInversion(dataclasses.replace(self.cfg, textual_inversion=ti))
            stem = webui_name(self._embedding.placeholder)
            need(
                f"{stem}.safetensors" not in _HOST_FILES,
                "textual_inversion.placeholder_token",
                f"{self._embedding.placeholder!r} would overwrite the LoRA's {stem}.safetensors; "
                "choose another name",
            )
        return self._embedding

    # --- what is trainable -------------------------------------------------------------

    def setup(self, parts: SDParts) -> list[dict[str, Any]]:
        groups = super().setup(parts)
        if self.embedding is None:
            return groups
        host = [p for g in groups for p in g["params"]]
        (group,) = self.embedding.setup(parts)
        # TI froze the whole text encoder (its resize builds a new table); the host's text
        # encoder weights (a LoRA on it) train on.
        for p in host:
            p.requires_grad_(True)
        table = group["params"][0]
        setattr(table, SAVED_APART, True)  # the checkpoint holds its new rows only
        group["lr"] = self.cfg.pivotal.learning_rate or self.cfg.train.lr
        stop = self.cfg.pivotal.stop_step(self.cfg.train.max_steps)
        logger.info(
            "pivotal tuning: embedding %s at LR %g%s; write %s in prompts",
            self.embedding.placeholder,
            group["lr"],
            f", trained for {stop} step(s)" if stop is not None else "",
            self.embedding.placeholder,
        )
        return [*groups, group]

    def _table(self, parts: SDParts) -> torch.nn.Parameter:
        return parts.text_encoder.get_input_embeddings().weight

    def embedding_training(self, parts: SDParts) -> bool:
        return bool(self._table(parts).requires_grad)

    def _stop_embedding(self, parts: SDParts) -> None:
        # No gradient from now on: AdamW skips the table (no update, no weight decay).
        self._table(parts).requires_grad_(False)
        if not any(p.requires_grad for p in parts.text_encoder.parameters()):
            parts.text_encoder.train(False)

    def after_optimizer_step(self, parts: SDParts, step: int) -> None:
        super().after_optimizer_step(parts, step)
        if self.embedding is None:
            return
        self.embedding.after_optimizer_step(parts, step)
        stop = self.cfg.pivotal.stop_step(self.cfg.train.max_steps)
        if stop is not None and step >= stop and self.embedding_training(parts):
            self._stop_embedding(parts)
            logger.info(
                "pivotal tuning: embedding frozen after %d steps (pivotal.stop_after)", step
            )

    # --- captions and prompts ----------------------------------------------------------

    def caption_fn(self):
        if self.embedding is None:
            return super().caption_fn()
        return self.embedding.caption_fn()  # checks the token, expands a multi-vector one

    def wrap_train_dataset(self, dataset, parts: SDParts, accelerator):
        if self.embedding is not None:
            self.embedding._check_captions(dataset)  # before class images are generated
        return super().wrap_train_dataset(dataset, parts, accelerator)

    def validation_prompts(self, prompts: list[str]) -> list[str]:
        prompts = super().validation_prompts(prompts)
        if self.embedding is None:
            return prompts
        return self.embedding.validation_prompts(prompts)  # {} = the token; warns without it

    # --- checkpoints -------------------------------------------------------------------

    def trainable_state_dict(self, parts: SDParts) -> dict[str, torch.Tensor]:
        state = super().trainable_state_dict(parts)
        if self.embedding is None:
            return state
        state.update(self.embedding.trainable_state_dict(parts))
        state[TRAINING_KEY] = torch.tensor(float(self.embedding_training(parts)))
        return state

    def load_trainable_state_dict(self, parts: SDParts, state: dict[str, torch.Tensor]) -> None:
        if self.embedding is None:
            return super().load_trainable_state_dict(parts, state)
        state = dict(state)
        own = {k: state.pop(k) for k in (STATE_KEY, TRAINING_KEY) if k in state}
        training = own.pop(TRAINING_KEY, None)
        super().load_trainable_state_dict(parts, state)
        self.embedding.load_trainable_state_dict(parts, own)
        if training is not None and not bool(training) and self.embedding_training(parts):
            self._stop_embedding(parts)

    # --- what is saved -----------------------------------------------------------------

    def save(self, out_dir: Path, parts: SDParts, step: int) -> Path:
        path = super().save(out_dir, parts, step)
        if self.embedding is not None:
            self.embedding.save_embedding_files(out_dir, parts, step)
            log_client_guide(
                "pivotal",
                Path(out_dir),
                stem=webui_name(self.embedding.placeholder),
                token=self.embedding.placeholder,
            )
        return path
