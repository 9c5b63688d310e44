"""LoRA: low-rank adapters (peft) on the UNet's attention and optionally the text encoder.

The base weights never change (peft adds separate lora_A/lora_B matrices), so the saved file
is small and the base model stays exactly itself when the adapter is off.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from personalize.adapters.clients import log_client_guide
from personalize.methods.base import Method
from personalize.models import SDParts
from personalize.training import prior
from personalize.training.regularizers import build_regularizers

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "lora_kohya.safetensors"

logger = logging.getLogger(__name__)


def _lora_config(
    rank: int, alpha: float | None, dropout: float, targets: list[str], use_dora: bool
):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
        use_dora=use_dora,
    )


def _check_targets_exist(module: torch.nn.Module, targets: list[str], key: str) -> None:
    names = [n for n, _ in module.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"{key}: no module named {missing} in this model; "
            "examples of names: " + ", ".join(n for n in names[-8:] if n)
        )


class LoRA(Method):
    name = "lora"

    def setup(self, parts: SDParts) -> list[dict[str, Any]]:
        c = self.cfg.lora
        _check_targets_exist(parts.unet, c.unet_target_modules, "lora.unet_target_modules")
        parts.unet.add_adapter(
            _lora_config(c.rank, c.alpha, c.dropout, c.unet_target_modules, c.use_dora)
        )
        groups = [{"params": [p for p in parts.unet.parameters() if p.requires_grad]}]
        if c.train_text_encoder:
            _check_targets_exist(
                parts.text_encoder,
                c.text_encoder_target_modules,
                "lora.text_encoder_target_modules",
            )
            # peft itself, not transformers' add_adapter: transformers gates its peft
            # integration on a peft version (5.24 asks for peft>=0.22, unreleased), and
            # training must not depend on that pairing.
            from peft import inject_adapter_in_model

            inject_adapter_in_model(
                _lora_config(c.rank, c.alpha, c.dropout, c.text_encoder_target_modules, c.use_dora),
                parts.text_encoder,
            )
            groups.append(
                {
                    "params": [p for p in parts.text_encoder.parameters() if p.requires_grad],
                    "lr": c.text_encoder_lr or self.cfg.train.lr,
                }
            )
        # DreamBooth-LoRA: the db section's prior preservation and regularizers, the same
        # code as method dreambooth (training/prior.py, training/regularizers.py).
        self.regularizers = build_regularizers(self.cfg, parts, adapters=True)
        return groups

    def wrap_train_dataset(self, dataset, parts: SDParts, accelerator):
        return prior.wrap_with_prior(self.cfg, dataset, parts, accelerator)

    def latent_datasets(self, dataset) -> list:
        # Prior preservation's class images, paired with the instances (training/prior.py).
        class_images = getattr(dataset, "prior", None)
        return [class_images] if class_images is not None else []

    def output_folders(self) -> list[Path]:
        return [prior.class_data_dir(self.cfg)] if prior.uses_class_images(self.cfg) else []

    def extra_captions(self) -> list[str]:
        return [self.cfg.db.class_prompt] if self.cfg.db.class_prompt else []

    def reduce_loss(self, per_example: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        if not prior.uses_class_images(self.cfg):
            return super().reduce_loss(per_example, batch)
        return prior.prior_preservation_loss(per_example, batch, self.cfg.db.prior_loss_weight)

    def extra_loss(self, batch, outputs, parts: SDParts) -> torch.Tensor | None:
        regularizers = getattr(self, "regularizers", None)
        return regularizers(batch, outputs, parts) if regularizers else None

    def _layers(self, parts: SDParts) -> tuple[dict, dict | None]:
        # peft's own names (lora_A/lora_B), which diffusers loads as they are. Not through
        # convert_state_dict_to_diffusers as the diffusers scripts do: it renames attention
        # layers only (to the old lora.down/up names), and a file mixing both namings loses
        # every other adapted layer (ff, proj_in, resnet convs) on load.
        from peft.utils import get_peft_model_state_dict

        unet = get_peft_model_state_dict(parts.unet)
        te = None
        if self.cfg.lora.train_text_encoder:
            te = get_peft_model_state_dict(parts.text_encoder)
        return unet, te

    def save(self, out_dir: Path, parts: SDParts, step: int) -> Path:
        from diffusers import StableDiffusionPipeline

        from personalize.io import atomic_write

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        c = self.cfg.lora
        unet_layers, te_layers = self._layers(parts)
        unet_layers = {k: v.float().contiguous() for k, v in unet_layers.items()}
        te_layers = {k: v.float().contiguous() for k, v in (te_layers or {}).items()} or None
        meta = {
            "r": c.rank,
            "lora_alpha": c.alpha if c.alpha is not None else c.rank,
            "target_modules": c.unet_target_modules,
            "use_dora": c.use_dora,
        }
        te_meta = dict(meta, target_modules=c.text_encoder_target_modules) if te_layers else None
        # diffusers writes in place with safetensors (mode 0600): write it in a scratch
        # folder, then rename it into place with the umask's mode.
        with atomic_write(out_dir / LORA_WEIGHTS) as tmp:
            scratch = tmp.with_name(tmp.name + ".d")
            try:
                StableDiffusionPipeline.save_lora_weights(
                    scratch,
                    unet_lora_layers=unet_layers,
                    text_encoder_lora_layers=te_layers,
                    safe_serialization=True,
                    unet_lora_adapter_metadata=meta,
                    text_encoder_lora_adapter_metadata=te_meta,
                )
                os.replace(scratch / LORA_WEIGHTS, tmp)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        kohya = self._save_kohya(out_dir, unet_layers, te_layers, step, parts)
        log_client_guide("lora", out_dir, kohya_file=kohya)
        return out_dir / LORA_WEIGHTS

    def _save_kohya(
        self, out_dir: Path, unet_layers: dict, te_layers: dict | None, step: int, parts: SDParts
    ) -> Path | None:
        """The kohya layout (lora_unet_*, lora_te_*, .alpha) that ComfyUI, the webui and
        sd-scripts load (adapters/kohya.py); None, with a warning, when the adapters have
        no such form (DoRA)."""
        from personalize.adapters.formats import atomic_save_safetensors
        from personalize.adapters.kohya import KohyaExportError, kohya_metadata, peft_to_kohya

        c = self.cfg.lora
        alpha = c.alpha if c.alpha is not None else c.rank
        try:
            kohya = peft_to_kohya(unet_layers, te_layers, alpha)
        except KohyaExportError as e:
            logger.warning("no %s written: %s", KOHYA_WEIGHTS, e)
            stale = out_dir / KOHYA_WEIGHTS
            if stale.exists():  # a file from an earlier run would pass for this one
                stale.unlink()
            return None
        metadata = kohya_metadata(c.rank, alpha, parts.unet.config.cross_attention_dim, step)
        metadata.update(
            personalize_base_model=parts.source,
            personalize_cross_attention_dim=str(parts.unet.config.cross_attention_dim),
        )
        return atomic_save_safetensors(kohya, out_dir / KOHYA_WEIGHTS, metadata)

    @classmethod
    def demo_overrides(cls) -> dict[str, Any]:
        return {"train": {"lr": 1e-3}, "lora": {"rank": 8}}


def effective_scale(path: str | Path) -> dict[str, Any]:
    """alpha / rank as saved, so "my LoRA has no effect" can be answered from the file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    info = json.loads(meta.get("lora_adapter_metadata", "{}") or "{}")
    if "unet.r" in info:
        rank, alpha = info["unet.r"], info["unet.lora_alpha"]
        return {"rank": rank, "alpha": alpha, "scale": alpha / rank}
    return {}
