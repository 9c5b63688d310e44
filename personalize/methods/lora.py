"""LoRA: low-rank adapters (peft) on the UNet's attention and optionally the text encoder.

The base weights never change (peft adds separate lora_A/lora_B matrices), so the saved file
is small and the base model stays exactly itself when the adapter is off. With
pivotal.enabled a new token's embedding trains beside it (methods/pivotal.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from personalize.adapters.clients import log_client_guide
from personalize.adapters.lora import (  # noqa: F401 (the file names, re-exported)
    KOHYA_WEIGHTS,
    LORA_WEIGHTS,
    LoraShape,
    effective_scale,
    save_lora,
)
from personalize.errors import ConfigError
from personalize.methods import prior
from personalize.methods.base import Method
from personalize.methods.pivotal import PivotalTuningHooks
from personalize.methods.regularizers import build_regularizers
from personalize.models import SDParts

logger = logging.getLogger(__name__)


def _lora_config(c, targets: list[str], layers: list[int] | None = None):
    """peft's config for `lora.type`: LoraConfig, LoHaConfig or LoKrConfig (the LyCORIS
    kinds, ported into peft from LyCORIS with the same parameter names and shapes);
    `layers`: only these encoder layers (see _conditioning_layers)."""
    where = {
        "layers_to_transform": layers,
        "layers_pattern": "layers" if layers is not None else None,
    }
    alpha = c.alpha if c.alpha is not None else c.rank
    if c.type == "loha":
        from peft import LoHaConfig

        return LoHaConfig(
            r=c.rank,
            alpha=alpha,
            target_modules=targets,
            use_effective_conv2d=c.use_effective_conv2d,
            **where,
        )
    if c.type == "lokr":
        from peft import LoKrConfig

        return LoKrConfig(
            r=c.rank,
            alpha=alpha,
            target_modules=targets,
            use_effective_conv2d=c.use_effective_conv2d,
            decompose_both=c.decompose_both,
            decompose_factor=c.decompose_factor,
            **where,
        )
    from peft import LoraConfig

    return LoraConfig(
        r=c.rank,
        lora_alpha=alpha,
        lora_dropout=c.dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
        use_dora=c.use_dora,
        **where,
    )


def _conditioning_layers(parts: SDParts, name: str) -> list[int] | None:
    """The encoder layers whose adapters can learn, or None for all. SDXL reads only the
    penultimate hidden states of text_encoder (CLIP-L) and not its pooled output, so its
    last layer never shapes the conditioning: adapters there would get no gradient ever
    (dead weights in the file, and DDP stops on parameters without one)."""
    if not parts.is_sdxl or name != "text_encoder":
        return None
    return list(range(parts.text_encoder.config.num_hidden_layers - 1))


def _check_targets_exist(module: torch.nn.Module, targets: list[str], key: str) -> None:
    names = [n for n, _ in module.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(
            f"{key}: no module named {missing} in this model; "
            "examples of names: " + ", ".join(n for n in names[-8:] if n)
        )


def _warn_full_lokr_scale(models: list[torch.nn.Module]) -> None:
    """LyCORIS applies a LoKr layer of two full matrices at scale 1 whatever its alpha;
    peft at alpha / rank. A LyCORIS recipe ("full dimension": rank 100000, alpha 1) would
    train at scale 1e-5 here, so say so when that happens."""
    full = [
        layer
        for model in models
        for layer in model.modules()
        if "default" in getattr(layer, "lokr_w1", {})
        and "default" in getattr(layer, "lokr_w2", {})
        and layer.scaling["default"] != 1.0
    ]
    if full:
        logger.warning(
            "lora.type lokr: %d layers are two full matrices, which peft scales by "
            "alpha / rank = %g (LyCORIS would use 1.0 for them); leave lora.alpha unset "
            "(= rank) for LyCORIS' 'full dimension' recipe",
            len(full),
            full[0].scaling["default"],
        )


class LoRAAdapters(prior.PriorPreservationHooks, Method):
    """method lora without pivotal tuning (`LoRA` below adds it as the outer layer)."""

    def setup(self, parts: SDParts) -> list[dict[str, Any]]:
        c = self.cfg.lora
        _check_targets_exist(parts.unet, c.unet_target_modules, "lora.unet_target_modules")
        parts.unet.add_adapter(_lora_config(c, c.unet_target_modules))
        groups = [{"params": [p for p in parts.unet.parameters() if p.requires_grad]}]
        if c.train_text_encoder:
            # peft itself, not transformers' add_adapter: transformers gates its peft
            # integration on a peft version (5.24 asks for peft>=0.22, unreleased), and
            # training must not depend on that pairing.
            from peft import inject_adapter_in_model

            te_lr = c.text_encoder_lr or self.cfg.train.lr
            lrs = {"text_encoder": te_lr, "text_encoder_2": c.text_encoder_2_lr or te_lr}
            for name, text_encoder in parts.text_encoders().items():  # SDXL: both
                _check_targets_exist(
                    text_encoder,
                    c.text_encoder_target_modules,
                    "lora.text_encoder_target_modules",
                )
                layers = _conditioning_layers(parts, name)
                inject_adapter_in_model(
                    _lora_config(c, c.text_encoder_target_modules, layers),
                    text_encoder,
                )
                groups.append(
                    {
                        "params": [p for p in text_encoder.parameters() if p.requires_grad],
                        "lr": lrs[name],
                    }
                )
        if c.type == "lokr":
            _warn_full_lokr_scale([parts.unet, *parts.text_encoders().values()])
        # DreamBooth-LoRA: the db section's prior preservation and regularizers, the same
        # code as method dreambooth (methods/prior.py, methods/regularizers.py).
        self.regularizers = build_regularizers(self.cfg, parts, adapters=True)
        return groups

    def reduce_loss(self, per_example: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        if not prior.uses_class_images(self.cfg):
            return super().reduce_loss(per_example, batch)
        return prior.prior_preservation_loss(per_example, batch, self.cfg.prior.loss_weight)

    def extra_loss(self, batch, outputs, parts: SDParts) -> torch.Tensor | None:
        regularizers = getattr(self, "regularizers", None)
        return regularizers(batch, outputs, parts) if regularizers else None

    def save(self, out_dir: Path, parts: SDParts, step: int) -> Path:
        c = self.cfg.lora
        te_targets = c.text_encoder_target_modules if c.train_text_encoder else None
        file, kohya = save_lora(
            out_dir,
            parts,
            LoraShape(
                rank=c.rank,
                alpha=c.alpha if c.alpha is not None else c.rank,
                unet_targets=c.unet_target_modules,
                text_encoder_targets=te_targets,
                use_dora=c.use_dora,
                type=c.type,
                lokr_options={
                    "decompose_both": c.decompose_both,
                    "decompose_factor": c.decompose_factor,
                    "use_effective_conv2d": c.use_effective_conv2d,
                },
            ),
            step,
        )
        kind = {"loha": "LoHa", "lokr": "LoKr"}.get(c.type)
        log_client_guide("lora", Path(out_dir), kohya_file=kohya, lycoris_kind=kind)
        return file

    @classmethod
    def demo_overrides(cls) -> dict[str, Any]:
        return {"train": {"lr": 1e-3}, "lora": {"rank": 8}}

    @classmethod
    def toy_world_recipe(cls, identifier, class_word, unet_config) -> dict[str, Any]:
        recipe = super().toy_world_recipe(identifier, class_word, unet_config)
        recipe["config"]["prior"] = {"class_prompt": f"a {class_word}"}  # when prior is on
        return recipe


class LoRA(PivotalTuningHooks, LoRAAdapters):
    # Pivotal tuning's hooks wrap the LoRA's own (methods/pivotal.py).
    name = "lora"
