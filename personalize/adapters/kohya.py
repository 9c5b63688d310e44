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


def kohya_metadata(rank: int, alpha: float, cross_attention_dim: int, step: int) -> dict:
    """sd-scripts' `ss_*` keys that the webui reads to show and sort a LoRA (its SD version
    comes from `ss_base_model_version` / `ss_v2`)."""
    sd2 = cross_attention_dim == 1024
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v2" if sd2 else "sd_v1",
        "ss_steps": str(step),
    }
    if sd2:
        meta["ss_v2"] = "True"
    return meta


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
) -> dict[str, torch.Tensor]:
    """peft LoHa/LoKr state dicts (keys `<module>.hada_w1_a`, `<module>.lokr_w1`, ...) ->
    kohya/LyCORIS tensors `lora_unet_<module>.<part>` with one `.alpha` per module.

    peft scales every module by alpha / r. The clients do the same for LoHa (dim =
    hada_w1_b's rows = r) and for a LoKr module with a low-rank factor (dim = r), but
    apply a LoKr module of two full matrices at scale 1: its alpha / r is multiplied into
    lokr_w2 here (and `.alpha` written as r, as LyCORIS writes it), so every client
    applies what peft trained."""
    named: list[tuple[str, dict[str, torch.Tensor]]] = []
    for path, parts in _lycoris_modules(unet_layers, "unet").items():
        named.append((unet_module_name(path), parts))
    for path, parts in _lycoris_modules(text_encoder_layers or {}, "text_encoder").items():
        named.append((text_encoder_module_name(path), parts))
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
    kind: str, rank: int, alpha: float, options: dict, cross_attention_dim: int, step: int
) -> dict:
    """kohya_metadata for a LyCORIS network (`ss_network_module: lycoris.kohya`, the algo
    and its options in `ss_network_args`, as LyCORIS' kohya wrapper records them)."""
    import json

    meta = kohya_metadata(rank, alpha, cross_attention_dim, step)
    args = {"algo": kind}
    if kind == "lokr":
        args["factor"] = str(options.get("decompose_factor", -1))
        args["decompose_both"] = str(bool(options.get("decompose_both")))
    args["use_tucker"] = str(bool(options.get("use_effective_conv2d")))
    meta["ss_network_module"] = "lycoris.kohya"
    meta["ss_network_args"] = json.dumps(args)
    return meta
