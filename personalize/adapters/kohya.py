"""peft LoRA weights -> the kohya layout that ComfyUI, the AUTOMATIC1111 webui and kohya's
sd-scripts load (`lora_unet_*`, `lora_te_*`, `.lora_down/.lora_up.weight`, `.alpha`).

Module names follow sd-scripts' `networks/lora.py`: the module path with `.` -> `_`, under
`lora_unet_` for the UNet (diffusers block names, which the webui converts to the original
layout and ComfyUI maps through its own diffusers table) and `lora_te_` for an SD 1.x/2.x
text encoder. Text-encoder names are fixed by those tools to transformers 4's module tree,
`lora_te_text_model_encoder_layers_{i}_{self_attn_q_proj|k|v|out_proj|mlp_fc1|mlp_fc2}`,
whatever the installed transformers calls the modules (transformers 5 drops `text_model.`).

SDXL (sd-scripts' `sdxl_train_network.py`, ComfyUI's SDXL key map): the UNet is named by the
original (Stability) module tree, `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`
(`sdxl_unet_path` maps diffusers' block names to it), and the two text encoders are
`lora_te1_text_model_...` (CLIP-L) and `lora_te2_text_model_...` (OpenCLIP-bigG).

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
# SDXL's two text encoders (CLIP-L as text_encoder, OpenCLIP-bigG as text_encoder_2).
SDXL_TEXT_ENCODER_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
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


def text_encoder_module_name(path: str, prefix: str = TEXT_ENCODER_PREFIX) -> str:
    """`encoder.layers.3.self_attn.q_proj` (transformers 5) or
    `text_model.encoder.layers.3.self_attn.q_proj` (4) ->
    `lora_te_text_model_encoder_layers_3_self_attn_q_proj` (`prefix`: lora_te1_/lora_te2_
    for SDXL's encoders)."""
    m = _TE_PATH.search(path)
    if not m or m.group(2) not in TEXT_ENCODER_LAYERS:
        raise KohyaExportError(
            f"text encoder module {path!r} has no kohya/ComfyUI/webui name: those tools "
            f"address only encoder layers' {', '.join(TEXT_ENCODER_LAYERS)}; set "
            "lora.text_encoder_target_modules to those (q_proj, k_proj, v_proj, out_proj, "
            "fc1, fc2)"
        )
    layer, rest = m.group(1), m.group(2)
    return f"{prefix}text_model_encoder_layers_{layer}_{rest.replace('.', '_')}"


def unet_module_name(path: str, sdxl_unet=None) -> str:
    """`down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`;
    with an SDXL UNet's config, the original module name
    (`lora_unet_input_blocks_1_1_proj_in`)."""
    if sdxl_unet is not None:
        path = sdxl_unet_path(path, sdxl_unet)
    return UNET_PREFIX + path.replace(".", "_")


_RESNET_ORIGINAL = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_BASIC_ORIGINAL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def sdxl_unet_path(path: str, config) -> str:
    """A diffusers UNet module path -> the original (Stability/ComfyUI/sd-scripts) one:
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` ->
    `input_blocks.4.1.transformer_blocks.0.attn1.to_q` (SDXL: 2 layers per down block,
    3 per up block; `config`: the UNet's, for its layer counts and block types)."""
    if path in _BASIC_ORIGINAL:
        return _BASIC_ORIGINAL[path]
    per_down = config.layers_per_block
    if not isinstance(per_down, int):
        raise KohyaExportError("a UNet with per-block layer counts has no SDXL module names")
    per_up = per_down + 1

    def inner(kind: str, rest: str) -> str:
        if kind != "resnets":
            return rest  # attention blocks keep their inner names
        head, _, tail = rest.partition(".")
        if head not in _RESNET_ORIGINAL:
            raise KohyaExportError(f"UNet module {path!r} has no SDXL original name")
        return _RESNET_ORIGINAL[head] + (f".{tail}" if tail else "")

    m = re.match(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = 0 if kind == "resnets" else 1
        return f"input_blocks.{1 + i * (per_down + 1) + j}.{slot}.{inner(kind, rest)}"
    m = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$", path)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (per_down + 1)}.0.op"
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        slot = 2 * j if kind == "resnets" else 1
        return f"middle_block.{slot}.{inner(kind, rest)}"
    m = re.match(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = 0 if kind == "resnets" else 1
        return f"output_blocks.{i * per_up + j}.{slot}.{inner(kind, rest)}"
    m = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$", path)
    if m:
        i = int(m[1])
        has_attention = "CrossAttn" in config.up_block_types[i]
        return f"output_blocks.{i * per_up + per_up - 1}.{2 if has_attention else 1}.conv"
    raise KohyaExportError(f"UNet module {path!r} has no SDXL original name")


def kohya_name(peft_key: str, sdxl_unet=None) -> str:
    """A peft-style key `unet.<module>` / `text_encoder.<module>` (/ `text_encoder_2.` for
    SDXL) -> its kohya base name (`lora_unet_...`, `lora_te_text_model_...`; SDXL, with its
    UNet config `sdxl_unet`: original UNet names, `lora_te1_`/`lora_te2_`): the one naming
    of the package, also used by the LoRA tools."""
    component, _, module = peft_key.partition(".")
    if component == "unet":
        return unet_module_name(module, sdxl_unet)
    if component in ("text_encoder", "text_encoder_2") and (
        sdxl_unet is not None or component == "text_encoder_2"
    ):
        return text_encoder_module_name(module, SDXL_TEXT_ENCODER_PREFIXES[component])
    if component == "text_encoder":
        return text_encoder_module_name(module)
    raise KohyaExportError(f"{peft_key!r}: expected a unet.* or text_encoder.* module path")


def kohya_named(
    unet_modules: dict[str, dict],
    text_encoder_modules: dict[str, dict],
    text_encoder_2_modules: dict[str, dict] | None = None,
    sdxl_unet=None,
) -> list[tuple[str, dict]]:
    """{module path: parts} per component -> [(kohya name, parts)]: the naming that LoRA
    and LoHa/LoKr files share (SD 1.x/2.x: diffusers UNet names, `lora_te_`; SDXL, with its
    UNet config `sdxl_unet`: original UNet names, `lora_te1_`/`lora_te2_`)."""
    sdxl = sdxl_unet is not None
    named = [(unet_module_name(p, sdxl_unet), parts) for p, parts in unet_modules.items()]
    te_prefix = SDXL_TEXT_ENCODER_PREFIXES["text_encoder"] if sdxl else TEXT_ENCODER_PREFIX
    for path, parts in text_encoder_modules.items():
        named.append((text_encoder_module_name(path, te_prefix), parts))
    te2_prefix = SDXL_TEXT_ENCODER_PREFIXES["text_encoder_2"]
    for path, parts in (text_encoder_2_modules or {}).items():
        named.append((text_encoder_module_name(path, te2_prefix), parts))
    return named


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
    *,
    text_encoder_2_layers: dict[str, torch.Tensor] | None = None,
    sdxl_unet=None,
) -> dict[str, torch.Tensor]:
    """peft state dicts (keys `<module>.lora_A.weight` / `.lora_B.weight`, as
    `get_peft_model_state_dict` returns them) -> kohya tensors with one `.alpha` per module,
    so every client applies `alpha / rank` as peft did. `sdxl_unet` (an SDXL UNet's config)
    switches to SDXL's names; `text_encoder_2_layers`: SDXL's second text encoder."""
    named = kohya_named(
        _modules(unet_layers, "unet"),
        _modules(text_encoder_layers or {}, "text_encoder"),
        _modules(text_encoder_2_layers or {}, "text_encoder_2"),
        sdxl_unet,
    )
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
    comes from `ss_base_model_version` / `ss_v2`; SDXL: sd-scripts' `sdxl_base_v1-0`).
    `family` (models.model_family) decides; without it, a 1024-wide text context is SD 2.x."""
    sdxl = family == "sdxl"
    sd2 = family == "sd2" if family else cross_attention_dim == 1024
    version = "sdxl_base_v1-0" if sdxl else "sd_v2" if sd2 else "sd_v1"
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": version,
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


# ------------------------------------------------------------------------------ LoHa / LoKr

# The LyCORIS parameter names, the same in peft (LoHaLayer / LoKrLayer, ported from
# LyCORIS) and in the kohya-layout files ComfyUI, the webui and LyCORIS read.
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_LYCORIS_KEY = re.compile(rf"^(.+)\.({'|'.join(LOHA_PARTS + LOKR_PARTS)})$")


def lokr_is_decomposed(parts) -> bool:
    """Whether the clients scale a LoKr module by alpha / dim: ComfyUI and the webui take
    dim from lokr_w1_b or lokr_w2_b and use scale 1.0 when neither is there; LyCORIS
    forces scale 1 when both w1 and w2 are full matrices."""
    return "lokr_w1_b" in parts or "lokr_w2_b" in parts


def lycoris_dim(parts) -> int | None:
    """The `dim` the clients divide alpha by: hada_w1_b's rows (LoHa); for LoKr lokr_w2_b's,
    else lokr_w1_b's (ComfyUI's order; the same r when both are there); None: scale 1."""
    for name in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if name in parts:
            return int(parts[name].shape[0])
    return None


def _lycoris_modules(layers: dict[str, torch.Tensor], where: str) -> dict[str, dict]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in layers.items():
        m = _LYCORIS_KEY.match(key)
        if not m:
            raise KohyaExportError(f"{where}: unexpected LoHa/LoKr adapter key {key!r}")
        out.setdefault(m.group(1), {})[m.group(2)] = tensor
    return out


def peft_lycoris_to_kohya(
    unet_layers: dict[str, torch.Tensor],
    text_encoder_layers: dict[str, torch.Tensor] | None,
    rank: int,
    alpha: float,
    *,
    text_encoder_2_layers: dict[str, torch.Tensor] | None = None,
    sdxl_unet=None,
) -> dict[str, torch.Tensor]:
    """peft LoHa/LoKr state dicts (keys `<module>.hada_w1_a`, `<module>.lokr_w1`, ...) ->
    kohya/LyCORIS tensors `lora_unet_<module>.<part>` with one `.alpha` per module, named
    as the LoRA file is (`kohya_named`: SDXL's with `sdxl_unet` and text_encoder_2).

    peft scales every module by alpha / r. The clients do the same for LoHa (dim =
    hada_w1_b's rows = r) and for a LoKr module with a low-rank factor (dim = r), but
    apply a LoKr module of two full matrices at scale 1: its alpha / r is multiplied into
    lokr_w2 here (and `.alpha` written as r, as LyCORIS writes it), so every client
    applies what peft trained."""
    named = kohya_named(
        _lycoris_modules(unet_layers, "unet"),
        _lycoris_modules(text_encoder_layers or {}, "text_encoder"),
        _lycoris_modules(text_encoder_2_layers or {}, "text_encoder_2"),
        sdxl_unet,
    )
    out: dict[str, torch.Tensor] = {}
    for name, parts in named:
        if f"{name}.alpha" in out:
            raise KohyaExportError(f"two adapted modules map to the same kohya name {name}")
        parts = {k: v.float().contiguous() for k, v in parts.items()}
        module_alpha = float(alpha)
        if any(k.startswith("lokr_") for k in parts) and not lokr_is_decomposed(parts):
            parts["lokr_w2"] = (parts["lokr_w2"].double() * (alpha / rank)).float()
            module_alpha = float(rank)
        for part, tensor in parts.items():
            out[f"{name}.{part}"] = tensor
        out[f"{name}.alpha"] = torch.tensor(module_alpha)
    return out


def lycoris_metadata(
    kind: str,
    rank: int,
    alpha: float,
    options: dict,
    cross_attention_dim: int,
    step: int,
    family: str | None = None,
    v_prediction: bool = False,
) -> dict:
    """kohya_metadata for a LyCORIS network (`ss_network_module: lycoris.kohya`, the algo
    and its options in `ss_network_args`, as LyCORIS' kohya wrapper records them)."""
    import json

    meta = kohya_metadata(rank, alpha, cross_attention_dim, step, family, v_prediction)
    args = {"algo": kind}
    if kind == "lokr":
        args["factor"] = str(options.get("decompose_factor", -1))
        args["decompose_both"] = str(bool(options.get("decompose_both")))
    args["use_tucker"] = str(bool(options.get("use_effective_conv2d")))
    meta["ss_network_module"] = "lycoris.kohya"
    meta["ss_network_args"] = json.dumps(args)
    return meta
