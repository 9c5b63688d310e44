"""The toy world's Stable Diffusion architecture: the same diffusers/transformers classes as
SD 1.x (CLIPTokenizer, CLIPTextModel, AutoencoderKL, UNet2DConditionModel, DDPM/DDIM), only
small, so every trainer, loader and saver runs on it unchanged.

Sizes were picked for CPU pretraining (see benchmarks/toyworld/pretrain.py): 32 px images,
a 3-level VAE with 8 x 8 x 8 latents (factor 4, 8 channels: 6x compression, against SD's
8 x 8 x 4 per 64 x 64 x 3 = 48x, because stripes and spots must survive it), and a 2-level
UNet with cross-attention at 8 x 8 and 4 x 4. A UNet on 16 x 16 x 4 latents (3 levels,
attention at 8 x 8 and 4 x 4) trained 2-3x slower per step on CPU (measured).
"""

from __future__ import annotations

from personalize.toyworld.world import COLOR_NAMES, PATTERNS, PREFIXES, SHAPES, SIZES

RESOLUTION = 32
LATENT_SIZE = 8
LATENT_CHANNELS = 8
TEXT_WIDTH = 64
# Captions are at most ~12 words; 32 positions leave room for Textual Inversion templates
# and multi-vector placeholders while keeping cross-attention cheap.
MAX_TOKENS = 32

# Every word the world's captions use, plus a few that prompts commonly hold ("with",
# "the"). Each becomes ONE token; anything else falls back to byte-level tokens, like a rare
# word in real CLIP ("sks" -> s, k, s</w>).
WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "an", "on", "of", "the", "with", "and", "background", "dot"]
        + [w for p in PREFIXES for w in p.split()]
        + list(SHAPES)
        + list(COLOR_NAMES)
        + list(SIZES)
        + list(PATTERNS)
    )
)


def make_tokenizer():
    """The byte-level CLIP tokenizer of `personalize.testing` with the world's words added as
    whole-word tokens. Saved with `save_pretrained`, it loads with `CLIPTokenizer`."""
    from transformers import AddedToken

    from personalize.testing import tiny_tokenizer

    tok = tiny_tokenizer(model_max_length=MAX_TOKENS)
    # single_word: "a" must not match inside "background" or a user's "sks".
    tok.add_tokens([AddedToken(w, single_word=True) for w in WORDS])
    return tok


def make_text_encoder(tokenizer, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_WIDTH,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config)


def make_vae(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=RESOLUTION,
        # Self-attention in the VAE's middle block costs CPU time; convolutions alone
        # reconstruct these scenes.
        mid_block_add_attention=False,
    )


def make_unet(seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_scheduler():
    """SD 1.x's noise schedule (scaled-linear betas, 1000 steps, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,
    )


def make_pipeline(tokenizer, text_encoder, vae, unet):
    """A StableDiffusionPipeline (DDIM sampling) from the parts."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(make_scheduler().config, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
