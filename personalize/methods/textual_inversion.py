"""Textual Inversion: learn only the embedding row(s) of a new pseudo-word.

What trains: the text encoder's token embedding table (SDXL: both text encoders' tables, as
diffusers' textual_inversion_sdxl.py trains them), but only the rows of the new placeholder
token(s) may change. Gradients of every other row are masked to zero (so
gradient clipping and the logged norm see only the new rows), and after each optimizer step
every other row is copied back from a copy taken before training, bit for bit: AdamW's
weight decay touches the whole table, and a mixed-precision cast may round it.
What joins the loss: nothing. What is saved: the new rows, as diffusers'
`learned_embeds.safetensors` and as the webui's `.pt` and single-tensor `.safetensors`; for
SDXL as diffusers' pair `learned_embeds.safetensors` + `learned_embeds_2.safetensors` and one
`clip_l`/`clip_g` `.safetensors` for the webui, ComfyUI and kohya.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from personalize.adapters.clients import log_client_guide
from personalize.adapters.embeddings import (
    DIFFUSERS_FILE,
    DIFFUSERS_STEM,
    DIFFUSERS_STEM_2,
    expand_prompt,
    expand_tokens,
    save_diffusers,
    save_sdxl,
    save_single_tensor,
    save_webui_pt,
    webui_name,
)
from personalize.config import PersonalizeConfig
from personalize.data.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES, TemplateCaptions
from personalize.errors import ConfigError, need
from personalize.methods.base import Method
from personalize.models import SDParts

logger = logging.getLogger(__name__)

STATE_KEY = "text_encoder.placeholder_vectors"
STATE_KEY_2 = "text_encoder_2.placeholder_vectors"  # SDXL's second text encoder

_RESERVED_STEMS = (DIFFUSERS_STEM, DIFFUSERS_STEM_2)
_STATE_KEYS = {"text_encoder": STATE_KEY, "text_encoder_2": STATE_KEY_2}


_need = need  # the shared validator (personalize.errors.need)


class NewRows:
    """One text encoder's token table in which only the rows `ids` may change.

    Gradients of every other row are masked to zero (so gradient clipping and the logged norm
    see only the new rows), and after each optimizer step every other row is copied back
    from the table taken before training, bit for bit."""

    def __init__(self, text_encoder: torch.nn.Module, ids: list[int]):
        self.ids = ids
        self.embedding = text_encoder.get_input_embeddings()
        self._original = self.weight.detach().clone()  # the whole table before training
        self._exact = False  # the table holds _original's exact values (not a cast's)
        self._masks: dict[torch.device, torch.Tensor] = {}
        self.weight.requires_grad_(True)
        self.weight.register_hook(self._mask_grad)
        self.embedding.register_forward_pre_hook(self._exact_before_first_forward)

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.embedding.weight

    def vectors(self) -> torch.Tensor:
        """The learned vectors [num_vectors, dim], float32 on the CPU."""
        return self.weight[self.ids].detach().float().cpu().contiguous()

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        mask = self._masks.get(grad.device)
        if mask is None:
            mask = torch.zeros(grad.shape[0], 1, dtype=torch.bool, device=grad.device)
            mask[self.ids] = True
            self._masks[grad.device] = mask
        return grad.masked_fill(~mask, 0)

    def _original_on(self, device: torch.device) -> torch.Tensor:
        if self._original.device != device:
            self._original = self._original.to(device)
        return self._original

    @torch.no_grad()
    def restore_other_rows(self) -> None:
        weight = self.weight
        learned = weight[self.ids].clone()
        weight.copy_(self._original_on(weight.device))  # exact: the copy is the loaded dtype
        weight[self.ids] = learned
        self._exact = True

    @torch.no_grad()
    def set_rows(self, vectors: torch.Tensor) -> None:
        """Put `vectors` in the new rows (a resumed run) and every other row back."""
        self.weight[self.ids] = vectors.to(self.weight.device, self.weight.dtype)
        self.restore_other_rows()

    @torch.no_grad()
    def _exact_before_first_forward(self, module: torch.nn.Module, args) -> None:
        """The loop casts the table to the mixed-precision dtype and back to fp32, which rounds
        every row; the first step (of a fresh run: a resumed one restores in
        load_trainable_state_dict) must see the exact rows, as all later steps do."""
        if not self._exact:
            module.weight.copy_(self._original_on(module.weight.device))
            self._exact = True


def _tokenizers_and_encoders(parts: SDParts) -> dict[str, tuple[Any, torch.nn.Module]]:
    """(tokenizer, text encoder) by encoder name: text_encoder, and text_encoder_2 for SDXL."""
    tokenizers = {"text_encoder": parts.tokenizer, "text_encoder_2": parts.tokenizer_2}
    return {name: (tokenizers[name], te) for name, te in parts.text_encoders().items()}


class TextualInversion(Method):
    name = "textual_inversion"

    def __init__(self, cfg: PersonalizeConfig):
        super().__init__(cfg)
        c = cfg.textual_inversion
        token = c.placeholder_token
        _need(
            bool(token) and not any(ch.isspace() for ch in token),
            "textual_inversion.placeholder_token",
            f"must be one word without spaces, e.g. <my-cat>; got {token!r}",
        )
        _need("{}" not in token, "textual_inversion.placeholder_token", "must not contain {}")
        _need(
            webui_name(token) not in _RESERVED_STEMS,
            "textual_inversion.placeholder_token",
            f"{token!r} would overwrite {DIFFUSERS_FILE}; choose another name",
        )
        self.placeholder = token
        self.tokens = expand_tokens(token, c.num_vectors)
        if c.templates:
            self.templates = list(c.templates)
        else:
            self.templates = (
                STYLE_TEMPLATES if c.learnable_property == "style" else OBJECT_TEMPLATES
            )
        # Pivotal tuning (methods/pivotal.py) trains this token beside a LoRA or DreamBooth,
        # on the data's captions; error messages then name its setting.
        self._pivotal = cfg.pivotal.enabled and cfg.method != self.name
        self._trains_on_captions = (
            "pivotal.enabled" if self._pivotal else "textual_inversion.learnable_property=caption"
        )
        self.rows: dict[str, NewRows] = {}  # by text encoder name (SDXL: two)

    # --- what is trainable -------------------------------------------------------------

    @property
    def ids(self) -> list[int]:
        """The new tokens' ids in the (first) tokenizer."""
        return self.rows["text_encoder"].ids if self.rows else []

    def setup(self, parts: SDParts) -> list[dict[str, Any]]:
        encoders = _tokenizers_and_encoders(parts)
        # Every tokenizer is checked before any changes, as diffusers' SDXL script adds the
        # tokens to both.
        initial = {}
        for name, (tokenizer, te) in encoders.items():
            self._check_placeholder_is_new(tokenizer)
            initial[name] = self._initial_vectors(
                tokenizer, te.get_input_embeddings().weight.detach()
            )
        for name, (tokenizer, te) in encoders.items():
            self.rows[name] = self._add_rows(tokenizer, te, initial[name])
            logger.info(
                "textual inversion: %d new token(s) %s (ids %s) in %s's table of %d rows",
                len(self.tokens),
                self.tokens,
                self.rows[name].ids,
                name,
                self.rows[name].weight.shape[0],
            )
        return [{"params": [rows.weight for rows in self.rows.values()]}]

    def _add_rows(self, tokenizer, te: torch.nn.Module, init: torch.Tensor) -> NewRows:
        tokenizer.add_tokens(self.tokens)
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        # The tokenizer must read the placeholder back as exactly the new ids, or training
        # would learn rows no prompt ever reaches.
        got = tokenizer.encode(
            expand_prompt(f"a {self.placeholder}", self.placeholder, len(self.tokens)),
            add_special_tokens=False,
        )
        _need(
            got[-len(ids) :] == ids,
            "textual_inversion.placeholder_token",
            f"the tokenizer splits {self.placeholder!r} instead of reading it as the new "
            f"token ({got} vs {ids}); use lower case letters, digits, - and <>",
        )
        rows = te.get_input_embeddings().weight.shape[0]
        if max(ids) >= rows:
            # mean_resizing would draw the new rows from a fitted Gaussian; they are set below.
            te.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        te.requires_grad_(False)  # resizing built a new Embedding that requires grad
        weight = te.get_input_embeddings().weight
        with torch.no_grad():
            weight[ids] = init.to(weight.dtype)
        new_rows = NewRows(te, ids)
        self._compute_in_frozen_dtype(te)
        return new_rows

    @staticmethod
    def _compute_in_frozen_dtype(te: torch.nn.Module) -> None:
        """The loop keeps the trainable table in fp32 and casts the rest of the text encoder to
        the mixed-precision dtype. Hand the rest what it would get from a table of its own
        dtype: CPU autocast does not cast layer_norm, so fp32 activations meet bf16 weights
        there; gradients still flow back to the fp32 rows through the cast."""
        embedding = te.get_input_embeddings()
        frozen = next((p for p in te.parameters() if p is not embedding.weight), None)
        if frozen is None:
            return

        def to_frozen_dtype(module, args, output):
            return output.to(frozen.dtype)

        embedding.register_forward_hook(to_frozen_dtype)

    def _check_placeholder_is_new(self, tokenizer) -> None:
        vocab = tokenizer.get_vocab()
        taken = [
            t
            for t in self.tokens
            if t in vocab or len(tokenizer.encode(t, add_special_tokens=False)) == 1
        ]
        _need(
            not taken,
            "textual_inversion.placeholder_token",
            f"{taken} already in the tokenizer's vocabulary, so training would change "
            "an existing word; choose a new string such as <my-cat>",
        )

    def _initial_vectors(self, tokenizer, table: torch.Tensor) -> torch.Tensor:
        """Starting vectors: one initializer token for every vector, or one piece per vector
        when the initializer is exactly num_vectors tokens (the webui's rule)."""
        n, init = len(self.tokens), self.cfg.textual_inversion.initializer_token
        if init is None:
            logger.info(
                "textual_inversion.initializer_token is not set: starting from the mean embedding"
            )
            return table.float().mean(0, keepdim=True).repeat(n, 1)
        ids = tokenizer.encode(init, add_special_tokens=False)
        _need(
            bool(init.strip()) and bool(ids),
            "textual_inversion.initializer_token",
            "is empty; use a word close to the concept (e.g. cat), or null for the mean",
        )
        unk = getattr(tokenizer, "unk_token_id", None)
        _need(
            unk is None or unk not in ids or init.strip() == tokenizer.unk_token,
            "textual_inversion.initializer_token",
            f"{init!r} holds characters the tokenizer does not know",
        )
        if len(ids) == 1:
            return table[ids].float().repeat(n, 1)
        pieces = tokenizer.convert_ids_to_tokens(ids)
        _need(
            len(ids) == n,
            "textual_inversion.initializer_token",
            f"{init!r} is {len(ids)} tokens for this tokenizer ({pieces}); use a word that "
            f"is a single token, or set textual_inversion.num_vectors={len(ids)} so that each "
            "vector "
            "starts from one piece",
        )
        return table[ids].float()

    def vectors(self, parts: SDParts, encoder: str = "text_encoder") -> torch.Tensor:
        """The learned vectors [num_vectors, dim] of `encoder`, float32 on the CPU."""
        return self.rows[encoder].vectors()

    def after_optimizer_step(self, parts: SDParts, step: int) -> None:
        for rows in self.rows.values():
            rows.restore_other_rows()

    # --- captions ----------------------------------------------------------------------

    def training_prompt(self, prompt: str | None) -> str | None:
        """Object/style runs need no data.prompt: the first template only satisfies the
        dataset, templates replace it per example."""
        if self.cfg.textual_inversion.learnable_property != "caption" and not prompt:
            return self.templates[0].format(self.placeholder)
        return prompt

    def validation_prompts(self, prompts: list[str]) -> list[str]:
        """`{}` in validation prompts is the placeholder; sampling without prompts uses the
        first template."""
        prompts = [p.replace("{}", self.placeholder) for p in prompts]
        if self.cfg.validation.every_steps and not prompts:
            prompts = [self.templates[0].format(self.placeholder)]
        if prompts and not any(self.placeholder in p for p in prompts):
            logger.warning(
                "no validation.prompts contains %s: the samples will not show what it learns",
                self.placeholder,
            )
        return prompts

    def _caption_with_placeholder(self, caption: str) -> str:
        if not caption:
            return caption  # caption dropout: the unconditional example stays empty
        caption = caption.replace("{}", self.placeholder)
        if self.placeholder not in caption:
            from personalize.data import DataError

            raise DataError(
                f"caption {caption!r} does not contain the placeholder {self.placeholder} "
                f"({self._trains_on_captions} trains on your captions): put the token or {{}} "
                "in every caption and in data.prompt"
                + ("" if self._pivotal else ", or use learnable_property object/style")
            )
        return expand_prompt(caption, self.placeholder, len(self.tokens))

    def _template_caption(self, index: int) -> str:
        return expand_prompt(
            self.templates[index].format(self.placeholder), self.placeholder, len(self.tokens)
        )

    def caption_fn(self) -> Callable[[str], str]:
        if self.cfg.textual_inversion.learnable_property == "caption":
            return self._caption_with_placeholder
        # Object/style: the first template, so held-out (validation loss) examples are read
        # with one fixed prompt; training draws a template per example in TemplateCaptions.
        return lambda caption: self._template_caption(0) if caption else caption

    def wrap_train_dataset(self, dataset, parts: SDParts, accelerator):
        if self.cfg.textual_inversion.learnable_property == "caption":
            self._check_captions(dataset)
            return dataset
        return TemplateCaptions(dataset, self._template_caption, len(self.templates), self.cfg.seed)

    def _check_captions(self, dataset) -> None:
        """Every caption must hold the token; say so before training, naming the files."""
        records = getattr(dataset, "records", None)
        if records is None:
            return  # a foreign dataset: caption_fn still checks each example
        prompt = getattr(dataset, "instance_prompt", None)
        prompt_of = getattr(dataset, "prompt_of", lambda _: prompt)  # several concepts
        bad = [
            r.key
            for j, r in enumerate(records)
            if "{}" not in (r.caption or prompt_of(j) or "")
            and self.placeholder not in (r.caption or prompt_of(j) or "")
        ]
        if bad:
            from personalize.data import DataError

            raise DataError(
                f"{len(bad)} caption(s) do not contain the placeholder {self.placeholder} or "
                f"{{}} (e.g. {', '.join(bad[:5])}); with {self._trains_on_captions} every "
                "caption (and data.prompt for images without one) must name the token"
            )

    # --- what is saved -----------------------------------------------------------------

    def _metadata(self, parts: SDParts, step: int) -> dict[str, str]:
        return {
            "personalize_method": self.name,
            "personalize_placeholder_token": self.placeholder,
            "personalize_num_vectors": str(len(self.tokens)),
            "personalize_initializer_token": str(self.cfg.textual_inversion.initializer_token),
            "personalize_text_width": "+".join(
                str(rows.weight.shape[1]) for rows in self.rows.values()
            ),
            "personalize_base_model": parts.source,
            "personalize_step": str(step),
        }

    def save_every(self) -> int:
        return self.cfg.textual_inversion.save_every

    def _save_diffusers(self, out_dir: Path, parts: SDParts, step: int, suffix: str) -> Path:
        """diffusers' file(s): `learned_embeds{suffix}.safetensors`, and for SDXL
        `learned_embeds_2{suffix}.safetensors` beside it (as textual_inversion_sdxl.py
        names them)."""
        meta = self._metadata(parts, step)
        stems = {"text_encoder": DIFFUSERS_STEM, "text_encoder_2": DIFFUSERS_STEM_2}
        paths = [
            save_diffusers(
                Path(out_dir) / f"{stems[name]}{suffix}.safetensors",
                self.placeholder,
                rows.vectors(),
                meta,
            )
            for name, rows in self.rows.items()
        ]
        return paths[0]

    def save_intermediate(self, out_dir: Path, parts: SDParts, step: int) -> Path:
        return self._save_diffusers(out_dir, parts, step, f"-steps-{step}")

    def save(self, out_dir: Path, parts: SDParts, step: int) -> Path:
        path = self.save_embedding_files(out_dir, parts, step)
        guide = "textual_inversion_sdxl" if parts.is_sdxl else "textual_inversion"
        log_client_guide(guide, Path(out_dir), stem=webui_name(self.placeholder))
        return path

    def save_embedding_files(self, out_dir: Path, parts: SDParts, step: int) -> Path:
        """The diffusers file and the webui/ComfyUI files, without the log line (pivotal
        tuning saves them beside its LoRA and says where each goes itself)."""
        out_dir = Path(out_dir)
        path = self._save_diffusers(out_dir, parts, step, "")
        stem = webui_name(self.placeholder)
        if parts.is_sdxl:
            # One file for the webui, ComfyUI and kohya; the webui names it by its file.
            save_sdxl(
                out_dir / f"{stem}.safetensors",
                stem,
                self.vectors(parts),
                self.vectors(parts, "text_encoder_2"),
                step,
                self._metadata(parts, step),
            )
            return path
        vectors, meta = self.vectors(parts), self._metadata(parts, step)
        # The webui names an embedding by its file; both files carry the same vectors.
        save_webui_pt(
            out_dir / f"{stem}.pt",
            stem,
            vectors,
            step,
            Path(parts.source).name if parts.source else None,
        )
        save_single_tensor(out_dir / f"{stem}.safetensors", stem, vectors, step, meta)
        return path

    def trainable_state_dict(self, parts: SDParts) -> dict[str, torch.Tensor]:
        # Only the new rows: the rest of the table is the base model's and is rebuilt by
        # setup() (which also re-adds the tokens) when a run resumes.
        return {
            _STATE_KEYS[name]: rows.weight[rows.ids].detach().contiguous()
            for name, rows in self.rows.items()
        }

    def load_trainable_state_dict(self, parts: SDParts, state: dict[str, torch.Tensor]) -> None:
        expected = {
            _STATE_KEYS[name]: (len(rows.ids), rows.weight.shape[1])
            for name, rows in self.rows.items()
        }
        found = {k: tuple(v.shape) for k, v in state.items()}
        if found != expected:
            raise ConfigError(
                f"checkpoint does not hold this run's placeholder vectors: found "
                f"{ {k: list(v) for k, v in found.items()} }, expected "
                f"{ {k: list(v) for k, v in expected.items()} }; was it written by another "
                "method, textual_inversion.num_vectors or base model?"
            )
        for name, rows in self.rows.items():
            rows.set_rows(state[_STATE_KEYS[name]])

    # --- the demo ----------------------------------------------------------------------

    @classmethod
    def demo_overrides(cls) -> dict[str, Any]:
        # Captions mode: the demo trains on the very prompt it samples with, which also suits
        # small models that know few of the template words. The tiny test tokenizer is byte
        # level: "o" is one token, a word is several. Two vectors show the multi-vector path.
        return {
            "data": {"prompt": "a photo of <sks-disc>"},
            "train": {"lr": 5e-3},
            "textual_inversion": {
                "placeholder_token": "<sks-disc>",
                "initializer_token": "o",
                "num_vectors": 2,
                "learnable_property": "caption",
            },
        }

    @classmethod
    def toy_world_recipe(cls, identifier, class_word, unet_config) -> dict[str, Any]:
        token = f"<{identifier}-{class_word}>"
        return {
            "steps": 600,
            "config": {
                "data": {"prompt": f"a {token}"},
                "textual_inversion": {"placeholder_token": token, "initializer_token": class_word},
            },
        }
