"""Which saved file goes to which tool: the line logged after each save (docs/formats.md has
the table and how each row was verified)."""

from __future__ import annotations

import logging
from pathlib import Path

from personalize.errors import ConfigError

logger = logging.getLogger(__name__)

# ComfyUI's hypernetwork loader (comfy_extras/nodes_hypernetwork.py) knows these names only.
COMFYUI_HYPERNETWORK_ACTIVATIONS = (
    "linear",
    "relu",
    "leakyrelu",
    "elu",
    "swish",
    "tanh",
    "sigmoid",
    "softsign",
    "mish",
)


def client_guide(method: str, out_dir: Path, **files: Path | str | None) -> str:
    """One line naming the file for ComfyUI, the webui, kohya and diffusers."""
    out = Path(out_dir)
    if method == "lora" and files.get("lycoris_kind"):
        kohya = files["kohya_file"]
        return (
            f"{files['lycoris_kind']} saved in {out}: {kohya.name} -> ComfyUI models/loras, "
            "webui models/Lora, kohya sd-scripts with LyCORIS (network_module="
            "lycoris.kohya), personalize.load; stock diffusers load_lora_weights does not "
            "read LoHa/LoKr"
        )
    if method == "lora":
        kohya = files.get("kohya_file")
        ui = (
            f"{kohya.name} -> ComfyUI models/loras, webui models/Lora, kohya sd-scripts"
            if kohya
            else "no UI file (DoRA: see the warning above)"
        )
        return (
            f"LoRA saved in {out}: {ui}; pytorch_lora_weights.safetensors -> diffusers "
            "load_lora_weights / personalize.load only (ComfyUI loads it partly)"
        )
    if method == "textual_inversion":
        stem = files["stem"]
        return (
            f"embedding saved in {out}: {stem}.safetensors or {stem}.pt -> ComfyUI "
            f"models/embeddings (prompt: embedding:{stem}), webui embeddings/ (prompt: "
            f"{stem}); learned_embeds.safetensors -> diffusers load_textual_inversion"
        )
    if method == "textual_inversion_sdxl":
        stem = files["stem"]
        return (
            f"SDXL embedding saved in {out}: {stem}.safetensors (clip_l + clip_g) -> ComfyUI "
            f"models/embeddings (prompt: embedding:{stem}), webui embeddings/ (prompt: {stem}); "
            "learned_embeds.safetensors -> diffusers load_textual_inversion(..., "
            "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer) and "
            "learned_embeds_2.safetensors -> the same with text_encoder_2 and tokenizer_2"
        )
    if method == "pivotal":
        stem, token = files["stem"], files["token"]
        return (
            f"pivotal tuning: the embedding for {token} saved in {out} too: {stem}.safetensors "
            f"-> ComfyUI models/embeddings (prompt: embedding:{stem}), webui embeddings/ "
            f"(prompt: {stem}), with the LoRA/model above (not bundled into the LoRA: "
            f"ComfyUI reads no embedding from a LoRA); learned_embeds.safetensors -> diffusers "
            f"load_textual_inversion; "
            f"personalize.load(pipe, {out}) loads both; prompts must contain {token}"
        )
    if method == "hypernetwork":
        name = files["name"]
        return (
            f"hypernetwork saved in {out}: {name}.pt -> ComfyUI models/hypernetworks, webui "
            f"models/hypernetworks; {name}.safetensors is for personalize.load only (UIs "
            "do not read it)"
        )
    raise ConfigError(f"no client guide for method {method!r}")


def log_client_guide(method: str, out_dir: Path, **files: Path | str | None) -> None:
    logger.info(client_guide(method, out_dir, **files))


def comfyui_hypernetwork_problems(fields: dict) -> list[str]:
    """Why ComfyUI would not apply a hypernetwork `.pt` as the webui (and we) do, from its
    option fields; empty when it does."""
    problems = []
    act = fields.get("activation_func") or "linear"
    if act not in COMFYUI_HYPERNETWORK_ACTIVATIONS:
        problems.append(
            f"activation {act!r} is not one ComfyUI knows "
            f"({', '.join(COMFYUI_HYPERNETWORK_ACTIVATIONS)}): it refuses the file"
        )
    if fields.get("is_layer_norm") and act != "linear" and not fields.get("activate_output"):
        problems.append(
            "with layer_norm, ComfyUI also applies the activation after the last layer "
            "(it counts LayerNorms as layers); use activate_output: true or activation linear"
        )
    if fields.get("use_dropout"):
        problems.append(
            "ComfyUI builds the dropout layers in training mode, so it drops at inference "
            "too; train without use_dropout for ComfyUI"
        )
    return problems
