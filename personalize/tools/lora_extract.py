"""`personalize lora extract`: a LoRA from the weight difference of a fine-tuned pipeline
(e.g. a DreamBooth output) and its base.

Every Linear and Conv2d layer of the UNet, and of the text encoder(s) when they differ
(SDXL: text_encoder and text_encoder_2), whose weight changed gets the best rank-k
approximation of the change (SVD). What a LoRA cannot carry (biases, norms, embeddings) is
counted and logged, so the user knows what is lost.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from personalize.errors import ArtifactError, ModelLoadError
from personalize.tools.lora_layers import LoraLayer, factor, write_kohya, write_peft
from personalize.tools.lora_resize import RankSummary, check_target

logger = logging.getLogger(__name__)


# The layers kohya's extractor and webui/ComfyUI's LoRA loaders map: the UNet's blocks
# (attention, resnets, down/upsamplers) and the text encoder's transformer layers. The rest
# (time embedding, conv_in/conv_out) only with all_layers: diffusers loads them, webui not.
_SCOPE = {
    "unet": ("down_blocks.", "mid_block.", "up_blocks."),
    "text_encoder": ("encoder.layers.", "text_model.encoder.layers."),
}
_SCOPE["text_encoder_2"] = _SCOPE["text_encoder"]


def _adaptable(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return isinstance(module, torch.nn.Conv2d) and module.groups == 1


def extract_module(
    component: str,
    base: torch.nn.Module,
    tuned: torch.nn.Module,
    rank: int | None,
    energy: float | None,
    all_layers: bool = False,
    device: str | None = None,
) -> tuple[dict[str, LoraLayer], list[float], list[str]]:
    """(layers keyed `component.<module>`, kept energies, names of changed tensors the LoRA
    does not carry)."""
    layers, energies = {}, []
    tuned_modules = dict(tuned.named_modules())
    adapted = set()
    for name, module in base.named_modules():
        if not _adaptable(module) or not (all_layers or name.startswith(_SCOPE[component])):
            continue
        other = tuned_modules.get(name)
        if other is None or other.weight.shape != module.weight.shape:
            raise ModelLoadError(
                f"{component}.{name}: the tuned model's layer does not match the base "
                "(another architecture?); extract needs the base the model was tuned from"
            )
        adapted.add(name + ".weight")
        diff = other.weight.detach().float() - module.weight.detach().float()
        if not torch.any(diff != 0):
            continue
        if device:  # the SVDs of SD's big layers are much faster on a GPU
            diff = diff.to(device)
        w = module.weight
        shape_down = tuple(w.shape[1:])  # (in,) or (in, k, k)
        shape_up = (1, 1) if w.dim() == 4 else ()
        layer, kept = factor(diff.reshape(w.shape[0], -1), shape_down, shape_up, rank, energy)
        layers[f"{component}.{name}"] = LoraLayer(layer.down.cpu(), layer.up.cpu(), layer.alpha)
        energies.append(kept)
    tuned_state = tuned.state_dict()
    lost = [
        f"{component}.{k}"
        for k, v in base.state_dict().items()
        if k not in adapted and k in tuned_state and not torch.equal(v, tuned_state[k])
    ]
    return layers, energies, lost


def _keep_text_encoder_loadable(
    layers: dict[str, LoraLayer], text_encoder, component: str = "text_encoder"
) -> None:
    """diffusers' loaders guess a text-encoder LoRA's naming from its attention layers and
    drop or refuse one whose encoder layers lack some of q/k/v/out_proj (e.g. only the MLP
    changed). Pad each such encoder layer with zero rank-1 projections: they change nothing.
    """
    modules = dict(text_encoder.named_modules())
    for key in [k for k in layers if k.startswith(component + ".")]:
        block = key.partition(".")[2].rsplit(".", 2)[0]  # encoder.layers.N
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            name = f"{block}.self_attn.{proj}"
            linear = modules.get(name)
            if f"{component}.{name}" not in layers and isinstance(linear, torch.nn.Linear):
                down, up = torch.zeros(1, linear.in_features), torch.zeros(linear.out_features, 1)
                layers[f"{component}.{name}"] = LoraLayer(down, up, 1.0)


def extract(
    base_path: str,
    tuned_path: str,
    out: str | Path,
    rank: int | None = None,
    energy: float | None = None,
    all_layers: bool = False,
    device: str | None = None,
) -> tuple[list[Path], RankSummary]:
    """Write `out/pytorch_lora_weights.safetensors` and its kohya copy; return the files
    and the summary."""
    from personalize.adapters.kohya import kohya_metadata
    from personalize.adapters.lora import KOHYA_WEIGHTS, LORA_WEIGHTS
    from personalize.models import SDXL, load_pipeline, model_family

    check_target(rank, energy)
    base, tuned = load_pipeline(base_path), load_pipeline(tuned_path)
    family = model_family(base.unet, base.text_encoder)
    if model_family(tuned.unet, tuned.text_encoder) != family:
        raise ModelLoadError(
            f"{tuned_path} is {model_family(tuned.unet, tuned.text_encoder)} and {base_path} "
            f"is {family}: extract needs the base the model was tuned from"
        )
    components = ["unet", "text_encoder"] + (["text_encoder_2"] if family == SDXL else [])
    layers, energies, lost = {}, [], []
    for component in components:
        got, kept, missed = extract_module(
            component,
            getattr(base, component),
            getattr(tuned, component),
            rank,
            energy,
            all_layers,
            device,
        )
        layers.update(got)
        energies += kept
        lost += missed
    _keep_text_encoder_loadable(layers, tuned.text_encoder)
    if family == SDXL:
        _keep_text_encoder_loadable(layers, tuned.text_encoder_2, "text_encoder_2")
    if not layers:
        raise ArtifactError(
            f"{tuned_path} has the same Linear/Conv weights as {base_path}: nothing to extract"
        )
    if lost:
        logger.warning(
            "%d changed tensors are not in the LoRA (biases, norms, embeddings; layers "
            "outside the UNet blocks unless all_layers) e.g. %s",
            len(lost),
            ", ".join(lost[:3]),
        )
    cross = base.unet.config.cross_attention_dim
    meta = {
        "personalize_extracted_from": Path(tuned_path).name,
        "personalize_base_model": str(base_path),
        "personalize_cross_attention_dim": str(cross),
    }
    out = Path(out)
    version = kohya_metadata(1, 1, cross, 0, family)["ss_base_model_version"]
    sdxl_unet = base.unet.config if family == SDXL else None
    written = [
        write_peft(layers, out / LORA_WEIGHTS, meta),
        write_kohya(
            layers,
            out / KOHYA_WEIGHTS,
            {**meta, "ss_base_model_version": version},
            sdxl_unet=sdxl_unet,
        ),
    ]
    summary = RankSummary(len(layers), [layer.rank for layer in layers.values()], energies)
    summary.bytes_after = written[0].stat().st_size
    logger.info("extracted %d layers into %s: %s", len(layers), out, summary.line())
    return written, summary
