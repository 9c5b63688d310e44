"""Hypernetwork: small residual MLPs on the attention keys/values, the webui's way.

Every pretrained weight stays frozen; the trainable part is one (k, v) pair of MLPs per
attention context width (`hypernetwork.enable_sizes`), applied through attention processors (see
personalize/adapters/hypernetwork/). Saved as a webui `.pt` (drop it into the webui's
models/hypernetworks folder) and as `.safetensors`, both loadable with `personalize.load`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from diffusers.models.attention_processor import Attention

from personalize.adapters.clients import comfyui_hypernetwork_problems, log_client_guide
from personalize.adapters.hypernetwork import (
    Hypernetwork,
    HypernetworkAttnProcessor,
    HypernetworkOptions,
    attach,
    attention_widths,
    save_hypernetwork,
)
from personalize.config import ConfigError
from personalize.errors import TrainingError
from personalize.methods.base import Method
from personalize.models import SDParts

logger = logging.getLogger(__name__)


SD1_TEXT_WIDTH = 768
# The webui's default enable_sizes' self-attention width of SD's first level; SDXL's first
# level has no attention (its self-attention widths are 640 and 1280).
SD1_FIRST_LEVEL_WIDTH = 320


def sizes_for_model(sizes: list[int], parts: SDParts) -> list[int]:
    """enable_sizes for this model. The webui keys a hypernetwork's layers by the width of
    the context an attention layer reads (`context.shape[2]`), so on another model family
    SD 1.x's text width 768 (the default's first entry, and the webui's) stands for the
    model's own text context width: SD 2.x's 1024, SDXL's 2048 (CLIP-L 768 + OpenCLIP-bigG
    1280, concatenated). On SDXL the default's 320 is dropped too when no attention layer
    reads it (SDXL's first level has none). Other sizes are kept as given."""
    width = parts.unet.config.cross_attention_dim
    if parts.family not in ("sd2", "sdxl"):
        return list(sizes)
    out = list(sizes)
    if width != SD1_TEXT_WIDTH and SD1_TEXT_WIDTH in out:
        logger.info(
            "hypernetwork.enable_sizes: %d is SD 1.x's text width; this %s model's text "
            "context is %d wide, used in its place",
            SD1_TEXT_WIDTH,
            "SDXL" if parts.is_sdxl else "SD 2.x",
            width,
        )
        out = [width if s == SD1_TEXT_WIDTH else s for s in out]
    if parts.is_sdxl and SD1_FIRST_LEVEL_WIDTH in out:
        if SD1_FIRST_LEVEL_WIDTH not in attention_widths(parts.unet):
            logger.info(
                "hypernetwork.enable_sizes: no attention layer of this SDXL UNet reads "
                "width %d (SD 1.x's first level); dropped",
                SD1_FIRST_LEVEL_WIDTH,
            )
            out = [s for s in out if s != SD1_FIRST_LEVEL_WIDTH]
    return list(dict.fromkeys(out))


class HypernetworkMethod(Method):
    name = "hypernetwork"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.hypernetwork: Hypernetwork | None = None
        self._checkpoint_hash: str | None = None

    def _file_name(self) -> str:
        return self.cfg.hypernetwork.name or Path(self.cfg.output_dir).name or "hypernetwork"

    def setup(self, parts: SDParts) -> list[dict[str, Any]]:
        c = self.cfg.hypernetwork
        sizes = sizes_for_model(c.enable_sizes, parts)
        have = attention_widths(parts.unet)
        missing = sorted(set(sizes) - set(have))
        if missing:
            raise ConfigError(
                f"hypernetwork.enable_sizes: widths {missing} have no attention layer in this "
                "UNet; its "
                f"attention context widths are {sorted(have)} (text context width "
                f"{parts.unet.config.cross_attention_dim}). SD1 uses [768, 320, 640, 1280], "
                "SD2 [1024, 320, 640, 1280], SDXL [2048, 640, 1280]."
            )
        options = HypernetworkOptions(
            layer_structure=c.layer_structure,
            activation_func=c.activation,
            is_layer_norm=c.layer_norm,
            weight_initialization=c.weight_init,
            activate_output=c.activate_output,
            use_dropout=c.use_dropout,
            last_layer_dropout=c.last_layer_dropout,
            dropout_structure=c.dropout_structure,
        )
        source = parts.source
        self.hypernetwork = Hypernetwork(
            sorted(set(sizes)),
            options,
            name=self._file_name(),
            sd_checkpoint_name=Path(source).stem if Path(source).is_file() else Path(source).name,
            optional_info=f"trained with personalize on {source} (text context width "
            f"{parts.unet.config.cross_attention_dim})",
        )
        attach(parts.unet, self.hypernetwork, strength=1.0)
        return [{"params": list(self.hypernetwork.parameters())}]

    def check_before_training(self, parts: SDParts) -> None:
        # Something that sets attention processors after setup (e.g. enabling xformers on
        # the UNet) would drop ours, and the run would train nothing.
        replaced = [
            n
            for n, m in parts.unet.named_modules()
            if isinstance(m, Attention) and not isinstance(m.processor, HypernetworkAttnProcessor)
        ]
        if replaced:
            raise TrainingError(
                f"the hypernetwork's attention processors were replaced on {replaced[:3]} "
                "after Method.setup; set attention processors (xformers, ...) before the "
                "method's setup, which wraps whatever is there"
            )

    def save(self, out_dir: Path, parts: SDParts, step: int) -> Path:
        hn = self.hypernetwork
        hn.step = step
        hn.sd_checkpoint = self._short_hash(parts.source)
        out_dir = Path(out_dir)
        save_hypernetwork(hn, out_dir / f"{hn.name}.pt")
        path = save_hypernetwork(hn, out_dir / f"{hn.name}.safetensors")
        for problem in comfyui_hypernetwork_problems(hn.file_fields()):
            logger.warning("%s.pt in ComfyUI: %s", hn.name, problem)
        log_client_guide("hypernetwork", out_dir, name=hn.name)
        return path

    def _short_hash(self, source: str) -> str | None:
        """The webui's checkpoint short hash (sha256[:10] of the checkpoint file), computed
        once; a diffusers folder has no single file to hash."""
        if self._checkpoint_hash is None and Path(source).is_file():
            h = hashlib.sha256()
            with open(source, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            self._checkpoint_hash = h.hexdigest()[:10]
        return self._checkpoint_hash

    @classmethod
    def demo_overrides(cls) -> dict[str, Any]:
        # The tiny model's widths: text context 32, self-attention 32 and 64. Its MLPs start
        # near zero (Normal init), so the demo needs a higher LR than SD's 5e-6..5e-5.
        return {"train": {"lr": 1e-3}, "hypernetwork": {"enable_sizes": [32, 64]}}

    @classmethod
    def toy_world_recipe(cls, identifier, class_word, unet_config) -> dict[str, Any]:
        recipe = super().toy_world_recipe(identifier, class_word, unet_config)
        # One MLP pair per attention context width: the text's and each level's.
        widths = {unet_config["cross_attention_dim"], *unet_config["block_out_channels"]}
        recipe["config"]["hypernetwork"] = {"enable_sizes": sorted(widths)}
        return recipe
