"""diffusers Stable Diffusion weights -> one original-layout state dict (CompVis/LDM for SD
1.x/2.x, Stability's SGM layout for SDXL).

webui, ComfyUI and most model sites use the original single-file layout:
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.transformer.*` (CLIP text encoder). diffusers reads it
(`from_single_file`) but ships its writer only as a script, so the mapping is done here.
It is the inverse of diffusers' own reader and is derived from the model's config
(blocks, layers per block), not hard-coded for SD's four blocks; the round trip is tested
through `StableDiffusionPipeline.from_single_file`.

SDXL (the SGM layout of `sd_xl_base_1.0.safetensors`, as diffusers'
`scripts/convert_diffusers_to_original_sdxl.py` writes it): the same `model.diffusion_model.*`
UNet names plus `label_emb.0.{0,2}` (the pooled-text/size embedding, diffusers'
`add_embedding`), the same VAE, CLIP-L under `conditioner.embedders.0.transformer.text_model.*`
and OpenCLIP-bigG under `conditioner.embedders.1.model.*` in OpenCLIP's layout (fused q/k/v,
every block: SDXL's pooled output reads the last one) with `text_projection` stored as
OpenCLIP holds it, (width, projection) — diffusers' Linear weight transposed; diffusers'
reader transposes it back (the script above writes the Linear weight untransposed under
`text_projection.weight`, which no reader looks for).

SD 2.x text encoders (OpenCLIP ViT-H) are written in OpenCLIP's layout,
`cond_stage_model.model.*` with fused q/k/v (`attn.in_proj_weight`), as SD 2.x checkpoints
hold them and diffusers' `convert_open_clip_checkpoint` reads them back. OpenCLIP-H has 24
blocks, SD 2.x uses the output of the 23rd (the webui's and ComfyUI's "penultimate" layer),
and diffusers ships only those 23: the 24th, which no SD 2.x reader runs, is not written.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from personalize.errors import ConversionError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
# SDXL's embedding of the pooled text and the size/crop ids (diffusers' add_embedding).
_SDXL_UNET_FIXED = {
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _has_prefix(state: dict[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def unet_prefix_map(unet_state: dict[str, torch.Tensor], config: Any) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs for the UNet's blocks."""
    per_block = config.layers_per_block
    if not isinstance(per_block, int):
        raise ConversionError(
            "layers_per_block differs between blocks; the original layout needs one value"
        )
    n = len(config.block_out_channels)
    pairs: list[tuple[str, str]] = []
    for i in range(n):
        for j in range(per_block):
            sd = f"input_blocks.{(per_block + 1) * i + j + 1}."
            pairs.append((f"down_blocks.{i}.resnets.{j}.", sd + "0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", sd + "1."))
        if i < n - 1:
            pairs.append(
                (
                    f"down_blocks.{i}.downsamplers.0.conv.",
                    f"input_blocks.{(per_block + 1) * (i + 1)}.0.op.",
                )
            )
        up_has_attention = _has_prefix(unet_state, f"up_blocks.{i}.attentions.")
        for j in range(per_block + 1):
            sd = f"output_blocks.{(per_block + 1) * i + j}."
            pairs.append((f"up_blocks.{i}.resnets.{j}.", sd + "0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", sd + "1."))
        if i < n - 1:
            sd = f"output_blocks.{(per_block + 1) * i + per_block}."
            pairs.append(
                (f"up_blocks.{i}.upsamplers.0.", sd + ("2." if up_has_attention else "1."))
            )
    pairs.append(("mid_block.resnets.0.", "middle_block.0."))
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    pairs.append(("mid_block.resnets.1.", "middle_block.2."))
    return pairs


def is_sdxl_unet(config: Any) -> bool:
    return getattr(config, "addition_embed_type", None) == "text_time"


def convert_unet(unet_state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    sdxl = is_sdxl_unet(config)
    added = getattr(config, "addition_embed_type", None)
    if (added and not sdxl) or getattr(config, "class_embed_type", None):
        raise ConversionError(
            f"UNet has class/added embeddings ({added or config.class_embed_type}); only "
            "SD 1.x/2.x and SDXL UNets map to the original single-file layout here"
        )
    if _has_prefix(unet_state, "mid_block.") and not _has_prefix(
        unet_state, "mid_block.attentions.0."
    ):
        raise ConversionError("UNet mid block without attention has no original-layout slot")
    fixed = list(_UNET_FIXED.items()) + (list(_SDXL_UNET_FIXED.items()) if sdxl else [])
    blocks = unet_prefix_map(unet_state, config)
    out: dict[str, torch.Tensor] = {}
    for key, value in unet_state.items():
        new = None
        for hf, sd in fixed:
            if key.startswith(hf):
                new = sd + key[len(hf) :]
                break
        if new is None:
            for hf, sd in blocks:
                if key.startswith(hf):
                    rest = key[len(hf) :]
                    if ".resnets." in hf:
                        name, _, tail = rest.partition(".")
                        rest = f"{_RESNET.get(name, name)}.{tail}"
                    new = sd + rest
                    break
        if new is None:
            raise ConversionError(f"UNet weight {key} has no place in the original SD layout")
        out[UNET_PREFIX + new] = value
    return out


def vae_prefix_map(config: Any) -> list[tuple[str, str]]:
    n = len(config.block_out_channels)
    per_block = config.layers_per_block
    pairs = [
        ("encoder.conv_norm_out.", "encoder.norm_out."),
        ("decoder.conv_norm_out.", "decoder.norm_out."),
    ]
    for i in range(n):
        for j in range(per_block):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        if i < n - 1:
            pairs.append(
                (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            )
            pairs.append(
                (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")
            )
        for j in range(per_block + 1):
            pairs.append(
                (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.")
            )
    for part in ("encoder", "decoder"):
        for j in range(2):
            pairs.append((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}."))
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    return pairs


def convert_vae(vae_state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    pairs = vae_prefix_map(config)
    out: dict[str, torch.Tensor] = {}
    for key, value in vae_state.items():
        new = key
        for hf, sd in pairs:
            if key.startswith(hf):
                rest = key[len(hf) :]
                if ".attentions." in hf:
                    for a, b in _VAE_ATTENTION.items():
                        if rest.startswith(a):
                            rest = b + rest[len(a) :]
                            break
                    # The original attention uses 1x1 convolutions, diffusers Linear layers.
                    if rest.endswith(".weight") and value.ndim == 2:
                        value = value[:, :, None, None]
                elif "conv_shortcut" in rest:
                    rest = rest.replace("conv_shortcut", "nin_shortcut")
                new = sd + rest
                break
        out[VAE_PREFIX + new] = value
    return out


def convert_text_encoder(te_state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """CLIP-L (SD 1.x, quick_gelu) keeps transformers' names; OpenCLIP (SD 2.x, gelu) is
    renamed and fused."""
    if getattr(config, "hidden_act", "quick_gelu") != "quick_gelu":
        return convert_open_clip_text_encoder(te_state)
    return convert_clip_text_encoder(te_state)


def convert_clip_text_encoder(
    te_state: dict[str, torch.Tensor], prefix: str = TEXT_ENCODER_PREFIX
) -> dict[str, torch.Tensor]:
    """CLIP-L in transformers' own names under `prefix`. transformers >= 5.6 flattened
    CLIPTextModel (no "text_model." level); the original layout (and every reader of it)
    has that level."""
    return {
        prefix + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in te_state.items()
        if not k.endswith("position_ids")
    }


_OPEN_CLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "self_attn.out_proj.": "attn.out_proj.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def convert_open_clip_text_encoder(
    te_state: dict[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """diffusers' CLIPTextModel of SD 2.x (or CLIPTextModelWithProjection of SDXL) ->
    OpenCLIP's names under `prefix`: `transformer.resblocks.<i>.{ln_1, attn.in_proj_weight/bias
    (q, k, v stacked), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, token/positional
    embedding, ln_final, and SDXL's `text_projection` as OpenCLIP holds it (transposed)."""
    state = {k.removeprefix("text_model."): v for k, v in te_state.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in _OPEN_CLIP_FIXED:
            out[prefix + _OPEN_CLIP_FIXED[key]] = value
            continue
        if key == "text_projection.weight":  # OpenCLIP computes x @ text_projection
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        m = _LAYER_KEY.match(key)
        if not m:
            raise ConversionError(f"text encoder weight {key} has no place in OpenCLIP's layout")
        block, rest = f"{prefix}transformer.resblocks.{m.group(1)}.", m.group(2)
        proj = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if proj:
            qkv.setdefault((block, proj.group(2)), {})[proj.group(1)] = value
            continue
        for hf, oc in _OPEN_CLIP_LAYER.items():
            if rest.startswith(hf):
                out[block + oc + rest[len(hf) :]] = value
                break
        else:
            raise ConversionError(f"text encoder weight {key} has no place in OpenCLIP's layout")
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConversionError(f"{block}: q/k/v {kind} incomplete ({sorted(parts)})")
        out[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_original_sd(
    unet_config: Any,
    vae_config: Any,
    text_encoder_config: Any,
    states: dict[str, dict[str, torch.Tensor]],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """One original-layout state dict from the diffusers "unet", "vae" and "text_encoder"
    state dicts in `states` (SDXL: and "text_encoder_2"), floating tensors cast to `dtype`
    when given."""
    parts = [
        convert_unet(states["unet"], unet_config),
        convert_vae(states["vae"], vae_config),
    ]
    if is_sdxl_unet(unet_config):
        if "text_encoder_2" not in states:
            raise ConversionError("an SDXL single file needs text_encoder_2's weights too")
        # SDXL's first encoder is CLIP-L whatever its activation says (the tiny test
        # model's is gelu); the second is OpenCLIP-bigG.
        parts.append(convert_clip_text_encoder(states["text_encoder"], SDXL_CLIP_L_PREFIX))
        parts.append(
            convert_open_clip_text_encoder(states["text_encoder_2"], SDXL_OPEN_CLIP_PREFIX)
        )
    else:
        parts.append(convert_text_encoder(states["text_encoder"], text_encoder_config))
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for k, v in part.items():
            v = v.detach().cpu()
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            out[k] = v.contiguous()
    return out
