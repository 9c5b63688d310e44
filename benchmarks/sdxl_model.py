"""SDXL base's architecture with random weights, built in code (no download), and the
memory its parts need, computed from their parameter counts.

    python benchmarks/sdxl_model.py estimate        # the computed table of docs/sdxl.md

The configs are those of stabilityai/stable-diffusion-xl-base-1.0 (unet, text_encoder,
text_encoder_2, vae); only the tokenizers are the tiny byte-level one, so the two token
tables are 514 rows instead of 49408 (about 100M parameters fewer, all frozen).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,  # CLIP-L 768 + OpenCLIP-bigG 1280
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + pooled 1280
    "norm_num_groups": 32,
}
CLIP_L = {  # text_encoder: CLIPTextModel
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_BIGG = {  # text_encoder_2: CLIPTextModelWithProjection
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,  # SDXL's VAE overflows in fp16: both trainers keep it fp32
}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _text_config(spec: dict, vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        **spec,
    )


def parts(vocab_size: int, seed: int = 0):
    """(unet, vae, text_encoder, text_encoder_2) with SDXL base's configs."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return (
        UNet2DConditionModel(**UNET),
        AutoencoderKL(**VAE),
        CLIPTextModel(_text_config(CLIP_L, vocab_size)),
        CLIPTextModelWithProjection(_text_config(CLIP_BIGG, vocab_size)),
    )


def build_sdxl(path: Path) -> Path:
    """A StableDiffusionXLPipeline folder with SDXL base's architecture and random weights.

    The tiny SDXL pipeline gives model_index.json, tokenizers and scheduler; each big part
    is then built, saved over the tiny one's folder and dropped before the next, so the
    build never holds more than the UNet (10 GB in fp32) in memory at once."""
    import gc

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from personalize.testing import save_tiny_sdxl_pipeline, tiny_tokenizer

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_tiny_sdxl_pipeline(partial)
    vocab = len(tiny_tokenizer())
    builders = {
        "unet": lambda: UNet2DConditionModel(**UNET),
        "vae": lambda: AutoencoderKL(**VAE),
        "text_encoder": lambda: CLIPTextModel(_text_config(CLIP_L, vocab)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(_text_config(CLIP_BIGG, vocab)),
    }
    for seed, (name, build) in enumerate(builders.items()):
        torch.manual_seed(seed)
        module = build()
        shutil.rmtree(partial / name)
        module.save_pretrained(partial / name, safe_serialization=True)
        del module
        gc.collect()
    partial.rename(path)  # a half-built folder is never taken for a model
    return path


def lora_parameters(unet, rank: int) -> int:
    """Parameters of peft LoRA adapters of `rank` on the UNet's attention projections."""
    import torch

    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(
            name.endswith("." + t) for t in LORA_TARGETS
        ):
            total += rank * (module.in_features + module.out_features)
    return total


def estimate(rank: int = 16) -> dict[str, float]:
    """GiB of each part of SDXL LoRA training, from parameter counts (meta tensors: nothing
    is allocated). Activations are not in it: they are what the GPU benchmark measures."""
    import torch

    with torch.device("meta"):
        unet, vae, te1, te2 = parts(49408)  # the real vocabulary, for real table sizes
    count = {
        n: sum(p.numel() for p in m.parameters())
        for n, m in {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}.items()
    }
    lora = lora_parameters(unet, rank)
    gib = 2**30
    return {
        "parameters": {**count, f"lora_rank{rank}": lora},
        "unet_weights_bf16": count["unet"] * 2 / gib,
        "unet_weights_fp32": count["unet"] * 4 / gib,
        "text_encoders_bf16": (count["text_encoder"] + count["text_encoder_2"]) * 2 / gib,
        "vae_fp32": count["vae"] * 4 / gib,
        # fp32 weight + fp32 gradient + AdamW's two fp32 moments
        "lora_adamw": lora * (4 + 4 + 8) / gib,
        # fp32 weight + fp32 gradient + two 8-bit moments (block-wise scales are ~1%)
        "lora_adamw8bit": lora * (4 + 4 + 2) / gib,
    }


if __name__ == "__main__":
    if sys.argv[1:2] != ["estimate"]:
        raise SystemExit(__doc__)
    print(json.dumps(estimate(int(sys.argv[2]) if len(sys.argv) > 2 else 16), indent=2))
