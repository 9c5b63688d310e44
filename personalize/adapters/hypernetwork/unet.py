"""Hypernetworks on a diffusers UNet: attention processors that add the MLPs to the keys
and values, attach / strength / remove, and loading into a pipeline."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from personalize.adapters.hypernetwork.files import read_hypernetwork
from personalize.adapters.hypernetwork.network import (
    Hypernetwork,
    HypernetworkModule,
    HypernetworkPair,
)
from personalize.errors import ArtifactError, HypernetworkError

logger = logging.getLogger(__name__)

# The UNet attribute holding the HypernetworkStack (its MLPs are UNet parameters).
STACK_ATTR = "personalize_hypernetworks"
_SUPPORTED_BASE_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor")


def attention_widths(unet: nn.Module) -> dict[int, list[str]]:
    """Context width -> names of the Attention modules whose keys/values read that width."""
    from diffusers.models.attention_processor import Attention

    out: dict[int, list[str]] = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            out.setdefault(int(module.to_k.in_features), []).append(name)
    return dict(sorted(out.items()))


def check_widths(widths: list[int], unet: nn.Module, where: str, strict: bool = True) -> None:
    """Raise when hypernetwork widths have no attention of that width in `unet` (all of them,
    or with strict=False only when none matches): a file for another base model otherwise
    loads and silently does nothing."""
    have = attention_widths(unet)
    missing = sorted(set(widths) - set(have))
    if missing and (strict or not set(widths) & set(have)):
        text = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
        raise ArtifactError(
            f"{where}: widths {missing} have no attention layer of that width in this UNet. "
            f"Its attention context widths are {sorted(have)} (text context width {text}; "
            "the webui's 768 is the SD1 text width, 1024 SD2's, 2048 SDXL's). Use a hypernetwork "
            "made for "
            "this base model"
            + (
                ", or pass strict=False to ignore the extra widths"
                if set(widths) & set(have)
                else ""
            )
            + "."
        )


class HypernetworkStack(nn.Module):
    """The hypernetworks on one UNet, applied in order (as the webui chains them), each with
    its strength. Registered once on the UNet, so its parameters are the UNet's."""

    def __init__(self):
        super().__init__()
        self.networks = nn.ModuleDict()
        self.strengths: dict[str, float] = {}

    def active(self, width: int) -> list[tuple[HypernetworkPair, float]]:
        out = []
        for name, hn in self.networks.items():
            pair, strength = hn.pair(width), self.strengths.get(name, 1.0)
            if pair is not None and strength != 0:
                out.append((pair, strength))
        return out


class HypernetworkAttnProcessor(nn.Module):
    """Wraps an Attention's processor: with an active pair for this layer's context width it
    computes attention itself (SDPA, or xformers when the wrapped one did), feeding the
    transformed contexts to to_k/to_v; otherwise it calls the wrapped processor unchanged."""

    def __init__(self, base_processor: Any, width: int, stack: HypernetworkStack):
        super().__init__()
        self.base_processor = base_processor  # registered as a submodule if it is one
        self.width = width
        self.xformers_op = getattr(base_processor, "attention_op", None)
        self.use_xformers = type(base_processor).__name__ == "XFormersAttnProcessor"
        # Not a submodule: the stack is registered once on the UNet, and a submodule here
        # would repeat all its weights in every processor's state dict.
        object.__setattr__(self, "stack", stack)

    def forward(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        active = self.stack.active(self.width)
        if not active:
            return self.base_processor(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, key_tokens, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        context_k, context_v = context, context
        for pair, strength in active:
            context_k = _run(pair.k, context_k, strength)
            context_v = _run(pair.v, context_v, strength)
        key = attn.to_k(context_k)
        value = attn.to_v(context_v)

        if self.use_xformers:
            hidden_states = self._xformers(
                attn, query, key, value, attention_mask, key_tokens, batch_size
            )
        else:
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens, batch_size)
                attention_mask = attention_mask.view(
                    batch_size, attn.heads, -1, attention_mask.shape[-1]
                )
            head_dim = key.shape[-1] // attn.heads
            query, key, value = (
                t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                for t in (query, key, value)
            )
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
            hidden_states = hidden_states.transpose(1, 2).reshape(
                batch_size, -1, attn.heads * head_dim
            )
            hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _xformers(self, attn, query, key, value, attention_mask, key_tokens, batch_size):
        import xformers.ops

        attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens, batch_size)
        if attention_mask is not None:
            # xformers does not broadcast the singleton query dimension of the bias.
            attention_mask = attention_mask.expand(-1, query.shape[1], -1)
        query, key, value = (attn.head_to_batch_dim(t).contiguous() for t in (query, key, value))
        out = xformers.ops.memory_efficient_attention(
            query, key, value, attn_bias=attention_mask, op=self.xformers_op, scale=attn.scale
        )
        return attn.batch_to_head_dim(out.to(query.dtype))


def _run(module: HypernetworkModule, x: torch.Tensor, strength: float) -> torch.Tensor:
    # The MLPs keep their own dtype (fp32 unless the whole UNet was cast): like the webui,
    # compute them in it and hand the result back in the attention's dtype.
    dtype = module.linear[0].weight.dtype
    return module(x.to(dtype), strength).to(x.dtype)


def stack_key(name: str | None) -> str:
    """The key a hypernetwork named `name` has in the stack (ModuleDict-safe characters)."""
    return re.sub(r"[^0-9A-Za-z_-]", "_", name or "hypernetwork")


def attach(
    unet: nn.Module, hn: Hypernetwork, strength: float = 1.0, name: str | None = None
) -> HypernetworkStack:
    """Add `hn` to `unet`'s hypernetworks (replacing one of the same name), installing the
    processors on first use. Its parameters become UNet parameters."""
    from diffusers.models.attention_processor import Attention

    key = stack_key(name or hn.name)
    stack = getattr(unet, STACK_ATTR, None)
    if stack is None:
        attns = [(n, m) for n, m in unet.named_modules() if isinstance(m, Attention)]
        unsupported = [
            f"{n} ({type(m.processor).__name__})"
            for n, m in attns
            if type(m.processor).__name__ not in _SUPPORTED_BASE_PROCESSORS
        ]
        if unsupported:
            raise ArtifactError(
                f"hypernetworks wrap the standard attention processors "
                f"({', '.join(_SUPPORTED_BASE_PROCESSORS)}); these layers use others: "
                f"{unsupported[:4]}. Load the hypernetwork before enabling other processors."
            )
        stack = HypernetworkStack()
        unet.add_module(STACK_ATTR, stack)
        for _, module in attns:
            module.set_processor(
                HypernetworkAttnProcessor(module.processor, int(module.to_k.in_features), stack)
            )
    device = next(unet.parameters()).device
    stack.networks[key] = hn.to(device)
    stack.strengths[key] = float(strength)
    return stack


def set_strength(unet: nn.Module, strength: float, name: str | None = None) -> None:
    """Change the strength of one hypernetwork (by name) or of all of them."""
    stack = getattr(unet, STACK_ATTR, None)
    if stack is None:
        raise HypernetworkError("this UNet has no hypernetwork loaded")
    for key in stack.strengths:
        if name is None or key == name:
            stack.strengths[key] = float(strength)


def remove_hypernetworks(unet: nn.Module) -> None:
    """Detach every hypernetwork and restore the processors that were there before."""
    from diffusers.models.attention_processor import Attention

    if getattr(unet, STACK_ATTR, None) is None:
        return
    for module in unet.modules():
        if isinstance(module, Attention) and isinstance(
            module.processor, HypernetworkAttnProcessor
        ):
            module.set_processor(module.processor.base_processor)
    delattr(unet, STACK_ATTR)


def load_into_pipeline(
    pipe, path: str | Path, strength: float = 1.0, name: str | None = None, strict: bool = True
) -> Hypernetwork:
    """Read a hypernetwork file and apply it to `pipe.unet` (or a bare UNet) at `strength`."""
    unet = getattr(pipe, "unet", pipe)
    if not math.isfinite(strength):
        raise HypernetworkError(f"strength must be a finite number, got {strength}")
    hn = read_hypernetwork(path)
    check_widths(hn.widths, unet, str(path), strict=strict)
    hn.requires_grad_(False).eval()
    key = stack_key(name or hn.name)
    stack = getattr(unet, STACK_ATTR, None)
    if stack is not None and key in stack.networks:
        # Same name: replace (a re-run notebook cell must not apply it twice).
        logger.info(
            "hypernetwork adapter_name=%r is loaded already: replacing it with %s "
            "(give another adapter_name to use both)",
            key,
            path,
        )
    attach(unet, hn, strength, name=key)
    logger.info(
        "hypernetwork %s (widths %s, step %d) applied at strength %s",
        hn.name,
        hn.widths,
        hn.step,
        strength,
    )
    return hn
