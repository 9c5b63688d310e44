"""LoHa / LoKr files (kohya/LyCORIS layout) into a diffusers pipeline, as peft layers.

Ours (`lycoris_kohya.safetensors`) and ones from kohya's sd-scripts + LyCORIS share one
layout: `lora_unet_<module>.hada_w1_a ...` / `.lokr_w1 ...` and `.alpha`
(adapters/kohya.py; on SDXL the original UNet names and lora_te1_/lora_te2_ for the two
text encoders, as for LoRA). Stock diffusers' load_lora_weights reads none of it, so each module
gets a peft LoHa/LoKr layer (peft's LoHaConfig / LoKrConfig, injected like diffusers
injects LoRA) whose factors are then replaced by the file's own tensors: peft computes
the delta from whichever factors a layer holds (full lokr_w1 or lokr_w1_a/b, Tucker
t1/t2 or not), so any file's shapes load as written, not as peft would have chosen them.
Each layer's r / alpha are set so that peft's scale alpha / r is what the clients apply
(alpha / dim, or 1.0 for a LoKr of full matrices). Then diffusers' set_adapters (strength),
delete_adapters (unload) and fuse_lora (merge) work as for a LoRA.
"""

from __future__ import annotations

from pathlib import Path

import torch

from personalize.adapters.kohya import (
    LOHA_PARTS,
    LOKR_PARTS,
    SDXL_TEXT_ENCODER_PREFIXES,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    lycoris_dim,
    text_encoder_module_name,
    unet_module_name,
)
from personalize.errors import ArtifactError, KohyaExportError


def is_lycoris_file(file: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return any(k.rpartition(".")[2] in LOHA_PARTS + LOKR_PARTS for k in f.keys())


def read_modules(file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya module name: {part: tensor}} (parts: hada_*/lokr_* and alpha)."""
    from safetensors.torch import load_file

    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(file)).items():
        name, _, part = key.partition(".")
        modules.setdefault(name, {})[part] = tensor
    return modules


def module_kind(name: str, parts: dict) -> str:
    if "hada_w1_a" in parts:
        missing = [p for p in LOHA_PARTS[:4] if p not in parts]
        kind = "loha"
    elif any(p.startswith("lokr_") for p in parts):
        has_1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= set(parts)
        has_2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= set(parts)
        missing = [w for w, ok in (("lokr_w1", has_1), ("lokr_w2", has_2)) if not ok]
        kind = "lokr"
    else:
        raise ArtifactError(
            f"{name}: parts {sorted(parts)} are neither LoHa (hada_*) nor LoKr (lokr_*); "
            "a file mixing LoRA and LoHa/LoKr modules is not supported"
        )
    if missing:
        raise ArtifactError(f"{name}: incomplete {kind} module, missing {missing}")
    return kind


def client_scale(parts: dict) -> tuple[float, float]:
    """(r, alpha) for peft such that alpha / r is the scale ComfyUI, the webui and
    LyCORIS apply: alpha / dim, no alpha -> 1.0 (ComfyUI, webui), no dim -> 1.0."""
    dim = lycoris_dim(parts)
    alpha = parts.get("alpha")
    if dim is None or alpha is None:
        return 1.0, 1.0
    return float(dim), float(alpha)


def _module_paths(model: torch.nn.Module, name_of) -> dict[str, str]:
    """kohya name -> module path for every Linear / Conv2d of `model` that `name_of`
    names; a layer an adapter loaded before wraps (peft's `<path>.base_layer`) keeps its
    own path."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for path, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        elif ".base_layer" in path or path.endswith("base_layer"):
            continue
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        for name in name_of(path):
            out[name] = path
    return out


def _names(*namers):
    """path -> the kohya names the namers give it (one that has none for it is skipped)."""

    def name_of(path: str) -> list[str]:
        names = []
        for namer in namers:
            try:
                names.append(namer(path))
            except KohyaExportError:
                continue
        return names

    return name_of


def _components(pipe) -> list[tuple[str, tuple[str, ...], torch.nn.Module, object]]:
    """(component, the name prefixes it reads, model, path -> names) for `pipe`. SD 1.x/2.x:
    lora_unet_ (diffusers block names) and lora_te_. SDXL, as our files and sd-scripts'
    name it: lora_unet_ with the original UNet names, lora_te1_ / lora_te2_; also what
    ComfyUI accepts besides (lora_unet_ with diffusers names, lora_te_ for CLIP-L)."""
    unet = pipe.unet
    if getattr(pipe, "text_encoder_2", None) is None:
        return [
            ("unet", (UNET_PREFIX,), unet, _names(unet_module_name)),
            ("text_encoder", (TEXT_ENCODER_PREFIX,), pipe.text_encoder,
             _names(text_encoder_module_name)),
        ]  # fmt: skip
    te1 = SDXL_TEXT_ENCODER_PREFIXES["text_encoder"]
    te2 = SDXL_TEXT_ENCODER_PREFIXES["text_encoder_2"]
    return [
        ("unet", (UNET_PREFIX,), unet,
         _names(lambda p: unet_module_name(p, unet.config), unet_module_name)),
        ("text_encoder", (te1, TEXT_ENCODER_PREFIX), pipe.text_encoder,
         _names(lambda p: text_encoder_module_name(p, te1), text_encoder_module_name)),
        ("text_encoder_2", (te2,), pipe.text_encoder_2,
         _names(lambda p: text_encoder_module_name(p, te2))),
    ]  # fmt: skip


def _peft_config(kind: str, targets: list[str], tucker: bool):
    from peft import LoHaConfig, LoKrConfig

    cls = LoHaConfig if kind == "loha" else LoKrConfig
    return cls(r=1, alpha=1.0, target_modules=targets, use_effective_conv2d=tucker)


def _set_factors(layer, adapter: str, parts: dict, kind: str, where: str) -> None:
    """The file's factors into peft `layer` in place of the ones peft created."""
    weight = layer.get_base_layer().weight
    for part in LOHA_PARTS if kind == "loha" else LOKR_PARTS:
        store = getattr(layer, part)
        if adapter in store:
            del store[adapter]
        if part in parts:
            store[adapter] = torch.nn.Parameter(
                parts[part].to(weight.device, weight.dtype), requires_grad=False
            )
    r, alpha = client_scale(parts)
    layer.r[adapter], layer.alpha[adapter] = r, alpha
    layer.scaling[adapter] = alpha / r
    try:
        delta = layer.get_delta_weight(adapter)
    except RuntimeError as e:
        raise ArtifactError(f"{where}: its factors do not make this model's weight: {e}") from e
    if delta.shape != weight.shape:
        raise ArtifactError(f"{where}: delta {tuple(delta.shape)} != weight {tuple(weight.shape)}")


def load_lycoris(pipe, file: Path, adapter_name: str) -> None:
    """Load `file` as adapter `adapter_name` into pipe.unet (and its text encoders)."""
    from peft import inject_adapter_in_model

    modules = read_modules(file)
    kinds = {name: module_kind(name, parts) for name, parts in modules.items()}
    if len(set(kinds.values())) > 1:
        raise ArtifactError(f"{file}: mixes LoHa and LoKr modules; load one kind per file")
    kind = next(iter(kinds.values()))
    tucker = any("hada_t1" in p or "lokr_t2" in p for p in modules.values())
    components = _components(pipe)
    prefixes = tuple(p for _, pre, _, _ in components for p in pre)
    unknown = [n for n in modules if not n.startswith(prefixes)]
    if unknown:
        raise ArtifactError(
            f"{file}: module names this pipeline has no part for, e.g. {unknown[0]} "
            f"({', '.join(p + '*' for p in prefixes)} are read)"
        )
    for component, prefix, model, name_of in components:
        mine = {n: p for n, p in modules.items() if n.startswith(prefix)}
        if not mine:
            continue
        paths = _module_paths(model, name_of)
        missing = [n for n in mine if n not in paths]
        if missing:
            raise ArtifactError(
                f"{file}: {len(missing)} modules match nothing in this pipeline's {component} "
                f"(e.g. {missing[0]}); it was made for another base model"
            )
        targets = sorted({paths[n] for n in mine})
        if len(targets) < len(mine):
            raise ArtifactError(f"{file}: two module names address one {component} layer")
        config = _peft_config(kind, targets, tucker)
        if component == "unet":
            model.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
        for name, parts in mine.items():
            layer = model.get_submodule(paths[name])
            _set_factors(layer, adapter_name, parts, kind, f"{file}: {name}")
