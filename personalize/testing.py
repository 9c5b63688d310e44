"""A tiny, offline Stable Diffusion pipeline built in code, for tests and the demo.

Nothing here downloads: the tokenizer is a byte-level CLIP BPE with no merges (every
byte is a token), the text encoder has 2 layers, and the UNet/VAE are a few hundred
thousand parameters each. The classes are the real diffusers/transformers ones, so
every trainer, loader and saver runs unchanged against it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY_RESOLUTION = 32
TINY_TEXT_WIDTH = 32
# The SD 2.x stand-in: its text encoder is wider than SD1's (as OpenCLIP-H's 1024 is wider
# than CLIP-L's 768), so a width-keyed file (hypernetwork, embedding) of one family never
# fits the other by accident.
TINY_SD2_TEXT_WIDTH = 48


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def tiny_tokenizer(model_max_length: int = 77):
    """A byte-level CLIP tokenizer: 512 byte tokens (plain and end-of-word) + 2 specials."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    return tok


def tiny_text_config(vocab_size: int, **overrides):
    """A 2-layer CLIPTextConfig, CLIP-L's kind at a tiny width; `overrides`: other values
    (SD 2.x's OpenCLIP-style encoder, SDXL's pair)."""
    from transformers import CLIPTextConfig

    config = dict(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=TINY_TEXT_WIDTH,
    )
    config.update(overrides)
    return CLIPTextConfig(**config)


def tiny_text_encoder(vocab_size: int, seed: int = 0, **overrides):
    """A CLIPTextModel of `tiny_text_config(vocab_size, **overrides)`."""
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(tiny_text_config(vocab_size, **overrides)).eval()


def tiny_unet(seed: int = 0, **overrides):
    """A two-level UNet2DConditionModel; `overrides`: other config values (SD 2.x's)."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=TINY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config)


def tiny_vae(seed: int = 0, **overrides):
    """A two-level AutoencoderKL; `overrides`: other config values (SDXL's flags)."""
    from diffusers import AutoencoderKL

    config = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=TINY_RESOLUTION,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return AutoencoderKL(**config)


def tiny_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=prediction_type,
        steps_offset=1,
    )


def _sd_pipeline(tokenizer, text_encoder, unet, vae, scheduler):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A complete StableDiffusionPipeline with random tiny weights (deterministic in seed)."""
    tokenizer = tiny_tokenizer()
    return _sd_pipeline(
        tokenizer,
        tiny_text_encoder(len(tokenizer), seed),
        tiny_unet(seed),
        tiny_vae(seed),
        tiny_scheduler(prediction_type),
    )


def save_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny pipeline as a diffusers model folder, loadable by `from_pretrained`."""
    path = Path(path)
    tiny_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


def tiny_sd2_tokenizer(model_max_length: int = 77):
    """The byte tokenizer with SD 2.x's pad token: stabilityai/stable-diffusion-2(-1)'s
    tokenizer pads with "!" (id 0), not with <|endoftext|> as SD1's does."""
    tok = tiny_tokenizer(model_max_length)
    tok.pad_token = "!"
    return tok


def tiny_sd2_text_encoder(vocab_size: int, seed: int = 0):
    """OpenCLIP-H as diffusers ships it for SD 2.x, at a tiny width: a CLIPTextModel with
    `gelu` (not CLIP-L's quick_gelu) whose last hidden state is used. diffusers keeps 23 of
    OpenCLIP's 24 layers (the webui's "penultimate" layer), so the last state is SD2's."""
    return tiny_text_encoder(
        vocab_size,
        seed,
        hidden_size=TINY_SD2_TEXT_WIDTH,
        intermediate_size=96,
        hidden_act="gelu",
        pad_token_id=0,
        projection_dim=TINY_SD2_TEXT_WIDTH,
    )


def tiny_sd2_unet(seed: int = 0):
    """SD 2.1's UNet options at tiny widths: linear proj_in/proj_out, a per-block
    attention_head_dim tuple, attention upcast to fp32, a 48-wide text context."""
    return tiny_unet(
        seed,
        cross_attention_dim=TINY_SD2_TEXT_WIDTH,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
    )


def tiny_sd2_pipeline(seed: int = 0, prediction_type: str = "v_prediction"):
    """A StableDiffusionPipeline shaped like SD 2.x (768-v): v-prediction scheduler,
    OpenCLIP-style text encoder of another width than SD1's tiny, SD2's UNet options."""
    tokenizer = tiny_sd2_tokenizer()
    return _sd_pipeline(
        tokenizer,
        tiny_sd2_text_encoder(len(tokenizer), seed),
        tiny_sd2_unet(seed),
        tiny_vae(seed),
        tiny_scheduler(prediction_type),
    )


def save_tiny_sd2_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny SD 2.x pipeline as a diffusers model folder."""
    path = Path(path)
    tiny_sd2_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


def write_synthetic_images(
    folder: str | Path,
    count: int = 4,
    size: int = 48,
    caption: str | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write `count` PNGs of one recognizable 'subject': a red disc on a striped ground.

    The subject stays the same, its position and the stripe phase vary, so a trainer has
    something consistent to learn. With `caption`, a same-name .txt sidecar is written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    paths = []
    for i in range(count):
        stripes = ((xx + yy + rng.integers(0, 8)) // 6) % 2
        img = np.where(stripes[..., None] == 1, [30, 60, 200], [230, 230, 90]).astype(np.uint8)
        cx, cy = rng.integers(size // 3, 2 * size // 3, size=2)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < (size // 5) ** 2
        img[disc] = [220, 30, 30]
        p = folder / f"subject_{i:02d}.png"
        Image.fromarray(img).save(p)
        if caption is not None:
            p.with_suffix(".txt").write_text(caption, encoding="utf-8")
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- tiny SDXL

TINY_SDXL_TEXT_WIDTH = 32  # text_encoder (CLIP-L's place)
TINY_SDXL_TEXT_WIDTH_2 = 48  # text_encoder_2 (OpenCLIP-bigG's place), also its projection
TINY_SDXL_TIME_EMBED_DIM = 8


def tiny_sdxl_text_encoders(vocab_size: int, seed: int = 0):
    """(CLIPTextModel, CLIPTextModelWithProjection) of two widths, as SDXL's pair."""
    from transformers import CLIPTextModelWithProjection

    def overrides(width: int) -> dict:
        return dict(
            hidden_size=width, intermediate_size=2 * width, projection_dim=width, hidden_act="gelu"
        )

    first = tiny_text_encoder(vocab_size, seed, **overrides(TINY_SDXL_TEXT_WIDTH))
    torch.manual_seed(seed + 1)
    config_2 = tiny_text_config(vocab_size, **overrides(TINY_SDXL_TEXT_WIDTH_2))
    return first, CLIPTextModelWithProjection(config_2).eval()


def tiny_sdxl_unet(seed: int = 0):
    """SDXL's UNet shape in miniature: text_time added conditioning, 2 layers per down
    block (3 per up block), a transformer depth of 2 in the inner block."""
    return tiny_unet(
        seed,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM + TINY_SDXL_TEXT_WIDTH_2,
        cross_attention_dim=TINY_SDXL_TEXT_WIDTH + TINY_SDXL_TEXT_WIDTH_2,
    )


def tiny_sdxl_vae(seed: int = 0):
    """The tiny VAE with SDXL's config flags (`force_upcast`, its scaling factor)."""
    return tiny_vae(seed, scaling_factor=0.13025, force_upcast=True)


def tiny_sdxl_scheduler():
    """SDXL's scheduler config (Euler discrete, scaled_linear betas, leading spacing)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """A complete StableDiffusionXLPipeline with random tiny weights (deterministic in seed)."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer = tiny_tokenizer()
    text_encoder, text_encoder_2 = tiny_sdxl_text_encoders(len(tokenizer), seed)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_sdxl_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        unet=tiny_sdxl_unet(seed),
        scheduler=tiny_sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sdxl_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny SDXL pipeline as a diffusers model folder (`from_pretrained` loads it)."""
    path = Path(path)
    tiny_sdxl_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path
