"""DreamBooth: fine-tune the UNet (and optionally the text encoder) on a few images of a
subject bound to a rare identifier ("a photo of sks dog"), Ruiz et al. 2023.

What trains: the whole UNet, or only the blocks named in `dreambooth.train_unet_blocks` (the
shallow ones stay as pretrained: "weight fixing"), plus the text encoder with its own LR
until `dreambooth.stop_text_encoder_training` (SDXL: both text encoders, the second at
`dreambooth.text_encoder_2_lr`). What joins the loss: prior preservation with class
images (methods/prior.py: `instance + prior_loss_weight * class`), or a distillation prior
from a frozen copy of the original UNet, and optionally the L2-SP pull toward the
pretrained weights (methods/regularizers.py). What is saved: a complete diffusers
pipeline in output_dir (`StableDiffusionPipeline.from_pretrained(output_dir)` loads it;
`StableDiffusionXLPipeline` for SDXL), optionally one original-layout .safetensors file for
webui/ComfyUI (the SGM layout for SDXL). With pivotal.enabled a new token's embedding trains
beside it and is saved next to the pipeline (methods/pivotal.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from personalize.adapters.pipeline import save_pipeline, save_single_file
from personalize.errors import ConfigError
from personalize.io import atomic_write_json
from personalize.methods import prior
from personalize.methods.base import SAVED_APART, Method
from personalize.methods.pivotal import PivotalTuningHooks
from personalize.methods.regularizers import Regularizers, build_regularizers
from personalize.models import SDParts
from personalize.precision import precision_dtype

logger = logging.getLogger(__name__)

_TE_STATE_KEY = "_dreambooth.text_encoder_training"


def unet_blocks(unet: torch.nn.Module) -> list[str]:
    """The UNet's top-level blocks as `dreambooth.train_unet_blocks` names them."""
    names = []
    for name, child in unet.named_children():
        if isinstance(child, torch.nn.ModuleList):
            names += [
                f"{name}.{i}" for i, c in enumerate(child) if any(True for _ in c.parameters())
            ]
        elif any(True for _ in child.parameters()):
            names.append(name)
    return names


def select_unet_params(unet: torch.nn.Module, blocks: list[str] | None) -> list[torch.nn.Parameter]:
    """Mark the UNet parameters to train: all, or those under the named (dotted) prefixes."""
    if blocks is None:
        unet.requires_grad_(True)
        return list(unet.parameters())
    named = list(unet.named_parameters())
    for block in blocks:
        if not any(n == block or n.startswith(block + ".") for n, _ in named):
            raise ConfigError(
                f"dreambooth.train_unet_blocks: {block!r} names no part of this UNet; "
                f"its blocks are {', '.join(unet_blocks(unet))} (a dotted "
                "sub-path like up_blocks.1.attentions works too)"
            )
    chosen = []
    for name, p in named:
        if any(name == b or name.startswith(b + ".") for b in blocks):
            p.requires_grad_(True)
            chosen.append(p)
    return chosen


class FullFineTuning(prior.PriorPreservationHooks, Method):
    """method dreambooth without pivotal tuning (`DreamBooth` below adds it as the outer
    layer)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.regularizers = Regularizers()

    # --- what is trainable -------------------------------------------------------------

    def setup(self, parts: SDParts) -> list[dict[str, Any]]:
        unet_params = select_unet_params(parts.unet, self.cfg.dreambooth.train_unet_blocks)
        groups = [{"params": unet_params}]
        trained = sum(p.numel() for p in unet_params)
        total = sum(p.numel() for p in parts.unet.parameters())
        logger.info(
            "DreamBooth: training %.1fM of %.1fM UNet weights%s",
            trained / 1e6,
            total / 1e6,
            f" ({', '.join(self.cfg.dreambooth.train_unet_blocks)})"
            if self.cfg.dreambooth.train_unet_blocks
            else "",
        )
        if self.cfg.dreambooth.train_text_encoder:
            c = self.cfg.dreambooth
            te_lr = c.text_encoder_lr or self.cfg.train.lr
            lrs = {"text_encoder": te_lr, "text_encoder_2": c.text_encoder_2_lr or te_lr}
            for name, text_encoder in parts.text_encoders().items():  # SDXL: both
                text_encoder.requires_grad_(True)
                groups.append({"params": list(text_encoder.parameters()), "lr": lrs[name]})
        self.regularizers = build_regularizers(self.cfg, parts, adapters=False)
        return groups

    # --- what is added to the loss -----------------------------------------------------

    def reduce_loss(self, per_example: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return prior.prior_preservation_loss(per_example, batch, self.cfg.prior.loss_weight)

    def extra_loss(self, batch, outputs, parts: SDParts) -> torch.Tensor | None:
        return self.regularizers(batch, outputs, parts) if self.regularizers else None

    def after_optimizer_step(self, parts: SDParts, step: int) -> None:
        stop = self.cfg.dreambooth.stop_text_encoder_training
        if stop is not None and step >= stop and self._text_encoder_training(parts):
            self._freeze_text_encoder(parts)
            logger.info(
                "text encoder frozen after %d steps (dreambooth.stop_text_encoder_training)", step
            )

    def _text_encoder_training(self, parts: SDParts) -> bool:
        return any(
            p.requires_grad for te in parts.text_encoders().values() for p in te.parameters()
        )

    def _freeze_text_encoder(self, parts: SDParts) -> None:
        # Their parameters then get no gradient, which AdamW skips (no update, no decay).
        for text_encoder in parts.text_encoders().values():
            text_encoder.requires_grad_(False)
            text_encoder.train(False)

    # --- checkpoints -------------------------------------------------------------------

    def _trainable_params(self, parts: SDParts) -> dict[str, torch.nn.Parameter]:
        """The trained weights, by name; the text encoders' also after they were frozen."""
        out = {}
        modules = {"unet": parts.unet, **parts.text_encoders()}
        for module_name, module in modules.items():
            everything = module_name != "unet" and self.cfg.dreambooth.train_text_encoder
            for name, p in module.named_parameters():
                if getattr(p, SAVED_APART, False):
                    continue  # pivotal tuning's embedding table (methods/pivotal.py)
                if p.requires_grad or everything:
                    out[f"{module_name}.{name}"] = p
        return out

    def trainable_state_dict(self, parts: SDParts) -> dict[str, torch.Tensor]:
        state = {k: p.detach().contiguous() for k, p in self._trainable_params(parts).items()}
        if self.cfg.dreambooth.train_text_encoder:
            # Whether the text encoder still trains is state too: a run resumed after
            # stop_text_encoder_training must not train it for one more step.
            state[_TE_STATE_KEY] = torch.tensor(float(self._text_encoder_training(parts)))
        return state

    def load_trainable_state_dict(self, parts: SDParts, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        te_training = state.pop(_TE_STATE_KEY, None)
        params = self._trainable_params(parts)
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise ConfigError(
                "checkpoint does not match this run's trainable weights "
                f"(missing: {missing[:5]}, unexpected: {unexpected[:5]}); was it written with "
                "other dreambooth.train_unet_blocks / dreambooth.train_text_encoder settings?"
            )
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)
        if te_training is not None and not bool(te_training) and self._text_encoder_training(parts):
            self._freeze_text_encoder(parts)

    # --- what is saved -----------------------------------------------------------------

    def save(self, out_dir: Path, parts: SDParts, step: int) -> Path:
        out_dir = Path(out_dir)
        trained = {"unet"}
        if self.cfg.dreambooth.train_text_encoder:
            trained |= set(parts.text_encoders())  # SDXL: both
        dtype = precision_dtype(self.cfg.dreambooth.save_precision)
        states = save_pipeline(
            out_dir,
            parts,
            trained=trained,
            dtype=dtype,
            copy_untouched=self.cfg.model.variant is None,
        )
        atomic_write_json(
            out_dir / "dreambooth.json",
            {
                "step": step,
                "base_model": parts.source,
                "instance_prompt": self.cfg.data.prompt,
                "class_prompt": self.cfg.prior.class_prompt,
                "trained": sorted(trained),
                "train_unet_blocks": self.cfg.dreambooth.train_unet_blocks,
            },
        )
        if self.cfg.dreambooth.save_single_file:
            save_single_file(
                out_dir / f"{Path(self.cfg.output_dir).name}.safetensors",
                out_dir,
                parts,
                states,
                dtype,
                step,
            )
        return out_dir

    @classmethod
    def demo_overrides(cls) -> dict[str, Any]:
        return {
            "train": {"lr": 2e-4},
            "prior": {
                "enabled": True,
                "class_prompt": "a photo of a disc",
                "num_class_images": 8,
                "generation_steps": 10,
                "generation_batch_size": 4,
            },
        }

    @classmethod
    def toy_world_recipe(cls, identifier, class_word, unet_config) -> dict[str, Any]:
        recipe = super().toy_world_recipe(identifier, class_word, unet_config)
        recipe["steps"] = 400  # full fine-tuning shows the subject sooner
        recipe["config"]["prior"] = {"class_prompt": f"a {class_word}"}  # when prior is on
        return recipe


class DreamBooth(PivotalTuningHooks, FullFineTuning):
    # Pivotal tuning's hooks wrap DreamBooth's own (methods/pivotal.py).
    name = "dreambooth"
