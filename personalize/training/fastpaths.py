"""Switchable speed-ups for the training loop (`train.*` keys; docs/benchmarks.md measures
each): attention kernel, TF32, channels_last, torch.compile, gradient checkpointing, and
the optimizer (fused AdamW where the device supports it)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from personalize.config import PersonalizeConfig
from personalize.errors import ConfigError, FastPathError
from personalize.models import SDParts
from personalize.training.optimizers import EXTRA_OPTIMIZERS, make_extra_optimizer

logger = logging.getLogger(__name__)

# The processors diffusers installs itself; anything else was put there by a method
# (e.g. a hypernetwork) and must not be replaced by another attention kernel.
_STOCK_PROCESSORS = {
    "AttnProcessor",
    "AttnProcessor2_0",
    "XFormersAttnProcessor",
    "FusedAttnProcessor2_0",
}


def apply_fast_paths(
    cfg: PersonalizeConfig, parts: SDParts, trains: dict[str, bool], device: torch.device
) -> None:
    """Configure the modules in place; call after the method's setup and the dtype casts,
    before accelerate wraps them."""
    t = cfg.train
    if device.type == "cuda":
        # TF32 keeps fp32's range with a 10-bit mantissa: ~8x the matmul throughput of full
        # fp32 on Ampere+, and it only touches ops that still run in fp32 under autocast.
        torch.backends.cuda.matmul.allow_tf32 = t.allow_tf32
        torch.backends.cudnn.allow_tf32 = t.allow_tf32
        torch.backends.cudnn.benchmark = True  # fixed shapes (per bucket): pick the best conv
    unet = parts.unet
    if t.attention == "xformers":
        foreign = {type(p).__name__ for p in unet.attn_processors.values()} - _STOCK_PROCESSORS
        if foreign:
            raise FastPathError(
                f"train.attention=xformers would replace the method's own attention processors "
                f"({', '.join(sorted(foreign))}); use train.attention=sdpa with {cfg.method}"
            )
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as e:
            raise FastPathError(
                f"train.attention=xformers: {e}. Install it (pip install personalize[xformers], "
                "CUDA only) or use train.attention=sdpa, PyTorch's own fused attention."
            ) from e
    # sdpa: diffusers' default processors already call scaled_dot_product_attention.
    if t.gradient_checkpointing:
        if trains["unet"]:
            unet.enable_gradient_checkpointing()
        for name, text_encoder in parts.text_encoders().items():  # SDXL has two
            if trains[name]:
                text_encoder.gradient_checkpointing_enable()
    if t.channels_last:
        unet.to(memory_format=torch.channels_last)
    if t.compile_unet:
        # Module.compile() keeps the module object (DDP wrapping, hooks and state-dict
        # names are unchanged); each new latent shape (bucket) compiles once more.
        unet.compile()


def make_optimizer(
    cfg: PersonalizeConfig, param_groups: list[dict[str, Any]], device: torch.device
):
    t = cfg.train
    if t.optimizer in EXTRA_OPTIMIZERS:  # prodigy, schedule-free AdamW, Adafactor
        return make_extra_optimizer(cfg, param_groups)
    kwargs: dict[str, Any] = dict(
        lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay
    )
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ConfigError(
                "train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes"
            ) from e
        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    if t.fused_optimizer and fused_supported(param_groups, device):
        return torch.optim.AdamW(param_groups, fused=True, **kwargs)
    if t.fused_optimizer:
        logger.info("fused AdamW is not available here; using the foreach implementation")
    return torch.optim.AdamW(param_groups, foreach=True, **kwargs)


def fused_supported(param_groups: list[dict[str, Any]], device: torch.device) -> bool:
    """Fused AdamW needs floating-point parameters on a device with the fused kernel."""
    params = [p for g in param_groups for p in g["params"]]
    if not params or not all(p.is_floating_point() for p in params):
        return False
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return device.type in _get_fused_kernels_supported_devices()
    except ImportError:  # older torch: fused AdamW only on CUDA
        return device.type == "cuda"
