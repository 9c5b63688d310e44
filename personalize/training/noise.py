"""The forward diffusion process for training: noise, timesteps, targets and loss weights."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_snr

from personalize.errors import ConfigError


def sample_noise(
    latents: torch.Tensor, generator: torch.Generator | None, noise_offset: float = 0.0
) -> torch.Tensor:
    noise = torch.randn(
        latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
    )
    if noise_offset:
        # Offset noise (Guttenberg 2023): lets the model learn very dark/bright images.
        noise = noise + noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1),
            generator=generator,
            device=latents.device,
            dtype=latents.dtype,
        )
    return noise


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    return torch.randint(
        0, num_train_timesteps, (batch_size,), generator=generator, device=device
    ).long()


def add_training_noise(
    noise_scheduler, latents: torch.Tensor, generator: torch.Generator, noise_offset: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, timesteps, noisy latents) of one step, all drawn from `generator`."""
    noise = sample_noise(latents, generator, noise_offset)
    timesteps = sample_timesteps(
        latents.shape[0], noise_scheduler.config.num_train_timesteps, latents.device, generator
    )
    return noise, timesteps, noise_scheduler.add_noise(latents, noise, timesteps)


def training_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(f"unsupported prediction type {kind!r} (use epsilon or v_prediction)")


def per_example_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    noise_scheduler,
    timesteps: torch.Tensor,
    snr_gamma: float | None,
    mask: torch.Tensor | None = None,
    unmasked_weight: float = 0.0,
    normalize_mask: bool = True,
) -> torch.Tensor:
    """MSE per example, optionally Min-SNR-gamma weighted (Hang et al. 2023). `mask`
    [B, 1, h, w] (data.masked_loss) weighs each element before the mean (data/masks.py
    `weigh_loss`); the SNR weight then applies to the example as a whole."""
    loss = torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="none")
    if mask is not None:
        from personalize.data.masks import weigh_loss

        loss = weigh_loss(loss, mask, unmasked_weight, normalize_mask)
    else:
        loss = loss.mean(dim=list(range(1, loss.ndim)))
    if snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=snr_gamma) / snr
        if noise_scheduler.config.prediction_type == "v_prediction":
            weights = torch.clamp(snr, max=snr_gamma) / (snr + 1)
        loss = loss * weights
    return loss
