"""peft LoRA weights -> the kohya layout that ComfyUI, the AUTOMATIC1111 webui and kohya's
sd-scripts load (`lora_unet_*`, `lora_te_*`, `.lora_down/.lora_up.weight`, `.alpha`).

Module names follow sd-scripts' `networks/lora.py`: the module path with `.` -> `_`, under
`lora_unet_` for the UNet (diffusers block names, which the webui converts to the original
layout and ComfyUI maps through its own diffusers table) and `lora_te_` for an SD 1.x/2.x
text encoder. Text-encoder names are fixed by those tools to transformers 4's module tree,
`lora_te_text_model_encoder_layers_{i}_{self_attn_q_proj|k|v|out_proj|mlp_fc1|mlp_fc2}`,
whatever the installed transformers calls the modules (transformers 5 drops `text_model.`).

Not via diffusers' `convert_state_dict_to_kohya`: it names an SD 1.x text encoder
`lora_te1_` and keeps transformers 5 paths, which none of the three tools load.

DoRA is refused: no one file applies peft's DoRA exactly in all three. peft keeps the
magnitude per output row of W + BA; sd-scripts' networks/lora.py has no DoRA (it loads with
strict=False and would drop `.dora_scale` silently), the webui 1.10 normalizes over the input
axis, and ComfyUI's output-axis branch divides by the norm of the base weight alone.
"""

from __future__ import annotations

import re

import torch

from personalize.errors import KohyaExportError

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
# The CLIP layers the tools address (ComfyUI's LORA_CLIP_MAP; sd-scripts' CLIPAttention/CLIPMLP).
TEXT_ENCODER_LAYERS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
_TE_PATH = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.(.+)$")
_PEFT_KEY = re.compile(r"^(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")


def text_encoder_module_name(path: str) -> str:
    """`encoder.layers.3.self_attn.q_proj` (transformers 5) or
    `text_model.encoder.layers.3.self_attn.q_proj` (4) ->
    `lora_te_text_model_encoder_layers_3_self_attn_q_proj`."""
    m = _TE_PATH.search(path)
    if not m or m.group(2) not in TEXT_ENCODER_LAYERS:
        raise KohyaExportError(
            f"text encoder module {path!r} has no kohya/ComfyUI/webui name: those tools "
            f"address only encoder layers' {', '.join(TEXT_ENCODER_LAYERS)}; set "
            "lora.text_encoder_target_modules to those (q_proj, k_proj, v_proj, out_proj, "
            "fc1, fc2)"
        )
    layer, rest = m.group(1), m.group(2)
    return f"{TEXT_ENCODER_PREFIX}text_model_encoder_layers_{layer}_{rest.replace('.', '_')}"


def unet_module_name(path: str) -> str:
    """`down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    return UNET_PREFIX + path.replace(".", "_")


def kohya_name(peft_key: str) -> str:
    """A peft-style key `unet.<module>` / `text_encoder.<module>` -> its kohya base name
    (`lora_unet_...`, `lora_te_text_model_...`): the one naming of the package, also used by
    the LoRA tools."""
    component, _, module = peft_key.partition(".")
    if component == "unet":
        return unet_module_name(module)
    if component == "text_encoder":
        return text_encoder_module_name(module)
    raise KohyaExportError(f"{peft_key!r}: expected a unet.* or text_encoder.* module path")


def _modules(layers: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in layers.items():
        m = _PEFT_KEY.match(key)
        if not m:
            raise KohyaExportError(f"{where}: unexpected adapter key {key!r}")
        out.setdefault(m.group(1), {})[m.group(2)] = tensor
    dora = sorted(p for p, parts in out.items() if "lora_magnitude_vector" in parts)
    if dora:
        raise KohyaExportError(
            "DoRA (lora.use_dora) has no kohya-layout file that ComfyUI, the webui and "
            "sd-scripts all apply as trained (sd-scripts has no DoRA, the webui and ComfyUI "
            "normalize the magnitude differently from peft); use pytorch_lora_weights."
            "safetensors with diffusers/personalize.load, or train without lora.use_dora "
            f"for a UI file ({len(dora)} DoRA modules, e.g. {dora[0]})"
        )
    return out


def peft_to_kohya(
    unet_layers: dict[str, torch.Tensor],
    text_encoder_layers: dict[str, torch.Tensor] | None,
    alpha: float,
) -> dict[str, torch.Tensor]:
    """peft state dicts (keys `<module>.lora_A.weight` / `.lora_B.weight`, as
    `get_peft_model_state_dict` returns them) -> kohya tensors with one `.alpha` per module,
    so every client applies `alpha / rank` as peft did."""
    named: list[tuple[str, dict[str, torch.Tensor]]] = []
    for path, parts in _modules(unet_layers, "unet").items():
        named.append((unet_module_name(path), parts))
    for path, parts in _modules(text_encoder_layers or {}, "text_encoder").items():
        named.append((text_encoder_module_name(path), parts))
    out: dict[str, torch.Tensor] = {}
    for name, parts in named:
        if set(parts) != {"lora_A.weight", "lora_B.weight"}:
            raise KohyaExportError(f"{name}: expected lora_A and lora_B, found {sorted(parts)}")
        if f"{name}.lora_down.weight" in out:
            raise KohyaExportError(f"two adapted modules map to the same kohya name {name}")
        out[f"{name}.lora_down.weight"] = parts["lora_A.weight"].float().contiguous()
        out[f"{name}.lora_up.weight"] = parts["lora_B.weight"].float().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_metadata(
    rank: int,
    alpha: float,
    cross_attention_dim: int,
    step: int,
    family: str | None = None,
    v_prediction: bool = False,
) -> dict:
    """sd-scripts' `ss_*` keys that the webui reads to show and sort a LoRA (its SD version
    comes from `ss_base_model_version` / `ss_v2`). `family` (models.model_family) decides
    SD 2.x; without it, a 1024-wide text context does."""
    sd2 = family == "sd2" if family else cross_attention_dim == 1024
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v2" if sd2 else "sd_v1",
        "ss_steps": str(step),
    }
    if sd2:
        meta["ss_v2"] = "True"
    if v_prediction:  # as sd-scripts writes it for --v_parameterization runs
        meta["ss_v_parameterization"] = "True"
    return meta


# The webui (v1.10 networks.py network_apply_weights) applies a LoRA to SD 2.x's OpenCLIP
# attention, a fused nn.MultiheadAttention, only when a layer has all four of these modules.
SD2_WEBUI_ATTENTION = (
    "self_attn_q_proj",
    "self_attn_k_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
)


def sd2_webui_skipped_layers(kohya: dict[str, torch.Tensor]) -> list[str]:
    """Text-encoder layers whose attention LoRA the webui skips on an SD 2.x model (some of
    q/k/v/out adapted, not all): `lora_te_text_model_encoder_layers_<i>` names."""
    adapted: dict[str, set[str]] = {}
    for key in kohya:
        m = re.match(r"^(lora_te_text_model_encoder_layers_\d+)_(self_attn_\w+?)\.", key)
        if m:
            adapted.setdefault(m.group(1), set()).add(m.group(2))
    return sorted(layer for layer, got in adapted.items() if set(SD2_WEBUI_ATTENTION) - got)
