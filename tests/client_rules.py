"""The loading rules of ComfyUI, the AUTOMATIC1111 webui and kohya's sd-scripts, restated
from their code so tests can apply them to what we write (their code is not vendored).

Read from: ComfyUI v0.3.64 `comfy/lora.py` (model_lora_keys_unet / _clip, load_lora),
`comfy/lora.py` at 00728eb (model_lora_keys_clip's clip_h branch, SD 2.x),
`comfy/utils.py` (unet_to_diffusers: UNET_MAP_RESNET, UNET_MAP_ATTENTIONS,
TRANSFORMER_BLOCKS, UNET_MAP_BASIC), `comfy/weight_adapter/lora.py`, `comfy/sd1_clip.py`
(load_embed), `comfy_extras/nodes_hypernetwork.py`; webui v1.10.1 `modules/safe.py`,
`extensions-builtin/Lora/networks.py` (convert_diffusers_name_to_compvis with its is_sd2
branch, load_network with re_x_proj, network_apply_weights' MultiheadAttention branch),
`network.py` (calc_scale), `modules/textual_inversion/textual_inversion.py`
(create_embedding_from_data); sd-scripts `networks/lora.py` (LoRANetwork.create_modules,
create_network_from_weights, load_weights).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

# ------------------------------------------------------------------ webui modules/safe.py

# Entry names check_zip_filenames accepts: '<dir>/version', '<dir>/data.pkl', '<dir>/data/<n>'.
WEBUI_ZIP_NAME = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
# RestrictedUnpickler.find_class's allow list.
WEBUI_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *(
        ("torch", n)
        for n in (
            "FloatStorage",
            "HalfStorage",
            "IntStorage",
            "LongStorage",
            "DoubleStorage",
            "ByteStorage",
            "float32",
            "BFloat16Storage",
        )
    ),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("__builtin__", "set"),
}


class WebuiRefused(Exception):
    pass


class _WebuiUnpickler(pickle.Unpickler):
    def persistent_load(self, saved_id):
        if saved_id[0] != "storage":
            raise WebuiRefused(f"persistent id {saved_id[0]!r}")
        return None

    def find_class(self, module, name):
        if (module, name) in WEBUI_GLOBALS:
            return lambda *args, **kwargs: None  # the check only unpickles; nothing is built
        raise WebuiRefused(f"global '{module}/{name}' is forbidden")


def webui_safe_check(path: Path) -> None:
    """check_pt: a zip file must hold only allowed entry names and a data.pkl that the
    restricted unpickler reads; a legacy file is five restricted pickles in a row."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if not WEBUI_ZIP_NAME.match(name):
                    raise WebuiRefused(f"bad file inside {path}: {name}")
            pkls = [n for n in z.namelist() if re.match(r"^([^/]+)/data\.pkl$", n)]
            if len(pkls) != 1:
                raise WebuiRefused(f"{len(pkls)} data.pkl in {path}")
            with z.open(pkls[0]) as f:
                _WebuiUnpickler(f).load()
        return
    with open(path, "rb") as f:
        unpickler = _WebuiUnpickler(f)
        for _ in range(5):
            unpickler.load()


# ------------------------------------------------------------------ LoRA module names

KOHYA_UNET_CLASSES = {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}
KOHYA_TE_CLASSES = {"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"}


def kohya_module_shapes(root: torch.nn.Module, prefix: str, te: bool = False) -> dict:
    """sd-scripts' create_modules (with conv_dim set, or loading from weights): every Linear
    or Conv2d inside a module of the target classes, named `prefix + "." + path` with dots
    -> `_`. sd-scripts runs transformers 4, whose CLIPTextModel has a `text_model` level;
    it is added where the installed transformers has dropped it. -> {name: weight shape}."""
    classes = KOHYA_TE_CLASSES if te else KOHYA_UNET_CLASSES
    out = {}
    for name, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            if type(child).__name__ in ("Linear", "Conv2d"):
                path = f"{name}.{child_name}"
                if te and not path.startswith("text_model."):
                    path = "text_model." + path
                out[f"{prefix}.{path}".replace(".", "_")] = tuple(child.weight.shape)
    return out


# comfy/utils.py unet_to_diffusers: which diffusers UNet weights ComfyUI maps (no norms here:
# a LoRA targets Linear/Conv2d weights).
COMFY_TRANSFORMER = {
    f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")
} | {"ff.net.0.proj", "ff.net.2"}
COMFY_ATTENTION = {"proj_in", "proj_out"}
COMFY_RESNET = {"conv1", "conv2", "time_emb_proj", "conv_shortcut"}
COMFY_BASIC = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}
COMFY_CLIP = {
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
}


def _comfy_maps_unet_path(path: str) -> bool:
    m = re.match(
        r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(attentions|resnets)\.\d+\.(.+)$", path
    )
    if m:
        kind, rest = m.group(2), m.group(3)
        if kind == "resnets":
            return rest in COMFY_RESNET
        block = re.match(r"^transformer_blocks\.\d+\.(.+)$", rest)
        return rest in COMFY_ATTENTION or bool(block and block.group(1) in COMFY_TRANSFORMER)
    if re.match(r"^(down_blocks\.\d+\.downsamplers|up_blocks\.\d+\.upsamplers)\.0\.conv$", path):
        return True
    return path in COMFY_BASIC


def comfyui_key_map(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, tuple]:
    """model_lora_keys_unet + model_lora_keys_clip for an SD1.x model (and SD 2.x: its
    `clip_h` layers get the same three names as SD1's `clip_l`, so one rule serves both):
    LoRA module name -> (component, diffusers module path). UNet: `lora_unet_<diffusers
    path>`, and the diffusers form only as `[unet.]<path with .to_ -> .processor.to_>`
    (to_out.0 -> to_out). CLIP:
    `lora_te_/lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP}` and
    `text_encoder.text_model.encoder.layers.{b}.{c}`."""
    key_map: dict[str, tuple] = {}
    for key in unet.state_dict():
        key = key.replace(".base_layer.", ".")  # the model's own weight under a peft layer
        if "lora_" in key or not key.endswith(".weight"):
            continue
        path = key[: -len(".weight")]
        if not _comfy_maps_unet_path(path):
            continue
        key_map["lora_unet_" + path.replace(".", "_")] = ("unet", path)
        for prefix in ("", "unet."):
            diffusers_key = prefix + path.replace(".to_", ".processor.to_")
            if diffusers_key.endswith(".to_out.0"):
                diffusers_key = diffusers_key[:-2]
            key_map[diffusers_key] = ("unet", path)
    layers = {n for n, _ in text_encoder.named_modules()}
    for b in range(32):
        for c, short in COMFY_CLIP.items():
            ours = next((n for n in layers if n.endswith(f"encoder.layers.{b}.{c}")), None)
            if ours is None:
                continue
            for key in (
                f"lora_te_text_model_encoder_layers_{b}_{short}",
                f"lora_te1_text_model_encoder_layers_{b}_{short}",
                f"text_encoder.text_model.encoder.layers.{b}.{c}",
            ):
                key_map[key] = ("text_encoder", ours)
    return key_map


# load_lora's weight suffixes: (up, down) pairs, then .alpha and .dora_scale.
COMFY_PAIRS = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)


def comfyui_load_lora(sd: dict[str, torch.Tensor], key_map: dict[str, tuple]):
    """load_lora: -> ({(component, path): (up, down, alpha or None)}, keys not loaded)."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in sd:
            alpha = sd[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        if f"{x}.dora_scale" in sd:
            loaded.add(f"{x}.dora_scale")
        for up, down in COMFY_PAIRS:
            if x + up in sd:
                patches[target] = (sd[x + up], sd[x + down], alpha)
                loaded |= {x + up, x + down}
                break
    return patches, sorted(set(sd) - loaded)


def comfyui_delta(up: torch.Tensor, down: torch.Tensor, alpha: float | None, shape) -> torch.Tensor:
    """calculate_weight, patch type "lora", strength 1: (alpha / rank) * up @ down; no alpha
    in the file -> 1.0 (metadata is not read)."""
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    return scale * torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(shape)


# webui extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis (SD1).
_WEBUI_RESNET = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def webui_compvis_name(key: str, is_sd2: bool = False) -> str:
    """`is_sd2`: the webui's SD 2.x branch renames text-encoder layers to OpenCLIP's
    `model_transformer_resblocks_{i}_{attn_*|mlp_c_fc|mlp_c_proj}` (same `lora_te_` input)."""

    def m(regex):
        r = re.match(regex, key)
        return [int(g) if g.isdigit() else g for g in r.groups()] if r else None

    if g := m(r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{g[0]}"
    if g := m(r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{g[0]}"
    if g := m(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{g[0] * 2 - 2}{g[1]}"
    if g := m(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _WEBUI_RESNET.get(g[3], g[3]) if g[1] == "resnets" else g[3]
        return (
            f"diffusion_model_input_blocks_{1 + g[0] * 3 + g[2]}_"
            f"{1 if g[1] == 'attentions' else 0}_{suffix}"
        )
    if g := m(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _WEBUI_RESNET.get(g[2], g[2]) if g[0] == "resnets" else g[2]
        return f"diffusion_model_middle_block_{1 if g[0] == 'attentions' else g[1] * 2}_{suffix}"
    if g := m(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _WEBUI_RESNET.get(g[3], g[3]) if g[1] == "resnets" else g[3]
        return (
            f"diffusion_model_output_blocks_{g[0] * 3 + g[2]}_"
            f"{1 if g[1] == 'attentions' else 0}_{suffix}"
        )
    if g := m(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + g[0] * 3}_0_op"
    if g := m(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + g[0] * 3}_{2 if g[0] > 0 else 1}_conv"
    if g := m(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if is_sd2:
            rest = g[1].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj")
            return f"model_transformer_resblocks_{g[0]}_{rest.replace('self_attn', 'attn')}"
        return f"transformer_text_model_encoder_layers_{g[0]}_{g[1]}"
    return key


def webui_layer_mapping(original_state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """network_layer_mapping of an SD1 checkpoint: module names of sd_model.model and
    cond_stage_model.wrapped with dots -> `_`, from the original-layout state dict
    -> {name: weight shape}."""
    out = {}
    for key, value in original_state.items():
        if key.endswith(".in_proj_weight"):  # SD 2.x OpenCLIP: the nn.MultiheadAttention
            key = key[: -len(".in_proj_weight")] + ".weight"
        if not key.endswith(".weight"):
            continue
        path = key[: -len(".weight")]
        for prefix in ("model.", "cond_stage_model."):
            if path.startswith(prefix):
                out[path[len(prefix) :].replace(".", "_")] = tuple(value.shape)
    return out


def webui_load_network(sd: dict[str, torch.Tensor], mapping: dict[str, tuple], is_sd2=False):
    """load_network: each key is `<network name>.<part>`; the name is converted, then looked
    up (also with lora_unet -> diffusion_model, lora_te1_text_model -> transformer_text_model,
    and `<module>_[qkv]_proj` -> `<module>`, SD 2.x's fused attention).
    -> ({compvis name: parts}, keys failed to match)."""
    matched, failed = {}, []
    for key, weight in sd.items():
        name, _, part = key.partition(".")
        compvis = webui_compvis_name(name, is_sd2)
        x_proj = re.match(r"^(.*)_([qkv]_proj)$", compvis)
        if compvis not in mapping and x_proj and x_proj.group(1) in mapping:
            matched.setdefault(compvis, {})[part] = weight
            continue
        if compvis not in mapping and "lora_unet" in name:
            compvis = name.replace("lora_unet", "diffusion_model")
        elif compvis not in mapping and "lora_te1_text_model" in name:
            compvis = name.replace("lora_te1_text_model", "transformer_text_model")
        if compvis not in mapping:
            failed.append(key)
            continue
        matched.setdefault(compvis, {})[part] = weight
    return matched, failed


def webui_sd2_attention_applied(matched: dict[str, dict]) -> dict[str, bool]:
    """network_apply_weights on SD 2.x's OpenCLIP nn.MultiheadAttention: a layer's LoRA is
    applied only when its `_q_proj`, `_k_proj`, `_v_proj` and `_out_proj` are all loaded.
    -> {`model_transformer_resblocks_<i>_attn`: applied}."""
    layers: dict[str, set[str]] = {}
    for name in matched:
        m = re.match(
            r"^(model_transformer_resblocks_\d+_attn)_(q_proj|k_proj|v_proj|out_proj)$", name
        )
        if m:
            layers.setdefault(m.group(1), set()).add(m.group(2))
    return {k: v == {"q_proj", "k_proj", "v_proj", "out_proj"} for k, v in layers.items()}


# ------------------------------------------------------------------ LoHa / LoKr
# ComfyUI comfy/weight_adapter/loha.py + lokr.py (LoHaAdapter/LoKrAdapter.load and
# calculate_weight); webui extensions-builtin/Lora/network_hada.py, network_lokr.py,
# lyco_helpers.py (make_weight_cp, rebuild_conventional), network.py (calc_scale,
# finalize_updown); LyCORIS lycoris/modules/loha.py, lokr.py (make_module_from_state_dict,
# __init__'s scale), read at KohakuBlueleaf/LyCORIS f49d30d.

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def comfyui_load_lycoris(sd: dict[str, torch.Tensor], key_map: dict[str, tuple]):
    """load_lora with the LoHa/LoKr adapters: for each mapped name x, `x.alpha` and the
    hada_* (when x.hada_w1_a is there) or lokr_* parts. -> ({target: parts}, not loaded)."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        parts = {}
        if f"{x}.alpha" in sd:
            parts["alpha"] = sd[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        names = LOHA_KEYS if f"{x}.hada_w1_a" in sd else LOKR_KEYS
        for name in names:
            if f"{x}.{name}" in sd:
                parts[name] = sd[f"{x}.{name}"]
                loaded.add(f"{x}.{name}")
        if set(parts) - {"alpha"}:
            patches[target] = parts
    return patches, sorted(set(sd) - loaded)


def _cp(t, wa, wb):
    # einsum("i j k l, j r, i p -> p r k l", t, wb, wa): the Tucker rebuild of all three
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


def comfyui_lycoris_delta(parts: dict, shape, strength: float = 1.0) -> torch.Tensor:
    """calculate_weight: LoHa scale alpha / hada_w1_b.shape[0]; LoKr scale alpha / dim with
    dim = lokr_w1_b's rows when w1 is decomposed, overwritten by lokr_w2_b's when w2 is,
    1.0 when neither (or no alpha)."""
    alpha = parts.get("alpha")
    if "hada_w1_a" in parts:
        scale = alpha / parts["hada_w1_b"].shape[0] if alpha is not None else 1.0
        if "hada_t1" in parts:
            m1 = _cp(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"])
            m2 = _cp(parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"])
        else:
            m1 = parts["hada_w1_a"] @ parts["hada_w1_b"]
            m2 = parts["hada_w2_a"] @ parts["hada_w2_b"]
        return (strength * scale) * (m1 * m2).reshape(shape)
    dim = None
    w1, w2 = parts.get("lokr_w1"), parts.get("lokr_w2")
    if w1 is None:
        dim = parts["lokr_w1_b"].shape[0]
        w1 = parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    if w2 is None:
        dim = parts["lokr_w2_b"].shape[0]
        if "lokr_t2" in parts:
            w2 = _cp(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
        else:
            w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return (strength * scale) * torch.kron(w1, w2).reshape(shape)


def webui_lycoris_delta(parts: dict, shape, multiplier: float = 1.0) -> torch.Tensor:
    """NetworkModuleHada / NetworkModuleLokr calc_updown, then finalize_updown:
    updown * multiplier * calc_scale (alpha / dim when both known, else 1.0); dim =
    hada_w1_b.shape[0] (LoHa), lokr_w1_b's then lokr_w2_b's rows (LoKr), else None."""
    alpha = parts.get("alpha")
    if "hada_w1_a" in parts:
        dim = parts["hada_w1_b"].shape[0]
        w1a, w1b, w2a, w2b = (parts[k] for k in LOHA_KEYS[:4])
        if "hada_t1" in parts:
            up1 = _cp(parts["hada_t1"], w1a, w1b)
        else:
            up1 = (w1a.reshape(w1a.size(0), -1) @ w1b.reshape(w1b.size(0), -1)).reshape(
                w1a.size(0), w1b.size(1)
            )
        if "hada_t2" in parts:
            up2 = _cp(parts["hada_t2"], w2a, w2b)
        else:
            up2 = (w2a @ w2b).reshape(up1.shape)
        updown = up1 * up2
    else:
        dim = None
        if "lokr_w1_b" in parts:
            dim = parts["lokr_w1_b"].shape[0]
        if "lokr_w2_b" in parts:
            dim = parts["lokr_w2_b"].shape[0]
        w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        if "lokr_w2" in parts:
            w2 = parts["lokr_w2"]
        elif "lokr_t2" in parts:
            w2 = _cp(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
        else:
            w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous())
    assert updown.numel() == torch.Size(shape).numel(), "finalize_updown cannot reshape"
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return updown.reshape(shape) * multiplier * scale


def lycoris_delta(parts: dict, shape, multiplier: float = 1.0) -> torch.Tensor:
    """LyCORIS' own modules built from a kohya file (make_module_from_state_dict):
    scale alpha / lora_dim (no alpha or 0 -> lora_dim, i.e. 1.0); a LoKr of two full
    matrices (use_w1 and use_w2) is forced to scale 1 whatever its alpha."""
    alpha = parts.get("alpha")
    if "hada_w1_a" in parts:
        dim = parts["hada_w1_b"].shape[0]
        scale = alpha / dim if alpha else 1.0
        return comfyui_lycoris_delta(dict(parts, alpha=dim * scale), shape, multiplier)
    if "lokr_w1_a" in parts:
        dim = parts["lokr_w1_a"].shape[1]
    elif "lokr_w2_a" in parts:
        dim = parts["lokr_w2_a"].shape[1]
    else:
        dim = None  # full_matrix: scale 1
    scale = alpha / dim if alpha and dim is not None else 1.0
    unit = {k: v for k, v in parts.items() if k != "alpha"}
    return comfyui_lycoris_delta(unit, shape, multiplier * scale)


# ------------------------------------------------------------------ embeddings


def comfyui_embedding(data, embed_key: str = "clip_l") -> torch.Tensor:
    """sd1_clip.load_embed after loading: string_to_param, a list, the model's key
    (clip_l for SD1), else the first value."""
    if "string_to_param" in data:
        return next(iter(data["string_to_param"].values()))
    if isinstance(data, list):
        return torch.cat([t.reshape(-1, t.shape[-1]) for d in data for t in d.values()])
    if embed_key in data:
        return data[embed_key]
    return next(iter(data.values()))


def webui_embedding(data) -> torch.Tensor:
    """create_embedding_from_data: string_to_param with exactly one term; SDXL clip_l+clip_g;
    else a dict of exactly one tensor (a 1-D one is one vector)."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        return next(iter(params.values()))
    if "clip_g" in data and "clip_l" in data:
        raise AssertionError("SDXL embedding")
    assert isinstance(next(iter(data.values())), torch.Tensor)
    assert len(data) == 1, "embedding file has multiple terms in it"
    emb = next(iter(data.values()))
    return emb.unsqueeze(0) if emb.dim() == 1 else emb


def webui_sdxl_embedding(data, expected_width: int) -> dict[str, torch.Tensor]:
    """The webui on an SDXL model: create_embedding_from_data takes a dict with clip_g and
    clip_l as {key: float tensor}, its shape = clip_g width + clip_l width, its token count =
    clip_g's rows; the embedding is registered only when that shape equals the model's
    (encode_embedding_init_text over both encoders: 768 + 1280), else skipped. Each encoder's
    EmbeddingsWithFixes then splices `vec[textual_inversion_key]` (clip_l / clip_g) into the
    prompt, `vectors` positions from the token on."""
    assert "clip_g" in data and "clip_l" in data, "not an SDXL embedding"
    vec = {k: v.detach().float() for k, v in data.items()}
    shape = data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
    assert shape == expected_width, f"skipped: shape {shape} != {expected_width}"
    vectors = data["clip_g"].shape[0]
    # The positions taken come from clip_g: clip_l with other rows would splice a wrong span.
    assert vec["clip_l"].shape[0] == vectors, "clip_l and clip_g rows differ"
    return {"clip_l": vec["clip_l"], "clip_g": vec["clip_g"]}


def comfyui_sdxl_embedding(data, clip_l_width: int, clip_g_width: int) -> dict[str, torch.Tensor]:
    """ComfyUI on SDXL: SDXLTokenizer holds a clip_l tokenizer (embedding_key 'clip_l', 768)
    and SDXLClipGTokenizer (embedding_key 'clip_g', 1280); each runs sd1_clip.load_embed on
    the same file, takes its own key (else the first value), and drops the embedding with a
    warning when the width is not its embedding_size."""
    out = {}
    for key, width in (("clip_l", clip_l_width), ("clip_g", clip_g_width)):
        embed = comfyui_embedding(data, key)
        assert embed.shape[-1] == width, f"{key}: width {embed.shape[-1]} != {width}, dropped"
        out[key] = embed
    return out


def kohya_sdxl_embedding(data) -> dict[str, torch.Tensor]:
    """sd-scripts sdxl_train_textual_inversion: save_weights writes {"clip_l": te1's,
    "clip_g": te2's} and load_weights reads exactly those two keys."""
    return {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}


def kohya_embedding(data) -> torch.Tensor:
    """sd-scripts train_textual_inversion load_weights: string_to_param's dict, else the
    file's dict; its first tensor."""
    if "string_to_param" in data:
        data = data["string_to_param"]
    emb = next(iter(data.values()))
    return emb.unsqueeze(0) if emb.dim() == 1 else emb


# ------------------------------------------------------------------ hypernetworks

COMFY_ACTIVATIONS = {
    "linear": torch.nn.Identity,
    "relu": torch.nn.ReLU,
    "leakyrelu": torch.nn.LeakyReLU,
    "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish,
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
    "softsign": torch.nn.Softsign,
    "mish": torch.nn.Mish,
}


def comfyui_hypernetwork(sd) -> dict[int, list[torch.nn.Sequential]] | None:
    """load_hypernetwork_patch: None for an unknown activation; integer keys only; each
    module rebuilt from its state dict's `.weight` keys in order (a LayerNorm counts as a
    layer when deciding which Linear is last)."""
    act = sd.get("activation_func", "linear")
    is_layer_norm = sd.get("is_layer_norm", False)
    use_dropout = sd.get("use_dropout", False)
    activate_output = sd.get("activate_output", False)
    last_layer_dropout = sd.get("last_layer_dropout", False)
    if act not in COMFY_ACTIVATIONS:
        return None
    out = {}
    for d in sd:
        try:
            dim = int(d)
        except (TypeError, ValueError):
            continue
        pair = []
        for index in (0, 1):
            weights = sd[dim][index]
            linears = [k[: -len(".weight")] for k in weights if k.endswith(".weight")]
            layers, i = [], 0
            while i < len(linears):
                name = linears[i]
                last, penultimate = i == len(linears) - 1, i == len(linears) - 2
                w = weights[f"{name}.weight"]
                lin = torch.nn.Linear(w.shape[1], w.shape[0])
                lin.load_state_dict({"weight": w, "bias": weights[f"{name}.bias"]})
                layers.append(lin)
                if act != "linear" and ((not last) or activate_output):
                    layers.append(COMFY_ACTIVATIONS[act]())
                if is_layer_norm:
                    i += 1
                    ln_w = weights[f"{linears[i]}.weight"]
                    ln = torch.nn.LayerNorm(ln_w.shape[0])
                    ln.load_state_dict({"weight": ln_w, "bias": weights[f"{linears[i]}.bias"]})
                    layers.append(ln)
                if use_dropout and (not last) and (not penultimate or last_layer_dropout):
                    layers.append(torch.nn.Dropout(p=0.3))
                i += 1
            pair.append(torch.nn.Sequential(*layers))
        out[dim] = pair
    return out


# ------------------------------------------------------------------ SDXL LoRA names

# comfy/utils.py UNET_MAP_RESNET (original -> diffusers), weights only.
COMFY_RESNET_ORIGINAL = {
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
COMFY_BASIC_ORIGINAL = {
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
}
COMFY_TRANSFORMER_WEIGHTS = COMFY_TRANSFORMER | {"norm1", "norm2", "norm3"}


def comfyui_unet_to_diffusers(unet: torch.nn.Module) -> dict[str, str]:
    """comfy/utils.py unet_to_diffusers for the model's UNet: diffusers module path ->
    original (Stability) module path, for the Linear/Conv2d layers a LoRA targets. Its
    inputs (num_res_blocks, transformer depth per block, middle depth) are read off the
    model as ComfyUI's model_detection reads them off a checkpoint."""
    config = unet.config
    levels = len(config.block_out_channels)
    num_res_blocks = [config.layers_per_block] * levels

    def depth(block, i) -> int:
        attentions = getattr(block, "attentions", None)
        return len(attentions[i].transformer_blocks) if attentions else 0

    out: dict[str, str] = {}

    def transformer(diffusers: str, original: str, n: int) -> None:
        for b in ("proj_in", "proj_out"):
            out[f"{diffusers}.{b}"] = f"{original}.{b}"
        for t in range(n):
            for b in COMFY_TRANSFORMER:
                out[f"{diffusers}.transformer_blocks.{t}.{b}"] = (
                    f"{original}.transformer_blocks.{t}.{b}"
                )

    def resnet(diffusers: str, original: str) -> None:
        for o, d in COMFY_RESNET_ORIGINAL.items():
            out[f"{diffusers}.{d}"] = f"{original}.{o}"

    for x in range(levels):
        n = 1 + (num_res_blocks[x] + 1) * x
        block = unet.down_blocks[x]
        for i in range(num_res_blocks[x]):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0")
            if depth(block, i) > 0:
                transformer(
                    f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", depth(block, i)
                )
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    transformer("mid_block.attentions.0", "middle_block.1", depth(unet.mid_block, 0))
    for i, n in enumerate([0, 2]):
        resnet(f"mid_block.resnets.{i}", f"middle_block.{n}")
    up_res = list(reversed(num_res_blocks))
    for x in range(levels):
        n = (up_res[x] + 1) * x
        count = up_res[x] + 1
        block = unet.up_blocks[x]
        for i in range(count):
            c = 1
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0")
            if depth(block, i) > 0:
                c += 1
                transformer(
                    f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", depth(block, i)
                )
            if i == count - 1:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    for original, diffusers in COMFY_BASIC_ORIGINAL.items():
        out[diffusers] = original
    modules = {name for name, _ in unet.named_modules()}
    return {d: o for d, o in out.items() if d in modules}


def comfyui_sdxl_key_map(unet, text_encoder, text_encoder_2) -> tuple[dict[str, tuple], set]:
    """model_lora_keys_unet + model_lora_keys_clip for an SDXL model: LoRA module name ->
    (component, diffusers module path). UNet: `lora_unet_<original path>` (every weight of
    the original model), `lora_unet_<diffusers path>` and the diffusers forms. CLIP (clip_l
    and clip_g present): clip_l as `lora_te_`/`lora_te1_`/`text_encoder.`, clip_g as
    `lora_te2_`/`text_encoder_2.`. Also returns the original-layout names: the ones the
    webui (`lora_unet` -> `diffusion_model`, looked up in the original model's modules)
    and sd-scripts (its SDXL UNet has the original module tree) find too."""
    key_map: dict[str, tuple] = {}
    original_names = set()
    for diffusers, original in comfyui_unet_to_diffusers(unet).items():
        name = "lora_unet_" + original.replace(".", "_")
        key_map[name] = ("unet", diffusers)
        original_names.add(name)
        key_map["lora_unet_" + diffusers.replace(".", "_")] = ("unet", diffusers)
        for prefix in ("", "unet."):
            diffusers_key = prefix + diffusers.replace(".to_", ".processor.to_")
            if diffusers_key.endswith(".to_out.0"):
                diffusers_key = diffusers_key[:-2]
            key_map[diffusers_key] = ("unet", diffusers)
    for component, model, keys in (
        ("text_encoder", text_encoder, ("lora_te_", "lora_te1_")),
        ("text_encoder_2", text_encoder_2, ("lora_te2_",)),
    ):
        layers = {n for n, _ in model.named_modules()}
        for b in range(32):
            for c, short in COMFY_CLIP.items():
                ours = next((n for n in layers if n.endswith(f"encoder.layers.{b}.{c}")), None)
                if ours is None:
                    continue
                for prefix in keys:
                    key_map[f"{prefix}text_model_encoder_layers_{b}_{short}"] = (component, ours)
                key_map[f"{component}.text_model.encoder.layers.{b}.{c}"] = (component, ours)
    return key_map, original_names
